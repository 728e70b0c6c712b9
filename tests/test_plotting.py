"""Tests of lenscope.plotting on synthetic TraceResults (no model, no browser)."""

import math
import re
import warnings

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
        corruption={"name": "gaussian_noise", "samples": 3, "noise_std": 0.1, "seed": 0},
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


def _flat(text):
    """A title as one line: the line breaks that wrap it to the layout width become spaces."""
    return text.replace("<br>", " ")


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
    # Effects can be negative: a diverging scale, white at zero, symmetric.
    span = float(np.nanmax(np.abs(expected.double().numpy())))
    assert (trace.zmid, trace.zmin, trace.zmax) == (0.0, pytest.approx(-span), pytest.approx(span))


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
    # Probabilities in percent, as the colour bar and the hover show them.
    assert "\u2423Paris" in title and "clean 80% · corrupted 10%" in title
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
        # prob is drawn in percent: the hover says the score in percent too.
        assert f"score{_common.NBSP * 2}{float(result.scores[layer, pos]):.1%}" in text
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


def test_probability_on_the_kinds_sequential_scale_from_zero():
    for kind, scale in [("resid_post", "Purples"), ("mlp_out", "Greens"), ("attn_out", "Reds")]:
        reference = go.Heatmap(colorscale=scale).colorscale
        trace = make_result(kind=kind).plot().data[0]
        assert trace.colorscale == reference
        assert trace.zmin == 0 and trace.zmid is None and trace.reversescale is False
        assert trace.zmax == pytest.approx(float(np.nanmax(make_result().scores)))
        assert trace.colorbar.tickformat == ".2~p"
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
    wide = lp.plot_traces(results, width=1600)
    assert wide.data[0].colorbar.x < wide.layout.xaxis2.domain[0]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["residual stream", "MLP output", "attention output"]
    assert fig.layout.width is None and fig.layout.autosize is True


def test_plot_traces_lays_panels_out_for_the_layout_width():
    """Side by side where each panel and its colour bar fit, else one panel per row."""
    from lenscope.plotting import _layout

    for width, rows in ((None, 3), (700, 2), (1600, 1)):
        fig = lp.plot_traces(three_kinds(), width=width)
        lw = _layout.layout_width(width)
        plot_w = lw - fig.layout.margin.l - fig.layout.margin.r
        x = [fig.layout[f"xaxis{s}"].domain for s in ("", "2", "3")]
        y = [fig.layout[f"yaxis{s}"].domain for s in ("", "2", "3")]
        assert len({tuple(d) for d in y}) == rows, (width, y)
        for index, trace in enumerate(fig.data):
            # The colour bar starts 8 px right of its own panel, as tall as the panel...
            offset = (trace.colorbar.x - x[index][1]) * plot_w
            assert offset == pytest.approx(8), (width, index)
            assert trace.colorbar.len == pytest.approx(y[index][1] - y[index][0])
            # ...inside the 110-pixel gap before the next panel of its row.
            if index < 2 and y[index + 1] == y[index]:
                assert (x[index + 1][0] - x[index][1]) * plot_w == pytest.approx(110)
        if rows == 3:
            # Every panel spans the width; the rows keep the tick labels and titles apart.
            assert all(d == x[0] for d in x)
            assert y[0][0] > y[1][1] > y[1][0] > y[2][1]
    assert lp.plot_traces(three_kinds(), width=1600).layout.width == 1600


def test_plot_traces_per_panel_scales():
    fig = lp.plot_traces(three_kinds(), shared_scale=False)
    assert len({t.zmax for t in fig.data}) == 3


def _linked_label(trace, row_value, col):
    """What linked hover writes beside a sibling cell: the customdata field named in meta."""
    field = trace.meta[_common.LINKED_FIELD]
    return trace.customdata[list(trace.y).index(row_value)][col][field]


def test_linked_hover_labels_are_in_the_colour_bars_unit():
    """Sibling panels' values read as their hover's score: percent for a probability (issue 31)."""
    kinds = ("resid_post", "mlp_out", "attn_out")
    results = {k: make_result(kind=k, seed=i) for i, k in enumerate(kinds)}
    fig = lp.plot_traces(results)
    for trace, result in zip(fig.data, results.values(), strict=True):
        assert list(trace.x) == list(range(result.n_pos))  # no fold: x is the position
        assert trace.colorbar.tickformat.endswith("%") or "p" in trace.colorbar.tickformat
        for layer, pos in ((2, 5), (4, 1), (0, 3)):
            assert _linked_label(trace, layer, pos) == f"{float(result.scores[layer, pos]):.1%}"
        assert _linked_label(trace, 0, 0) == "not traced"
    a, b = results["mlp_out"], results["attn_out"]
    (diff,) = lp.plot_traces([a, b], mode="difference", allow_mismatch=True).data
    for layer, pos in ((2, 5), (4, 1)):
        value = float(a.scores[layer, pos] - b.scores[layer, pos])
        assert _linked_label(diff, layer, pos) == f"{value:+.1%}"


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


# -- figures name their experiment (real traces on the tiny model) ----------------------

COUNTERFACTUAL = "The Space Needle is located in the city of"
NOISE_ONLY = ("noise std", "samples", "seed")


