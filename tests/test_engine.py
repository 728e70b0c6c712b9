"""The vectorised sweep against a plain reference loop, written independently here."""

import math

import pytest
import torch
from conftest import TINY_PROMPT
from records import assert_same_record

import lenscope
from lenscope import engine, progress

SAMPLES = 3


def _answer_prob(logits, answer):
    return torch.softmax(logits, dim=-1)[:, answer]


def reference_trace(
    model, tokens, subject_range, noise, kind, window, answer, cells, metric=_answer_prob
):
    """One run_with_hooks per cell, full logits, nothing shared: the obvious implementation.

    ``metric`` maps the last-position float logits of the copies to one number per copy.
    """
    n_layers = model.cfg.n_layers
    start, end = subject_range
    _, clean_cache = model.run_with_cache(tokens[None])
    batch = tokens[None].repeat(noise.shape[0], 1)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += noise
        return embed

    def restorer(name, pos):
        def hook(act, hook):
            # In place, as TransformerLens patching.py's setters do: on a
            # TransformerBridge a tensor returned at hook_resid_mid reaches only
            # the second norm, not the residual stream.
            act[:, pos] = clean_cache[name][0, pos]
            return act

        return hook

    def score(extra_hooks):
        logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise), *extra_hooks])
        return metric(logits[:, -1].float(), answer).mean().item()

    out = torch.full((n_layers, tokens.shape[0]), math.nan)
    for layer, pos in cells:
        lo = max(0, layer - window // 2)
        hi = min(n_layers, layer - window // 2 + window)
        names = [f"blocks.{j}.hook_{kind}" for j in range(lo, hi)]
        out[layer, pos] = score([(name, restorer(name, pos)) for name in names])
    return out, score([])


@pytest.fixture(scope="module")
def tokens_and_noise(tiny_model):
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(SAMPLES, 3, tiny_model.cfg.d_model, generator=generator) * 2.0
    return tokens, noise


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gated_model"])
@pytest.mark.parametrize("strategy", ["full", "prefix"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("kind", lenscope.KINDS)
def test_engine_matches_reference_loop(
    request, tokens_and_noise, kind, window, strategy, model_name
):
    """Every cell of every kind: GPT-2 layout and gated-MLP/grouped-query-attention layout."""
    model = request.getfixturevalue(model_name)
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(model, strategy=strategy, progress=False, batch_size=7)
    result = tracer.trace(
        tokens, (1, 4), kind=kind, window=window, noise_tensor=noise, samples=SAMPLES
    )
    cells = [(layer, pos) for layer in range(4) for pos in range(tokens.shape[0])]
    expected, corrupted = reference_trace(
        model, tokens, (1, 4), noise, kind, window, result.answer_id, cells
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert result.corrupted_score == pytest.approx(corrupted, abs=1e-6)


@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_layer_range_and_positions_subset(tiny_model, tokens_and_noise, strategy):
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_model, strategy=strategy, progress=False)
    result = tracer.trace(
        tokens,
        (1, 4),
        kind="mlp_out",
        window=3,
        noise_tensor=noise,
        samples=SAMPLES,
        layers=[1, 2],
        positions=[0, 3, 5, 9],
    )
    cells = [(layer, pos) for layer in (1, 2) for pos in (0, 3, 5, 9)]
    expected, _ = reference_trace(
        tiny_model, tokens, (1, 4), noise, "mlp_out", 3, result.answer_id, cells
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0, equal_nan=True)
    assert result.scores.isnan().sum() == 4 * 10 - 8
    assert (result.top_ids[0] == -1).all() and result.top_probs[0].isnan().all()


@pytest.mark.parametrize("kind", lenscope.KINDS)
@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 64, None])
def test_every_chunking_gives_the_same_scores(tiny_model, tokens_and_noise, batch_size, kind):
    """Chunking and the automatic batch size change speed, never the numbers."""
    tokens, noise = tokens_and_noise
    reference = lenscope.CausalTracer(tiny_model, strategy="full", progress=False, batch_size=1000)
    expected = reference.trace(
        tokens, (1, 4), kind=kind, window=3, noise_tensor=noise, samples=SAMPLES
    )
    for strategy in ("full", "prefix"):
        tracer = lenscope.CausalTracer(
            tiny_model, strategy=strategy, progress=False, batch_size=batch_size
        )
        got = tracer.trace(tokens, (1, 4), kind=kind, window=3, noise_tensor=noise, samples=SAMPLES)
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.top_probs, expected.top_probs, atol=1e-6, rtol=0)
        assert torch.equal(got.top_ids[..., 0], expected.top_ids[..., 0])


def test_prefix_strategy_on_model_with_learned_positions(tiny_model_no_tokenizer):
    """Absolute position embeddings: the prefix path must keep the positions of the suffix."""
    model = tiny_model_no_tokenizer
    tokens = torch.tensor([0, 5, 9, 11, 3, 7, 20, 8])
    noise = torch.randn(2, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    results = {
        strategy: lenscope.CausalTracer(model, strategy=strategy, progress=False).trace(
            tokens, (2, 4), kind="resid_pre", window=2, noise_tensor=noise, samples=2, answer=3
        )
        for strategy in ("full", "prefix")
    }
    torch.testing.assert_close(results["prefix"].scores, results["full"].scores, atol=1e-6, rtol=0)
    cells = [(layer, pos) for layer in range(4) for pos in range(8)]
    expected, _ = reference_trace(model, tokens, (2, 4), noise, "resid_pre", 2, 3, cells)
    torch.testing.assert_close(results["prefix"].scores, expected, atol=1e-5, rtol=0)


def test_auto_batch_size_is_bounded(tiny_model):
    from lenscope.engine import auto_batch_size

    rows = auto_batch_size(tiny_model, n_pos=10, samples=10)
    assert 10 <= rows <= 4096


def test_restore_windows_follow_rome():
    from lenscope.engine import restore_windows

    cells = torch.tensor([[0, 0], [5, 0], [17, 0]])
    windows = restore_windows(cells, 10, 18)
    # ROME: layers [l - w//2, l - w//2 + w) clipped to [0, n_layers)
    assert windows[0].nonzero().flatten().tolist() == list(range(0, 5))
    assert windows[1].nonzero().flatten().tolist() == list(range(0, 10))
    assert windows[2].nonzero().flatten().tolist() == list(range(12, 18))


@pytest.mark.parametrize("cells_per_chunk", [1, 3, 7])
def test_decoding_in_chunks_gives_the_same_scores(
    tiny_model, tokens_and_noise, monkeypatch, cells_per_chunk
):
    """Final residuals are decoded a chunk of whole cells at a time: any chunking agrees."""
    import lenscope.engine as engine

    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    options = dict(kind="resid_pre", window=1, noise_tensor=noise, samples=SAMPLES)
    expected = tracer.trace(tokens, (1, 4), **options)
    monkeypatch.setattr(
        engine, "_DECODE_BYTES", 4 * tiny_model.cfg.d_vocab * SAMPLES * cells_per_chunk
    )
    got = tracer.trace(tokens, (1, 4), **options)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.top_probs, expected.top_probs, atol=1e-6, rtol=0)


def _answer_logit_view(logits, answer):
    return logits[:, answer]  # a view of the logits the engine later overwrites


@pytest.mark.parametrize(
    ("metric", "reference_metric"),
    [
        ("log_prob", lambda logits, a: torch.log_softmax(logits, dim=-1)[:, a]),
        (_answer_logit_view, lambda logits, a: logits[:, a].clone()),
        (lenscope.metrics.logit_diff(5), lambda logits, a: logits[:, a] - logits[:, 5]),
    ],
)
@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_metrics_match_reference_loop(
    tiny_gated_model, tokens_and_noise, metric, reference_metric, strategy
):
    """The shared in-place softmax must not change what any metric sees."""
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_gated_model, strategy=strategy, progress=False)
    result = tracer.trace(
        tokens,
        (1, 4),
        kind="mlp_out",
        window=3,
        noise_tensor=noise,
        samples=SAMPLES,
        metric=metric,
    )
    cells = [(layer, pos) for layer in range(4) for pos in range(tokens.shape[0])]
    expected, corrupted = reference_trace(
        tiny_gated_model,
        tokens,
        (1, 4),
        noise,
        "mlp_out",
        3,
        result.answer_id,
        cells,
        metric=reference_metric,
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert result.corrupted_score == pytest.approx(corrupted, abs=1e-5)


def test_weights_are_stored_in_read_order_only_during_a_trace(tiny_gated_model, tokens_and_noise):
    """TransformerLens's per-call weight transposes become views; afterwards nothing changed."""
    import einops

    from lenscope.engine import matmul_friendly_weights
    from lenscope.hooks import is_bridge

    model = tiny_gated_model
    if is_bridge(model):
        pytest.skip(
            "HookedTransformer weight layout; matmul_friendly_weights leaves a bridge alone"
        )
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    before = [(p, p.data, p.data_ptr(), p.stride()) for p in model.parameters()]
    assert not mlp.W_gate.T.is_contiguous()
    with matmul_friendly_weights(model):
        assert mlp.W_gate.T.is_contiguous() and mlp.W_out.T.is_contiguous()
        for weight, pattern in [
            (attn.W_Q, "h m d -> (h d) m"),
            (attn._W_K, "h m d -> (h d) m"),
            (attn.W_O, "h d m -> m (h d)"),
        ]:
            assert einops.rearrange(weight, pattern).data_ptr() == weight.data_ptr()
        seen = [(p, p.data) for p in model.parameters()]
    for (param, data, ptr, stride), (param_in, data_in) in zip(before, seen, strict=True):
        assert param is param_in and torch.equal(data, data_in)
        assert param.data_ptr() == ptr and param.stride() == stride


def test_probabilities_are_accurate_on_a_wide_vocabulary():
    """The engine's in-place softmax and lenscope's metrics agree with float64 to 3e-7.

    Wide, peaked logits like a real model's over 262k tokens: torch's float32
    softmax kernel is off by several 1e-5 on CPU here, which once made a
    restored-to-clean cell differ from the clean score.
    """
    from lenscope.engine import _score_rows

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 262_144, generator=generator) * 6
    logits[:, 7] += 40
    expected = torch.softmax(logits.double(), dim=-1)
    for metric in (lenscope.metrics.prob, lenscope.metrics.log_prob):
        scores, top_ids, top_probs = _score_rows(logits.clone(), 2, 7, [metric], 3)
        scores = scores[0]
        want = expected[:, 7] if metric is lenscope.metrics.prob else expected[:, 7].log()
        torch.testing.assert_close(scores.double(), want.reshape(2, 2).mean(1), atol=3e-7, rtol=0)
        torch.testing.assert_close(metric(logits, 7).double(), want, atol=3e-7, rtol=0)
    mean = expected.reshape(2, 2, -1).mean(1)
    torch.testing.assert_close(top_probs.double(), mean.topk(3).values, atol=1e-6, rtol=0)
    assert torch.equal(top_ids, mean.topk(3).indices)


