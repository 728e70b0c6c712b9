"""Interactive plotly heatmaps of lens prediction trajectories.

Draws a :class:`~lenscope.lens.LensTrajectory` the way tuned-lens draws its
prediction trajectories (Belrose et al., 2023, arXiv 2303.08112, Figure 1;
the logit lens of nostalgebraist, 2020): input tokens along x, layers along y
with layer 0 at the bottom, one per-cell statistic as colour, the lens's
top-1 token as cell text, and a monospace hover table of the top-k tokens and
their probabilities next to every statistic of the cell, built from
``customdata`` + ``hovertemplate``. :func:`plot_lens` puts several
trajectories side by side on one colour scale (e.g. the clean, corrupted and
restored runs of :func:`~lenscope.lens.lens_trace_cell`) or shows each one's
difference from the first. Computation stays in :mod:`lenscope.lens`; a small
statistic view object turns one statistic's arrays into ``go.Heatmap`` traces.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.lens import STATISTICS, LensTrajectory, resolve_statistic
from lenscope.plotting._common import (
    HOVER_FONT,
    KIND_COLORSCALES,
    KIND_LABELS,
    LINKED_FIELD,
    NAN_COLOR,
    NBSP,
    check_choice,
    check_positive_int,
    escape,
    fit_width,
    format_percent,
    set_page_info,
    shorten,
    stride_keep_last,
    token_labels,
    topk_lines,
    visible,
)
from lenscope.plotting._layout import (
    TOOLBAR_BAND,
    layout_width,
    plan_grid,
    token_ticks,
    toolbar_title,
    wrap_title,
)
from lenscope.plotting._provenance import model_label, model_text
from lenscope.results import corruption_rows, corruption_text
from lenscope.validation import InvalidInput, InvalidInputType

MODES = ("side_by_side", "difference")
"""How :func:`plot_lens` shows several trajectories."""

LAYER_ORDERS = ("bottom_up", "top_down")
"""Layer 0 at the bottom (tuned-lens, ROME) or at the top."""

_LABEL_WIDTH = 8
_BAR_TITLES = {
    "entropy": "entropy (nats)",
    "kl_to_final": "KL (nats)",
    "answer_prob": "p(answer)",
    "answer_rank": "answer rank",
    "top1_prob": "top-1 p",
}
_CELL_TEXT_CHARS = 6
_CELL_CHAR_PX = 6.2
"""Width of one character of the cells' 10-pixel text."""
_BAR_MARGIN = 120
"""Pixels right of each panel: the shared colour bar (rightmost) or the gap to the next."""
_N_FIXED_FIELDS = 9  # token, pos, layer, 5 statistics, top-k header