@pytest.fixture(scope="module")
def traces(tiny_model, one_thread):
    """Real traces of every figure kind: noise, STR (both directions), logit difference, heads."""
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer

    tracer = CausalTracer(tiny_model, progress=False)
    common = {"answer": " paris"}
    return {
        "noise": tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, samples=2, seed=3, **common),
        "str": tracer.patch(TINY_PROMPT, COUNTERFACTUAL, foil=" seattle", **common),
        "str_noise": tracer.patch(
            TINY_PROMPT, COUNTERFACTUAL, foil=" seattle", direction="noise", **common
        ),
        "noise_noising": tracer.trace(
            TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, direction="noise", **common
        ),
        "logit_diff": tracer.trace(
            TINY_PROMPT,
            TINY_SUBJECT,
            kind="resid_pre",
            samples=2,
            metric="logit_diff",
            foil=" seattle",
            **common,
        ),
        "heads": tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="z", by="head", samples=2, **common),
    }


def page_of(fig, tmp_path, name="fig.html"):
    """The saved page's <title> and its settings table, as text."""
    text = lp.save_html(fig, tmp_path / name).read_text(encoding="utf-8")
    title = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
    table = re.search(r'<table class="lenscope-settings">(.*?)</table>', text, re.S).group(1)
    return title, table


def test_noise_trace_names_noise_direction_and_metric(traces, tmp_path):
    results = traces["noise"]
    record = results["mlp_out"].corruption
    fig = lp.plot_traces(results)
    title = _flat(fig.layout.title.text)
    assert "restoring clean activations into the corrupted run" in title
    assert f"std {record['noise_std']:.3g}" in title and "2 samples" in title
    assert "seed 3" in title and "prob clean" in title
    assert "The Eiffel Tower is located" in title and "counterfactual" not in title
    page_title, table = page_of(fig, tmp_path)
    assert "restoring clean activations into the corrupted run" in page_title
    for name, value in [
        ("corruption", "gaussian_noise"),
        ("noise std", f"{record['noise_std']:.4g}"),
        ("samples", "2"),
        ("seed", "3"),
        ("metric", "prob"),
        ("direction", "denoise: restoring"),
    ]:
        assert re.search(rf"<th>{name}</th><td[^>]*>{re.escape(value)}", table), name
    assert "counterfactual" not in table and "foil" not in table


def test_str_patch_names_counterfactual_foil_and_raw_logit_differences(traces, tmp_path):
    result = traces["str"]
    clean, corrupted = result.normalization
    fig = lp.plot_trace(result)
    title = _flat(fig.layout.title.text)
    assert f"counterfactual prompt {COUNTERFACTUAL!r}" in title.replace("&#x27;", "'")
    assert "foil <b>\u2423seattle</b>" in title
    assert f"logit difference clean {clean:.3g} · corrupted {corrupted:.3g}" in title
    assert "normalized_logit_diff" in title
    assert "tokens that differ" in title
    for field in NOISE_ONLY:  # STR has no noise: no "noise std 0", no samples, no seed
        assert field not in title
    _, table = page_of(fig, tmp_path)
    assert re.search(r"<th>counterfactual prompt</th><td[^>]*>&#x27;The Space Needle", table)
    assert re.search(r"<th>foil</th><td[^>]*>&#x27; seattle&#x27;", table)
    assert f"clean {clean:.4g}, corrupted {corrupted:.4g}" in table
    assert re.search(r"<th>metric</th><td[^>]*>normalized_logit_diff", table)
    for field in NOISE_ONLY:
        assert f"<th>{field}</th>" not in table


def test_a_long_counterfactual_prompt_is_cut_where_it_differs(tmp_path):
    """A long counterfactual shares its start with the prompt: the title shows where it differs."""
    import dataclasses

    shared = "Big Ben is located in the city of London and the Space Needle is in Seattle. "
    counterfactual = shared + "The Colosseum is located in the city of"
    result = dataclasses.replace(
        make_result(),
        prompt=shared + "The Eiffel Tower is located in the city of",
        corruption={"name": "counterfactual_prompt", "counterfactual": counterfactual},
    )
    fig = lp.plot_trace(result)
    shown = re.search(r"counterfactual prompt '(.*?)'", _flat(fig.layout.title.text)).group(1)
    assert "The Colosseum is located in the city of" in shown
    assert shown.startswith("…") and len(shown) <= 60
    assert counterfactual.endswith(shown[1:])
    # The settings table keeps it whole.
    _, table = page_of(fig, tmp_path)
    assert "Big Ben is located in the city of London" in table


@pytest.mark.parametrize("which", ["str_noise", "noise_noising"])
def test_noising_figures_say_so_and_keep_matters_the_same(traces, tmp_path, which):
    result = traces[which]
    fig = lp.plot_trace(result)
    title = _flat(fig.layout.title.text)
    assert "patching corrupted activations into the clean run" in title
    assert "Restoring" not in title and "restoring" not in title
    page_title, table = page_of(fig, tmp_path)
    assert "patching corrupted activations into the clean run" in page_title
    assert re.search(r"<th>direction</th><td[^>]*>noise: patching", table)
    trace = fig.data[0]
    if which == "str_noise":
        # A normalised metric is drawn as the share of clean - corrupted lost: 0 = no effect.
        np.testing.assert_allclose(
            z_of(trace), 1 - result.normalized().double().numpy(), atol=1e-6, equal_nan=True
        )
        assert "lost" in title and trace.zmid == 0 and trace.reversescale is False
        for field in NOISE_ONLY:
            assert field not in title and f"<th>{field}</th>" not in table
    else:
        # Raw probabilities keep their values; the scale is reversed, and the title says so.
        np.testing.assert_allclose(
            z_of(trace), result.scores.double().numpy(), rtol=1e-6, equal_nan=True
        )
        assert trace.reversescale is True and "scale reversed" in title
        assert "counterfactual" not in title and "counterfactual" not in table
    denoised = lp.plot_trace(traces["str"]).data[0]
    assert denoised.reversescale is False


