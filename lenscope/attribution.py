"""Attribution patching on the causal-tracing grid: every ``(layer, pos)`` cell from one backward.

Attribution patching (Nanda, "Attribution patching: activation patching at
industrial scale", 2023; Kramár et al., "AtP*", 2024, arXiv 2403.00745)
replaces the restored run of each cell by a first-order Taylor step taken on
the corrupted run::

    effect(layer, pos) ~ (a_clean - a_corrupted)[layer, pos] . d metric / d a[layer, pos]

For Gaussian noise the estimate is taken on every noise sample (its own
``a_corrupted`` and gradient) and averaged over the samples, as the exact
trace averages the metric over them; a window restoring several layers is
the sum of its layers' estimates (the linear estimate of restoring them all).
The estimate is of the raw metric change; it is added to the corrupted
score and normalised as the exact trace normalises, so an
:class:`AttributionResult` has the shape, metric and scale of the
:class:`~lenscope.results.TraceResult` it estimates and the two plot side by
side (``lenscope.plot_traces``) and compare cell by cell (:func:`compare`).

How a cell is estimated is an estimator (``estimator=``): :class:`AtP`, the
above (default), or :class:`IntegratedGradients` (``"ig:M"``: the gradient
averaged over ``M`` points of the path from corrupted to clean activations);
``target="log_prob"`` differentiates the log-probability and converts it to
the trace's probability scale.

Cost of AtP: one clean forward pass, and one forward and one backward pass of the
corrupted copies (``samples`` rows), for all kinds together. No AtP*
refinement is implemented: AtP*'s attention-saturation fix recomputes
attention patterns of query/key nodes, and GradDrop targets the gradient
through single residual paths; neither applies to restoring whole
residual-width activations, which is what causal tracing restores.

The model is left exactly as it was (:func:`lenscope.hooks.preserved_model`):
parameters' ``requires_grad`` flags and every module's training mode are
restored, and the hooks added here are removed, also when an exception
interrupts the computation. Gradients are read by backward hooks at the hook
points, as TransformerLens 4's ``attribution_patching.py`` reads them, because
a ``TransformerBridge`` hands some forward hooks a reshaped view that its
forward pass never consumes.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope import engine
from lenscope.experiment import Grid, Measure, continued_input, member_groups, prepare
from lenscope.hooks import (
    EMBED_HOOK,
    FINAL_RESID,
    capture_forward,
    decode_resid,
    hook_name,
    is_bridge,
    model_name,
    n_layers,
    preserved_model,
    run_to_final_resid,
)
from lenscope.metrics import PatchingMetric, softmax
from lenscope.names import KINDS
from lenscope.results import TraceResult
from lenscope.settings import TraceSettings
from lenscope.sites import HeadSite, Site, site
from lenscope.validation import InvalidInput, is_int

__all__ = [
    "AtP",
    "AttributionResult",
    "Comparison",
    "IntegratedGradients",
    "attribute",
    "compare",
    "estimator_from_name",
    "recheck_top",
]

ATTRIBUTION_KINDS = (*KINDS, "mlp_post")
"""Kinds attribution patching estimates: the residual-width activations and MLP neurons."""


@dataclasses.dataclass(frozen=True, eq=False)
class AttributionResult(TraceResult):
    """Attribution-patching estimates of one trace (see :class:`~lenscope.results.TraceResult`).

    ``scores`` hold the corrupted score plus the first-order estimate of
    restoring each cell, normalised as the exact trace normalises them. No
    restored run is decoded, so ``top_ids`` are -1 and ``top_probs`` NaN at
    every cell; the clean and corrupted top-k are real.

    Attributes:
        method: ``"attribution"``.
        passes: Forward and backward passes the estimate cost, for all kinds
            together: ``{"clean_forward": 1, "corrupted_forward": 1,
            "corrupted_backward": 1, "corrupted_rows": samples}``.
        seconds: Wall time of the whole estimate (all kinds).
        estimator: The estimator's name (:func:`estimator_from_name`): ``"atp"``
            or ``"ig:M"`` / ``"ig:M:layer"``.
        target: The quantity differentiated: ``"metric"`` (the trace's own) or
            ``"log_prob"`` (converted to the trace's scale, see :func:`attribute`).
    """

    method: str = "attribution"
    passes: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    estimator: str = "atp"
    target: str = "metric"

    def top_predictions(self, *coords: int, **named: int | None) -> list[tuple[str, float]]:
        """None: no restored run is decoded, so a cell has no top-k (an empty list)."""
        self.cell(*coords, **named)  # raises for a cell outside the grid, with the usual message
        return []


@dataclasses.dataclass(frozen=True)
class KindComparison:
    """How well attribution estimates one kind's exact trace.

    Attributes:
        kind: The hook-point type.
        pearson: Pearson correlation of the traced cells' scores.
        spearman: Spearman rank correlation of the same cells.
        top_k_recall: Fraction of the exact trace's ``k`` highest cells among
            the estimate's ``k`` highest.
        k: The ``k`` of the recall.
        cells: Number of cells compared (traced in both).
    """

    kind: str
    pearson: float
    spearman: float
    top_k_recall: float
    k: int
    cells: int


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Per-kind agreement of attribution estimates with exact traces (:func:`compare`)."""

    kinds: dict[str, KindComparison]

    def __getitem__(self, kind: str) -> KindComparison:
        """The comparison of one kind."""
        return self.kinds[kind]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{kind: {pearson, spearman, top_k_recall, k, cells}}``."""
        return {
            kind: {k: v for k, v in dataclasses.asdict(c).items() if k != "kind"}
            for kind, c in self.kinds.items()
        }

    def __repr__(self) -> str:
        """One line per kind."""
        lines = [
            f"{c.kind}: pearson {c.pearson:.3f}, spearman {c.spearman:.3f}, "
            f"top-{c.k} recall {c.top_k_recall:.2f} ({c.cells} cells)"
            for c in self.kinds.values()
        ]
        return "Comparison(\n  " + "\n  ".join(lines) + "\n)"


def attribute(
    tracer: Any,
    prompt: str | Tensor | Sequence[int],
    subject: str | tuple[int, int] | None = None,
    settings: TraceSettings | None = None,
    *,
    estimator: "str | Estimator" = "atp",
    target: str = "metric",
    **options: Any,
) -> dict[str, AttributionResult]:
    """Estimate every cell of a causal trace by attribution patching.

    Settings are resolved exactly as :meth:`CausalTracer.trace_kinds
    <lenscope.tracer.CausalTracer.trace_kinds>` resolves them (same
    corruption, seed, metric, answer, foil, windows, layers and positions),
    so an estimate and an exact trace with the same options see the same noise.

    Args:
        tracer: The :class:`~lenscope.tracer.CausalTracer` (its model and defaults).
        prompt: Text, or 1-D token ids.
        subject: The subject's text or token range; None with a counterfactual prompt.
        settings: A :class:`TraceSettings`; ``options`` change single fields of it.
        estimator: How a cell's effect is estimated (:func:`estimator_from_name`):
            ``"atp"`` (default: one gradient at the corrupted run),
            ``"ig:M"`` (integrated gradients, ``M`` points on the path from
            the corrupted to the clean activations of a window's layers,
            interpolated together) or ``"ig:M:layer"`` (each layer on its own
            path, a window the sum of its layers).
        target: The quantity whose gradient is taken: ``"metric"`` (default:
            the trace's metric) or ``"log_prob"`` (the answer's
            log-probability, not saturated where the probability is small;
            allowed when the metric is ``prob`` or ``log_prob``). For
            ``prob``, each corrupted copy's estimated log-probability change
            ``d`` becomes the probability change ``p (exp(d) - 1)`` (exact
            when ``d`` is; at most ``1 - p``), so the result keeps the trace's scale.
        **options: As for ``trace_kinds`` (``kinds``, ``windows``, ``corruption``,
            ``metric``, ``answer``, ``foil``, ``samples``, ``seed``, ...).

    Returns:
        ``{kind: AttributionResult}`` in the order of ``kinds``.

    Raises:
        InvalidInput: For a per-head kind, ``direction="noise"``, several
            metrics, ``resid_mid`` on a TransformerBridge, an unknown
            estimator or target, or any input the exact trace refuses.
    """
    estimator = estimator_from_name(estimator)
    settings = tracer.settings(settings, **options)
    _check_supported(tracer.model, settings)
    check_target(target, settings)
    started = time.perf_counter()
    model = tracer.model
    prepared = prepare(model, prompt, subject, settings, sequences=True)
    settings = prepared.settings
    names = list(prepared.names)
    answer = prepared.answer_ids or ()
    _check_sequence(prepared, estimator)
    # An answer of k tokens: every run teacher-forced with its first k - 1
    # (engine.sweep's scoring, differentiable: the sum of their log-probabilities);
    # an answer set: with its longest member's (one run scores them all).
    continuation = answer[:-1]
    if prepared.answer_set is not None:
        ((continuation, _),) = member_groups(prepared.answer_set)
    decoded = len(continuation) + 1

    with preserved_model(model):
        for param in model.parameters():
            param.requires_grad_(False)
        with torch.no_grad():
            bound = prepared.bind()
            corrupted = continued_input(bound, continuation)
            clean = prepared.clean_run(continuation)
        measured: list[Measure] = []

        def scores_of(logits: Tensor) -> Tensor:
            # Measured once the corrupted logits are known: a counterfactual
            # prompt's top-1 is the default foil, as in the exact trace.
            first = logits if decoded == 1 else logits[:, 0]
            measured.append(prepared.measure(clean.logits, first.detach()))
            return target_fn(measured[0])(logits, scored(measured[0]))

        def target_fn(measure: Measure) -> PatchingMetric:
            if measure.members is not None:
                return _members_target("log_prob" if target == "log_prob" else measure.metrics[0])
            if decoded > 1:
                return _sequence_target("log_prob" if target == "log_prob" else measure.metrics[0])
            return _log_prob if target == "log_prob" else measure.metrics[0].differentiable()

        def scored(measure: Measure) -> Any:
            if measure.members is not None:
                return engine.Members(measure.members)
            return measure.answer_ids if decoded > 1 else measure.answer_id

        grads = corrupted_gradients(model, corrupted, names, scores_of, decoded=decoded)
        (measure,) = measured
        groups = {
            where.name: (where.hook_names(prepared.n_layer), settings.windows[where.name])
            for where in prepared.sites
        }
        inputs = EstimatorInputs(
            model=model,
            corrupted=corrupted,
            clean=clean.activations,
            run=grads,
            target_fn=target_fn(measure),
            answer_id=scored(measure),
            layers=tuple(settings.layers),
            sites={where.name: where for where in prepared.sites},
        )
        effects, extra_passes = estimator.effects(inputs, groups)
    corrupted_logits = grads.logits
    clean_logits = clean.logits if clean.answer_logits is None else clean.answer_logits
    if measure.members is None:
        baselines = measure.baselines(clean_logits, corrupted_logits, settings.top_k)
    else:
        clean_members = _members_log_prob(clean_logits[None], measure.members, each=True)
        corrupted_members = _members_log_prob(corrupted_logits, measure.members, each=True)
        baselines = measure.set_baselines(
            clean.logits,
            corrupted_logits if decoded == 1 else corrupted_logits[:, 0],
            clean_members,
            corrupted_members,
            settings.top_k,
        )
    corrupted_score = baselines.corrupted_scores[0]
    seconds = time.perf_counter() - started

    passes = {
        "clean_forward": 1,
        "corrupted_forward": 1,
        "corrupted_backward": 1,
        "corrupted_rows": corrupted.samples,
        **extra_passes,
    }
    # log_prob differentiated for a prob trace: each copy's log-probability
    # change d is the probability change p (exp(d) - 1) of that copy.
    converts = target == "log_prob" and settings.metric_names[0] == "prob"
    answer_probs = None
    if converts:
        answer_probs = (
            _members_log_prob(corrupted_logits, measure.members).exp()
            if measure.members is not None
            else softmax(corrupted_logits)[:, measure.answer_id]
            if decoded == 1
            else _sequence_log_prob(corrupted_logits, measure.answer_ids).exp()
        )
    grids = {}
    for where in prepared.sites:
        estimate = _combine(effects[where.name], settings.windows[where.name], answer_probs)
        if "pos" in where.index_axes:
            # The grid keeps the prompt's positions (an answer's are never restored).
            estimate = estimate.narrow(where.index_axes.index("pos"), 0, prepared.n_pos)
        traced = torch.full_like(estimate, math.nan)
        cells = prepared.cells(where)
        traced[tuple(cells.T)] = estimate[tuple(cells.T)]
        grids[where.name] = Grid(
            scores=[corrupted_score + traced],
            top_ids=torch.full((*estimate.shape, settings.top_k), -1, dtype=torch.long),
            top_probs=torch.full((*estimate.shape, settings.top_k), math.nan),
        )
    (out,) = prepared.results(
        measure,
        baselines,
        grids,
        bound,
        lambda where, **fields: AttributionResult(**fields),
        passes=passes,
        seconds=seconds,
        estimator=estimator.name,
        target=target,
    ).values()
    return out


def recheck_top(
    tracer: Any,
    prompt: str | Tensor | Sequence[int],
    subject: str | tuple[int, int] | None,
    estimates: Mapping[str, AttributionResult],
    settings: TraceSettings | None = None,
    *,
    k: int = 5,
    **options: Any,
) -> dict[str, AttributionResult]:
    """Attribution estimates whose ``k`` highest cells per kind are traced exactly.

    A fast first pass that keeps what matters most exact: the estimate ranks
    the cells, and one exact trace (:meth:`CausalTracer.trace_kinds
    <lenscope.tracer.CausalTracer.trace_kinds>`, same settings) restores the
    layers and positions of every kind's top ``k`` cells (their product: at
    most ``k * k`` cells per kind). Those top cells then carry the exact
    score; every other cell keeps its estimate. Cells the estimate ranks low
    but that matter are not found this way (the estimate's failure mode on
    ``mlp_out`` windows: see docs/attribution.md).

    Args:
        tracer: The :class:`~lenscope.tracer.CausalTracer`.
        prompt: The prompt the estimates are of.
        subject: Its subject (or token range; None with a counterfactual prompt).
        estimates: ``{kind: AttributionResult}`` from :func:`attribute`, same settings.
        settings: The settings of the estimates.
        k: Cells per kind to recheck.
        **options: The options of the estimates.

    Returns:
        ``{kind: AttributionResult}`` with ``method="attribution+exact_top_k"``
        and ``passes["exact_cells"]``, the cells the exact trace restored.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a positive integer, got {k!r}; pass e.g. k=5")
    tops = {kind: _top_cells(r.scores, k) for kind, r in estimates.items()}
    layers = sorted({int(c[0]) for cells in tops.values() for c in cells})
    positions = sorted({int(c[1]) for cells in tops.values() for c in cells})
    exact = tracer.trace_kinds(
        prompt,
        subject,
        tracer.settings(settings, **options),
        kinds=tuple(estimates),
        layers=layers,
        positions=positions,
        progress=False,
    )
    out = {}
    for kind, r in estimates.items():
        scores = r.scores.clone()
        index = tuple(tops[kind].T)
        scores[index] = exact[kind].scores[index]
        out[kind] = dataclasses.replace(
            r,
            scores=scores,
            method="attribution+exact_top_k",
            passes={**r.passes, "exact_cells": len(layers) * len(positions)},
        )
    return out


def _top_cells(scores: Float[Tensor, "layer pos"], k: int) -> Tensor:
    """``(layer, pos)`` of the ``k`` highest finite cells."""
    flat = torch.nan_to_num(scores.float(), nan=-math.inf).flatten()
    n = min(k, int(torch.isfinite(scores).sum()))
    index = flat.topk(n).indices
    return torch.stack([index // scores.shape[1], index % scores.shape[1]], dim=1)


def _check_supported(model: torch.nn.Module, settings: TraceSettings) -> None:
    """Refuse what attribution patching here does not estimate, saying what to do instead."""
    heads = [
        k for k, s in zip(settings.kinds, settings.sites, strict=True) if isinstance(s, HeadSite)
    ]
    if heads:
        raise InvalidInput(
            f"attribution estimates the residual-width kinds and MLP neurons "
            f"{ATTRIBUTION_KINDS}, got the per-head kind(s) {heads}; pass "
            "kinds=('resid_post', 'mlp_out', 'attn_out'), or "
            "trace heads exactly (tracer.trace(kind='z', by='head'))"
        )
    if settings.direction != "denoise":
        raise InvalidInput(
            f"attribution estimates denoising (clean activations into the corrupted run), "
            f"got direction={settings.direction!r}; pass direction='denoise', or trace "
            "the noising direction exactly"
        )
    if len(settings.metric_specs) != 1:
        raise InvalidInput(
            f"attribution differentiates one metric per call, got {len(settings.metric_specs)} "
            f"({list(settings.metric_names)}); pass metric=... once per metric"
        )
    if is_bridge(model) and "resid_mid" in settings.kinds:
        raise InvalidInput(
            "attribution cannot estimate kind 'resid_mid' on a TransformerBridge, got "
            f"kinds={tuple(settings.kinds)}: the bridge's hook_resid_mid feeds only the second "
            "norm, not the residual stream, so its gradient misses the residual path; pass "
            "kinds without 'resid_mid' (resid_pre of the next layer is the closest), or trace "
            "it exactly"
        )


@dataclasses.dataclass(frozen=True)
class GradientRun:
    """The corrupted copies' activations and the metric's gradient at some hook points."""

    activations: dict[str, Float[Tensor, "samples pos ..."]]
    gradients: dict[str, Float[Tensor, "samples pos ..."]]
    logits: Float[Tensor, "samples *answer d_vocab"]


def _decode_last(
    model: torch.nn.Module, final: Float[Tensor, "batch pos d_model"], decoded: int
) -> Float[Tensor, "batch *answer d_vocab"]:
    """The last position's logits, or the last ``decoded`` positions' (``[batch, decoded, V]``)."""
    if decoded == 1:
        return decode_resid(model, final[:, -1])
    last = final[:, -decoded:]
    return decode_resid(model, last.flatten(0, 1)).unflatten(0, tuple(last.shape[:2]))


def _sequence_log_prob(
    logits: Float[Tensor, "batch answer d_vocab"], answer_ids: Sequence[int]
) -> Float[Tensor, " batch"]:
    """Each row's teacher-forced log-probability of the whole answer, differentiable."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(answer_ids), device=logits.device)
    return log_probs.gather(-1, ids.expand(logits.shape[0], -1)[..., None])[..., 0].sum(-1)


def _sequence_target(metric: Any) -> Callable[..., Tensor]:
    """The differentiable ``log_prob`` or ``prob`` of an answer of several tokens.

    Args:
        metric: ``"log_prob"``, or the bound metric (``reads`` ``prob``/``log_prob``).
    """
    reads = metric if isinstance(metric, str) else metric.reads

    def target(logits: Tensor, answer_ids: Sequence[int]) -> Tensor:
        value = _sequence_log_prob(logits, answer_ids)
        return value.exp() if reads == "prob" else value

    return target


def _members_log_prob(
    logits: Float[Tensor, "batch d_vocab"] | Float[Tensor, "batch answer d_vocab"],
    members: Sequence[Sequence[int]],
    *,
    each: bool = False,
) -> Float[Tensor, " batch"] | Float[Tensor, "batch member"]:
    """Each row's log-probability of an answer set (log-sum-exp of its members'), differentiable.

    Member ``m``'s token ``j`` is read at decoded position ``j`` (one
    teacher-forced run scores every member); ``each``: every member's instead.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if log_probs.ndim == 2:
        log_probs = log_probs[:, None]
    per_member = torch.stack(
        [sum(log_probs[:, j, token] for j, token in enumerate(member)) for member in members],
        dim=-1,
    )
    return per_member if each else torch.logsumexp(per_member, dim=-1)


def _members_target(metric: Any) -> Callable[..., Tensor]:
    """The differentiable ``log_prob`` or ``prob`` of an answer set (:func:`_sequence_target`)."""
    reads = metric if isinstance(metric, str) else metric.reads

    def target(logits: Tensor, members: engine.Members) -> Tensor:
        value = _members_log_prob(logits, members.ids)
        return value.exp() if reads == "prob" else value

    return target


def _check_sequence(prepared: Any, estimator: "Estimator") -> None:
    """Refuse what attribution does not estimate for an answer or foil of several tokens.

    Every estimator takes an answer of several tokens (its teacher-forced
    log-probability, or probability, is the target) and an answer set whose
    members one run scores; a logit difference of several tokens, and a set
    needing several runs, are traced exactly.
    """
    answer, foil = prepared.answer_ids or (), prepared.foil_ids or ()
    members = prepared.answer_set
    if len(answer) <= 1 and len(foil) <= 1 and members is None:
        return
    if members is not None and len(member_groups(members)) > 1:
        raise InvalidInput(
            f"attribution estimates an answer set whose members are scored by one "
            f"teacher-forced run (each member's first tokens begin the longest's), got "
            f"{[list(m) for m in members]}; trace it exactly (tracer.trace_kinds), or "
            "pass members that share their first tokens"
        )
    metric = prepared.settings.metric_names[0]
    if (len(answer) <= 1 and members is None) or metric not in (
        "prob",
        "log_prob",
        "normalized_prob",
    ):
        raise InvalidInput(
            f"attribution estimates an answer of several tokens with the metrics 'prob' and "
            f"'log_prob' (the whole answer's), got metric {metric!r} with answer "
            f"{list(answer) or None} and foil {list(foil) or None}; pass metric='log_prob', "
            "or trace the logit difference of several tokens exactly (tracer.trace_kinds)"
        )


class _Stop(Exception):
    """Ends the corrupted forward pass at the last block's ``resid_post``."""


def corrupted_gradients(
    model: torch.nn.Module,
    corrupted: Any,
    names: Sequence[str],
    scores_of: Callable[[Float[Tensor, "batch *answer d_vocab"]], Float[Tensor, " batch"]],
    *,
    decoded: int = 1,
) -> GradientRun:
    """One forward and one backward pass of the corrupted copies.

    The copies run with the corruption's hooks; the embeddings (after them)
    become the leaf autograd differentiates from, so no parameter needs
    ``requires_grad``. The last position's final residual is decoded as every
    trace decodes it (:func:`lenscope.hooks.decode_resid`), the metric summed
    over copies (each copy's gradient is its own metric's), and one
    ``torch.autograd.grad`` drives the backward hooks at ``names``.

    Args:
        model: The model (its parameters may all be frozen).
        corrupted: The bound corruption.
        names: Hook points whose activations and gradients to keep (any width:
            residual-width, ``mlp.hook_post``).
        scores_of: Given the corrupted logits, the per-copy scores to
            differentiate (the metric, differentiable, of the answer).
        decoded: Positions decoded: the last one, or the last ``decoded``
            (an answer of several tokens, teacher-forced: logits ``[batch,
            decoded, d_vocab]``).
    """
    final_name = hook_name("resid_post", n_layers(model) - 1)
    activations: dict[str, Tensor] = {}
    gradients: dict[str, Tensor] = {}
    live: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook: Any) -> Tensor:
        live[EMBED_HOOK] = act.detach().clone().requires_grad_(True)
        return live[EMBED_HOOK]

    def keep(name: str) -> Any:
        def hook(act: Tensor, hook: Any) -> None:
            live[name] = act
            activations[name] = act.detach().clone()

        return hook

    def grab(name: str) -> Any:
        def hook(grad: Tensor, hook: Any) -> None:
            gradients[name] = grad.detach().clone()

        return hook

    def stop(act: Tensor, hook: Any) -> None:
        live[final_name] = act
        raise _Stop

    fwd = [*corrupted.fwd_hooks, (EMBED_HOOK, leaf), *((n, keep(n)) for n in names)]
    fwd.append((final_name, stop))
    bwd = [(n, grab(n)) for n in names if n != final_name]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        try:
            model(corrupted.batch_tokens(1))
        except _Stop:
            pass
        logits = _decode_last(model, live[final_name], decoded)
        total = scores_of(logits).sum()
        # The backward hooks fire on the way; hook points whose backward hook
        # does not (the final resid_post, where the pass stopped; a bridge's
        # hook_resid_pre) take the gradient of the tensor their forward hook saw.
        inputs = [name for name in dict.fromkeys([*names, final_name]) if name in live]
        direct = torch.autograd.grad(total, [live[n] for n in inputs], allow_unused=True)
    for name, grad in zip(inputs, direct, strict=True):
        if name in names and name not in gradients and grad is not None:
            gradients[name] = grad.detach().clone()
    missing = [n for n in names if n not in gradients]
    if missing:
        raise RuntimeError(
            f"no gradient reached {missing[:3]} on {model_name(model)!r}; attribution needs "
            "backward hooks at those hook points"
        )
    return GradientRun(activations, gradients, logits.detach().float())


