"""lenscope: see where a transformer keeps and moves the information behind a prediction.

Vectorised causal tracing (Meng et al., 2022, arXiv 2202.05262) and logit-lens
views (nostalgebraist, 2020; Belrose et al., 2023) for TransformerLens models,
``HookedTransformer`` and ``TransformerBridge`` alike. Every public name is
imported on first use, so ``import lenscope`` (and ``lenscope --help``) does
not load torch, TransformerLens or plotly; the installed TransformerLens
version is checked at import (:mod:`lenscope.compat`, metadata only).
"""

import importlib
from typing import Any

from lenscope import compat
from lenscope._version import __version__

_EXPORTS: dict[str, str] = {
    "AnswerWarning": "lenscope.validation",
    "AttributionResult": "lenscope.attribution",
    "AnswerSet": "lenscope.tokens",
    "Comparison": "lenscope.attribution",
    "compare": "lenscope.attribution",
    "DEFAULT_KINDS": "lenscope.settings",
    "KINDS": "lenscope.hooks",
    "CausalTracer": "lenscope.tracer",
    "CellTrajectories": "lenscope.lens",
    "Corruption": "lenscope.corruptions",
    "DatasetSummary": "lenscope.datasets",
    "GaussianNoise": "lenscope.corruptions",
    "HEAD_KINDS": "lenscope.sites",
    "HeadSite": "lenscope.sites",
    "HeadTraceResult": "lenscope.results",
    "UniformNoise": "lenscope.corruptions",
    "StudentTNoise": "lenscope.corruptions",
    "MultivariateGaussianNoise": "lenscope.corruptions",
    "CounterfactualPrompt": "lenscope.corruptions",
    "CounterfactualColumn": "lenscope.corruptions",
    "SiteAblation": "lenscope.corruptions",
    "ZeroAblation": "lenscope.corruptions",
    "MeanAblation": "lenscope.corruptions",
    "ResampleAblation": "lenscope.corruptions",
    "pair_counterfactuals": "lenscope.datasets",
    "LensDecoder": "lenscope.lens",
    "LensEvaluation": "lenscope.tuned_lens",
    "LensTrajectory": "lenscope.lens",
    "LocalExecutor": "lenscope.datasets",
    "NEURON_KINDS": "lenscope.sites",
    "NeuronSite": "lenscope.sites",
    "LogitLens": "lenscope.lens",
    "RayExecutor": "lenscope.datasets",
    "SITES": "lenscope.sites",
    "Site": "lenscope.sites",
    "TraceResult": "lenscope.results",
    "TraceInterrupted": "lenscope.results",
    "TraceSettings": "lenscope.settings",
    "TunedLens": "lenscope.tuned_lens",
    "embedding_sigma": "lenscope.noise",
    "explore": "lenscope.explorer",
    "Explorer": "lenscope.explorer",
    "ExplorerRun": "lenscope.explorer",
    "filter_known": "lenscope.datasets",
    "guess_subject": "lenscope.tokens",
    "hook_name": "lenscope.hooks",
    "known_facts": "lenscope.datasets",
    "long_answer_facts": "lenscope.datasets",
    "known_subjects": "lenscope.noise",
    "lens_trace_cell": "lenscope.lens",
    "lens_trajectory": "lenscope.lens",
    "load_facts": "lenscope.datasets",
    "load_model": "lenscope.loading",
    "trace_dataset": "lenscope.datasets",
    "merge_checkpoints": "lenscope.datasets",
    "plot_trace": "lenscope.plotting",
    "plot_traces": "lenscope.plotting",
    "plot_lens": "lenscope.plotting",
    "plot_lens_comparison": "lenscope.plotting",
    "plot_dataset": "lenscope.plotting",
    "plot_head_trace": "lenscope.plotting",
    "plot_unit_trace": "lenscope.plotting",
    "plot_attention": "lenscope.plotting",
    "attention_patterns": "lenscope.attention",
    "AttentionPatterns": "lenscope.attention",
    "collect": "lenscope.collect",
    "CollectedActivations": "lenscope.collect",
    "save_html": "lenscope.plotting",
    "save_image": "lenscope.plotting",
    "show": "lenscope.plotting",
}
_SUBMODULES = ("datasets", "metrics", "corruptions", "sites", "settings", "validation")

__all__ = ["__version__", "compat", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"lenscope.{name}")
    else:
        raise AttributeError(f"module 'lenscope' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
