"""Collect activations of many prompts, batch by batch, into CPU memory.

:func:`collect` runs prompts through a model in batches and keeps the
activations of chosen hook points at chosen positions (by default the last
token of each prompt, where a next-token prediction is read), moved to CPU
memory batch by batch so that a dataset far larger than the accelerator's
memory fits. The result, :class:`CollectedActivations`, is indexed like a
TransformerLens ``ActivationCache`` (``acts["blocks.3.hook_resid_post"]``,
``acts["resid_post", 3]``, ``acts.stack_activation("z")``), with a leading
``prompt`` axis, and converts to a real one (:meth:`~CollectedActivations.to_activation_cache`).
The same job as easyroutine's ``extract_cache``.

Prompts of different lengths share a batch right-padded: with causal
attention a token never reads a later one, so the padding changes nothing
at the real tokens; the attention mask excludes it as well.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenscope.hooks import KINDS, capture_forward, check_hook_points, model_name, preserved_model
from lenscope.sites import HEAD_KINDS
from lenscope.tokens import prompt_tokens
from lenscope.validation import (
    LAST,
    InvalidInput,
    InvalidInputType,
    is_int,
    optional_positive_int,
)

POSITION_NAMES = ("last", "all")


@dataclasses.dataclass(frozen=True, eq=False)
class CollectedActivations:
    """Activations of many prompts, ``[prompt, ...]`` per hook point, in CPU memory.

    Attributes:
        activations: ``{hook name: tensor}``; the tensor is ``[prompt, *shape]``
            for ``positions="last"``, ``[prompt, position, *shape]`` for a list
            of positions or ``"all"`` (attention patterns keep their
            ``[head, dest, src]`` layout, with ``dest`` selected).
        n_tokens: Tokens in each prompt.
        positions: What was collected: ``"last"``, ``"all"`` or the positions.
        prompts: Each prompt's text (None where token ids were given).
        model_name: The model's ``cfg.model_name``.
    """

    activations: dict[str, Tensor]
    n_tokens: Tensor
    positions: str | tuple[int, ...]
    prompts: tuple[str | None, ...]
    model_name: str

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        """``acts["blocks.3.hook_mlp_out"]``, or ``acts["mlp_out", 3]`` (``ActivationCache``)."""
        name = _act_name(*key) if isinstance(key, tuple) else key
        if name not in self.activations:
            raise KeyError(
                f"{name!r} was not collected; collected: {sorted(self.activations)[:6]}"
                f"{' ...' if len(self.activations) > 6 else ''}"
            )
        return self.activations[name]

    def __contains__(self, key: object) -> bool:
        """Whether the hook point was collected."""
        return key in self.activations

    def __len__(self) -> int:
        """Number of prompts."""
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        """The hook names, in the order they were asked for."""
        return iter(self.activations)

    def keys(self) -> Any:
        """The hook names."""
        return self.activations.keys()

    def items(self) -> Any:
        """``(hook name, tensor)`` pairs."""
        return self.activations.items()

    def stack_activation(self, kind: str) -> Tensor:
        """``[layer, prompt, ...]``: ``kind`` (``"resid_post"``, ``"z"``...) at each layer kept."""
        layers = sorted(
            int(name.split(".")[1])
            for name in self.activations
            if name.startswith("blocks.") and name == _act_name(kind, int(name.split(".")[1]))
        )
        if not layers:
            raise KeyError(f"no {kind!r} activation was collected; collected {list(self)[:6]}")
        return torch.stack([self.activations[_act_name(kind, layer)] for layer in layers])

    def to_activation_cache(self, model: torch.nn.Module) -> Any:
        """A TransformerLens ``ActivationCache`` over the same tensors (batch axis = prompts)."""
        from transformer_lens import ActivationCache

        return ActivationCache(dict(self.activations), model)


def _by_destination(name: str) -> bool:
    """Whether a hook's activation is ``[batch, head, dest, src]`` (patterns and scores)."""
    return name.endswith(("hook_pattern", "hook_attn_scores"))