def cell_estimates(
    clean: Mapping[str, Float[Tensor, "pos d_model"]],
    corrupted: Mapping[str, Float[Tensor, "samples pos d_model"]],
    gradients: Mapping[str, Float[Tensor, "samples pos d_model"]],
) -> Float[Tensor, "layer pos"]:
    """``(a_clean - a_corrupted) . grad`` per sample, averaged over samples, one layer per name.

    Args:
        clean: The clean activation at each layer's hook point, in layer order.
        corrupted: The corrupted copies' activations there.
        gradients: The metric's gradient on the corrupted copies there.
    """
    rows = [_dot(clean[name], corrupted[name], gradients[name]).mean(dim=0) for name in clean]
    return torch.stack(rows).cpu()


def window_sum(per_layer: Float[Tensor, "layer ..."], window: int) -> Float[Tensor, "layer ..."]:
    """Each cell's estimate of restoring its window: the sum over the window's layers.

    The layers of a window are those the exact trace restores
    (:func:`lenscope.engine.restore_windows`, ROME's clipping). Axes after
    ``layer`` (positions, neurons, samples) are kept.
    """
    n_layer = per_layer.shape[0]
    cells = torch.stack([torch.arange(n_layer), torch.zeros(n_layer, dtype=torch.long)], dim=1)
    windows = engine.restore_windows(cells, window, n_layer).to(per_layer.dtype)
    return (windows @ per_layer.flatten(1)).reshape(per_layer.shape)


