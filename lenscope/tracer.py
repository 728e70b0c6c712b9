"""``CausalTracer``: ROME's causal tracing for TransformerLens models.

Causal tracing (Meng et al., "Locating and Editing Factual Associations in
GPT", NeurIPS 2022, arXiv 2202.05262, Section 2.1) runs a prompt clean, then
corrupts the subject by adding Gaussian noise to its embeddings at
``hook_embed`` in ``samples`` copies, and finally, for every ``(layer, pos)``
cell, restores the clean activation at ``blocks.{layer}.hook_{kind}`` (and at
the neighbouring layers of a window) and measures how much of the answer's
probability comes back. Everything goes through hook names, so a
``HookedTransformer`` and a ``TransformerBridge`` trace alike.
"""

import contextlib
import dataclasses
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope import engine, metrics
from lenscope.corruptions import CorruptedInput, CounterfactualPrompt, GaussianNoise
from lenscope.experiment import (
    Grid,
    Prepared,
    continued,
    continued_input,
    member_groups,
    prepare,
)
from lenscope.hooks import (
    EMBED_HOOK,
    check_hook_points,
    decode_resid,
    hook_name,
    n_layers,
    preserved_model,
)
from lenscope.metrics import softmax
from lenscope.noise import DEFAULT_NOISE_MULTIPLIER, embedding_sigma
from lenscope.results import TraceResult, interrupted_trace
from lenscope.settings import DEFAULT_KINDS, TraceSettings
from lenscope.sites import Site
from lenscope.tokens import (
    AnswerSet,
    is_filler_token,
    single_token_id,
    token_labels,
)
from lenscope.validation import (
    AnswerWarning,
    finite_number,
    optional_positive_int,
    warn,
)

__all__ = ["DEFAULT_KINDS", "CausalTracer", "TraceSettings"]


