"""Interactive plotly heatmaps of causal traces, one panel per hook-point kind.

Draws a :class:`~lenscope.results.TraceResult` the way ROME's figures do
(Meng et al., 2022, arXiv 2202.05262, Figure 1): input tokens along x with
the subject marked ``*``, layers along y, the score as colour in the kind's
colours: a sequential scale from 0 for a metric that cannot be negative (the
answer's probability), a diverging one with white at zero and a symmetric
range for one that can (logit differences, effects). A noising trace
(corrupted activations patched into the clean run) is oriented so that a
cell that matters looks as it does when denoising. The title and the page
:func:`~lenscope.plotting.save_html` writes name the experiment from the
result's own record (prompt, subject, answer, foil, metric, direction,
corruption, window, model). Computation stays in the result object; this
module only turns its arrays into ``go.Heatmap`` traces. Hovering a cell
shows a monospace table (token, position, restored layers, score, effect and
the patched run's top-k predictions) built from ``customdata`` +
``hovertemplate``, in the colour bar's unit. :func:`plot_traces` puts
several kinds side by side, sharing one colour range where they show one
quantity, or draws the difference (or sum) of two runs of one prompt; in the
HTML written by :func:`~lenscope.plotting.save_html` hovering one panel
outlines the same cell in all of them.
"""

import dataclasses
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.plotting._common import (
    DEFAULT_DIVERGING,
    HOVER_FONT,
    KIND_COLORSCALES,
    KIND_DIVERGING,
    KIND_LABELS,
    LINKED_FIELD,
    NAN_COLOR,
    NBSP,
    check_choice,
    check_positive_int,
    escape,
    fit_width,
    format_percent,
    pad,
    set_page_info,
    shorten,
    stride_keep_last,
    symmetric_range,
    token_labels,
    topk_lines,
    two_colour_scale,
    visible,
)
from lenscope.plotting._layout import (
    BAR_GAP,
    LABEL_PITCH,
    MIN_COLUMN,
    TOOLBAR_BAND,
    Grid,
    Ticks,
    fold_columns,
    fold_representatives,
    importance,
    layout_width,
    plan_grid,
    token_ticks,
    toolbar_title,
    wrap_axis_title,
    wrap_title,
)
from lenscope.plotting._provenance import (
    corruption_record,
    corruption_text,
    differing,
    direction_phrase,
    is_counterfactual,
    layer_axis_title,
    model_text,
    score_text,
    subject_text,
    trace_rows,
    trace_subtitle,
)
from lenscope.results import TraceResult
from lenscope.validation import InvalidInput, InvalidInputType

VALUES = ("score", "indirect_effect", "normalized")
"""What a heatmap's colour can show."""

LAYER_ORDERS = ("bottom_up", "top_down")
"""Layer 0 at the bottom (ROME's figures) or at the top."""

MODES = ("side_by_side", "difference", "sum")
"""How :func:`plot_traces` shows its results: panels, or two runs combined cell by cell."""

