"""Sites: *where* a trace restores clean activations.

A site names one TransformerLens activation type (the ``get_act_name``
vocabulary: ``resid_pre``, ``mlp_out``, ...), knows its hook name at every
layer, and turns "restore these units of these cells" into the boolean mask
its restoring hook applies. The engine (:mod:`lenscope.engine`) sweeps an
index space whose axes are ``("layer", *site.unit_axes)``, in the way
TransformerLens ``patching.py`` describes its patching variants by
``index_axis_names``; nothing in the engine depends on which site it is.

The five residual-width sites of causal tracing (Meng et al., 2022, arXiv
2202.05262) have one unit axis, ``pos``: a cell ``(layer, pos)`` restores the
activation of one token. A site with another unit axis (attention heads:
``("pos", "head")``) is a new subclass that says how wide its activation is,
where its hook sits and which rules of the prefix strategy hold for it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenscope.hooks import KINDS, check_kind, hook_name
from lenscope.validation import InvalidInputType

HookFn = Callable[[Tensor, Any], Tensor | None]


@dataclasses.dataclass(frozen=True)
class Site:
    """One activation type, restored unit by unit along ``unit_axes``.

    Attributes:
        name: The TransformerLens activation name (``"mlp_out"`` etc.).
        unit_axes: Axes of one layer's index space, after ``layer``.
        feeds_attention: Whether the activation at one position is read by
            attention at later positions of the *same* block (true for
            ``resid_pre``, whose normalised value becomes the keys and
            values). If not, restoring it at an earlier position in the last
            block cannot reach the last position, and the engine skips it.
        entry_offset: Blocks the prefix strategy may skip after the first
            restored layer: restoring ``resid_post`` of layer ``l`` is the
            same as entering block ``l + 1`` with the clean residual, so
            block ``l`` need not run (1); 0 for every other site.
    """

    name: str
    unit_axes: ClassVar[tuple[str, ...]] = ("pos",)
    feeds_attention: bool = False
    entry_offset: int = 0

    @property
    def index_axes(self) -> tuple[str, ...]:
        """Names of the axes of a cell: ``("layer", *unit_axes)``."""
        return ("layer", *self.unit_axes)

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook name of this activation at ``layer``."""
        return hook_name(self.name, layer)

    def hook_names(self, n_layer: int) -> tuple[str, ...]:
        """Hook names at layers ``0 .. n_layer - 1``."""
        return tuple(self.hook_name(layer) for layer in range(n_layer))

    def default_window(self, n_layer: int) -> int:
        """ROME's windows: 1 layer for the residual stream, 10 for MLP and attention outputs."""
        return 1 if self.name.startswith("resid") else min(10, n_layer)

    def cell_mask(self, units: Int[Tensor, "cell unit"], n_pos: int) -> Bool[Tensor, "cell pos"]:
        """Where each cell restores, as the mask :meth:`restore_hook` takes (one row per cell).

        Args:
            units: Each cell's coordinates along :attr:`unit_axes` (here: its position).
            n_pos: Number of token positions.
        """
        return torch.nn.functional.one_hot(units[:, 0], n_pos).bool()

    def unit_shape(self, model: torch.nn.Module, n_pos: int) -> tuple[int, ...]:
        """Sizes of :attr:`unit_axes` for ``model`` and a prompt of ``n_pos`` tokens."""
        return (n_pos,)

    def first_position(self, units: Int[Tensor, "cell unit"]) -> Int[Tensor, " cell"]:
        """The first token position each cell restores (the prefix strategy starts there)."""
        return units[:, 0]

    def restore_hook(
        self, source: Float[Tensor, "src pos d_model"], restore: Bool[Tensor, "batch pos"]
    ) -> HookFn:
        """A hook putting ``source``'s activation wherever ``restore`` is true.

        Args:
            source: The patched-in activation: one row shared by every batch
                row, or one row per sample (see :func:`source_rows`).
            restore: Where each batch row is patched.
        """
        mask = einops.rearrange(restore, "batch pos -> batch pos 1")
        value = source_rows(source, restore.shape[0])

        def hook(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
            # In place, as TransformerLens patching.py's setters do: on a
            # TransformerBridge (TransformerLens 4.3) a tensor *returned* at
            # hook_resid_mid reaches only the second norm's input, not the
            # residual stream the MLP output is added to; the activation's
            # own storage is both.
            return act.copy_(torch.where(mask, value.to(act.dtype), act))

        return hook


def source_rows(
    source: Float[Tensor, "src pos ..."], rows: int
) -> Float[Tensor, "row_or_1 pos ..."]:
    """Patched-in activations for ``rows`` batch rows, ``(cell, sample)`` cell-major.

    ``source`` has one row shared by every sample (the clean run, when
    denoising) or one row per sample (the corrupted copies, when noising);
    a shared row is returned as it is, to broadcast.
    """
    if source.shape[0] == 1:
        return source
    return einops.repeat(source, "s ... -> (c s) ...", c=rows // source.shape[0])


SITES: dict[str, Site] = {
    name: Site(
        name,
        feeds_attention=name == "resid_pre",
        entry_offset=1 if name == "resid_post" else 0,
    )
    for name in KINDS
}
"""The residual-width sites of causal tracing, by name."""


def site(value: "str | Site") -> Site:
    """The :class:`Site` named ``value`` (a site passes through)."""
    if isinstance(value, Site):
        return value
    if not isinstance(value, str):
        raise InvalidInputType(
            f"kind must be a hook-point type name such as 'mlp_out' or a lenscope Site, "
            f"got {type(value).__name__}; pass e.g. kind='mlp_out'"
        )
    return SITES[check_kind(value)]
