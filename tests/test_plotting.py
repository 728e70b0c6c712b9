"""Tests of lenscope.plotting on synthetic TraceResults (no model, no browser)."""

import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import lenscope.plotting as lp
from lenscope.plotting import _common
from lenscope.results import TraceResult

TOKENS = (
    "<bos>",
    "The",
    " Eiffel",
    " Tower",
    " is",
    " in",
    " the",
    " the",
    "\n",
    " supercalifragilistic",
)
WORDS = [" Paris", " Rome", " London", " Seattle", " city", " France", " tower", " a"]


def make_result(
    *,
    kind="mlp_out",
    n_layers=6,
    tokens=TOKENS,
    k=5,
    seed=0,
    window=1,
    model_name="tiny",
    answer=" Paris",
    answer_id=100,
    metric="prob",
    nan_cells=((0, 0),),
    corrupted=0.1,
    clean=0.8,
):
    """A synthetic, internally consistent TraceResult with known top-k per cell."""
    gen = torch.Generator().manual_seed(seed)
    n_pos = len(tokens)
    scores = corrupted + (clean - corrupted) * torch.rand(n_layers, n_pos, generator=gen)
    for layer, pos in nan_cells:
        scores[layer, pos] = math.nan
    # Top-k ids differ cell by cell, so a hover mixed up between cells is caught.
    base = torch.arange(n_layers * n_pos).reshape(n_layers, n_pos, 1)
    top_ids = (base + torch.arange(k)) % len(WORDS) + 100
    top_probs = torch.linspace(0.5, 0.1, k).expand(n_layers, n_pos, k).clone()
    vocab = {100 + i: word for i, word in enumerate(WORDS)}
    return TraceResult(
        scores=scores.float(),
        clean_score=clean,
        corrupted_score=corrupted,
        tokens=tuple(tokens),
        token_ids=torch.arange(n_pos),
        subject_range=(1, 4),
        answer=answer,
        answer_id=answer_id,
        kind=kind,
        hook_names=tuple(f"blocks.{i}.hook_{kind}" for i in range(n_layers)),
        window=window,
        samples=3,
        noise_std=0.1,
        seed=0,
        model_name=model_name,
        metric=metric,
        top_ids=top_ids,
        top_probs=top_probs,
        clean_top_ids=torch.tensor([100] * k),
        clean_top_probs=torch.full((k,), 0.2),
        corrupted_top_ids=torch.tensor([101] * k),
        corrupted_top_probs=torch.full((k,), 0.2),
        vocab=vocab,
        prompt="".join(tokens[1:]),
    )


def unchecked(function):
    """``function`` without the test run's runtime type checker.

    The jaxtyping import hook (pyproject addopts) rejects a wrongly typed
    argument before lenscope's own check runs; users without the hook get
    lenscope's message, which these tests check.
    """
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def z_of(trace):
    """The heatmap's z as float numpy, None -> NaN."""
    return np.array(trace.z, dtype=float)


def hover_text(trace, row, col):
    """The hover label plotly renders for one cell: template filled with customdata."""
    cell = trace.customdata[row][col]
    text = re.sub(
        r"%\{customdata\[(\d+)\]\}", lambda m: str(cell[int(m.group(1))]), trace.hovertemplate
    )
    return text.replace("<extra></extra>", "")


# -- the heatmap ------------------------------------------------------------------------


def test_plot_returns_figure_and_does_not_show(monkeypatch):
    monkeypatch.setattr(go.Figure, "show", lambda *a, **k: pytest.fail(".plot() called show()"))
    fig = make_result().plot()
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"


def test_z_matches_scores_with_nan_blank():
    result = make_result()
    z = z_of(result.plot().data[0])
    expected = result.scores.double().numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-6, equal_nan=True)
    assert math.isnan(z[0, 0])
    assert result.plot().data[0].z[0][0] is None  # serialised as a gap, not a number


@pytest.mark.parametrize("value", ["indirect_effect", "normalized"])
def test_value_option(value):
    result = make_result()
    expected = result.indirect_effect if value == "indirect_effect" else result.normalized()
    trace = result.plot(value=value).data[0]
    np.testing.assert_allclose(
        z_of(trace), expected.double().numpy(), rtol=1e-5, atol=1e-7, equal_nan=True
    )
    assert trace.zmin == 0.0