_N_FIXED_FIELDS = 6  # token, position, layers, score, effect, top-k header
_LABEL_WIDTH = 7


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

    Subject tokens (for symmetric token replacement: the tokens that differ)
    are marked ``*`` in bold and bracketed by a dotted box. The title says
    what was patched in which direction on which model, then the prompt,
    the answer (and foil), the clean and corrupted scores (and a normalised
    metric's raw values), the corruption with its own settings, and how to
    read the colours; the HTML page written by
    :func:`~lenscope.plotting.save_html` lists every setting. Untraced (NaN)
    cells are left blank and their hover says "not traced".

    Colours: a metric that cannot be negative (``prob``) on the kind's
    sequential scale from 0; one that can (``logit_diff``, the effects) on a
    diverging scale, white at zero, with a symmetric range. For a noising
    trace (``direction="noise"``) effects are drawn as what patching the
    cell takes away (``"normalized"``: the share of clean − corrupted lost;
    ``"indirect_effect"``: clean minus score) and raw scores on a reversed
    scale, so that a cell that matters takes the kind's colour in both
    directions; the subtitle says which.

    Args:
        result: The trace to draw.
        value: Colour by ``"score"`` (the metric with the cell patched),
            ``"indirect_effect"`` (score minus corrupted score) or
            ``"normalized"`` (fraction of the clean-corrupted gap recovered).
        top_k: Number of the restored run's top predictions in the hover
            table (at most the ``k`` the trace stored; 0 for none).
        layer_stride: Show every ``layer_stride``-th layer (the last layer is
            always kept), for deep models.
        layer_order: ``"bottom_up"`` puts layer 0 at the bottom, as ROME does;
            ``"top_down"`` puts it at the top.
        title: Figure title; by default the experiment, as above.
        width: Figure width in pixels; by default the figure fills the width
            of the notebook cell or page (static images get a width that
            grows with the tokens).
        height: Figure height in pixels; by default it grows with the layers.
        colorscale: Any plotly colour scale; by default purple for the
            residual stream, green for MLP output and red for attention
            (diverging: over orange, magenta and blue below zero).
        zmin: Bottom of the colour range; by default 0 (sequential) or
            minus the largest absolute value (diverging).
        zmax: Top of the colour range; by default the highest traced value
            (diverging: the largest absolute value).

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
    results: Mapping[str, Any] | Sequence[Any],
    *,
    shared_scale: bool = True,
    allow_mismatch: bool = False,
    mode: str = "side_by_side",
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

    Each panel keeps its kind's colour scale; with ``shared_scale`` panels
    that show one quantity (one metric, value and direction) span one colour
    range, so equal colours mean equal values. Panels that do not (results
    of other metrics or directions, with ``allow_mismatch``) each get their
    own range, colour bar, title and layer-axis label. Token
    axes are aligned (and zoom together) and the layer axis is shared.
    Plotly cannot link hover across subplots by itself; the HTML written by
    :func:`~lenscope.plotting.save_html` carries a small script
    (:data:`~lenscope.plotting.LINKED_HOVER_JS`) that outlines the hovered
    ``(token, layer)`` cell in every panel and writes the other panels'
    values beside it. In Jupyter, :func:`~lenscope.plotting.show` draws the
    figure in a small widget that runs the same script (``fig.show()`` and
    the plain display hover each panel on its own).

    ``mode="difference"`` draws two runs of one prompt (two results, or two
    ``{kind: result}`` dicts from ``trace_kinds``) as their cell-by-cell
    difference, A − B, one diverging heatmap per kind with white at zero;
    ``mode="sum"`` draws A + B. The title names both runs.

    Args:
        results: A dict such as :meth:`CausalTracer.trace_kinds` returns
            (panel titles from its keys) or a sequence of results.
        shared_scale: One colour range for every panel (default) or a range
            per panel.
        allow_mismatch: Plot results of different prompts, models, answers
            or metrics together instead of refusing.
        mode: ``"side_by_side"`` (default), ``"difference"`` (A − B) or
            ``"sum"`` (A + B) of two runs with the same tokens and grid.
        value: See :func:`plot_trace`; in the difference and sum modes the
            result's own values (``scores``, ``indirect_effect`` or
            ``normalized()``) are combined.
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
        A plotly figure with one heatmap per result (per kind in the
        difference and sum modes), left to right.

    Raises:
        TypeError: ``results`` holds something other than ``TraceResult``.
        ValueError: ``results`` is empty, the results are not comparable
            (and ``allow_mismatch`` is False), or an option is out of range.
    """
    check_choice("mode", mode, MODES)
    if mode != "side_by_side" and not isinstance(results, str | TraceResult):
        run_names, runs = _runs(results)
        every = [r for run in runs for r in run.values()]
        _check_options(
            every,
            dict(
                value=value,
                top_k=top_k,
                layer_stride=layer_stride,
                layer_order=layer_order,
                width=width,
                height=height,
            ),
        )
        return _plot_combined(
            run_names,
            runs,
            mode=mode,
            value=value,
            layer_stride=layer_stride,
            layer_order=layer_order,
            title=title,
            width=width,
            height=height,
            colorscale=colorscale,
            zmin=zmin,
            zmax=zmax,
        )
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
    """Raise ``TypeError`` unless every item is a ``TraceResult``; ``ValueError`` for other axes."""
    for index, result in enumerate(results):
        if not isinstance(result, TraceResult):
            raise InvalidInputType(
                f"expected TraceResult objects; got {type(result).__name__} at "
                f"index {index}; pass the results of CausalTracer.trace"
            )
        if result.axes != ("layer", "pos"):
            raise InvalidInput(
                f"plot_trace and plot_traces draw (layer, pos) traces, got axes {result.axes} "
                f"at index {index}; draw it with result.plot() "
                "(lenscope.plotting.plot_unit_trace)"
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


@dataclasses.dataclass(frozen=True)
class Colour:
    """What one panel's colour shows, and on which kind of scale.

    Attributes:
        grid: The ``[layer, ...]`` values coloured (NaN: not traced).
        mode: ``"score"``, ``"recovered"``, ``"lost"``, ``"effect"`` or ``"drop"``.
        label: Colour-bar title (escaped).
        diverging: White at zero, a symmetric range (the values can be negative).
        reverse: Low values get the kind's colour (noising, or a metric that falls when it matters).
        percent: Colour bar and hover in percent.
        floor: Bottom of a sequential range (0, or the lowest value for log-probabilities).
        note: How to read the colours, for the subtitle (escaped).
    """

    grid: np.ndarray
    mode: str
    label: str
    diverging: bool
    reverse: bool
    percent: bool
    floor: float | None
    note: str

    @property
    def key(self) -> tuple[Any, ...]:
        """Panels whose keys are equal show one quantity and may share a colour range."""
        return (self.mode, self.label, self.diverging, self.reverse, self.percent)

    def text(self, value: float, *, signed: bool = False) -> str:
        """``value`` in this colour bar's unit (percent or four significant digits)."""
        return format_value(value, percent=self.percent, signed=signed)

    def tickformat(self) -> str | None:
        """Colour-bar tick format: percent where the hover shows percent.

        Two significant digits, trailing zeros trimmed (``.2~p``): a range of 0-2%
        has ticks at 0.5% steps, which ``.0%`` printed as 0%, 1%, 1%, 2%, and a
        difference of a few hundredths of a percent needs more than one decimal.
        """
        if not self.percent:
            return None
        return "+.2~p" if self.diverging else ".2~p"


def format_value(value: float, *, percent: bool, signed: bool = False) -> str:
    """A value as the hover shows it: percent with one decimal, or four significant digits.

    A percentage below 0.05% keeps two significant digits (``0.013%``), so
    that a small probability (an answer of several tokens) is not shown as 0.
    """
    if not math.isfinite(value):
        return "n/a"
    if percent and value != 0 and abs(value) < 5e-4:
        return f"{value * 100:{'+' if signed else ''}.2g}%"
    if percent:
        return format_percent(value, signed=signed)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _values(result: TraceResult, value: str) -> np.ndarray:
    """The result's own ``[layer, ...]`` array that ``value`` names, as float64 numpy."""
    if value == "score":
        grid = result.scores
    elif value == "indirect_effect":
        grid = result.indirect_effect
    else:
        grid = result.normalized()
    return grid.detach().double().cpu().numpy()


_NON_NEGATIVE = ("prob", "kl_div")
_PERCENT_METRICS = ("prob", "normalized_logit_diff")


