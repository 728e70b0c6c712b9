"""Plotly heatmaps of per-head traces: layers along y, attention heads along x.

Draws a :class:`~lenscope.results.HeadTraceResult` the way TransformerLens'
per-head patching results are usually shown (a ``layer x head`` grid), in
lenscope's colours and hover tables: hovering a cell shows the layer, the
head (and, for key/value heads of a grouped-query model, the query heads
that share it), the score, the effect and the patched run's top-k
predictions, built from ``customdata`` + ``hovertemplate``. Colours, title
and the page's settings table follow :func:`~lenscope.plotting.plot_trace`:
the experiment named from the result's record, a diverging scale centred at
zero for values that can be negative, noising oriented like denoising. A
``by="head_pos"`` trace has one grid per token position; a slider below the
figure picks the position (the last token at first).
"""

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from lenscope.plotting._common import (
    DEFAULT_DIVERGING,
    HOVER_FONT,
    NAN_COLOR,
    NBSP,
    escape,
    fit_width,
    set_page_info,
    visible,
)
from lenscope.plotting._layout import TOOLBAR_BAND
from lenscope.plotting._provenance import direction_phrase, trace_rows, trace_subtitle
from lenscope.plotting.trace import (
    _check_options,
    colour_of,
    colour_ranges,
    plain_text,
    score_fields,
)
from lenscope.results import HeadTraceResult
from lenscope.validation import InvalidInput, InvalidInputType

HEAD_COLORSCALE = "Reds"
"""Heads are attention: ROME's attention colour."""

_LABELS = ("layer", "head", "token", "score", "effect")
_LABEL_WIDTH = 7


def plot_head_trace(
    result: HeadTraceResult,
    *,
    value: str = "score",
    top_k: int = 5,
    pos: int | None = None,
    layer_order: str = "bottom_up",
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
    colorscale: Any = None,
) -> go.Figure:
    """A ``layer x head`` heatmap of a per-head trace.

    Args:
        result: A :class:`HeadTraceResult`.
        value: ``"score"``, ``"indirect_effect"`` or ``"normalized"``.
        top_k: Predictions listed in the hover (0 for none).
        pos: For ``by="head_pos"``, the position shown first (default: the
            last traced one); the slider shows the others.
        layer_order: ``"bottom_up"`` (layer 0 at the bottom) or ``"top_down"``.
        title: Figure title; default names the experiment (see
            :func:`~lenscope.plotting.plot_trace`).
        width: Pixels; default fills the container.
        height: Pixels; default grows with the layers.
        colorscale: A plotly colour scale; default ``"Reds"`` (diverging:
            ``"RdBu_r"``, white at zero).

    Returns:
        The plotly figure (never shown).
    """
    if not isinstance(result, HeadTraceResult):
        raise InvalidInputType(
            f"plot_head_trace expects a HeadTraceResult, got {type(result).__name__}; "
            "pass tracer.trace(..., kind='z', by='head'), or plot a TraceResult with plot_trace"
        )
    options = {"value": value, "layer_order": layer_order, "layer_stride": 1, "top_k": top_k}
    _check_options([result], {**options, "width": width, "height": height})
    colour = colour_of(result, value)
    grid = colour.grid
    positions = [None]
    if result.by == "head_pos":
        traced = [p for p in range(result.n_pos) if np.isfinite(grid[:, :, p]).any()]
        positions = traced or list(range(result.n_pos))
        if pos is None:
            pos = positions[-1]
        if not -result.n_pos <= pos < result.n_pos:
            raise InvalidInput(
                f"pos must be a token position in [0, {result.n_pos}) (or count back), "
                f"got {pos}; pass e.g. pos=-1"
            )
        pos %= result.n_pos
        if pos not in positions:
            positions = sorted({*positions, pos})
    elif pos is not None:
        raise InvalidInput(
            f"pos applies to by='head_pos' results; this one restores every position, got "
            f"pos={pos}; leave pos unset"
        )
    ((low, high, mid),) = colour_ranges([colour], shared=True, zmin=None, zmax=None)
    scale = colorscale or (DEFAULT_DIVERGING if colour.diverging else HEAD_COLORSCALE)

    fig = go.Figure()
    for p in positions:
        z = grid if p is None else grid[:, :, p]
        customdata, template = _hover(result, colour, p, top_k)
        fig.add_trace(
            go.Heatmap(
                z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
                x=list(range(result.n_heads)),
                y=list(range(result.n_layers)),
                zmin=low,
                zmax=high,
                zmid=mid,
                colorscale=scale,
                reversescale=colour.reverse,
                customdata=customdata,
                hovertemplate=template,
                hoverongaps=True,
                visible=p == pos,
                name="" if p is None else f"pos {p}",
                colorbar={
                    "title": {"text": colour.label, "side": "right"},
                    "tickformat": colour.tickformat(),
                },
            )
        )
    head_title = "head" if result.query_heads_per_head == 1 else "key/value head"
    # Cells at most twice as wide as tall whatever the container's width: plotly narrows
    # the plot area instead of stretching a few heads into long bars.
    fig.update_xaxes(
        title_text=head_title,
        tickmode="array",
        tickvals=list(range(result.n_heads)),
        ticks="",
        scaleanchor="y",
        scaleratio=2.0,
        constrain="domain",
    )
    fig.update_yaxes(
        title_text="layer",
        autorange="reversed" if layer_order == "top_down" else True,
        tickmode="array" if result.n_layers <= 40 else "auto",
        tickvals=list(range(result.n_layers)) if result.n_layers <= 40 else None,
        ticks="",
    )
    if len(positions) > 1:
        fig.update_layout(
            sliders=[
                {
                    "active": positions.index(pos),
                    "currentvalue": {"prefix": "position: "},
                    "pad": {"t": 40},
                    "steps": [
                        {
                            "label": f"{p} {visible(result.tokens[p])}",
                            "method": "update",
                            "args": [{"visible": [q == p for q in positions]}],
                        }
                        for p in positions
                    ],
                }
            ]
        )
    natural_width = max(420, 140 + 36 * result.n_heads)
    default_height = 220 + TOOLBAR_BAND + 22 * result.n_layers + (90 if len(positions) > 1 else 0)
    text = title if title is not None else _title(result, pos, len(positions) > 1, colour.note)
    fig.update_layout(
        # Title below the band plotly's toolbar shows in.
        title={
            "text": text,
            "x": 0,
            "y": 1 - TOOLBAR_BAND / (height or default_height),
            "yanchor": "top",
            "yref": "container",
        },
        **fit_width(width, natural_width),
        height=height or default_height,
        plot_bgcolor=NAN_COLOR,
        paper_bgcolor="white",
        hovermode="closest",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
        margin={"l": 60, "r": 20, "t": 150 + TOOLBAR_BAND, "b": 60},
    )
    rows = trace_rows(result)
    rows.append(("heads", f"{result.n_heads} per layer, {result.by}"))
    rows.append(("colour", plain_text(colour.note)))
    set_page_info(fig, plain_text(text, first_line=True), [""], [(n, [v]) for n, v in rows])
    return fig


