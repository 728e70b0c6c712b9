"""The prefix strategy on a TransformerBridge: one decoder block at a time, on a suffix.

The staircase of :mod:`lenscope.engine` (causal tracing as in Meng et al.,
2022, arXiv 2202.05262) runs block ``l`` on positions ``pos:`` of the rows
whose cells have joined by layer ``l``, attending to the corrupted run's
keys and values of positions ``< pos``. A ``TransformerBridge``'s
``start_at_layer`` still executes every earlier block, so this module calls
the bridge's blocks (``model.blocks[l]``, the modules Hugging Face's decoder
loop calls) directly, which fires every TransformerLens hook inside them:

* Keys and values. TransformerLens' attention bridges recompute attention
  themselves and read a cache only from a ``past_key_values`` keyword, on
  which they call ``update(keys, values, layer)`` with the layer's keys and
  values (``[batch, kv_head, pos, d_head]``, after any rotary embedding) and
  attend to what it returns. During lenscope's own calls a forward pre-hook
  on each ``blocks.l.attn`` passes a small stand-in there: one that records
  them (the corrupted run) or one that puts the corrupted prefix in front
  (a stair). Hugging Face's own ``cache`` argument is not involved.
* Everything else a block reads (attention masks, sliding-window masks,
  rotary embeddings, position ids) is whatever the Hugging Face model passes
  its decoder layers for a prompt whose first ``pos`` tokens are cached. A
  cheap probe, one batch-of-one forward of the suffix with a cache of ``pos``
  tokens, records those arguments for every layer; they are the same for
  every row, so the stair reuses them at any batch size.
"""

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from lenscope._prefix import BlockRunner, PrefixRunner
from lenscope.hooks import HookFn, model_name, n_layers, run_to_final_resid

_CACHE_KEYWORD = "past_key_values"
"""Where TransformerLens' attention bridges look for a key/value cache."""

_FIX = "pass strategy='full' (or 'auto', which picks it)"


class _ProbeDone(Exception):
    """Raised once the last block's arguments are known, ending the probe."""


@dataclasses.dataclass(frozen=True)
class BridgeKeysValues:
    """The corrupted run's keys and values, and the probed block arguments per ``pos``.

    ``block_inputs`` is filled as stairs ask for it: a trace runs several
    stairs per position (one per kind, more when a batch is cut), and the
    arguments depend on the position only.
    """

    keys_values: list[tuple[Tensor, Tensor]]
    n_pos: int
    dtype: torch.dtype
    device: torch.device
    block_inputs: dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]] = dataclasses.field(
        default_factory=dict
    )


class _Recorder:
    """Stands in for a cache: keeps each layer's keys and values, attends to them unchanged."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Record ``layer_idx``'s keys and values."""
        _check_once(self.seen, layer_idx)
        self.seen[layer_idx] = (keys, values)
        return keys, values


class _Replayer:
    """Stands in for a frozen cache: prepends the corrupted keys and values of a prefix.

    Layer ``j``'s prefix (``[samples, kv_head, pos, d_head]``) is repeated
    ``copies[j]`` times when that layer asks for it, so at most one layer's
    copy exists at a time.
    """

    def __init__(self, prefix: Sequence[tuple[Tensor, Tensor]], copies: Sequence[int]) -> None:
        self.prefix = prefix
        self.copies = copies
        self.seen: dict[int, tuple[()]] = {}

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``layer_idx``'s prefix, repeated per joined cell, followed by ``keys``/``values``."""
        _check_once(self.seen, layer_idx)
        self.seen[layer_idx] = ()
        old_keys, old_values = self.prefix[layer_idx]
        count = self.copies[layer_idx]
        if keys.shape[0] != count * old_keys.shape[0]:
            raise RuntimeError(
                f"layer {layer_idx} ran {keys.shape[0]} rows, expected {count} cells x "
                f"{old_keys.shape[0]} samples; this is a bug in lenscope's prefix strategy"
            )
        if old_keys.shape[-2] == 0:
            return keys, values
        old_keys, old_values = (
            einops.repeat(x, "s ... -> (c s) ...", c=count) for x in (old_keys, old_values)
        )
        return torch.cat([old_keys, keys], dim=-2), torch.cat([old_values, values], dim=-2)

    def check_used(self, layer: int) -> None:
        """Raise if block ``layer`` ran without reading its keys and values here."""
        if layer not in self.seen:
            raise RuntimeError(_unread(layer))