@dataclasses.dataclass(frozen=True)
class _StatisticView:
    """One statistic of several trajectories, ready to become heatmaps on a shared colour axis.

    ``grids`` are the ``[row, pos]`` values each panel colours by (for the
    answer rank, ``log10(rank)``; in difference mode, panel minus reference).
    """

    name: str
    title: str
    grids: list[np.ndarray]
    colorscale: Any
    cmin: float
    cmax: float
    cmid: float | None
    colorbar: dict[str, Any]

    @classmethod
    def build(
        cls,
        name: str,
        trajectories: Sequence[LensTrajectory],
        rows: Sequence[int],
        *,
        difference: bool,
        colorscale: Any,
        zmin: float | None,
        zmax: float | None,
    ) -> "_StatisticView":
        """Colour values, range and colour bar of ``name`` for ``trajectories``."""
        title = STATISTICS[name][0]
        raw = [_grid(t, name)[list(rows)] for t in trajectories]
        component = trajectories[0].component
        rank = name == "answer_rank"
        values = [np.log10(g) for g in raw] if rank else raw
        bar_title = _BAR_TITLES[name]
        colorbar: dict[str, Any] = {"thickness": 12, "len": 1.0}
        if difference:
            values = [v - values[0] for v in values[1:]]
            finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.zeros(0)])
            span = float(np.abs(finite).max()) if finite.size else 0.0
            span = span if span > 0 else 1e-6
            bar_title = "Δ log10 rank" if rank else "Δ " + bar_title
            colorbar["title"] = {"text": bar_title, "side": "right"}
            if name in ("answer_prob", "top1_prob"):
                digits = 0 if span >= 0.1 else 1 if span >= 0.01 else 2
                colorbar["tickformat"] = f"+.{digits}%"
            return cls(
                name,
                title,
                values,
                colorscale or "RdBu",
                -span if zmin is None else zmin,
                span if zmax is None else zmax,
                0.0,
                colorbar,
            )
        finite = np.concatenate([v[np.isfinite(v)] for v in values])
        top = float(finite.max()) if finite.size else 1.0
        if name in ("answer_prob", "top1_prob"):
            low, high = 0.0, 1.0
            colorbar["tickformat"] = ".0%"
            scale = KIND_COLORSCALES.get(component, "Greys")
        elif rank:
            low, high = 0.0, max(top, 1.0)
            ticks = list(range(0, int(math.floor(high)) + 1))
            colorbar["tickvals"] = ticks
            colorbar["ticktext"] = [f"{10**t:,}" for t in ticks]
            scale = KIND_COLORSCALES.get(component, "Greys") + "_r"
        else:
            low, high = 0.0, top if top > 0 else 1e-6
            scale = "Viridis"
        colorbar["title"] = {"text": bar_title, "side": "right"}
        return cls(
            name,
            title,
            values,
            colorscale or scale,
            low if zmin is None else zmin,
            high if zmax is None else zmax,
            None,
            colorbar,
        )

    def coloraxis(self) -> dict[str, Any]:
        """The layout ``coloraxis`` every panel's heatmap shares."""
        axis = {
            "colorscale": self.colorscale,
            "cmin": self.cmin,
            "cmax": self.cmax,
            "colorbar": self.colorbar,
        }
        if self.cmid is not None:
            axis["cmid"] = self.cmid
        return axis

    def heatmap(
        self,
        index: int,
        *,
        x: Sequence[int],
        y: Sequence[int],
        text: np.ndarray | None,
        customdata: np.ndarray,
        hovertemplate: str,
        name: str,
        linked_field: int | None = None,
    ) -> go.Heatmap:
        """Panel ``index`` as a ``go.Heatmap`` on the shared colour axis.

        ``linked_field`` is the ``customdata`` field that linked hover writes
        beside this panel's cell when another panel is hovered (None: the
        colour's value in the colour bar's unit).
        """
        grid = self.grids[index]
        return go.Heatmap(
            z=[[None if not math.isfinite(v) else v for v in row] for row in grid.tolist()],
            x=list(x),
            y=list(y),
            coloraxis="coloraxis",
            text=text.tolist() if text is not None else None,
            texttemplate="%{text}" if text is not None else None,
            textfont={"size": 10},
            customdata=customdata,
            hovertemplate=hovertemplate,
            hoverongaps=False,
            meta=None if linked_field is None else {LINKED_FIELD: linked_field},
            name=name,
            xgap=1,
            ygap=1,
        )