def test_head_trace_names_its_experiment(traces, tmp_path):
    result = traces["heads"]
    fig = lp.plot_head_trace(result)
    title = _flat(fig.layout.title.text)
    assert "restoring clean activations into the corrupted run" in title
    assert f"std {result.corruption['noise_std']:.3g}" in title and "prob clean" in title
    _, table = page_of(fig, tmp_path)
    assert re.search(r"<th>corruption</th><td[^>]*>gaussian_noise", table)
    assert re.search(r"<th>metric</th><td[^>]*>prob", table)
    assert "counterfactual" not in table and "counterfactual" not in title


def test_few_head_columns_stay_cells(traces):
    """Four heads are cells at most twice as wide as tall, not 270 x 22 px bars (issue 31)."""
    fig = lp.plot_head_trace(traces["heads"])
    assert len(fig.data[0].x) == 4
    # Plotly keeps one x unit (a head) exactly scaleratio y units (a layer) wide.
    assert (fig.layout.xaxis.scaleanchor, fig.layout.xaxis.scaleratio) == ("y", 2.0)
    assert fig.layout.xaxis.constrain == "domain"  # narrows the plot area, not the cells


@pytest.fixture(scope="module")
def summaries(tiny_model, one_thread):
    """Dataset traces of the tiny model: Gaussian noise and counterfactual prompts (STR)."""
    from conftest import TINY_PROMPT

    from lenscope import CausalTracer, TraceSettings, pair_counterfactuals
    from lenscope.corruptions import CounterfactualColumn, GaussianNoise
    from lenscope.datasets import trace_dataset

    facts = [
        {"prompt": TINY_PROMPT, "subject": "The Eiffel Tower", "attribute": "Paris"},
        {"prompt": COUNTERFACTUAL, "subject": "The Space Needle", "attribute": "Seattle"},
        {
            "prompt": "Big Ben is located in the city of",
            "subject": "Big Ben",
            "attribute": "London",
        },
    ]
    facts = [{**fact, "relation_id": "P131"} for fact in facts]
    tracer = CausalTracer(tiny_model, progress=False)
    kinds = ("mlp_out", "attn_out")
    noising = TraceSettings(kinds=kinds, corruption=GaussianNoise(samples=2), direction="noise")
    return {
        "noise": trace_dataset(tracer, facts, samples=2, kinds=kinds),
        "noising": trace_dataset(tracer, facts, settings=noising),
        # The tiny model answers every counterfactual as its fact (' of'), which leaves a
        # logit difference no foil: STR with the answer's probability.
        "str": trace_dataset(
            tracer,
            pair_counterfactuals(tiny_model, facts).facts,
            kinds=kinds,
            corruption=CounterfactualColumn(),
            metric="prob",
        ),
    }