def colour_of(result: TraceResult, value: str) -> Colour:
    """What a panel of ``result`` colours by ``value``, oriented so that "matters" looks the same.

    Denoising (ROME's restoring): a cell matters when restoring it moves the
    metric from the corrupted score toward the clean one. Noising: when
    patching it moves the metric from the clean score toward the corrupted
    one. Effects are drawn as effects of the patch in both directions
    (noising: share of the clean − corrupted gap *lost*, or the drop below
    clean), so positive means "matters" in both; raw scores keep their
    values and a noising figure reverses the scale, so that the kind's
    colour marks the low scores that mean "matters" there.
    """
    noising = result.direction == "noise"
    metric = _metric_label(result)
    normalised = value == "normalized" or (value == "score" and result.normalization is not None)
    if normalised:
        normalized = result.normalized().detach().double().cpu().numpy()
        if noising:
            return Colour(
                1.0 - normalized,
                "lost",
                "share of clean − corrupted<br>lost",
                True,
                False,
                True,
                None,
                "colour: share of the clean − corrupted gap lost by patching the cell "
                "(0 = no effect; white at 0)",
            )
        return Colour(
            normalized,
            "recovered",
            "share of clean − corrupted<br>recovered",
            True,
            False,
            True,
            None,
            "colour: share of the clean − corrupted gap recovered (0 = no effect; white at 0)",
        )
    percent = result.metric in _PERCENT_METRICS
    if value == "indirect_effect":
        scores = result.scores.detach().double().cpu().numpy()
        if noising:
            return Colour(
                result.clean_score - scores,
                "drop",
                f"clean − {metric}",
                True,
                False,
                percent,
                None,
                f"colour: how far patching the cell lowers {metric} below clean "
                "(0 = no effect; white at 0)",
            )
        return Colour(
            scores - result.corrupted_score,
            "effect",
            f"{metric}<br>− corrupted",
            True,
            False,
            percent,
            None,
            f"colour: {metric} minus corrupted (0 = no effect; white at 0)",
        )
    grid = _values(result, "score")
    finite = grid[np.isfinite(grid)]
    lowest = min([result.clean_score, result.corrupted_score, *finite.tolist()])
    diverging = result.metric == "logit_diff" or (
        result.metric not in (*_NON_NEGATIVE, "log_prob") and lowest < 0
    )
    # KL from the clean run falls when a restored cell matters: its scale runs the other way.
    reverse = noising != (result.metric == "kl_div")
    floor = None if diverging else (lowest if result.metric == "log_prob" else 0.0)
    if diverging and reverse:
        # Reversed about 0: the kind's colour is on the foil's side, where the answer is lost.
        toward = "below 0"
        if result.foil is not None:
            toward = f"toward the foil {escape(visible(result.foil))}"
        note = (
            f"colour: {metric}, white at 0; scale reversed: the kind's colour {toward} "
            "(patching the cell breaks the answer), the other toward the answer"
        )
    elif diverging:
        note = f"colour: {metric}, white at 0, the kind's colour toward the answer"
        if result.foil is not None:
            note += f", the other toward the foil {escape(visible(result.foil))}"
    else:
        note = f"colour: {metric}, from {'its lowest value' if floor else '0'}"
    if reverse and not diverging:
        note += (
            "; scale reversed: the kind's colour marks low scores (patching the cell breaks the "
            "answer)"
            if noising
            else "; scale reversed: the kind's colour marks low values (the cell matters)"
        )
    return Colour(grid, "score", metric, diverging, reverse, result.metric == "prob", floor, note)


def _metric_label(result: TraceResult) -> str:
    """``p(␣Paris)`` for ROME's probability metric, ``log p(␣Paris)``, else the metric's name."""
    name = {"prob": "p", "log_prob": "log p", "logit_diff": "LD"}.get(result.metric)
    if name is None:
        return escape(result.metric)
    if result.metric == "logit_diff" and result.foil is not None:
        return f"LD({escape(visible(result.answer))} − {escape(visible(result.foil))})"
    return f"{escape(name)}({escape(visible(result.answer))})"


def colour_ranges(
    colours: Sequence[Colour],
    *,
    shared: bool,
    zmin: float | int | None,
    zmax: float | int | None,
) -> list[tuple[float, float, float | None]]:
    """``(zmin, zmax, zmid)`` of each panel: symmetric about 0 when diverging, else from the floor.

    Panels share one range when ``shared`` and they show one quantity
    (equal :attr:`Colour.key`); otherwise each gets its own.
    """
    groups = [list(range(len(colours)))]
    if not (shared and all(c.key == colours[0].key for c in colours)):
        groups = [[i] for i in range(len(colours))]
    out: list[tuple[float, float, float | None]] = [(0.0, 1.0, None)] * len(colours)
    for group in groups:
        first = colours[group[0]]
        grids = [colours[i].grid for i in group]
        if first.diverging:
            low, high = symmetric_range(grids)
            mid: float | None = 0.0
        else:
            finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids])
            low = min(colours[i].floor or 0.0 for i in group)
            high = float(finite.max()) if finite.size else low
            mid = None
        if zmin is not None or zmax is not None:
            low = low if zmin is None else float(zmin)
            high = high if zmax is None else float(zmax)
            mid = None
        # An empty range would make plotly pick its own; keep the bottom where it is.
        high = high if high > low else low + max(abs(low), 1.0) * 1e-6
        for i in group:
            out[i] = (low, high, mid)
    return out


def colour_scale(colour: Colour, kind: str, colorscale: Any) -> Any:
    """The plotly scale of a panel: the caller's, else the kind's sequential or diverging one."""
    if colorscale is not None:
        return colorscale
    if colour.diverging:
        return KIND_DIVERGING.get(kind, DEFAULT_DIVERGING)
    return KIND_COLORSCALES.get(kind, "Greys")


def effect_text(colour: Colour, result: TraceResult, score: float, normalized: float) -> str:
    """The hover's effect line, in the colour bar's unit."""
    if not math.isfinite(normalized):
        return "n/a (clean = corrupted)"
    if colour.mode == "recovered":
        return f"{format_percent(normalized)} of clean − corrupted recovered"
    if colour.mode == "lost":
        return f"{format_percent(1 - normalized)} of clean − corrupted lost"
    if colour.mode == "effect":
        return (
            f"{colour.text(score - result.corrupted_score, signed=True)} "
            f"({format_percent(normalized)} of clean − corrupted)"
        )
    if colour.mode == "drop":
        return (
            f"{colour.text(result.clean_score - score, signed=True)} below clean "
            f"({format_percent(1 - normalized)} of clean − corrupted lost)"
        )
    if result.direction == "noise":
        return f"{format_percent(1 - normalized)} of clean − corrupted lost"
    return f"{format_percent(normalized)} of clean − corrupted"


