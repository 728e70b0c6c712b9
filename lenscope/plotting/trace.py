"""Interactive plotly heatmaps of causal traces, one panel per hook-point kind.

Draws a :class:`~lenscope.results.TraceResult` the way ROME's figures do
(Meng et al., 2022, arXiv 2202.05262, Figure 1): input tokens along x with
the subject marked ``*``, layers along y, the restored score as colour on a
per-kind sequential scale anchored at the corrupted score. Computation stays
in the result object; this module only turns its arrays into ``go.Heatmap``
traces. Hovering a cell shows a monospace table (token, position, restored
layers, score, normalized effect and the restored run's top-k predictions)
built from ``customdata`` + ``hovertemplate``. :func:`plot_traces` puts
several kinds side by side on one colour range; in the HTML written by
:func:`~lenscope.plotting.save_html` hovering one panel outlines the same
cell in all of them.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.plotting._common import (
    HOVER_FONT,
    KIND_COLORSCALES,
    KIND_LABELS,
    NAN_COLOR,
    NBSP,
    check_choice,
    check_positive_int,
    escape,
    figure_margins,
    figure_size,
    fit_width,
    format_percent,
    format_score,
    panel_size,
    stride_keep_last,
    token_labels,
    token_xaxis,
    topk_lines,
    visible,
    width_fraction,
)
from lenscope.results import TraceResult
from lenscope.validation import InvalidInput, InvalidInputType

VALUES = ("score", "indirect_effect", "normalized")
"""What a heatmap's colour can show."""

LAYER_ORDERS = ("bottom_up", "top_down")
"""Layer 0 at the bottom (ROME's figures) or at the top."""

_N_FIXED_FIELDS = 6  # token, position, layers, score, effect, top-k header
_LABEL_WIDTH = 7
_MIN_WIDTH = 660


def plot_trace(
    result: TraceResult,
    *,
    value: str = "score",
    top_k: int = 5,
    layer_stride: int = 1,
    layer_order: str = "bottom_up",
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
    colorscale: Any = None,
    zmin: float | int | None = None,
    zmax: float | int | None = None,
) -> go.Figure:
    """A heatmap of one causal trace: tokens along x, layers along y.

    Subject tokens are marked ``*`` in bold and bracketed by a dotted box;
    the title gives the answer and the clean and corrupted scores. Untraced
    (NaN) cells are left blank and their hover says "not traced".

    Args:
        result: The trace to draw.
        value: Colour by ``"score"`` (the metric with the cell restored),
            ``"indirect_effect"`` (score minus corrupted score) or
            ``"normalized"`` (fraction of the clean-corrupted gap recovered).
        top_k: Number of the restored run's top predictions in the hover
            table (at most the ``k`` the trace stored; 0 for none).
        layer_stride: Show every ``layer_stride``-th layer (the last layer is
            always kept), for deep models.
        layer_order: ``"bottom_up"`` puts layer 0 at the bottom, as ROME does;
            ``"top_down"`` puts it at the top.
        title: Figure title; by default the kind, model, answer and scores.
        width: Figure width in pixels; by default the figure fills the width
            of the notebook cell or page (static images get a width that
            grows with the tokens).
        height: Figure height in pixels; by default it grows with the layers.
        colorscale: Any plotly colour scale; by default purple for the
            residual stream, green for MLP output and red for attention.
        zmin: Bottom of the colour range; by default the corrupted score
            (0 for the indirect and normalized effects).
        zmax: Top of the colour range; by default the highest traced value.

    Returns:
        A plotly figure; show it with ``fig.show()`` or write it with
        :func:`~lenscope.plotting.save_html`.

    Raises:
        TypeError: ``result`` is not a ``TraceResult``.
        ValueError: An option is out of range.
    """
    _check_types([result])
    options = dict(
        value=value,
        top_k=top_k,
        layer_stride=layer_stride,
        layer_order=layer_order,
        title=title,
        width=width,
        height=height,
        colorscale=colorscale,
        zmin=zmin,
        zmax=zmax,
    )
    _check_options([result], options)
    return _plot([result], names=None, shared_scale=True, **options)