def test_dataset_figures_name_their_corruption_and_centre_at_zero(summaries, tmp_path):
    noise, str_ = summaries["noise"], summaries["str"]
    noise_title = lp.plot_dataset(noise).layout.title.text
    assert f"std {noise.noise_std:.3g}" in noise_title and "2 samples" in noise_title
    fig = lp.plot_dataset(str_)
    title = _flat(fig.layout.title.text)
    assert "counterfactual prompts from column &#x27;counterfactual&#x27;" in title
    assert str_.n_facts == 2 and "prob: clean" in title
    for field in NOISE_ONLY:
        assert field not in title
    _, table = page_of(fig, tmp_path)
    assert re.search(r"<th>counterfactual column</th><td[^>]*>&#x27;counterfactual", table)
    for field in NOISE_ONLY:
        assert f"<th>{field}</th>" not in table
    # AIEs can be negative: diverging, white at zero, one symmetric range for every panel.
    spans = set()
    for trace in fig.data:
        assert trace.zmid == 0 and trace.zmin == pytest.approx(-trace.zmax)
        spans.add(trace.zmax)
    assert len(spans) == 1
    means = [mean_ci(str_.effects(k))[0].numpy() for k in str_.kinds]
    assert spans.pop() == pytest.approx(max(np.nanmax(np.abs(m)) for m in means))
    windowed = lp.plot_dataset(noise)
    assert windowed.layout.xaxis.title.text == (
        "layer"
        if noise.windows["mlp_out"] == 1
        else f"centre of restored window ({noise.windows['mlp_out']} layers)"
    )
    report = lp.save_dataset_report(str_, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<title>" in report and "noise std" not in report


def test_dataset_linked_hover_labels_show_percent(summaries):
    """The dataset heatmaps link hover too; a sibling's label is its signed mean in percent."""
    summary = summaries["str"]
    fig = lp.plot_dataset(summary)
    for trace, kind in zip(fig.data, summary.kinds, strict=True):
        mean = mean_ci(summary.effects(kind))[0].numpy()
        field = trace.meta[_common.LINKED_FIELD]
        for bucket in range(mean.shape[0]):
            for layer in range(mean.shape[1]):
                if np.isfinite(mean[bucket, layer]):
                    expected = f"{float(mean[bucket, layer]):+.1%}"
                    assert trace.customdata[bucket][layer][field] == expected


def mean_ci(effects):
    from lenscope.datasets import mean_ci as plain

    return plain(effects)


# -- honest scales -----------------------------------------------------------------------


def figure_json(fig):
    """The heatmaps' colour settings as plotly serialises them."""
    import json

    return [t for t in json.loads(fig.to_json())["data"] if t["type"] == "heatmap"]


@pytest.mark.parametrize(
    ("which", "value"),
    [
        ("logit_diff", "score"),
        ("str", "score"),
        ("noise", "indirect_effect"),
        ("noise", "normalized"),
        ("heads", "indirect_effect"),
    ],
)
def test_diverging_scales_have_zero_at_the_centre(traces, which, value):
    results = traces[which]
    if which == "heads":
        fig = lp.plot_head_trace(results, value=value)
    elif isinstance(results, dict):
        fig = lp.plot_traces(results, value=value)
    else:
        fig = lp.plot_trace(results, value=value)
    heatmaps = figure_json(fig)
    largest = max(np.nanmax(np.abs(np.array(t["z"], dtype=float))) for t in heatmaps)
    for trace in heatmaps:  # panels of one quantity share one symmetric range
        assert trace["zmid"] == 0
        assert trace["zmin"] == pytest.approx(-trace["zmax"])
        assert trace["zmax"] == pytest.approx(largest)


def test_logit_difference_below_zero_is_not_drawn_as_no_effect(traces):
    result = traces["logit_diff"]
    trace = figure_json(lp.plot_trace(result))[0]
    assert np.nanmin(np.array(trace["z"], dtype=float)) < 0  # some cells favour the foil
    scale = go.Heatmap(colorscale="PuOr").colorscale
    assert [list(c) for c in trace["colorscale"]] == [list(c) for c in scale]
    assert "white at 0" in lp.plot_trace(result).layout.title.text


def test_non_negative_values_get_a_sequential_scale_from_zero(traces):
    for trace in figure_json(lp.plot_traces(traces["noise"])):
        z = np.array(trace["z"], dtype=float)
        assert np.nanmin(z) >= 0
        assert trace["zmin"] == 0 and "zmid" not in trace
        assert trace["zmax"] == pytest.approx(
            max(
                np.nanmax(np.array(t["z"], dtype=float))
                for t in figure_json(lp.plot_traces(traces["noise"]))
            )
        )


def test_mismatched_panels_get_their_own_title_axis_and_scale(traces):
    prob = traces["noise"]["mlp_out"]
    nld = traces["str"]
    fig = lp.plot_traces([prob, nld], allow_mismatch=True)
    first, second = figure_json(fig)
    assert "zmid" not in first and first["zmin"] == 0  # probability: sequential
    assert second["zmid"] == 0 and second["zmin"] == pytest.approx(-second["zmax"])
    assert first["colorbar"]["title"]["text"] != second["colorbar"]["title"]["text"]
    titles = [a.text for a in fig.layout.annotations]
    assert "prob clean" in titles[0] and "normalized_logit_diff clean" in titles[1]
    assert "settings that differ" in fig.layout.title.text
    assert _flat(fig.layout.yaxis.title.text) == layer_title(prob.window)
    assert _flat(fig.layout.yaxis2.title.text) == layer_title(nld.window)


def layer_title(window):
    return "layer" if window == 1 else f"centre of restored window ({window} layers)"


def test_windowed_panels_say_centre_of_restored_window():
    fig = lp.plot_trace(make_result(window=5))
    assert _flat(fig.layout.yaxis.title.text) == "centre of restored window (5 layers)"
    assert lp.plot_trace(make_result()).layout.yaxis.title.text == "layer"


def test_hover_is_in_the_colour_bars_unit():
    result = make_result()
    trace = result.plot(value="normalized").data[0]
    assert trace.colorbar.tickformat == "+.2~p"
    text = hover_text(trace, 2, 3)
    assert f"{float(result.normalized()[2, 3]):.1%} of clean − corrupted recovered" in text
    ld = make_result(metric="logit_diff", corrupted=-2.0, clean=3.0).plot().data[0]
    assert ld.colorbar.tickformat is None
    assert f"{float(ld.z[2][3]):.4g}" in hover_text(ld, 2, 3)


# -- difference mode ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["difference", "sum"])
def test_difference_mode_equals_a_plain_subtraction(traces, mode):
    mlp, attn = traces["noise"]["mlp_out"], traces["noise"]["attn_out"]
    fig = lp.plot_traces({"MLP": mlp, "attention": attn}, mode=mode, value="normalized")
    (trace,) = fig.data
    a, b = mlp.normalized().double().numpy(), attn.normalized().double().numpy()
    expected = a - b if mode == "difference" else a + b
    np.testing.assert_allclose(z_of(trace), expected, atol=1e-7, equal_nan=True)
    assert trace.zmid == 0 and trace.zmin == pytest.approx(-trace.zmax)
    assert "MLP" in fig.layout.title.text and "attention" in fig.layout.title.text
    assert ("minus" if mode == "difference" else "plus") in fig.layout.title.text
    if mode == "difference":
        # As notebook 02 says: green (MLP) where MLP restores more, red (attention) where less.
        low, mid, high = (tuple(stop) for stop in trace.colorscale)
        assert (low[1], mid[1], high[1]) == ("#a50f15", "#ffffff", "#006d2c")


def test_difference_mode_per_kind_of_two_runs(traces):
    runs = {"A": traces["noise"], "B": {k: r for k, r in traces["noise"].items()}}
    fig = lp.plot_traces(runs, mode="difference")
    assert len(fig.data) == 3
    for trace in fig.data:
        assert np.nanmax(np.abs(z_of(trace))) == 0  # a run minus itself


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: [t["noise"]["mlp_out"]], r"exactly two runs of one prompt; got 1"),
        (
            lambda t: [t["noise"]["mlp_out"], make_result()],
            r"same tokens and grid shape; .* got \(4, 10\) over .*; trace both on the same",
        ),
        (
            lambda t: [t["noise"]["mlp_out"], t["logit_diff"]],
            r"needs one metric in both traces; .* got 'prob' vs 'logit_diff'; trace both",
        ),
    ],
)
def test_difference_mode_errors(traces, make, match):
    with pytest.raises(ValueError, match=match):
        lp.plot_traces(make(traces), mode="difference")