def _counting_sweep(monkeypatch):
    """Wrap engine.sweep: record its estimate and the forward passes / token-layers it runs."""
    from lenscope import engine

    records = []
    real_sweep, real_forward, real_stair = engine.sweep, engine.forward_cells, engine._run_stair

    def forward_cells(model, corrupted, site, windows, masks, source, *args, **kwargs):
        rows = windows.shape[0] * corrupted.samples
        records[-1]["ran"].append(rows * corrupted.tokens.shape[1] * model.cfg.n_layers)
        return real_forward(model, corrupted, site, windows, masks, source, *args, **kwargs)

    def run_stair(model, pos, entries, windows, masks, site, source, state, samples, *rest):
        n_pos = state.resid_pre[0].shape[1]
        work = int(((n_pos - pos) * (model.cfg.n_layers - entries)).sum()) * samples
        records[-1]["ran"].append(work)
        return real_stair(model, pos, entries, windows, masks, site, source, state, samples, *rest)

    def sweep(model, **kwargs):
        keys = ("site", "window", "cells", "strategy", "batch_size")
        estimate = engine.estimate_sweep(
            model, corrupted=kwargs["base"], **{k: kwargs[k] for k in keys}
        )
        args = tuple(
            kwargs[k] for k in ("site", "window", "cells", "base", "strategy", "batch_size")
        )
        records.append({"estimate": estimate, "ran": [], "args": args})
        return real_sweep(model, **kwargs)

    monkeypatch.setattr(engine, "sweep", sweep)
    monkeypatch.setattr(engine, "forward_cells", forward_cells)
    monkeypatch.setattr(engine, "_run_stair", run_stair)
    return records