TARGETS = ("metric", "log_prob")
"""What an estimator differentiates: the trace's metric, or the answer's log-probability."""

IG_ROWS_PER_PASS = 256
"""Rows (path points x corrupted samples) of one integrated-gradients pass: the memory chunk."""


def _log_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """The answer's float32 log-probability, differentiable."""
    return torch.log_softmax(logits.float(), dim=-1)[:, answer]


def check_target(target: Any, settings: TraceSettings) -> None:
    """Refuse a target that is not one of :data:`TARGETS`, or that the metric cannot convert."""
    if target not in TARGETS:
        raise InvalidInput(
            f"target must be one of {TARGETS}, got {target!r}; pass target='log_prob' to "
            "differentiate the answer's log-probability, or leave it out for the trace's metric"
        )
    if target == "log_prob" and settings.metric_names[0] not in ("prob", "log_prob"):
        raise InvalidInput(
            f"target='log_prob' is converted to the trace's scale only for the metrics 'prob' "
            f"and 'log_prob', got metric {settings.metric_names[0]!r}; pass target='metric', or "
            "metric='prob'"
        )


@dataclasses.dataclass(frozen=True)
class EstimatorInputs:
    """What an estimator works from: one clean run and the corrupted copies' gradient run.

    Attributes:
        model: The model (parameters frozen for the call).
        corrupted: The bound corruption (``samples`` copies per row block).
        clean: The clean activation at every hook point of the kinds, ``[pos, ...]``
            (``[pos, d_model]`` for the residual-width kinds, ``[pos, d_mlp]`` for neurons).
        run: The corrupted copies' activations and target gradients (:func:`corrupted_gradients`).
        target_fn: The differentiable ``(logits, answer) -> per-row scores`` differentiated.
        answer_id: The answer token (the answer's tokens, for several).
        layers: The traced layers (the window centres whose estimates are needed).
        sites: ``{kind: site}`` (with the trace's positions filled in): how a
            layer's activation becomes its cells' estimates
            (:meth:`~lenscope.sites.Site.cell_dot`); a kind not listed is the
            residual-width site of that name.
    """

    model: torch.nn.Module
    corrupted: Any
    clean: Mapping[str, Float[Tensor, "pos ..."]]
    run: "GradientRun"
    target_fn: Callable[..., Tensor]
    answer_id: int | tuple[int, ...] | engine.Members
    layers: tuple[int, ...]
    sites: Mapping[str, Site] = dataclasses.field(default_factory=dict)

    def site(self, kind: str) -> Site:
        """The site of ``kind``."""
        return self.sites.get(kind) or site(kind)