class CausalTracer:
    """Causal tracing on one model.

    Example:
        >>> tracer = CausalTracer(model)  # doctest: +SKIP
        >>> r = tracer.trace("The Eiffel Tower is located in the city of",
        ...                  subject="The Eiffel Tower", kind="mlp_out")  # doctest: +SKIP

    Args:
        model: A HookedTransformer or TransformerBridge (with TransformerLens hook names).
        noise_multiplier: Default noise std as a multiple of the embedding sigma (ROME: 3).
        reference_subjects: Subjects over which sigma is measured; default the
            ROME known-facts subjects shipped with lenscope.
        batch_size: Corrupted copies per forward pass; None picks one that keeps
            activations near 1 GB (a quarter of free memory on CUDA).
        strategy: ``"auto"``, ``"prefix"`` or ``"full"``; see :mod:`lenscope.engine`.
        progress: Show a tqdm progress bar for sweeps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
        reference_subjects: Sequence[str] | None = None,
        batch_size: int | None = None,
        strategy: str = "auto",
        progress: bool = True,
    ) -> None:
        check_hook_points(model, [EMBED_HOOK])
        check_hook_points(model, [hook_name("resid_post", n_layers(model) - 1)])
        finite_number(
            "noise_multiplier",
            noise_multiplier,
            "pass e.g. noise_multiplier=3.0 (ROME's 3 sigma)",
            minimum=0,
        )
        _check_batch_size(batch_size)
        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.reference_subjects = reference_subjects
        self.batch_size = batch_size
        self.strategy = engine.choose_strategy(model, strategy)
        self.progress = progress

    @property
    def sigma(self) -> float:
        """Std of ``hook_embed`` activations over the reference subjects (cached per model)."""
        with preserved_model(self.model):
            return embedding_sigma(self.model, self.reference_subjects)

    def trace(
        self,
        prompt: str | Tensor | Sequence[int],
        subject: str | tuple[int, int] | None = None,
        *,
        kind: str | Site = "resid_post",
        window: int | None = None,
        **options: Any,
    ) -> Any:
        """Trace one hook-point type over every ``(layer, pos)`` cell.

        Args:
            prompt: Text, or 1-D token ids.
            subject: The subject's text, or its ``(start, end)`` token range
                (None with a counterfactual prompt: the tokens that differ).
            kind: ``resid_pre``, ``resid_mid``, ``resid_post``, ``mlp_out`` or
                ``attn_out``; or per attention head (``blocks.L.attn.hook_<kind>``)
                ``z``, ``q``, ``k``, ``v`` or ``pattern``, with ``by="head"``
                (cells ``(layer, head)``, the head restored at every position)
                or ``by="head_pos"`` (cells ``(layer, head, pos)``); or a
                :class:`~lenscope.sites.Site` (a site of your own).
            window: Layers restored around each cell; default 1 for residual
                and per-head kinds, 10 (clipped to the depth) for ``mlp_out``/``attn_out``.
            **options: As for :meth:`trace_kinds` (``by`` among them).

        Returns:
            The :class:`TraceResult` (its ``axes`` ``("layer", "head")`` or
            ``("layer", "head", "pos")`` for a per-head kind); with several
            metrics (``metrics=(...)``), ``{metric: TraceResult}``.
        """
        name = kind.name if isinstance(kind, Site) else kind
        windows = None if window is None else {name: window}
        out = self.trace_kinds(prompt, subject, kinds=(kind,), windows=windows, **options)
        if all(isinstance(v, TraceResult) for v in out.values()):
            return out[name]
        return {metric: by_kind[name] for metric, by_kind in out.items()}

    def patch(
        self,
        clean_prompt: str | Tensor | Sequence[int],
        counterfactual_prompt: str | Tensor | Sequence[int],
        *,
        kind: str = "resid_pre",
        window: int = 1,
        direction: str = "denoise",
        **options: Any,
    ) -> Any:
        """Activation patching between a prompt and a counterfactual of the same length (STR).

        Symmetric token replacement (Zhang & Nanda, 2023, arXiv 2309.16042):
        the corrupted run is ``counterfactual_prompt``
        (:class:`~lenscope.corruptions.CounterfactualPrompt`), every ``(layer,
        pos)`` cell is patched, and the default metric is the normalised logit
        difference of the clean answer against the counterfactual's answer (each
        prompt's clean top-1 unless ``answer=``/``foil=`` say otherwise). It is
        the computation of TransformerLens ``patching.get_act_patch_resid_pre``
        and its siblings, in batched forward passes.

        Args:
            clean_prompt: The prompt whose answer is measured.
            counterfactual_prompt: The same prompt with other tokens in places.
            kind: Hook-point type patched.
            window: Layers patched around each cell (default 1: one layer, as
                activation patching usually does).
            direction: ``"denoise"`` (clean activations into the counterfactual
                run) or ``"noise"`` (counterfactual activations into the clean run).
            **options: As for :meth:`trace_kinds` (``metric``, ``answer``,
                ``foil``, ``layers``, ``positions``, ...).

        Returns:
            The :class:`TraceResult`; its ``subject_range`` spans the tokens
            that differ. With several metrics, ``{metric: TraceResult}``.
        """
        return self.trace(
            clean_prompt,
            None,
            kind=kind,
            window=window,
            corruption=CounterfactualPrompt(counterfactual_prompt),
            direction=direction,
            **options,
        )

    def attribute(
        self,
        prompt: str | Tensor | Sequence[int],
        subject: str | tuple[int, int] | None = None,
        settings: TraceSettings | None = None,
        *,
        estimator: Any = "atp",
        target: str = "metric",
        **options: Any,
    ) -> dict[str, Any]:
        """Estimate every cell of :meth:`trace_kinds` by attribution patching (one backward).

        See :func:`lenscope.attribution.attribute` (``estimator``: ``"atp"``,
        ``"relp"``, ``"atp-star"``, ``"ig:M"``, ``"ig:M:layer"``; ``target``:
        ``"metric"``, ``"log_prob"`` or ``"logit_diff"``); options as for :meth:`trace_kinds`.

        Returns:
            ``{kind: AttributionResult}``, each on the scale of the exact trace.
        """
        from lenscope.attribution import attribute

        return attribute(
            self, prompt, subject, settings, estimator=estimator, target=target, **options
        )

    @property
    def default_settings(self) -> TraceSettings:
        """ROME's settings, with this tracer's noise multiplier and reference subjects."""
        return TraceSettings(
            corruption=GaussianNoise(
                noise_multiplier=self.noise_multiplier,
                reference_subjects=self.reference_subjects,
            )
        )

    def settings(self, settings: TraceSettings | None = None, **options: Any) -> TraceSettings:
        """The :class:`TraceSettings` that ``options`` describe, on top of ``settings``.

        Args:
            settings: Base settings; default :attr:`default_settings`.
            **options: Fields of :class:`TraceSettings`, ``metrics`` (several
                metrics), and the Gaussian-noise shortcuts ``samples``,
                ``noise``, ``noise_multiplier``, ``noise_tensor`` and ``seed``.
        """
        return TraceSettings.from_options(settings or self.default_settings, **options)

    def trace_kinds(
        self,
        prompt: str | Tensor | Sequence[int],
        subject: str | tuple[int, int] | None = None,
        settings: TraceSettings | None = None,
        *,
        batch_size: int | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Trace several hook-point types on the same clean run and the same corruption.

        Args:
            prompt: Text, or 1-D token ids.
            subject: The subject's text, or its ``(start, end)`` token range;
                None for a corruption that knows what it changes (a
                counterfactual prompt: the tokens that differ).
            settings: A :class:`TraceSettings`; ``options`` change single fields of it.
            batch_size: Copies per forward pass; overrides the tracer's.
            progress: Overrides the tracer's progress-bar setting.
            **options: Any field of :class:`TraceSettings` (``kinds``,
                ``windows``, ``corruption``, ``metric``, ``answer``, ``foil``,
                ``direction``, ``top_k``, ``layers``, ``positions``),
                ``metrics`` (several metrics from the same forward passes), or
                for Gaussian noise: ``samples`` (corrupted copies, ROME: 10),
                ``noise`` (absolute std), ``noise_multiplier`` (a multiple of
                :attr:`sigma`, default 3), ``noise_tensor`` (exact noise
                ``[samples, subject_pos, d_model]``) and ``seed`` (shared by
                every kind).

        Returns:
            ``{kind: TraceResult}`` in the order of ``kinds``; with several
            metrics, ``{metric: {kind: TraceResult}}``.

        Raises:
            TraceInterrupted: On Ctrl-C during the sweeps (a
                ``KeyboardInterrupt``); its ``.results`` holds the kinds that
                finished, in the shape returned here, and the model is left as it was.

        Warns:
            AnswerWarning: When the trace probably follows the wrong token: an
                answer given as text without its leading space (``'Paris'``)
                while the model predicts the spaced token (``' Paris'``); a
                clean top-1 answer that is filler (whitespace, punctuation,
                ``' the'``, see :func:`lenscope.tokens.is_filler_token`); or a
                corruption that does not lower the answer's probability. The
                message lists the clean run's top predictions.
        """
        settings = self.settings(settings, **options)
        _check_batch_size(batch_size)
        out = self._trace(
            prompt,
            subject,
            settings,
            batch_size=batch_size or self.batch_size,
            progress=self.progress if progress is None else progress,
        )
        return next(iter(out.values())) if len(out) == 1 else out

    def _trace(
        self,
        prompt: str | Tensor | Sequence[int],
        subject: str | tuple[int, int] | None,
        settings: TraceSettings,
        *,
        batch_size: int | None,
        progress: bool,
    ) -> dict[str, dict[str, TraceResult]]:
        """``{metric name: {kind: TraceResult}}``: the one path every trace takes.

        An answer of ``k`` tokens is scored by teacher forcing: every run's
        input is the prompt followed by the answer's first ``k - 1`` tokens
        (:func:`~lenscope.experiment.continued`), the corruption and the
        restorations act on the prompt's positions only, and the ``k``
        positions predicting the answer are decoded. A logit difference with
        an answer or foil of several tokens scores the foil the same way, in
        runs and sweeps of its own (about twice the work).
        """
        model = self.model
        prepared = prepare(model, prompt, subject, settings, sequences=True)
        settings = prepared.settings
        noising = settings.direction == "noise"
        cells = {where.name: prepared.cells(where) for where in prepared.sites}
        answer = prepared.answer_ids or ()
        continuation = answer[:-1]
        # An answer set: one teacher-forced run (and sweep) per group of
        # members that share their first tokens; the first group's run is the
        # answer's run, the others are scored like a foil's.
        groups = member_groups(prepared.answer_set or ())
        if groups:
            continuation = groups[0][0]
        # A foil scored in runs of its own (known here unless it is the
        # counterfactual's top-1, which has one token).
        foil_planned = settings.needs_foil and (
            len(answer) > 1 or len(prepared.foil_ids or ()) > 1 or bool(groups)
        )
        foil_continuation = (prepared.foil_ids or (0,))[:-1]  # unnamed: one token

        interrupt = _KindsInterrupt()  # listed first: exits after the model is restored
        with (
            interrupt,
            preserved_model(model),
            engine.matmul_friendly_weights(model),
            torch.inference_mode(),
            contextlib.ExitStack() as stack,
        ):
            bound = prepared.bind()
            corrupted = continued_input(bound, continuation)
            engine.check_memory(model, corrupted, prepared.sites, self.strategy)
            base = self._base(prepared, corrupted, continuation, noising)
            runs = [1, corrupted.rows, *([base.rows] if noising else [])]
            more = [
                (self._base(prepared, continued_input(bound, tail), tail, noising), len(tail) + 1)
                for tail, _ in groups[1:]
            ]
            foil_base = None
            if foil_planned:
                foil_base = self._base(
                    prepared, continued_input(bound, foil_continuation), foil_continuation, noising
                )
            meter = stack.enter_context(
                engine.trace_meter(
                    model,
                    prepared.sites,
                    settings.windows,
                    _shared_cells(cells),
                    base,
                    runs,
                    strategy=self.strategy,
                    batch_size=batch_size,
                    progress=progress,
                    description="noise" if noising else "trace",
                    decoded=len(continuation) + 1,
                    foil=None if foil_base is None else (foil_base, len(foil_continuation) + 1),
                    more=more,
                )
            )
            answer_runs = self._runs(prepared, bound, continuation, noising, meter, warm_up=True)
            clean, corrupted_state = answer_runs.clean, answer_runs.corrupted_state
            measure = prepared.measure(clean.logits, corrupted_state.logits)
            foil_runs = None
            foil_log_probs = None
            if measure.foil_run:
                foil_runs = self._runs(
                    prepared, bound, measure.foil_ids[:-1], noising, meter, warm_up=False
                )
                foil_clean, foil_corrupted = foil_runs.logits(model, sequence=True)
                foil_log_probs = (
                    _mean_score(foil_clean[None], measure.foil_ids, "log_prob"),
                    _mean_score(foil_corrupted, measure.foil_ids, "log_prob"),
                )
            group_runs = [answer_runs] + [
                self._runs(prepared, bound, tail, noising, meter, warm_up=False)
                for tail, _ in groups[1:]
            ]
            clean_logits, corrupted_logits = answer_runs.logits(model, sequence=False)
            if groups:
                clean_members, corrupted_members = _member_log_probs(
                    model, group_runs, [g for _, g in groups], measure.members
                )
                baselines = measure.set_baselines(
                    clean.logits,
                    corrupted_state.logits,
                    clean_members,
                    corrupted_members,
                    settings.top_k,
                    foil_log_probs=foil_log_probs,
                )
            else:
                baselines = measure.baselines(
                    clean_logits, corrupted_logits, settings.top_k, foil_log_probs=foil_log_probs
                )
            # Before the sweep, so that the warning comes before the long part.
            answer_id = measure.answer_id
            if groups:
                prob_scores = (
                    float(torch.logsumexp(clean_members, -1).exp().mean()),
                    float(torch.logsumexp(corrupted_members, -1).exp().mean()),
                )
            elif len(measure.answer_ids) == 1:
                prob_scores = (
                    engine.score_copies(clean.logits[None], answer_id, [metrics.prob], 1)[0][0],
                    engine.score_copies(corrupted_state.logits, answer_id, [metrics.prob], 1)[0][0],
                )
            else:
                prob_scores = (
                    _mean_score(clean_logits[None], measure.answer_ids, "prob"),
                    _mean_score(corrupted_logits, measure.answer_ids, "prob"),
                )
            _check_answer(model, settings.answer, answer_id, clean.logits, prob_scores, "prob")
            scored = measure.answer_ids if measure.sequence else answer_id

            grids = {}
            interrupt.armed = True  # Ctrl-C from here on keeps the kinds already swept
            for where in prepared.sites:
                label = f"{'noise' if noising else 'trace'} {where.name}"
                # A watcher of cells (the explorer) sees the first metric's grid
                # fill in, where one sweep gives it (no answer set, no foil sweep).
                on_cells = (
                    _shown_cells(meter, where.name, measure.metrics[0], baselines)
                    if meter.streams and not groups and foil_runs is None
                    else None
                )
                outs = [
                    engine.sweep(
                        model,
                        site=where,
                        window=settings.windows[where.name],
                        cells=cells[where.name],
                        source=runs.source,
                        base=runs.base,
                        base_state=runs.base_state,
                        answer_id=engine.Members(tuple(measure.members[i] for i in group))
                        if groups
                        else scored,
                        metrics=measure.metrics,
                        top_k=settings.top_k,
                        strategy=self.strategy,
                        batch_size=batch_size,
                        progress=progress,
                        description=label if not j else f"{label} (answers {j + 1})",
                        meter=meter,
                        on_cells=on_cells,
                    )
                    for j, (runs, group) in enumerate(
                        zip(group_runs, [g for _, g in groups] or [()], strict=True)
                    )
                ]
                out = outs[0]
                if groups:
                    out = _combine_members(out, outs, [g for _, g in groups], measure.metrics)
                scores = out.scores
                if foil_runs is not None:
                    foil_out = engine.sweep(
                        model,
                        site=where,
                        window=settings.windows[where.name],
                        cells=cells[where.name],
                        source=foil_runs.source,
                        base=foil_runs.base,
                        base_state=foil_runs.base_state,
                        answer_id=measure.foil_ids,
                        metrics=[metrics.BINDERS["log_prob"](None)],  # type: ignore[arg-type]
                        top_k=1,
                        strategy=self.strategy,
                        batch_size=batch_size,
                        progress=progress,
                        description=f"{label} (foil)",
                        meter=meter,
                    )
                    less = torch.tensor([m.less_foil for m in measure.metrics])
                    less = less.reshape(-1, *([1] * (scores.ndim - 1)))
                    scores = torch.where(less, scores - foil_out.scores[:1], scores)
                grids[where.name] = Grid(scores, out.top_ids, out.top_probs, out.token_log_probs)

        results = prepared.results(
            measure, baselines, grids, bound, lambda where, **fields: TraceResult(**fields)
        )
        if interrupt.error is not None:
            shown = next(iter(results.values())) if len(results) == 1 else results
            kinds = [where.name for where in prepared.sites]
            raise interrupted_trace(interrupt.error, shown, kinds) from interrupt.error
        return results

    def _base(
        self,
        prepared: Prepared,
        corrupted: CorruptedInput,
        continuation: tuple[int, ...],
        noising: bool,
    ) -> CorruptedInput:
        """The run a sweep patches: the corrupted copies, or (noising) clean copies."""
        if not noising:
            return corrupted
        return corrupted.clean_copies(continued(prepared.tokens, continuation))

    def _runs(
        self,
        prepared: Prepared,
        bound: CorruptedInput,
        continuation: tuple[int, ...],
        noising: bool,
        meter: Any,
        *,
        warm_up: bool,
    ) -> "_Runs":
        """The clean and corrupted runs of the prompt followed by ``continuation``, and the base.

        ``continuation`` is an answer's (or a foil's) first tokens: every run
        is teacher-forced with them, and decodes the positions predicting the
        answer. The sweep patches ``source`` into ``base``, whose state is
        ``base_state``.
        """
        model = self.model
        prefix = self.strategy == "prefix"
        decoded = len(continuation) + 1
        names = list(prepared.names)
        corrupted = continued_input(bound, continuation)
        n_pos = int(corrupted.tokens.shape[1])
        clean = prepared.clean_run(continuation)
        if warm_up:
            meter.warmed_up(engine.run_units(model, n_pos, 1, decoded))
        else:
            meter.advance(engine.run_units(model, n_pos, 1, decoded))
        corrupted_state = engine.corrupted_run(
            model,
            corrupted,
            keep_prefix_state=prefix and not noising,
            capture=names if noising else (),
            decoded=decoded,
        )
        meter.advance(engine.run_units(model, n_pos, corrupted.rows, decoded))
        base = self._base(prepared, corrupted, continuation, noising)
        if noising:
            base_state = engine.corrupted_run(
                model, base, keep_prefix_state=prefix, decoded=decoded
            )
            meter.advance(engine.run_units(model, n_pos, base.rows, decoded))
            source = corrupted_state.activations
        else:
            base_state = corrupted_state
            source = {name: act[None] for name, act in clean.activations.items()}
        return _Runs(clean, corrupted_state, base, base_state, source)