@pytest.mark.parametrize("strategy", ["full", "prefix"])
@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_estimate_counts_the_forward_passes_the_sweep_runs(
    tiny_model, tokens_and_noise, monkeypatch, strategy, batch_size
):
    tokens, noise = tokens_and_noise
    records = _counting_sweep(monkeypatch)
    tracer = lenscope.CausalTracer(
        tiny_model, strategy=strategy, progress=False, batch_size=batch_size
    )
    tracer.trace_kinds(tokens, (1, 4), noise_tensor=noise, samples=SAMPLES, layers=[0, 2, 3])
    assert len(records) == 3  # one sweep per kind
    for record in records:
        estimate = record["estimate"]
        assert estimate.cells == 3 * tokens.shape[0]
        assert estimate.batches == len(record["ran"]) > 0
        assert estimate.token_layers == sum(record["ran"])


def test_a_long_trace_warns_after_its_first_sweep_batch_with_the_numbers(
    tiny_model, tokens_and_noise, monkeypatch
):
    from lenscope import engine, progress

    tokens, noise = tokens_and_noise
    records = _counting_sweep(monkeypatch)
    monkeypatch.setattr(progress, "LONG_TRACE_SECONDS", 0.0)
    batches_run_when_warned = []
    real_duration = engine.duration

    def duration(seconds):  # called as the warning is written
        batches_run_when_warned.append(sum(len(r["ran"]) for r in records))
        return real_duration(seconds)

    monkeypatch.setattr(engine, "duration", duration)
    tracer = lenscope.CausalTracer(tiny_model, progress=False, batch_size=7)
    with pytest.warns(UserWarning) as caught:
        tracer.trace_kinds(
            tokens, (1, 4), kinds=("resid_post", "mlp_out"), noise_tensor=noise, samples=SAMPLES
        )
    long = [w for w in caught if "this trace will take" in str(w.message)]
    assert len(long) == 1
    # Made from the measured speed of the first sweep batch, not before it.
    assert batches_run_when_warned == [1]
    # Attributed to the line that called lenscope, not to lenscope's own code.
    assert long[0].filename == __file__
    message = str(long[0].message)
    batches = sum(r["estimate"].batches for r in records)
    token_layers = sum(r["estimate"].token_layers for r in records)
    decoded = sum(r["estimate"].decoded_rows for r in records)
    active = sum(
        int(engine._plan_sweep(tiny_model, s, w, c, b, st, bs).active.sum())
        for s, w, c, b, st, bs in (r["args"] for r in records)
    )
    assert decoded == active * SAMPLES
    assert message.startswith("this trace will take about ")
    assert f"40 cells x 2 kinds = 80 cells in {batches:,} forward passes, " in message
    assert f"{token_layers:,} token-layers and {decoded:,} decoded rows, " in message
    assert "at the speed its first forward passes ran (" in message
    assert " ms per token-layer)" in message
    assert "pass positions='subject'" in message and "layers=range(0, 2)" in message


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_the_meter_counts_in_advance_exactly_the_work_that_runs(
    tiny_model, tokens_and_noise, monkeypatch, strategy, direction
):
    """The progress bar ends at 100%: every unit counted before the trace is advanced once."""
    from lenscope import progress

    tokens, noise = tokens_and_noise
    meters = []
    real_init = progress.TraceMeter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        meters.append(self)

    monkeypatch.setattr(progress.TraceMeter, "__init__", init)
    steps = []
    real_advance = progress.TraceMeter.advance
    monkeypatch.setattr(
        progress.TraceMeter,
        "advance",
        lambda self, units, **kw: (steps.append(units), real_advance(self, units, **kw)),
    )
    tracer = lenscope.CausalTracer(tiny_model, strategy=strategy, progress=False, batch_size=5)
    tracer.trace_kinds(
        tokens,
        (1, 4),
        noise_tensor=noise,
        samples=SAMPLES,
        direction=direction,
        layers=[0, 2, 3],
    )
    (meter,) = meters
    assert meter.done == pytest.approx(meter.total, rel=1e-12)
    # The work of a whole-prompt run, computed independently: rows x (positions x blocks
    # + the decode weight).
    n_pos, n_layer = tokens.shape[0], tiny_model.cfg.n_layers
    weight = progress.decode_weight(tiny_model, n_pos)
    assert steps[0] == pytest.approx(SAMPLES * (n_pos * n_layer + weight))
    assert meter.decided and meter.first_estimate is not None


