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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope import engine
from lenscope.hooks import (
    EMBED_HOOK,
    check_hook_points,
    check_kind,
    hook_name,
    model_name,
    n_layers,
    preserved_model,
)
from lenscope.metrics import PatchingMetric, resolve_metric
from lenscope.noise import DEFAULT_NOISE_MULTIPLIER, draw_noise, embedding_sigma
from lenscope.results import TraceResult
from lenscope.tokens import answer_token, find_subject, prompt_tokens, token_labels

DEFAULT_KINDS = ("resid_post", "mlp_out", "attn_out")
Positions = Literal["all", "subject"] | Sequence[int]


def default_window(kind: str, n_layer: int) -> int:
    """ROME's windows: 1 layer for the residual stream, 10 for MLP and attention outputs."""
    return 1 if kind.startswith("resid") else min(10, n_layer)


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
        _check_positive_finite("noise_multiplier", noise_multiplier, allow_zero=True)
        if batch_size is not None:
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
        subject: str | tuple[int, int],
        *,
        kind: str = "resid_post",
        window: int | None = None,
        **options: Any,
    ) -> TraceResult:
        """Trace one hook-point type over every ``(layer, pos)`` cell.

        Args:
            prompt: Text, or 1-D token ids.
            subject: The subject's text, or its ``(start, end)`` token range.
            kind: ``resid_pre``, ``resid_mid``, ``resid_post``, ``mlp_out`` or ``attn_out``.
            window: Layers restored around each cell; default 1 for residual
                kinds and 10 (clipped to the depth) for ``mlp_out``/``attn_out``.
            **options: As for :meth:`trace_kinds`.

        Returns:
            The :class:`TraceResult`.
        """
        windows = None if window is None else {kind: window}
        return self.trace_kinds(prompt, subject, kinds=(kind,), windows=windows, **options)[kind]

    def trace_kinds(
        self,
        prompt: str | Tensor | Sequence[int],
        subject: str | tuple[int, int],
        *,
        kinds: Sequence[str] = DEFAULT_KINDS,
        windows: int | Mapping[str, int] | None = None,
        samples: int = 10,
        noise: float | None = None,
        noise_multiplier: float | None = None,
        noise_tensor: Float[Tensor, "samples subject_pos d_model"] | None = None,
        seed: int = 0,
        answer: str | int | None = None,
        metric: str | PatchingMetric = "prob",
        layers: int | Iterable[int] | None = None,
        positions: Positions = "all",
        top_k: int = 5,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> dict[str, TraceResult]:
        """Trace several hook-point types on the same clean run and the same corruption.

        Args:
            prompt: Text, or 1-D token ids.
            subject: The subject's text, or its ``(start, end)`` token range.
            kinds: Hook-point types to trace.
            windows: One window for all kinds, or per kind; see :meth:`trace`.
            samples: Corrupted copies (ROME: 10).
            noise: Absolute noise std; overrides the multiplier.
            noise_multiplier: Noise std as a multiple of :attr:`sigma` (default 3).
            noise_tensor: Exact noise ``[samples, subject_pos, d_model]``; overrides the rest.
            seed: Seed of the noise draws, shared by every kind.
            answer: Answer token (text or id); default the clean top-1 token.
            metric: ``"prob"``, ``"log_prob"``, or a callable ``(logits, answer) -> [batch]``.
            layers: Layers to trace (an int n means ``range(n)``); others are NaN.
            positions: ``"all"``, ``"subject"``, or a list of token positions.
            top_k: Predictions of each restored run kept for inspection.
            batch_size: Copies per forward pass; overrides the tracer's.
            progress: Overrides the tracer's progress-bar setting.

        Returns:
            ``{kind: TraceResult}`` in the order of ``kinds``.
        """
        model = self.model
        n_layer = n_layers(model)
        kinds = _check_kinds(kinds)
        window_of = _resolve_windows(windows, kinds, n_layer)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}; ROME uses 10")
        if not isinstance(top_k, int) or not 1 <= top_k <= model.cfg.d_vocab:
            raise ValueError(
                f"top_k must be an integer in [1, d_vocab], got {top_k!r}; pass e.g. 5"
            )
        if batch_size is not None:
            _check_batch_size(batch_size)
        metric_name, metric_fn = resolve_metric(metric)
        check_hook_points(
            model,
            [EMBED_HOOK] + [hook_name(k, layer) for k in kinds for layer in range(n_layer)],
        )
        tokens = prompt_tokens(model, prompt)
        subject_range = find_subject(model, tokens, subject)
        answer_id = None if answer is None else answer_token(model, answer)
        layer_list = _resolve_layers(layers, n_layer)
        pos_list = _resolve_positions(positions, tokens.shape[0], subject_range)
        n_subject = subject_range[1] - subject_range[0]

        with (
            preserved_model(model),
            engine.matmul_friendly_weights(model),
            torch.inference_mode(),
        ):
            if noise_tensor is not None:
                noise_tensor = _check_noise_tensor(noise_tensor, samples, n_subject, model)
                noise_std, seed_used = float(noise_tensor.float().std()), None
            else:
                noise_std = self._noise_std(noise, noise_multiplier)
                seed_used = seed
                noise_tensor = draw_noise(samples, n_subject, model.cfg.d_model, noise_std, seed)
            noise_tensor = noise_tensor.to(model.cfg.device, model.cfg.dtype)

            names = [hook_name(k, layer) for k in kinds for layer in range(n_layer)]
            clean = engine.clean_run(model, tokens, names)
            if answer_id is None:
                answer_id = int(clean.logits.argmax())
            # Scored exactly like every restored cell (engine.score_copies).
            clean_score, clean_ids, clean_probs = engine.score_copies(
                clean.logits[None], answer_id, metric_fn, top_k
            )
            corrupted = engine.corrupted_run(
                model,
                tokens,
                noise_tensor,
                subject_range,
                keep_prefix_state=self.strategy == "prefix",
            )
            corrupted_score, corrupted_ids, corrupted_probs = engine.score_copies(
                corrupted.logits, answer_id, metric_fn, top_k
            )
            cells = torch.cartesian_prod(torch.tensor(layer_list), torch.tensor(pos_list))
            cells = cells.reshape(-1, 2)

            results = {}
            for kind in kinds:
                out = engine.sweep(
                    model,
                    tokens,
                    kind=kind,
                    window=window_of[kind],
                    cells=cells,
                    clean=clean,
                    corrupted=corrupted,
                    noise=noise_tensor,
                    subject_range=subject_range,
                    answer_id=answer_id,
                    metric=metric_fn,
                    top_k=top_k,
                    strategy=self.strategy,
                    batch_size=batch_size or self.batch_size,
                    progress=self.progress if progress is None else progress,
                    description=f"trace {kind}",
                )
                results[kind] = out

        ids_seen = {answer_id, *clean_ids.tolist(), *corrupted_ids.tolist()}
        for out in results.values():
            ids_seen.update(out.top_ids[out.top_ids >= 0].unique().tolist())
        vocab = dict(zip(sorted(ids_seen), token_labels(model, sorted(ids_seen)), strict=True))
        return {
            kind: TraceResult(
                scores=out.scores,
                clean_score=clean_score,
                corrupted_score=corrupted_score,
                tokens=token_labels(model, tokens),
                token_ids=tokens.cpu(),
                subject_range=subject_range,
                answer=vocab[answer_id],
                answer_id=answer_id,
                kind=kind,
                hook_names=tuple(hook_name(kind, layer) for layer in range(n_layer)),
                window=window_of[kind],
                samples=samples,
                noise_std=noise_std,
                seed=seed_used,
                model_name=model_name(model),
                metric=metric_name,
                top_ids=out.top_ids,
                top_probs=out.top_probs,
                clean_top_ids=clean_ids.cpu(),
                clean_top_probs=clean_probs.cpu(),
                corrupted_top_ids=corrupted_ids.cpu(),
                corrupted_top_probs=corrupted_probs.cpu(),
                vocab=vocab,
                prompt=prompt if isinstance(prompt, str) else None,
            )
            for kind, out in results.items()
        }

    def filter_known(self, facts: Any, **options: Any) -> Any:
        """Keep the facts this model knows; see :func:`lenscope.datasets.filter_known`."""
        from lenscope.datasets import filter_known

        return filter_known(self, facts, **options)

    def trace_dataset(self, facts: Any, **options: Any) -> Any:
        """Trace many facts and average them; see :func:`lenscope.datasets.trace_dataset`."""
        from lenscope.datasets import trace_dataset

        return trace_dataset(self, facts, **options)

    def _noise_std(self, noise: float | None, multiplier: float | None) -> float:
        if noise is not None:
            _check_positive_finite("noise", noise, allow_zero=True)
            return float(noise)
        if multiplier is not None:
            _check_positive_finite("noise_multiplier", multiplier, allow_zero=True)
        factor = self.noise_multiplier if multiplier is None else float(multiplier)
        return factor * embedding_sigma(self.model, self.reference_subjects)


