"""Plotly views of dataset-level causal tracing: ROME's Figure 2 and a report page.

Draws a :class:`~lenscope.datasets.DatasetSummary` the way ROME (Meng et al.,
2022, arXiv 2202.05262, Figure 2) summarises causal tracing over ~1000
known facts: one panel per hook-point kind, token buckets (first subject
token ... last token) against layers, colour the average indirect effect
(AIE) on that kind's scale (residual stream purple, MLP green, attention
red). ``style="lines"`` draws the same numbers as one line per bucket with
its 95% confidence band, which shows how much the averages can be trusted.
:func:`save_dataset_report` writes a self-contained offline HTML page with
both figures, the summary table, the settings and the skipped facts.
Computation stays in the summary object; this module only draws it.
"""

import html
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.datasets import BUCKET_LABELS, BUCKETS, DatasetSummary, mean_ci
from lenscope.plotting._common import (
    HOVER_FONT,
    KIND_COLORSCALES,
    KIND_LABELS,
    PAGE_CONFIG,
    check_choice,
    check_positive_int,
    fit_width,
    format_percent,
    width_fraction,
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
    per_panel = max(260, min(520, 22 * summary.n_layers + 60))
    default_width = (
        90
        + n * (per_panel + (110 if style == "heatmap" else 30))
        + (170 if style == "heatmap" else 200)
    )
    default_height = 430 if style == "heatmap" else 460
    margin = {
        "l": 150 if style == "heatmap" else 70,
        "r": 60 if style == "heatmap" else 20,
        "t": 90,
        "b": 60,
    }
    margins = margin["l"] + margin["r"]
    # Pixels between panels: a colour bar, or the next panel's y tick labels.
    gap = 110 if style == "heatmap" else 60
    fig = make_subplots(
        rows=1,
        cols=n,
        shared_yaxes=style == "heatmap",
        horizontal_spacing=width_fraction(gap, default_width - margins, margins) if n > 1 else 0.0,
        subplot_titles=[_panel_title(summary, kind) for kind in kinds],
    )
    for col, kind in enumerate(kinds, start=1):
        mean, half, count = mean_ci(summary.effects(kind))
        if style == "heatmap":
            offset = width_fraction(4, default_width - margins, margins)
            _add_heatmap(fig, summary, kind, mean, half, count, col, offset)
        else:
            _add_lines(fig, summary, kind, mean, half, count, col, legend=col == 1)
    layer_title = "layer" if style == "heatmap" else "layer (centre of restored window)"
    fig.update_xaxes(title_text=layer_title, showgrid=style == "lines", zeroline=False)
    if style == "heatmap":
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
        fig.update_yaxes(tickformat=".1%", zeroline=True, zerolinecolor="#999999")
        fig.update_yaxes(title_text="average indirect effect", row=1, col=1)
    fig.update_layout(
        title={
            "text": title if title is not None else _title(summary),
            "x": 0.01,
            "xanchor": "left",
        },
        **fit_width(width, default_width),
        height=height or default_height,
        margin=margin,
        hoverlabel={"font": HOVER_FONT, "align": "left"},
        plot_bgcolor="white" if style == "lines" else "#e6e6e6",
        legend={"title": {"text": "token bucket"}},
    )
    return fig


def _panel_title(summary: DatasetSummary, kind: str) -> str:
    window = summary.windows[kind]
    restored = "" if window == 1 else f" (window {window})"
    return f"{KIND_LABELS.get(kind, kind)}{restored}"


def _title(summary: DatasetSummary) -> str:
    clean, _ = summary.clean_mean()
    corrupted, _ = summary.corrupted_mean()
    ate, ate_ci = summary.ate()
    skipped = f", {summary.n_skipped} skipped" if summary.n_skipped else ""
    return (
        f"Average indirect effect: {html.escape(summary.model_name)}, "
        f"{summary.n_facts} facts{skipped}<br><sup>clean {format_percent(clean)}, corrupted "
        f"{format_percent(corrupted)}, ATE {format_percent(ate)} \u00b1 {format_percent(ate_ci)}"
        f" (95% CI); {summary.samples} noise samples, noise std {summary.noise_std:.3g}</sup>"
    )


def _cells(
    mean: Any, half: Any, count: Any
) -> tuple[list[list[float | None]], list[list[list[Any]]]]:
    z = [[None if math.isnan(v) else v for v in row] for row in mean.tolist()]
    customdata = [
        [
            [
                BUCKET_LABELS[bucket],
                layer,
                format_percent(float(mean[b, layer]), signed=True),
                format_percent(float(half[b, layer])),
                int(count[b, layer]),
            ]
            for layer in range(mean.shape[1])
        ]
        for b, bucket in enumerate(BUCKETS)
    ]
    return z, customdata


_HOVER = (
    "%{customdata[0]}<br>layer %{customdata[1]}<br>"
    "AIE %{customdata[2]} \u00b1 %{customdata[3]} (95% CI)<br>"
    "facts %{customdata[4]}<extra>%{fullData.name}</extra>"
)


def _add_heatmap(
    fig: go.Figure,
    summary: DatasetSummary,
    kind: str,
    mean: Any,
    half: Any,
    count: Any,
    col: int,
    offset: float,
) -> None:
    """Panel ``col``: the AIE heatmap, its colour bar ``offset`` (a width fraction) to the right."""
    z, customdata = _cells(mean, half, count)
    finite = [v for row in z for v in row if v is not None]
    low = min([0.0, *finite])
    high = max([*finite, low + 1e-6])
    suffix = "" if col == 1 else str(col)
    domain_end = fig.layout[f"xaxis{suffix}"].domain[1]
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(summary.n_layers)),
            y=list(range(len(BUCKETS))),
            zmin=low,
            zmax=high,
            colorscale=KIND_COLORSCALES.get(kind, "Greys"),
            customdata=customdata,
            hovertemplate=_HOVER,
            hoverongaps=False,
            name=KIND_LABELS.get(kind, kind),
            colorbar={
                "title": {"text": "AIE", "side": "right"},
                "x": domain_end + offset,
                "xanchor": "left",
                "thickness": 12,
                "xpad": 4,
                "len": 1.0,
                "tickformat": ".1%",
            },
        ),
        row=1,
        col=col,
    )


