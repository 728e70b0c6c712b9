"""Result objects (lenscope.results): short reprs, strict JSON, and damaged files."""

import dataclasses
import html
import json
import math
import re

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope.datasets import DatasetSummary
from lenscope.datasets.facts import SkippedFact
from lenscope.lens import LensTrajectory, lens_trajectory
from lenscope.validation import InvalidInput


@pytest.fixture(scope="module")
def partial_trace(tiny_model):
    """A trace of layer 1 only: every other row of ``scores`` is NaN."""
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    return tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, layers=[1])


@pytest.fixture(scope="module")
def summary():
    return DatasetSummary(
        facts=(),
        skipped=(SkippedFact(fact_id=3, reason="no <subject> given"),),
        kinds=("mlp_out",),
        windows={"mlp_out": 2},
        n_layers=4,
        model_name="tiny <model>",
        samples=2,
        noise_std=0.5,
        seed=0,
        metric="prob",
        lenscope_version=lenscope.__version__,
    )


# ------------------------------------------------------------------- display


def test_trace_repr_is_one_short_line(partial_trace):
    r = partial_trace
    text = repr(r)
    assert len(text) < 400 and "\n" not in text
    assert text.startswith("TraceResult(model='tiny-")
    assert f"answer={r.answer!r}" in text and "kind='mlp_out'" in text
    layer, pos, score = r.peak()
    assert layer == 1  # the only traced row
    assert f"peak={score:.3g} at layer 1, pos {pos} {r.tokens[pos]!r}" in text
    assert f"clean={r.clean_score:.3g} corrupted={r.corrupted_score:.3g}" in text
    long = dataclasses.replace(r, prompt="word " * 200)
    assert len(repr(long)) < 400 and "…" in repr(long)


def test_trace_html_is_an_escaped_table(partial_trace):
    page = dataclasses.replace(partial_trace, prompt="a <b>bold</b> prompt")._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") >= 8
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert html.escape(repr(partial_trace.answer)) in page
    assert "blocks.0.hook_mlp_out ... blocks.3.hook_mlp_out" in page


def test_summary_repr_and_html(summary):
    text = repr(summary)
    assert text == (
        "DatasetSummary(model='tiny <model>', 0 facts, 1 skipped, kinds=('mlp_out',), "
        "samples=2, metric='prob')"
    )
    page = summary._repr_html_()
    assert "<table" in page and "tiny &lt;model&gt;" in page and "<model>" not in page
    assert "best_aie" in page


# --------------------------------------------------------------- strict JSON


def test_save_writes_strict_json_with_nulls_and_round_trips(partial_trace, tmp_path):
    r = partial_trace
    assert r.scores.isnan().any() and not r.scores[1].isnan().all()
    path = r.save(tmp_path / "trace.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert data["scores"][0] == [None] * r.n_pos
    assert all(isinstance(v, float) and math.isfinite(v) for v in data["scores"][1])
    back = lenscope.TraceResult.load(path)
    assert torch.equal(back.scores.isnan(), r.scores.isnan())
    assert torch.equal(back.scores.nan_to_num(-7.0), r.scores.nan_to_num(-7.0))
    assert torch.equal(back.top_ids, r.top_ids)
    assert torch.equal(back.top_probs.isnan(), r.top_probs.isnan())
    assert torch.equal(back.top_probs.nan_to_num(-7.0), r.top_probs.nan_to_num(-7.0))
    assert back.clean_score == r.clean_score and back.corrupted_score == r.corrupted_score


# ------------------------------------------------------------- damaged files


def _damaged(tmp_path, partial_trace, case):
    path = tmp_path / f"{case}.json"
    if case == "truncated":
        text = partial_trace.save(path).read_text()
        path.write_text(text[: len(text) // 2])
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "list":
        path.write_text("[1, 2, 3]")
    elif case == "null":
        path.write_text("null")
    elif case == "format_only":
        path.write_text(json.dumps({"format": "lenscope.TraceResult/1"}))
    elif case == "no_format":
        path.write_text(json.dumps({"scores": []}))
    elif case == "bad_field":
        path.write_text(json.dumps({**partial_trace.to_dict(), "scores": "high"}))
    elif case == "lens":
        path.write_text(json.dumps({"format": "lenscope.LensTrajectory/1"}))
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", r"is not valid JSON \(.*\); the file is damaged or truncated: save the"),
        ("garbage", r"is not valid JSON \(.*\); the file is damaged or truncated: save the"),
        ("list", r"got a JSON array; it was not written by lenscope: pass what TraceResult"),
        ("null", r"got a JSON null; it was not written by lenscope: pass what TraceResult"),
        (
            "format_only",
            r"a TraceResult record needs the fields \['scores', .*\] \.\.\., which this one "
            r"lacks; it is damaged or was not written by lenscope: save the result again",
        ),
        ("no_format", r"got a dict without a 'format' field; it is damaged or was not written"),
        (
            "bad_field",
            r"TraceResult\.save, but a field has the wrong type or shape \(TypeError: .*\); the "
            r"file is damaged: save the result again$",
        ),
        ("lens", r"got format 'lenscope.LensTrajectory/1'; load it with LensTrajectory.load$"),
    ],
)
def test_loading_a_damaged_trace_names_the_file_and_the_fix(tmp_path, partial_trace, case, match):
    path = _damaged(tmp_path, partial_trace, case)
    with pytest.raises(InvalidInput) as caught:
        lenscope.TraceResult.load(path)
    message = str(caught.value)
    assert message.startswith(f"{str(path)!r} must hold a TraceResult saved by TraceResult.save")
    assert re.search(match, message), message


def test_loading_a_missing_trace_names_the_file(tmp_path):
    rule = "' does not exist or is not a file; pass the path of a "
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=f"'{re.escape(str(path))}{rule}TraceResult saved"):
        lenscope.TraceResult.load(path)
    # A directory is not a file either.
    with pytest.raises(FileNotFoundError, match=f"'{re.escape(str(tmp_path))}{rule}DatasetSummary"):
        DatasetSummary.load(tmp_path)


def test_loading_truncated_summary_and_trajectory(tmp_path, summary, tiny_model):
    trajectory = lens_trajectory(tiny_model, TINY_PROMPT, top_k=2)
    for result, cls in ((summary, DatasetSummary), (trajectory, LensTrajectory)):
        path = tmp_path / f"{cls.__name__}.json"
        text = result.save(path).read_text()
        path.write_text(text[: len(text) - 10])
        match = (
            rf"^'{re.escape(str(path))}' must hold a {cls.__name__} saved by "
            rf"{cls.__name__}\.save, but it is not valid JSON .*: save the result again$"
        )
        with pytest.raises(InvalidInput, match=match):
            cls.load(path)
        path.write_text("[]")
        with pytest.raises(InvalidInput, match=r"got a JSON array; it was not written by"):
            cls.load(path)
