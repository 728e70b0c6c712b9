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
activation of one token. A site with another unit axis is a subclass that says how wide its
activation is, where its hook sits and which rules of the prefix strategy
hold for it: :class:`HeadSite` restores single attention heads at
``blocks.{layer}.attn.hook_{z,q,k,v,pattern}``, either at every position
(``by="head"``, TransformerLens ``patching.py``'s ``..._all_pos`` variants)
or at one position (``by="head_pos"``, its ``..._by_pos`` variants). On a
grouped-query model the heads of ``k`` and ``v`` are the key/value heads
(``n_key_value_heads`` of them), each shared by ``n_heads //
n_key_value_heads`` query heads, because that is what ``hook_k`` and
``hook_v`` hold in both ``HookedTransformer`` and a ``TransformerBridge``
in compatibility mode. :class:`NeuronSite` restores single MLP neurons at
``blocks.{layer}.mlp.hook_post`` (``get_act_name("post", layer)``, the
hidden activation after the non-linearity and, on a gated MLP, after the
gate product), at every traced position (``by="neuron"``) or at one
(``by="neuron_pos"``).

Every site declares its activation's :meth:`~Site.width` (values per token
position), which the engine's memory and batch planner reads.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenscope.hooks import check_kind, hook_name
from lenscope.names import HEAD_BY, HEAD_KINDS, KINDS, NEURON_BY, NEURON_KINDS
from lenscope.validation import InvalidInput, InvalidInputType

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

    def unit_info(self) -> dict[str, dict[str, Any]]:
        """What a result should know of the unit axes beyond their sizes, per axis (none here).

        It becomes the result's ``units`` (:class:`lenscope.results.TraceResult`).
        """
        return {}

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook name of this activation at ``layer``."""
        return hook_name(self.name, layer)

    def hook_names(self, n_layer: int) -> tuple[str, ...]:
        """Hook names at layers ``0 .. n_layer - 1``."""
        return tuple(self.hook_name(layer) for layer in range(n_layer))

    @property
    def takes_positions(self) -> bool:
        """Whether a trace's ``positions`` choose what this site restores (true here)."""
        return True

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

    def for_model(self, model: torch.nn.Module) -> "Site":
        """This site with whatever it needs to know about ``model`` filled in (here: nothing)."""
        return self

    def at_positions(self, positions: Sequence[int]) -> "Site":
        """This site with the trace's positions filled in (here: nothing; cells name theirs)."""
        return self

    def width(self, model: torch.nn.Module, n_pos: int) -> int:
        """Values of this activation per token position (here ``d_model``), for memory plans.

        Args:
            model: The model.
            n_pos: Tokens in the prompt (an attention pattern's row is that long).
        """
        return int(model.cfg.d_model)

    def touched_positions(
        self, units: Int[Tensor, "cell unit"], n_pos: int
    ) -> Bool[Tensor, "cell pos"]:
        """Token positions each cell restores at (:meth:`cell_mask` reduced to positions)."""
        mask = self.cell_mask(units, n_pos)
        return mask.flatten(2).any(-1) if mask.ndim > 2 else mask

    def cell_dot(
        self, x: Float[Tensor, "*lead s pos d"], y: Float[Tensor, "s pos d"]
    ) -> Float[Tensor, "*lead s pos"]:
        """``x . y`` summed over the values each cell of one layer restores (here: a position's).

        Attribution patching's estimate of every cell of one layer at once,
        with ``x`` and ``y`` the gradient and ``a_clean - a_corrupted`` (in
        either order) of ``s`` corrupted copies; ``x`` may carry one more
        leading axis (integrated gradients' path points).

        Returns:
            ``[*lead, s, *unit]``: one value per copy and cell of the layer.
        """
        lead = "c " if x.ndim == y.ndim + 1 else ""
        return einops.einsum(x, y, f"{lead}s pos d, s pos d -> {lead}s pos")

    def cells(self, model: torch.nn.Module, layers: list[int], positions: list[int]) -> Tensor:
        """The cells to trace: rows of :attr:`index_axes` coordinates (here ``(layer, pos)``).

        Args:
            model: The model.
            layers: The layers to trace.
            positions: The token positions to trace.
        """
        return _product(layers, positions)

    def clean_suffix(self, clean: Float[Tensor, "src ..."], pos: int) -> Tensor:
        """The patched-in activation of positions ``pos:`` (what a prefix-strategy stair restores).

        ``clean`` has a leading row axis (1, or one row per sample: see :func:`source_rows`).
        """
        return clean[:, pos:]

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