def test_x_axis_keeps_duplicate_tokens_distinct_and_whitespace_visible():
    fig = make_result().plot()
    axis = fig.layout.xaxis
    assert list(fig.data[0].x) == list(range(len(TOKENS)))
    assert list(axis.tickvals) == list(range(len(TOKENS)))
    labels = list(axis.ticktext)
    assert labels[6] == labels[7] == "\u2423the"  # two " the" columns, both visible
    assert labels[8] == "\u21b5"  # newline
    assert labels[0] == "&lt;bos&gt;"  # escaped so plotly shows it
    assert labels[9].endswith("\u2026") and len(labels[9]) <= 12  # shortened
    # ... but the hover holds the full text.
    assert fig.data[0].customdata[0][9][0] == "\u2423supercalifragilistic"


def test_subject_marked_in_labels_and_box():
    fig = make_result().plot()
    labels = list(fig.layout.xaxis.ticktext)
    marked = [i for i, label in enumerate(labels) if "*" in label]
    assert marked == [1, 2, 3]
    assert labels[2] == "<b>\u2423Eiffel*</b>"
    (box,) = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (box.x0, box.x1) == (0.5, 3.5) and box.xref == "x"
    assert "subject" in fig.data[0].customdata[0][2][1]
    assert "subject" not in fig.data[0].customdata[0][4][1]


def test_title_has_answer_and_scores():
    title = make_result().plot().layout.title.text
    assert "\u2423Paris" in title and "0.8" in title and "0.1" in title
    assert make_result().plot(title="mine").layout.title.text == "mine"


def test_hover_customdata_has_topk_of_the_right_cell():
    result = make_result(k=5)
    trace = result.plot(top_k=3).data[0]
    for layer, pos in [(1, 2), (5, 9), (3, 6), (3, 7)]:
        cell = trace.customdata[layer][pos]
        expected = result.top_predictions(layer, pos)[:3]
        rows = [str(field) for field in cell[6:]]
        assert len(rows) == 3
        for row, (token, prob) in zip(rows, expected, strict=True):
            assert _common.visible(token) in row
            assert f"{prob:.1%}" in row
        text = hover_text(trace, layer, pos)
        assert f"layer{_common.NBSP * 2}{layer}" in text
        assert f"pos{_common.NBSP * 4}{pos}" in text
        assert f"{float(result.scores[layer, pos]):.4g}" in text
        normalized = float(result.normalized()[layer, pos])
        assert f"{normalized:.1%}" in text
    assert "monospace" in result.plot().layout.hoverlabel.font.family


def test_hover_of_untraced_cell_says_not_traced():
    trace = make_result().plot().data[0]
    text = hover_text(trace, 0, 0)
    assert "not traced" in text and "top-" not in text
    assert "not traced" not in hover_text(trace, 1, 0)


def test_hover_shows_restored_window():
    trace = make_result(window=3).plot().data[0]
    assert "restores 1–3" in trace.customdata[2][0][2]
    assert "restores 0–1" in trace.customdata[0][0][2]


def test_layer_stride_keeps_last_layer():
    result = make_result(n_layers=7)
    trace = result.plot(layer_stride=3).data[0]
    assert list(trace.y) == [0, 3, 6]
    np.testing.assert_allclose(
        z_of(trace), result.scores[[0, 3, 6]].double().numpy(), rtol=1e-6, equal_nan=True
    )
    assert trace.customdata[1][4][2] == "3"


def test_layer_order():
    assert make_result().plot().layout.yaxis.autorange is True
    assert make_result().plot(layer_order="top_down").layout.yaxis.autorange == "reversed"


def test_colour_scale_per_kind_anchored_at_corrupted():
    for kind, scale in [("resid_post", "Purples"), ("mlp_out", "Greens"), ("attn_out", "Reds")]:
        reference = go.Heatmap(colorscale=scale).colorscale
        trace = make_result(kind=kind).plot().data[0]
        assert trace.colorscale == reference
        assert trace.zmin == pytest.approx(0.1)
        assert trace.zmax == pytest.approx(float(np.nanmax(make_result().scores)))
    trace = make_result().plot(colorscale="Viridis", zmin=0, zmax=1).data[0]
    assert (trace.zmin, trace.zmax) == (0, 1)


