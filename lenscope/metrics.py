"""Patching metrics: what a causal trace measures at the last position.

A metric maps the float32 last-position logits of every patched copy and
the answer token to one number per copy; the trace averages it over copies.
ROME (Meng et al., 2022, arXiv 2202.05262) reports the answer's probability,
:func:`prob`. The others, by name:

* ``"log_prob"``: :func:`log_prob`.
* ``"logit_diff"``: the answer's logit minus a foil's (Wang et al.'s IOI
  work): :func:`logit_diff`.
* ``"normalized_logit_diff"``: ``(LD_patched - LD_corrupted) / (LD_clean -
  LD_corrupted)``, 0 for the corrupted run and 1 for the clean one: the
  metric Zhang & Nanda (2023, "Towards Best Practices of Activation
  Patching", arXiv 2309.16042) recommend; probability can hide negative
  components.
* ``"normalized_prob"``: ``(p_patched - p_corrupted) / (p_clean - p_corrupted)``,
  the fraction of the answer's probability a cell restores (0 corrupted, 1 clean).
* ``"kl_div"``: KL divergence from the clean run's next-token distribution
  to the patched run's, ``sum p_clean (log p_clean - log p_patched)``
  (0 = the clean distribution restored): :func:`kl_div`.

Names are bound to a trace's answer, foil and clean run (a :class:`MetricContext`)
by :func:`bind_metric`, each through its entry in :data:`BINDERS`.
"""

import dataclasses
import re
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope.names import METRIC_NAMES
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