def plot_lens(
    *trajectories: LensTrajectory | Sequence[LensTrajectory],
    statistic: str = "entropy",
    mode: str = "side_by_side",
    cell_text: bool = True,
    top_k: int | None = None,
    layer_stride: int = 1,
    layer_order: str = "bottom_up",
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
    colorscale: Any = None,
    zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Heatmaps of one lens statistic: tokens along x, layers along y.

    Example:
        >>> clean, corrupted, restored = lens_trace_cell(tracer, result, 5, 3)  # doctest: +SKIP
        >>> plot_lens(clean, corrupted, restored, statistic="answer_prob")  # doctest: +SKIP

    Args:
        *trajectories: One or more trajectories of the same prompt and depth,
            or one sequence of them (such as :func:`~lenscope.lens.lens_trace_cell` returns).
        statistic: ``"entropy"`` (nats), ``"answer_prob"``, ``"answer_rank"``
            (coloured on a log scale), ``"top1_prob"`` or ``"kl_to_final"``
            (``"kl"``; nats): see :class:`~lenscope.lens.LensTrajectory`.
        mode: ``"side_by_side"``: one panel per trajectory on one colour
            scale. ``"difference"``: one panel per trajectory after the first,
            coloured by its statistic minus the first's (for the rank, the
            difference of ``log10`` ranks) on a diverging scale centred at 0.
        cell_text: Write each cell's top-1 token in it.
        top_k: Rows of the top-k hover table; default every prediction stored.
        layer_stride: Show every ``layer_stride``-th layer (the last is always kept).
        layer_order: ``"bottom_up"`` (layer 0 at the bottom) or ``"top_down"``.
        title: Figure title; by default the lens, component, model, statistic and answer.
        width: Figure width in pixels; by default the figure fills the width
            of the notebook cell or page (static images get a width that
            grows with the tokens).
        height: Figure height in pixels; by default it grows with the layers.
        colorscale: Any plotly colour scale instead of the default
            (per-kind for probabilities and rank, Viridis for entropy and KL,
            RdBu for differences).
        zmin: Bottom of the colour range (in ``log10`` units for the rank).
        zmax: Top of the colour range.

    Returns:
        A plotly figure; show it with ``fig.show()`` or write it with
        :func:`~lenscope.plotting.save_html`, which links hover across panels.

    Raises:
        TypeError: Something other than a ``LensTrajectory`` was passed.
        ValueError: No trajectories, trajectories of different shapes, or an
            option out of range.
    """
    items = _flatten(trajectories)
    name = resolve_statistic(statistic)
    check_choice("mode", mode, MODES)
    check_choice("layer_order", layer_order, LAYER_ORDERS)
    check_positive_int("layer_stride", layer_stride)
    check_positive_int("width", width, allow_none=True)
    check_positive_int("height", height, allow_none=True)
    stored = min(t.top_k for t in items)
    if top_k is None:
        top_k = stored
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= stored:
        raise InvalidInput(
            f"top_k must be an int from 0 to the {stored} predictions the trajectories "
            f"stored; got {top_k!r}; pass e.g. top_k=5"
        )
    difference = mode == "difference"
    if difference and len(items) < 2:
        raise InvalidInput(
            f"mode='difference' needs at least two trajectories (the first is the "
            f"reference); got {len(items)}; pass e.g. "
            "plot_lens(clean, corrupted, mode='difference')"
        )
    _check_comparable(items, strict=difference)

    first = items[0]
    rows = stride_keep_last(first.n_layers, layer_stride)
    view = _StatisticView.build(
        name, items, rows, difference=difference, colorscale=colorscale, zmin=zmin, zmax=zmax
    )
    panels = items[1:] if difference else items
    names = [
        f"{escape(t.label)} − {escape(first.label)}" if difference else escape(t.label)
        for t in panels
    ]
    n, n_cols = len(panels), max(t.n_pos for t in panels)
    # Laid out for the width it is seen at (see lenscope.plotting._layout): panels in rows
    # below the width where each keeps its columns; the shared colour bar in the right margin.
    lw = layout_width(width)
    plan = dict(width=lw, panel_title_px=22, left=70, bar_gap=_BAR_MARGIN, row_px=26)
    grid = plan_grid(n, n_cols, len(rows), tick_px=0, **plan)
    column_px = grid.panel_w / n_cols
    # The top-1 token in each cell, cut to the characters its column holds (at most six);
    # under three, only the hover has it.
    text_chars = min(_CELL_TEXT_CHARS, int((column_px - 4) / _CELL_CHAR_PX))
    text_hidden = cell_text and text_chars < 3
    cell_text = cell_text and not text_hidden
    ticks = []
    for traj in panels:
        labels, _ = token_labels(traj.tokens, marked=_subject(traj))
        ticks.append(token_ticks(labels, column_px, [*_subject(traj), traj.n_pos - 1]))
    grid = plan_grid(n, n_cols, len(rows), tick_px=max(t.height for t in ticks), **plan)
    text_title = title
    if text_title is None:
        text_title = _title(items, view, mode, cell_text, text_hidden)
    wrapped, title_px = wrap_title(text_title, lw)
    grid.margin["t"] += TOOLBAR_BAND + title_px + 10
    fig = make_subplots(
        rows=grid.rows,
        cols=grid.cols,
        specs=grid.specs(n),
        shared_yaxes="all",
        subplot_titles=names if n > 1 else None,
        **grid.spacing(),
    )
    same_tokens = all(_same_tokens(first, t) for t in panels)
    for index, traj in enumerate(panels):
        row, col = grid.position(index)
        reference = first if difference else None
        _, full = token_labels(traj.tokens, marked=_subject(traj))
        customdata, template = _hover(traj, rows, full, top_k, name, reference)
        text = _cell_text(traj, rows, text_chars) if cell_text else None
        fig.add_trace(
            view.heatmap(
                index,
                x=range(traj.n_pos),
                y=rows,
                text=text,
                customdata=customdata,
                hovertemplate=template,
                name=names[index],
                # A difference panel's hover gives both runs' values; its label, the difference.
                linked_field=None if difference else _PLOTTED_FIELD[name],
            ),
            row=row,
            col=col,
        )
        fig.update_xaxes(
            tickmode="array",
            tickvals=ticks[index].tickvals,
            ticktext=ticks[index].ticktext,
            tickangle=ticks[index].angle,
            showgrid=False,
            zeroline=False,
            ticks="",
            range=[-0.5, traj.n_pos - 0.5],
            matches="x" if index > 0 and same_tokens else None,
            row=row,
            col=col,
        )
        fig.update_yaxes(showticklabels=col == 1, row=row, col=col)
        _mark_restored(fig, traj, rows, "" if index == 0 else str(index + 1))
    fig.update_yaxes(
        autorange="reversed" if layer_order == "top_down" else True,
        showgrid=False,
        zeroline=False,
        ticks="",
        tickmode="array" if len(rows) <= 40 else "auto",
        tickvals=list(rows) if len(rows) <= 40 else None,
    )
    for index in range(n):
        row, col = grid.position(index)
        if col == 1:
            fig.update_yaxes(title_text=f"layer ({escape(first.component)})", row=row, col=col)
    fig_height = height or grid.height
    fig.update_layout(
        title=toolbar_title(wrapped, fig_height),
        coloraxis=view.coloraxis(),
        **fit_width(width, max(lw, _natural_width(n, n_cols))),
        height=fig_height,
        margin=grid.margin,
        plot_bgcolor=NAN_COLOR,
        paper_bgcolor="white",
        hovermode="closest",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
    )
    _page(fig, items)
    return fig


def _page(fig: go.Figure, items: Sequence[LensTrajectory]) -> None:
    """The saved page's ``<title>`` and settings table: every panel's run, from its own record."""
    rows: dict[str, list[str]] = {}
    for index, traj in enumerate(items):
        cells = [
            *traj.settings_rows(),
            *(corruption_rows(traj.corruption) if traj.corruption is not None else []),
        ]
        for name, text in cells:
            rows.setdefault(name, ["—"] * len(items))[index] = text
    first = items[0]
    heading = f"{first.decoder} · {first.component} · {model_label(first)}"
    set_page_info(fig, heading, [t.label for t in items], list(rows.items()))


def _flatten(trajectories: Sequence[Any]) -> list[LensTrajectory]:
    """Accept ``plot_lens(a, b)`` and ``plot_lens([a, b])``; check every item's type."""
    if len(trajectories) == 1 and isinstance(trajectories[0], tuple | list):
        trajectories = tuple(trajectories[0])
    if not trajectories:
        raise InvalidInput(
            "plot_lens needs at least one LensTrajectory; got none; pass e.g. "
            "plot_lens(lens_trajectory(model, prompt))"
        )
    for index, item in enumerate(trajectories):
        if not isinstance(item, LensTrajectory):
            raise InvalidInputType(
                f"plot_lens expects LensTrajectory objects; got {type(item).__name__} at "
                f"index {index}; pass the results of lens_trajectory or lens_trace_cell"
            )
    return list(trajectories)