def test_figure_fits_its_container_and_its_natural_width_grows_with_tokens():
    short = make_result(tokens=TOKENS[:4]).plot()
    long = make_result(tokens=TOKENS * 3).plot()
    for fig in (short, long):
        # No fixed width: plotly fills the notebook cell or page.
        assert fig.layout.autosize is True and fig.layout.width is None
        assert fig.layout.height > 0
    # The natural width (static images) still grows with the tokens.
    assert _common.natural_width(long) > _common.natural_width(short)
    fixed = make_result().plot(width=500, height=300)
    assert (fixed.layout.width, fixed.layout.height) == (500, 300)
    assert _common.natural_width(fixed) == 500


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"value": "logit"}, ValueError, r"value must be one of 'score'.*got 'logit'"),
        ({"layer_order": "up"}, ValueError, r"layer_order must be one of .*got 'up'"),
        ({"layer_stride": 0}, ValueError, r"layer_stride must be >= 1; got 0"),
        ({"top_k": 9}, ValueError, r"top_k must be <= the 5 predictions.*got top_k=9; pass"),
        ({"top_k": -1}, ValueError, r"top_k must be an int >= 0; got -1"),
        ({"width": 0}, ValueError, r"width must be >= 1; got 0"),
    ],
)
def test_plot_trace_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_result().plot(**kwargs)


def test_plot_trace_rejects_wrong_types():
    with pytest.raises(TypeError, match=r"expected TraceResult objects; got dict at index 0"):
        unchecked(lp.plot_trace)({})
    with pytest.raises(TypeError, match=r"layer_stride must be a positive int; got 1.5 \(float\)"):
        unchecked(lp.plot_trace)(make_result(), layer_stride=1.5)


def test_top_k_zero_has_no_table():
    trace = make_result().plot(top_k=0).data[0]
    assert "top-" not in hover_text(trace, 2, 2)


# -- comparison -------------------------------------------------------------------------


def three_kinds(**overrides):
    return {
        kind: make_result(kind=kind, seed=i, **overrides.get(kind, {}))
        for i, kind in enumerate(("resid_post", "mlp_out", "attn_out"))
    }


def test_plot_traces_panels_share_colour_range_and_axes():
    results = three_kinds()
    fig = lp.plot_traces(results)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert len({(t.zmin, t.zmax) for t in fig.data}) == 1
    assert fig.data[0].zmax == pytest.approx(
        max(float(np.nanmax(r.scores)) for r in results.values())
    )
    assert [t.xaxis for t in fig.data] == ["x", "x2", "x3"]
    assert fig.layout.xaxis2.matches == "x" and fig.layout.xaxis3.matches == "x"
    assert list(fig.layout.xaxis3.ticktext) == list(fig.layout.xaxis.ticktext)
    assert fig.layout.yaxis2.matches == "y"
    for trace, result in zip(fig.data, results.values(), strict=True):
        np.testing.assert_allclose(
            z_of(trace), result.scores.double().numpy(), rtol=1e-6, equal_nan=True
        )
    # Colour bars sit right of their own panel, not on top of the next one.
    assert fig.data[0].colorbar.x < fig.layout.xaxis2.domain[0]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["residual stream", "MLP output", "attention output"]
    assert fig.layout.width is None and fig.layout.autosize is True
    assert _common.natural_width(fig) > _common.natural_width(lp.plot_trace(results["mlp_out"]))


def test_plot_traces_keeps_room_for_colour_bars_in_a_narrow_window():
    """At FIT_WIDTH pixels the 110-pixel gaps for the colour bars are still 110 pixels."""
    fig = lp.plot_traces(three_kinds(), width=None)
    margins = fig.layout.margin.l + fig.layout.margin.r
    plot_area = _common.FIT_WIDTH - margins
    gap = (fig.layout.xaxis2.domain[0] - fig.layout.xaxis.domain[1]) * plot_area
    assert gap == pytest.approx(110)
    offset = (fig.data[0].colorbar.x - fig.layout.xaxis.domain[1]) * plot_area
    assert offset == pytest.approx(8)
    # A fixed width lays the panels out the same way.
    fixed = lp.plot_traces(three_kinds(), width=2000)
    assert fixed.layout.xaxis2.domain == fig.layout.xaxis2.domain


def test_plot_traces_per_panel_scales():
    fig = lp.plot_traces(three_kinds(), shared_scale=False)
    assert len({t.zmax for t in fig.data}) == 3


