"""Attention patterns of chosen heads, in the clean run and in the corrupted run.

Per-head causal traces (:class:`~lenscope.sites.HeadSite`) say *which* heads
carry a fact; their attention patterns say *where* those heads read from.
:func:`attention_patterns` runs a prompt clean and, when a subject is given,
corrupted as a causal trace corrupts it (ROME's Gaussian noise on the
subject's embeddings by default, Meng et al., 2022, arXiv 2202.05262, or any
:class:`~lenscope.corruptions.Corruption`), and keeps
``blocks.{layer}.attn.hook_pattern`` of the chosen heads: the
post-softmax ``[head, dest, src]`` weights TransformerLens records, averaged
over the corrupted copies. The forward passes stop at that hook point, so
nothing after the layer runs. :func:`lenscope.plot_attention` draws the result.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.corruptions import Corruption, GaussianNoise, check_corruption
from lenscope.hooks import (
    capture_forward,
    check_hook_points,
    model_name,
    preserved_model,
    weights_description,
)
from lenscope.results import JsonRoundTrip
from lenscope.tokens import find_subject, prompt_tokens, token_labels
from lenscope.validation import InvalidInput, distinct_indices, is_int


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionPatterns(JsonRoundTrip):
    """Attention weights of some heads of one layer, clean and (optionally) corrupted.

    Attributes:
        clean: ``[head, dest, src]`` post-softmax weights of the clean run.
        corrupted: The same averaged over the corrupted copies, or None.
        layer: The layer.
        heads: The model's head index of each row of ``clean``.
        tokens: Token labels of the prompt.
        token_ids: The prompt's token ids.
        subject_range: ``(start, end)`` of the corrupted subject, or None.
        hook_name: ``blocks.{layer}.attn.hook_pattern``.
        model_name: The model's ``cfg.model_name``.
        corruption: The corruption's settings record, or None.
        weights: Where the model's weights came from and the precision it
            ran in (:func:`lenscope.loading.weights_description`); None for a
            model :func:`lenscope.load_model` did not build.
    """

    clean: Float[Tensor, "head dest src"]
    corrupted: Float[Tensor, "head dest src"] | None
    layer: int
    heads: tuple[int, ...]
    tokens: tuple[str, ...]
    token_ids: Int[Tensor, " pos"]
    subject_range: tuple[int, int] | None
    hook_name: str
    model_name: str
    corruption: dict[str, Any] | None = None
    weights: str | None = None

    _format: ClassVar[str] = "lenscope.AttentionPatterns/1"
    _tensor_fields: ClassVar[dict[str, torch.dtype]] = {
        "clean": torch.float32,
        "corrupted": torch.float32,
        "token_ids": torch.int64,
    }
    _tuple_fields: ClassVar[tuple[str, ...]] = ("heads", "tokens", "subject_range")

    def __post_init__(self) -> None:
        """Check that shapes agree."""
        n_pos = len(self.tokens)
        expected = (len(self.heads), n_pos, n_pos)
        shapes = [tuple(self.clean.shape)]
        if self.corrupted is not None:
            shapes.append(tuple(self.corrupted.shape))
        if any(shape != expected for shape in shapes) or self.token_ids.shape != (n_pos,):
            raise InvalidInput(
                f"inconsistent AttentionPatterns: patterns {shapes} should be {expected} "
                f"({len(self.heads)} heads, {n_pos} tokens)"
            )

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`JsonRoundTrip.to_dict`; ``weights`` only when known."""
        out = super().to_dict()
        if out["weights"] is None:
            del out["weights"]
        return out

    def plot(self, **kwargs: Any) -> Any:
        """Heatmaps of these patterns, clean beside corrupted (:func:`lenscope.plot_attention`)."""
        from lenscope.plotting import plot_attention

        return plot_attention(self, **kwargs)

    @classmethod
    def from_dict(cls, data: Any) -> "AttentionPatterns":
        """Inverse of :meth:`to_dict` (``corrupted`` may be null)."""
        if isinstance(data, dict) and "clean" in data and data.get("corrupted") is None:
            made = super().from_dict({**data, "corrupted": data["clean"]})
            return dataclasses.replace(made, corrupted=None)
        return super().from_dict(data)


def attention_patterns(
    model: torch.nn.Module,
    prompt: str | Tensor | Sequence[int],
    *,
    layer: int,
    heads: int | Sequence[int] | None = None,
    subject: str | tuple[int, int] | None = None,
    corruption: Corruption | None = None,
) -> AttentionPatterns:
    """The clean (and corrupted) attention patterns of ``heads`` at ``layer``.

    Args:
        model: A HookedTransformer or TransformerBridge.
        prompt: Text, or 1-D token ids.
        layer: The layer (negative counts back).
        heads: A head, a list of heads, or None for all.
        subject: The subject to corrupt (text or token range); None: clean only.
        corruption: How to corrupt it; default ROME's Gaussian noise (10
            copies, 3 embedding sigmas).

    Returns:
        The :class:`AttentionPatterns`.
    """
    cfg = model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    if not is_int(layer) or not -n_layers <= layer < n_layers:
        raise InvalidInput(
            f"layer must be an integer in [0, {n_layers}) (or count back), got {layer!r}; "
            "pass e.g. layer=-1"
        )
    layer = int(layer) % n_layers
    chosen = list(range(n_heads)) if heads is None else [heads] if is_int(heads) else heads
    head_list = distinct_indices(
        "heads", "head indices", list(chosen), n_heads, f"pass e.g. heads=[0, {n_heads - 1}]"
    )
    name = f"blocks.{layer}.attn.hook_pattern"
    check_hook_points(model, [name])
    if corruption is not None and subject is None:
        raise InvalidInput(
            "a corruption needs the subject it corrupts, got subject=None; pass "
            "subject='The Eiffel Tower' (or a token range)"
        )
    tokens = prompt_tokens(model, prompt)
    with preserved_model(model), torch.inference_mode():
        clean = capture_forward(model, tokens[None], [], stop_at=name)[name][0, head_list]
        corrupted, subject_range, record = None, None, None
        if subject is not None:
            subject_range = find_subject(model, tokens, subject)
            chosen_corruption = check_corruption(corruption or GaussianNoise()).resolve(model)
            bound = chosen_corruption.bind(model, tokens, subject_range)
            runs = capture_forward(model, bound.tokens, bound.fwd_hooks, stop_at=name)[name]
            corrupted = runs[:, head_list].float().mean(0).cpu()
            record = dict(bound.record)
    return AttentionPatterns(
        clean=clean.float().cpu(),
        corrupted=corrupted,
        layer=layer,
        heads=tuple(head_list),
        tokens=token_labels(model, tokens),
        token_ids=tokens.cpu(),
        subject_range=subject_range,
        hook_name=name,
        model_name=model_name(model),
        corruption=record,
        weights=weights_description(model),
    )
