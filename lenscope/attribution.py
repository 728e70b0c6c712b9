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

Cost: one clean forward pass, and one forward and one backward pass of the
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

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from lenscope import engine, metrics
from lenscope.hooks import (
    EMBED_HOOK,
    check_hook_points,
    decode_resid,
    hook_name,
    is_bridge,
    model_name,
    n_layers,
    preserved_model,
)
from lenscope.metrics import PatchingMetric, softmax
from lenscope.results import TraceResult
from lenscope.settings import TraceSettings, resolve_prompt
from lenscope.sites import HeadSite
from lenscope.tokens import token_labels
from lenscope.validation import InvalidInput

__all__ = ["AttributionResult", "Comparison", "attribute", "compare", "recheck_top"]

ATTRIBUTION_KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
"""Kinds attribution patching estimates: the residual-width activations."""


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
    """

    method: str = "attribution"
    passes: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def top_predictions(self, layer: int, pos: int) -> list[tuple[str, float]]:
        """None: no restored run is decoded, so a cell has no top-k (an empty list)."""
        if not (-self.n_layers <= layer < self.n_layers and -self.n_pos <= pos < self.n_pos):
            return super().top_predictions(layer, pos)  # raises, with the usual message
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
        **options: As for ``trace_kinds`` (``kinds``, ``windows``, ``corruption``,
            ``metric``, ``answer``, ``foil``, ``samples``, ``seed``, ...).

    Returns:
        ``{kind: AttributionResult}`` in the order of ``kinds``.

    Raises:
        InvalidInput: For a per-head kind, ``direction="noise"``, several
            metrics, ``resid_mid`` on a TransformerBridge, or any input the
            exact trace refuses.
    """
    settings = tracer.settings(settings, **options)
    _check_supported(tracer.model, settings)
    started = time.perf_counter()
    model = tracer.model
    n_layer = n_layers(model)
    sites = tuple(where.for_model(model) for where in settings.sites)
    names = [name for s in sites for name in s.hook_names(n_layer)]
    check_hook_points(model, [EMBED_HOOK, *names])
    resolved = resolve_prompt(model, prompt, subject, settings)
    tokens, subject_range = resolved.tokens, resolved.subject_range
    answer_id, foil_id = resolved.answer_id, resolved.foil_id
    settings = settings.for_model(model)
    corruption = settings.corruption
    pos_list = settings.position_list(tokens.shape[0], subject_range)
    top_k = settings.top_k

    with preserved_model(model):
        for param in model.parameters():
            param.requires_grad_(False)
        with torch.no_grad():
            corrupted = corruption.bind(model, tokens, subject_range)
            clean = engine.clean_run(model, tokens, names)
        if answer_id is None:
            answer_id = int(clean.logits.argmax())
        bound: list[metrics.BoundMetric] = []

        def metric_for(logits: Tensor) -> PatchingMetric:
            # Bound once the corrupted logits are known: a counterfactual
            # prompt's top-1 is the default foil, as in the exact trace.
            nonlocal foil_id
            if foil_id is None and corruption.has_counterfactual_answer:
                foil_id = int(softmax(logits.detach()).mean(dim=0).argmax())
                if foil_id == answer_id and settings.needs_foil:
                    raise InvalidInput(
                        "the counterfactual prompt's top-1 token is the answer itself "
                        f"({token_labels(model, [answer_id])[0]!r}), so the logit difference "
                        "has no foil; pass foil=... (the counterfactual's answer), or a "
                        "counterfactual that changes the answer"
                    )
            bound.append(
                metrics.bind_metric(
                    settings.metric_specs[0], foil_id=foil_id, clean_logits=clean.logits
                )
            )
            return differentiable(bound[0].fn)

        grads = corrupted_gradients(model, corrupted, names, metric_for, answer_id)
    (bound,) = bound  # type: ignore[assignment]
    corrupted_logits = grads.logits
    clean_scores, clean_ids, clean_probs = engine.score_copies(
        clean.logits[None], answer_id, [bound.fn], top_k
    )
    corrupted_scores, corrupted_ids, corrupted_probs = engine.score_copies(
        corrupted_logits, answer_id, [bound.fn], top_k
    )
    clean_score, corrupted_score = clean_scores[0], corrupted_scores[0]
    metrics.check_normalizable(bound, clean_score, corrupted_score)
    seconds = time.perf_counter() - started

    ids_seen = {answer_id, *clean_ids.tolist(), *corrupted_ids.tolist()}
    if foil_id is not None:
        ids_seen.add(foil_id)
    vocab = dict(zip(sorted(ids_seen), token_labels(model, sorted(ids_seen)), strict=True))
    record = corrupted.record
    passes = {
        "clean_forward": 1,
        "corrupted_forward": 1,
        "corrupted_backward": 1,
        "corrupted_rows": corrupted.samples,
    }
    out = {}
    for where in sites:
        window = settings.windows[where.name]
        per_layer = cell_estimates(
            {n: clean.activations[n] for n in where.hook_names(n_layer)},
            {n: grads.activations[n] for n in where.hook_names(n_layer)},
            {n: grads.gradients[n] for n in where.hook_names(n_layer)},
        )
        estimate = window_sum(per_layer, window)
        traced = torch.full_like(estimate, math.nan)
        cells = where.cells(model, list(settings.layers), pos_list)
        traced[tuple(cells.T)] = estimate[tuple(cells.T)]
        raw = corrupted_score + traced
        out[where.name] = AttributionResult(
            scores=bound.normalize(raw, clean_score, corrupted_score),
            clean_score=float(bound.normalize(clean_score, clean_score, corrupted_score)),
            corrupted_score=float(bound.normalize(corrupted_score, clean_score, corrupted_score)),
            tokens=token_labels(model, tokens),
            token_ids=tokens.cpu(),
            subject_range=subject_range,
            answer=vocab[answer_id],
            answer_id=answer_id,
            kind=where.name,
            hook_names=where.hook_names(n_layer),
            window=window,
            samples=corrupted.samples,
            noise_std=record.get("noise_std", 0.0),
            seed=record.get("seed"),
            model_name=model_name(model),
            metric=bound.name,
            top_ids=torch.full((*estimate.shape, top_k), -1, dtype=torch.long),
            top_probs=torch.full((*estimate.shape, top_k), math.nan),
            clean_top_ids=clean_ids.cpu(),
            clean_top_probs=clean_probs.cpu(),
            corrupted_top_ids=corrupted_ids.cpu(),
            corrupted_top_probs=corrupted_probs.cpu(),
            vocab=vocab,
            prompt=prompt if isinstance(prompt, str) else None,
            corruption=dict(record),
            direction="denoise",
            foil=None if foil_id is None else vocab[foil_id],
            foil_id=foil_id,
            normalization=(clean_score, corrupted_score) if bound.normalized else None,
            passes=passes,
            seconds=seconds,
        )
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
            f"attribution estimates the residual-width kinds {ATTRIBUTION_KINDS}, got the "
            f"per-head kind(s) {heads}; pass kinds=('resid_post', 'mlp_out', 'attn_out'), or "
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