def plot_traces(
    results: Mapping[str, TraceResult] | Sequence[TraceResult],
    *,
    shared_scale: bool = True,
    allow_mismatch: bool = False,
    value: str = "score",
    top_k: int = 5,
    layer_stride: int = 1,
    layer_order: str = "bottom_up",
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
    colorscale: Any = None,
    zmin: float | int | None = None,
    zmax: float | int | None = None,
) -> go.Figure:
    """Several traces of one prompt side by side, e.g. ``resid_post | mlp_out | attn_out``.

    Each panel keeps its kind's colour scale; with ``shared_scale`` all of
    them span one colour range, so equal colours mean equal values. Token
    axes are aligned (and zoom together) and the layer axis is shared.
    Plotly cannot link hover across subplots by itself; the HTML written by
    :func:`~lenscope.plotting.save_html` carries a small script
    (:data:`~lenscope.plotting.LINKED_HOVER_JS`) that outlines the hovered
    ``(token, layer)`` cell in every panel and writes the other panels'
    values beside it. In a classic notebook
    ``fig.show(renderer="notebook", post_script=LINKED_HOVER_JS)`` does the
    same; elsewhere each panel hovers on its own.

    Args:
        results: A dict such as :meth:`CausalTracer.trace_kinds` returns
            (panel titles from its keys) or a sequence of results.
        shared_scale: One colour range for every panel (default) or a range
            per panel.
        allow_mismatch: Plot results of different prompts, models, answers
            or metrics together instead of refusing.
        value: See :func:`plot_trace`.
        top_k: See :func:`plot_trace`.
        layer_stride: See :func:`plot_trace`.
        layer_order: See :func:`plot_trace`.
        title: Figure title; by default the model, answer and scores.
        width: Figure width in pixels; by default the width of the notebook
            cell or page.
        height: Figure height in pixels.
        colorscale: One plotly colour scale for every panel, instead of the
            per-kind scales.
        zmin: Bottom of the colour range of every panel.
        zmax: Top of the colour range of every panel.

    Returns:
        A plotly figure with one heatmap per result, left to right.

    Raises:
        TypeError: ``results`` holds something other than ``TraceResult``.
        ValueError: ``results`` is empty, the results are not comparable
            (and ``allow_mismatch`` is False), or an option is out of range.
    """
    if isinstance(results, Mapping):
        names: list[str] | None = [str(k) for k in results]
        items = list(results.values())
    elif isinstance(results, Sequence) and not isinstance(results, str | TraceResult):
        names, items = None, list(results)
    else:
        raise InvalidInputType(
            f"plot_traces expects a dict kind -> TraceResult or a list of TraceResults; "
            f"got {type(results).__name__}; for a single trace use plot_trace(result)"
        )
    if not items:
        raise InvalidInput(
            "plot_traces needs at least one TraceResult; got none; "
            "pass e.g. tracer.trace_kinds(prompt, subject=...)"
        )
    _check_types(items)
    options = dict(
        value=value,
        top_k=top_k,
        layer_stride=layer_stride,
        layer_order=layer_order,
        title=title,
        width=width,
        height=height,
        colorscale=colorscale,
        zmin=zmin,
        zmax=zmax,
    )
    _check_options(items, options)
    if not allow_mismatch:
        _check_comparable(items)
    return _plot(items, names=names, shared_scale=shared_scale, **options)


def _check_types(results: Sequence[Any]) -> None:
    """Raise ``TypeError`` unless every item is a ``TraceResult``."""
    for index, result in enumerate(results):
        if not isinstance(result, TraceResult):
            raise InvalidInputType(
                f"expected TraceResult objects; got {type(result).__name__} at "
                f"index {index}; pass the results of CausalTracer.trace"
            )