@dataclasses.dataclass(frozen=True)
class _Runs:
    """One teacher-forced continuation's clean and corrupted runs, and what its sweeps patch."""

    clean: engine.CleanRun
    corrupted_state: engine.CorruptedRun
    base: CorruptedInput
    base_state: engine.CorruptedRun
    source: dict[str, Tensor]

    def logits(self, model: torch.nn.Module, *, sequence: bool) -> tuple[Tensor, Tensor]:
        """The clean and corrupted logits of the decoded positions.

        ``[k, d_vocab]`` and ``[samples, k, d_vocab]`` for ``k`` decoded
        positions; for one, ``[d_vocab]`` and ``[samples, d_vocab]`` unless
        ``sequence`` asks for the ``k = 1`` axis.
        """
        final = self.corrupted_state.final_resid
        if final is None:
            clean, corrupted = self.clean.logits, self.corrupted_state.logits
            return (clean[None], corrupted[:, None]) if sequence else (clean, corrupted)
        if self.clean.answer_logits is None:
            raise RuntimeError("a teacher-forced clean run lacks its answer logits (a bug)")
        corrupted = decode_resid(model, final.flatten(0, 1)).unflatten(0, tuple(final.shape[:2]))
        return self.clean.answer_logits, corrupted


def _member_log_probs(
    model: torch.nn.Module,
    group_runs: Sequence["_Runs"],
    groups: Sequence[tuple[int, ...]],
    members: Sequence[tuple[int, ...]],
) -> tuple[Float[Tensor, "1 member"], Float[Tensor, "samples member"]]:
    """Each member's teacher-forced log-probability in the clean run and each corrupted copy."""
    clean: list[Tensor | None] = [None] * len(members)
    corrupted: list[Tensor | None] = [None] * len(members)
    for runs, group in zip(group_runs, groups, strict=True):
        clean_logits, corrupted_logits = runs.logits(model, sequence=True)
        ids = [members[i] for i in group]
        clean_lp = engine.member_log_probs(clean_logits[None].float(), ids)
        corrupted_lp = engine.member_log_probs(corrupted_logits.float(), ids)
        for j, i in enumerate(group):
            clean[i], corrupted[i] = clean_lp[:, j], corrupted_lp[:, j]
    return torch.stack(clean, dim=-1), torch.stack(corrupted, dim=-1)  # type: ignore[arg-type]