def _hover(
    result: HeadTraceResult, colour: Any, pos: int | None, top_k: int
) -> tuple[np.ndarray, str]:
    """``customdata`` ``[layer, head, field]`` and the ``hovertemplate`` laying it out."""
    index = () if pos is None else (pos,)
    scores = result.scores.detach().double().cpu().numpy()
    normalized = result.normalized().detach().double().cpu().numpy()
    group = result.query_heads_per_head
    token = "every position" if pos is None else f"{pos} {visible(result.tokens[pos])}"
    data = np.full((result.n_layers, result.n_heads, len(_LABELS) + 1 + top_k), "", dtype=object)
    for layer in range(result.n_layers):
        for head in range(result.n_heads):
            cell = data[layer, head]
            cell[0] = str(layer)
            cell[1] = str(head)
            if group > 1:
                cell[1] += f" (query heads {head * group}–{(head + 1) * group - 1})"
            cell[2] = escape(token)
            score_fields(
                cell,
                colour,
                result,
                float(scores[(layer, head, *index)]),
                float(normalized[(layer, head, *index)]),
                lambda layer=layer, head=head: result.top_predictions(layer, head, pos),
                top_k,
            )
    template = "<br>".join(
        f"{label}{NBSP * (_LABEL_WIDTH - len(label))}%{{customdata[{i}]}}"
        for i, label in enumerate(_LABELS)
    )
    template += "".join(f"%{{customdata[{i}]}}" for i in range(len(_LABELS), data.shape[-1]))
    return data, template + "<extra></extra>"


def _title(result: HeadTraceResult, pos: int | None, slider: bool, note: str) -> str:
    if pos is None:
        where = "every position"
    elif slider:
        where = "one position (slider below)"
    else:
        where = f"position {pos} ({escape(visible(result.tokens[pos]))})"
    site = escape(result.hook_names[0].split(".")[-1])
    lines = [*trace_subtitle(result), note]
    return (
        f"<b>One head of {site} at {where}: {direction_phrase(result.direction)}</b>"
        f" · {escape(result.model_name)}<br>"
        f'<span style="font-size:12px">{"<br>".join(lines)}</span>'
    )
