"""Plotly heatmaps of traces whose cells are units of a layer: layers along y, units along x.

Draws any :class:`~lenscope.results.TraceResult` whose axes are not
``("layer", "pos")`` (those are :func:`~lenscope.plotting.plot_trace`'s), the
way TransformerLens's per-head patching results are usually shown: a
``layer x unit`` grid for ``("layer", "head")``, ``("layer", "neuron")`` or
any axis a site declares, read from the result's ``axes`` and never from
its site. When the cells also have a ``pos`` axis, a slider below the figure
picks the position (the last traced one at first); several unit axes other
than ``pos`` are laid out as one column per combination. Hovering a cell
shows each of its coordinates by axis name (and, for key/value heads of a
grouped-query model, the query heads that share one), the score, the
effect and the patched run's top-k predictions, built from ``customdata`` +
``hovertemplate``. Colours, title and the page's settings table follow
:func:`~lenscope.plotting.plot_trace`: the experiment named from the
result's record, a diverging scale centred at zero for values that can be
negative, noising oriented like denoising.
"""

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go

from lenscope.plotting._common import (
    HOVER_FONT,
    NAN_COLOR,
    NBSP,
    escape,
    fit_width,
    set_page_info,
    visible,
)
from lenscope.plotting._layout import TOOLBAR_BAND, layout_width, wrap_title
from lenscope.plotting._provenance import direction_phrase, trace_rows, trace_subtitle
from lenscope.plotting.trace import (
    _check_options,
    colour_of,
    colour_ranges,
    colour_scale,
    plain_text,
    score_fields,
)
from lenscope.results import TraceResult
from lenscope.validation import InvalidInput, InvalidInputType

_MAX_TICKS = 64
"""Above this many columns the unit axis gets plotly's automatic ticks and free aspect."""