def _combine_members(
    first: engine.SweepOutput,
    outs: Sequence[engine.SweepOutput],
    groups: Sequence[tuple[int, ...]],
    bound: Sequence[metrics.BoundMetric],
) -> engine.SweepOutput:
    """One sweep output of an answer set from its groups' sweeps (same cells).

    Each copy's log-probability of the set is the log-sum-exp over members of
    their teacher-forced log-probabilities (each group's ``token_log_probs``,
    ``[..., sample * member]``); ``prob``/``log_prob`` are its exponential and
    itself averaged over copies. Metrics the engine calls, and the top-k, read
    the first decoded position, the same in every group's run: the first's.
    ``token_log_probs`` becomes each member's mean log-probability ``[..., member]``.
    """
    n = sum(len(group) for group in groups)
    parts: list[Tensor | None] = [None] * n
    for out, group in zip(outs, groups, strict=True):
        if out.token_log_probs is None:
            raise RuntimeError("a sweep of an answer set lacks its members' scores (a bug)")
        rows = out.token_log_probs.unflatten(-1, (-1, len(group)))
        for j, i in enumerate(group):
            parts[i] = rows[..., j]
    per_member = torch.stack(parts, dim=-1)  # type: ignore[arg-type]
    per_copy = torch.logsumexp(per_member, dim=-1)
    scores = first.scores.clone()
    for i, metric in enumerate(bound):
        if metric.reads == "prob":
            scores[i] = per_copy.exp().mean(-1)
        elif metric.reads == "log_prob":
            scores[i] = per_copy.mean(-1)
    return engine.SweepOutput(scores, first.top_ids, first.top_probs, per_member.mean(-2))