# -- where plotly.js comes from ----------------------------------------------------------


def test_plotly_js_inline_file_and_cdn(tmp_path):
    from plotly.offline import get_plotlyjs

    fig = make_result().plot()
    sizes = {}
    for option in _common.PLOTLY_JS:
        folder = tmp_path / option
        path = lp.save_html(fig, folder / "trace.html", plotly_js=option)
        sizes[option] = path.stat().st_size
        text = path.read_text(encoding="utf-8")
        assert "<title>" in text and 'class="lenscope-settings"' in text
        siblings = sorted(p.name for p in folder.iterdir())
        if option == "file":
            name = _common.plotly_js_file()
            assert siblings == sorted(["trace.html", name])
            assert f'src="{name}"' in text
            assert (folder / name).read_text(encoding="utf-8") == get_plotlyjs()
        else:
            assert siblings == ["trace.html"]
        if option == "cdn":
            assert re.search(
                r'<script[^>]*src="https://cdn\.plot\.ly/plotly-[\d.]+\.min\.js"', text
            )
    js = len(get_plotlyjs().encode("utf-8"))
    assert sizes["inline"] > js > 1_000_000
    assert sizes["file"] < sizes["inline"] - js + 10_000
    assert sizes["cdn"] < sizes["inline"] - js + 10_000
    with pytest.raises(ValueError, match=r"plotly_js must be one of 'inline', 'file', 'cdn'; got"):
        lp.save_html(fig, tmp_path / "x.html", plotly_js="web")


# -- every metric, both directions: title and settings table name the experiment --------

METRICS = ("prob", "log_prob", "logit_diff", "normalized_logit_diff", "kl_div")


@pytest.fixture(scope="module")
def metric_traces(tiny_model, one_thread):
    """One tiny-model trace per metric and direction (one sweep per direction)."""
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer

    tracer = CausalTracer(tiny_model, progress=False)
    return {
        direction: tracer.trace(
            TINY_PROMPT,
            TINY_SUBJECT,
            kind="mlp_out",
            window=1,
            answer=" paris",
            foil=" rome",
            metric=METRICS,
            samples=2,
            seed=7,
            direction=direction,
        )
        for direction in ("denoise", "noise")
    }


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_and_direction_names_corruption_direction_and_metric(
    metric_traces, tmp_path, metric, direction
):
    result = metric_traces[direction][metric]
    assert result.metric == metric and result.direction == direction
    fig = lp.plot_trace(result)
    title = _flat(fig.layout.title.text)
    phrase = {
        "denoise": "restoring clean activations into the corrupted run",
        "noise": "patching corrupted activations into the clean run",
    }[direction]
    other = "restoring" if direction == "noise" else "patching corrupted"
    std = f"{result.corruption['noise_std']:.3g}"
    assert phrase in title and other not in title
    assert f"gaussian noise (2 samples, std {std}, seed 7)" in title
    assert f"{metric} clean" in title or f"({metric}: 1 and 0)" in title
    page_title, table = page_of(fig, tmp_path)
    assert phrase in page_title
    for name, value in [
        ("corruption", "gaussian_noise"),
        ("noise std", f"{result.corruption['noise_std']:.4g}"),
        ("samples", "2"),
        ("seed", "7"),
        ("metric", metric),
        ("direction", f"{direction}: {phrase}"),
        ("window", "1 layer"),
        ("model", result.model_name),
        ("foil", "&#x27; rome&#x27;"),
    ]:
        assert re.search(rf"<th>{name}</th><td[^>]*>{re.escape(value)}", table), name
    assert "counterfactual" not in table and "counterfactual" not in title


def test_noising_logit_difference_names_the_side_its_reversed_scale_colours(metric_traces):
    trace = lp.plot_trace(metric_traces["noise"]["logit_diff"]).data[0]
    title = _flat(lp.plot_trace(metric_traces["noise"]["logit_diff"]).layout.title.text)
    # Reversed about zero, the kind's colour is on the foil's side; the note says so, and no
    # longer also says it is on the answer's side.
    assert trace.reversescale is True and trace.zmid == 0
    assert "the kind's colour toward the foil ␣rome" in title
    assert "the kind's colour toward the answer" not in title
    denoise = _flat(lp.plot_trace(metric_traces["denoise"]["logit_diff"]).layout.title.text)
    assert "the kind's colour toward the answer" in denoise