def kl_div(clean_logits: Float[Tensor, " d_vocab"]) -> PatchingMetric:
    """A metric: ``KL(p_clean || p_patched)`` of the next-token distributions, in nats.

    Args:
        clean_logits: The clean run's last-position logits.
    """
    clean_log_probs = log_softmax(clean_logits[None].float())
    clean_probs = clean_log_probs.exp()

    def metric(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
        patched = log_softmax(logits)
        gap = clean_log_probs.to(patched.device) - patched
        return (clean_probs.to(patched.device) * gap).sum(dim=-1)

    metric.__name__ = "kl_div"
    return metric


METRICS: dict[str, PatchingMetric] = {"prob": prob, "log_prob": log_prob}
"""Metrics that need nothing but the logits and the answer."""


@dataclasses.dataclass(frozen=True)
class MetricContext:
    """What a trace knows once its clean and corrupted runs are done, for metrics that need it.

    Attributes:
        answer_id: The answer token (the first, for an answer of several tokens).
        foil_id: The foil token of the logit-difference metrics (None: no foil).
        clean_logits: The clean run's last-position logits.
        answer_ids: Every token of the answer (default: ``(answer_id,)``).
        foil_ids: Every token of the foil (default: ``(foil_id,)``, or None).
        members: For an answer set, each member's tokens (``answer_ids`` is
            the first's); scored as the log of the members' summed probability.
    """

    answer_id: int
    foil_id: int | None
    clean_logits: Float[Tensor, " d_vocab"]
    answer_ids: tuple[int, ...] = ()
    foil_ids: tuple[int, ...] | None = None
    members: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        """Fill in the one-token sequences."""
        if not self.answer_ids:
            object.__setattr__(self, "answer_ids", (self.answer_id,))
        if self.foil_ids is None and self.foil_id is not None:
            object.__setattr__(self, "foil_ids", (self.foil_id,))

    @property
    def sequence(self) -> bool:
        """Whether the answer or the foil has several tokens (scored by teacher forcing).

        An answer set counts as one too: its score is not one token's logit.
        """
        return len(self.answer_ids) > 1 or len(self.foil_ids or ()) > 1 or self.members is not None


@dataclasses.dataclass(frozen=True)
class BoundMetric:
    """A metric bound to one trace: its recorded name, its callable, how the engine computes it.

    A normalised metric's callable gives the raw logit difference; the trace
    maps it to ``(raw - corrupted) / (clean - corrupted)`` once the clean and
    corrupted values are known (:meth:`normalize`).

    Attributes:
        name: The name results record.
        fn: ``(logits [batch, d_vocab], answer) -> [batch]``.
        normalized: Whether :meth:`normalize` rescales it.
        reads: ``"prob"`` or ``"log_prob"`` for a metric the engine reads
            off the one softmax it computes for the top-k anyway (no second
            pass over the vocabulary); None for one it calls. For an answer
            of several tokens these are the whole answer's (teacher-forced)
            probability and log-probability; a metric the engine calls sees
            the first answer position (the next-token distribution).
        less_foil: The metric is ``log p(answer) - log p(foil)`` with an
            answer or foil of several tokens, each teacher-forced in a run of
            its own: the engine scores the answer's run (``reads="log_prob"``)
            and the trace subtracts the foil's run's log-probability.
    """

    name: str
    fn: PatchingMetric
    normalized: bool = False
    reads: str | None = None
    less_foil: bool = False

    def normalize(self, value: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
        """``value`` on the normalised scale (unchanged for a plain metric)."""
        if not self.normalized:
            return value
        return (value - corrupted) / (clean - corrupted)

    def differentiable(self) -> PatchingMetric:
        """:attr:`fn` in a form autograd can differentiate.

        ``prob`` and ``log_prob`` compute the softmax in place (fast, not
        differentiable); here they are torch's float32 softmax and
        log-softmax. Every other metric is its callable as it is.
        """
        if self.reads == "prob":
            return _torch_prob
        if self.reads == "log_prob":
            return _torch_log_prob
        return self.fn


def _torch_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    return torch.softmax(logits.float(), dim=-1)[:, answer]


def _torch_log_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    return torch.log_softmax(logits.float(), dim=-1)[:, answer]


def as_bound(metric: "BoundMetric | PatchingMetric") -> BoundMetric:
    """A bound metric as it is; a plain callable as a bound metric the engine calls."""
    if isinstance(metric, BoundMetric):
        return metric
    return BoundMetric(getattr(metric, "__name__", type(metric).__name__), metric)


def check_normalizable(metric: BoundMetric, clean: float, corrupted: float) -> None:
    """Refuse a normalised metric whose clean and corrupted values (nearly) coincide.

    Raises:
        InvalidInput: When ``(value - corrupted) / (clean - corrupted)`` would divide by ~0.
    """
    if metric.normalized and abs(clean - corrupted) < 1e-6 * max(1.0, abs(clean)):
        raise InvalidInput(
            f"{metric.name} divides by the clean minus the corrupted logit "
            f"difference, which is {clean - corrupted:.3g} here (clean "
            f"{clean:.4g}, corrupted {corrupted:.4g}); the corruption "
            "does not move the answer against the foil: pass metric='logit_diff', "
            "or another foil or counterfactual"
        )


def _foil(name: str, context: MetricContext) -> int:
    if context.foil_id is None:
        raise InvalidInput(
            f"metric {name!r} compares the answer with a foil token, and this trace has "
            "none; pass foil=' Rome' (the competing answer), or use a counterfactual "
            "prompt (tracer.patch), whose clean top-1 is the default foil"
        )
    return context.foil_id


def _logit_diff(name: str, context: MetricContext, normalized: bool) -> BoundMetric:
    """The logit difference; with an answer or foil of several tokens, of log-probabilities.

    For one token each, ``logit[answer] - logit[foil]`` equals ``log p(answer) -
    log p(foil)`` (the softmax's normaliser cancels); with several tokens the
    latter, each sequence teacher-forced, is the generalisation.
    """
    foil = _foil(name, context)
    if context.sequence:
        return BoundMetric(name, log_prob, normalized=normalized, reads="log_prob", less_foil=True)
    return BoundMetric(name, logit_diff(foil), normalized=normalized)


BINDERS: dict[str, Callable[[MetricContext], BoundMetric]] = {
    "prob": lambda context: BoundMetric("prob", prob, reads="prob"),
    "log_prob": lambda context: BoundMetric("log_prob", log_prob, reads="log_prob"),
    "logit_diff": lambda context: _logit_diff("logit_diff", context, normalized=False),
    "normalized_logit_diff": lambda context: _logit_diff(
        "normalized_logit_diff", context, normalized=True
    ),
    "normalized_prob": lambda context: BoundMetric(
        "normalized_prob", prob, normalized=True, reads="prob"
    ),
    "kl_div": lambda context: BoundMetric("kl_div", kl_div(context.clean_logits)),
}
"""How each named metric binds to a trace's :class:`MetricContext`: a metric that
needs the foil or the clean run is one entry here, and every method gets it."""


def bind_metric(metric: "str | PatchingMetric", context: MetricContext) -> BoundMetric:
    """The metric ``metric`` names (or is), bound to a trace's context.

    Args:
        metric: A name of :data:`METRIC_NAMES`, a recorded ``"logit_diff(foil=N)"``,
            or a callable ``(logits, answer) -> per-copy scores``.
        context: The trace's answer, foil and clean logits.
    """
    name, fn = resolve_metric(metric)
    if isinstance(metric, str) and name in BINDERS:
        return BINDERS[name](context)
    return BoundMetric(name, fn)


def metric_from_name(name: str) -> str | PatchingMetric:
    """The metric a name recorded by :func:`resolve_metric` stands for.

    ``"prob"`` and ``"log_prob"`` stay names; ``"logit_diff(foil=N)"``
    becomes :func:`logit_diff` of ``N``. Other callables cannot be rebuilt
    from their name.
    """
    if name in METRIC_NAMES:
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
        if metric in METRICS:
            return metric, METRICS[metric]
        if metric in METRIC_NAMES:
            return metric, _unbound(metric)
        if re.fullmatch(r"logit_diff\(foil=(\d+)\)", metric):
            return resolve_metric(metric_from_name(metric))
        raise InvalidInput(
            f"metric must be one of {METRIC_NAMES} or a callable "
            f"(logits, answer) -> per-copy scores, got {metric!r}; e.g. "
            "metric='normalized_logit_diff' with foil=' Rome'"
        )
    if not callable(metric):
        raise InvalidInputType(
            f"metric must be a name or a callable (logits, answer) -> scores, got {metric!r}"
        )
    return getattr(metric, "__name__", type(metric).__name__), metric


def _unbound(name: str) -> PatchingMetric:
    """Stands for a metric that needs a trace's foil or clean run until :func:`bind_metric`."""

    def metric(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
        raise RuntimeError(f"metric {name!r} must be bound to a trace first (bind_metric)")

    metric.__name__ = name
    return metric