def _shown_cells(
    meter: Any, kind: str, metric: metrics.BoundMetric, baselines: Any
) -> Callable[[engine.SweepOutput], None]:
    """A sweep's ``on_cells``: the first metric's grid so far, as results normalise it, shown."""
    clean, corrupted = baselines.clean_scores[0], baselines.corrupted_scores[0]

    def show(out: engine.SweepOutput) -> None:
        meter.show_cells(kind, metric.normalize(out.scores[0].clone(), clean, corrupted))

    return show


def _mean_score(logits: Tensor, ids: Sequence[int], name: str) -> float:
    """Mean over copies of the teacher-forced ``prob`` or ``log_prob`` of ``ids``.

    Args:
        logits: ``[copies, k, d_vocab]``, position ``j`` predicting ``ids[j]``.
        ids: The answer's (or foil's) tokens.
        name: ``"prob"`` or ``"log_prob"``.
    """
    bound = metrics.BINDERS[name](None)  # type: ignore[arg-type]
    return engine.score_sequence_copies(logits, ids, [bound], 1)[0][0]


class _KindsInterrupt:
    """Catches Ctrl-C once armed (during the sweeps), so that the finished kinds are kept.

    Entered first in the trace's ``with``, so it exits last: the model is
    restored by then, and :meth:`CausalTracer._trace` raises a
    :class:`~lenscope.results.TraceInterrupted` carrying the finished kinds.
    """

    def __init__(self) -> None:
        self.armed = False
        self.error: KeyboardInterrupt | None = None

    def __enter__(self) -> "_KindsInterrupt":
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        if self.armed and isinstance(error, KeyboardInterrupt):
            self.error = error
            return True
        return False