def test_small_probabilities_are_not_shown_as_zero_percent():
    from lenscope.plotting.trace import format_value

    assert format_value(1.37e-4, percent=True) == "0.014%"
    assert format_value(-1.37e-4, percent=True, signed=True) == "-0.014%"
    assert format_value(0.4321, percent=True) == "43.2%"
    assert format_value(0.0, percent=True) == "0.0%"


# -- an answer of several tokens: which token a cell brings back --------------------------

SEVERAL = " paris france"


@pytest.fixture(scope="module")
def several_tokens(tiny_model, one_thread):
    """Traces of a two-token answer (teacher-forced): positions and heads, both directions."""
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer

    tracer = CausalTracer(tiny_model, progress=False)
    common = dict(answer=SEVERAL, samples=2, metric="log_prob", window=1)
    return {
        "denoise": tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", **common),
        "noise": tracer.trace(
            TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", direction="noise", **common
        ),
        "heads": tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="z", by="head", **common),
    }


def split_rows(text):
    """``[(token, log p, share)]`` of the per-token lines of a hover label."""
    lines = text.replace(_common.NBSP, " ").split("<br>")
    start = next(i for i, line in enumerate(lines) if line.startswith("each answer token"))
    rows = []
    for line in lines[start + 1 :]:
        parts = line.split()
        if len(parts) != 3 or not parts[2].endswith("%"):
            break
        rows.append((parts[0], float(parts[1]), float(parts[2][:-1]) / 100))
    return lines[start], rows


@pytest.mark.parametrize("which", ["denoise", "noise", "heads"])
def test_hover_splits_an_answer_of_several_tokens(several_tokens, which):
    result = several_tokens[which]
    split = result.answer_split
    assert split["answer_tokens"] == [" paris", " france"]
    fig = lp.plot_head_trace(result) if which == "heads" else lp.plot_trace(result)
    trace = fig.data[0]
    per_token = split["log_probs"].double().numpy()
    clean = split["clean_log_probs"].double().numpy()
    corrupted = split["corrupted_log_probs"].double().numpy()
    for layer, column in [(0, 1), (2, 3), (3, 2)]:
        header, rows = split_rows(hover_text(trace, layer, column))
        assert header.endswith("lost" if which == "noise" else "restored")
        assert [token for token, _, _ in rows] == ["␣paris", "␣france"]
        values = per_token[layer, column]
        for (_, shown, share), value, c, k in zip(rows, values, clean, corrupted, strict=True):
            assert shown == pytest.approx(value, abs=5e-4)
            # Share of this token's own clean - corrupted gap that the patch moves.
            moved = c - value if which == "noise" else value - k
            assert share == pytest.approx(moved / (c - k), abs=5e-4)
        # Teacher forcing: the tokens' log-probabilities add up to the cell's log_prob.
        assert sum(v for _, v, _ in rows) == pytest.approx(
            float(result.scores[layer, column]), abs=2e-3
        )


def test_settings_name_the_tokens_of_an_answer(several_tokens, tmp_path):
    result = several_tokens["denoise"]
    fig = lp.plot_trace(result)
    assert "answer <b>␣paris␣france</b> (2 tokens, teacher-forced)" in _flat(fig.layout.title.text)
    _, table = page_of(fig, tmp_path)
    ids = ", ".join(str(i) for i in result.answer_split["answer_ids"])
    assert re.search(
        rf"<th>answer tokens</th><td[^>]*>&#x27; paris&#x27; &#x27; france&#x27; \(ids {ids};",
        table,
    )
    one_token = lp.plot_trace(make_result())
    assert "each answer token" not in hover_text(one_token.data[0], 2, 3)
    assert "teacher-forced" not in one_token.layout.title.text


def test_notebook_02_legend_names_the_colours_its_difference_draws(traces):
    """Notebook 02's prose says which colour means which kind; the figure must draw that."""
    import json
    from pathlib import Path

    cells = json.loads(
        (Path(__file__).parents[1] / "notebooks" / "02_compare_kinds.ipynb").read_text("utf-8")
    )["cells"]
    prose = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "Green: the MLP carries more of the answer there; red: attention does." in prose
    runs = traces["noise"]
    fig = lp.plot_traces(
        {"mlp_out": runs["mlp_out"], "attn_out": runs["attn_out"]},
        value="normalized",
        mode="difference",
    )
    (trace,) = figure_json(fig)
    low, high = trace["colorscale"][0][1], trace["colorscale"][-1][1]

    def hue(hex_colour):
        red, green = int(hex_colour[1:3], 16), int(hex_colour[3:5], 16)
        return "green" if green > red else "red"

    # MLP minus attention: above zero (MLP larger) green, below zero (attention larger) red.
    assert (hue(high), hue(low)) == ("green", "red")
    assert "MLP output colour where A is larger" in fig.layout.title.text