def _same_tokens(a: LensTrajectory, b: LensTrajectory) -> bool:
    return a.token_ids.shape == b.token_ids.shape and bool((a.token_ids == b.token_ids).all())


def _check_comparable(items: Sequence[LensTrajectory], *, strict: bool) -> None:
    """Panels share the layer axis; differences also need the same prompt."""
    first = items[0]
    problems = []
    for index, other in enumerate(items[1:], start=1):
        if other.n_layers != first.n_layers:
            problems.append(
                f"{first.n_layers} layers (trajectory 0) vs {other.n_layers} (trajectory {index})"
            )
        if strict and not _same_tokens(first, other):
            problems.append(
                f"tokens {list(first.tokens)!r} (trajectory 0) vs "
                f"{list(other.tokens)!r} (trajectory {index})"
            )
    if problems:
        raise InvalidInput(
            "plot_lens shows trajectories on one layer axis (and differences of one "
            "prompt); got trajectories that differ in "
            + "; ".join(problems)
            + "; compute them on the same model (and prompt)"
        )


def _mark_restored(
    fig: go.Figure, traj: LensTrajectory, rows: Sequence[int], axis_suffix: str
) -> None:
    """Outline the restored cells (the trace cell's window of layers at its position)."""
    if traj.restored_pos is None or not traj.restored_hooks:
        return
    layers = sorted(int(name.split(".")[1]) for name in traj.restored_hooks)
    shown = [i for i, layer in enumerate(rows) if layers[0] <= layer <= layers[-1]]
    if not shown:
        return
    y = [rows[i] for i in shown]
    below = rows[shown[0] - 1] if shown[0] > 0 else y[0] - 1
    above = rows[shown[-1] + 1] if shown[-1] + 1 < len(rows) else y[-1] + 1
    fig.add_shape(
        type="rect",
        xref=f"x{axis_suffix}",
        yref=f"y{axis_suffix}",
        x0=traj.restored_pos - 0.5,
        x1=traj.restored_pos + 0.5,
        y0=(y[0] + below) / 2,
        y1=(y[-1] + above) / 2,
        line={"color": "#111111", "width": 2.5},
        fillcolor="rgba(0,0,0,0)",
        layer="above",
    )


