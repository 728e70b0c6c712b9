"""Attention patterns of chosen heads as heatmaps: clean beside corrupted, one row per head.

Draws :class:`~lenscope.attention.AttentionPatterns`: destination tokens
down, source tokens across, the post-softmax weight as colour (0 to 1, the
same scale in every panel), the corrupted run (averaged over its noised
copies) beside the clean one, and the hover naming both tokens and both
weights. :func:`plot_attention` computes the patterns and draws them in
one call.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from lenscope.attention import AttentionPatterns, attention_patterns
from lenscope.corruptions import Corruption
from lenscope.plotting._common import (
    HOVER_FONT,
    escape,
    figure_margins,
    fit_width,
    set_page_info,
    shorten,
    token_labels,
    visible,
)
from lenscope.plotting._layout import TOOLBAR_BAND, layout_width, wrap_title
from lenscope.plotting._provenance import model_label, model_rows, model_text
from lenscope.results import corruption_rows, corruption_text
from lenscope.validation import InvalidInputType


def plot_attention(
    model: Any,
    prompt: str | Tensor | Sequence[int] | None = None,
    *,
    layer: int | None = None,
    heads: int | Sequence[int] | None = None,
    subject: str | tuple[int, int] | None = None,
    corruption: Corruption | None = None,
    title: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Heatmaps of the attention patterns of ``heads`` at ``layer``, clean and corrupted.

    Example:
        >>> lenscope.plot_attention(model, prompt, layer=5, heads=[0, 3],
        ...                         subject="The Eiffel Tower")  # doctest: +SKIP

    Args:
        model: A HookedTransformer or TransformerBridge, or
            :class:`~lenscope.attention.AttentionPatterns` already computed
            (then pass nothing else but the layout options).
        prompt: Text, or 1-D token ids.
        layer: The layer (negative counts back).
        heads: A head, a list of heads, or None for all.
        subject: The subject to corrupt; None draws the clean patterns only.
        corruption: How to corrupt it (default ROME's Gaussian noise).
        title: Figure title.
        width: Pixels; default fills the container.
        height: Pixels; default grows with the heads and tokens.

    Returns:
        The plotly figure (never shown).
    """
    if isinstance(model, AttentionPatterns):
        patterns = model
    else:
        if prompt is None or layer is None:
            raise InvalidInputType(
                "plot_attention needs a model, a prompt and a layer (or AttentionPatterns); "
                "pass e.g. plot_attention(model, prompt, layer=5, heads=[0, 3])"
            )
        patterns = attention_patterns(
            model, prompt, layer=layer, heads=heads, subject=subject, corruption=corruption
        )
    return _plot(patterns, title=title, width=width, height=height)


