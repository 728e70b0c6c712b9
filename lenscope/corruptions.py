"""Corruptions: *how* the corrupted run of a trace differs from the clean one.

A :class:`Corruption` is a small frozen object holding its settings. Bound to
one prompt (:meth:`Corruption.bind`) it becomes a :class:`CorruptedInput`:
the token ids of each corrupted copy, the forward hooks every corrupted run
carries, the first token position where the corrupted run can differ from
the clean one, and the record of its settings that results and checkpoints
keep. The engine (:mod:`lenscope.engine`) knows nothing else about it, so a
new corruption (a counterfactual prompt, another noise) is a new class here
and nothing more.

:class:`GaussianNoise` is ROME's corruption (Meng et al., 2022, arXiv
2202.05262, Section 2.1): Gaussian noise of standard deviation ``3 * sigma``
added to the subject's token embeddings at ``hook_embed``, in ``samples``
copies; sigma is measured at the hook (:func:`lenscope.noise.embedding_sigma`).
"""

import abc
import dataclasses
import hashlib
import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenscope.hooks import (
    EMBED_HOOK,
    KINDS,
    capture_forward,
    check_hook_points,
    embed_hook_caveat,
    n_layers,
    preserved_model,
)
from lenscope.noise import (
    DEFAULT_NOISE_MULTIPLIER,
    draw_noise,
    draw_student_t,
    draw_uniform,
    embedding_moments,
    embedding_sigma,
)
from lenscope.sites import HEAD_KINDS, source_rows
from lenscope.sites import site as _site
from lenscope.tokens import prompt_tokens, token_labels
from lenscope.validation import (
    InvalidInput,
    InvalidInputType,
    distinct_indices,
    finite_number,
    is_int,
    warn,
)

HookFn = Callable[[Tensor, Any], Tensor | None]

PRE_BLOCK_HOOKS: tuple[str, ...] = (EMBED_HOOK, "hook_pos_embed")
"""Hook points that act before the first block (a prefix-strategy stair never runs them)."""


@dataclasses.dataclass(frozen=True)
class CorruptedInput:
    """A corruption bound to one prompt: everything the engine needs to run it.

    Batches the engine runs hold ``copies * samples`` rows, copy-major: row
    ``c * samples + s`` is sample ``s``. Hooks must accept any whole number
    of copies. Several prompts of one token length packed together
    (:func:`pack_inputs`) have ``prompts * samples`` rows per copy,
    prompt-major.

    Attributes:
        tokens: Token ids of each corrupted sample.
        fwd_hooks: ``(hook_name, fn)`` pairs every corrupted forward pass carries.
        first_changed: First token position whose activations can differ
            from the clean run's; restoring earlier positions is a no-op.
        record: The corruption's settings, as results and checkpoints keep them.
        prompts: Prompts packed together (:func:`pack_inputs`).
        suffix_hooks: ``suffix_hooks(pos)``: the hooks of a run that computes
            only positions ``pos:`` from a block's input on (the prefix
            strategy's stairs, :mod:`lenscope.engine`), with positions counted
            from ``pos``. Needed by a corruption that acts inside the blocks
            (an ablation at some layer); None where every hook acts before the
            first block (``hook_embed``), which a stair never runs.
    """

    tokens: Int[Tensor, "row pos"]
    fwd_hooks: tuple[tuple[str, HookFn], ...]
    first_changed: int
    record: dict[str, Any]
    prompts: int = 1
    suffix_hooks: Callable[[int], tuple[tuple[str, HookFn], ...]] | None = None

    @property
    def rows(self) -> int:
        """Rows of one copy (rows per cell): ``prompts * samples``, prompt-major."""
        return int(self.tokens.shape[0])

    @property
    def samples(self) -> int:
        """Corrupted samples of each prompt."""
        return self.rows // self.prompts

    def stair_hooks(self, pos: int) -> tuple[tuple[str, HookFn], ...]:
        """The hooks of a run of positions ``pos:`` that starts at a block's input.

        Such a run starts from this input's own residual stream, so hooks
        before the first block (:data:`PRE_BLOCK_HOOKS`) have acted already;
        hooks inside the blocks come from :attr:`suffix_hooks`.

        Raises:
            InvalidInput: For hooks inside the blocks without ``suffix_hooks``.
        """
        if self.suffix_hooks is not None:
            return tuple(self.suffix_hooks(pos))
        inside = [name for name, _ in self.fwd_hooks if name not in PRE_BLOCK_HOOKS]
        if inside:
            raise InvalidInput(
                f"the prefix strategy runs positions {pos}: of each block alone, so a "
                f"corruption hooked inside the blocks ({inside}) must say how its hooks apply "
                "there, but this CorruptedInput has no suffix_hooks; give it "
                "suffix_hooks=lambda pos: ..., or trace with strategy='full'"
            )
        return ()

    def batch_tokens(self, copies: int) -> Int[Tensor, "row pos"]:
        """Token ids of ``copies`` copies of every row, copy-major."""
        return einops.repeat(self.tokens, "row pos -> (copy row) pos", copy=copies)

    def clean_copies(self, tokens: Int[Tensor, " pos"]) -> "CorruptedInput":
        """``samples`` copies of the clean prompt: the run a noising sweep patches into.

        Same first changed position and record; no hooks.
        """
        return CorruptedInput(
            tokens=einops.repeat(tokens, "pos -> sample pos", sample=self.samples),
            fwd_hooks=(),
            first_changed=self.first_changed,
            record=self.record,
        )


def pack_inputs(inputs: Sequence[CorruptedInput]) -> CorruptedInput:
    """Several bound prompts of one token length as one corrupted input, run together.

    Rows are ``(prompt, sample)``, prompt-major; each prompt keeps its own
    tokens and hooks (a hook sees only its own prompt's rows, in any whole
    number of copies, as it would alone). Restoring a position before a
    prompt's first changed position is a no-op for that prompt, so the pack's
    first changed position is the earliest of them.

    Args:
        inputs: Bound corruptions with equal token lengths and sample counts.

    Returns:
        The packed input (its ``record`` is the first prompt's).
    """
    if not inputs:
        raise InvalidInput("pack_inputs needs at least one bound prompt, got none")
    shapes = {tuple(x.tokens.shape) for x in inputs}
    if len(shapes) != 1 or any(x.prompts != 1 for x in inputs):
        raise InvalidInput(
            f"packed prompts must have one shape [samples, pos] each, got {sorted(shapes)}; "
            "pack prompts of equal token length and equal samples only"
        )
    if len(inputs) == 1:
        return inputs[0]
    samples = inputs[0].samples
    suffix_hooks = None
    if any(x.suffix_hooks is not None for x in inputs):

        def suffix_hooks(pos: int) -> tuple[tuple[str, HookFn], ...]:
            return _packed_hooks([x.stair_hooks(pos) for x in inputs], samples)

    return CorruptedInput(
        tokens=torch.cat([x.tokens for x in inputs]),
        fwd_hooks=_packed_hooks([x.fwd_hooks for x in inputs], samples),
        first_changed=min(x.first_changed for x in inputs),
        record=inputs[0].record,
        prompts=len(inputs),
        suffix_hooks=suffix_hooks,
    )