def _grid(traj: LensTrajectory, name: str) -> np.ndarray:
    return traj.statistic(name).detach().double().cpu().numpy()


def _subject(traj: LensTrajectory) -> range:
    return range(*traj.subject_range) if traj.subject_range is not None else range(0)


def _natural_width(n: int, n_cols: int) -> int:
    """Width for static images: every panel side by side, cells wide enough for their text."""
    plot_w = min(1600, max(240, 58 * n_cols))
    return 70 + n * (plot_w + _BAR_MARGIN)


def _cell_text(traj: LensTrajectory, rows: Sequence[int], chars: int) -> np.ndarray:
    """The top-1 token of each shown cell, whitespace visible and shortened."""
    ids = traj.top_ids[list(rows), :, 0].tolist()
    return np.array(
        [[escape(shorten(visible(traj.vocab[i]), chars)) for i in row] for row in ids],
        dtype=object,
    )


def _format_prob(value: float) -> str:
    """A probability in percent, or in scientific notation below 0.1% (early layers' answer)."""
    return format_percent(value) if not 0 < value < 1e-3 else f"{value:.1e}"


def _stat_lines(traj: LensTrajectory, layer: int, pos: int) -> list[str]:
    """The cell's five statistics, formatted for the hover table."""
    return [
        f"{float(traj.entropy[layer, pos]):.3f} nats",
        f"{float(traj.kl_to_final[layer, pos]):.3f} nats",
        _format_prob(float(traj.answer_prob[layer, pos])),
        f"{int(traj.answer_rank[layer, pos]):,}",
        f"{format_percent(float(traj.top1_prob[layer, pos]))}",
    ]


