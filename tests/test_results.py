"""Result objects (lenscope.results): short reprs."""

import dataclasses
import html

import pytest
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope.datasets import DatasetSummary
from lenscope.datasets.facts import SkippedFact


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
