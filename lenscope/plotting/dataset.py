"""Plotly views of dataset-level causal tracing: ROME's Figure 2 and a report page.

Draws a :class:`~lenscope.datasets.DatasetSummary` the way ROME (Meng et al.,
2022, arXiv 2202.05262, Figure 2) summarises causal tracing over ~1000
known facts: one panel per hook-point kind, token buckets (first subject
token ... last token) against layers, colour the average indirect effect
(AIE) on that kind's diverging scale (residual stream purple, MLP green,
attention red above zero; white at zero; one symmetric range shared by
every panel, since an AIE can be negative). ``style="lines"`` draws the same
numbers as one line per bucket with its 95% confidence band, which shows how
much the averages can be trusted. The subtitle names the corruption from
the summary's own record (noise std, samples and seed for noise; the
counterfactual column for symmetric token replacement), the direction and
the metric. A noising trace (corrupted activations patched into the clean
run) is drawn as each cell's average drop below the clean score, the
fact's clean − corrupted gap minus its indirect effect, so that a cell
that matters takes the kind's colour in both directions.
:func:`save_dataset_report` writes an HTML page with both figures, the
summary table, the settings and the skipped facts (plotly.js embedded by
default, so it works offline). Computation stays in the summary object;
this module only draws it.
"""

import functools
import html
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.datasets import BUCKET_LABELS, BUCKETS, DatasetSummary, mean_ci
from lenscope.plotting._common import (
    DEFAULT_DIVERGING,
    HOVER_FONT,
    KIND_DIVERGING,
    KIND_LABELS,
    LINKED_FIELD,
    PAGE_CONFIG,
    PLOTLY_JS,
    check_choice,
    check_positive_int,
    fit_width,
    format_percent,
    html_page,
    plotly_js_source,
    set_page_info,
    symmetric_range,
)
from lenscope.plotting._layout import (
    BAR_GAP,
    TOOLBAR_BAND,
    layout_width,
    plan_grid,
    toolbar_title,
    wrap_title,
)
from lenscope.plotting._provenance import (
    corruption_rows,
    corruption_text,
    direction_phrase,
    layer_axis_title,
    model_label,
    model_rows,
    model_text,
)
from lenscope.validation import InvalidInputType

STYLES = ("heatmap", "lines")
"""How :func:`plot_dataset` draws the AIE: ROME's bucket x layer heatmaps, or lines with CIs."""

BUCKET_COLORS = {
    "first_subject": "#9ecae1",
    "middle_subject": "#4292c6",
    "last_subject": "#08306b",
    "first_subsequent": "#fdae6b",
    "further": "#e6550d",
    "last": "#7f2704",
}
"""Line colour of each bucket: blues for subject tokens, oranges for the tokens after it."""