@dataclasses.dataclass(frozen=True)
class Effects:
    """One kind's estimated target changes per corrupted copy.

    Attributes:
        per_sample: ``[layer, samples, *unit]`` (``unit``: the site's unit axes,
            ``pos`` for the residual-width kinds): the change of each copy's target.
        windowed: True when each row is already its window's estimate (a joint
            path); False when rows are single layers, summed over windows after.
    """

    per_sample: Float[Tensor, "layer samples ..."]
    windowed: bool


Groups = Mapping[str, tuple[Sequence[str], int]]
"""``{kind: (hook names in layer order, window)}``: what an estimator estimates."""


@dataclasses.dataclass(frozen=True)
class AtP:
    """Attribution patching: ``(a_clean - a_corrupted) . grad`` at the corrupted run.

    Uses only the corrupted copies' one forward and backward pass; a window
    is the sum of its layers' estimates.
    """

    @property
    def name(self) -> str:
        """``"atp"``."""
        return "atp"

    def effects(
        self, inputs: EstimatorInputs, groups: Groups
    ) -> tuple[dict[str, Effects], dict[str, int]]:
        """Per-layer, per-copy estimates of every kind (no further passes)."""
        out = {}
        for kind, (names, _) in groups.items():
            where = inputs.site(kind)
            per_sample = [
                _dot(inputs.clean[n], inputs.run.activations[n], inputs.run.gradients[n], where)
                for n in names
            ]
            out[kind] = Effects(torch.stack(per_sample), windowed=False)
        return out, {}


