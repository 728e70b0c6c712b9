"""What the prefix strategy needs from a model, behind one small interface.

The prefix strategy of :mod:`lenscope.engine` (causal tracing as in Meng et
al., 2022, arXiv 2202.05262, computed with the minimal token-layer count)
runs the cells of one position ``pos`` block by block, on positions ``pos:``
only, attending to the corrupted run's keys and values of the earlier
positions. Three things about that depend on the model class, and only they
live here: running the corrupted copies while keeping every layer's keys and
values, making those of positions ``< pos`` available to a "stair" of rows
that grows layer by layer, and running one block on the rows. The engine
itself (:func:`lenscope.engine._run_stair`) is the same for every class.

* :class:`HookedPrefixRunner`: a TransformerLens 3.x ``HookedTransformer``,
  through ``start_at_layer``/``stop_at_layer`` and a frozen
  ``TransformerLensKeyValueCache``.
* :class:`lenscope._bridge_prefix.BridgePrefixRunner`: a ``TransformerBridge``,
  by calling its blocks directly (see that module).

:func:`lenscope.engine.prefix_runner` picks the runner for a model.
"""

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.hooks import HookFn, run_to_final_resid

BlockRunner = Callable[[Tensor, int], Tensor]
"""``run_block(resid, layer)``: block ``layer`` on a stair's rows, positions ``pos:``."""


class PrefixRunner(abc.ABC):
    """The model-class-specific steps of the prefix strategy."""

    def __init__(self, model: torch.nn.Module) -> None:
        """Wrap ``model``; nothing is run or attached yet."""
        self.model = model

    @abc.abstractmethod
    def corrupted_forward(
        self, batch: Int[Tensor, "samples pos"], fwd_hooks: Sequence[tuple[str, HookFn]]
    ) -> tuple[Float[Tensor, "samples d_model"], Any]:
        """Run the corrupted copies with ``fwd_hooks``, keeping every layer's keys and values.

        Returns:
            The last position's final residual of each copy, and the keys and
            values in whatever form :meth:`stair` reads them.
        """

    @abc.abstractmethod
    def stair(
        self, keys_values: Any, pos: int, copies: Sequence[int]
    ) -> contextlib.AbstractContextManager[BlockRunner]:
        """A context giving ``run_block(resid, layer)`` for the rows of one stair.

        Inside it, block ``layer`` runs on ``resid`` (rows ``(cell sample)``,
        positions ``pos:``) and its attention also sees the corrupted keys and
        values of positions ``< pos``, repeated ``copies[layer]`` times (the
        cells whose rows have joined by then). The context is entered before
        the engine attaches its restoring hooks, and leaves nothing behind.
        """


class HookedPrefixRunner(PrefixRunner):
    """A ``HookedTransformer`` runs one block with ``start_at_layer``/``stop_at_layer``."""

    def corrupted_forward(
        self, batch: Int[Tensor, "samples pos"], fwd_hooks: Sequence[tuple[str, HookFn]]
    ) -> tuple[Float[Tensor, "samples d_model"], Any]:
        """Run the copies once, filling a ``TransformerLensKeyValueCache``."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cfg = self.model.cfg
        kv_cache = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, batch_size=len(batch))
        # An explicit all-ones mask: TransformerLens would otherwise infer one from
        # pad tokens, and mask a prompt that happens to contain the pad id.
        resid = run_to_final_resid(
            self.model,
            batch,
            fwd_hooks,
            past_kv_cache=kv_cache,
            attention_mask=torch.ones_like(batch),
        )
        return resid, kv_cache

    @contextlib.contextmanager
    def stair(self, keys_values: Any, pos: int, copies: Sequence[int]) -> Iterator[BlockRunner]:
        """Blocks read a frozen cache of positions ``< pos`` (none at ``pos == 0``)."""
        cache = _frozen_cache(keys_values, pos, copies) if pos else None

        def run_block(
            resid: Float[Tensor, "row suffix d_model"], layer: int
        ) -> Float[Tensor, "row suffix d_model"]:
            return self.model(
                resid, start_at_layer=layer, stop_at_layer=layer + 1, past_kv_cache=cache
            )

        yield run_block


def _frozen_cache(kv_cache: Any, pos: int, copies: Sequence[int]) -> Any:
    """A frozen cache holding the corrupted keys/values of positions ``< pos``.

    Layer ``j``'s entry is repeated ``copies[j]`` times: the number of cells
    whose runs have started by then.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    def sliced(tensor: Tensor, count: int) -> Tensor:
        return einops.repeat(tensor[:, :pos], "s p h d -> (c s) p h d", c=count)

    entries = [
        TransformerLensKeyValueCacheEntry(
            sliced(entry.past_keys, count), sliced(entry.past_values, count), frozen=True
        )
        if count
        else entry
        for entry, count in zip(kv_cache.entries, copies, strict=True)
    ]
    mask = einops.repeat(kv_cache.previous_attention_mask[:, :pos], "s p -> (c s) p", c=copies[-1])
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)