def plot_dataset(
    summary: DatasetSummary,
    *,
    style: str = "heatmap",
    kinds: Any = None,
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """ROME Figure-2 style view of the average indirect effects, one panel per kind.

    Args:
        summary: The dataset summary.
        style: ``"heatmap"`` (buckets x layers, as in ROME's Figure 2) or
            ``"lines"`` (AIE against layer, one line per bucket, 95% CI band).
        kinds: Kinds to show, in order; default every traced kind.
        title: Figure title; default names the model, fact count and ATE.
        width: Figure width in pixels; by default the figure fills the width
            of the notebook cell or page (static images get a width that
            grows with the number of layers).
        height: Figure height in pixels.

    Returns:
        A plotly figure (never shown; call ``.show()`` or save it).

    Raises:
        TypeError: ``summary`` is not a DatasetSummary.
        ValueError: an unknown style or kind.
    """
    if not isinstance(summary, DatasetSummary):
        raise InvalidInputType(
            f"plot_dataset expects a DatasetSummary; got {type(summary).__name__}; "
            "pass the result of lenscope.datasets.trace_dataset"
        )
    check_choice("style", style, STYLES)
    check_positive_int("width", width, allow_none=True)
    check_positive_int("height", height, allow_none=True)
    if kinds is None:
        kinds = summary.kinds
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    for kind in kinds:
        check_choice("kind", kind, summary.kinds)
    n = len(kinds)
    heatmap = style == "heatmap"
    lw = layout_width(width)
    # Laid out for the width it is seen at (see lenscope.plotting._layout): panels side by
    # side while each keeps MIN_PANEL pixels (and a colour bar's gap), else in rows.
    grid = plan_grid(
        n,
        summary.n_layers,
        len(BUCKETS) if heatmap else 1,
        width=lw,
        tick_px=20 + 22,  # layer numbers and the layer-axis title
        panel_title_px=22,
        left=150 if heatmap else 70,
        bar_gap=BAR_GAP if heatmap else 60,
        row_px=30 if heatmap else 280,
    )
    text = title if title is not None else _title(summary)
    wrapped, title_px = wrap_title(text, lw)
    margin = dict(grid.margin)
    margin["t"] += TOOLBAR_BAND + title_px + 10
    legend_px = 0
    if not heatmap:
        # The legend under the panels, wrapped to the width: nothing beside them takes room.
        item_px = 7 * max(len(label) for label in BUCKET_LABELS.values()) + 40
        legend_px = 24 * math.ceil(len(BUCKETS) / max(1, (lw - 20) // item_px)) + 24
        margin["b"] += legend_px
    fig = make_subplots(
        rows=grid.rows,
        cols=grid.cols,
        specs=grid.specs(n),
        # One metric in every panel: one y range (lines), one bucket axis (heatmaps).
        shared_yaxes="all",
        subplot_titles=[_panel_title(summary, kind) for kind in kinds],
        **grid.spacing(),
    )
    stats = [mean_ci(_effects(summary, kind)) for kind in kinds]
    # Every panel shows the AIE of one metric: one symmetric range, white at zero.
    span = symmetric_range([mean.numpy() for mean, _, _ in stats])
    percent = _percent(summary)
    inner_w = grid.cols * grid.panel_w + (grid.cols - 1) * grid.hgap
    for index, (kind, (mean, half, count)) in enumerate(zip(kinds, stats, strict=True)):
        row, col = grid.position(index)
        if heatmap:
            _add_heatmap(fig, summary, kind, mean, half, count, (row, col), 8 / inner_w, span)
        else:
            _add_lines(fig, summary, kind, mean, half, count, (row, col), legend=index == 0)
        fig.update_xaxes(
            title_text=layer_axis_title(summary.windows[kind]), title_standoff=4, row=row, col=col
        )
    # Whole layers only, thinned to keep about 28 pixels per label.
    fig.update_xaxes(
        showgrid=not heatmap,
        zeroline=False,
        tickmode="linear",
        tick0=0,
        dtick=max(1, math.ceil(summary.n_layers * 28 / grid.panel_w)),
    )
    if heatmap:
        fig.update_yaxes(
            tickmode="array",
            tickvals=list(range(len(BUCKETS))),
            ticktext=[BUCKET_LABELS[b] for b in BUCKETS],
            autorange="reversed",
            showgrid=False,
            zeroline=False,
            ticks="",
        )
    else:
        fig.update_yaxes(
            tickformat=".2~p" if percent else None, zeroline=True, zerolinecolor="#999999"
        )
        for index in range(n):
            row, col = grid.position(index)
            if col == 1:
                fig.update_yaxes(title_text=_quantity(summary)[1], row=row, col=col)
    fig_height = height or grid.height + legend_px + TOOLBAR_BAND + title_px + 10
    fig.update_layout(
        title=toolbar_title(wrapped, fig_height),
        **fit_width(width, max(lw, natural_dataset_width(summary, n, heatmap))),
        height=fig_height,
        margin=margin,
        hoverlabel={"font": HOVER_FONT, "align": "left"},
        plot_bgcolor="white" if not heatmap else "#e6e6e6",
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
        legend={
            "title": {"text": "token bucket"},
            "orientation": "h",
            "x": 0,
            "xanchor": "left",
            "y": 0,
            "yanchor": "bottom",
            "yref": "container",
        },
    )
    heading = (
        f"{_quantity(summary)[1].capitalize()}, {direction_phrase(summary.direction)}: "
        f"{model_label(summary)}, {summary.n_facts} facts"
    )
    set_page_info(fig, heading, [""], [(k, [v]) for k, v in _settings_rows(summary)])
    return fig


def natural_dataset_width(summary: DatasetSummary, n: int, heatmap: bool) -> int:
    """Width for static images: every panel side by side, 22 pixels per layer."""
    per_panel = max(260, min(520, 22 * summary.n_layers + 60))
    return 90 + n * (per_panel + (BAR_GAP if heatmap else 60)) + (150 if heatmap else 0)


def _effects(summary: DatasetSummary, kind: str) -> Any:
    """``[fact, bucket, layer]`` values drawn: indirect effects, or a noising trace's drops.

    Denoising: the summary's indirect effects (score − corrupted). Noising:
    the drop below the clean score, (clean − corrupted) − (score − corrupted)
    per fact, so that large means "patching this cell breaks the answer" in
    both directions.
    """
    effects = summary.effects(kind)
    if summary.direction != "noise":
        return effects
    gap = summary.clean_scores - summary.corrupted_scores
    return gap[:, None, None] - effects


def _quantity(summary: DatasetSummary) -> tuple[str, str]:
    """Short and long name of what the colour shows: ``("AIE", "average indirect effect")``."""
    if summary.direction == "noise":
        return "drop", "average drop below clean"
    return "AIE", "average indirect effect"


def _percent(summary: DatasetSummary) -> bool:
    """Whether the summary's metric reads in percent (a probability or a normalised metric)."""
    return summary.metric in ("prob", "normalized_logit_diff")


def _record(summary: DatasetSummary) -> dict[str, Any]:
    return dict(summary.corruption)


def _settings_rows(summary: DatasetSummary) -> list[tuple[str, str]]:
    """Every setting of the dataset trace, from the summary's own record."""
    rows = [
        *model_rows(summary),
        (
            "facts",
            f"{summary.n_facts} traced, {summary.n_skipped} skipped, "
            f"{summary.n_pending} not reached",
        ),
        ("metric", summary.metric),
        *_raw_rows(summary),
        ("direction", f"{summary.direction}: {direction_phrase(summary.direction)}"),
        ("kinds", ", ".join(summary.kinds)),
        ("windows", ", ".join(f"{k} {w}" for k, w in summary.windows.items())),
        *corruption_rows(_record(summary)),
        ("lenscope", summary.lenscope_version),
    ]
    return rows


def _raw_rows(summary: DatasetSummary) -> list[tuple[str, str]]:
    """The raw clean and corrupted means of a normalised metric, as a settings row."""
    raw = summary.raw_means()
    if raw is None:
        return []
    (clean, clean_ci), (corrupted, corrupted_ci) = raw
    return [
        (
            "raw values",
            f"clean {clean:.4g} \u00b1 {clean_ci:.2g}, corrupted {corrupted:.4g} "
            f"\u00b1 {corrupted_ci:.2g} (means over facts, 95% CI)",
        )
    ]


def _panel_title(summary: DatasetSummary, kind: str) -> str:
    window = summary.windows[kind]
    restored = "" if window == 1 else f" (window {window})"
    return f"{KIND_LABELS.get(kind, kind)}{restored}"


def _title(summary: DatasetSummary) -> str:
    clean, _ = summary.clean_mean()
    corrupted, _ = summary.corrupted_mean()
    ate, ate_ci = summary.ate()
    skipped = f", {summary.n_skipped} skipped" if summary.n_skipped else ""
    value = functools.partial(_format, percent=_percent(summary))
    short, long = _quantity(summary)
    metric = html.escape(summary.metric)
    if summary.metric.startswith("normalized"):
        # Normalised per fact: clean 1 and corrupted 0 by definition, not a finding;
        # the raw values they were normalised from are.
        scores = f"{metric} (each fact's clean run = 100%, corrupted run = 0%)"
        raw = summary.raw_means()
        if raw is not None:
            (clean_raw, clean_ci), (corrupted_raw, corrupted_ci) = raw
            what = "logit difference" if "logit_diff" in summary.metric else "raw value"
            scores += (
                f"<br>{what}: clean {clean_raw:.3g} \u00b1 {clean_ci:.2g}, "
                f"corrupted {corrupted_raw:.3g} \u00b1 {corrupted_ci:.2g} "
                "(means over facts, 95% CI)"
            )
    else:
        scores = (
            f"{metric}: clean {value(clean)}, corrupted {value(corrupted)}, "
            f"ATE {value(ate)} \u00b1 {value(ate_ci)} (95% CI)"
        )
    colour = "colour: AIE, white at 0"
    if summary.direction == "noise":
        colour = (
            "colour: drop below clean = clean − corrupted − AIE, white at 0 "
            "(the kind's colour: patching the cell breaks the answer)"
        )
    lines = [scores, html.escape(corruption_text(_record(summary))), colour]
    return (
        f"<b>{long.capitalize()}, {html.escape(direction_phrase(summary.direction))}</b> · "
        f"{model_text(summary)}, {summary.n_facts} facts{skipped}<br>"
        f'<span style="font-size:12px">{"<br>".join(lines)}</span>'
    )


def _format(value: float, *, percent: bool, signed: bool = False) -> str:
    if percent or not math.isfinite(value):
        return format_percent(value, signed=signed)
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def _cells(
    mean: Any, half: Any, count: Any, percent: bool
) -> tuple[list[list[float | None]], list[list[list[Any]]]]:
    z = [[None if math.isnan(v) else v for v in row] for row in mean.tolist()]
    customdata = [
        [
            [
                BUCKET_LABELS[bucket],
                layer,
                _format(float(mean[b, layer]), percent=percent, signed=True),
                _format(float(half[b, layer]), percent=percent),
                int(count[b, layer]),
            ]
            for layer in range(mean.shape[1])
        ]
        for b, bucket in enumerate(BUCKETS)
    ]
    return z, customdata


def _hover(summary: DatasetSummary) -> str:
    """Hover template of a cell: bucket, layer, the drawn mean with its CI, fact count."""
    return (
        "%{customdata[0]}<br>layer %{customdata[1]}<br>"
        f"{_quantity(summary)[0]} %{{customdata[2]}} \u00b1 %{{customdata[3]}} (95% CI)<br>"
        "facts %{customdata[4]}<extra>%{fullData.name}</extra>"
    )


def _add_heatmap(
    fig: go.Figure,
    summary: DatasetSummary,
    kind: str,
    mean: Any,
    half: Any,
    count: Any,
    cell: tuple[int, int],
    offset: float,
    span: tuple[float, float],
) -> None:
    """Panel ``cell``: the AIE heatmap, its colour bar ``offset`` (width fraction) to the right."""
    percent = _percent(summary)
    z, customdata = _cells(mean, half, count, percent)
    low, high = span
    row, col = cell
    axes = fig.get_subplot(row, col)
    y_domain = axes.yaxis.domain
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(summary.n_layers)),
            y=list(range(len(BUCKETS))),
            zmin=low,
            zmax=high,
            zmid=0.0,
            colorscale=KIND_DIVERGING.get(kind, DEFAULT_DIVERGING),
            customdata=customdata,
            hovertemplate=_hover(summary),
            hoverongaps=False,
            meta={LINKED_FIELD: 2},  # the mean, as the hover writes it
            name=KIND_LABELS.get(kind, kind),
            colorbar={
                "title": {"text": _quantity(summary)[0], "side": "right"},
                "x": axes.xaxis.domain[1] + offset,
                "xanchor": "left",
                "y": (y_domain[0] + y_domain[1]) / 2,
                "yanchor": "middle",
                "thickness": 12,
                "xpad": 4,
                "ypad": 0,
                "len": y_domain[1] - y_domain[0],
                # Two significant digits: a range of a few tenths of a percent keeps
                # distinct tick labels (".1%" printed -0.0% three times).
                "tickformat": "+.2~p" if percent else None,
            },
        ),
        row=row,
        col=col,
    )