def source_rows(source: Float[Tensor, "src ..."], rows: int) -> Float[Tensor, "row_or_1 ..."]:
    """Patched-in activations for ``rows`` batch rows, ``(cell, sample)`` cell-major.

    ``source`` has one row shared by every sample (the clean run, when
    denoising) or one row per sample (the corrupted copies, when noising);
    a shared row is returned as it is, to broadcast.
    """
    if source.shape[0] == 1:
        return source
    return einops.repeat(source, "s ... -> (c s) ...", c=rows // source.shape[0])


def _product(*axes: "list[int] | range") -> Int[Tensor, "cell axis"]:
    """Every combination of the values of ``axes``, one row each (the first axis slowest)."""
    return torch.cartesian_prod(*(torch.tensor(list(a), dtype=torch.long) for a in axes)).reshape(
        -1, len(axes)
    )


@dataclasses.dataclass(frozen=True)
class HeadSite(Site):
    """The attention heads of one activation: ``hook_z``, ``q``, ``k``, ``v`` or ``pattern``.

    A cell ``(layer, head)`` (``by="head"``) restores the head at every
    position, as TransformerLens ``patching.py``'s
    ``get_act_patch_attn_head_*_all_pos``; a cell ``(layer, head, pos)``
    (``by="head_pos"``) restores it at one position (for ``pattern``: one
    destination position, its whole row of source positions), as its
    ``..._by_pos`` variants. The prefix strategy holds for every head site: a
    head of layer ``l`` changes nothing before block ``l``, nor at positions
    before the first one it restores. Keys and values are read by later
    positions' queries in the same block, so only ``k`` and ``v`` are
    :attr:`~Site.feeds_attention`.

    Attributes:
        by: ``"head"`` or ``"head_pos"``.
        n_heads: Heads of this activation in the model (key/value heads for
            ``k``/``v`` on a grouped-query model); filled in by :meth:`for_model`.
        group: Query heads that share each of these heads (1 except for
            ``k``/``v`` on a grouped-query model).
    """

    by: str = "head"
    n_heads: int = 0
    group: int = 1

    @property
    def unit_axes(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("head",)`` or ``("head", "pos")``."""
        return ("head",) if self.by == "head" else ("head", "pos")

    @property
    def takes_positions(self) -> bool:
        """Only ``by="head_pos"`` restores single positions."""
        return self.by == "head_pos"

    def unit_info(self) -> dict[str, dict[str, Any]]:
        """The query heads sharing each head (``k``/``v`` of a grouped-query model: more than 1)."""
        return {"head": {"query_heads_per_head": self.group}}

    def hook_name(self, layer: int) -> str:
        """``blocks.{layer}.attn.hook_{name}``."""
        return f"blocks.{layer}.attn.hook_{self.name}"

    def default_window(self, n_layer: int) -> int:
        """One layer, as TransformerLens' per-head patching."""
        return 1

    def for_model(self, model: torch.nn.Module) -> "HeadSite":
        """This site with ``model``'s head count (and key/value grouping) filled in."""
        cfg = model.cfg
        n_heads, group = int(cfg.n_heads), 1
        kv_heads = getattr(cfg, "n_key_value_heads", None)
        ungrouped = getattr(cfg, "ungroup_grouped_query_attention", False)
        if self.name in ("k", "v") and kv_heads and not ungrouped:
            n_heads, group = int(kv_heads), int(cfg.n_heads) // int(kv_heads)
        return dataclasses.replace(self, n_heads=n_heads, group=group)

    def width(self, model: torch.nn.Module, n_pos: int) -> int:
        """``n_heads * d_head`` (``pattern``: ``n_heads * n_pos``, a row of keys per head)."""
        where = self.for_model(model)
        per_head = n_pos if self.name == "pattern" else model.cfg.d_head
        return int(where.n_heads * per_head)

    def _heads(self) -> int:
        if self.n_heads < 1:
            raise RuntimeError(
                f"HeadSite {self.name!r} does not know the model's heads; call .for_model(model)"
            )
        return self.n_heads

    def unit_shape(self, model: torch.nn.Module, n_pos: int) -> tuple[int, ...]:
        """``(n_heads,)`` or ``(n_heads, n_pos)``."""
        n_heads = self.for_model(model).n_heads
        return (n_heads,) if self.by == "head" else (n_heads, n_pos)

    def cells(self, model: torch.nn.Module, layers: list[int], positions: list[int]) -> Tensor:
        """``(layer, head)`` or ``(layer, head, pos)`` for every head of ``model``."""
        heads = range(self.for_model(model).n_heads)
        return _product(layers, heads) if self.by == "head" else _product(layers, heads, positions)

    def cell_mask(
        self, units: Int[Tensor, "cell unit"], n_pos: int
    ) -> Bool[Tensor, "cell pos head"]:
        """Where each cell restores, ``[cell, pos, head]`` (``pattern``: destination positions)."""
        heads = torch.nn.functional.one_hot(units[:, 0], self._heads()).bool()
        if self.by == "head":
            return einops.repeat(heads, "cell head -> cell pos head", pos=n_pos)
        where = torch.nn.functional.one_hot(units[:, 1], n_pos).bool()
        return einops.einsum(where.long(), heads.long(), "cell pos, cell head -> cell pos head") > 0

    def first_position(self, units: Int[Tensor, "cell unit"]) -> Int[Tensor, " cell"]:
        """0 for ``by="head"`` (every position), else the cell's position."""
        return torch.zeros_like(units[:, 0]) if self.by == "head" else units[:, 1]

    def clean_suffix(self, clean: Float[Tensor, "src ..."], pos: int) -> Tensor:
        """Positions ``pos:`` (``pattern``, ``[src, head, dest, key]``: destinations ``pos:``)."""
        return clean[:, :, pos:] if self.name == "pattern" else clean[:, pos:]

    def cell_dot(self, x: Float[Tensor, "..."], y: Float[Tensor, "s ..."]) -> Tensor:
        """``x . y`` per head, summed over the values each cell restores.

        ``hook_z``/``q``/``k``/``v`` are ``[*lead, s, pos, head, d_head]``,
        ``hook_pattern`` ``[*lead, s, head, dest, src]``; the result is
        ``[*lead, s, head]`` (``by="head"``) or ``[*lead, s, head, pos]``
        (``by="head_pos"``; for ``pattern`` the destination position).
        """
        per_pos = (x * y).sum(dim=-1)  # [..., pos, head], or [..., head, dest] for pattern
        if self.name != "pattern":
            per_pos = per_pos.transpose(-1, -2)
        return per_pos.sum(dim=-1) if self.by == "head" else per_pos

    def restore_hook(
        self, clean: Float[Tensor, "..."], restore: Bool[Tensor, "batch pos head"]
    ) -> HookFn:
        """A hook putting the clean heads wherever ``restore`` is true.

        ``hook_z``/``q``/``k``/``v`` are ``[batch, pos, head, d_head]``;
        ``hook_pattern`` is ``[batch, head, dest, src]`` and restores whole rows.
        """
        if self.name == "pattern":
            mask = einops.rearrange(restore, "batch dest head -> batch head dest 1")
        else:
            mask = einops.rearrange(restore, "batch pos head -> batch pos head 1")
        value = source_rows(clean, restore.shape[0])

        def hook(act: Float[Tensor, "batch ..."], hook: Any) -> Tensor:
            # In place, as Site.restore_hook explains.
            return act.copy_(torch.where(mask, value.to(act.dtype), act))

        return hook


@dataclasses.dataclass(frozen=True)
class NeuronSite(Site):
    """The MLP neurons of ``blocks.{layer}.mlp.hook_post``, ``[batch, pos, d_mlp]``.

    ``hook_post`` is the MLP's hidden activation after its non-linearity (on a
    gated MLP, after the gate product ``act(gate) * up``), the input of the
    output projection, in a ``HookedTransformer`` (``MLP``/``GatedMLP``) and in
    a ``TransformerBridge`` in compatibility mode (an alias of the output
    projection's ``hook_in``). A cell ``(layer, neuron)`` (``by="neuron"``)
    restores one neuron at every position the trace traces (its
    ``positions``, filled in by :meth:`at_positions`; all positions until
    then); a cell ``(layer, neuron, pos)`` (``by="neuron_pos"``) at one
    position. A neuron's value at one position is read by nothing else in its
    block, so the site does not :attr:`~Site.feeds_attention`, and the prefix
    strategy starts at the first restored position.

    Attributes:
        by: ``"neuron"`` or ``"neuron_pos"``.
        d_mlp: Neurons per layer; filled in by :meth:`for_model`.
        positions: The positions a ``by="neuron"`` cell restores (sorted), or
            None for every position.
        neurons: The neurons traced (sorted), or None for every neuron: a
            trace of a few neurons of many layers (what
            :func:`~lenscope.attribution.recheck_top` re-traces).
    """

    by: str = "neuron"
    d_mlp: int = 0
    positions: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None

    @property
    def unit_axes(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("neuron",)`` or ``("neuron", "pos")``."""
        return ("neuron",) if self.by == "neuron" else ("neuron", "pos")

    def hook_name(self, layer: int) -> str:
        """``blocks.{layer}.mlp.hook_post``."""
        return f"blocks.{layer}.mlp.hook_post"

    def default_window(self, n_layer: int) -> int:
        """One layer, as a unit-level patch."""
        return 1

    def for_model(self, model: torch.nn.Module) -> "NeuronSite":
        """This site with ``model``'s ``d_mlp`` filled in."""
        return dataclasses.replace(self, d_mlp=int(model.cfg.d_mlp))

    def at_positions(self, positions: Sequence[int]) -> "NeuronSite":
        """For ``by="neuron"``: this site restoring at ``positions`` (the trace's positions)."""
        if self.by != "neuron":
            return self
        return dataclasses.replace(self, positions=tuple(sorted(int(p) for p in positions)))

    def width(self, model: torch.nn.Module, n_pos: int) -> int:
        """``d_mlp``."""
        return int(model.cfg.d_mlp)

    def _neurons(self) -> int:
        if self.d_mlp < 1:
            raise RuntimeError(
                f"NeuronSite {self.name!r} does not know the model's d_mlp; call .for_model(model)"
            )
        return self.d_mlp

    def _restored(self, n_pos: int) -> Bool[Tensor, " pos"]:
        """The positions a ``by="neuron"`` cell restores."""
        where = torch.zeros(n_pos, dtype=torch.bool)
        where[list(range(n_pos)) if self.positions is None else list(self.positions)] = True
        return where

    def unit_shape(self, model: torch.nn.Module, n_pos: int) -> tuple[int, ...]:
        """``(d_mlp,)`` or ``(d_mlp, n_pos)``."""
        d_mlp = int(model.cfg.d_mlp)
        return (d_mlp,) if self.by == "neuron" else (d_mlp, n_pos)

    def only_neurons(self, neurons: Sequence[int]) -> "NeuronSite":
        """This site tracing only ``neurons`` (the other cells of its grid stay NaN)."""
        return dataclasses.replace(self, neurons=tuple(sorted({int(n) for n in neurons})))

    def cells(self, model: torch.nn.Module, layers: list[int], positions: list[int]) -> Tensor:
        """``(layer, neuron)`` or ``(layer, neuron, pos)``: every neuron, or :attr:`neurons`."""
        d_mlp = int(model.cfg.d_mlp)
        neurons = range(d_mlp) if self.neurons is None else list(self.neurons)
        wrong = [n for n in self.neurons or () if not 0 <= n < d_mlp]
        if wrong:
            raise InvalidInput(
                f"neurons must be in [0, d_mlp) = [0, {d_mlp}), got {wrong[:5]}; pass neuron "
                "indices of this model's MLP"
            )
        if self.by == "neuron":
            return _product(layers, neurons)
        return _product(layers, neurons, positions)

    def cell_mask(
        self, units: Int[Tensor, "cell unit"], n_pos: int
    ) -> Bool[Tensor, "cell pos neuron"]:
        """Where each cell restores, ``[cell, pos, neuron]``."""
        neurons = torch.nn.functional.one_hot(units[:, 0], self._neurons()).bool()
        if self.by == "neuron":
            where = einops.repeat(self._restored(n_pos), "pos -> cell pos", cell=len(units))
        else:
            where = torch.nn.functional.one_hot(units[:, 1], n_pos).bool()
        return where[:, :, None] & neurons[:, None, :]

    def touched_positions(
        self, units: Int[Tensor, "cell unit"], n_pos: int
    ) -> Bool[Tensor, "cell pos"]:
        """Positions each cell restores at, without building the ``[cell, pos, neuron]`` mask."""
        if self.by == "neuron":
            return einops.repeat(self._restored(n_pos), "pos -> cell pos", cell=len(units))
        return torch.nn.functional.one_hot(units[:, 1], n_pos).bool()

    def cell_dot(
        self, x: Float[Tensor, "*lead s pos d_mlp"], y: Float[Tensor, "s pos d_mlp"]
    ) -> Float[Tensor, "..."]:
        """``x . y`` per neuron, summed over the positions a cell restores.

        ``[*lead, s, neuron]``, or ``[*lead, s, neuron, pos]`` for ``by="neuron_pos"``.
        """
        if self.by == "neuron_pos":
            return einops.rearrange(x * y, "... pos n -> ... n pos")
        if self.positions is not None:
            where = list(self.positions)
            x, y = x[..., where, :], y[..., where, :]
        return (x * y).sum(dim=-2)

    def first_position(self, units: Int[Tensor, "cell unit"]) -> Int[Tensor, " cell"]:
        """The first restored position: the first traced one (``by="neuron"``) or the cell's."""
        if self.by == "neuron_pos":
            return units[:, 1]
        first = 0 if not self.positions else self.positions[0]
        return torch.full_like(units[:, 0], first)

    def restore_hook(
        self, source: Float[Tensor, "src pos d_mlp"], restore: Bool[Tensor, "batch pos d_mlp"]
    ) -> HookFn:
        """A hook putting ``source``'s neurons wherever ``restore`` is true (in place)."""
        value = source_rows(source, restore.shape[0])

        def hook(act: Float[Tensor, "batch pos d_mlp"], hook: Any) -> Tensor:
            # In place, as Site.restore_hook explains.
            return act.copy_(torch.where(restore, value.to(act.dtype), act))

        return hook


SITES: dict[str, Site] = {
    name: Site(
        name,
        feeds_attention=name == "resid_pre",
        entry_offset=1 if name == "resid_post" else 0,
    )
    for name in KINDS
}
"""The residual-width sites of causal tracing, by name."""


def site(value: "str | Site", by: str | None = None) -> Site:
    """The :class:`Site` named ``value`` (a site passes through).

    Args:
        value: A residual-width kind (:data:`lenscope.KINDS`), a per-head kind
            (:data:`HEAD_KINDS`), a per-neuron kind (:data:`NEURON_KINDS`), or a
            :class:`Site`.
        by: For a per-head kind, ``"head"`` (default) or ``"head_pos"``; for a
            per-neuron kind, ``"neuron"`` (default) or ``"neuron_pos"``; for a
            residual kind, None or ``"pos"``.
    """
    if isinstance(value, Site):
        return value
    if not isinstance(value, str):
        raise InvalidInputType(
            f"kind must be a hook-point type name such as 'mlp_out' or a lenscope Site, "
            f"got {type(value).__name__}; pass e.g. kind='mlp_out'"
        )
    if value in NEURON_KINDS:
        by = "neuron" if by is None else by
        if by not in NEURON_BY:
            raise InvalidInput(
                f"by must be one of {NEURON_BY} for the per-neuron kind {value!r}, got {by!r}; "
                "pass by='neuron' (a neuron at every traced position) or by='neuron_pos' (a "
                "neuron at one position)"
            )
        return NeuronSite(value, by=by)
    if value in HEAD_KINDS:
        by = "head" if by is None else by
        if by not in HEAD_BY:
            raise InvalidInput(
                f"by must be one of {HEAD_BY} for the per-head kind {value!r}, got {by!r}; "
                "pass by='head' (a head at every position) or by='head_pos' (a head at one "
                "position)"
            )
        return HeadSite(value, by=by, feeds_attention=value in ("k", "v"))
    if value not in SITES:
        raise InvalidInput(
            f"kind must be one of {KINDS} (the TransformerLens hook types blocks.L.hook_<kind>) "
            f"or a per-head kind {HEAD_KINDS} (blocks.L.attn.hook_<kind>) or a per-neuron kind "
            f"{NEURON_KINDS} (blocks.L.mlp.hook_post), got {value!r}; "
            "pass e.g. kind='mlp_out'"
        )
    if by not in (None, "pos"):
        raise InvalidInput(
            f"by={by!r} applies to the per-head kinds {HEAD_KINDS} and the per-neuron kinds "
            f"{NEURON_KINDS}, but kind {value!r} is "
            "restored position by position; leave by unset, or pass e.g. kind='z'"
        )
    return SITES[check_kind(value)]


SITE_TYPES: dict[str, type[Site]] = {"Site": Site, "HeadSite": HeadSite, "NeuronSite": NeuronSite}
"""Site classes by name, so that settings and checkpoints holding site objects read back."""


def register_site(cls: type[Site]) -> type[Site]:
    """Make a :class:`Site` subclass readable from saved settings (use as a class decorator).

    A site given to a trace as an object is recorded by its class name and
    fields (:func:`site_to_dict`); reading it back (:func:`site_from_dict`)
    needs the class registered under that name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Site) and dataclasses.is_dataclass(cls)):
        raise InvalidInputType(
            f"register_site takes a dataclass subclass of lenscope.sites.Site, got {cls!r}"
        )
    SITE_TYPES[cls.__name__] = cls
    return cls


def site_to_dict(where: Site) -> dict[str, Any]:
    """A site's JSON record: its class name (``"type"``) and its dataclass fields."""
    return {"type": type(where).__name__, **dataclasses.asdict(where)}


def site_from_dict(data: Any) -> Site:
    """Inverse of :func:`site_to_dict` (the class must be registered: :func:`register_site`)."""
    if not isinstance(data, dict) or "type" not in data:
        raise InvalidInput(
            f"expected a site record written by site_to_dict (with 'type'), got {str(data)[:80]!r}"
        )
    cls = SITE_TYPES.get(data["type"])
    if cls is None:
        raise InvalidInput(
            f"site type {data['type']!r} is not registered (known: {sorted(SITE_TYPES)}); "
            f"decorate its class with @lenscope.sites.register_site before reading the file"
        )
    return cls(**{k: v for k, v in data.items() if k != "type"})


BY_KINDS: tuple[str, ...] = HEAD_KINDS + NEURON_KINDS
"""Kinds whose index space ``by`` chooses (the per-head and per-neuron kinds)."""