def _packed_hooks(
    hooks: Sequence[Sequence[tuple[str, HookFn]]], samples: int
) -> tuple[tuple[str, HookFn], ...]:
    """One hook per hook point applying each packed prompt's own hook to its rows."""
    names = list(dict.fromkeys(name for own in hooks for name, _ in own))
    return tuple(
        (name, _packed_hook([dict(own).get(name) for own in hooks], samples)) for name in names
    )


def _packed_hook(fns: Sequence[HookFn | None], samples: int) -> HookFn:
    """One hook applying each packed prompt's own hook (or none) to that prompt's rows."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        parts = einops.rearrange(
            act,
            "(copy prompt sample) ... -> prompt (copy sample) ...",
            prompt=len(fns),
            sample=samples,
        )
        out = [
            part if fn is None else _applied(fn, part, hook)
            for fn, part in zip(fns, parts, strict=True)
        ]
        return einops.rearrange(
            torch.stack(out), "prompt (copy sample) ... -> (copy prompt sample) ...", sample=samples
        )

    return hook


def _applied(fn: HookFn, act: Tensor, hook: Any) -> Tensor:
    act = act.clone()
    out = fn(act, hook)
    return act if out is None else out


class Corruption(abc.ABC):
    """What makes the corrupted run corrupted. Subclasses are frozen dataclasses.

    Class attributes:
        name: The name results and checkpoints record.
        default_metric: The metric a trace with this corruption uses unless told.
        has_counterfactual_answer: Whether the corrupted run answers a prompt
            of its own (a counterfactual prompt does): its top-1 token is then
            the default foil of the logit-difference metrics.
    """

    name: ClassVar[str]
    default_metric: ClassVar[str] = "prob"
    has_counterfactual_answer: ClassVar[bool] = False

    def changed_range(
        self, model: torch.nn.Module, tokens: Int[Tensor, " pos"]
    ) -> tuple[int, int] | None:
        """The token range this corruption changes without being told a subject, if it has one."""
        return None

    def resolve(self, model: torch.nn.Module) -> "Corruption":
        """Fix every setting that depends on the model (e.g. noise measured in sigmas)."""
        return self

    @abc.abstractmethod
    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """The corrupted run of one prompt (call :meth:`resolve` first)."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings with a ``"name"`` key; :func:`corruption_from_dict` inverts it."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Corruption":
        """Rebuild the corruption from :meth:`to_dict`'s output."""


DEFAULT_SAMPLES = 10
"""Corrupted copies of a noise corruption (ROME's 10)."""