def split_text(result: TraceResult, log_probs: np.ndarray) -> str:
    """Hover lines of an answer of several tokens: what the patch does to each token.

    One line per answer token (scored by teacher forcing, so the tokens'
    log-probabilities sum to the cell's ``log_prob``): its log-probability in
    the patched run and the share of that token's own clean − corrupted gap
    the patch restores (noising: takes away), read from the result's
    :attr:`~lenscope.TraceResult.answer_split`. It shows which token of
    e.g. " New York City" a cell brings back.

    Args:
        result: A trace whose ``answer_split`` has per-cell ``log_probs``.
        log_probs: The cell's per-token log-probabilities, ``[answer]``.

    Returns:
        Escaped hover text starting with ``<br>``, or ``""`` when the
        result has no per-token record.
    """
    split = result.answer_split
    if not split or split.get("log_probs") is None:
        return ""
    tokens = [shorten(visible(t), 14) for t in split["answer_tokens"]]
    clean = np.asarray(split["clean_log_probs"], dtype=np.float64)
    corrupted = np.asarray(split["corrupted_log_probs"], dtype=np.float64)
    noising = result.direction == "noise"
    width = max(len(t) for t in tokens) + 1
    share = "lost" if noising else "restored"
    lines = [f"<br>each answer token: log p, own gap {share}"]
    for token, value, c, k in zip(tokens, log_probs.tolist(), clean, corrupted, strict=True):
        gap = c - k
        moved = (c - value) if noising else (value - k)
        part = format_percent(moved / gap) if gap != 0 and math.isfinite(value) else "n/a"
        lines.append(
            f"<br>{NBSP}{pad(token, width)}{pad(f'{value:.3f}', 8, align='right')}"
            f"{pad(part, 8, align='right')}"
        )
    return "".join(lines)


def score_fields(
    cell: np.ndarray,
    colour: Colour,
    result: TraceResult,
    score: float,
    normalized: float,
    predictions: Callable[[], Sequence[tuple[str, float]]],
    top_k: int,
    split: Callable[[], np.ndarray] | None = None,
) -> None:
    """Fill a hover cell's fields 3 on: score, effect, top-k header and rows.

    The score is in the metric's unit (the colour bar's when it colours by
    score), the effect in the colour bar's unit, followed, for an answer of
    several tokens, by :func:`split_text`'s line per token (``split``
    gives the cell's per-token log-probabilities). An untraced cell (NaN
    score) gets only its score field, "not traced".
    """
    if math.isnan(score):
        cell[3] = "not traced"
        return
    cell[3] = format_value(score, percent=result.metric in _PERCENT_METRICS)
    cell[4] = effect_text(colour, result, score, normalized)
    if split is not None:
        cell[4] += split_text(result, split())
    if top_k:
        verb = "patching" if result.direction == "noise" else "restoring"
        cell[5] = f"<br>top-{top_k} after {verb}"
        lines = topk_lines(predictions()[:top_k])
        cell[_N_FIXED_FIELDS : _N_FIXED_FIELDS + len(lines)] = [f"<br>{line}" for line in lines]


def _hover(
    result: TraceResult, colour: Colour, rows: Sequence[int], full: Sequence[str], top_k: int
) -> tuple[np.ndarray, str]:
    """``customdata`` ``[row, pos, field]`` and the ``hovertemplate`` that lays it out.

    Fields: token, position, restored layers, score, effect, top-k header,
    then one top-k row each. A row field starts with its own ``<br>``, so
    untraced cells (empty fields) get a short label.
    """
    start, end = result.subject_range
    scores = result.scores.detach().double().cpu().numpy()
    normalized = result.normalized().detach().double().cpu().numpy()
    data = np.full((len(rows), result.n_pos, _N_FIXED_FIELDS + top_k), "", dtype=object)
    marked = subject_text(result)[0].split()[0]  # "subject" or "tokens"
    token_log_probs = _split_log_probs(result, rows)
    for i, layer in enumerate(rows):
        lo, hi = result.window_layers(layer)
        verb = "restores" if result.direction != "noise" else "patches"
        layers = str(layer) if hi - lo == 1 else f"{layer} ({verb} {lo}–{hi - 1})"
        for pos in range(result.n_pos):
            cell = data[i, pos]
            cell[0] = full[pos]
            tag = "subject" if marked == "subject" else "differs"
            cell[1] = f"{pos}" + (f" · {tag}" if start <= pos < end else "")
            cell[2] = layers
            score_fields(
                cell,
                colour,
                result,
                float(scores[layer, pos]),
                float(normalized[layer, pos]),
                lambda layer=layer, pos=pos: result.top_predictions(layer, pos),
                top_k,
                None if token_log_probs is None else lambda i=i, pos=pos: token_log_probs[i, pos],
            )
    labels = ("token", "pos", "layer", "score", "effect")
    template = "<br>".join(
        f"{label}{NBSP * (_LABEL_WIDTH - len(label))}%{{customdata[{index}]}}"
        for index, label in enumerate(labels)
    )
    template += "".join(f"%{{customdata[{index}]}}" for index in range(len(labels), data.shape[-1]))
    return data, template + "<extra></extra>"


def _split_log_probs(result: TraceResult, rows: Sequence[int]) -> np.ndarray | None:
    """The per-token log-probabilities ``[row, ..., answer]`` of the shown rows, or None."""
    split = result.answer_split
    if not split or split.get("log_probs") is None:
        return None
    return np.asarray(split["log_probs"], dtype=np.float64)[list(rows)]


_PROVENANCE_FIELDS = (
    "model_name",
    "tokens",
    "answer",
    "foil",
    "metric",
    "direction",
    "corruption",
    "clean_score",
    "corrupted_score",
)