def test_the_time_left_is_known_before_the_first_cell_is_restored(
    tiny_model, tokens_and_noise, monkeypatch
):
    """A long prompt's user sees an estimate after the whole-prompt runs, not after a sweep."""
    from lenscope import engine, progress

    tokens, noise = tokens_and_noise
    meters, seen = [], []
    real_init, real_stair = progress.TraceMeter.__init__, engine._run_stair

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        meters.append(self)

    def run_stair(*args, **kwargs):
        if not seen:
            seen.append((meters[0].remaining(), meters[0].done))
        return real_stair(*args, **kwargs)

    monkeypatch.setattr(progress.TraceMeter, "__init__", init)
    monkeypatch.setattr(engine, "_run_stair", run_stair)
    tracer = lenscope.CausalTracer(tiny_model, strategy="prefix", progress=False)
    tracer.trace_kinds(tokens, (1, 4), kinds=("mlp_out",), noise_tensor=noise, samples=SAMPLES)
    ((remaining, done),) = seen
    assert remaining is not None and remaining > 0
    n_pos, n_layer = tokens.shape[0], tiny_model.cfg.n_layers
    weight = progress.decode_weight(tiny_model, n_pos)
    assert done == pytest.approx((1 + SAMPLES) * (n_pos * n_layer + weight))