def _check_positive_finite(name: str, value: Any, *, allow_zero: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and value == value and abs(value) != float("inf")
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}; "
            f"pass e.g. {name}=3.0 (noise_multiplier) or an absolute std"
        )


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer (corrupted copies per forward pass), "
            f"got {batch_size!r}; pass e.g. 64, or None for automatic"
        )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(check_kind(k) for k in kinds)
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct and non-empty, got {kinds}")
    return kinds


def _resolve_windows(
    windows: int | Mapping[str, int] | None, kinds: tuple[str, ...], n_layer: int
) -> dict[str, int]:
    out = {}
    for kind in kinds:
        window = windows.get(kind) if isinstance(windows, Mapping) else windows
        if window is None:
            window = default_window(kind, n_layer)
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layer:
            raise ValueError(
                f"window must be an integer from 1 to n_layers={n_layer}, got {window!r} "
                f"for kind {kind!r}; ROME uses 1 for resid and 10 for mlp_out/attn_out"
            )
        out[kind] = window
    return out


def _resolve_layers(layers: int | Iterable[int] | None, n_layer: int) -> list[int]:
    if layers is None:
        return list(range(n_layer))
    chosen = list(range(layers)) if isinstance(layers, int) else [int(x) for x in layers]
    bad = [x for x in chosen if not 0 <= x < n_layer]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"layers must be distinct layer indices in [0, {n_layer}), got {layers!r}; "
            f"pass e.g. range(0, {n_layer})"
        )
    return sorted(chosen)