def _check_once(seen: dict[int, Any], layer_idx: int) -> None:
    if layer_idx in seen:
        raise RuntimeError(
            f"the attention of layer {layer_idx} read its key/value cache twice in one "
            f"forward pass; the prefix strategy cannot run on this model; {_FIX}"
        )


def _unread(layer: int) -> str:
    return (
        f"blocks.{layer}.attn never read the key/value cache lenscope passes it as "
        f"{_CACHE_KEYWORD}=, so the prefix strategy cannot give it the corrupted keys "
        f"and values of earlier positions; {_FIX}"
    )


@contextlib.contextmanager
def _tapped(model: torch.nn.Module, cache: _Recorder | _Replayer) -> Iterator[None]:
    """Hand ``cache`` to every block's attention bridge while inside; then remove the hooks."""

    def pass_cache(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, _CACHE_KEYWORD: cache}

    handles = []
    try:
        for block in model.blocks:
            handles.append(block.attn.register_forward_pre_hook(pass_cache, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_cache_keyword(hf_model: Any) -> str | None:
    """How the Hugging Face model's forward takes a cache (``cache`` since transformers 5.x)."""
    try:
        parameters = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def bridge_unsupported(model: torch.nn.Module) -> str | None:
    """Why the prefix strategy cannot run on this ``TransformerBridge``, or None if it can."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    cfg = model.cfg
    for flag, what in (
        ("is_multimodal", "multimodal"),
        ("is_visual_model", "vision"),
        ("is_audio_model", "audio"),
    ):
        if getattr(cfg, flag, False):
            return f"{what} bridges are not supported"
    hf_model = getattr(model, "original_model", None)
    if getattr(getattr(hf_model, "config", None), "is_encoder_decoder", False):
        return "encoder-decoder bridges are not supported"
    if getattr(cfg, "positional_embedding_type", None) == "alibi":
        # Hugging Face folds the batch into ALiBi biases, so arguments probed
        # with one row would not fit a stair's rows.
        return "ALiBi position biases are not supported"
    if _hf_cache_keyword(hf_model) is None:
        return (
            f"the Hugging Face model {type(hf_model).__name__} takes no cache argument, "
            "which lenscope needs to learn the arguments of its decoder layers"
        )
    blocks = model._modules.get("blocks")
    if blocks is None or len(blocks) != n_layers(model):
        return "it has no 'blocks' stack with one block per layer"
    for layer, block in enumerate(blocks):
        if not isinstance(block, BlockBridge):
            return f"blocks.{layer} is a {type(block).__name__}, not a BlockBridge"
        attn = block._modules.get("attn")
        if not isinstance(attn, AttentionBridge) or type(attn).forward is AttentionBridge.forward:
            return (
                f"blocks.{layer}.attn ({type(attn).__name__}) runs Hugging Face's own "
                "attention, which lenscope cannot hand the corrupted keys and values"
            )
        if getattr(attn, "_layer_idx", None) != layer:
            return (
                f"blocks.{layer}.attn caches its keys as layer "
                f"{getattr(attn, '_layer_idx', None)}, not {layer}"
            )
    return None


class BridgePrefixRunner(PrefixRunner):
    """A ``TransformerBridge`` runs one block by calling ``model.blocks[layer]`` directly."""

    def corrupted_forward(
        self, batch: Int[Tensor, "samples pos"], fwd_hooks: Sequence[tuple[str, HookFn]]
    ) -> tuple[Float[Tensor, "samples d_model"], BridgeKeysValues]:
        """Run the copies once, recording every layer's keys and values."""
        recorder = _Recorder()
        with _tapped(self.model, recorder):
            resid = run_to_final_resid(self.model, batch, fwd_hooks)
        for layer in range(n_layers(self.model)):
            if layer not in recorder.seen:
                raise RuntimeError(_unread(layer))
        keys_values = [recorder.seen[layer] for layer in range(n_layers(self.model))]
        return resid, BridgeKeysValues(keys_values, batch.shape[1], resid.dtype, resid.device)

    @contextlib.contextmanager
    def stair(
        self, keys_values: BridgeKeysValues, pos: int, copies: Sequence[int]
    ) -> Iterator[BlockRunner]:
        """Blocks run with their probed arguments and the corrupted prefix's keys/values."""
        inputs = keys_values.block_inputs.get(pos)
        if inputs is None:
            inputs = keys_values.block_inputs[pos] = self._probe(keys_values, pos)
        prefix = [(k[..., :pos, :], v[..., :pos, :]) for k, v in keys_values.keys_values]
        replayer = _Replayer(prefix, copies)

        def run_block(
            resid: Float[Tensor, "row suffix d_model"], layer: int
        ) -> Float[Tensor, "row suffix d_model"]:
            args, kwargs = inputs[layer]
            out = self.model.blocks[layer](resid, *args, **kwargs)
            replayer.check_used(layer)
            return out[0] if isinstance(out, tuple) else out

        with _tapped(self.model, replayer):
            yield run_block

    def _probe(
        self, keys_values: BridgeKeysValues, pos: int
    ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The arguments (after hidden states) Hugging Face passes each decoder layer.

        One row of positions ``pos:``, with a Hugging Face cache holding the
        first copy's keys and values of ``pos`` tokens, so that masks,
        position ids and rotary embeddings are those of that suffix. Only the
        arguments are kept, so the blocks need not run: each returns its
        input unchanged, as transformers 5 decoder layers return a tensor. A
        decoder loop that expects another return type fails there, and then
        the probe runs the blocks for real (the weights of every block read
        once more; on Gemma-3-270m about a fifth of a stair's time). The
        cache object itself is replaced by None in the result: TransformerLens'
        attention does not read it, and the stair hands its own keys and
        values to the attention instead.
        """
        n_layer = n_layers(self.model)
        first = [(k[:1, ..., :pos, :], v[:1, ..., :pos, :]) for k, v in keys_values.keys_values]
        hf_cache = DynamicCache()
        if pos:
            for layer, (keys, values) in enumerate(first):
                hf_cache.update(keys, values, layer)
        suffix = torch.zeros(
            1,
            keys_values.n_pos - pos,
            self.model.cfg.d_model,
            dtype=keys_values.dtype,
            device=keys_values.device,
        )
        try:
            captured = self._capture_block_inputs(suffix, hf_cache, first, skip_blocks=True)
        except Exception:
            captured = self._capture_block_inputs(suffix, hf_cache, first, skip_blocks=False)
        if len(captured) != n_layer:
            missing = sorted(set(range(n_layer)) - set(captured))
            raise RuntimeError(
                f"the forward pass of {model_name(self.model)!r} never called blocks "
                f"{missing}, so lenscope could not learn their arguments; {_FIX}"
            )

        def drop_cache(value: Any) -> Any:
            return None if value is hf_cache else value

        return [
            (
                tuple(drop_cache(arg) for arg in captured[layer][0]),
                {key: drop_cache(value) for key, value in captured[layer][1].items()},
            )
            for layer in range(n_layer)
        ]

    def _capture_block_inputs(
        self,
        suffix: Float[Tensor, "1 suffix d_model"],
        hf_cache: Any,
        first: Sequence[tuple[Tensor, Tensor]],
        *,
        skip_blocks: bool,
    ) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
        """Run the probe forward, recording each block's arguments; the last block never runs.

        With ``skip_blocks`` each block's ``forward`` is, for this call only,
        an instance attribute returning the hidden states; it is deleted again
        afterwards, whatever happens.
        """
        model = self.model
        n_layer = n_layers(model)
        captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def capture(layer: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict) -> None:
                kwargs = dict(kwargs)
                if args:
                    args = args[1:]
                else:
                    kwargs.pop("hidden_states", None)
                captured[layer] = (args, kwargs)
                if layer == n_layer - 1:
                    raise _ProbeDone

            return hook

        def skip(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return hidden_states

        keyword = _hf_cache_keyword(model.original_model)
        handles = []
        stubbed = []
        try:
            with _tapped(model, _Replayer(first, [1] * n_layer)):
                for layer, block in enumerate(model.blocks):
                    hook = capture(layer)
                    handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
                    if skip_blocks and "forward" not in vars(block):
                        # object.__setattr__: a bridge component would forward
                        # the assignment to the Hugging Face module it wraps.
                        object.__setattr__(block, "forward", skip)
                        stubbed.append(block)
                model(suffix, **{keyword: hf_cache})
        except _ProbeDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for block in stubbed:
                object.__delattr__(block, "forward")
        return captured