def test_a_normal_trace_does_not_warn(tiny_model, tokens_and_noise):
    import warnings

    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The tiny random model's answer is filler: that warning is tested in test_tracer.
        warnings.filterwarnings("ignore", category=lenscope.AnswerWarning)
        tracer.trace_kinds(tokens, (1, 4), noise_tensor=noise, samples=SAMPLES)


@pytest.fixture
def forward_counter(tiny_model):
    """Counts the forward passes reaching block 0."""
    calls = []
    point = tiny_model.hook_dict["blocks.0.hook_resid_pre"]
    handle = point.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_a_trace_too_big_for_memory_is_refused_before_any_forward(
    tiny_model, monkeypatch, forward_counter, strategy
):
    from lenscope import engine
    from lenscope.validation import InvalidInput

    seen = []
    monkeypatch.setattr(engine, "available_memory", lambda device: seen.append(device) or 1000)
    tracer = lenscope.CausalTracer(tiny_model, progress=False, strategy=strategy)
    with pytest.raises(InvalidInput) as error:
        tracer.trace_kinds(TINY_PROMPT, "The Eiffel Tower", samples=4)
    assert forward_counter == [] and seen == [torch.device("cpu")]
    estimate = engine.memory_estimate(tiny_model, 10, 3 * 4, strategy)
    per_copy = estimate.per_copy + estimate.kept_per_copy
    assert str(error.value) == (
        "one cell of a trace must fit in memory, but this 10-token prompt needs about "
        f"{estimate.peak(4) / 1e6:.2g} MB (4 corrupted copies of {per_copy / 1e6:.2g} MB each, "
        f"plus {estimate.fixed / 1e6:.2g} MB of clean activations) and 0.001 MB is available in "
        "RAM; trace a shorter prompt (a row's memory grows with the square of its length); "
        "neither positions=... nor layers=... lowers what one cell needs"
    )
    # Room for two copies: the message says so.
    monkeypatch.setattr(engine, "available_memory", lambda device: estimate.peak(2) + 1)
    with pytest.raises(InvalidInput, match=r"RAM; pass samples=2 \(or fewer\), or trace a shorter"):
        tracer.trace_kinds(TINY_PROMPT, "The Eiffel Tower", samples=4)
    assert forward_counter == []
    tracer.trace_kinds(TINY_PROMPT, "The Eiffel Tower", samples=2)
    assert forward_counter


def test_the_memory_estimate_of_a_long_gemma_prompt_is_honest():
    """A 5000-token prompt on Gemma-3-270m (10 samples) grew past 18 GB before it was killed."""
    from types import SimpleNamespace

    from lenscope import engine

    model = torch.nn.Module()
    model.cfg = SimpleNamespace(
        d_model=640,
        d_mlp=2048,
        n_heads=4,
        n_key_value_heads=1,
        d_head=256,
        n_layers=18,
        d_vocab=262144,
        dtype=torch.float32,
        device="cpu",
    )
    estimate = engine.memory_estimate(model, 5000, 3 * 18, "prefix")
    assert 18e9 < estimate.peak(10) < 35e9
    # Attention scores dominate: a row of twice the length needs about four times the memory.
    assert 3 < engine.row_bytes(model, 10000) / engine.row_bytes(model, 5000) < 4
    assert engine.auto_batch_size(model, 5000, 10) == 10


