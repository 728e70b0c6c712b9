"""Per-layer curves comparing a tuned lens with the logit lens.

Draws a :class:`~lenscope.tuned_lens.LensEvaluation` as tuned-lens's
evaluation plots do (Belrose et al., 2023, arXiv 2303.08112, Figure 3): one
panel per statistic (KL divergence from the model's output, next-token
cross-entropy, entropy), layer along x, one line per lens; the model's own
cross-entropy and entropy are dotted reference lines. The numbers come from
the result object; this module only draws them.
"""

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenscope.plotting._common import check_choice
from lenscope.validation import InvalidInputType

PANELS: dict[str, str] = {
    "kl": "KL(final ‖ lens), nats",
    "ce": "next-token cross-entropy, nats",
    "entropy": "entropy, nats",
}
"""Statistics :func:`plot_lens_comparison` can draw, with their axis titles."""

_COLORS = {"logit": "#7f7f7f", "tuned": "#1f77b4"}
_NAMES = {"logit": "logit lens", "tuned": "tuned lens"}


def plot_lens_comparison(
    evaluation: Any,
    *,
    statistics: Sequence[str] = ("kl", "ce", "entropy"),
    log_kl: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Per-layer curves of a tuned lens against the logit lens.

    Args:
        evaluation: A :class:`~lenscope.tuned_lens.LensEvaluation`
            (``TunedLens.evaluate``).
        statistics: Panels to draw, left to right: any of :data:`PANELS`.
        log_kl: Draw the KL on a logarithmic axis.
        title: Figure title; default names the model and the tokens evaluated.

    Returns:
        The plotly figure (never shown).
    """
    if not all(hasattr(evaluation, f"kl_{lens}") for lens in _NAMES):
        raise InvalidInputType(
            f"plot_lens_comparison expects a LensEvaluation, got {type(evaluation).__name__}; "
            "pass the result of TunedLens.evaluate(model, texts)"
        )
    if isinstance(statistics, str):
        statistics = (statistics,)
    for statistic in statistics:
        check_choice("statistics", statistic, tuple(PANELS))
    layers = list(range(evaluation.n_layers))
    fig = make_subplots(
        rows=1,
        cols=len(statistics),
        subplot_titles=[PANELS[s] for s in statistics],
        horizontal_spacing=0.08,
    )
    for col, statistic in enumerate(statistics, start=1):
        for lens in ("logit", "tuned"):
            values = getattr(evaluation, f"{statistic}_{lens}").tolist()
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=values,
                    mode="lines+markers",
                    name=_NAMES[lens],
                    legendgroup=lens,
                    showlegend=col == 1,
                    line={"color": _COLORS[lens]},
                    customdata=[[h] for h in evaluation.hook_names],
                    hovertemplate=f"{_NAMES[lens]}<br>%{{customdata[0]}}<br>"
                    f"{statistic} = %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        reference = {"ce": evaluation.final_ce, "entropy": evaluation.final_entropy}.get(statistic)
        if reference is not None:
            fig.add_hline(
                y=reference,
                line={"dash": "dot", "color": "black"},
                annotation_text="model output",
                annotation_position="top right",
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="layer (resid_pre)", row=1, col=col)
        if statistic == "kl" and log_kl:
            fig.update_yaxes(type="log", row=1, col=col)
    tokens = f"{evaluation.tokens:,} held-out tokens"
    corpus = f" of {evaluation.corpus}" if evaluation.corpus else ""
    fig.update_layout(
        title=title or f"Tuned lens vs logit lens, {evaluation.model_name} ({tokens}{corpus})",
        template="plotly_white",
        height=380,
        width=360 * len(statistics) + 120,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
