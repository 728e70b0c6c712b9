"""One prepared trace under every method: the stage between the settings and the engine.

A causal trace, an attribution estimate, a packed dataset trace and the
lens view of one cell all start the same way: resolve the prompt (tokens,
subject span, the answer and foil the user named), fix the settings for
the model (windows, layers, the noise std in sigmas), pick the sites and
the cells, bind the corruption to the prompt, run the clean prompt, and,
once the corrupted run's logits are known, settle the answer (the clean
top-1 unless named), the foil (a counterfactual prompt's own top-1 unless
named), bind the metrics to that context and score both baselines. They
end the same way too: every kind's grid becomes a result that records the
prompt, the answer, the corruption's own record and the baselines.

:func:`prepare` does the first half once and returns a :class:`Prepared`;
:meth:`Prepared.measure` settles answer, foil and metrics
(:class:`Measure`); :meth:`Measure.baselines` scores the clean and
corrupted runs exactly as the engine scores every cell (:class:`Baselines`);
:meth:`Prepared.results` builds the results. The methods
(:meth:`lenscope.CausalTracer.trace_kinds`, :func:`lenscope.attribution.attribute`,
:func:`lenscope.trace_dataset`'s packing, :func:`lenscope.lens.lens_trace_cell`)
are thin callers that differ only in how they run the corrupted copies and
what they compute per cell, as TransformerLens ``patching.py``'s partials
differ only in their setters.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope import engine
from lenscope.corruptions import CorruptedInput
from lenscope.hooks import (
    EMBED_HOOK,
    check_hook_points,
    model_name,
    n_layers,
    weights_description,
)
from lenscope.metrics import BoundMetric, MetricContext, bind_metric, check_normalizable, softmax
from lenscope.settings import TraceSettings, resolve_prompt
from lenscope.sites import Site
from lenscope.tokens import token_labels
from lenscope.validation import InvalidInput


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A trace resolved against a model, before anything runs.

    Attributes:
        model: The model.
        settings: The settings, fixed for the model (:meth:`TraceSettings.for_model`).
        sites: Each kind's :class:`~lenscope.sites.Site`, filled in for the model.
        prompt: The prompt as text (None when given as token ids).
        tokens: The prompt's token ids.
        subject_range: The subject's ``(start, end)`` token range (a
            counterfactual prompt's: the tokens that differ).
        answer_id: The answer the user named, or None (the clean top-1, or an
            answer of several tokens: see ``answer_ids``).
        foil_id: The foil the user named, or None.
        positions: The token positions traced.
        names: Every hook name the sites restore, site by site, layer by layer.
        answer_ids: Every token of the answer the user named (None: the clean top-1).
        foil_ids: Every token of the foil the user named (None: none named).
        answer_set: Each member's tokens, for an answer set (``answer_ids``
            is then the first member's).
    """

    model: torch.nn.Module
    settings: TraceSettings
    sites: tuple[Site, ...]
    prompt: str | None
    tokens: Int[Tensor, " pos"]
    subject_range: tuple[int, int]
    answer_id: int | None
    foil_id: int | None
    positions: tuple[int, ...]
    names: tuple[str, ...]
    answer_ids: tuple[int, ...] | None = None
    foil_ids: tuple[int, ...] | None = None
    answer_set: tuple[tuple[int, ...], ...] | None = None

    @property
    def n_layer(self) -> int:
        """Layers of the model."""
        return n_layers(self.model)

    @property
    def n_pos(self) -> int:
        """Tokens of the prompt."""
        return int(self.tokens.shape[0])

    def cells(self, where: Site) -> Int[Tensor, "cell axis"]:
        """The cells ``where`` traces: rows of its index-axis coordinates."""
        return where.cells(self.model, list(self.settings.layers), list(self.positions))

    def bind(self) -> CorruptedInput:
        """The corruption bound to this prompt (runs whatever the corruption needs)."""
        return self.settings.corruption.bind(self.model, self.tokens, self.subject_range)

    def clean_run(self, continuation: Sequence[int] = ()) -> engine.CleanRun:
        """The clean prompt's activations at :attr:`names` and its last-position logits.

        Args:
            continuation: Tokens appended to the prompt (an answer's first
                ``k - 1`` tokens, teacher forcing); the logits of the last
                ``len(continuation) + 1`` positions are decoded.
        """
        return engine.clean_run(
            self.model,
            continued(self.tokens, continuation),
            list(self.names),
            decoded=len(continuation) + 1,
        )

    def measure(
        self,
        clean_logits: Float[Tensor, " d_vocab"],
        corrupted_logits: Float[Tensor, "samples d_vocab"],
    ) -> "Measure":
        """Settle the answer and the foil and bind the metrics to them.

        The answer is the one named, else the clean run's top-1 token; the
        foil is the one named, else (for a corruption that answers a prompt
        of its own) the corrupted run's top-1 token of its mean distribution.

        Raises:
            InvalidInput: A counterfactual whose top-1 token is the answer
                itself while a metric needs a foil.
        """
        answer_ids = self.answer_ids
        answer_id = self.answer_id
        if answer_ids is None:
            answer_id = int(clean_logits.argmax()) if answer_id is None else answer_id
            answer_ids = (answer_id,)
        answer_id = answer_ids[0]
        foil_id = self.foil_id
        foil_ids = self.foil_ids
        if foil_ids is not None:
            foil_id = foil_ids[0]
        elif foil_id is None and self.settings.corruption.has_counterfactual_answer:
            foil_id = int(softmax(corrupted_logits.detach()).mean(dim=0).argmax())
            if (
                (foil_id,) == answer_ids or (foil_id,) in (self.answer_set or ())
            ) and self.settings.needs_foil:
                raise InvalidInput(
                    f"the counterfactual prompt's top-1 token is the answer itself "
                    f"({token_labels(self.model, [answer_id])[0]!r}), so the logit difference "
                    "has no foil; pass foil=... (the counterfactual's answer), or a "
                    "counterfactual that changes the answer"
                )
        if foil_id is not None and foil_ids is None:
            foil_ids = (foil_id,)
        context = MetricContext(
            answer_id=answer_id,
            foil_id=foil_id,
            clean_logits=clean_logits,
            answer_ids=answer_ids,
            foil_ids=foil_ids,
            members=self.answer_set,
        )
        bound = tuple(bind_metric(spec, context) for spec in self.settings.metric_specs)
        return Measure(context=context, metrics=bound)

    def results(
        self,
        measure: "Measure",
        baselines: "Baselines",
        grids: Mapping[str, "Grid"],
        corrupted: CorruptedInput,
        result_type: Callable[..., Any],
        **extra: Any,
    ) -> dict[str, dict[str, Any]]:
        """``{metric name: {kind: result}}`` from each kind's raw grid.

        Args:
            measure: The answer, foil and metrics.
            baselines: The clean and corrupted scores.
            grids: Each kind's raw scores (one grid per metric) and top-k.
            corrupted: The bound corruption (its record is the result's provenance).
            result_type: The result class, or a callable ``(site, **fields)``
                giving one (see :func:`result_class`).
            **extra: Fields the method adds (e.g. attribution's passes and estimator).
        """
        model = self.model
        answer_id, foil_id = measure.answer_id, measure.foil_id
        ids_seen = {
            answer_id,
            *([] if foil_id is None else [foil_id]),
            *measure.answer_ids,
            *(i for member in measure.members or () for i in member),
            *(measure.foil_ids or ()),
            *baselines.clean_ids.tolist(),
            *baselines.corrupted_ids.tolist(),
        }
        for grid in grids.values():
            ids_seen.update(grid.top_ids[grid.top_ids >= 0].unique().tolist())
        ordered = sorted(ids_seen)
        vocab = dict(zip(ordered, token_labels(model, ordered), strict=True))

        def text(ids: tuple[int, ...]) -> str:
            return "".join(vocab[i] for i in ids)

        record = corrupted.record
        by_name = {where.name: where for where in self.sites}
        shared = dict(
            tokens=token_labels(model, self.tokens),
            token_ids=self.tokens.cpu(),
            subject_range=self.subject_range,
            answer=text(measure.answer_ids)
            if measure.members is None
            else " | ".join(repr(text(member)) for member in measure.members),
            answer_id=answer_id,
            model_name=model_name(model),
            clean_top_ids=baselines.clean_ids.cpu(),
            clean_top_probs=baselines.clean_probs.cpu(),
            corrupted_top_ids=baselines.corrupted_ids.cpu(),
            corrupted_top_probs=baselines.corrupted_probs.cpu(),
            vocab=vocab,
            prompt=self.prompt,
            corruption=dict(record),
            direction=self.settings.direction,
            foil=None if measure.foil_ids is None else text(measure.foil_ids),
            foil_id=foil_id,
            weights=weights_description(model),
        )

        def split(grid: Grid) -> dict[str, Any]:
            # Only for an answer or foil of several tokens (one optional field).
            if not measure.sequence:
                return {}
            if measure.members is not None:
                # An answer set: the split is by member (each one's teacher-forced
                # log-probability), the cell's log_prob their log-sum-exp.
                return {
                    "answer_split": {
                        "members": [list(member) for member in measure.members],
                        "answer_ids": None,
                        "answer_tokens": [text(member) for member in measure.members],
                        "foil_ids": None if measure.foil_ids is None else list(measure.foil_ids),
                        "log_probs": grid.token_log_probs,
                        "clean_log_probs": baselines.clean_split,
                        "corrupted_log_probs": baselines.corrupted_split,
                    }
                }
            return {
                "answer_split": {
                    "answer_ids": list(measure.answer_ids),
                    "answer_tokens": [vocab[i] for i in measure.answer_ids],
                    "foil_ids": None if measure.foil_ids is None else list(measure.foil_ids),
                    "log_probs": grid.token_log_probs,
                    "clean_log_probs": baselines.clean_split,
                    "corrupted_log_probs": baselines.corrupted_split,
                }
            }

        results: dict[str, dict[str, Any]] = {}
        for i, metric in enumerate(measure.metrics):
            clean, corrupt = baselines.clean_scores[i], baselines.corrupted_scores[i]
            results[metric.name] = {
                kind: result_type(
                    by_name[kind],
                    scores=metric.normalize(grid.scores[i], clean, corrupt),
                    clean_score=float(metric.normalize(clean, clean, corrupt)),
                    corrupted_score=float(metric.normalize(corrupt, clean, corrupt)),
                    kind=kind,
                    hook_names=by_name[kind].hook_names(self.n_layer),
                    window=self.settings.windows[kind],
                    metric=metric.name,
                    top_ids=grid.top_ids,
                    top_probs=grid.top_probs,
                    normalization=(clean, corrupt) if metric.normalized else None,
                    axes=by_name[kind].index_axes,
                    units=by_name[kind].unit_info(),
                    **shared,
                    **split(grid),
                    **extra,
                )
                for kind, grid in grids.items()
            }
        return results


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a trace measures, settled: the answer, the foil and the bound metrics.

    ``answer_ids``/``foil_ids`` hold every token of an answer or foil of
    several tokens (default: the one token); such a trace is scored by
    teacher forcing (:attr:`sequence`).
    """

    context: MetricContext
    metrics: tuple[BoundMetric, ...]

    @property
    def answer_id(self) -> int:
        """The answer (its first token)."""
        return self.context.answer_id

    @property
    def foil_id(self) -> int | None:
        """The foil (its first token), or None."""
        return self.context.foil_id

    @property
    def answer_ids(self) -> tuple[int, ...]:
        """Every token of the answer."""
        return self.context.answer_ids

    @property
    def foil_ids(self) -> tuple[int, ...] | None:
        """Every token of the foil, or None."""
        return self.context.foil_ids

    @property
    def members(self) -> tuple[tuple[int, ...], ...] | None:
        """Each member's tokens, for an answer set; None otherwise."""
        return self.context.members

    @property
    def sequence(self) -> bool:
        """Whether the answer or the foil has several tokens (or the answer is a set)."""
        return self.context.sequence

    @property
    def foil_run(self) -> bool:
        """Whether a metric needs the foil scored in runs of its own (``less_foil``)."""
        return any(metric.less_foil for metric in self.metrics)

    def baselines(
        self,
        clean_logits: Float[Tensor, " d_vocab"] | Float[Tensor, "answer d_vocab"],
        corrupted_logits: Float[Tensor, "samples d_vocab"]
        | Float[Tensor, "samples answer d_vocab"],
        top_k: int,
        *,
        foil_log_probs: tuple[float, float] | None = None,
    ) -> "Baselines":
        """The clean and corrupted runs scored exactly as every patched cell is.

        Args:
            clean_logits: The clean run's next-token logits; for an answer of
                several tokens, the logits of each position predicting one of
                them (teacher-forced).
            corrupted_logits: The corrupted copies' logits, likewise.
            top_k: Predictions kept.
            foil_log_probs: The foil's clean and corrupted log-probability
                (teacher-forced in runs of its own), subtracted from each
                ``less_foil`` metric.

        Raises:
            InvalidInput: A normalised metric whose clean and corrupted values coincide.
        """
        if clean_logits.ndim == 1:
            clean = engine.score_copies(clean_logits[None], self.answer_id, self.metrics, top_k)
            corrupted = engine.score_copies(corrupted_logits, self.answer_id, self.metrics, top_k)
            splits: tuple[Tensor | None, Tensor | None] = (None, None)
        else:
            *clean, clean_split = engine.score_sequence_copies(
                clean_logits[None], self.answer_ids, self.metrics, top_k
            )
            *corrupted, corrupted_split = engine.score_sequence_copies(
                corrupted_logits, self.answer_ids, self.metrics, top_k
            )
            splits = (clean_split, corrupted_split)
        if foil_log_probs is not None:
            for scores, foil in zip((clean[0], corrupted[0]), foil_log_probs, strict=True):
                for i, metric in enumerate(self.metrics):
                    if metric.less_foil:
                        scores[i] -= foil
        for metric, clean_score, corrupted_score in zip(
            self.metrics, clean[0], corrupted[0], strict=True
        ):
            check_normalizable(metric, clean_score, corrupted_score)
        return Baselines(*clean, *corrupted, *splits)

    def set_baselines(
        self,
        clean_logits: Float[Tensor, " d_vocab"],
        corrupted_logits: Float[Tensor, "samples d_vocab"],
        clean_members: Float[Tensor, "1 member"],
        corrupted_members: Float[Tensor, "samples member"],
        top_k: int,
        *,
        foil_log_probs: tuple[float, float] | None = None,
    ) -> "Baselines":
        """:meth:`baselines` of an answer set, scored as every patched cell of it is.

        ``prob``/``log_prob`` read each copy's log-sum-exp of the members'
        teacher-forced log-probabilities (``clean_members``,
        ``corrupted_members``); the other metrics and the top-k read the
        next-token logits (``clean_logits``, ``corrupted_logits``). The split
        holds each member's mean log-probability.
        """
        scored = []
        for logits, per_member in (
            (clean_logits[None], clean_members),
            (corrupted_logits, corrupted_members),
        ):
            scores, top_ids, top_probs = engine.score_copies(
                logits, self.answer_id, self.metrics, top_k
            )
            per_copy = torch.logsumexp(per_member, dim=-1)
            for i, metric in enumerate(self.metrics):
                if metric.reads == "prob":
                    scores[i] = float(per_copy.exp().mean())
                elif metric.reads == "log_prob":
                    scores[i] = float(per_copy.mean())
            scored.append([scores, top_ids, top_probs])
        if foil_log_probs is not None:
            for (scores, *_), foil in zip(scored, foil_log_probs, strict=True):
                for i, metric in enumerate(self.metrics):
                    if metric.less_foil:
                        scores[i] -= foil
        (clean, *clean_top), (corrupted, *corrupted_top) = scored
        for metric, clean_score, corrupted_score in zip(
            self.metrics, clean, corrupted, strict=True
        ):
            check_normalizable(metric, clean_score, corrupted_score)
        return Baselines(
            clean,
            *clean_top,
            corrupted,
            *corrupted_top,
            clean_members.mean(0),
            corrupted_members.mean(0),
        )