def _pad(x: Tensor, width: int, value: int) -> Tensor:
    """``x`` right-padded with ``value`` along its last axis to ``width``."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)


def _hook_names(model: torch.nn.Module, hooks: Any) -> list[str]:
    if callable(hooks):
        names = [name for name in model.hook_dict if hooks(name)]
    elif isinstance(hooks, str):
        names = [hooks]
    elif isinstance(hooks, Sequence):
        names = list(dict.fromkeys(hooks))
    else:
        raise InvalidInputType(
            f"hooks must be a hook name, a list of them or a filter function, got "
            f"{type(hooks).__name__}; pass e.g. hooks=['blocks.5.hook_resid_post']"
        )
    if not names:
        raise InvalidInput(
            f"hooks must name at least one hook point, got {hooks!r}; pass e.g. "
            "hooks=['blocks.5.hook_resid_post'] or hooks=lambda name: name.endswith('hook_z')"
        )
    check_hook_points(model, names)
    return names


def _positions(positions: Any, lengths: Tensor) -> Tensor:
    """``[prompt, n]`` token positions to keep of each prompt."""
    fix = "pass positions='last', 'all' or token positions such as [-1, -2]"
    if isinstance(positions, str):
        if positions not in POSITION_NAMES:
            raise InvalidInput(
                f"positions must be 'last', 'all' or positions, got {positions!r}; {fix}"
            )
        if positions == "last":
            return (lengths - 1)[:, None]
        if len(set(lengths.tolist())) > 1:
            raise InvalidInput(
                f"positions='all' needs prompts of one length, got lengths from "
                f"{int(lengths.min())} to {int(lengths.max())}; {fix}"
            )
        return torch.arange(int(lengths[0])).expand(len(lengths), -1)
    chosen = [positions] if is_int(positions) else list(positions)
    chosen = [-1 if isinstance(p, str) and p == LAST else p for p in chosen]
    if not chosen or not all(is_int(p) for p in chosen):
        raise InvalidInput(f"positions must be 'last', 'all' or integers, got {positions!r}; {fix}")
    where = torch.tensor(chosen)[None].expand(len(lengths), -1)
    where = torch.where(where < 0, where + lengths[:, None], where)
    if (where < 0).any() or (where >= lengths[:, None]).any():
        raise InvalidInput(
            f"positions {chosen} must lie inside every prompt (the shortest has "
            f"{int(lengths.min())} tokens); {fix}"
        )
    return where


def _act_name(kind: str, layer: int) -> str:
    if kind in HEAD_KINDS:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in KINDS:
        return f"blocks.{layer}.hook_{kind}"
    raise InvalidInput(
        f"kind must be one of {KINDS + HEAD_KINDS} to index by (kind, layer), got {kind!r}; "
        "or index by the full hook name"
    )


def collect(
    model: torch.nn.Module,
    prompts: Sequence[str | Tensor | Sequence[int]],
    *,
    hooks: str | Sequence[str] | Callable[[str], bool],
    positions: str | int | Sequence[int | str] = "last",
    batch_size: int = 16,
    progress: bool = True,
) -> CollectedActivations:
    """Run ``prompts`` in batches and keep the activations of ``hooks`` at ``positions``.

    Example:
        >>> acts = collect(model, prompts, hooks=["blocks.5.hook_resid_post"])  # doctest: +SKIP
        >>> acts["resid_post", 5].shape  # [prompt, d_model]; doctest: +SKIP

    Args:
        model: A HookedTransformer or TransformerBridge.
        prompts: Texts or 1-D token ids (a BOS is prepended to texts as the
            model does, as in tracing).
        hooks: A hook name, a list of them, or a filter ``name -> bool`` over
            ``model.hook_dict`` (TransformerLens' ``names_filter``).
        positions: ``"last"`` (each prompt's last token), ``"all"`` (prompts
            must have the same length), or token positions (an int or a
            list; negative ones count back from each prompt's end, and ``"last"``
            in a list is ``-1``).
        batch_size: Prompts per forward pass.
        progress: Show a progress bar.

    Returns:
        The :class:`CollectedActivations`.
    """
    if isinstance(prompts, str | Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise InvalidInputType(
            f"prompts must be a non-empty list of texts or token-id lists, got "
            f"{type(prompts).__name__}; pass e.g. ['The Eiffel Tower is in']"
        )
    optional_positive_int("batch_size", batch_size, "pass e.g. batch_size=16")
    names = _hook_names(model, hooks)
    tokens = [prompt_tokens(model, p) for p in prompts]
    lengths = torch.tensor([len(t) for t in tokens])
    where = _positions(positions, lengths)
    collected: dict[str, list[Tensor]] = {name: [] for name in names}
    starts = range(0, len(tokens), batch_size)
    with preserved_model(model), torch.inference_mode():
        for start in tqdm(starts, desc="collect", disable=not progress):
            batch = tokens[start : start + batch_size]
            width = max(len(t) for t in batch)
            ids = torch.stack([_pad(t, width, int(t[-1])) for t in batch])
            mask = torch.arange(width)[None] < lengths[start : start + len(batch), None]
            store = capture_forward(
                model, ids, [], names, attention_mask=mask.long().to(ids.device)
            )
            index = where[start : start + len(batch)]
            rows = torch.arange(len(batch))[:, None]
            for name in names:
                act = store[name]
                if _by_destination(name):  # [batch, head, dest, src] -> [batch, dest, head, src]
                    act = act.transpose(1, 2)
                collected[name].append(act[rows, index.to(act.device)].to("cpu", copy=True))
    longest = int(lengths.max())
    activations = {
        # Attention to source positions: padded with zeros (no weight) to the longest prompt.
        name: torch.cat([_pad(x, longest, 0) if _by_destination(name) else x for x in parts])
        for name, parts in collected.items()
    }
    if positions == "last" or isinstance(positions, int):
        activations = {name: act[:, 0] for name, act in activations.items()}
    return CollectedActivations(
        activations=activations,
        n_tokens=lengths,
        positions=positions if isinstance(positions, str) else tuple(where[0].tolist()),
        prompts=tuple(p if isinstance(p, str) else None for p in prompts),
        model_name=model_name(model),
    )