@dataclasses.dataclass(frozen=True)
class IntegratedGradients:
    """Integrated gradients along the straight path from corrupted to clean activations.

    For a path of hook points ``H`` (one layer, or a window's layers), every
    position of each is set to ``a(alpha) = a_corrupted + alpha (a_clean -
    a_corrupted)`` at the ``steps`` midpoints ``alpha = (k + 0.5) / steps``,
    and a cell's estimate is the mean over ``alpha`` of ``grad . (a_clean -
    a_corrupted)`` there (EAP-IG on activations, Hanna et al. 2024; Marks et
    al. 2024). Summed over the positions and layers of a path it is the
    midpoint-rule integral of the target's change from restoring the whole
    path (completeness). All points ride in the batch beside the corrupted
    copies, :data:`IG_ROWS_PER_PASS` rows per forward and backward pass.

    Attributes:
        steps: Points on the path (``M`` of ``"ig:M"``).
        path: ``"window"`` (default: it agrees better with exact traces, on the
            tiny models and on Gemma-3-270m, docs/attribution.md): the window's
            layers interpolated together, one path per window; ``"layer"``:
            each layer on its own path, a window the sum of its layers' estimates.
    """

    steps: int
    path: str = "window"

    def __post_init__(self) -> None:
        """Refuse a step count below 1 or an unknown path."""
        if not is_int(self.steps) or self.steps < 1:
            raise InvalidInput(
                f"integrated gradients need a whole number of steps >= 1, got {self.steps!r}; "
                "pass e.g. estimator='ig:16'"
            )
        if self.path not in ("layer", "window"):
            raise InvalidInput(
                f"the integrated-gradients path is 'layer' or 'window', got {self.path!r}; "
                "pass e.g. estimator='ig:16' or 'ig:16:layer'"
            )

    @property
    def name(self) -> str:
        """``"ig:M"`` (window path) or ``"ig:M:layer"``."""
        return f"ig:{self.steps}" + (":layer" if self.path == "layer" else "")

    def effects(
        self, inputs: EstimatorInputs, groups: Groups
    ) -> tuple[dict[str, Effects], dict[str, int]]:
        """Estimates of every kind from one batched set of interpolated passes."""
        model = inputs.model
        n_layer = n_layers(model)
        centres = torch.tensor(inputs.layers, dtype=torch.long)
        cells = torch.stack([centres, torch.zeros_like(centres)], dim=1)
        paths: list[tuple[str, ...]] = []
        slots: dict[str, list[tuple[int, int]]] = {}  # kind -> (row of the result, path)
        sites: dict[str, Site] = {}  # hook name -> its site
        for kind, (names, window) in groups.items():
            sites.update(dict.fromkeys(names, inputs.site(kind)))
            restored = engine.restore_windows(cells, window, n_layer)
            if self.path == "window":
                rows = [
                    (int(c), tuple(names[x] for x in range(n_layer) if w[x]))
                    for c, w in zip(centres, restored, strict=True)
                ]
            else:
                needed = sorted({x for w in restored for x in range(n_layer) if w[x]})
                rows = [(x, (names[x],)) for x in needed]
            slots[kind] = []
            for row, path in rows:
                slots[kind].append((row, len(paths)))
                paths.append(path)
        totals, passes = interpolated_gradients(inputs, paths, self.steps, sites)
        out = {}
        for kind in groups:
            shape = totals[slots[kind][0][1]].shape if slots[kind] else ()
            per_sample = torch.zeros(n_layer, *shape)
            for row, index in slots[kind]:
                per_sample[row] = totals[index]
            out[kind] = Effects(per_sample, windowed=self.path == "window")
        return out, passes


