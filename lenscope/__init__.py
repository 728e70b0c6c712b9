"""lenscope: see where a transformer keeps and moves the information behind a prediction.

Vectorised causal tracing (Meng et al., 2022, arXiv 2202.05262) and logit-lens
views (nostalgebraist, 2020; Belrose et al., 2023) for TransformerLens models,
``HookedTransformer`` and ``TransformerBridge`` alike. Plotting functions are
imported lazily so that ``import lenscope`` does not load plotly.
"""

from typing import Any

from lenscope import compat, datasets, metrics
from lenscope.datasets import DatasetSummary
from lenscope.hooks import KINDS, hook_name
from lenscope.lens import (
    CellTrajectories,
    LensDecoder,
    LensTrajectory,
    LogitLens,
    lens_trace_cell,
    lens_trajectory,
)
from lenscope.loading import load_model
from lenscope.noise import embedding_sigma, known_subjects
from lenscope.results import TraceResult
from lenscope.tokens import guess_subject
from lenscope.tracer import DEFAULT_KINDS, CausalTracer

_PLOTTING = (
    "plot_trace",
    "plot_traces",
    "plot_lens",
    "plot_dataset",
    "save_html",
    "save_image",
)

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "CausalTracer",
    "DatasetSummary",
    "CellTrajectories",
    "LensDecoder",
    "LensTrajectory",
    "LogitLens",
    "TraceResult",
    "compat",
    "datasets",
    "embedding_sigma",
    "guess_subject",
    "hook_name",
    "known_subjects",
    "lens_trace_cell",
    "lens_trajectory",
    "load_model",
    "metrics",
    *_PLOTTING,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PLOTTING:
        from lenscope import plotting

        return getattr(plotting, name)
    raise AttributeError(f"module 'lenscope' has no attribute {name!r}")
