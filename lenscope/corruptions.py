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
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.hooks import EMBED_HOOK, preserved_model
from lenscope.noise import DEFAULT_NOISE_MULTIPLIER, draw_noise, embedding_sigma
from lenscope.validation import (
    InvalidInput,
    InvalidInputType,
    finite_number,
    is_int,
)

HookFn = Callable[[Tensor, Any], Tensor | None]


@dataclasses.dataclass(frozen=True)
class CorruptedInput:
    """A corruption bound to one prompt: everything the engine needs to run it.

    Batches the engine runs hold ``copies * samples`` rows, copy-major: row
    ``c * samples + s`` is sample ``s``. Hooks must accept any whole number
    of copies.

    Attributes:
        tokens: Token ids of each corrupted sample.
        fwd_hooks: ``(hook_name, fn)`` pairs every corrupted forward pass carries.
        first_changed: First token position whose activations can differ
            from the clean run's; restoring earlier positions is a no-op.
        record: The corruption's settings, as results and checkpoints keep them.
    """

    tokens: Int[Tensor, "samples pos"]
    fwd_hooks: tuple[tuple[str, HookFn], ...]
    first_changed: int
    record: dict[str, Any]

    @property
    def samples(self) -> int:
        """Number of corrupted samples (rows per cell)."""
        return int(self.tokens.shape[0])

    def batch_tokens(self, copies: int) -> Int[Tensor, "row pos"]:
        """Token ids of ``copies`` copies of every sample, copy-major."""
        return einops.repeat(self.tokens, "sample pos -> (copy sample) pos", copy=copies)


class Corruption(abc.ABC):
    """What makes the corrupted run corrupted. Subclasses are frozen dataclasses."""

    name: ClassVar[str]

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


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianNoise(Corruption):
    """ROME's corruption: Gaussian noise added to the subject's embeddings at ``hook_embed``.

    Args:
        samples: Corrupted copies (ROME: 10).
        noise: Absolute noise std; overrides ``noise_multiplier``.
        noise_multiplier: Noise std as a multiple of the embedding sigma
            measured at ``hook_embed`` (ROME: 3).
        seed: Seed of the noise draws (float32, CPU generator: the same on every device).
        noise_tensor: Exact noise ``[samples, subject_pos, d_model]``;
            overrides ``noise``, ``noise_multiplier`` and ``seed``.
        reference_subjects: Subjects over which sigma is measured; default
            the ROME known-facts subjects shipped with lenscope.
    """

    samples: int = 10
    noise: float | None = None
    noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER
    seed: int = 0
    noise_tensor: Float[Tensor, "samples subject_pos d_model"] | None = None
    reference_subjects: tuple[str, ...] | None = None

    name: ClassVar[str] = "gaussian_noise"

    def __post_init__(self) -> None:
        """Check every setting that does not need the model."""
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
        if self.noise_tensor is not None:
            if not isinstance(self.noise_tensor, Tensor):
                raise InvalidInputType(
                    "noise_tensor must be a torch.Tensor of shape [samples, subject tokens, "
                    f"d_model], got {type(self.noise_tensor).__name__}"
                )
            if not torch.isfinite(self.noise_tensor).all():
                raise InvalidInput("noise_tensor must be finite, got NaN or inf entries")
        if self.reference_subjects is not None:
            object.__setattr__(self, "reference_subjects", tuple(self.reference_subjects))

    def std(self, model: torch.nn.Module) -> float:
        """The absolute noise std for ``model`` (sigma is measured once per model)."""
        if self.noise is not None:
            return float(self.noise)
        with preserved_model(model):
            sigma = embedding_sigma(model, self.reference_subjects)
        return float(self.noise_multiplier) * sigma

    def resolve(self, model: torch.nn.Module) -> "GaussianNoise":
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
            noise = draw_noise(self.samples, end - start, d_model, noise_std, self.seed)
            seed = self.seed
        noise = noise.to(model.cfg.device, model.cfg.dtype)
        return CorruptedInput(
            tokens=einops.repeat(tokens, "pos -> sample pos", sample=self.samples),
            fwd_hooks=((EMBED_HOOK, noise_hook(noise, subject_range)),),
            first_changed=start,
            record={
                "name": self.name,
                "samples": self.samples,
                "noise_std": noise_std,
                "seed": seed,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "samples", "noise_std", "seed"}``; call :meth:`resolve` first."""
        if self.noise_tensor is not None:
            noise_std, seed = float(self.noise_tensor.float().std()), None
        elif self.noise is None:
            raise InvalidInput(
                "this GaussianNoise has no absolute std yet (noise=None), so its settings "
                "cannot be recorded; call .resolve(model) first"
            )
        else:
            noise_std, seed = float(self.noise), self.seed
        return {"name": self.name, "samples": self.samples, "noise_std": noise_std, "seed": seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GaussianNoise":
        """Rebuild from :meth:`to_dict`; a record of an explicit noise tensor (seed None) cannot."""
        if data.get("seed") is None:
            raise InvalidInput(
                "the trace used an explicit noise_tensor (its seed is None), so its noise "
                "cannot be regenerated; pass the same tensor as noise_tensor=..."
            )
        return cls(samples=data["samples"], noise=data["noise_std"], seed=data["seed"])


def noise_hook(
    noise: Float[Tensor, "samples subject_pos d_model"], subject_range: tuple[int, int]
) -> HookFn:
    """A ``hook_embed`` hook adding each row's noise to the subject positions."""
    start, end = subject_range

    def hook(embed: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        copies = embed.shape[0] // noise.shape[0]
        rows = einops.repeat(noise, "sample pos d -> (copy sample) pos d", copy=copies)
        embed = embed.clone()
        embed[:, start:end] = embed[:, start:end] + rows.to(embed.dtype)
        return embed

    return hook


CORRUPTIONS: dict[str, type[Corruption]] = {GaussianNoise.name: GaussianNoise}
"""Corruption classes by :attr:`Corruption.name`, for :func:`corruption_from_dict`."""


def corruption_from_dict(data: Mapping[str, Any]) -> Corruption:
    """The corruption a :meth:`Corruption.to_dict` record describes."""
    name = data.get("name") if isinstance(data, Mapping) else None
    if name not in CORRUPTIONS:
        raise InvalidInput(
            f"a corruption record must name one of {tuple(CORRUPTIONS)}, got {name!r}; "
            "pass the dict a Corruption.to_dict() wrote"
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
