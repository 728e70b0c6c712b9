"""lenscope: see where a transformer keeps and moves the information behind a prediction.

Vectorised causal tracing (Meng et al., 2022, arXiv 2202.05262) and lens views
for TransformerLens models (``HookedTransformer`` and ``TransformerBridge``).
"""

from lenscope import metrics
from lenscope.hooks import KINDS, hook_name
from lenscope.noise import embedding_sigma, known_subjects
from lenscope.results import TraceResult
from lenscope.tokens import guess_subject
from lenscope.tracer import DEFAULT_KINDS, CausalTracer

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "CausalTracer",
    "TraceResult",
    "embedding_sigma",
    "guess_subject",
    "hook_name",
    "known_subjects",
    "metrics",
]
__version__ = "0.1.0"
