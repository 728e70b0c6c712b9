"""The trace meter's arithmetic on a fake clock, and the decode weight by hand."""

import types

import pytest
import torch

from lenscope import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_estimate_extrapolates_the_work_speed_and_ignores_the_warm_up():
    clock = FakeClock()
    meter = progress.TraceMeter(1000, clock=clock)
    assert meter.estimate() is None and meter.remaining() is None
    clock.now += 30.0  # a slow first run: one-time costs
    meter.warmed_up(100)
    assert meter.estimate() is None  # nothing timed yet
    clock.now += 4.0
    meter.advance(200)  # 200 units in 4 s: 0.02 s per unit
    assert meter.seconds_per_unit() == pytest.approx(0.02)
    assert meter.remaining() == pytest.approx(700 * 0.02)
    assert meter.estimate() == pytest.approx(34.0 + 14.0)
    clock.now += 16.0
    meter.advance(300)  # slower now: 500 units in 20 s
    assert meter.remaining() == pytest.approx(400 * 0.04)
    assert meter.estimate() == pytest.approx(50.0 + 16.0)


def test_the_long_trace_decision_is_made_once_at_the_first_deciding_step(monkeypatch):
    monkeypatch.setattr(progress, "LONG_TRACE_SECONDS", 100.0)
    clock, calls = FakeClock(), []
    meter = progress.TraceMeter(1000, clock=clock, on_long=calls.append)
    clock.now += 10.0
    meter.advance(10)  # a whole-prompt run: not a deciding step
    assert not meter.decided and calls == []
    clock.now += 10.0
    meter.advance(10, decides=True)  # 20 units in 20 s: 1000 s in all
    assert meter.decided and calls == [pytest.approx(1000.0)]
    assert meter.first_estimate == pytest.approx(1000.0)
    clock.now += 500.0
    meter.advance(10, decides=True)
    assert calls == [pytest.approx(1000.0)]  # once


def test_a_short_trace_is_not_announced(monkeypatch):
    monkeypatch.setattr(progress, "LONG_TRACE_SECONDS", 100.0)
    clock, calls = FakeClock(), []
    meter = progress.TraceMeter(100, clock=clock, on_long=calls.append)
    clock.now += 1.0
    meter.advance(50, decides=True)
    assert calls == [] and meter.first_estimate == pytest.approx(2.0)


def test_the_progress_bar_shows_the_measured_remaining_time(capsys):
    clock = FakeClock()
    with progress.TraceMeter(100, clock=clock, progress=True, description="trace") as meter:
        meter.describe("trace mlp_out")
        clock.now += 61.0
        meter.advance(50)
    err = capsys.readouterr().err
    assert "trace mlp_out:  50%" in err
    assert "elapsed, time left 01:01" in err  # 50 units left at 61 s per 50


def _model(cfg):
    model = torch.nn.Module()
    model.cfg = cfg
    return model


def test_decode_weight_is_the_ratio_of_multiply_adds():
    # GPT-2 small's shapes, worked by hand: a block multiplies 2 * 768 * 768 (queries,
    # output) + 2 * 768 * 768 (keys, values) + 2 * 768 * 3072 (MLP) and attends over 10
    # keys (2 * 10 * 768); a decoded row multiplies 768 * 50257 and passes 8 times over
    # the vocabulary.
    cfg = types.SimpleNamespace(
        d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257, gated_mlp=False
    )
    weight = progress.decode_weight(_model(cfg), 10)
    assert weight == pytest.approx((768 * 50257 + 8 * 50257) / 7093248)
    # Gemma-3-270m: gated MLP, 4 query heads and 1 key-value head of 256.
    cfg = types.SimpleNamespace(
        d_model=640,
        d_head=256,
        n_heads=4,
        n_key_value_heads=1,
        d_mlp=2048,
        d_vocab=262144,
        gated_mlp=True,
    )
    block = 2 * 640 * 1024 + 2 * 640 * 256 + 3 * 640 * 2048 + 2 * 10 * 1024
    weight = progress.decode_weight(_model(cfg), 10)
    assert weight == pytest.approx((640 * 262144 + 8 * 262144) / block)


@pytest.mark.parametrize(
    ("seconds", "text"), [(47.0, "47 s"), (720.0, "12 minutes"), (6840.0, "1.9 hours")]
)
def test_duration(seconds, text):
    assert progress.duration(seconds) == text


def test_watching_sees_every_step_of_meters_made_inside_and_can_stop_them():
    seen = []
    outside = progress.TraceMeter(10)
    with progress.watching(lambda m: seen.append((m.description, m.done))):
        meter = progress.TraceMeter(10, description="trace")
        meter.warmed_up(2)
        meter.describe("trace mlp_out")
        meter.advance(3)
        outside.advance(1)  # made before the watch: not watched
    meter.advance(1)  # the meter keeps its watchers
    after = progress.TraceMeter(10)
    after.advance(1)  # made after the watch ended: not watched
    assert seen == [("trace", 2.0), ("trace mlp_out", 5.0), ("trace mlp_out", 6.0)]

    def stop(meter):
        raise RuntimeError("stop here")

    with progress.watching(stop):
        meter = progress.TraceMeter(10)
    with pytest.raises(RuntimeError, match="stop here"):
        meter.advance(1)