@dataclasses.dataclass(frozen=True)
class Baselines:
    """Each metric's clean and corrupted score (means over copies) and their top-k predictions.

    For an answer of several tokens, ``clean_split``/``corrupted_split`` hold
    each token's log-probability (teacher-forced; means over copies).
    """

    clean_scores: list[float]
    clean_ids: Int[Tensor, " k"]
    clean_probs: Float[Tensor, " k"]
    corrupted_scores: list[float]
    corrupted_ids: Int[Tensor, " k"]
    corrupted_probs: Float[Tensor, " k"]
    clean_split: Float[Tensor, " answer"] | None = None
    corrupted_split: Float[Tensor, " answer"] | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """One kind's raw per-cell scores (one grid per metric, before normalising) and top-k.

    ``token_log_probs``: for an answer of several tokens, each token's
    log-probability per cell (``[layer, ..., answer]``).
    """

    scores: Float[Tensor, "metric layer ..."] | Sequence[Tensor]
    top_ids: Int[Tensor, "layer ... k"]
    top_probs: Float[Tensor, "layer ... k"]
    token_log_probs: Float[Tensor, "layer ... answer"] | None = None


def continued(tokens: Int[Tensor, " prompt"], continuation: Sequence[int]) -> Int[Tensor, " pos"]:
    """``tokens`` followed by ``continuation`` (an answer's first tokens: teacher forcing)."""
    if not continuation:
        return tokens
    extra = torch.tensor(list(continuation), dtype=tokens.dtype, device=tokens.device)
    return torch.cat([tokens, extra])