def test_available_memory_is_known_on_linux():
    import sys

    from lenscope import engine

    available = engine.available_memory(torch.device("cpu"))
    if sys.platform.startswith("linux"):
        assert isinstance(available, int) and available > 0
    assert engine.available_memory(torch.device("meta")) is None


def test_result_window_layers_agree_with_the_engines_windows(tiny_model):
    import dataclasses

    from lenscope.engine import restore_windows

    result = lenscope.CausalTracer(tiny_model, progress=False).trace(
        TINY_PROMPT, (1, 4), kind="mlp_out", samples=1, layers=[0]
    )
    n_layers = result.n_layers
    for window in range(1, n_layers + 1):
        r = dataclasses.replace(result, window=window)
        cells = torch.tensor([[layer, 0] for layer in range(n_layers)])
        rows = restore_windows(cells, window, n_layers)
        for layer in range(n_layers):
            lo, hi = r.window_layers(layer)
            assert rows[layer].nonzero().flatten().tolist() == list(range(lo, hi))


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("prefix", {"samples": 3, "kinds": ("resid_post", "mlp_out")}),
        ("full", {"samples": 3, "metric": "normalized_prob", "kinds": ("resid_pre", "mlp_out")}),
        ("prefix", {"corruption": "counterfactual", "metric": "log_prob", "kinds": ("attn_out",)}),
        ("prefix", {"samples": 2, "answer": " city of", "kinds": ("mlp_out",)}),
    ],
)
def test_a_streamed_trace_equals_the_trace_and_shows_each_batch(
    tiny_model, monkeypatch, strategy, options
):
    # progress.watching(..., cells=True) makes each sweep decode its batches as they
    # finish (sweep(on_cells=...)) and show the first metric's grid so far.
    monkeypatch.setattr(engine, "STREAM_ROWS", 4)  # a tiny grid: decode often
    options = dict(options)
    subject = "The Eiffel Tower"
    if options.pop("corruption", None):
        options["corruption"] = lenscope.CounterfactualPrompt(
            "The Space Needle is located in the city of"
        )
        subject = None
    # Two copies per forward pass: many small batches, remainders smaller than STREAM_ROWS.
    tracer = lenscope.CausalTracer(tiny_model, progress=False, strategy=strategy, batch_size=2)
    plain = tracer.trace_kinds(TINY_PROMPT, subject, **options)
    plain = plain if isinstance(plain, dict) else {plain.kind: plain}
    shown = []

    def watch(meter):
        if meter.cells is not None and (not shown or meter.cells is not shown[-1][2]):
            shown.append((meter.cells[0], meter.cells[1].clone(), meter.cells))

    with progress.watching(watch, cells=True):
        streamed = tracer.trace_kinds(TINY_PROMPT, subject, **options)
    streamed = streamed if isinstance(streamed, dict) else {streamed.kind: streamed}
    for kind, result in plain.items():
        # Equal to float rounding (a row may round by a float32 ulp with several threads).
        # A normalised metric divides that ulp by clean - corrupted (5e-6 here): compare its
        # cells as the raw change they normalise.
        a, b = streamed[kind].to_dict(), result.to_dict()
        if result.metric.startswith("normalized"):
            clean, corrupted = b["normalization"]
            for record in (a, b):
                record["scores"] = [[s * (clean - corrupted) for s in r] for r in record["scores"]]
        assert_same_record(a, b)
        grids = [grid for shown_kind, grid, _ in shown if shown_kind == kind]
        assert len(grids) >= 3, "the kind's cells were not shown batch by batch"
        counts = [int(torch.isfinite(grid).sum()) for grid in grids]
        assert counts == sorted(counts) and counts[0] < counts[-1] == result.scores.numel()
        for grid in grids:  # every cell shown is the streamed result's, on its scale
            done = torch.isfinite(grid)
            assert torch.equal(grid[done], streamed[kind].scores[done])
    assert [kind for kind, _, _ in shown] == sorted(
        (kind for kind, _, _ in shown), key=list(plain).index
    )