def test_noising_dataset_figure_says_so_and_draws_the_drop_below_clean(summaries, tmp_path):
    noising, noise = summaries["noising"], summaries["noise"]
    assert noising.direction == "noise" and noise.direction == "denoise"
    again = type(noising).from_dict(noising.to_dict())
    assert again.direction == "noise" and again.settings()["direction"] == "noise"
    assert "direction" not in noise.to_dict()  # denoising files stay as they were
    fig = lp.plot_dataset(noising)
    title = _flat(fig.layout.title.text)
    assert "patching corrupted activations into the clean run" in title
    assert "restoring" not in title and "2 samples" in title and "prob: clean" in title
    _, table = page_of(fig, tmp_path)
    assert re.search(r"<th>direction</th><td[^>]*>noise: patching corrupted", table)
    assert re.search(r"<th>metric</th><td[^>]*>prob", table)
    assert re.search(r"<th>corruption</th><td[^>]*>gaussian_noise", table)
    # Drawn: each fact's (clean - corrupted) - (score - corrupted), averaged over facts.
    for trace, kind in zip(fig.data, noising.kinds, strict=True):
        effects = noising.effects(kind).numpy()
        gap = (noising.clean_scores - noising.corrupted_scores).numpy()
        drops = gap[:, None, None] - effects
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # buckets no fact has
            expected = np.nanmean(drops, axis=0)
        np.testing.assert_allclose(z_of(trace), expected, rtol=1e-9, atol=1e-12)
        assert trace.colorbar.title.text == "drop" and trace.zmid == 0
    denoise_title = _flat(lp.plot_dataset(noise).layout.title.text)
    assert "restoring clean activations into the corrupted run" in denoise_title
    _, denoise_table = page_of(lp.plot_dataset(noise), tmp_path, "d.html")
    assert re.search(r"<th>direction</th><td[^>]*>denoise: restoring", denoise_table)


def test_normalised_dataset_title_is_no_tautology(summaries):
    import dataclasses

    normalised = dataclasses.replace(summaries["str"], metric="normalized_logit_diff")
    title = _flat(lp.plot_dataset(normalised).layout.title.text)
    assert "clean run = 100%, corrupted run = 0%" in title and "ATE" not in title
    assert "counterfactual prompts from column" in title


def test_dataset_figures_are_laid_out_for_their_width(summaries):
    summary = summaries["noise"]
    narrow = lp.plot_dataset(summary)  # a 577-pixel output area: one panel per row
    assert narrow.layout.yaxis2.domain[1] < narrow.layout.yaxis.domain[0]
    wide = lp.plot_dataset(summary, width=1600)  # side by side, each with its colour bar
    assert wide.layout.yaxis2.domain == wide.layout.yaxis.domain
    assert wide.layout.xaxis.domain[1] < wide.data[0].colorbar.x < wide.layout.xaxis2.domain[0]
    for fig in (narrow, wide):
        for trace in fig.data:
            assert trace.colorbar.tickformat == "+.2~p"  # distinct labels on a small range
    lines = lp.plot_dataset(summary, style="lines")
    assert lines.layout.yaxis2.matches == "y"  # one metric: one y range
    assert lines.layout.legend.orientation == "h"  # under the panels, not beside them


def test_lens_figure_names_the_corruption_of_its_runs(tiny_model, tmp_path):
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer
    from lenscope.lens import lens_trace_cell

    trace = CausalTracer(tiny_model, progress=False).trace(
        TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, seed=4
    )
    clean, corrupted, restored = lens_trace_cell(tiny_model, trace, 1, 3)
    fig = lp.plot_lens(clean, corrupted, restored, statistic="answer_prob")
    std = f"{trace.corruption['noise_std']:.3g}"
    assert f"gaussian noise (2 samples, std {std}, seed 4)" in _flat(fig.layout.title.text)
    _, table = page_of(fig, tmp_path)
    assert re.search(r"<th>seed</th><td[^>]*>—</td><td[^>]*>4</td><td[^>]*>4</td>", table)
    assert re.search(r"<th>run</th><td[^>]*>clean \(1 copy\)</td>", table)
    assert "corrupted by" not in lp.plot_lens(clean, statistic="answer_prob").layout.title.text


def test_lens_linked_hover_labels_are_the_hovers_values(tiny_model, traces):
    """A lens panel's linked-hover label is its hover's value of the statistic drawn."""
    from lenscope.lens import lens_trace_cell

    runs = lens_trace_cell(tiny_model, traces["noise"]["mlp_out"], 1, 3)
    fig = lp.plot_lens(*runs, statistic="answer_prob")
    ranks = lp.plot_lens(*runs, statistic="answer_rank")
    for prob, rank, traj in zip(fig.data, ranks.data, runs, strict=True):
        for layer, pos in ((0, 2), (3, 5), (2, 0)):
            p = float(traj.answer_prob[layer, pos])
            assert _linked_label(prob, layer, pos) == (
                f"{p:.1%}" if not 0 < p < 1e-3 else f"{p:.1e}"
            )
            assert _linked_label(rank, layer, pos) == f"{int(traj.answer_rank[layer, pos]):,}"
    # A difference panel's hover holds both runs' values: its label is the colour's value.
    difference = lp.plot_lens(*runs, statistic="answer_prob", mode="difference")
    assert all(t.meta is None for t in difference.data)