def _title(results: Sequence[TraceResult], names: Sequence[str], colours: Sequence[Colour]) -> str:
    """Default title: what was patched, how, on which model; the experiment; how to read colours."""
    first = results[0]
    if differing(results, _PROVENANCE_FIELDS):
        return _mismatch_title(results)
    if len(results) == 1:
        what = escape(names[0])
    elif is_counterfactual(corruption_record(first)):
        what = "Activation patching (STR), one hook point at a time"
    else:
        what = "Causal trace, one hook point at a time"
    lines = trace_subtitle(first)
    windows = sorted({r.window for r in results})
    if windows != [1]:
        lines[-1] += " · window " + ", ".join(str(w) for w in windows)
    notes = list(dict.fromkeys(c.note for c in colours))
    lines.append("; ".join(notes))
    subtitle = "<br>".join(lines)
    return (
        f"<b>{what}: {direction_phrase(first.direction)}</b> · {model_text(first)}<br>"
        f'<span style="font-size:12px">{subtitle}</span>'
    )


def _mismatch_title(results: Sequence[TraceResult]) -> str:
    fields = differing(results, _PROVENANCE_FIELDS)
    named = [f for f in fields if f not in ("clean_score", "corrupted_score")]
    shown = ", ".join(f.replace("_", " ") for f in named)
    return (
        f"<b>{len(results)} traces side by side, with settings that differ</b><br>"
        f'<span style="font-size:12px">they differ in {escape(shown or "scores")}: each panel '
        "names its own run and has its own colour scale; the settings table under the figure "
        "(save_html) lists every setting of each</span>"
    )


def _panel_name(result: TraceResult, name: str | None) -> str:
    """A panel title: the kind's readable name and its restoring window."""
    label = KIND_LABELS.get(name or result.kind, name or result.kind)
    if result.window > 1:
        label += f" (window {result.window})"
    return label


def _panel_title(result: TraceResult, base: str, fields: Sequence[str], max_chars: int = 80) -> str:
    """A panel's title: its name, and in a mismatched comparison its own run's settings.

    Each line is cut to ``max_chars`` (the panel's width at the layout width);
    the settings table of the saved page has them in full.
    """
    if not fields:
        return escape(shorten(base, max_chars))
    bits = []
    if "model_name" in fields:
        bits.append(escape(result.model_name))
    if "tokens" in fields:
        bits.append(escape(repr(shorten(result.prompt or "token ids", 30))))
    if "corruption" in fields:
        bits.append(escape(shorten(corruption_text(corruption_record(result)), 40)))
    if "direction" in fields:
        bits.append("denoising" if result.direction == "denoise" else "noising")
    answer = f"answer {escape(visible(result.answer))}"
    if result.foil is not None:
        answer += f" vs {escape(visible(result.foil))}"
    bits.append(answer)
    bits.append(
        f"{escape(result.metric)} clean {score_text(result, result.clean_score)} · "
        f"corrupted {score_text(result, result.corrupted_score)}"
    )
    lines = [" · ".join(bits[:2]), " · ".join(bits[2:])]
    # The bits are escaped already: cut on their shown text, then escape again.
    # A <sup> character is about 0.9 of a 12-pixel one: keep the lines inside the panel.
    cut = [escape(shorten(html.unescape(line), int(max_chars * 1.05))) for line in lines]
    return f"{escape(shorten(base, max_chars))}<br><sup>{cut[0]}<br>{cut[1]}</sup>"


def _page(
    fig: go.Figure,
    results: Sequence[TraceResult],
    colours: Sequence[Colour],
    names: Sequence[str],
    title: str,
) -> None:
    """Record the page title and the settings table of every panel for :func:`save_html`."""
    rows: dict[str, list[str]] = {}
    for index, (result, colour) in enumerate(zip(results, colours, strict=True)):
        for name, text in [*trace_rows(result), ("colour", plain_text(colour.note))]:
            rows.setdefault(name, ["—"] * len(results))[index] = text
    set_page_info(fig, plain_text(title, first_line=True), names, list(rows.items()))


def plain_text(title: str, *, first_line: bool = False) -> str:
    """A plotly title without its markup (its first line only, for a page's ``<title>``)."""
    if first_line:
        title = re.split(r"<br\s*/?>", title)[0]
    text = re.sub(r"<br\s*/?>", " · ", title)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


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
    """Lay out one heatmap panel per result for the layout width (arguments already checked)."""
    base_names = [
        _panel_name(r, n) for r, n in zip(results, names or [None] * len(results), strict=True)
    ]
    mismatch = differing(results, _PROVENANCE_FIELDS) if len(results) > 1 else []
    colours = [colour_of(r, value) for r in results]
    ranges = colour_ranges(colours, shared=shared_scale, zmin=zmin, zmax=zmax)
    rows = [stride_keep_last(r.n_layers, layer_stride) for r in results]
    axis_titles = [layer_axis_title(r.window) for r in results]
    own_axes = len(set(axis_titles)) > 1
    same_tokens = all(_same_tokens(results[0], r) for r in results)
    text = title if title is not None else _title(results, base_names, colours)
    frame = _frame(
        results,
        [c.grid[kept] for c, kept in zip(colours, rows, strict=True)],
        n_layers=max(len(r) for r in rows),
        width=width,
        title=text,
        panel_title_lines=3 if mismatch else 1,
        fold=same_tokens,
        bar_gap=150 if own_axes else BAR_GAP,
        axis_titles=axis_titles,
    )
    panel_titles = [
        _panel_title(r, b, mismatch, frame.panel_chars)
        for r, b in zip(results, base_names, strict=True)
    ]
    fig = frame.subplots(panel_titles)
    for index, result in enumerate(results):
        kept = rows[index]
        colour = colours[index]
        low, high, mid = ranges[index]
        columns = frame.columns_of(index)
        shown = fold_representatives(colour.grid[kept], columns)
        z = np.take_along_axis(colour.grid[kept], shown, axis=1)
        full = token_labels(result.tokens)[1]
        customdata, template = _hover(result, colour, kept, full, top_k)
        customdata = _gather(customdata, shown, columns, full)
        fig.add_trace(
            go.Heatmap(
                z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
                x=list(range(len(columns))),
                y=list(kept),
                zmin=low,
                zmax=high,
                zmid=mid,
                colorscale=colour_scale(colour, result.kind, colorscale),
                reversescale=colour.reverse,
                customdata=customdata,
                hovertemplate=template,
                hoverongaps=True,
                meta={LINKED_FIELD: 3},  # the score: linked hover writes it
                name=base_names[index],
                colorbar={
                    **frame.colorbar(fig, index),
                    "title": {"text": colour.label, "side": "right"},
                    "tickformat": colour.tickformat(),
                },
            ),
            **frame.cell(index),
        )
        frame.token_axis(fig, index, linked=same_tokens)
        _subject_box(fig, frame.subject_columns(index), frame.suffix(index))
        if own_axes or frame.cell(index)["col"] == 1:
            fig.update_yaxes(title_text=frame.axis_titles[index], **frame.cell(index))
        if own_axes and frame.cell(index)["col"] > 1:
            fig.update_yaxes(showticklabels=True, **frame.cell(index))
    _layer_axes(fig, rows, max(len(r) for r in rows), layer_order, own_axes)
    _layout(fig, frame, width, height)
    n = len(results)
    _page(fig, results, colours, [plain_text(t) for t in panel_titles] if n > 1 else [""], text)
    return fig