def differentiable(fn: PatchingMetric) -> PatchingMetric:
    """``fn`` in a form autograd can differentiate.

    lenscope's ``prob`` and ``log_prob`` compute the softmax in place (fast,
    not differentiable); here they are torch's float32 softmax and
    log-softmax. Every other metric (logit differences, callables) is used as it is.
    """
    if fn is metrics.prob:

        def prob(logits: Float[Tensor, "batch d_vocab"], answer: int) -> Float[Tensor, " batch"]:
            return torch.softmax(logits.float(), dim=-1)[:, answer]

        return prob
    if fn is metrics.log_prob:

        def log_prob(
            logits: Float[Tensor, "batch d_vocab"], answer: int
        ) -> Float[Tensor, " batch"]:
            return torch.log_softmax(logits.float(), dim=-1)[:, answer]

        return log_prob
    return fn


@dataclasses.dataclass(frozen=True)
class GradientRun:
    """The corrupted copies' activations and the metric's gradient at some hook points."""

    activations: dict[str, Float[Tensor, "samples pos d_model"]]
    gradients: dict[str, Float[Tensor, "samples pos d_model"]]
    logits: Float[Tensor, "samples d_vocab"]


class _Stop(Exception):
    """Ends the corrupted forward pass at the last block's ``resid_post``."""


def corrupted_gradients(
    model: torch.nn.Module,
    corrupted: Any,
    names: Sequence[str],
    metric_for: Callable[[Tensor], PatchingMetric],
    answer_id: int,
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
        names: Hook points (residual-width) whose activations and gradients to keep.
        metric_for: Given the corrupted logits, the differentiable metric
            ``(logits, answer) -> per-copy scores`` to differentiate.
        answer_id: The answer token.
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
        logits = decode_resid(model, live[final_name][:, -1])
        total = metric_for(logits)(logits, answer_id).sum()
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
    rows = []
    for name in clean:
        delta = clean[name][None].float() - corrupted[name].float()
        per_sample = einops.einsum(delta, gradients[name].float(), "s pos d, s pos d -> s pos")
        rows.append(per_sample.mean(dim=0))
    return torch.stack(rows).cpu()


def window_sum(per_layer: Float[Tensor, "layer pos"], window: int) -> Float[Tensor, "layer pos"]:
    """Each cell's estimate of restoring its window: the sum over the window's layers.

    The layers of a window are those the exact trace restores
    (:func:`lenscope.engine.restore_windows`, ROME's clipping).
    """
    n_layer = per_layer.shape[0]
    cells = torch.stack([torch.arange(n_layer), torch.zeros(n_layer, dtype=torch.long)], dim=1)
    windows = engine.restore_windows(cells, window, n_layer).to(per_layer.dtype)
    return windows @ per_layer


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