def test_plot_traces_accepts_a_sequence():
    fig = lp.plot_traces(list(three_kinds().values()))
    assert len(fig.data) == 3


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"model_name": "other"}, r"model_name 'tiny' \(result 0\) vs 'other' \(result 2\)"),
        ({"answer": " Rome", "answer_id": 101}, r"answer ' Paris' \(result 0\) vs ' Rome'"),
        ({"tokens": TOKENS[:-1] + (" x",)}, r"prompt tokens"),
        ({"metric": "log_prob"}, r"metric 'prob' \(result 0\) vs 'log_prob'"),
    ],
)
def test_plot_traces_refuses_mismatched_results(override, match):
    results = three_kinds(attn_out=override)
    with pytest.raises(ValueError, match=r"compares traces of one prompt, model, answer") as info:
        lp.plot_traces(results)
    assert re.search(match, str(info.value))
    assert "pass allow_mismatch=True" in str(info.value)
    assert len(lp.plot_traces(results, allow_mismatch=True).data) == 3


def test_plot_traces_mismatched_lengths_with_allow_mismatch():
    results = three_kinds(attn_out={"tokens": TOKENS[:6]})
    fig = lp.plot_traces(results, allow_mismatch=True)
    assert fig.layout.xaxis3.matches is None
    assert len(fig.layout.xaxis3.ticktext) == 6


@pytest.mark.parametrize(
    ("results", "error", "match"),
    [
        ({}, ValueError, r"needs at least one TraceResult; got none"),
        ("abc", TypeError, r"expects a dict kind -> TraceResult or a list.*got str"),
        ([1, 2], TypeError, r"expected TraceResult objects; got int at index 0"),
    ],
)
def test_plot_traces_bad_input(results, error, match):
    with pytest.raises(error, match=match):
        unchecked(lp.plot_traces)(results)


# -- export -----------------------------------------------------------------------------


def test_save_html_is_self_contained(tmp_path):
    path = lp.save_html(lp.plot_traces(three_kinds()), tmp_path / "sub" / "trace.html")
    text = path.read_text(encoding="utf-8")
    assert "<script src=" not in text  # nothing fetched: no CDN, no MathJax
    assert "plotly.js v" in text or "Plotly" in text
    assert len(text) > 1_000_000  # plotly.js itself is embedded
    assert "lenscope linked hover" in text
    assert "{plot_id}" not in text
    plain = lp.save_html(make_result().plot(), tmp_path / "plain.html", linked_hover=False)
    assert "lenscope linked hover" not in plain.read_text(encoding="utf-8")


def test_save_html_page_follows_the_window_width(tmp_path):
    fig = lp.plot_traces(three_kinds())
    text = lp.save_html(fig, tmp_path / "trace.html").read_text(encoding="utf-8")
    height = int(fig.layout.height)
    # plotly's wrapper div: the figure's own height, the page's full width.
    assert f'<div style="height:{height}px; width:100%;">' in text
    assert '"responsive": true' in text
    fixed = lp.save_html(make_result().plot(width=500), tmp_path / "fixed.html")
    assert "width:500px;" in fixed.read_text(encoding="utf-8")


def test_save_image_uses_the_natural_width_unless_told(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))
    calls = []
    monkeypatch.setattr(go.Figure, "write_image", lambda fig, path, **kw: calls.append(kw))
    fig = lp.plot_traces(three_kinds())
    lp.save_image(fig, tmp_path / "a.png")
    lp.save_image(fig, tmp_path / "b.png", width=800, scale=2)
    lp.save_image(go.Figure(), tmp_path / "c.png")
    assert calls == [{"width": _common.natural_width(fig)}, {"width": 800, "scale": 2}, {}]


def test_save_html_rejects_non_figure(tmp_path):
    with pytest.raises(TypeError, match=r"save_html expects a plotly Figure; got dict"):
        unchecked(lp.save_html)({}, tmp_path / "x.html")


def test_save_image_without_kaleido_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "kaleido":
            raise ImportError("No module named 'kaleido'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install kaleido"):
        lp.save_image(make_result().plot(), tmp_path / "trace.png")


# -- shared helpers ---------------------------------------------------------------------


def test_token_labels_helpers():
    labels, full = _common.token_labels(["a", "a", " b\t", ""], marked=[1])
    assert labels == ["a", "<b>a*</b>", "\u2423b\u21e5", "\u2205"]
    assert full[2] == "\u2423b\u21e5"
    assert _common.shorten("abcdef", 4) == "abc\u2026"
    assert _common.stride_keep_last(10, 4) == [0, 4, 8, 9]
    assert _common.stride_keep_last(9, 4) == [0, 4, 8]


def test_topk_lines_are_aligned():
    rows = _common.topk_lines([(" Paris", 0.5), (" a", 0.05)])
    assert len(rows[0]) == len(rows[1])
    assert rows[0].startswith(_common.NBSP + "1" + _common.NBSP + "\u2423Paris")