def _plot(
    patterns: AttentionPatterns, *, title: str | None, width: int | None, height: int | None
) -> go.Figure:
    runs = [("clean", patterns.clean)]
    if patterns.corrupted is not None:
        runs.append(("corrupted", patterns.corrupted))
    n_rows, n_cols, n_pos = len(patterns.heads), len(runs), len(patterns.tokens)
    marked = range(*patterns.subject_range) if patterns.subject_range else range(0)
    ticks, full = token_labels(patterns.tokens, marked=marked)
    label_px = int(max(len(visible(t)) for t in patterns.tokens) * 7 + 16)
    panel_h = 28 + 22 * n_pos
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=[f"head {h} · {name}" for h in patterns.heads for name, _ in runs],
        horizontal_spacing=0.08,
        # Room under each row for its vertical token labels and the next row's titles.
        vertical_spacing=min(0.4, (label_px + 40) / max(1.0, float(n_rows * panel_h))),
    )
    clean = patterns.clean.double().numpy()
    corrupted = None if patterns.corrupted is None else patterns.corrupted.double().numpy()
    for row, head in enumerate(patterns.heads):
        customdata = _hover(full, clean[row], None if corrupted is None else corrupted[row])
        for col, (name, grid) in enumerate(runs, start=1):
            z = grid[row].double().numpy()
            z = np.where(np.tril(np.ones((n_pos, n_pos), dtype=bool)), z, np.nan)
            fig.add_trace(
                go.Heatmap(
                    z=[[None if np.isnan(v) else v for v in line] for line in z.tolist()],
                    x=list(range(n_pos)),
                    y=list(range(n_pos)),
                    zmin=0.0,
                    zmax=1.0,
                    colorscale="Blues",
                    showscale=row == 0 and col == 1,
                    colorbar={"title": {"text": "weight", "side": "right"}, "thickness": 12},
                    customdata=customdata,
                    hovertemplate="%{customdata}<extra></extra>",
                    name=f"head {head} {name}",
                ),
                row=row + 1,
                col=col,
            )
    fig.update_xaxes(
        tickmode="array", tickvals=list(range(n_pos)), ticktext=ticks, tickangle=-90, ticks=""
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(n_pos)),
        ticktext=ticks,
        autorange="reversed",
        ticks="",
    )
    for col in range(1, n_cols + 1):
        fig.update_xaxes(title_text="source token", row=n_rows, col=col)
    fig.update_yaxes(title_text="destination token", col=1)
    panel = panel_h
    margin = figure_margins(max(len(visible(t)) for t in patterns.tokens))
    natural_width = margin["l"] + margin["r"] + n_cols * panel + 80
    # Wrapped to the width the figure is laid out for (see lenscope.plotting._layout).
    text, title_px = wrap_title(
        title if title is not None else _title(patterns), layout_width(width)
    )
    top = max(110, title_px + 38)
    fig_height = height or 150 + (top - 110) + n_rows * (panel + label_px + 40)
    fig.update_layout(
        title={
            "text": text,
            "x": 0,
            "y": 1 - TOOLBAR_BAND / fig_height,
            "yanchor": "top",
            "yref": "container",
        },
        **fit_width(width, natural_width),
        height=fig_height,
        margin={**margin, "t": top + TOOLBAR_BAND},
        paper_bgcolor="white",
        plot_bgcolor="white",
        hoverlabel={"font": HOVER_FONT, "bgcolor": "white", "align": "left"},
        font={"family": "DejaVu Sans, Arial, sans-serif", "size": 12},
    )
    heading = f"Attention of layer {patterns.layer} · {model_label(patterns)}"
    set_page_info(fig, heading, [""], _rows(patterns))
    return fig


def _hover(full: Sequence[str], clean: np.ndarray, corrupted: np.ndarray | None) -> np.ndarray:
    """One hover text per ``[dest, src]`` cell: both tokens, the clean and corrupted weights."""
    n_pos = len(full)
    data = np.full((n_pos, n_pos), "", dtype=object)
    for dest in range(n_pos):
        for src in range(dest + 1):
            text = f"{full[dest]} → {full[src]}<br>clean     {clean[dest, src]:.3f}"
            if corrupted is not None:
                text += f"<br>corrupted {corrupted[dest, src]:.3f}"
            data[dest, src] = text
    return data


def _title(patterns: AttentionPatterns) -> str:
    what = "clean and corrupted" if patterns.corrupted is not None else "clean"
    prompt = escape(repr(shorten("".join(patterns.tokens), 60)))
    subject = ""
    if patterns.subject_range:
        start, end = patterns.subject_range
        marked = escape(visible("".join(patterns.tokens[start:end]).strip() or "∅"))
        subject = f" · subject <i>{marked}</i> marked *"
    lines = [f"{escape(patterns.hook_name)} · prompt {prompt}{subject}"]
    if patterns.corrupted is not None and patterns.corruption:
        lines.append(f"corrupted: {escape(corruption_text(patterns.corruption))}, averaged")
    return (
        f"<b>Attention of layer {patterns.layer}, {what}</b> · "
        f"{model_text(patterns)}<br>"
        f'<span style="font-size:12px">{"<br>".join(lines)}</span>'
    )


def _rows(patterns: AttentionPatterns) -> list[tuple[str, list[str]]]:
    """The settings table of the saved page, from the patterns' own record."""
    rows = [
        *model_rows(patterns),
        ("prompt", repr("".join(patterns.tokens))),
        ("tokens", str(len(patterns.tokens))),
        ("hook", patterns.hook_name),
        ("heads", ", ".join(str(h) for h in patterns.heads)),
    ]
    if patterns.subject_range:
        start, end = patterns.subject_range
        subject = "".join(patterns.tokens[start:end])
        rows.append(("subject", f"{subject!r} (tokens {start}..{end - 1})"))
    if patterns.corruption:
        rows += corruption_rows(patterns.corruption)
    return [(name, [text]) for name, text in rows]