_PLOTTED_FIELD = {
    "entropy": 3,
    "kl_to_final": 4,
    "answer_prob": 5,
    "answer_rank": 6,
    "top1_prob": 7,
}
"""The hover field (``customdata`` index) of each statistic a lens figure can colour by."""


def _hover(
    traj: LensTrajectory,
    rows: Sequence[int],
    full: Sequence[str],
    top_k: int,
    statistic: str,
    reference: LensTrajectory | None,
) -> tuple[np.ndarray, str]:
    """``customdata`` ``[row, pos, field]`` and the ``hovertemplate`` that lays it out.

    Fields: token, position, layer and hook name, the five statistics (with
    the reference run's value after a ``vs`` in difference mode), the top-k
    header, then one row of the top-k table each.
    """
    subject = _subject(traj)
    data = np.full((len(rows), traj.n_pos, _N_FIXED_FIELDS + top_k), "", dtype=object)
    answer = escape(visible(traj.answer))
    for i, layer in enumerate(rows):
        for pos in range(traj.n_pos):
            cell = data[i, pos]
            cell[0] = full[pos]
            cell[1] = f"{pos}" + (" · subject" if pos in subject else "")
            cell[2] = f"{layer} · {escape(traj.hook_names[layer])}"
            stats = _stat_lines(traj, layer, pos)
            if reference is not None:
                ref = _stat_lines(reference, layer, pos)
                stats = [
                    f"{a}  (vs {b} {escape(reference.label)})"
                    for a, b in zip(stats, ref, strict=True)
                ]
            cell[3:8] = stats
            if top_k:
                cell[8] = f"<br>top-{top_k} ({escape(traj.decoder)}, {escape(traj.label)})"
                lines = topk_lines(traj.top_predictions(layer, pos)[:top_k])
                cell[_N_FIXED_FIELDS:] = [f"<br>{line}" for line in lines]
    names = ["token", "pos", "layer", "entropy", "KL", f"p({answer})", "rank", "top-1 p"]
    plotted = _PLOTTED_FIELD[statistic]
    lines = []
    for index, label in enumerate(names):
        value = f"%{{customdata[{index}]}}"
        if index == plotted:
            value = f"<b>{value}</b>"
        # The answer label can be wider than the column: pad by its visible length.
        shown = len(label) if index != 5 else len(f"p({visible(traj.answer)})")
        lines.append(f"{label}{NBSP * max(1, _LABEL_WIDTH - shown)}{value}")
    template = "<br>".join(lines)
    template += "".join(f"%{{customdata[{index}]}}" for index in range(8, data.shape[-1]))
    return data, template + "<extra></extra>"


def _title(
    items: Sequence[LensTrajectory],
    view: _StatisticView,
    mode: str,
    cell_text: bool,
    text_hidden: bool = False,
) -> str:
    """Default title: lens, component, model; then statistic, answer and reading notes."""
    first = items[0]
    # Panels decoded by different lenses (logit vs tuned) name them all.
    lens = escape(" vs ".join(dict.fromkeys(t.decoder for t in items))).capitalize()
    what = KIND_LABELS.get(first.component, first.component)
    units = STATISTICS[view.name][1]
    stat = escape(view.title) + (f" ({units})" if units else "")
    if mode == "difference":
        stat = f"difference in {stat} from {escape(first.label)}"
    notes = [stat, f"answer <b>{escape(visible(first.answer))}</b>"]
    copies = max(t.copies for t in items)
    if copies > 1:
        notes.append(f"noisy runs: mean distribution of {copies} copies")
    records = list(dict.fromkeys(corruption_text(t.corruption) for t in items if t.corruption))
    if records:
        notes.append("corrupted by " + escape("; ".join(records)))
    if cell_text:
        notes.append("cell text: top-1 token")
    elif text_hidden:
        notes.append("top-1 token in the hover (cells too narrow for it; pass a larger width=)")
    if first.subject_range is not None:
        notes.append("subject marked *")
    return (
        f"<b>{lens} · {escape(what)}</b> · {model_text(first)}<br>"
        f'<span style="font-size:13px">{" · ".join(notes)}</span>'
    )