def test_lens_cell_text_fits_its_columns(tiny_model):
    from conftest import TINY_PROMPT

    from lenscope.lens import lens_trajectory

    traj = lens_trajectory(tiny_model, TINY_PROMPT)
    narrow = lp.plot_lens(traj, statistic="entropy")  # 540 px: ten 35-pixel columns
    import html

    def longest(fig):
        return max(len(html.unescape(t)) for row in fig.data[0].text for t in row)

    assert longest(narrow) == 5
    assert lp.plot_lens(traj, width=260).data[0].text is None  # under three characters
    assert "top-1 token in the hover" in lp.plot_lens(traj, width=260).layout.title.text
    wide = lp.plot_lens(traj, statistic="entropy", width=1200)
    assert longest(wide) == 6


# -- every figure kind names the weights' precision (issue 31) ---------------------------

WEIGHTS_ORIGIN = "Q4_K_M GGUF (4-bit, a test file), dequantised"
"""What load_model would record for a 4-bit GGUF; the tiny model runs in float32."""
WEIGHTS_NOTE = "tiny-gpt2-4l (Q4_K_M 4-bit weights, float32)"
WEIGHTS_ROW = rf"<th>weights</th><td[^>]*>{re.escape(WEIGHTS_ORIGIN)}; float32</td>"


@pytest.fixture
def weighed_model(tiny_model):
    """The tiny model with a weights record, as if load_model had built it (removed after)."""
    from lenscope import hooks

    hooks.record_weights(tiny_model, WEIGHTS_ORIGIN)
    try:
        yield tiny_model
    finally:
        del hooks._WEIGHTS_ORIGIN[tiny_model]


def _weights_named(fig, tmp_path, result):
    """The title and page title name the model with its weights; the table gives them whole."""
    assert WEIGHTS_NOTE in _flat(fig.layout.title.text)
    title, table = page_of(fig, tmp_path)
    assert WEIGHTS_NOTE in title
    assert re.search(WEIGHTS_ROW, table)
    assert type(result).from_dict(result.to_dict()).weights == f"{WEIGHTS_ORIGIN}; float32"


def test_lens_figure_names_the_weights(weighed_model, tmp_path):
    from conftest import TINY_PROMPT

    from lenscope.lens import lens_trajectory

    trajectory = lens_trajectory(weighed_model, TINY_PROMPT)
    _weights_named(lp.plot_lens(trajectory, statistic="answer_prob"), tmp_path, trajectory)


def test_attention_figure_names_the_weights(weighed_model, tmp_path):
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope.attention import attention_patterns

    patterns = attention_patterns(
        weighed_model, TINY_PROMPT, layer=1, heads=[0, 2], subject=TINY_SUBJECT
    )
    _weights_named(patterns.plot(), tmp_path, patterns)


def test_dataset_figure_names_the_weights(weighed_model, tmp_path):
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer
    from lenscope.datasets import trace_dataset

    facts = [{"prompt": TINY_PROMPT, "subject": TINY_SUBJECT, "attribute": "Paris"}]
    tracer = CausalTracer(weighed_model, progress=False)
    summary = trace_dataset(tracer, facts, samples=2, kinds=("mlp_out",), progress=False)
    _weights_named(lp.plot_dataset(summary), tmp_path, summary)


def test_figures_without_a_weights_record_name_only_the_model(summaries, tmp_path):
    fig = lp.plot_dataset(summaries["noise"])
    assert "weights" not in fig.layout.title.text
    assert "<th>weights</th>" not in page_of(fig, tmp_path)[1]
    assert "weights" not in summaries["noise"].to_dict()


def test_normalised_dataset_figure_gives_the_raw_values(tiny_model, tmp_path):
    """Normalised, every fact's clean and corrupted runs are 1 and 0: the title gives the raw."""
    from conftest import TINY_PROMPT, TINY_SUBJECT

    from lenscope import CausalTracer
    from lenscope.datasets import DatasetSummary, trace_dataset
    from lenscope.tokens import prompt_tokens

    facts = [
        {"prompt": TINY_PROMPT, "subject": TINY_SUBJECT},
        {"prompt": COUNTERFACTUAL, "subject": "The Space Needle"},
    ]
    tracer = CausalTracer(tiny_model, progress=False)
    summary = trace_dataset(
        tracer, facts, samples=2, kinds=("mlp_out",), metric="normalized_prob", progress=False
    )
    assert len(summary.facts) == 2
    for fact in summary.facts:
        # The raw clean value is the answer's probability in a plain forward pass.
        tokens = prompt_tokens(tiny_model, fact.prompt)
        with torch.no_grad():
            probs = tiny_model(tokens[None])[0, -1].double().softmax(-1)
        assert fact.normalization[0] == pytest.approx(float(probs[fact.answer_id]), rel=1e-4)
        assert (fact.clean_score, fact.corrupted_score) == pytest.approx((1.0, 0.0))
    clean = np.mean([f.normalization[0] for f in summary.facts])
    corrupted = np.mean([f.normalization[1] for f in summary.facts])
    fig = lp.plot_dataset(summary)
    title = _flat(fig.layout.title.text)
    assert f"raw value: clean {clean:.3g} \u00b1 " in title
    assert f"corrupted {corrupted:.3g} \u00b1 " in title
    _, table = page_of(fig, tmp_path)
    assert re.search(rf"<th>raw values</th><td[^>]*>clean {clean:.4g} \u00b1 ", table)
    back = DatasetSummary.from_dict(summary.to_dict())
    assert [f.normalization for f in back.facts] == [f.normalization for f in summary.facts]
