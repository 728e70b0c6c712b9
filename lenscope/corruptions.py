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
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.hooks import EMBED_HOOK, embed_hook_caveat, preserved_model
from lenscope.noise import (
    DEFAULT_NOISE_MULTIPLIER,
    draw_noise,
    draw_student_t,
    draw_uniform,
    embedding_moments,
    embedding_sigma,
)
from lenscope.tokens import prompt_tokens, token_labels
from lenscope.validation import (
    InvalidInput,
    InvalidInputType,
    finite_number,
    is_int,
    warn,
)

HookFn = Callable[[Tensor, Any], Tensor | None]


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
    """

    tokens: Int[Tensor, "row pos"]
    fwd_hooks: tuple[tuple[str, HookFn], ...]
    first_changed: int
    record: dict[str, Any]
    prompts: int = 1

    @property
    def rows(self) -> int:
        """Rows of one copy (rows per cell): ``prompts * samples``, prompt-major."""
        return int(self.tokens.shape[0])

    @property
    def samples(self) -> int:
        """Corrupted samples of each prompt."""
        return self.rows // self.prompts

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
    names = list(dict.fromkeys(name for x in inputs for name, _ in x.fwd_hooks))
    hooks = tuple(
        (name, _packed_hook([dict(x.fwd_hooks).get(name) for x in inputs], inputs[0].samples))
        for name in names
    )
    return CorruptedInput(
        tokens=torch.cat([x.tokens for x in inputs]),
        fwd_hooks=hooks,
        first_changed=min(x.first_changed for x in inputs),
        record=inputs[0].record,
        prompts=len(inputs),
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


CORRUPTIONS: dict[str, type[Corruption]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        UniformNoise,
        StudentTNoise,
        MultivariateGaussianNoise,
        CounterfactualPrompt,
        CounterfactualColumn,
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
