"""Plotly heatmaps of per-head traces: layers along y, attention heads along x.

A per-head trace is a :class:`~lenscope.results.TraceResult` whose axes
include ``"head"`` (``("layer", "head")``: a head restored at every
position; ``("layer", "head", "pos")``: at one position, a slider below the
figure picking it). It is drawn by :func:`~lenscope.plotting.plot_unit_trace`,
as TransformerLens's per-head patching results are usually shown (a
``layer x head`` grid), in ROME's attention colour; hovering a key/value
head of a grouped-query model names the query heads that share it.
"""

from typing import Any

import plotly.graph_objects as go

from lenscope.plotting.units import _plot_units
from lenscope.results import TraceResult
from lenscope.validation import InvalidInput

HEAD_COLORSCALE = "Reds"
"""Heads are attention: ROME's attention colour."""


def plot_head_trace(
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
    """A ``layer x head`` heatmap of a per-head trace.

    Args:
        result: A :class:`TraceResult` with a ``head`` axis.
        value: ``"score"``, ``"indirect_effect"`` or ``"normalized"``.
        top_k: Predictions listed in the hover (0 for none).
        pos: For ``by="head_pos"`` (a ``pos`` axis), the position shown first
            (default: the last traced one); the slider shows the others.
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
    if isinstance(result, TraceResult) and "head" not in result.axes:
        raise InvalidInput(
            f"plot_head_trace draws traces with a head axis, got axes {result.axes}; pass "
            "tracer.trace(..., kind='z', by='head'), or draw this one with result.plot()"
        )
    return _plot_units(
        result,
        dict(value=value, top_k=top_k, pos=pos, layer_order=layer_order),
        dict(title=title, width=width, height=height, colorscale=colorscale),
        default_scale=HEAD_COLORSCALE,
        every_position=True,
        caller="plot_head_trace",
    )