def _shared_cells(cells: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """The one cell tensor every site traces, or ``{site name: cells}`` when they differ."""
    first = next(iter(cells.values()))
    same = all(c.shape == first.shape and torch.equal(c, first) for c in cells.values())
    return first if same else cells


def _check_batch_size(batch_size: Any) -> None:
    optional_positive_int(
        "batch_size",
        batch_size,
        "it counts corrupted copies per forward pass; pass e.g. 64, or None for automatic",
    )


_LISTED_PREDICTIONS = 5
"""Clean top predictions an :class:`AnswerWarning` lists (and searches for the spaced answer)."""

_SAME_SCORE = 1e-5
"""Relative tolerance under which a corrupted score counts as not lower than the clean one."""


def _check_answer(
    model: torch.nn.Module,
    given: str | int | Sequence[int] | AnswerSet | None,
    answer_id: int,
    clean_logits: Float[Tensor, " d_vocab"],
    scores: tuple[float, float],
    metric_name: str,
) -> None:
    """Warn (:class:`AnswerWarning`) when a trace probably follows a token the user did not mean.

    Args:
        model: Supplies the tokenizer.
        given: The answer as the user passed it (None: the clean top-1).
        answer_id: The answer token traced (the first of several).
        clean_logits: The clean run's next-token logits.
        scores: The clean and the corrupted score of the answer (the whole answer's).
        metric_name: Name of the patching metric, for the message.
    """
    probs = softmax(clean_logits)
    top_probs, top_ids = probs.topk(min(_LISTED_PREDICTIONS, probs.shape[-1]))
    top = top_ids.tolist()
    labels = dict(zip(top, token_labels(model, top), strict=True))
    listing = ", ".join(
        f"{labels[i]!r} (p = {p:.3g})" for i, p in zip(top, top_probs.tolist(), strict=True)
    )
    if isinstance(given, str) and answer_id not in labels and not given[:1].isspace():
        spaced = single_token_id(model, " " + given)
        if spaced in labels:
            warn(
                f"answer {given!r} has p = {float(probs[answer_id]):.2g} in the clean run, "
                f"outside its top {len(top)} ({listing}), while {' ' + given!r} is among them "
                f"(rank {top.index(spaced) + 1}, p = {float(probs[spaced]):.3g}): tokens "
                f"carry their leading space; pass {_answer_hint(' ' + given)} instead",
                AnswerWarning,
            )
            return
    clean_score, corrupted_score = scores
    answer = token_labels(model, [answer_id])[0]
    filler = given is None and is_filler_token(model, answer_id)
    unmoved = corrupted_score >= clean_score - _SAME_SCORE * abs(clean_score)
    if not (filler or unmoved):
        return
    reasons = []
    if filler:
        reasons.append(
            f"the answer, the clean top-1 token {answer!r} (p = {float(probs[answer_id]):.3g}), "
            "is filler (whitespace, punctuation or a function word that follows almost any prompt)"
        )
    if unmoved:
        reasons.append(
            f"corrupting the subject does not lower the answer's {metric_name} (clean "
            f"{clean_score:.3g}, corrupted {corrupted_score:.3g}), so no cell has anything "
            "to restore"
        )
    fixes = []
    content = [labels[i] for i in top if i != answer_id and not is_filler_token(model, i)]
    if content and (filler or given is None):
        fixes.append(f"pass the token you mean as the answer, e.g. {_answer_hint(content[0])}")
    if unmoved:
        fixes.append(
            "check the answer and the subject, or corrupt the subject more strongly "
            "(e.g. noise_multiplier=5; --noise 5s)"
        )
    if not fixes:
        fixes.append(f"pass the token you mean as the answer, e.g. {_answer_hint(' Paris')}")
    warn(
        f"this trace of {answer!r} measures nothing meaningful: {'; and '.join(reasons)}. "
        f"The clean run's top predictions are {listing}; {'; or '.join(fixes)}",
        AnswerWarning,
    )


def _answer_hint(text: str) -> str:
    """How to pass ``text`` as the answer, in Python and on the command line."""
    plain = not any(c in text for c in '"\\$`')
    flag = f'"{text}"' if plain else shlex.quote(text)
    return f"answer={text!r} (command line: --answer {flag})"
