"""Patching metrics: what a causal trace measures at the last position.

A metric maps the float32 last-position logits of every corrupted copy and
the answer token to one number per copy; the trace averages it over copies.
ROME (Meng et al., 2022, arXiv 2202.05262) reports the answer's probability,
:func:`prob`. :func:`log_prob` and :func:`logit_diff` (answer against a foil,
as in Wang et al.'s IOI work) are the other common choices.
"""

from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor

PatchingMetric = Callable[[Float[Tensor, "batch d_vocab"], int], Float[Tensor, " batch"]]


def prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """Softmax probability of ``answer`` (ROME's score)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted[:, answer].exp() / shifted.exp().sum(dim=-1)


def log_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """Log-probability of ``answer``, computed stably (logits shifted by their maximum)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted[:, answer] - shifted.exp().sum(dim=-1).log()


# Why not torch.softmax / log_softmax: on CPU their float32 kernels use a fast
# exponential whose error reached 3.6e-5 (relative) in the probability of
# Gemma-3's top token; torch.exp is accurate to float32 rounding.


def logit_diff(foil: int) -> PatchingMetric:
    """A metric: the logit of the answer minus the logit of ``foil``.

    Args:
        foil: Token id of the competing answer.

    Returns:
        A patching metric for ``CausalTracer.trace(metric=...)``.
    """
    if isinstance(foil, bool) or not isinstance(foil, int):
        raise TypeError(
            f"logit_diff needs the foil as a token id (int), got {foil!r}; "
            "pass e.g. logit_diff(model.to_single_token(' Rome'))"
        )

    def metric(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
        return logits[:, answer] - logits[:, foil]

    metric.__name__ = f"logit_diff(foil={foil})"
    return metric


METRICS: dict[str, PatchingMetric] = {"prob": prob, "log_prob": log_prob}


def resolve_metric(metric: str | PatchingMetric) -> tuple[str, PatchingMetric]:
    """Turn a metric name or callable into ``(name, callable)``."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"metric must be one of {tuple(METRICS)} or a callable "
                f"(logits, answer) -> per-copy scores, got {metric!r}; for a logit "
                "difference pass metric=lenscope.metrics.logit_diff(foil_id)"
            )
        return metric, METRICS[metric]
    if not callable(metric):
        raise TypeError(
            f"metric must be a name or a callable (logits, answer) -> scores, got {metric!r}"
        )
    return getattr(metric, "__name__", type(metric).__name__), metric
