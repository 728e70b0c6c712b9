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
above (default); :class:`RelP` (``"relp"``: the same product with the
coefficients of layer-wise relevance propagation instead of the gradient);
:class:`AtPStar` (``"atp-star"``: GradDrop, and the QK fix for queries and
keys); or :class:`IntegratedGradients` (``"ig:M"``: the gradient averaged
over ``M`` points of the path from corrupted to clean activations).
``target="log_prob"`` differentiates the log-probability and
``target="logit_diff"`` the answer's logit minus the foil's; each is converted
to the trace's scale.

Cost of AtP (and RelP): one clean forward pass, and one forward and one
backward pass of the corrupted copies (``samples`` rows), for all kinds
together; AtP* adds one forward and backward pass of ``n_layers x samples``
rows (and, for ``q``/``k``, one forward of ``n_layers + 1`` copies).

The model is left exactly as it was (:func:`lenscope.hooks.preserved_model`):
parameters' ``requires_grad`` flags and every module's training mode are
restored, and the hooks added here are removed, also when an exception
interrupts the computation. Gradients are read by backward hooks at the hook
points, as TransformerLens 4's ``attribution_patching.py`` reads them, because
a ``TransformerBridge`` hands some forward hooks a reshaped view that its
forward pass never consumes.
"""

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
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
from lenscope.sites import HEAD_KINDS, HeadSite, NeuronSite, Site, site
from lenscope.validation import InvalidInput, is_int

__all__ = [
    "AtP",
    "AtPStar",
    "JointAtP",
    "AttributionResult",
    "Comparison",
    "IntegratedGradients",
    "RelP",
    "attribute",
    "compare",
    "estimator_from_name",
    "recheck_top",
]

ATTRIBUTION_KINDS = (*KINDS, "mlp_post", *HEAD_KINDS)
"""Kinds attribution patching estimates: residual-width activations, MLP neurons and heads."""

RELP_NO_RELEVANCE = ("q", "k", "pattern")
"""Head kinds that RelP's fixed attention patterns give no relevance (refused for ``relp``)."""


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
        estimator: The estimator's name (:func:`estimator_from_name`): ``"atp"``,
            ``"relp"``, ``"atp-star"``, ``"ig:M"`` or ``"ig:M:layer"``.
        target: The quantity differentiated: ``"metric"`` (the trace's own),
            ``"log_prob"`` or ``"logit_diff"`` (converted to the trace's scale,
            see :func:`attribute`).
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
            ``"atp"`` (default: one gradient at the corrupted run), ``"relp"``
            (relevance patching, :class:`RelP`), ``"atp-star"`` (:class:`AtPStar`),
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
            ``"logit_diff"``: the answer's logit minus the foil's (needs a
            foil; a counterfactual prompt's top token by default), allowed
            for the metrics ``prob``, ``log_prob``, ``normalized_prob``,
            ``logit_diff`` and ``normalized_logit_diff``; for the probability
            metrics each copy's change ``d`` is converted as if only the
            answer's logit moved by ``d`` (``p' = p e^d / (1 - p + p e^d)``).
        **options: As for ``trace_kinds`` (``kinds``, ``windows``, ``corruption``,
            ``metric``, ``answer``, ``foil``, ``samples``, ``seed``, ...).

    Returns:
        ``{kind: AttributionResult}`` in the order of ``kinds``.

    Raises:
        InvalidInput: For ``q``/``k``/``pattern`` with ``relp``,
            ``direction="noise"``, several metrics, ``resid_mid`` on a TransformerBridge, an unknown
            estimator or target, or any input the exact trace refuses.
    """
    estimator = estimator_from_name(estimator)
    settings = tracer.settings(settings, **options)
    _check_supported(tracer.model, settings, estimator)
    check_target(target, settings)
    started = time.perf_counter()
    model = tracer.model
    prepared = prepare(model, prompt, subject, settings, sequences=True)
    settings = prepared.settings
    names = list(prepared.names)
    answer = prepared.answer_ids or ()
    _check_sequence(prepared, estimator)
    if target == "logit_diff" and (
        len(prepared.answer_ids or ()) > 1 or len(prepared.foil_ids or ()) > 1
    ):
        raise InvalidInput(
            f"target='logit_diff' differentiates one answer token against one foil token, got "
            f"answer {list(prepared.answer_ids or ())} and foil {list(prepared.foil_ids or ())}; "
            "pass target='metric' (the sequence's log-probability), or tokens of one piece"
        )
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
            if target == "logit_diff":
                return _logit_diff_target(measure.foil_id)
            return _log_prob if target == "log_prob" else measure.metrics[0].differentiable()

        def scored(measure: Measure) -> Any:
            if measure.members is not None:
                return engine.Members(measure.members)
            return measure.answer_ids if decoded > 1 else measure.answer_id

        probed = [
            name
            for where in prepared.sites
            if isinstance(where, HeadSite)
            for name in where.hook_names(prepared.n_layer)
        ]
        grads = corrupted_gradients(
            model,
            corrupted,
            names,
            scores_of,
            decoded=decoded,
            rules=estimator.rules(model),
            probed=probed,
        )
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
    # A target other than the metric: each copy's estimated change of the
    # target becomes the change of the trace's metric (_CONVERSIONS).
    convert = _CONVERSIONS.get((target, settings.metric_names[0]))
    answer_probs = None
    if convert is not None:
        answer_probs = (
            _members_log_prob(corrupted_logits, measure.members).exp()
            if measure.members is not None
            else softmax(corrupted_logits)[:, measure.answer_id]
            if decoded == 1
            else _sequence_log_prob(corrupted_logits, measure.answer_ids).exp()
        )
    grids = {}
    for where in prepared.sites:
        estimate = _combine(
            effects[where.name], settings.windows[where.name], answer_probs, convert
        )
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
    layers and positions of every kind's top ``k`` cells, for all kinds
    together (their product: the union of the kinds' top layers times the
    union of their top positions). Every cell that trace restored then
    carries its exact score, the top ``k`` and the rest of the product alike
    (they cost nothing more, and on ROME's facts they find the exact top 5
    far more often than the top ``k`` alone: docs/attribution.md); every other
    cell keeps its estimate. Cells the estimate ranks low at layers and
    positions outside the product are not found this way (the estimate's
    failure mode on ``mlp_out`` windows). On a per-neuron kind the product is
    of the top cells' layers and neurons (not all ``d_mlp`` neurons of a
    layer). Positions are narrowed only when every kind's cells name one (a
    cell of ``by="neuron"`` or ``by="head"`` restores at every traced
    position, so with those the trace keeps the settings' positions).

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
        and ``passes["exact_cells"]``, the cells per kind the exact trace
        restored (each now carries its exact score).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a positive integer, got {k!r}; pass e.g. k=5")
    settings = tracer.settings(settings, **options)
    tops = {kind: _top_cells(r.scores, k) for kind, r in estimates.items()}
    layers = sorted({int(c[0]) for cells in tops.values() for c in cells})
    narrowed: dict[str, Any] = {"layers": layers}
    # Positions narrow only when every kind's cells name one: a cell of
    # by="neuron" or by="head" restores at every position the trace traces.
    if all(r.axes[-1] == "pos" for r in estimates.values()):
        narrowed["positions"] = sorted({int(c[-1]) for cells in tops.values() for c in cells})
    sites = {s.name: s for s in settings.sites}
    kinds = []
    for kind, r in estimates.items():
        where = sites[kind]
        if isinstance(where, NeuronSite):  # the top neurons, not all d_mlp of each layer
            where = where.only_neurons([int(c[1]) for c in tops[kind]])
        kinds.append(where)
    # The sites carry their own `by`; the settings' would name kinds they no longer hold.
    settings = dataclasses.replace(settings, kinds=tuple(kinds), by=None)
    exact = tracer.trace_kinds(prompt, subject, settings, progress=False, **narrowed)
    out = {}
    for kind, r in estimates.items():
        traced = torch.isfinite(exact[kind].scores)
        scores = r.scores.clone()
        scores[traced] = exact[kind].scores[traced]
        out[kind] = dataclasses.replace(
            r,
            scores=scores,
            method="attribution+exact_top_k",
            passes={**r.passes, "exact_cells": int(traced.sum())},
        )
    return out


def _top_cells(scores: Float[Tensor, "..."], k: int) -> Int[Tensor, "cell axis"]:
    """The ``k`` highest finite cells, highest first.

    One row per cell, one column per axis: ``(layer, pos)``, ``(layer, neuron)``, ...
    """
    flat = torch.nan_to_num(scores.float(), nan=-math.inf).flatten()
    n = min(k, int(torch.isfinite(scores).sum()))
    return torch.stack(torch.unravel_index(_highest(flat, n), scores.shape), dim=1)


def _highest(values: Float[Tensor, " n"], k: int) -> Int[Tensor, " k"]:
    """Indices of the ``k`` highest values, highest first, ties to the lower index.

    (``torch.topk`` breaks ties as its kernel happens to.)
    """
    return torch.sort(values, descending=True, stable=True).indices[:k]


def _check_supported(
    model: torch.nn.Module, settings: TraceSettings, estimator: "Estimator | None" = None
) -> None:
    """Refuse what attribution patching here does not estimate, saying what to do instead."""
    fixed = [k for k in settings.kinds if k in RELP_NO_RELEVANCE]
    if isinstance(estimator, RelP) and fixed:
        raise InvalidInput(
            f"estimator='relp' holds every attention pattern fixed (the AH-rule), so queries, "
            f"keys and patterns receive no relevance, got kinds {fixed}; pass estimator='atp' "
            "or 'ig:16' for them, or kinds 'z' / 'v' (the heads' outputs and values)"
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

    Every estimator but AtP* takes an answer of several tokens (its teacher-forced
    log-probability, or probability, is the target) and an answer set whose
    members one run scores; a logit difference of several tokens, and a set
    needing several runs, are traced exactly.
    """
    answer, foil = prepared.answer_ids or (), prepared.foil_ids or ()
    members = prepared.answer_set
    if len(answer) <= 1 and len(foil) <= 1 and members is None:
        return
    if isinstance(estimator, AtPStar):
        raise InvalidInput(
            f"estimator='atp-star' estimates an answer of one token (its GradDrop and QK "
            f"passes decode the last position only), got answer {list(answer)}"
            + ("" if members is None else f" (an answer set {[list(m) for m in members]})")
            + "; pass estimator='atp', 'relp' or 'ig:16', or trace it exactly"
        )
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
    rules: Sequence[tuple[str, Callable[..., Any]]] = (),
    probed: Sequence[str] = (),
    copies: int = 1,
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
        rules: Forward hooks, added after the others, that change how the
            backward pass propagates without changing the forward values
            (:meth:`RelP.rules`); none for plain gradients.
        probed: Hook points (among ``names``) whose gradient is read from a
            zero "probe" added to the activation by their forward hook (the
            hook returns ``act + probe``), not from a backward hook: a
            TransformerBridge's per-head hook points (``attn.hook_z``,
            ``hook_q``, ...) convert the tensor for their hooks and never fire
            a backward hook, but the tensor a hook returns is converted back
            and consumed.
        copies: Copies of the corrupted rows in the batch (copy-major), for
            ``rules`` that treat the copies differently (:class:`AtPStar`'s GradDrop).
    """
    final_name = hook_name("resid_post", n_layers(model) - 1)
    activations: dict[str, Tensor] = {}
    gradients: dict[str, Tensor] = {}
    live: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook: Any) -> Tensor:
        live[EMBED_HOOK] = act.detach().clone().requires_grad_(True)
        return live[EMBED_HOOK]

    def keep(name: str) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            activations[name] = act.detach().clone()
            if name not in probed:
                live[name] = act
                return None
            live[name] = torch.zeros_like(act, requires_grad=True)
            return act + live[name]

        return hook

    def grab(name: str) -> Any:
        def hook(grad: Tensor, hook: Any) -> None:
            gradients[name] = grad.detach().clone()

        return hook

    def stop(act: Tensor, hook: Any) -> None:
        live[final_name] = act
        raise _Stop

    # The rules first: a rule that rebuilds its hook point's value (RelP's at
    # mlp.hook_post) must run before the hook that reads the gradient there,
    # or the gradient site would sit on the tensor the rule replaced.
    fwd = [*corrupted.fwd_hooks, (EMBED_HOOK, leaf), *rules]
    fwd.extend((n, keep(n)) for n in names)
    fwd.append((final_name, stop))
    bwd = [(n, grab(n)) for n in names if n != final_name and n not in probed]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd), _quiet_rules(rules):
        try:
            model(corrupted.batch_tokens(copies))
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


TARGETS = ("metric", "log_prob", "logit_diff")
"""What an estimator differentiates: the trace's metric, the answer's
log-probability, or its logit minus the foil's."""

IG_ROWS_PER_PASS = 256
"""Rows (path points x corrupted samples) of one integrated-gradients pass: the memory chunk."""


def _log_prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
    """The answer's float32 log-probability, differentiable."""
    return torch.log_softmax(logits.float(), dim=-1)[:, answer]


def _logit_diff_target(foil: int | None) -> Callable[..., Tensor]:
    """``logit[answer] - logit[foil]`` per row, float32, differentiable."""
    if foil is None:
        raise InvalidInput(
            "target='logit_diff' differentiates the answer's logit minus a foil's, got no foil; "
            "pass foil=' Rome' (or a counterfactual prompt, whose top token is the foil)"
        )

    def target(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
        return logits[:, answer].float() - logits[:, foil].float()

    return target


def check_target(target: Any, settings: TraceSettings) -> None:
    """Refuse a target that is not one of :data:`TARGETS`, or that the metric cannot convert."""
    if target not in TARGETS:
        raise InvalidInput(
            f"target must be one of {TARGETS}, got {target!r}; pass target='log_prob' to "
            "differentiate the answer's log-probability, or leave it out for the trace's metric"
        )
    metric = settings.metric_names[0]
    if target == "log_prob" and metric not in ("prob", "log_prob"):
        raise InvalidInput(
            f"target='log_prob' is converted to the trace's scale only for the metrics 'prob' "
            f"and 'log_prob', got metric {metric!r}; pass target='metric', or "
            "metric='prob'"
        )
    logit_diff_metrics = ("prob", "log_prob", "normalized_prob", "logit_diff")
    if target == "logit_diff" and metric not in (*logit_diff_metrics, "normalized_logit_diff"):
        raise InvalidInput(
            f"target='logit_diff' is converted to the trace's scale only for the metrics "
            f"{(*logit_diff_metrics, 'normalized_logit_diff')}, got metric {metric!r}; pass "
            "target='metric'"
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

    def rules(self, model: torch.nn.Module) -> list[tuple[str, Callable[..., Any]]]:
        """Plain gradients: no forward hook changes the backward pass."""
        return []

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

    @property
    def alphas(self) -> tuple[float, ...] | None:
        """The points on the path: None, the ``steps`` midpoints."""
        return None

    def rules(self, model: torch.nn.Module) -> list[tuple[str, Callable[..., Any]]]:
        """Plain gradients at the corrupted run (its own passes interpolate)."""
        return []

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
        totals, passes = interpolated_gradients(inputs, paths, self.steps, sites, self.alphas)
        out = {}
        for kind in groups:
            shape = totals[slots[kind][0][1]].shape if slots[kind] else ()
            per_sample = torch.zeros(n_layer, *shape)
            for row, index in slots[kind]:
                per_sample[row] = totals[index]
            out[kind] = Effects(per_sample, windowed=self.path == "window")
        return out, passes


@dataclasses.dataclass(frozen=True)
class JointAtP(IntegratedGradients):
    """AtP of a window restored as one joint patch: ``"atp:window"``.

    Plain AtP sums a window's single-layer steps, each gradient taken with the
    window's other layers live (a restored layer also changes what the next
    one receives). Restoring a window sets all its layers at once, so its
    first-order term is the gradient with the window's layers held at their
    corrupted values, dotted with ``a_clean - a_corrupted`` at each: the
    integrated-gradients window path at the single point ``alpha = 0``. With
    window 1 it is plain AtP. Cost: a window's layers are held per path, so
    one row per (traced layer, sample, kind), as ``ig:1``.
    """

    steps: int = 1
    path: str = "window"

    def __post_init__(self) -> None:
        """Refuse anything but one point on the window path."""
        if (self.steps, self.path) != (1, "window"):
            raise InvalidInput(
                f"the joint-window AtP takes one point on the window path, got steps="
                f"{self.steps!r}, path={self.path!r}; pass estimator='atp:window', or 'ig:M' "
                "for more points"
            )

    @property
    def name(self) -> str:
        """``"atp:window"``."""
        return "atp:window"

    @property
    def alphas(self) -> tuple[float, ...]:
        """The corrupted run: ``alpha = 0``."""
        return (0.0,)


@dataclasses.dataclass(frozen=True)
class RelP(AtP):
    """Relevance patching (Rezaei Jafari et al. 2025, arXiv 2508.21258).

    AtP's product ``(a_clean - a_corrupted) . g`` with ``g`` the
    layer-wise relevance propagation (LRP) coefficients in place of the
    gradient: one forward and one backward pass of the corrupted copies, as
    AtP, whose backward follows the rules of :func:`relevance_rules` (the
    forward values are unchanged). A window is the sum of its layers' estimates.
    """

    @property
    def name(self) -> str:
        """``"relp"``."""
        return "relp"

    def rules(self, model: torch.nn.Module) -> list[tuple[str, Callable[..., Any]]]:
        """The LRP rules as forward hooks (:func:`relevance_rules`)."""
        return relevance_rules(model)


def relevance_rules(model: torch.nn.Module) -> list[tuple[str, Callable[..., Any]]]:
    """Forward hooks whose backward pass is RelP's LRP rules; the forward values are kept.

    Each hook returns a tensor equal to its input (up to float rounding) in
    which the factor an LRP rule holds fixed is detached:

    - LayerNorm / RMSNorm (LN-rule): every norm's ``hook_scale`` is detached,
      so a norm is the linear map ``x -> (x - mean) / s * w + b`` with ``s`` fixed.
    - Attention (AH-rule, CP-LRP): ``attn.hook_pattern`` is detached; the
      head is linear in its values, queries and keys receive nothing.
    - The MLP activation (identity rule): ``post = pre * [act(pre) / pre]``
      with the bracket detached (0 where ``pre`` is exactly 0).
    - A gated MLP's product ``act(gate) * linear`` (uniform or half rule, as
      AttnLRP's ``mul2``): half of the relevance to each factor,
      ``0.5 act(gate) linear~ + 0.5 act(gate)~ linear`` (``~`` detached), and
      the gate's activation by the identity rule.

    Args:
        model: A HookedTransformer or TransformerBridge (compatibility mode).

    Returns:
        ``[(hook name, forward hook)]`` for one forward pass.

    Raises:
        InvalidInput: If a block lacks a hook point the rules need.
    """
    available = set(model.hook_dict)
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    parts = ("attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post")
    parts = (*parts, "mlp.hook_pre_linear") if gated else parts
    layers = range(n_layers(model))
    missing = [
        f"blocks.{x}.{p}" for x in layers for p in parts if f"blocks.{x}.{p}" not in available
    ]
    if missing:
        raise InvalidInput(
            f"estimator='relp' needs the hook points {list(parts)} in every block, got "
            f"{model_name(model)!r} without {missing[:3]}; pass estimator='atp' or 'ig:16'"
        )
    live: dict[tuple[str, int], Tensor] = {}

    def detached(act: Tensor, hook: Any) -> Tensor:
        return act.detach()

    def keep(key: tuple[str, int]) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            live[key] = act

        return hook

    def identity_rule(layer: int) -> Callable[..., Tensor]:
        def hook(post: Tensor, hook: Any) -> Tensor:
            pre = live.pop(("pre", layer))
            return pre * (post / _nonzero(pre)).detach()

        return hook

    def half_rule(layer: int) -> Callable[..., Tensor]:
        def hook(post: Tensor, hook: Any) -> Tensor:
            gate, linear = live.pop(("pre", layer)), live.pop(("linear", layer))
            activation = (post / _nonzero(linear)).detach()
            through_gate = gate * (activation / _nonzero(gate)).detach()
            return 0.5 * through_gate * linear.detach() + 0.5 * activation * linear

        return hook

    hooks: list[tuple[str, Callable[..., Any]]] = [
        (name, detached) for name in sorted(available) if name.endswith("hook_scale")
    ]
    for x in layers:
        hooks.append((f"blocks.{x}.attn.hook_pattern", detached))
        hooks.append((f"blocks.{x}.mlp.hook_pre", keep(("pre", x))))
        if gated:
            hooks.append((f"blocks.{x}.mlp.hook_pre_linear", keep(("linear", x))))
        hooks.append((f"blocks.{x}.mlp.hook_post", (half_rule if gated else identity_rule)(x)))
    return hooks


def _nonzero(x: Tensor) -> Tensor:
    """``x`` with exact zeros replaced by 1 (a divisor; the quotient's numerator is 0 there)."""
    return torch.where(x == 0, torch.ones_like(x), x)


NATIVE_NORM_EDIT = "A forward hook edited hook_scale"
"""The start of TransformerLens 4's warning when a hook edits a norm's ``hook_scale``."""


@contextlib.contextmanager
def _quiet_rules(rules: Sequence[Any]) -> Iterator[None]:
    """Silence TL4's warning that a norm reconstructs its output from an edited scale.

    RelP detaches ``hook_scale`` on purpose; the reconstruction differs from
    the native norm at float rounding only.
    """
    with warnings.catch_warnings():
        if rules:
            warnings.filterwarnings("ignore", message=NATIVE_NORM_EDIT)
        yield


@dataclasses.dataclass(frozen=True)
class AtPStar:
    """AtP* (Kramar et al. 2024, arXiv 2403.00745): GradDrop, and the QK fix for queries and keys.

    GradDrop: for each layer ``l``, the AtP estimate of every cell with the
    gradient that flows back through layer ``l``'s attention and MLP outputs
    (``hook_attn_out``, ``hook_mlp_out``) dropped, the residual path kept:
    ``c_l``. A cell of layer ``n`` gets ``1 / (L - 1) sum_{l != n} |c_l|``,
    per corrupted copy, then the copies' mean (each copy is its own
    clean/corrupted pair, as AtP* defines it for one pair). All ``L`` dropped
    copies ride in one batched forward and backward pass.

    QK fix (kinds ``q`` and ``k``): a query's or key's effect goes to the
    output through its layer's attention pattern; the pattern the patch
    gives is computed exactly (a softmax of the patched scores: one forward
    of copies with a layer's queries, or keys, set to their clean values,
    every head and position at once, reading ``hook_attn_scores``), and only
    the rest is linear: ``c = sum (A_patched - A_corrupted) . dM/dA``, with
    ``dM/dA`` from the GradDrop pass. For one key position ``s`` the
    patched row is the corrupted row with that one score changed, softmaxed
    again. Other kinds: GradDrop of the AtP estimate.

    The estimates are magnitudes (>= 0), as AtP* ranks nodes by ``|effect|``.
    """

    @property
    def name(self) -> str:
        """``"atp-star"``."""
        return "atp-star"

    def rules(self, model: torch.nn.Module) -> list[tuple[str, Callable[..., Any]]]:
        """Plain gradients at the corrupted run (its own passes drop layers)."""
        return []

    def effects(
        self, inputs: EstimatorInputs, groups: Groups
    ) -> tuple[dict[str, Effects], dict[str, int]]:
        """GradDrop (and the QK fix) per layer and copy of every kind."""
        model, corrupted = inputs.model, inputs.corrupted
        n_layer, samples = n_layers(model), corrupted.samples
        patterns = {
            kind: [f"blocks.{x}.attn.hook_pattern" for x in range(n_layer)]
            for kind in groups
            if kind in ("q", "k")
        }
        names = list(dict.fromkeys(n for names, _ in groups.values() for n in names))
        names += [n for group in patterns.values() for n in group if n not in names]
        probed = [n for n in names if ".attn.hook_" in n]
        dropped = corrupted_gradients(
            model,
            corrupted,
            names,
            lambda logits: inputs.target_fn(logits, inputs.answer_id),
            rules=_drop_rules(n_layer, samples),
            probed=probed,
            copies=n_layer,
        )
        passes = {
            "graddrop_forward": 1,
            "graddrop_backward": 1,
            "graddrop_rows": n_layer * samples,
        }
        scores = _patched_scores(inputs, tuple(patterns)) if patterns else {}
        if patterns:
            passes |= {"qk_forward": 1, "qk_rows": (len(patterns) * n_layer + 1) * samples}
        out = {}
        for kind, (hooks, _) in groups.items():
            where = inputs.site(kind)
            rows = []
            for layer, name in enumerate(hooks):
                grad = dropped.gradients[name if kind not in patterns else patterns[kind][layer]]
                grad = grad.float().unflatten(0, (n_layer, samples))  # [dropped layer, s, ...]
                if kind in patterns:
                    per_drop = _qk_fixed(where, kind, layer, scores, grad)
                else:
                    delta = inputs.clean[name][None].float() - inputs.run.activations[name].float()
                    per_drop = where.cell_dot(grad, delta)
                others = [x for x in range(n_layer) if x != layer]
                rows.append(per_drop[others].abs().sum(0) / max(1, n_layer - 1))
            out[kind] = Effects(torch.stack(rows), windowed=False)
        return out, passes


def _drop_rules(n_layer: int, samples: int) -> list[tuple[str, Callable[..., Any]]]:
    """Forward hooks zeroing, in copy ``l``, the gradient through layer ``l``'s outputs."""

    def drop(layer: int) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            keep = torch.ones(act.shape[0], *[1] * (act.ndim - 1), dtype=act.dtype)
            keep[layer * samples : (layer + 1) * samples] = 0
            act.register_hook(lambda grad: grad * keep.to(grad.device))

        return hook

    return [
        (hook_name(kind, layer), drop(layer))
        for layer in range(n_layer)
        for kind in ("attn_out", "mlp_out")
    ]


def _patched_scores(inputs: EstimatorInputs, kinds: Sequence[str]) -> dict[str, Tensor]:
    """Attention scores of the corrupted copies, and with one layer's ``q`` or ``k`` clean.

    One forward without gradients of ``(kinds x L + 1) x samples`` rows: copy
    ``(kind, l)`` sets layer ``l``'s queries (or keys) to the clean ones at
    every head and position; the last copy is unpatched.

    Returns:
        ``{"corrupted": [L, s, head, dest, src], "q": ..., "k": ...}``.
    """
    model, corrupted = inputs.model, inputs.corrupted
    n_layer, samples = n_layers(model), corrupted.samples
    copies = [(kind, x) for kind in kinds for x in range(n_layer)] + [("corrupted", -1)]

    def setter(kind: str, layer: int) -> Callable[..., Tensor]:
        rows = torch.tensor(
            [
                c * samples + i
                for c, (k, x) in enumerate(copies)
                if (k, x) == (kind, layer)
                for i in range(samples)
            ]
        )
        clean = inputs.clean[f"blocks.{layer}.attn.hook_{kind}"]

        def hook(act: Tensor, hook: Any) -> Tensor:
            new = act.index_put(
                (rows.to(act.device),), clean.to(act)[None].expand(len(rows), *clean.shape)
            )
            return act.copy_(new)

        return hook

    hooks = [
        (f"blocks.{x}.attn.hook_{kind}", setter(kind, x)) for kind in kinds for x in range(n_layer)
    ]
    capture = [f"blocks.{x}.attn.hook_attn_scores" for x in range(n_layer)]
    with torch.no_grad():
        store = capture_forward(
            model,
            corrupted.batch_tokens(len(copies)),
            [*corrupted.fwd_hooks, *hooks],
            capture,
            clone=True,
        )
    per_copy = torch.stack([store[n].float() for n in capture])  # [L, copies*s, h, d, s]
    per_copy = per_copy.unflatten(1, (len(copies), samples))
    out = {"corrupted": per_copy[:, -1]}
    for kind in kinds:
        index = [c for c, (k, _) in enumerate(copies) if k == kind]
        out[kind] = per_copy[torch.arange(n_layer), torch.tensor(index)]
    return out


def _qk_fixed(
    where: Site, kind: str, layer: int, scores: Mapping[str, Tensor], grad: Tensor
) -> Float[Tensor, "drop samples ..."]:
    """The QK fix of layer ``layer``'s queries or keys, per dropped layer: ``(A' - A) . dM/dA``.

    Args:
        where: The head site (``by`` and the key/value grouping).
        kind: ``"q"`` or ``"k"``.
        layer: The layer of the queries or keys.
        scores: :func:`_patched_scores`.
        grad: ``dM/dA`` of that layer's pattern per dropped layer, ``[drop, s, head, dest, src]``.

    Returns:
        ``[drop, s, head]`` or ``[drop, s, head, pos]`` (``pos``: the query's
        or the key's position).
    """
    before, after = scores["corrupted"][layer], scores[kind][layer]  # [s, head, dest, src]
    pattern = torch.softmax(before, dim=-1)
    baseline = (pattern * grad).sum(-1)  # [drop, s, head, dest]
    group = getattr(where, "group", 1)
    if kind == "q" or where.by == "head":
        # Every changed row at once is exact (rows are independent): for "q" by
        # position each row is its own query's, and by head the rows add up.
        patched = torch.softmax(after, dim=-1)
        per_row = (patched * grad).sum(-1) - baseline  # [drop, s, head, dest]
        if kind == "q":
            return per_row.sum(-1) if where.by == "head" else per_row
        per_head = per_row.sum(-1)  # [drop, s, head]
        return per_head.unflatten(-1, (-1, group)).sum(-1)
    # One key position changed in every row: the row's scores with that one entry
    # patched, for every key position at once ([s, head, dest, key, src]), softmaxed.
    n_pos = before.shape[-1]
    one = torch.eye(n_pos, dtype=torch.bool, device=before.device)  # [key, src]
    rows = torch.where(one, after[..., :, None, :], before[..., :, None, :])
    patched = torch.softmax(rows, dim=-1)
    new = einops.einsum(
        patched, grad, "s head dest key src, drop s head dest src -> drop s head dest key"
    )
    change = (new - baseline[..., None]).sum(-2)  # over query rows: [drop, s, head, key]
    return change.unflatten(-2, (-1, group)).sum(-2)


Estimator = AtP | IntegratedGradients | AtPStar
"""An estimator object (:func:`estimator_from_name` makes one from its name)."""


def estimator_from_name(spec: "str | Estimator") -> "Estimator":
    """The estimator a name such as ``"atp"``, ``"relp"`` or ``"ig:16"`` names.

    Names: ``"atp"``, ``"atp:window"``, ``"atp-star"``, ``"relp"``, ``"ig:M"`` and
    ``"ig:M:layer"``.

    Args:
        spec: A name, or an estimator object (returned as it is).

    Raises:
        InvalidInput: For any other name.
    """
    if isinstance(spec, AtP | IntegratedGradients | AtPStar):
        return spec
    parts = spec.split(":") if isinstance(spec, str) else []
    if parts == ["atp"]:
        return AtP()
    if parts == ["relp"]:
        return RelP()
    if parts == ["atp", "window"]:
        return JointAtP()
    if spec == "atp-star":
        return AtPStar()
    if len(parts) in (2, 3) and parts[0] == "ig" and parts[1].isdigit() and int(parts[1]) >= 1:
        if len(parts) == 2 or parts[2] in ("layer", "window"):
            return IntegratedGradients(int(parts[1]), parts[2] if len(parts) == 3 else "window")
    raise InvalidInput(
        "estimator must be 'atp', 'atp-star', 'relp', 'ig:M' or 'ig:M:layer' (M points on the "
        "path, >= 1), or 'atp:window' (AtP of each window as one joint patch), "
        f"got {spec!r}; pass e.g. estimator='ig:16'"
    )


def interpolated_gradients(
    inputs: EstimatorInputs,
    paths: Sequence[Sequence[str]],
    steps: int,
    sites: Mapping[str, Site] | None = None,
    alphas: Sequence[float] | None = None,
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
        alphas: The ``steps`` points on the path, each in ``[0, 1]``; default the
            midpoints. ``[0.0]`` is the joint patch's gradient at the corrupted run.

    Returns:
        Each path's ``[samples, *unit]`` estimates, and the passes they cost.
    """
    sites = {} if sites is None else sites
    model, corrupted = inputs.model, inputs.corrupted
    samples = corrupted.samples
    if alphas is None:
        alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    else:
        alphas = torch.tensor(alphas, dtype=torch.float64)
        if alphas.shape != (steps,):
            raise InvalidInput(
                f"interpolated_gradients needs one point per step, got {steps} steps and "
                f"points {alphas.tolist()}; pass alphas of length steps"
            )
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
        patterns = [name for name in deltas if name.endswith("hook_pattern")]
        if patterns:
            raise InvalidInput(
                f"integrated gradients of an answer of several tokens move the prompt's "
                f"positions only, which an attention pattern's (head, query, key) grid does not "
                f"keep apart, got {patterns[0]!r}; pass estimator='atp' for kind 'pattern', or "
                "an answer of one token"
            )
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
            alpha = alpha.reshape(-1, *[1] * corrupted_act.ndim)
            value = corrupted_act[None] + alpha * deltas[name][None]
            leaves[name] = value.flatten(0, 1).requires_grad_(True)

        def setter(name: str) -> Any:
            rows = torch.tensor(
                [c * samples + s for c in members[name] for s in range(samples)], dtype=torch.long
            )

            def hook(act: Tensor, hook: Any) -> Tensor:
                # A head's hook point consumes the returned tensor (an in-place write
                # would change softmax's saved output, a pattern): write into a copy.
                head = ".attn.hook_" in name
                if n_prompt is not None:
                    target = act.clone() if head else act
                    moved = target[:, :n_prompt]
                    moved.copy_(moved.index_put((rows.to(act.device),), leaves[name].to(act)))
                    return target
                new = act.index_put((rows.to(act.device),), leaves[name].to(act))
                return new if head else act.copy_(new)

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
    effects: Effects,
    window: int,
    answer_probs: Float[Tensor, " samples"] | None,
    convert: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Float[Tensor, "layer ..."]:
    """A kind's estimated metric change per cell: windows, conversion, mean over copies.

    Without conversion and for single-layer rows this is the historical
    order (mean over copies, then window sums; bit for bit AtP's numbers).
    With ``convert`` (a target other than the metric, :data:`_CONVERSIONS`)
    each copy's windowed target change ``d`` becomes ``convert(d, p)``, with
    ``p`` that copy's corrupted answer probability, before the mean.
    """
    if convert is None and not effects.windowed:
        means = torch.stack([row.mean(dim=0) for row in effects.per_sample])
        return window_sum(means.cpu(), window)
    per_sample = effects.per_sample.cpu()
    if not effects.windowed:
        per_sample = window_sum(per_sample, window)
    if convert is not None and answer_probs is not None:
        p = answer_probs.cpu().reshape(1, -1, *[1] * (per_sample.ndim - 2))
        per_sample = convert(per_sample, p)
    return per_sample.mean(dim=1)


def _log_prob_to_prob(d: Tensor, p: Tensor) -> Tensor:
    """A log-probability change ``d`` as the probability change ``p (exp(d) - 1)`` (<= ``1 - p``).

    A restored probability lies in [0, 1]: ``exp`` turns an overestimate of
    a few nats into a probability above 1 (``-p`` needs no bound, ``expm1 > -1``).
    """
    return torch.minimum(p * torch.expm1(d), 1 - p)


def _logit_diff_to_prob(d: Tensor, p: Tensor) -> Tensor:
    """A logit-difference change ``d`` as a probability change: as if only the answer's moved.

    ``p' = p e^d / (1 - p + p e^d)``, so ``p' - p = p (1 - p) (e^d - 1) / (1 + p (e^d - 1))``
    (in ``[-p, 1 - p]``; ``d`` clipped to 50 nats against overflow).
    """
    grow = torch.expm1(d.clamp(max=50.0))
    return p * (1 - p) * grow / (1 + p * grow)


def _logit_diff_to_log_prob(d: Tensor, p: Tensor) -> Tensor:
    """A logit-difference change ``d`` as ``log p' - log p = d - log(1 + p (e^d - 1))``."""
    d = d.clamp(max=50.0)
    return d - torch.log1p(p * torch.expm1(d))


_CONVERSIONS: dict[tuple[str, str], Callable[[Tensor, Tensor], Tensor]] = {
    ("log_prob", "prob"): _log_prob_to_prob,
    ("logit_diff", "prob"): _logit_diff_to_prob,
    ("logit_diff", "normalized_prob"): _logit_diff_to_prob,
    ("logit_diff", "log_prob"): _logit_diff_to_log_prob,
}
"""``(target, metric) -> convert(d, p)``: a copy's target change as its metric change.

A target equal to the metric's own quantity (``log_prob`` for ``log_prob``,
``logit_diff`` for ``logit_diff`` and ``normalized_logit_diff``, which the
trace normalises afterwards as it normalises the metric) needs none.
"""


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
        best_a, best_e = set(_highest(x, top).tolist()), set(_highest(y, top).tolist())
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