def _add_lines(
    fig: go.Figure,
    summary: DatasetSummary,
    kind: str,
    mean: Any,
    half: Any,
    count: Any,
    col: int,
    *,
    legend: bool,
) -> None:
    layers = list(range(summary.n_layers))
    _, customdata = _cells(mean, half, count)
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
            row=1,
            col=col,
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
                hovertemplate=_HOVER,
            ),
            row=1,
            col=col,
        )


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def save_dataset_report(
    summary: DatasetSummary, path: str | Path, *, title: str | None = None
) -> Path:
    """Write a self-contained offline HTML report of a dataset trace.

    The page holds the ROME Figure-2 heatmaps, the same AIE as lines with
    95% CI bands, the per-kind table (:meth:`DatasetSummary.table`), the
    settings, and the skipped facts with their reasons. plotly.js is
    embedded once, so the file opens without a network.

    Args:
        summary: The dataset summary.
        path: Where to write; parent folders are created.
        title: Page heading; default names the model.

    Returns:
        The path written.
    """
    if not isinstance(summary, DatasetSummary):
        raise InvalidInputType(
            f"save_dataset_report expects a DatasetSummary; got {type(summary).__name__}; "
            "pass the result of lenscope.datasets.trace_dataset"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heading = title or f"Causal tracing over known facts: {summary.model_name}"
    figures = [
        plot_dataset(summary, style="heatmap").to_html(
            full_html=False,
            include_plotlyjs=True,
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
    for column in ("clean", "corrupted", "ate", "ate_ci", "best_aie", "best_aie_ci"):
        table[column] = table[column].map(format_percent)
    settings = {k: v for k, v in summary.settings().items() if k != "format"}
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
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>body{{font-family:sans-serif;margin:24px;}} table{{border-collapse:collapse;}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;}}</style></head>
<body><h1>{html.escape(heading)}</h1>
{figures[0]}
{figures[1]}
<h2>Summary</h2>{table.to_html(index=False, escape=True)}
<h2>Settings</h2><table>{settings_rows}</table>
<h2>Skipped facts ({summary.n_skipped})</h2>{skipped_html}
</body></html>
"""
    path.write_text(page)
    return path