def member_groups(
    members: Sequence[tuple[int, ...]],
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The answer set's members grouped by the teacher-forced run that scores them.

    A member of ``k`` tokens is scored by a run continued with tokens that
    begin with its first ``k - 1``; taken longest first, each member joins
    the first group whose continuation does, else starts one with its own.

    Returns:
        ``[(continuation, member indices)]``, the longest member's group first.
    """
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    for i in sorted(range(len(members)), key=lambda i: -len(members[i])):
        head = members[i][:-1]
        for continuation, indices in groups:
            if continuation[: len(head)] == head:
                indices.append(i)
                break
        else:
            groups.append((head, [i]))
    return [(continuation, tuple(indices)) for continuation, indices in groups]


def prepare(
    model: torch.nn.Module,
    prompt: Any,
    subject: str | tuple[int, int] | None,
    settings: TraceSettings,
    *,
    sequences: bool = False,
) -> Prepared:
    """Resolve a trace against ``model`` once, for whichever method runs it.

    Args:
        model: A HookedTransformer or TransformerBridge.
        prompt: Text, or 1-D token ids.
        subject: The subject's text or ``(start, end)`` token range; None for
            a corruption that knows what it changes (a counterfactual prompt).
        settings: The trace's settings (not yet fixed for the model).
        sequences: Whether the method scores answers and foils of several
            tokens by teacher forcing (the exact trace); if not, such an
            answer is refused.

    Raises:
        InvalidInput: A hook point the model lacks, a subject not in the
            prompt, a foil equal to the answer, or settings the model refuses.
    """
    n_layer = n_layers(model)
    sites = tuple(where.for_model(model) for where in settings.sites)
    names = tuple(name for where in sites for name in where.hook_names(n_layer))
    check_hook_points(model, [EMBED_HOOK, *names])
    resolved = resolve_prompt(model, prompt, subject, settings, sequences=sequences)
    settings = settings.for_model(model)
    positions = settings.position_list(int(resolved.tokens.shape[0]), resolved.subject_range)
    return Prepared(
        model=model,
        settings=settings,
        sites=tuple(where.at_positions(positions) for where in sites),
        prompt=prompt if isinstance(prompt, str) else None,
        tokens=resolved.tokens,
        subject_range=resolved.subject_range,
        answer_id=resolved.answer_id,
        foil_id=resolved.foil_id,
        positions=tuple(positions),
        names=names,
        answer_ids=resolved.answer_ids,
        foil_ids=resolved.foil_ids,
        answer_set=resolved.answer_set,
    )


def continued_input(corrupted: CorruptedInput, continuation: Sequence[int]) -> CorruptedInput:
    """A bound corruption whose every row is followed by ``continuation`` (teacher forcing).

    The corruption's hooks act on the prompt's positions (a subject's
    embeddings), and its first changed position is unchanged.
    """
    if not continuation:
        return corrupted
    extra = torch.tensor(list(continuation), dtype=corrupted.tokens.dtype)
    extra = einops.repeat(extra.to(corrupted.tokens.device), "k -> row k", row=corrupted.rows)
    return dataclasses.replace(corrupted, tokens=torch.cat([corrupted.tokens, extra], dim=1))