def _add_lines(
    fig: go.Figure,
    summary: DatasetSummary,
    kind: str,
    mean: Any,
    half: Any,
    count: Any,
    cell: tuple[int, int],
    *,
    legend: bool,
) -> None:
    layers = list(range(summary.n_layers))
    _, customdata = _cells(mean, half, count, _percent(summary))
    for b, bucket in enumerate(BUCKETS):
        if int(count[b].max()) == 0:
            continue
        color = BUCKET_COLORS[bucket]
        values = mean[b].tolist()
        spread = [0.0 if math.isnan(h) else h for h in half[b].tolist()]
        upper = [v + h for v, h in zip(values, spread, strict=True)]
        lower = [v - h for v, h in zip(values, spread, strict=True)]
        fig.add_trace(
            go.Scatter(
                x=layers + layers[::-1],
                y=upper + lower[::-1],
                fill="toself",
                mode="lines",
                fillcolor=_rgba(color, 0.18),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=bucket,
            ),
            row=cell[0],
            col=cell[1],
        )
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=values,
                mode="lines+markers",
                line={"color": color, "width": 2},
                marker={"size": 4},
                name=BUCKET_LABELS[bucket],
                legendgroup=bucket,
                showlegend=legend,
                customdata=customdata[b],
                hovertemplate=_hover(summary),
            ),
            row=cell[0],
            col=cell[1],
        )


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def save_dataset_report(
    summary: DatasetSummary,
    path: str | Path,
    *,
    title: str | None = None,
    plotly_js: str = "inline",
) -> Path:
    """Write an HTML report of a dataset trace.

    The page holds the ROME Figure-2 heatmaps, the same AIE as lines with
    95% CI bands, the per-kind table (:meth:`DatasetSummary.table`), the
    settings, and the skipped facts with their reasons. By default plotly.js
    is embedded once, so the file opens without a network.

    Args:
        summary: The dataset summary.
        path: Where to write; parent folders are created.
        title: Page heading; default names the model.
        plotly_js: ``"inline"`` (default), ``"file"`` (a sibling
            ``plotly-<version>.min.js``) or ``"cdn"``; see
            :func:`~lenscope.plotting.save_html`.

    Returns:
        The path written.
    """
    if not isinstance(summary, DatasetSummary):
        raise InvalidInputType(
            f"save_dataset_report expects a DatasetSummary; got {type(summary).__name__}; "
            "pass the result of lenscope.datasets.trace_dataset"
        )
    check_choice("plotly_js", plotly_js, PLOTLY_JS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heading = title or f"Causal tracing over known facts: {model_label(summary)}"
    figures = [
        plot_dataset(summary, style="heatmap").to_html(
            full_html=False,
            include_plotlyjs=plotly_js_source(plotly_js, path.parent),
            include_mathjax=False,
            config=PAGE_CONFIG,
        ),
        plot_dataset(summary, style="lines").to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            config=PAGE_CONFIG,
        ),
    ]
    table = summary.table()
    percent = _percent(summary)
    for column in ("clean", "corrupted", "ate", "ate_ci", "best_aie", "best_aie_ci"):
        table[column] = table[column].map(functools.partial(_format, percent=percent))
    settings = {k: v for k, v in summary.settings().items() if k != "format"}
    settings.setdefault("direction", summary.direction)
    settings["n_pending"] = summary.n_pending
    settings["trace seconds (sum over facts)"] = round(summary.seconds, 1)
    settings_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in settings.items()
    )
    skipped = summary.skipped_dataframe()
    skipped_html = (
        skipped.to_html(index=False, escape=True) if len(skipped) else "<p>No fact was skipped.</p>"
    )
    body = f"""<h1>{html.escape(heading)}</h1>
{figures[0]}
{figures[1]}
<h2>Summary</h2>{table.to_html(index=False, escape=True)}
<h2>Settings</h2><table>{settings_rows}</table>
<h2>Skipped facts ({summary.n_skipped})</h2>{skipped_html}"""
    path.write_text(html_page(heading, body), encoding="utf-8")
    return path