FOLD = "\u22ef"
"""Label prefix of a folded column: ``⋯7`` is seven tokens folded into one column."""


@dataclasses.dataclass
class _Frame:
    """A trace figure's layout at its layout width: grid, token columns, ticks and title."""

    grid: Grid
    columns: list[list[list[int]]]
    ticks: list[Ticks]
    subjects: list[tuple[int, int]]
    title: str
    title_px: int
    panel_chars: int
    n_panels: int
    axis_titles: list[str]

    def suffix(self, index: int) -> str:
        return "" if index == 0 else str(index + 1)

    def cell(self, index: int) -> dict[str, int]:
        row, col = self.grid.position(index)
        return {"row": row, "col": col}

    def columns_of(self, index: int) -> list[list[int]]:
        return self.columns[index]

    def subplots(self, panel_titles: Sequence[str]) -> go.Figure:
        g = self.grid
        fig = make_subplots(
            rows=g.rows,
            cols=g.cols,
            specs=g.specs(self.n_panels),
            subplot_titles=list(panel_titles) if self.n_panels > 1 else None,
            **g.spacing(),
        )
        # One layer axis for every panel; its tick labels on the left of each row.
        for index in range(1, self.n_panels):
            cell = self.cell(index)
            fig.update_yaxes(matches="y", showticklabels=cell["col"] == 1, **cell)
        return fig

    def colorbar(self, fig: go.Figure, index: int) -> dict[str, Any]:
        """Colour bar of panel ``index``: right of the panel, as tall as it, a pixel offset."""
        g = self.grid
        xa = fig.layout[f"xaxis{self.suffix(index)}"]
        ya = fig.layout[f"yaxis{self.suffix(index)}"]
        inner_w = g.cols * g.panel_w + (g.cols - 1) * g.hgap
        return {
            "x": xa.domain[1] + 8 / inner_w,
            "xanchor": "left",
            "y": (ya.domain[0] + ya.domain[1]) / 2,
            "yanchor": "middle",
            "len": ya.domain[1] - ya.domain[0],
            "thickness": 12,
            "xpad": 4,
            "ypad": 0,
        }

    def token_axis(self, fig: go.Figure, index: int, *, linked: bool) -> None:
        ticks = self.ticks[index]
        fig.update_xaxes(
            tickmode="array",
            tickvals=ticks.tickvals,
            ticktext=ticks.ticktext,
            tickangle=ticks.angle,
            showgrid=False,
            zeroline=False,
            ticks="",
            range=[-0.5, len(self.columns[index]) - 0.5],
            matches="x" if index > 0 and linked else None,
            **self.cell(index),
        )

    def subject_columns(self, index: int) -> tuple[int, int]:
        return self.subjects[index]