def _check_noise_tensor(noise_tensor: Any, samples: Any) -> None:
    """Refuse all but a finite ``[samples, n_subject_tokens, d_model]`` tensor, ``samples`` rows."""
    if not isinstance(noise_tensor, Tensor):
        raise InvalidInputType(
            "noise_tensor must be a torch.Tensor of shape [samples, subject tokens, "
            f"d_model], got {type(noise_tensor).__name__}"
        )
    if noise_tensor.ndim != 3 or noise_tensor.shape[0] < 1:
        raise InvalidInput(
            f"noise_tensor must have shape [samples, n_subject_tokens, d_model] with samples "
            f">= 1, got {tuple(noise_tensor.shape)}; pass e.g. torch.randn(10, 3, d_model) * std"
        )
    if samples is not None and samples != noise_tensor.shape[0]:
        raise InvalidInput(
            f"samples={samples!r} conflicts with noise_tensor, which holds "
            f"{noise_tensor.shape[0]} samples (shape {tuple(noise_tensor.shape)} = [samples, "
            "n_subject_tokens, d_model]); leave samples out (noise_tensor sets it), or pass "
            f"a noise_tensor of {samples!r} samples"
        )
    if not torch.isfinite(noise_tensor).all():
        raise InvalidInput("noise_tensor must be finite, got NaN or inf entries")


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectNoise(Corruption):
    """Noise added to (or replacing) the subject's embeddings at ``hook_embed``, in copies.

    Subclasses say how the noise is distributed (:meth:`draw`); every one is
    scaled to the same standard deviation, ``noise_multiplier`` times the
    embedding sigma measured at the hook, so that the corruptions differ in
    shape, not in size.

    Args:
        samples: Corrupted copies (ROME: 10, the default); with ``noise_tensor``,
            its first dimension (pass neither, or both equal).
        noise: Absolute noise std; overrides ``noise_multiplier``.
        noise_multiplier: Noise std as a multiple of the embedding sigma
            measured at ``hook_embed`` (ROME: 3).
        seed: Seed of the noise draws (float32, CPU generator: the same on every device).
        noise_tensor: Exact noise ``[samples, subject_pos, d_model]``;
            overrides ``noise``, ``noise_multiplier`` and ``seed``, and sets ``samples``.
        reference_subjects: Subjects over which sigma is measured; default
            the ROME known-facts subjects shipped with lenscope.
        replace: Replace the subject's embeddings with the noise instead of
            adding it (ROME's ``--replace``).
    """

    samples: int | None = None
    noise: float | int | None = None
    noise_multiplier: float | int = DEFAULT_NOISE_MULTIPLIER
    seed: int = 0
    noise_tensor: Float[Tensor, "samples subject_pos d_model"] | None = None
    reference_subjects: tuple[str, ...] | None = None
    replace: bool = False

    def __post_init__(self) -> None:
        """Check every setting that does not need the model; ``samples`` from ``noise_tensor``."""
        if self.noise_tensor is not None:
            _check_noise_tensor(self.noise_tensor, self.samples)
            object.__setattr__(self, "samples", self.noise_tensor.shape[0])
        elif self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES)
        if not is_int(self.samples) or self.samples < 1:
            raise InvalidInput(
                f"samples must be an integer >= 1, got {self.samples!r}; ROME uses 10"
            )
        if self.noise is not None:
            finite_number(
                "noise",
                self.noise,
                "noise is the absolute std; pass e.g. noise=0.5, or noise_multiplier=3.0 "
                "for three times the embedding sigma",
                minimum=0,
            )
        finite_number(
            "noise_multiplier",
            self.noise_multiplier,
            "pass e.g. noise_multiplier=3.0 (ROME's 3 sigma), or noise=... for an absolute std",
            minimum=0,
        )
        if not is_int(self.seed):
            raise InvalidInput(f"seed must be an integer, got {self.seed!r}; pass e.g. seed=0")
        if self.reference_subjects is not None:
            object.__setattr__(self, "reference_subjects", tuple(self.reference_subjects))
        if not isinstance(self.replace, bool):
            raise InvalidInputType(
                f"replace must be True or False, got {self.replace!r}; replace=True puts the "
                "noise in place of the subject's embeddings instead of adding it"
            )

    @abc.abstractmethod
    def draw(
        self, samples: int, n_tokens: int, d_model: int, std: float, seed: int
    ) -> Float[Tensor, "samples subject_pos d_model"]:
        """Noise of standard deviation ``std``, the same for the same seed on every device."""

    def params(self) -> dict[str, Any]:
        """The subclass's own settings, beside samples, noise_std and seed in records."""
        return {"replace": True} if self.replace else {}

    def std(self, model: torch.nn.Module) -> float:
        """The absolute noise std for ``model`` (sigma is measured once per model)."""
        if self.noise is not None:
            return float(self.noise)
        with preserved_model(model):
            sigma = embedding_sigma(model, self.reference_subjects)
        return float(self.noise_multiplier) * sigma

    def resolve(self, model: torch.nn.Module) -> "SubjectNoise":
        """A copy with the absolute std fixed (``noise``), measured on ``model`` if needed."""
        if self.noise_tensor is not None or self.noise is not None:
            return self
        return dataclasses.replace(self, noise=self.std(model))

    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """Draw (or take) the noise and build the ``hook_embed`` hook adding it to the subject."""
        start, end = subject_range
        d_model = int(model.cfg.d_model)
        if self.noise_tensor is not None:
            expected = (self.samples, end - start, d_model)
            if tuple(self.noise_tensor.shape) != expected:
                raise InvalidInput(
                    f"noise_tensor must have shape [samples, n_subject_tokens, d_model] = "
                    f"{expected}, got {tuple(self.noise_tensor.shape)}; draw it with "
                    f"torch.randn(*{expected}) * std"
                )
            noise, noise_std, seed = self.noise_tensor, float(self.noise_tensor.float().std()), None
        else:
            noise_std = self.std(model)
            noise = self.draw(self.samples, end - start, d_model, noise_std, self.seed)
            seed = self.seed
        noise = noise.to(model.cfg.device, model.cfg.dtype)
        return CorruptedInput(
            tokens=einops.repeat(tokens, "pos -> sample pos", sample=self.samples),
            fwd_hooks=(embed_noise_hook(model, noise, subject_range, self.replace),),
            first_changed=start,
            record={
                "name": self.name,
                "samples": self.samples,
                "noise_std": noise_std,
                "seed": seed,
                **self.params(),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "samples", "noise_std", "seed", **params()}``; call :meth:`resolve` first."""
        if self.noise_tensor is not None:
            noise_std, seed = float(self.noise_tensor.float().std()), None
        elif self.noise is None:
            raise InvalidInput(
                "this GaussianNoise has no absolute std yet (noise=None), so its settings "
                "cannot be recorded; call .resolve(model) first"
            )
        else:
            noise_std, seed = float(self.noise), self.seed
        return {
            "name": self.name,
            "samples": self.samples,
            "noise_std": noise_std,
            "seed": seed,
            **self.params(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SubjectNoise":
        """Rebuild from :meth:`to_dict`; a record of an explicit noise tensor (seed None) cannot."""
        if data.get("seed") is None:
            raise InvalidInput(
                "the trace used an explicit noise_tensor (its seed is None), so its noise "
                "cannot be regenerated; pass the same tensor as noise_tensor=..."
            )
        own = {f.name for f in dataclasses.fields(cls)} - {"samples", "noise", "seed"}
        extra = {k: v for k, v in data.items() if k in own}
        return cls(samples=data["samples"], noise=data["noise_std"], seed=data["seed"], **extra)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianNoise(SubjectNoise):
    """ROME's corruption: Gaussian noise added to the subject's embeddings at ``hook_embed``.

    Arguments as for :class:`SubjectNoise`: ``GaussianNoise(samples=10,
    noise_multiplier=3.0)`` is ROME's ``s3``.
    """

    name: ClassVar[str] = "gaussian_noise"

    def draw(
        self, samples: int, n_tokens: int, d_model: int, std: float, seed: int
    ) -> Float[Tensor, "samples subject_pos d_model"]:
        """Independent Gaussian draws (:func:`lenscope.noise.draw_noise`)."""
        return draw_noise(samples, n_tokens, d_model, std, seed)


@dataclasses.dataclass(frozen=True, eq=False)
class UniformNoise(SubjectNoise):
    """Uniform noise on ``[-a, a]``, ``a = sqrt(3) * std`` (ROME's ``u<a>`` names the half-width).

    Arguments as for :class:`SubjectNoise`.
    """

    name: ClassVar[str] = "uniform_noise"

    def draw(
        self, samples: int, n_tokens: int, d_model: int, std: float, seed: int
    ) -> Float[Tensor, "samples subject_pos d_model"]:
        """Independent uniform draws (:func:`lenscope.noise.draw_uniform`)."""
        return draw_uniform(samples, n_tokens, d_model, std, seed)


@dataclasses.dataclass(frozen=True, eq=False)
class StudentTNoise(SubjectNoise):
    """Student-t noise with ``df`` degrees of freedom, scaled to the same std as the others.

    Heavier-tailed than Gaussian noise: a few large components, most small.
    ROME's ``t<df>`` scales a multivariate t on its fitted Gaussian; this
    one is independent per component (see :func:`lenscope.noise.draw_student_t`).

    Args:
        df: Degrees of freedom, > 2 (the variance ``df / (df - 2)`` is infinite otherwise).
        **kwargs: As for :class:`SubjectNoise`.
    """

    df: float | int = 3.0

    name: ClassVar[str] = "student_t_noise"

    def __post_init__(self) -> None:
        """Check ``df`` as well."""
        super().__post_init__()
        finite_number("df", self.df, "pass e.g. df=3 (ROME's t3); larger df is closer to Gaussian")
        if self.df <= 2:
            raise InvalidInput(
                f"Student-t noise needs df > 2 degrees of freedom (its variance df / (df - 2) "
                f"is infinite otherwise, so it cannot be scaled to a std), got df={self.df!r}; "
                "pass e.g. df=3 (ROME's t3)"
            )

    def draw(
        self, samples: int, n_tokens: int, d_model: int, std: float, seed: int
    ) -> Float[Tensor, "samples subject_pos d_model"]:
        """Independent t draws scaled to ``std`` (:func:`lenscope.noise.draw_student_t`)."""
        return draw_student_t(samples, n_tokens, d_model, std, seed, float(self.df))

    def params(self) -> dict[str, Any]:
        """``df``, and ``replace`` when set."""
        return {"df": float(self.df), **super().params()}


@dataclasses.dataclass(frozen=True, eq=False)
class MultivariateGaussianNoise(Corruption):
    """Draws of the Gaussian fitted to the subject embeddings at ``hook_embed`` (ROME's ``m``).

    The mean and covariance are those of ``hook_embed`` activations over the
    reference subjects' tokens (:func:`lenscope.noise.embedding_moments`,
    cached per model); each corrupted copy gets a draw ``mean + L z`` with
    ``L L^T = covariance + ridge * I``, added to the subject's embeddings as
    ROME adds it, or in their place with ``replace=True``.

    Args:
        samples: Corrupted copies.
        seed: Seed of the standard-normal draws ``z``.
        ridge: Added to the covariance's diagonal; needed when the covariance
            is singular (fewer distinct reference tokens than ``d_model``).
        reference_subjects: Subjects the moments are measured over; default
            the ROME known-facts subjects.
        replace: Replace the subject's embeddings with the draws.
    """

    samples: int = 10
    seed: int = 0
    ridge: float | int = 0.0
    reference_subjects: tuple[str, ...] | None = None
    replace: bool = False

    name: ClassVar[str] = "multivariate_gaussian_noise"

    def __post_init__(self) -> None:
        """Check every setting that does not need the model."""
        if not is_int(self.samples) or self.samples < 1:
            raise InvalidInput(
                f"samples must be an integer >= 1, got {self.samples!r}; ROME uses 10"
            )
        if not is_int(self.seed):
            raise InvalidInput(f"seed must be an integer, got {self.seed!r}; pass e.g. seed=0")
        finite_number("ridge", self.ridge, "pass e.g. ridge=1e-3, or 0 for none", minimum=0)
        if self.reference_subjects is not None:
            object.__setattr__(self, "reference_subjects", tuple(self.reference_subjects))
        if not isinstance(self.replace, bool):
            raise InvalidInputType(f"replace must be True or False, got {self.replace!r}")

    def factor(self, model: torch.nn.Module) -> tuple[Tensor, Tensor]:
        """``(mean, L)`` with ``L L^T = covariance + ridge * I`` (float64)."""
        with preserved_model(model):
            mean, cov, count = embedding_moments(model, self.reference_subjects)
        d_model = cov.shape[0]
        lower, info = torch.linalg.cholesky_ex(
            cov + self.ridge * torch.eye(d_model, dtype=cov.dtype)
        )
        if int(info) != 0:
            rank = int(torch.linalg.matrix_rank(cov))
            raise InvalidInput(
                f"the covariance of the subject embeddings at hook_embed must be positive "
                f"definite to draw from it, but it is singular (rank {rank} of d_model="
                f"{d_model}, from {count} reference tokens) with ridge={self.ridge}; pass "
                f"ridge=1e-3 * the mean variance ({1e-3 * float(cov.diagonal().mean()):.3g}) "
                "or more, or more reference_subjects"
            )
        return mean, lower

    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """Draw ``samples`` copies of the subject's noise from the fitted Gaussian."""
        start, end = subject_range
        mean, lower = self.factor(model)
        d_model = mean.shape[0]
        z = draw_noise(self.samples, end - start, d_model, 1.0, self.seed).double()
        noise = (mean + z @ lower.T).to(model.cfg.device, model.cfg.dtype)
        return CorruptedInput(
            tokens=einops.repeat(tokens, "pos -> sample pos", sample=self.samples),
            fwd_hooks=(embed_noise_hook(model, noise, subject_range, self.replace),),
            first_changed=start,
            record=self.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "samples", "seed", "ridge"}``, and ``replace`` when set."""
        out = {"name": self.name, "samples": self.samples, "seed": self.seed, "ridge": self.ridge}
        return {**out, "replace": True} if self.replace else out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MultivariateGaussianNoise":
        """Rebuild from :meth:`to_dict`."""
        return cls(
            samples=data["samples"],
            seed=data["seed"],
            ridge=data.get("ridge", 0.0),
            replace=data.get("replace", False),
        )


_CAVEAT_SHOWN: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def embed_noise_hook(
    model: torch.nn.Module,
    noise: Float[Tensor, "samples subject_pos d_model"],
    subject_range: tuple[int, int],
    replace: bool,
) -> tuple[str, HookFn]:
    """The ``(hook_embed, hook)`` pair of a noise corruption on ``model``.

    Warns (once per model) where ``hook_embed`` is not the raw token
    embeddings (:func:`lenscope.hooks.embed_hook_caveat`: Bloom's is after
    its embedding LayerNorm), so that the noise means something else there.
    """
    caveat = embed_hook_caveat(model)
    if caveat is not None and model not in _CAVEAT_SHOWN:
        _CAVEAT_SHOWN.add(model)
        warn(caveat, UserWarning)
    return EMBED_HOOK, noise_hook(noise, subject_range, replace=replace)


def noise_hook(
    noise: Float[Tensor, "samples subject_pos d_model"],
    subject_range: tuple[int, int],
    *,
    replace: bool = False,
) -> HookFn:
    """A ``hook_embed`` hook adding each row's noise to the subject positions, or replacing them."""
    start, end = subject_range

    def hook(embed: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        copies = embed.shape[0] // noise.shape[0]
        rows = einops.repeat(noise, "sample pos d -> (copy sample) pos d", copy=copies)
        embed = embed.clone()
        if replace:
            embed[:, start:end] = rows.to(embed.dtype)
        else:
            embed[:, start:end] = embed[:, start:end] + rows.to(embed.dtype)
        return embed

    return hook


@dataclasses.dataclass(frozen=True, eq=False)
class CounterfactualPrompt(Corruption):
    """Symmetric token replacement (STR): the corrupted run is another prompt of the same length.

    Zhang & Nanda (2023, "Towards Best Practices of Activation Patching",
    arXiv 2309.16042) recommend it over Gaussian noise wherever a
    counterfactual exists: "The Colosseum is located in the city of" for
    "The Eiffel Tower is located in the city of". The two prompts must
    tokenise to the same number of tokens; positions before the first token
    that differs cannot change anything, and the engine skips them.

    Args:
        prompt: The counterfactual prompt: text (tokenised as the clean
            prompt is) or token ids.
    """

    prompt: str | tuple[int, ...]

    name: ClassVar[str] = "counterfactual_prompt"
    default_metric: ClassVar[str] = "normalized_logit_diff"
    has_counterfactual_answer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Check the prompt's type; its length is checked against the clean prompt's at bind."""
        value = self.prompt
        if isinstance(value, Tensor):
            value = value.flatten().tolist()
        if isinstance(value, str):
            if not value:
                raise InvalidInput(
                    "the counterfactual prompt must be non-empty text or token ids, got ''; "
                    "pass e.g. 'The Colosseum is located in the city of'"
                )
        elif isinstance(value, list | tuple) and value and all(is_int(i) for i in value):
            value = tuple(int(i) for i in value)
        else:
            raise InvalidInputType(
                "the counterfactual prompt must be text or a list of token ids, got "
                f"{type(self.prompt).__name__}; pass e.g. 'The Colosseum is located in the city of'"
            )
        object.__setattr__(self, "prompt", value)

    def tokens(self, model: torch.nn.Module, clean: Int[Tensor, " pos"]) -> Int[Tensor, " pos"]:
        """The counterfactual's token ids, checked against the clean prompt's."""
        other = prompt_tokens(
            model, self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        )
        if other.shape[0] != clean.shape[0]:
            raise InvalidInput(
                "a counterfactual prompt must tokenise to as many tokens as the clean prompt "
                f"(symmetric token replacement), got {other.shape[0]} tokens "
                f"{list(token_labels(model, other))} for {clean.shape[0]} tokens "
                f"{list(token_labels(model, clean))}; change the counterfactual so that each "
                "replaced word has as many tokens as the one it replaces"
            )
        if torch.equal(other.cpu(), clean.cpu()):
            raise InvalidInput(
                f"the counterfactual prompt must differ from the clean prompt, got the same "
                f"tokens {list(token_labels(model, clean))}; pass a prompt with another "
                "subject, e.g. 'The Colosseum' for 'The Eiffel Tower'"
            )
        return other.to(clean.device)

    def changed_range(self, model: torch.nn.Module, tokens: Int[Tensor, " pos"]) -> tuple[int, int]:
        """From the first token that differs to the last one (the subject of a trace)."""
        differs = torch.nonzero(self.tokens(model, tokens) != tokens).flatten()
        return int(differs[0]), int(differs[-1]) + 1

    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """One corrupted sample: the counterfactual's tokens, no hooks."""
        other = self.tokens(model, tokens)
        first = int(torch.nonzero(other != tokens).flatten()[0])
        return CorruptedInput(
            tokens=other[None], fwd_hooks=(), first_changed=first, record=self.to_dict()
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "counterfactual"}`` (text, or a list of token ids)."""
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return {"name": self.name, "counterfactual": prompt}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CounterfactualPrompt":
        """Rebuild from :meth:`to_dict`."""
        prompt = data["counterfactual"]
        return cls(prompt if isinstance(prompt, str) else tuple(prompt))


@dataclasses.dataclass(frozen=True, eq=False)
class CounterfactualColumn(Corruption):
    """A counterfactual prompt per fact, from a column of a dataset (for ``trace_dataset``).

    Each fact is traced with :class:`CounterfactualPrompt` of its own
    ``column`` entry (:func:`lenscope.datasets.pair_counterfactuals` builds
    such a column from ROME's known facts); facts without one are skipped.
    It cannot trace a single prompt: pass a :class:`CounterfactualPrompt` there.

    Args:
        column: The fact field holding the counterfactual prompt.
    """

    column: str = "counterfactual"

    name: ClassVar[str] = "counterfactual_column"
    default_metric: ClassVar[str] = "normalized_logit_diff"
    has_counterfactual_answer: ClassVar[bool] = True

    def for_fact(self, fact: Mapping[str, Any]) -> CounterfactualPrompt:
        """The fact's own counterfactual prompt."""
        return CounterfactualPrompt(fact[self.column])

    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """Refused: a column has a counterfactual per fact, not one for any prompt."""
        raise InvalidInput(
            f"CounterfactualColumn({self.column!r}) names a column of a dataset, so it can only "
            "trace facts (lenscope.trace_dataset); for one prompt pass "
            "corruption=lenscope.CounterfactualPrompt('...') or use tracer.patch"
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "counterfactual_column"}``."""
        return {"name": self.name, "counterfactual_column": self.column}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CounterfactualColumn":
        """Rebuild from :meth:`to_dict`."""
        return cls(data.get("counterfactual_column", "counterfactual"))


ABLATION_SITES: tuple[str, ...] = (*KINDS, "z", "q", "k", "v")
"""Sites an ablation can act at: the residual-width kinds and the per-head ``z``/``q``/``k``/``v``
(``hook_pattern`` is a distribution over source positions, which zeroing or averaging breaks)."""

ABLATION_POSITIONS: tuple[str, ...] = ("subject", "all")
"""Named position sets of an ablation; a list of token positions also works."""


def _index_tuple(name: str, value: Any, fix: str) -> tuple[int, ...] | None:
    """None, or ``value`` (an int or a sequence of ints) as a tuple; refused otherwise."""
    if value is None:
        return None
    values = value.flatten().tolist() if isinstance(value, Tensor) else value
    values = [values] if is_int(values) else values
    if isinstance(values, str) or not isinstance(values, Sequence | range):
        raise InvalidInputType(f"{name} must be an integer or a list of them, got {value!r}; {fix}")
    if not values or not all(is_int(v) for v in values):
        raise InvalidInput(
            f"{name} must be an integer or a non-empty list of them, got {value!r}; {fix}"
        )
    return tuple(int(v) for v in values)


def _prompt_tuple(
    name: str, value: Any, example: str, needed_by: str = ""
) -> tuple[str | tuple[int, ...], ...]:
    """One prompt (text or token ids) or several, as a tuple of text or id tuples.

    With ``needed_by`` (what needs them, for the message), none is refused.
    """
    if isinstance(value, Tensor):
        value = value.tolist()
    one = isinstance(value, str) or (
        isinstance(value, Sequence) and bool(value) and all(is_int(i) for i in value)
    )
    items = [value] if one else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise InvalidInputType(
            f"{name} must be text, token ids or a list of them, got {type(value).__name__}; "
            f"pass e.g. {name}={example!r}"
        )
    out: list[str | tuple[int, ...]] = []
    for item in items:
        item = item.tolist() if isinstance(item, Tensor) else item
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, Sequence) and item and all(is_int(i) for i in item):
            out.append(tuple(int(i) for i in item))
        else:
            raise InvalidInput(
                f"each of {name} must be non-empty text or token ids, got {item!r}; "
                f"pass e.g. {name}={example!r}"
            )
    if needed_by and not out:
        raise InvalidInput(
            f"{needed_by}, got {name}={value!r}; pass at least one, e.g. {name}={[example]!r}"
        )
    return tuple(out)


_EXAMPLE_PROMPT = "The Colosseum is located in the city of"


def _jsonable(prompts: Sequence[str | tuple[int, ...]]) -> list[str | list[int]]:
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _ablation_hook(
    value: Float[Tensor, "..."], mask: Bool[Tensor, "pos ..."], per_row: bool
) -> HookFn:
    """A hook writing ``value`` wherever ``mask`` is true, in place.

    ``value`` broadcasts over ``[batch, pos, ...]`` (zero, a mean) or has one
    row per sample (``per_row``: a resampled prompt's activations, repeated
    over the copies of a batch as :func:`lenscope.sites.source_rows` does).
    """

    def hook(act: Float[Tensor, "batch pos ..."], hook: Any) -> Tensor:
        fill = source_rows(value, act.shape[0]) if per_row else value
        ablated = torch.where(mask, fill.to(act.dtype), act)
        if act.requires_grad:
            # A gradient run (attribution patching): autograd forbids writing
            # into a hook point's output that carries a backward hook.
            return ablated
        # In place, as lenscope.sites.Site.restore_hook explains (TransformerBridge).
        return act.copy_(ablated)

    return hook


@dataclasses.dataclass(frozen=True, eq=False)
class SiteAblation(Corruption):
    """Replace one site's activation at some layers and positions: the base of the ablations.

    Where (a site, as :mod:`lenscope.sites` names it) is separate from what
    replaces it (a subclass's :meth:`values`), as in pyvene. The corrupted run
    is the clean prompt with the activation at
    ``blocks.{layer}.hook_{site}`` (``blocks.{layer}.attn.hook_{site}`` for
    ``z``/``q``/``k``/``v``) replaced at the ablated positions (and heads),
    written in place so that a TransformerBridge's residual stream carries it.
    Positions before the first ablated one are unchanged (causal attention),
    so restoring them is skipped. Nothing is done at ``hook_embed``.

    Args:
        site: One of :data:`ABLATION_SITES` (``"mlp_out"``, ``"resid_post"``, ``"z"``, ...).
        layers: The layers ablated: an int, a list, or None for every layer.
        positions: ``"subject"`` (the trace's subject tokens, the default),
            ``"all"``, or token positions (negative ones count from the end).
        heads: For a per-head site, the heads ablated (an int or a list);
            None for all of them. Key/value heads for ``k``/``v`` on a
            grouped-query model.
    """

    site: str
    layers: int | Sequence[int] | None = None
    positions: str | Sequence[int] = "subject"
    heads: int | Sequence[int] | None = None

    def __post_init__(self) -> None:
        """Check every setting that does not need the model."""
        if not isinstance(self.site, str) or self.site not in ABLATION_SITES:
            raise InvalidInput(
                f"site must be one of {ABLATION_SITES} (blocks.L.hook_<site>, or "
                f"blocks.L.attn.hook_<site> per head), got {self.site!r}; pass e.g. "
                "site='mlp_out'"
            )
        fix = "pass e.g. layers=[2], layers=2, or layers=None for every layer"
        object.__setattr__(self, "layers", _index_tuple("layers", self.layers, fix))
        if isinstance(self.positions, str):
            if self.positions not in ABLATION_POSITIONS:
                raise InvalidInput(
                    f"positions must be 'subject', 'all' or a list of token positions, got "
                    f"{self.positions!r}; pass e.g. positions='subject'"
                )
        else:
            fix = "pass 'subject', 'all' or token positions such as [1, 2]"
            object.__setattr__(self, "positions", _index_tuple("positions", self.positions, fix))
        if self.heads is not None and self.site not in HEAD_KINDS:
            raise InvalidInput(
                f"heads apply to the per-head sites ('z', 'q', 'k', 'v'), got heads="
                f"{self.heads!r} for site {self.site!r}; leave heads unset, or pass e.g. site='z'"
            )
        fix = "pass e.g. heads=[0, 3], or heads=None for every head"
        object.__setattr__(self, "heads", _index_tuple("heads", self.heads, fix))

    def layer_list(self, model: torch.nn.Module) -> list[int]:
        """The ablated layers, sorted, checked against ``model``'s depth."""
        n_layer = n_layers(model)
        if self.layers is None:
            return list(range(n_layer))
        fix = f"pass layers in range(0, {n_layer}), or None for every layer"
        return distinct_indices("layers", "layer indices", self.layers, n_layer, fix)

    def head_list(self, model: torch.nn.Module) -> list[int] | None:
        """The ablated heads, checked against ``model`` (None for a residual-width site)."""
        if self.site not in HEAD_KINDS:
            return None
        n_heads = _site(self.site).for_model(model).n_heads  # type: ignore[attr-defined]
        if self.heads is None:
            return list(range(n_heads))
        fix = f"pass heads in range(0, {n_heads}), or None for every head"
        return distinct_indices("heads", f"{self.site} head indices", self.heads, n_heads, fix)

    def position_list(self, n_pos: int, subject_range: tuple[int, int]) -> list[int]:
        """The ablated token positions, sorted."""
        if self.positions == "subject":
            return list(range(*subject_range))
        if self.positions == "all":
            return list(range(n_pos))
        fix = "pass positions of the prompt's tokens, 'subject' or 'all'"
        return distinct_indices(
            "positions", "token positions", list(self.positions), n_pos, fix, count_back=True
        )

    def hook_names(self, model: torch.nn.Module) -> list[str]:
        """The hook point of the site at each ablated layer."""
        where = _site(self.site)
        return [where.hook_name(layer) for layer in self.layer_list(model)]

    def resolve(self, model: torch.nn.Module) -> "SiteAblation":
        """Check the layers and heads against ``model`` (before any forward pass)."""
        check_hook_points(model, self.hook_names(model))
        self.head_list(model)
        return self

    @abc.abstractmethod
    def values(
        self, model: torch.nn.Module, tokens: Int[Tensor, " pos"], names: Sequence[str]
    ) -> dict[str, Float[Tensor, "..."]]:
        """What replaces each hook point's activation.

        Returns:
            ``{hook name: value}``: one value broadcast over every row and
            position (``[*unit]``: ``[d_model]``, ``[head, d_head]``, or a
            scalar), or, where :attr:`per_row`, ``[sample, pos, *unit]``.
        """

    per_row: ClassVar[bool] = False
    """Whether :meth:`values` gives one row per sample (per position) instead of one value."""

    def params(self) -> dict[str, Any]:
        """The subclass's own settings, for the record."""
        return {}

    def bind(
        self,
        model: torch.nn.Module,
        tokens: Int[Tensor, " pos"],
        subject_range: tuple[int, int],
    ) -> CorruptedInput:
        """The clean prompt, with hooks replacing the site at the ablated layers and positions."""
        self.resolve(model)
        n_pos = int(tokens.shape[0])
        positions = self.position_list(n_pos, subject_range)
        if not positions:
            raise InvalidInput(
                f"an ablation needs at least one position to ablate, got none (positions="
                f"{self.positions!r}, subject tokens {subject_range}); pass a subject or "
                "positions='all'"
            )
        names = self.hook_names(model)
        device = tokens.device
        mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
        mask[positions] = True
        heads = self.head_list(model)
        if heads is not None:
            n_heads = _site(self.site).for_model(model).n_heads  # type: ignore[attr-defined]
            on = torch.zeros(n_heads, dtype=torch.bool, device=device)
            on[heads] = True
            mask = einops.einsum(mask.long(), on.long(), "pos, head -> pos head") > 0
        mask = mask[..., None]  # broadcast over d_model / d_head
        values = {k: v.to(device) for k, v in self.values(model, tokens, names).items()}
        per_row = self.per_row
        samples = next(iter(values.values())).shape[0] if per_row else 1

        def suffix_hooks(pos: int) -> tuple[tuple[str, HookFn], ...]:
            return tuple(
                (name, _ablation_hook(v[:, pos:] if per_row else v, mask[pos:], per_row))
                for name, v in values.items()
            )

        return CorruptedInput(
            tokens=einops.repeat(tokens, "pos -> sample pos", sample=samples),
            fwd_hooks=suffix_hooks(0),
            first_changed=positions[0],
            record=self.to_dict(),
            suffix_hooks=suffix_hooks,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record: the site, layers, positions, heads if set, and the statistics.

        ``{"name", "site", "ablated_layers", "ablated_positions"}`` (names of
        their own beside a trace's ``layers``/``positions``), ``heads``, and
        :meth:`params`.
        """
        out: dict[str, Any] = {
            "name": self.name,
            "site": self.site,
            "ablated_layers": None if self.layers is None else list(self.layers),
            "ablated_positions": self.positions
            if isinstance(self.positions, str)
            else list(self.positions),
        }
        if self.heads is not None:
            out["heads"] = list(self.heads)
        return {**out, **self.params()}

    @classmethod
    def _common(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "site": data["site"],
            "layers": data.get("ablated_layers"),
            "positions": data.get("ablated_positions", "subject"),
            "heads": data.get("heads"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SiteAblation":
        """Rebuild from :meth:`to_dict`."""
        return cls(**cls._common(data))


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroAblation(SiteAblation):
    """The site's activation set to zero at the ablated layers and positions.

    Example:
        >>> ZeroAblation("mlp_out", layers=[2]).to_dict()["ablated_layers"]
        [2]
    """

    name: ClassVar[str] = "zero_ablation"

    def values(
        self, model: torch.nn.Module, tokens: Int[Tensor, " pos"], names: Sequence[str]
    ) -> dict[str, Float[Tensor, ""]]:
        """Zero, at every hook point."""
        return {name: torch.zeros((), dtype=model.cfg.dtype) for name in names}


_MEANS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, dict[str, Tensor]]]" = (
    weakref.WeakKeyDictionary()
)

_MEAN_BATCH = 16
"""Prompts per forward pass while measuring a mean."""


def prompts_hash(prompts: Sequence[str | tuple[int, ...]]) -> str:
    """A short SHA-256 of prompts (text or token ids), for records."""
    return hashlib.sha256(json.dumps(_jsonable(prompts)).encode()).hexdigest()[:16]


def site_means(
    model: torch.nn.Module, prompts: Sequence[str | tuple[int, ...]], names: Sequence[str]
) -> dict[str, Tensor]:
    """Mean activation at each hook point over every token of ``prompts`` but a leading BOS.

    Prompts run right-padded in batches with an attention mask (as
    :func:`lenscope.collect.collect` runs them); the padding is left out of
    the mean. Sums are float64. Cached per model (and its dtype and device),
    hook points and prompts.

    Returns:
        ``{hook name: mean}``, ``[*unit]`` in the model's dtype.
    """
    key = (tuple(names), tuple(prompts), str(model.cfg.dtype), str(model.cfg.device))
    cache = _MEANS_CACHE.setdefault(model, {})
    if key in cache:
        return cache[key]
    tokens = [prompt_tokens(model, p if isinstance(p, str) else list(p)) for p in prompts]
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    sums: dict[str, Tensor] = {}
    count = 0
    # Normal tensors even inside a trace's inference mode: the cache outlives it.
    with preserved_model(model), torch.inference_mode(False), torch.no_grad():
        for start in range(0, len(tokens), _MEAN_BATCH):
            batch = tokens[start : start + _MEAN_BATCH]
            width = max(len(t) for t in batch)
            ids = torch.stack(
                [torch.nn.functional.pad(t, (0, width - len(t)), value=int(t[-1])) for t in batch]
            )
            lengths = torch.tensor([len(t) for t in batch], device=ids.device)
            real = torch.arange(width, device=ids.device)[None] < lengths[:, None]
            store = capture_forward(model, ids, [], names, attention_mask=real.long())
            counted = real.clone()
            if bos is not None:
                counted[:, 0] &= ids[:, 0] != bos
            count += int(counted.sum())
            for name in names:
                total = store[name][counted].double().sum(0)
                sums[name] = total if name not in sums else sums[name] + total
    if count == 0:
        raise InvalidInput(
            f"a mean ablation averages over the prompts' tokens after BOS, but the "
            f"{len(prompts)} prompt(s) have none; pass prompts with at least one token each"
        )
    means = {name: (sums[name] / count).to(model.cfg.dtype) for name in names}
    cache[key] = means
    return means


@dataclasses.dataclass(frozen=True, eq=False)
class MeanAblation(SiteAblation):
    """The site's activation replaced by its mean over other prompts, per layer.

    The mean is over every token position of every prompt (each token
    weighted equally) except a leading BOS token: one vector per layer
    (``[d_model]``, or ``[head, d_head]`` per head), the same at every
    ablated position. Per-position means would need prompts of one length
    and tie the statistic to the traced prompt's layout; BOS is left out
    because its activations are an attention-sink outlier that would
    dominate the mean of a residual stream, and an ablated position is never
    BOS. Measured once per model, layers and prompts (cached), so a dataset
    trace computes it once.

    Args:
        site, layers, positions, heads: As for :class:`SiteAblation`.
        prompts: The prompts averaged over (text or token ids), at least one.
    """

    prompts: Sequence[str | Sequence[int]] = ()

    name: ClassVar[str] = "mean_ablation"

    def __post_init__(self) -> None:
        """Check the prompts as well."""
        super().__post_init__()
        needed_by = "MeanAblation averages the site over prompts"
        prompts = _prompt_tuple("prompts", self.prompts, _EXAMPLE_PROMPT, needed_by)
        object.__setattr__(self, "prompts", prompts)

    def values(
        self, model: torch.nn.Module, tokens: Int[Tensor, " pos"], names: Sequence[str]
    ) -> dict[str, Tensor]:
        """The per-layer means (:func:`site_means`)."""
        return site_means(model, self.prompts, names)  # type: ignore[arg-type]

    def params(self) -> dict[str, Any]:
        """The prompts, their count and a hash of them."""
        return {
            "mean_prompts": _jsonable(self.prompts),  # type: ignore[arg-type]
            "mean_prompt_count": len(self.prompts),
            "mean_prompts_sha256": prompts_hash(self.prompts),  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MeanAblation":
        """Rebuild from :meth:`to_dict`, checking the prompts against their hash."""
        prompts = _prompt_tuple("mean_prompts", data.get("mean_prompts") or [], "...")
        stored = data.get("mean_prompts_sha256")
        if stored is not None and stored != prompts_hash(prompts):
            raise InvalidInput(
                f"the record's mean_prompts do not match its mean_prompts_sha256 ({stored}, "
                f"the prompts hash to {prompts_hash(prompts)}); pass the record as written"
            )
        return cls(**cls._common(data), prompts=prompts)


@dataclasses.dataclass(frozen=True, eq=False)
class ResampleAblation(SiteAblation):
    """The site's activation replaced by another prompt's at the same positions.

    Each source prompt gives one corrupted sample (a row, as noise samples
    are), and the trace averages over them. A source must have as many
    tokens as the traced prompt.

    Args:
        site, layers, positions, heads: As for :class:`SiteAblation`.
        source: The source prompt (text or token ids), or a list of them.
    """

    source: str | Sequence[int] | Sequence[str | Sequence[int]] = ()

    name: ClassVar[str] = "resample_ablation"
    per_row: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Check the source prompts as well."""
        super().__post_init__()
        needed_by = "ResampleAblation takes the activations of source prompts"
        sources = _prompt_tuple("source", self.source, _EXAMPLE_PROMPT, needed_by)
        object.__setattr__(self, "source", sources)

    def values(
        self, model: torch.nn.Module, tokens: Int[Tensor, " pos"], names: Sequence[str]
    ) -> dict[str, Tensor]:
        """Each source prompt's activations, ``[source, pos, *unit]``."""
        sources = []
        for item in self.source:  # type: ignore[union-attr]
            other = prompt_tokens(model, item if isinstance(item, str) else list(item))
            if other.shape[0] != tokens.shape[0]:
                raise InvalidInput(
                    "a resample source must tokenise to as many tokens as the traced prompt "
                    "(its activations replace the prompt's position by position), got "
                    f"{other.shape[0]} tokens {list(token_labels(model, other))} for "
                    f"{tokens.shape[0]} tokens {list(token_labels(model, tokens))}; pass a "
                    "source of the same length, e.g. one with another subject of as many tokens"
                )
            sources.append(other.to(tokens.device))
        with preserved_model(model), torch.no_grad():
            store = capture_forward(model, torch.stack(sources), [], names)
        return {name: store[name] for name in names}

    def params(self) -> dict[str, Any]:
        """The source prompts and their count (the samples)."""
        sources = _jsonable(self.source)  # type: ignore[arg-type]
        return {"resample_sources": sources, "samples": len(sources)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ResampleAblation":
        """Rebuild from :meth:`to_dict`."""
        sources = [s if isinstance(s, str) else tuple(s) for s in data["resample_sources"]]
        return cls(**cls._common(data), source=sources)


CORRUPTIONS: dict[str, type[Corruption]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        UniformNoise,
        StudentTNoise,
        MultivariateGaussianNoise,
        CounterfactualPrompt,
        CounterfactualColumn,
        ZeroAblation,
        MeanAblation,
        ResampleAblation,
    )
}
"""Corruption classes by :attr:`Corruption.name`, for :func:`corruption_from_dict`."""


def register_corruption(cls: type[Corruption]) -> type[Corruption]:
    """Make a :class:`Corruption` subclass readable from saved records (a class decorator).

    Results and dataset checkpoints record a corruption by its
    :attr:`Corruption.name` (:meth:`Corruption.to_dict`); reading one back
    (:func:`corruption_from_dict`, resuming a checkpoint) needs the class registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Corruption)):
        raise InvalidInputType(
            f"register_corruption takes a subclass of lenscope.Corruption, got {cls!r}"
        )
    CORRUPTIONS[cls.name] = cls
    return cls


def corruption_from_dict(data: Mapping[str, Any]) -> Corruption:
    """The corruption a :meth:`Corruption.to_dict` record describes."""
    name = data.get("name") if isinstance(data, Mapping) else None
    if name not in CORRUPTIONS:
        raise InvalidInput(
            f"a corruption record must name one of {tuple(CORRUPTIONS)}, got {name!r}; "
            "pass the dict a Corruption.to_dict() wrote (a corruption of your own: "
            "decorate its class with @lenscope.corruptions.register_corruption)"
        )
    return CORRUPTIONS[name].from_dict(data)


def check_corruption(value: Any) -> Corruption:
    """``value`` if it is a :class:`Corruption`."""
    if not isinstance(value, Corruption):
        raise InvalidInputType(
            f"corruption must be a lenscope Corruption, got {type(value).__name__}; "
            "pass e.g. lenscope.GaussianNoise(samples=10)"
        )
    return value