def _resolve_positions(
    positions: Positions, n_pos: int, subject_range: tuple[int, int]
) -> list[int]:
    if isinstance(positions, str):
        if positions == "all":
            return list(range(n_pos))
        if positions == "subject":
            return list(range(*subject_range))
        raise ValueError(
            f"positions must be 'all', 'subject' or a list of token positions, got {positions!r}"
        )
    chosen = [int(p) for p in positions]
    bad = [p for p in chosen if not 0 <= p < n_pos]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"positions must be distinct token positions in [0, {n_pos}), got {positions!r}"
        )
    return sorted(chosen)


def _check_noise_tensor(noise: Any, samples: int, n_subject: int, model: torch.nn.Module) -> Tensor:
    expected = (samples, n_subject, model.cfg.d_model)
    if not isinstance(noise, Tensor):
        raise TypeError(
            f"noise_tensor must be a torch.Tensor of shape {expected}, got {type(noise).__name__}"
        )
    if tuple(noise.shape) != expected:
        raise ValueError(
            f"noise_tensor must have shape [samples, n_subject_tokens, d_model] = {expected}, "
            f"got {tuple(noise.shape)}; draw it with torch.randn(*{expected}) * std"
        )
    if not torch.isfinite(noise).all():
        raise ValueError("noise_tensor must be finite, got NaN or inf entries")
    return noise