def _frame(
    results: Sequence[TraceResult],
    grids: Sequence[np.ndarray],
    *,
    n_layers: int,
    width: int | None,
    title: str,
    panel_title_lines: int,
    fold: bool,
    bar_gap: int = BAR_GAP,
    axis_titles: Sequence[str] = (),
) -> _Frame:
    """Lay out ``results`` (one panel each) for the layout width; see ``_layout``."""
    lw = layout_width(width)
    panel_h = min(600, max(160, 24 * n_layers))
    wrapped_axes = [wrap_axis_title(escape(t), panel_h) for t in axis_titles]
    left = 70 + 16 * (max((lines for _, lines in wrapped_axes), default=1) - 1)
    n = len(results)
    n_pos = max(r.n_pos for r in results)
    title_px_panel = 22 if panel_title_lines == 1 else 52
    grid = plan_grid(
        n,
        n_pos,
        n_layers,
        width=lw,
        tick_px=0,
        panel_title_px=title_px_panel,
        bar_gap=bar_gap,
        left=left,
    )
    budget = max(4, int(grid.panel_w // LABEL_PITCH))
    if fold and n_pos * MIN_COLUMN > grid.panel_w:
        first = results[0]
        keep = [*range(*first.subject_range), first.n_pos - 1]
        shared = fold_columns(n_pos, budget, importance(grids), keep)
        columns = [shared for _ in results]
    else:
        columns = [[[p] for p in range(r.n_pos)] for r in results]
    ticks, subjects = [], []
    for result, cols in zip(results, columns, strict=True):
        labels = token_labels(result.tokens, marked=range(*result.subject_range))[0]
        where = {c[0]: i for i, c in enumerate(cols)}
        text = [labels[c[0]] if len(c) == 1 else f"{FOLD}{len(c)}" for c in cols]
        start, end = result.subject_range
        subject = (where.get(start, 0), where.get(end - 1, len(cols) - 1) + 1)
        always = [*range(*subject), len(cols) - 1]
        ticks.append(token_ticks(text, grid.panel_w / len(cols), always))
        subjects.append(subject)
    tick_px = max(t.height for t in ticks)
    grid = plan_grid(
        n,
        n_pos,
        n_layers,
        width=lw,
        tick_px=tick_px,
        panel_title_px=title_px_panel,
        bar_gap=bar_gap,
        left=left,
    )
    wrapped, title_px = wrap_title(title, lw)
    grid.margin["t"] += TOOLBAR_BAND + title_px + 10
    return _Frame(
        grid=grid,
        columns=columns,
        ticks=ticks,
        subjects=subjects,
        title=wrapped,
        title_px=title_px,
        panel_chars=max(8, int(grid.panel_w / 6.5)),
        n_panels=n,
        axis_titles=[text for text, _ in wrapped_axes],
    )


def _gather(
    customdata: np.ndarray,
    shown: np.ndarray,
    columns: Sequence[Sequence[int]],
    full: Sequence[str],
) -> np.ndarray:
    """Hover fields of each shown cell; a folded column names its tokens and the one shown."""
    rows = np.arange(shown.shape[0])[:, None]
    data = customdata[rows, shown].copy()
    for c, positions in enumerate(columns):
        if len(positions) == 1:
            continue
        span = f"{len(positions)} tokens folded ({positions[0]}–{positions[-1]})"
        for i in range(shown.shape[0]):
            data[i, c, 0] = f"{full[shown[i, c]]} · {span}"
    return data


def _subject_box(fig: go.Figure, columns: tuple[int, int], axis_suffix: str) -> None:
    """A dotted box around the subject's (or the changed tokens') columns."""
    start, end = columns
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


def _layer_axes(
    fig: go.Figure,
    rows: Sequence[Sequence[int]],
    n_rows: int,
    layer_order: str,
    own_axes: bool = False,
) -> None:
    fig.update_yaxes(
        autorange="reversed" if layer_order == "top_down" else True,
        showgrid=False,
        zeroline=False,
        ticks="",
        tickmode="array" if n_rows <= 40 else "auto",
        tickvals=sorted({layer for kept in rows for layer in kept}) if n_rows <= 40 else None,
    )
    if own_axes:
        # Panels with their own layer-axis titles keep their own ranges too.
        fig.update_yaxes(matches=None)


def _layout(fig: go.Figure, frame: _Frame, width: int | None, height: int | None) -> None:
    grid = frame.grid
    fig_height = height or grid.height
    fig.update_layout(
        title=toolbar_title(frame.title, fig_height),
        **fit_width(width, max(grid.width, natural_trace_width(frame))),
        height=fig_height,
        margin=grid.margin,
        plot_bgcolor=NAN_COLOR,
        paper_bgcolor="white",
        hovermode="closest",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
    )


def natural_trace_width(frame: _Frame) -> int:
    """Width for static images: the layout width, or wider where the tokens ask for it."""
    g = frame.grid
    n_cols = max(len(c) for c in frame.columns)
    return int(g.margin["l"] + g.cols * (max(g.panel_w, 34 * n_cols) + g.hgap))


# -- difference mode ----------------------------------------------------------------------


def _runs(
    results: Mapping[str, Any] | Sequence[Any],
) -> tuple[list[str], list[dict[str, TraceResult]]]:
    """The two runs of a difference: names and ``{kind: result}`` each.

    Accepts two results, or two ``{kind: result}`` dicts (as
    :meth:`CausalTracer.trace_kinds` returns), in a list or a dict by name.
    """
    if isinstance(results, Mapping):
        names, items = [str(k) for k in results], list(results.values())
    else:
        names, items = [], list(results)
    if len(items) != 2:
        raise InvalidInput(
            f"mode='difference' and mode='sum' combine exactly two runs of one prompt; got "
            f"{len(items)}; pass two TraceResults, or two dicts from trace_kinds"
        )
    if all(isinstance(i, TraceResult) for i in items):
        if not names:
            names = [_panel_name(i, None) for i in items]
            if names[0] == names[1]:
                names = [f"run 1 ({names[0]})", f"run 2 ({names[1]})"]
        return names, [{"": i} for i in items]
    if all(isinstance(i, Mapping) for i in items):
        runs = [dict(i) for i in items]
        for run in runs:
            _check_types(list(run.values()))
        kinds = [k for k in runs[0] if k in runs[1]]
        if not kinds:
            raise InvalidInput(
                f"mode='difference' compares the kinds both runs traced; got kinds "
                f"{list(runs[0])} and {list(runs[1])}, none shared; trace the same kinds in both"
            )
        return names or ["run 1", "run 2"], [{k: r[k] for k in kinds} for r in runs]
    raise InvalidInputType(
        "mode='difference' takes two TraceResults or two {kind: TraceResult} dicts; got "
        f"{', '.join(type(i).__name__ for i in items)}; pass e.g. [result_a, result_b]"
    )


def _check_pair(a: TraceResult, b: TraceResult, what: str) -> None:
    """Raise unless ``a`` and ``b`` can be subtracted cell by cell."""
    if tuple(a.scores.shape) != tuple(b.scores.shape) or not _same_tokens(a, b):
        raise InvalidInput(
            f"mode='difference' subtracts two traces of one prompt cell by cell, so they need "
            f"the same tokens and grid shape; {what} got {tuple(a.scores.shape)} over "
            f"{list(a.tokens)!r} vs {tuple(b.scores.shape)} over {list(b.tokens)!r}; trace "
            "both on the same prompt and layers, or compare them with mode='side_by_side'"
        )
    if a.metric != b.metric:
        raise InvalidInput(
            f"mode='difference' needs one metric in both traces; {what} got {a.metric!r} vs "
            f"{b.metric!r}; trace both with the same metric"
        )


def _plot_combined(
    names: Sequence[str],
    runs: Sequence[dict[str, TraceResult]],
    *,
    mode: str,
    value: str,
    layer_stride: int,
    layer_order: str,
    title: str | None,
    width: int | None,
    height: int | None,
    colorscale: Any,
    zmin: float | int | None,
    zmax: float | int | None,
) -> go.Figure:
    """One diverging heatmap per kind: run A − run B (or A + B), zero at the centre."""
    kinds = list(runs[0])
    pairs = [(runs[0][k], runs[1][k]) for k in kinds]
    for kind, (a, b) in zip(kinds, pairs, strict=True):
        _check_pair(a, b, f"kind {kind!r}" if kind else "the two results")
    sign = -1.0 if mode == "difference" else 1.0
    op = "−" if mode == "difference" else "+"
    grids = [_values(a, value) + sign * _values(b, value) for a, b in pairs]
    low, high = symmetric_range(grids)
    mid: float | None = 0.0
    if zmin is not None or zmax is not None:
        low = low if zmin is None else float(zmin)
        high = high if zmax is None else float(zmax)
        mid = None
    first = pairs[0][0]
    what = {"score": _metric_label(first), "indirect_effect": "effect", "normalized": "recovered"}
    percent = value == "normalized" or first.metric in _PERCENT_METRICS
    rows = stride_keep_last(first.n_layers, layer_stride)
    full = token_labels(first.tokens)[1]
    panel_names = [_panel_name(a, k or None) for k, (a, _) in zip(kinds, pairs, strict=True)]
    if title is None:
        title = _combined_title(names, pairs, mode, what[value])
    frame = _frame(
        [a for a, _ in pairs],
        [grid[rows] for grid in grids],
        n_layers=len(rows),
        width=width,
        title=title,
        panel_title_lines=1,
        fold=True,
        axis_titles=[layer_axis_title(first.window)],
    )
    fig = frame.subplots([escape(shorten(p, frame.panel_chars)) for p in panel_names])
    for index, ((a, b), grid) in enumerate(zip(pairs, grids, strict=True)):
        scale = colorscale
        if scale is None:
            scale = (
                two_colour_scale(b.kind, a.kind)
                if mode == "difference" and a.kind != b.kind
                else KIND_DIVERGING.get(a.kind, DEFAULT_DIVERGING)
                if mode == "sum"
                else DEFAULT_DIVERGING
            )
        va, vb = _values(a, value)[rows], _values(b, value)[rows]
        data = np.empty((len(rows), a.n_pos, 6), dtype=object)
        for i, layer in enumerate(rows):
            for pos in range(a.n_pos):
                data[i, pos] = [
                    full[pos],
                    str(pos),
                    str(layer),
                    format_value(va[i, pos], percent=percent),
                    format_value(vb[i, pos], percent=percent),
                    format_value(grid[layer, pos], percent=percent, signed=True),
                ]
        labels = ("token", "pos", "layer", shorten(names[0], 12), shorten(names[1], 12), op)
        width_ = max(len(label) for label in labels) + 1
        template = "<br>".join(
            f"{escape(label)}{NBSP * (width_ - len(label))}%{{customdata[{i}]}}"
            for i, label in enumerate(labels)
        )
        bar_title = f"{escape(shorten(names[0], 14))}<br>{op} {escape(shorten(names[1], 14))}"
        columns = frame.columns_of(index)
        shown = fold_representatives(grid[rows], columns)
        z = np.take_along_axis(grid[rows], shown, axis=1)
        data = _gather(data, shown, columns, full)
        fig.add_trace(
            go.Heatmap(
                z=[[None if math.isnan(v) else v for v in row] for row in z.tolist()],
                x=list(range(len(columns))),
                y=list(rows),
                zmin=low,
                zmax=high,
                zmid=mid,
                colorscale=scale,
                customdata=data,
                hovertemplate=template + "<extra></extra>",
                hoverongaps=True,
                meta={LINKED_FIELD: 5},  # A − B (or A + B), signed
                name=panel_names[index],
                colorbar={
                    **frame.colorbar(fig, index),
                    "title": {"text": bar_title, "side": "right"},
                    "tickformat": "+.2~p" if percent else None,
                },
            ),
            **frame.cell(index),
        )
        frame.token_axis(fig, index, linked=True)
        _subject_box(fig, frame.subject_columns(index), frame.suffix(index))
        if frame.cell(index)["col"] == 1:
            fig.update_yaxes(title_text=frame.axis_titles[0], **frame.cell(index))
    _layer_axes(fig, [rows], len(rows), layer_order)
    _layout(fig, frame, width, height)
    rows_a = [row for a, _ in pairs[:1] for row in trace_rows(a)]
    rows_b = dict(trace_rows(pairs[0][1]))
    table = [(name, [text, rows_b.get(name, "—")]) for name, text in rows_a]
    table += [(name, ["—", text]) for name, text in rows_b.items() if name not in dict(rows_a)]
    set_page_info(fig, plain_text(title, first_line=True), list(names), table)
    return fig


def _combined_title(
    names: Sequence[str], pairs: Sequence[tuple[TraceResult, TraceResult]], mode: str, what: str
) -> str:
    a, b = pairs[0]
    op = "minus" if mode == "difference" else "plus"
    lines = [
        f"A = {escape(names[0])}: {escape(direction_phrase(a.direction))}; "
        f"{escape(corruption_text(corruption_record(a)))}",
        f"B = {escape(names[1])}: {escape(direction_phrase(b.direction))}; "
        f"{escape(corruption_text(corruption_record(b)))}",
        trace_subtitle(a)[0],
        f"colour: A {'−' if mode == 'difference' else '+'} B, white at 0"
        + (
            f", {escape(KIND_LABELS.get(a.kind, a.kind))} colour where A is larger"
            if mode == "difference" and a.kind != b.kind
            else ", red where A is larger, blue where B is"
            if mode == "difference"
            else ""
        ),
    ]
    return (
        f"<b>{what} of {escape(names[0])} {op} {escape(names[1])}</b> · "
        f"{model_text(a)}<br>"
        f'<span style="font-size:12px">{"<br>".join(lines)}</span>'
    )