Estimator = AtP | IntegratedGradients
"""An estimator object (:func:`estimator_from_name` makes one from its name)."""


def estimator_from_name(spec: "str | Estimator") -> "Estimator":
    """The estimator that ``spec`` names: ``"atp"``, ``"ig:M"`` or ``"ig:M:layer"``.

    Args:
        spec: A name, or an estimator object (returned as it is).

    Raises:
        InvalidInput: For any other name.
    """
    if isinstance(spec, AtP | IntegratedGradients):
        return spec
    parts = spec.split(":") if isinstance(spec, str) else []
    if parts == ["atp"]:
        return AtP()
    if len(parts) in (2, 3) and parts[0] == "ig" and parts[1].isdigit() and int(parts[1]) >= 1:
        if len(parts) == 2 or parts[2] in ("layer", "window"):
            return IntegratedGradients(int(parts[1]), parts[2] if len(parts) == 3 else "window")
    raise InvalidInput(
        f"estimator must be 'atp', 'ig:M' or 'ig:M:layer' (M points on the path, >= 1), got "
        f"{spec!r}; pass e.g. estimator='ig:16'"
    )


def interpolated_gradients(
    inputs: EstimatorInputs,
    paths: Sequence[Sequence[str]],
    steps: int,
    sites: Mapping[str, Site] | None = None,
) -> tuple[list[Float[Tensor, "samples ..."]], dict[str, int]]:
    """Each path's integrated gradients per corrupted copy and position, summed over its hooks.

    Rows are ``(path, step)`` copies of the corrupted samples (copy-major, as
    the engine's batches are); at each hook of a row's path the activation
    is overwritten with its interpolated value (in place, as lenscope's
    restore hooks write, so that a TransformerBridge's residual stream sees
    it), a leaf that autograd differentiates the target from.

    Args:
        inputs: The clean run, the corrupted copies' activations and the target.
        paths: Hook names interpolated together, one tuple per path.
        steps: Midpoints ``alpha = (k + 0.5) / steps`` per path.
        sites: ``{hook name: site}``: how each hook's gradient becomes cell
            estimates (:meth:`~lenscope.sites.Site.cell_dot`); default: residual width.

    Returns:
        Each path's ``[samples, *unit]`` estimates, and the passes they cost.
    """
    sites = {} if sites is None else sites
    model, corrupted = inputs.model, inputs.corrupted
    samples = corrupted.samples
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    copies = [(j, k) for j in range(len(paths)) for k in range(steps)]
    per_pass = max(1, IG_ROWS_PER_PASS // samples)
    totals: list[Tensor | None] = [None] * len(paths)
    deltas = {
        name: inputs.clean[name][None].float() - inputs.run.activations[name].float()
        for name in dict.fromkeys(n for p in paths for n in p)
    }
    decoded = engine.answer_length(inputs.answer_id)
    # Teacher forcing: an answer's positions are never restored, so the path
    # moves the prompt's positions only (the exact trace's cells) and the
    # answer's stay live. None: every position (one decoded position).
    n_prompt = None
    if decoded > 1:
        n_prompt = int(corrupted.tokens.shape[1]) - decoded + 1
        deltas = {name: delta[:, :n_prompt] for name, delta in deltas.items()}
    n_passes = 0
    for start in range(0, len(copies), per_pass):
        chunk = copies[start : start + per_pass]
        leaves: dict[str, Tensor] = {}
        members: dict[str, list[int]] = {}
        for name in deltas:
            members[name] = [c for c, (j, _) in enumerate(chunk) if name in paths[j]]
            if not members[name]:
                continue
            alpha = alphas[[chunk[c][1] for c in members[name]]].float()
            corrupted_act = inputs.run.activations[name].float()[:, :n_prompt]
            value = corrupted_act[None] + alpha[:, None, None, None] * deltas[name][None]
            leaves[name] = value.flatten(0, 1).requires_grad_(True)

        def setter(name: str) -> Any:
            rows = torch.tensor(
                [c * samples + s for c in members[name] for s in range(samples)], dtype=torch.long
            )

            def hook(act: Tensor, hook: Any) -> Tensor:
                if n_prompt is not None:
                    moved = act[:, :n_prompt]
                    moved.copy_(moved.index_put((rows.to(act.device),), leaves[name].to(act)))
                    return act
                new = act.index_put((rows.to(act.device),), leaves[name].to(act))
                return act.copy_(new)

            return hook

        hooks = [*corrupted.fwd_hooks, *((name, setter(name)) for name in leaves)]
        with torch.enable_grad():
            if decoded == 1:
                resid = run_to_final_resid(model, corrupted.batch_tokens(len(chunk)), hooks)
                logits = decode_resid(model, resid)
            else:
                final = capture_forward(model, corrupted.batch_tokens(len(chunk)), hooks)
                logits = _decode_last(model, final[FINAL_RESID], decoded)
            total = inputs.target_fn(logits, inputs.answer_id).sum()
            grads = torch.autograd.grad(total, list(leaves.values()))
        n_passes += 1
        for name, grad in zip(leaves, grads, strict=True):
            grad = grad.float().unflatten(0, (len(members[name]), samples))
            where = sites.get(name) or _RESIDUAL
            dots = where.cell_dot(grad, deltas[name]).cpu() / steps
            for c, member in enumerate(members[name]):
                path = chunk[member][0]
                # Summed as an index_add_ into zeros sums: 0 + x first, then in order.
                total = totals[path]
                totals[path] = (torch.zeros_like(dots[c]) if total is None else total) + dots[c]
    passes = {
        "interpolated_forward": n_passes,
        "interpolated_backward": n_passes,
        "interpolated_rows": len(copies) * samples,
    }
    return [t for t in totals if t is not None], passes  # every path has its steps


_RESIDUAL = site("resid_post")
"""The site of a residual-width hook point (all five contract the same way)."""


def _dot(
    clean: Float[Tensor, "pos ..."],
    corrupted: Float[Tensor, "samples pos ..."],
    gradient: Float[Tensor, "samples pos ..."],
    where: Site = _RESIDUAL,
) -> Float[Tensor, "samples ..."]:
    """``(a_clean - a_corrupted) . grad`` per copy and cell of one layer of ``where``."""
    delta = clean[None].float() - corrupted.float()
    return where.cell_dot(delta, gradient.float())


def _combine(
    effects: Effects, window: int, answer_probs: Float[Tensor, " samples"] | None
) -> Float[Tensor, "layer ..."]:
    """A kind's estimated metric change per cell: windows, conversion, mean over copies.

    Without conversion and for single-layer rows this is the historical
    order (mean over copies, then window sums; bit for bit AtP's numbers).
    With ``answer_probs`` (log_prob differentiated for a prob trace) each
    copy's windowed log-probability change ``d`` becomes ``p (exp(d) - 1)``
    before the mean, at most ``1 - p`` (``exp`` turns an overestimate of a
    few nats into a probability above 1; ``-p`` needs no bound, ``expm1 > -1``).
    """
    if answer_probs is None and not effects.windowed:
        means = torch.stack([row.mean(dim=0) for row in effects.per_sample])
        return window_sum(means.cpu(), window)
    per_sample = effects.per_sample.cpu()
    if not effects.windowed:
        per_sample = window_sum(per_sample, window)
    if answer_probs is not None:
        p = answer_probs.cpu().reshape(1, -1, *[1] * (per_sample.ndim - 2))
        # A restored probability lies in [0, 1]: the change in [-p, 1 - p].
        per_sample = torch.minimum(p * torch.expm1(per_sample), 1 - p)
    return per_sample.mean(dim=1)


def compare(
    estimate: Mapping[str, Any] | TraceResult,
    exact: Mapping[str, Any] | TraceResult,
    *,
    k: int = 5,
) -> Comparison:
    """Pearson, Spearman and top-``k`` recall of estimated against exact cells, per kind.

    Only cells traced in both (finite in both) count. Recall is the fraction
    of the exact trace's ``k`` highest cells that are among the estimate's
    ``k`` highest (ties broken by position in the grid).

    Args:
        estimate: ``{kind: result}`` from :func:`attribute` (or one result).
        exact: ``{kind: TraceResult}`` from ``trace_kinds`` (or one result).
        k: Cells of the recall.

    Returns:
        A :class:`Comparison`.
    """
    if isinstance(estimate, TraceResult):
        estimate = {estimate.kind: estimate}
    if isinstance(exact, TraceResult):
        exact = {exact.kind: exact}
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a positive integer, got {k!r}; pass e.g. k=5")
    shared = [kind for kind in estimate if kind in exact]
    if not shared:
        raise InvalidInput(
            f"compare needs a kind both results trace, got {list(estimate)} and {list(exact)}; "
            "pass the attribution and the exact trace of the same kinds"
        )
    out = {}
    for kind in shared:
        a, e = estimate[kind].scores.float(), exact[kind].scores.float()
        if a.shape != e.shape:
            raise InvalidInput(
                f"the {kind} grids differ in shape, got {tuple(a.shape)} and {tuple(e.shape)}; "
                "pass results of the same prompt and model"
            )
        both = torch.isfinite(a) & torch.isfinite(e)
        x, y = a[both].double(), e[both].double()
        top = min(k, int(both.sum()))
        best_a = set(torch.topk(x, top).indices.tolist())
        best_e = set(torch.topk(y, top).indices.tolist())
        out[kind] = KindComparison(
            kind=kind,
            pearson=_pearson(x, y),
            spearman=_pearson(_ranks(x), _ranks(y)),
            top_k_recall=len(best_a & best_e) / top if top else math.nan,
            k=top,
            cells=int(both.sum()),
        )
    return Comparison(out)


def _pearson(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def _ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks with ties averaged (as Spearman's correlation needs)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    return mean_rank[inverse]