def _check_options(results: Sequence[TraceResult], options: dict[str, Any]) -> None:
    """Raise ``ValueError`` / ``TypeError`` for an option out of range, naming the fix."""
    check_choice("value", options["value"], VALUES)
    check_choice("layer_order", options["layer_order"], LAYER_ORDERS)
    check_positive_int("layer_stride", options["layer_stride"])
    check_positive_int("width", options["width"], allow_none=True)
    check_positive_int("height", options["height"], allow_none=True)
    top_k = options["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidInput(f"top_k must be an int >= 0; got {top_k!r}; pass e.g. top_k=5")
    for result in results:
        stored = int(result.top_ids.shape[-1])
        if top_k > stored:
            raise InvalidInput(
                f"top_k must be <= the {stored} predictions the {result.kind} "
                f"trace stored; got top_k={top_k}; pass top_k<={stored} or "
                "trace with more top-k"
            )


def _same_tokens(a: TraceResult, b: TraceResult) -> bool:
    """Whether two results traced the same token ids with the same labels."""
    return (
        a.tokens == b.tokens
        and a.token_ids.shape == b.token_ids.shape
        and bool((a.token_ids == b.token_ids).all())
    )


def _check_comparable(results: Sequence[TraceResult]) -> None:
    """Raise ``ValueError`` unless all results share prompt tokens, model, answer and metric."""
    first = results[0]
    problems = []
    for index, other in enumerate(results[1:], start=1):
        if other.model_name != first.model_name:
            problems.append(
                f"model_name {first.model_name!r} (result 0) vs "
                f"{other.model_name!r} (result {index})"
            )
        if not _same_tokens(first, other):
            problems.append(
                f"prompt tokens {list(first.tokens)!r} (result 0) vs "
                f"{list(other.tokens)!r} (result {index})"
            )
        if other.answer_id != first.answer_id:
            problems.append(
                f"answer {first.answer!r} (result 0) vs {other.answer!r} (result {index})"
            )
        if other.metric != first.metric:
            problems.append(
                f"metric {first.metric!r} (result 0) vs {other.metric!r} (result {index})"
            )
    if problems:
        raise InvalidInput(
            "plot_traces compares traces of one prompt, model, answer and metric; "
            "got results that differ in "
            + "; ".join(problems)
            + "; trace them with the same settings, or pass allow_mismatch=True "
            "to plot them side by side anyway"
        )


def _values(result: TraceResult, value: str) -> np.ndarray:
    """The ``[layer, pos]`` array that ``value`` colours by, as float64 numpy."""
    if value == "score":
        grid = result.scores
    elif value == "indirect_effect":
        grid = result.indirect_effect
    else:
        grid = result.normalized()
    return grid.detach().double().cpu().numpy()


def _anchor(result: TraceResult, value: str) -> float:
    """Default bottom of the colour range: the corrupted run, i.e. no effect."""
    return float(result.corrupted_score) if value == "score" else 0.0


def _metric_label(result: TraceResult) -> str:
    """``p(␣Paris)`` for ROME's probability metric, ``log p(␣Paris)``, else the metric's name."""
    name = {"prob": "p", "log_prob": "log p"}.get(result.metric, result.metric)
    return f"{escape(name)}({escape(visible(result.answer))})"


def _colorbar_title(result: TraceResult, value: str) -> str:
    """Colour-bar title for ``value``."""
    if value == "score":
        return _metric_label(result)
    if value == "indirect_effect":
        return f"{_metric_label(result)}<br>− corrupted"
    return "recovered"


def _hover(
    result: TraceResult, rows: Sequence[int], full: Sequence[str], top_k: int
) -> tuple[np.ndarray, str]:
    """``customdata`` ``[row, pos, field]`` and the ``hovertemplate`` that lays it out.

    Fields: token, position, restored layers, score, normalized effect,
    top-k header, then one top-k row each. A row field starts with its own
    ``<br>``, so untraced cells (empty fields) get a short label.
    """
    start, end = result.subject_range
    scores = result.scores.detach().double().cpu().numpy()
    normalized = result.normalized().detach().double().cpu().numpy()
    data = np.full((len(rows), result.n_pos, _N_FIXED_FIELDS + top_k), "", dtype=object)
    for i, layer in enumerate(rows):
        lo, hi = result.window_layers(layer)
        layers = str(layer) if hi - lo == 1 else f"{layer} (restores {lo}–{hi - 1})"
        for pos in range(result.n_pos):
            cell = data[i, pos]
            cell[0] = full[pos]
            cell[1] = f"{pos}" + (" · subject" if start <= pos < end else "")
            cell[2] = layers
            score_fields(
                cell,
                float(scores[layer, pos]),
                float(normalized[layer, pos]),
                lambda layer=layer, pos=pos: result.top_predictions(layer, pos),
                top_k,
            )
    labels = ("token", "pos", "layer", "score", "effect")
    template = "<br>".join(
        f"{label}{NBSP * (_LABEL_WIDTH - len(label))}%{{customdata[{index}]}}"
        for index, label in enumerate(labels)
    )
    template += "".join(f"%{{customdata[{index}]}}" for index in range(len(labels), data.shape[-1]))
    return data, template + "<extra></extra>"


def score_fields(
    cell: np.ndarray,
    score: float,
    effect: float,
    predictions: Callable[[], Sequence[tuple[str, float]]],
    top_k: int,
) -> None:
    """Fill a hover cell's fields 3 on: score, normalized effect, top-k header and rows.

    An untraced cell (NaN score) gets only its score field, "not traced".
    """
    cell[3] = format_score(score)
    if math.isnan(score):
        return
    cell[4] = (
        f"{format_percent(effect)} of clean − corrupted"
        if math.isfinite(effect)
        else "n/a (clean = corrupted)"
    )
    if top_k:
        cell[5] = f"<br>top-{top_k} after restoring"
        lines = topk_lines(predictions()[:top_k])
        cell[_N_FIXED_FIELDS : _N_FIXED_FIELDS + len(lines)] = [f"<br>{line}" for line in lines]


def _title(results: Sequence[TraceResult], names: Sequence[str]) -> str:
    """Default title: what was restored, the model, the answer and both scores."""
    first = results[0]
    metric = _metric_label(first)
    what = (
        f"Restoring {escape(names[0])}"
        if len(results) == 1
        else "Causal trace, restoring one hook point at a time"
    )
    return (
        f"<b>{what}</b> · {escape(first.model_name)}<br>"
        f'<span style="font-size:13px">answer <b>{escape(visible(first.answer))}</b>'
        f" · clean {metric} = {first.clean_score:.3g}"
        f" · corrupted {first.corrupted_score:.3g}"
        f" · subject marked *</span>"
    )


def _panel_name(result: TraceResult, name: str | None) -> str:
    """A panel title: the kind's readable name and its restoring window."""
    label = KIND_LABELS.get(name or result.kind, name or result.kind)
    if result.window > 1:
        label += f" (window {result.window})"
    return label


def _plot(
    results: Sequence[TraceResult],
    *,
    names: Sequence[str] | None,
    shared_scale: bool,
    value: str,
    top_k: int,
    layer_stride: int,
    layer_order: str,
    title: str | None,
    width: int | None,
    height: int | None,
    colorscale: Any,
    zmin: float | int | None,
    zmax: float | int | None,
) -> go.Figure:
    """Lay out one heatmap panel per result, left to right (arguments already checked)."""
    panel_names = [
        _panel_name(r, n) for r, n in zip(results, names or [None] * len(results), strict=True)
    ]
    grids = [_values(r, value) for r in results]
    rows = [stride_keep_last(r.n_layers, layer_stride) for r in results]
    lows = [zmin if zmin is not None else _anchor(r, value) for r in results]
    highs = []
    for grid, low in zip(grids, lows, strict=True):
        finite = grid[np.isfinite(grid)]
        top = float(finite.max()) if finite.size else low
        highs.append(zmax if zmax is not None else top)
    if shared_scale:
        lows = [min(lows)] * len(results)
        highs = [max(highs)] * len(results)
    # An empty range would make plotly pick its own; keep the anchor at the bottom.
    highs = [
        high if high > low else low + max(abs(low), 1.0) * 1e-6
        for low, high in zip(lows, highs, strict=True)
    ]

    n = len(results)
    n_cols = max(r.n_pos for r in results)
    n_rows = max(len(r) for r in rows)
    labels = [token_labels(r.tokens, marked=range(*r.subject_range)) for r in results]
    longest = max(len(visible(t)) for r in results for t in r.tokens)
    default_width, default_height = figure_size(n_cols, n_rows, panels=n, label_chars=longest)
    default_width = max(default_width, _MIN_WIDTH)  # room for the title
    margin = figure_margins(longest)
    plot_w, _ = panel_size(n_cols, n_rows)
    gap = 110  # pixels right of each panel for its colour bar
    inner = n * plot_w + (n - 1) * gap
    margin["r"] = gap
    margin["t"] += 30 if n > 1 else 0
    margins = margin["l"] + margin["r"]
    fig = make_subplots(
        rows=1,
        cols=n,
        shared_yaxes=True,
        horizontal_spacing=width_fraction(gap, inner, margins) if n > 1 else 0.0,
        subplot_titles=panel_names if n > 1 else None,
    )
    same_tokens = all(_same_tokens(results[0], r) for r in results)
    for col, result in enumerate(results, start=1):
        tick_labels, full = labels[col - 1]
        kept = rows[col - 1]
        z = grids[col - 1][kept]
        customdata, template = _hover(result, kept, full, top_k)
        axis_suffix = "" if col == 1 else str(col)
        domain_end = fig.layout[f"xaxis{axis_suffix}"].domain[1]
        fig.add_trace(
            go.Heatmap(
                z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
                x=list(range(result.n_pos)),
                y=list(kept),
                zmin=lows[col - 1],
                zmax=highs[col - 1],
                colorscale=colorscale or KIND_COLORSCALES.get(result.kind, "Greys"),
                customdata=customdata,
                hovertemplate=template,
                hoverongaps=True,
                name=panel_names[col - 1],
                colorbar={
                    "title": {"text": _colorbar_title(result, value), "side": "right"},
                    "x": domain_end + width_fraction(8, inner, margins),
                    "xanchor": "left",
                    "thickness": 12,
                    "xpad": 4,
                    "len": 1.0,
                    "tickformat": ".0%" if value == "normalized" else None,
                },
            ),
            row=1,
            col=col,
        )
        token_xaxis(fig, result.n_pos, tick_labels, col=col, linked=same_tokens)
        start, end = result.subject_range
        fig.add_shape(
            type="rect",
            xref=f"x{axis_suffix}",
            yref=f"y{axis_suffix} domain",
            x0=start - 0.5,
            x1=end - 0.5,
            y0=-0.004,
            y1=1.004,
            line={"color": "#222222", "width": 1.5, "dash": "dot"},
            fillcolor="rgba(0,0,0,0)",
            layer="above",
        )
    fig.update_yaxes(
        autorange="reversed" if layer_order == "top_down" else True,
        showgrid=False,
        zeroline=False,
        ticks="",
        tickmode="array" if n_rows <= 40 else "auto",
        tickvals=sorted({layer for kept in rows for layer in kept}) if n_rows <= 40 else None,
    )
    window = results[0].window
    fig.update_yaxes(
        title_text="layer" if window == 1 else f"centre of {window} restored layers",
        row=1,
        col=1,
    )
    fig_height = height or default_height
    fig.update_layout(
        # Title pinned 16 px below the top edge, clear of the panel titles.
        title={
            "text": title if title is not None else _title(results, panel_names),
            "x": 0,
            "xanchor": "left",
            "xref": "paper",
            "y": 1 - 16 / fig_height,
            "yanchor": "top",
            "yref": "container",
        },
        **fit_width(width, default_width),
        height=fig_height,
        margin=margin,
        plot_bgcolor=NAN_COLOR,
        paper_bgcolor="white",
        hovermode="closest",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
    )
    return fig
