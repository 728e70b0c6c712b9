"""Patching metrics: what a causal trace measures at the last position.

A metric maps the float32 last-position logits of every corrupted copy and
the answer token to one number per copy; the trace averages it over copies.
ROME (Meng et al., 2022, arXiv 2202.05262) reports the answer's probability,
:func:`prob`. :func:`log_prob` and :func:`logit_diff` (answer against a foil,
as in Wang et al.'s IOI work) are the other common choices.
"""

import re
from collections.abc import Callable

from jaxtyping import Float
from torch import Tensor

from lenscope.validation import InvalidInput, InvalidInputType

PatchingMetric = Callable[[Float[Tensor, "batch d_vocab"], int], Float[Tensor, " batch"]]


# Why not torch.softmax / log_softmax: on CPU their float32 kernels use a fast
# exponential whose error reached 3.6e-5 (relative) in the probability of
# Gemma-3's top token; torch.exp is accurate to float32 rounding. These three
# functions are lenscope's only softmax.

# exp() of inputs below -87.3 gives float32 denormals, which the CPU computes
# ten times slower; clamping there changes a probability by less than
# 1.7e-38, far below float32's resolution of the total.
EXP_FLOOR = -87.0


def softmax_(
    logits: Float[Tensor, "*batch d_vocab"],
) -> tuple[Float[Tensor, "*batch d_vocab"], Float[Tensor, "*batch 1"], Float[Tensor, "*batch 1"]]:
    """Softmax over the last axis, computed in place in ``logits`` (which it overwrites).

    Returns:
        The probabilities (``logits`` itself), each row's maximum logit, and
        each row's sum of ``exp(logit - maximum)`` (so that
        ``log p = logit - maximum - log(sum)``).
    """
    top = logits.max(dim=-1, keepdim=True).values
    probs = logits.sub_(top).clamp_(min=EXP_FLOOR).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    return probs, top, total


def softmax(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, "*batch d_vocab"]:
    """Float32 softmax over the last axis (a new tensor); see :func:`softmax_`."""
    return softmax_(logits.float().clone())[0]


def log_softmax(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, "*batch d_vocab"]:
    """Float32 log-softmax over the last axis, stable and accurate to float32 rounding."""
    logits = logits.float()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    exps = shifted.clamp(min=EXP_FLOOR).exp_()
    total = exps.sum(dim=-1, keepdim=True)
    del exps
    return shifted.sub_(total.log_())


def prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """Softmax probability of ``answer`` (ROME's score)."""
    return softmax(logits)[:, answer]


def log_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """Log-probability of ``answer``, computed stably (logits shifted by their maximum)."""
    return log_softmax(logits)[:, answer]


def logit_diff(foil: int) -> PatchingMetric:
    """A metric: the logit of the answer minus the logit of ``foil``.

    Args:
        foil: Token id of the competing answer.

    Returns:
        A patching metric for ``CausalTracer.trace(metric=...)``.
    """
    if isinstance(foil, bool) or not isinstance(foil, int):
        raise InvalidInputType(
            f"logit_diff needs the foil as a token id (int), got {foil!r}; "
            "pass e.g. logit_diff(model.to_single_token(' Rome'))"
        )

    def metric(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
        return logits[:, answer] - logits[:, foil]

    metric.__name__ = f"logit_diff(foil={foil})"
    return metric


METRICS: dict[str, PatchingMetric] = {"prob": prob, "log_prob": log_prob}


def metric_from_name(name: str) -> str | PatchingMetric:
    """The metric a name recorded by :func:`resolve_metric` stands for.

    ``"prob"`` and ``"log_prob"`` stay names; ``"logit_diff(foil=N)"``
    becomes :func:`logit_diff` of ``N``. Other callables cannot be rebuilt
    from their name.
    """
    if name in METRICS:
        return name
    match = re.fullmatch(r"logit_diff\(foil=(\d+)\)", str(name))
    if match:
        return logit_diff(int(match.group(1)))
    raise InvalidInput(
        f"metric {name!r} was a custom callable, which cannot be rebuilt from its name; "
        "pass the same callable as metric=..."
    )


def resolve_metric(metric: str | PatchingMetric) -> tuple[str, PatchingMetric]:
    """Turn a metric name or callable into ``(name, callable)``."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise InvalidInput(
                f"metric must be one of {tuple(METRICS)} or a callable "
                f"(logits, answer) -> per-copy scores, got {metric!r}; for a logit "
                "difference pass metric=lenscope.metrics.logit_diff(foil_id)"
            )
        return metric, METRICS[metric]
    if not callable(metric):
        raise InvalidInputType(
            f"metric must be a name or a callable (logits, answer) -> scores, got {metric!r}"
        )
    return getattr(metric, "__name__", type(metric).__name__), metric