def plot_unit_trace(
    result: TraceResult,
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
    """A ``layer x unit`` heatmap of a trace whose cells are units (heads, neurons, ...).

    Args:
        result: A :class:`TraceResult` with axes other than ``("layer", "pos")``.
        value: ``"score"``, ``"indirect_effect"`` or ``"normalized"``.
        top_k: Predictions listed in the hover (0 for none).
        pos: With a ``pos`` axis, the position shown first (default: the
            last traced one); the slider shows the others.
        layer_order: ``"bottom_up"`` (layer 0 at the bottom) or ``"top_down"``.
        title: Figure title; default names the experiment (see
            :func:`~lenscope.plotting.plot_trace`).
        width: Pixels; default fills the container.
        height: Pixels; default grows with the layers.
        colorscale: A plotly colour scale; default the kind's (diverging:
            white at zero).

    Returns:
        The plotly figure (never shown).
    """
    return _plot_units(
        result,
        dict(value=value, top_k=top_k, pos=pos, layer_order=layer_order),
        dict(title=title, width=width, height=height, colorscale=colorscale),
        default_scale=None,
        every_position=False,
        caller="plot_unit_trace",
    )


def _plot_units(
    result: Any,
    options: dict[str, Any],
    layout: dict[str, Any],
    *,
    default_scale: str | None,
    every_position: bool,
    caller: str,
) -> go.Figure:
    """The figure of :func:`plot_unit_trace`; ``every_position``: cells without pos restore all."""
    if not isinstance(result, TraceResult):
        raise InvalidInputType(
            f"{caller} expects a TraceResult, got {type(result).__name__}; "
            "pass the result of CausalTracer.trace"
        )
    if result.axes == ("layer", "pos"):
        raise InvalidInput(
            f"{caller} draws traces whose cells are units of a layer (heads, neurons, ...), "
            f"got axes {result.axes}; plot a (layer, pos) trace with plot_trace "
            "(or result.plot())"
        )
    value, top_k, pos, layer_order = (options[k] for k in ("value", "top_k", "pos", "layer_order"))
    checked = {"value": value, "layer_order": layer_order, "layer_stride": 1, "top_k": top_k}
    _check_options([result], {**checked, "width": layout["width"], "height": layout["height"]})
    colour = colour_of(result, value)
    columns = [a for a in result.axes[1:] if a != "pos" or result.axes[1:] == ("pos",)]
    slider = "pos" in result.axes and "pos" not in columns
    # [layer, *columns, pos?]: the column axes in the result's order, the slider's last.
    order = [0, *(result.axes.index(a) for a in columns)]
    if slider:
        order.append(result.axes.index("pos"))
    grid = np.transpose(colour.grid, order)
    scores = np.transpose(result.scores.detach().double().cpu().numpy(), order)
    normalized = np.transpose(result.normalized().detach().double().cpu().numpy(), order)
    top_order = [*order, len(order)]
    top_ids = np.transpose(result.top_ids.detach().cpu().numpy(), top_order)
    top_probs = np.transpose(result.top_probs.detach().float().cpu().numpy(), top_order)
    split = result.answer_split or {}
    log_probs = split.get("log_probs")
    # An answer of several tokens: each token's log-probability per cell, [layer, ..., answer].
    token_log_probs = (
        None
        if log_probs is None
        else np.transpose(np.asarray(log_probs, dtype=np.float64), top_order)
    )
    sizes = [result.axis_size(a) for a in columns]
    n_columns = math.prod(sizes)
    positions: list[int | None] = [None]
    if slider:
        traced = [p for p in range(result.n_pos) if np.isfinite(grid[..., p]).any()]
        positions = list(traced or range(result.n_pos))
        if pos is None:
            pos = positions[-1]
        if (
            isinstance(pos, bool)
            or not isinstance(pos, int)
            or not -result.n_pos <= pos < (result.n_pos)
        ):
            raise InvalidInput(
                f"pos must be a token position in [0, {result.n_pos}) (or count back), "
                f"got {pos!r}; pass e.g. pos=-1"
            )
        pos %= result.n_pos
        if pos not in positions:
            positions = sorted({*positions, pos})  # type: ignore[type-var]
    elif pos is not None:
        raise InvalidInput(
            f"pos picks the position of a trace with a pos axis; this one has axes "
            f"{result.axes}, got pos={pos}; leave pos unset"
        )
    ((low, high, mid),) = colour_ranges([colour], shared=True, zmin=None, zmax=None)
    scale = layout["colorscale"] or (
        colour_scale(colour, result.kind, None)
        if default_scale is None or colour.diverging
        else default_scale
    )
    units = _unit_labels(sizes)

    fig = go.Figure()
    for p in positions:
        at = (...,) if p is None else (..., p)
        z = grid[at].reshape(result.n_layers, n_columns)
        cell_scores = scores[at].reshape(result.n_layers, n_columns)
        cell_normalized = normalized[at].reshape(result.n_layers, n_columns)
        k = top_ids.shape[-1]
        tops = (
            top_ids[(*at, slice(None))].reshape(result.n_layers, n_columns, k).tolist(),
            top_probs[(*at, slice(None))].reshape(result.n_layers, n_columns, k).tolist(),
        )
        split_cells = (
            None
            if token_log_probs is None
            else token_log_probs[(*at, slice(None))].reshape(result.n_layers, n_columns, -1)
        )
        customdata, template = _hover(
            result,
            colour,
            columns,
            units,
            (cell_scores, cell_normalized),
            tops,
            p,
            top_k,
            every_position,
            split_cells,
        )
        fig.add_trace(
            go.Heatmap(
                z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
                x=list(range(n_columns)),
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
    few = n_columns <= _MAX_TICKS
    # Few columns: cells at most twice as wide as tall whatever the container's width
    # (plotly narrows the plot area instead of stretching a few heads into long bars).
    fig.update_xaxes(
        title_text=_column_title(result, columns),
        tickmode="array" if few else "auto",
        tickvals=list(range(n_columns)) if few else None,
        ticktext=[",".join(map(str, u)) for u in units] if few else None,
        ticks="",
        **({"scaleanchor": "y", "scaleratio": 2.0, "constrain": "domain"} if few else {}),
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
    natural_width = min(1400, max(420, 140 + 36 * n_columns))
    text = layout["title"]
    if text is None:
        text = _title(result, columns, pos, len(positions) > 1, colour.note, every_position)
    # Wrapped to the width the figure is laid out for (see lenscope.plotting._layout).
    wrapped, title_px = wrap_title(text, layout_width(layout["width"]))
    top = max(150, title_px + 30)
    default_height = (
        70 + top + TOOLBAR_BAND + 22 * result.n_layers + (90 if len(positions) > 1 else 0)
    )
    height = layout["height"]
    fig.update_layout(
        # Title below the band plotly's toolbar shows in.
        title={
            "text": wrapped,
            "x": 0,
            "y": 1 - TOOLBAR_BAND / (height or default_height),
            "yanchor": "top",
            "yref": "container",
        },
        **fit_width(layout["width"], natural_width),
        height=height or default_height,
        plot_bgcolor=NAN_COLOR,
        paper_bgcolor="white",
        hovermode="closest",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
        margin={"l": 60, "r": 20, "t": top + TOOLBAR_BAND, "b": 60},
    )
    rows = trace_rows(result)
    shape = ", ".join(f"{a} {s}" for a, s in zip(result.axes, result.scores.shape, strict=True))
    rows.append(("cells", shape))
    rows.append(("colour", plain_text(colour.note)))
    set_page_info(fig, plain_text(text, first_line=True), [""], [(n, [v]) for n, v in rows])
    return fig


def _unit_labels(sizes: list[int]) -> list[tuple[int, ...]]:
    """The coordinates of each column, in the order of the flattened grid."""
    return [tuple(int(i) for i in u) for u in np.ndindex(*sizes)]


def _column_title(result: TraceResult, columns: list[str]) -> str:
    if columns == ["head"] and result.query_heads_per_head > 1:
        return "key/value head"
    return ", ".join(columns) or "layer"


def _coordinate_text(result: TraceResult, axis: str, index: int) -> str:
    """One coordinate as the hover shows it (a key/value head with the query heads it serves)."""
    if axis == "pos":
        return f"{index} {visible(result.tokens[index])}"
    group = result.units.get(axis, {}).get("query_heads_per_head", 1)
    if group > 1:
        return f"{index} (query heads {index * group}–{(index + 1) * group - 1})"
    return str(index)


def _hover(
    result: TraceResult,
    colour: Any,
    columns: list[str],
    units: list[tuple[int, ...]],
    values: tuple[np.ndarray, np.ndarray],
    tops: tuple[list[Any], list[Any]],
    pos: int | None,
    top_k: int,
    every_position: bool,
    split: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """``customdata`` ``[layer, column, field]`` and the ``hovertemplate`` laying it out.

    Fields: the cell's coordinates by axis (and its token), then
    :func:`~lenscope.plotting.trace.score_fields`' score, effect and top-k.
    ``values`` are the ``[layer, column]`` scores and normalised scores,
    ``tops`` the ``[layer, column, k]`` top-k ids and probabilities (id -1:
    none decoded, as for attribution estimates), ``split`` an answer of
    several tokens' ``[layer, column, answer]`` log-probabilities (or None).
    """
    scores, normalized = values
    ids, probs = tops
    vocab = result.vocab
    labels = ["layer", *columns]
    if pos is not None or every_position:
        labels.append("token")
    n_coords = len(labels)
    labels += ["score", "effect"]
    width = max(7, *(len(label) + 1 for label in labels))
    token = "every position" if pos is None else f"{pos} {visible(result.tokens[pos])}"
    data = np.full((result.n_layers, len(units), n_coords + 3 + top_k), "", dtype=object)
    # score_fields fills its fields 3 on (score, effect, top-k header, rows).
    scratch = np.full(6 + top_k, "", dtype=object)
    for layer in range(result.n_layers):
        for column, unit in enumerate(units):
            cell = data[layer, column]
            cell[0] = str(layer)
            for i, (axis, index) in enumerate(zip(columns, unit, strict=True), start=1):
                cell[i] = _coordinate_text(result, axis, index)
            if pos is not None or every_position:
                cell[len(columns) + 1] = escape(token)
            scratch[:] = ""
            score_fields(
                scratch,
                colour,
                result,
                float(scores[layer, column]),
                float(normalized[layer, column]),
                lambda row=ids[layer][column], p=probs[layer][column]: [
                    (vocab[i], q) for i, q in zip(row, p, strict=True) if i >= 0
                ],
                top_k,
                None if split is None else lambda row=split[layer, column]: row,
            )
            cell[n_coords:] = scratch[3:]
    template = "<br>".join(
        f"{label}{NBSP * (width - len(label))}%{{customdata[{i}]}}"
        for i, label in enumerate(labels)
    )
    template += "".join(f"%{{customdata[{i}]}}" for i in range(len(labels), data.shape[-1]))
    return data, template + "<extra></extra>"


def _title(
    result: TraceResult,
    columns: list[str],
    pos: int | None,
    slider: bool,
    note: str,
    every_position: bool,
) -> str:
    site = escape(result.hook_names[0].split(".")[-1])
    unit = escape(" and ".join(columns) or "layer")
    if slider:
        where = " at one position (slider below)"
    elif pos is not None:
        where = f" at position {pos} ({escape(visible(result.tokens[pos]))})"
    else:
        where = " at every position" if every_position else ""
    lines = [*trace_subtitle(result), note]
    return (
        f"<b>One {unit} of {site}{where}: {direction_phrase(result.direction)}</b>"
        f" · {escape(result.model_name)}<br>"
        f'<span style="font-size:12px">{"<br>".join(lines)}</span>'
    )
