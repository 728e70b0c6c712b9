"""The vectorised sweep engine behind every causal trace.

One generic routine restores clean activations into corrupted runs for many
``(layer, pos)`` cells at once (Meng et al., 2022, arXiv 2202.05262): each
batch row is one corrupted copy carrying one cell, and a hook at
``blocks.{j}.hook_{kind}`` swaps in the clean activation where an
einops-built boolean mask ``[batch, pos]`` says so. Only the last position's
final residual is decoded, never ``[batch, pos, d_vocab]`` logits.

Two strategies run the same computation:

* ``"full"``: every batch runs the whole model from the noised embeddings.
  Works on any model with TransformerLens hook names (HookedTransformer and
  TransformerBridge).
* ``"prefix"``: restoring cell ``(l, t)`` changes nothing before its first
  restored layer nor at positions before ``t`` (causal attention), so a
  batch starts at that layer from the corrupted run's residual stream
  (``start_at_layer``) and runs positions ``t:`` only, reading the corrupted
  keys and values of positions ``< t`` from a frozen key/value cache.
  HookedTransformer only; it computes close to the minimal work.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenscope.hooks import (
    EMBED_HOOK,
    decode_resid,
    hook_name,
    is_bridge,
    n_layers,
    run_to_final_resid,
)
from lenscope.metrics import PatchingMetric

STRATEGIES = ("auto", "prefix", "full")


@dataclasses.dataclass(frozen=True)
class CleanRun:
    """Clean activations of one prompt at the hook points a trace restores."""

    activations: dict[str, Float[Tensor, "pos d_model"]]
    logits: Float[Tensor, " d_vocab"]


@dataclasses.dataclass(frozen=True)
class CorruptedRun:
    """The corrupted copies with nothing restored.

    ``resid_pre`` (residual stream entering each block) and ``kv_cache`` are
    kept only for the prefix strategy.
    """

    logits: Float[Tensor, "samples d_vocab"]
    resid_pre: list[Float[Tensor, "samples pos d_model"]] | None
    kv_cache: Any


@dataclasses.dataclass(frozen=True)
class SweepOutput:
    """Per-cell metric and top-k of the restored runs; NaN / -1 for cells not traced."""

    scores: Float[Tensor, "layer pos"]
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]


def choose_strategy(model: torch.nn.Module, strategy: str) -> str:
    """Resolve ``"auto"`` to the fastest strategy ``model`` supports."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {STRATEGIES}, got {strategy!r}; "
            "'auto' picks 'prefix' for a HookedTransformer and 'full' otherwise"
        )
    prefix_ok = not is_bridge(model) and model.cfg.positional_embedding_type != "shortformer"
    if strategy == "prefix" and not prefix_ok:
        raise ValueError(
            f"strategy='prefix' needs a HookedTransformer without shortformer position "
            f"embeddings (it uses start_at_layer), got {type(model).__name__}; "
            "pass strategy='full' or 'auto'"
        )
    if strategy == "auto":
        return "prefix" if prefix_ok else "full"
    return strategy


def auto_batch_size(model: torch.nn.Module, n_pos: int, samples: int) -> int:
    """Rows (corrupted copies) per forward pass that keep activations near 1 GB.

    On CUDA the budget is a quarter of the free memory instead.
    """
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    bytes_per_value = torch.finfo(cfg.dtype).bits // 8
    # Live tensors per row inside one block: a few residual-sized buffers, the
    # MLP hidden layer, attention patterns, and float32 logits at one position.
    per_row = bytes_per_value * n_pos * (8 * cfg.d_model + 3 * d_mlp + 2 * cfg.n_heads * n_pos)
    per_row += 4 * 3 * cfg.d_vocab
    budget = 1 << 30
    device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    rows = max(samples, budget // per_row)
    return int(min(rows, 4096))


def _noise_hook(
    noise: Float[Tensor, "samples subject_pos d_model"], subject_range: tuple[int, int]
) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_embed`` hook adding each row's noise to the subject positions."""
    start, end = subject_range

    def hook(embed: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        copies = embed.shape[0] // noise.shape[0]
        rows = einops.repeat(noise, "sample pos d -> (copy sample) pos d", copy=copies)
        embed = embed.clone()
        embed[:, start:end] = embed[:, start:end] + rows.to(embed.dtype)
        return embed

    return hook


def _restore_hook(
    clean: Float[Tensor, "pos d_model"], restore: Bool[Tensor, "batch pos"]
) -> Callable[[Tensor, Any], Tensor]:
    """A hook putting the clean activation wherever ``restore`` is true."""
    mask = einops.rearrange(restore, "batch pos -> batch pos 1")

    def hook(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        return torch.where(mask, clean.to(act.dtype), act)

    return hook


def _capture_hook(store: dict[str, Tensor], name: str) -> Callable[[Tensor, Any], None]:
    # Keyed by the name we asked for: a TransformerBridge reports canonical
    # names (e.g. blocks.0.hook_out) to hooks attached through an alias.
    def hook(act: Tensor, hook: Any) -> None:
        store[name] = act

    return hook


def clean_run(
    model: torch.nn.Module, tokens: Int[Tensor, " pos"], hook_names: Sequence[str]
) -> CleanRun:
    """Run the clean prompt once, keeping ``hook_names`` and the last-position logits."""
    store: dict[str, Tensor] = {}
    hooks = [(name, _capture_hook(store, name)) for name in hook_names]
    resid = run_to_final_resid(model, tokens[None], hooks)
    activations = {name: store[name][0] for name in hook_names}
    return CleanRun(activations=activations, logits=decode_resid(model, resid)[0])


def corrupted_run(
    model: torch.nn.Module,
    tokens: Int[Tensor, " pos"],
    noise: Float[Tensor, "samples subject_pos d_model"],
    subject_range: tuple[int, int],
    *,
    keep_prefix_state: bool,
) -> CorruptedRun:
    """Run the noised copies once; keep what the prefix strategy starts from."""
    samples = noise.shape[0]
    batch = einops.repeat(tokens, "pos -> sample pos", sample=samples)
    hooks: list[tuple[str, Any]] = [(EMBED_HOOK, _noise_hook(noise, subject_range))]
    if not keep_prefix_state:
        logits = decode_resid(model, run_to_final_resid(model, batch, hooks))
        return CorruptedRun(logits=logits, resid_pre=None, kv_cache=None)

    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    store: dict[str, Tensor] = {}
    names = [hook_name("resid_pre", layer) for layer in range(n_layers(model))]
    hooks += [(name, _capture_hook(store, name)) for name in names]
    kv_cache = TransformerLensKeyValueCache.init_cache(
        model.cfg, model.cfg.device, batch_size=samples
    )
    # An explicit all-ones mask: TransformerLens would otherwise infer one from
    # pad tokens, and mask a prompt that happens to contain the pad id.
    resid = run_to_final_resid(
        model, batch, hooks, past_kv_cache=kv_cache, attention_mask=torch.ones_like(batch)
    )
    return CorruptedRun(
        logits=decode_resid(model, resid),
        resid_pre=[store[name] for name in names],
        kv_cache=kv_cache,
    )


def restore_windows(
    cells: Int[Tensor, "cell 2"], window: int, n_layer: int
) -> Bool[Tensor, "cell layer"]:
    """Which layers each cell restores: ``[l - w//2, l - w//2 + w)`` clipped, as in ROME."""
    layers = torch.arange(n_layer)
    lo = (cells[:, 0] - window // 2).clamp(min=0)
    hi = (cells[:, 0] - window // 2 + window).clamp(max=n_layer)
    return (layers[None, :] >= lo[:, None]) & (layers[None, :] < hi[:, None])


def _plan_batches(
    cells: Int[Tensor, "cell 2"],
    windows: Bool[Tensor, "cell layer"],
    strategy: str,
    rows_for: Callable[[int], int],
    n_pos: int,
    samples: int,
) -> list[tuple[Tensor, int, int]]:
    """Split cells into batches ``(cell indices, start layer, first position)``.

    ``full``: any cells together, from layer 0 and position 0. ``prefix``:
    cells sharing their first restored layer, cut into runs of consecutive
    positions by a small dynamic programme that minimises the token-layers
    computed (a batch runs positions from its earliest cell's on) plus a
    fixed cost per forward pass, so batches stay large enough to be
    efficient without computing much beyond the minimal work.
    """
    first_layer = windows.float().argmax(dim=1)
    if strategy == "full":
        per_batch = max(1, rows_for(n_pos) // samples)
        order = torch.arange(len(cells))
        return [(order[i : i + per_batch], 0, 0) for i in range(0, len(cells), per_batch)]
    batches: list[tuple[Tensor, int, int]] = []
    for start in first_layer.unique().tolist():
        members = torch.nonzero(first_layer == start).flatten()
        members = members[torch.argsort(cells[members, 1], stable=True)]
        positions = cells[members, 1].tolist()
        for lo, hi in _cut_runs(positions, n_pos, samples, rows_for):
            batches.append((members[lo:hi], start, positions[lo]))
    return batches


# Cost of one forward pass beyond its token-layers, in token-layers: small
# batches use the CPU's matrix units poorly and pay Python/hook overhead.
_FORWARD_OVERHEAD = 96


def _cut_runs(
    positions: list[int], n_pos: int, samples: int, rows_for: Callable[[int], int]
) -> list[tuple[int, int]]:
    """Cut sorted ``positions`` into ``[lo, hi)`` runs of least total cost."""
    count = len(positions)
    best = [0.0] + [float("inf")] * count
    cut = [0] * (count + 1)
    for hi in range(1, count + 1):
        for lo in range(hi - 1, -1, -1):
            rows = (hi - lo) * samples
            if rows > max(samples, rows_for(n_pos - positions[lo])):
                break
            cost = best[lo] + rows * (n_pos - positions[lo]) + _FORWARD_OVERHEAD
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    runs = []
    hi = count
    while hi > 0:
        runs.append((cut[hi], hi))
        hi = cut[hi]
    return runs[::-1]


def _frozen_cache(kv_cache: Any, start: int, pos: int, copies: int) -> Any:
    """The corrupted keys/values of positions ``< pos``, repeated for ``copies`` cells."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    def sliced(tensor: Tensor) -> Tensor:
        return einops.repeat(tensor[:, :pos], "s p h d -> (c s) p h d", c=copies)

    entries = [
        TransformerLensKeyValueCacheEntry(
            sliced(entry.past_keys), sliced(entry.past_values), frozen=True
        )
        if layer >= start
        else entry
        for layer, entry in enumerate(kv_cache.entries)
    ]
    mask = einops.repeat(kv_cache.previous_attention_mask[:, :pos], "s p -> (c s) p", c=copies)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


def sweep(
    model: torch.nn.Module,
    tokens: Int[Tensor, " pos"],
    *,
    kind: str,
    window: int,
    cells: Int[Tensor, "cell 2"],
    clean: CleanRun,
    corrupted: CorruptedRun,
    noise: Float[Tensor, "samples subject_pos d_model"],
    subject_range: tuple[int, int],
    answer_id: int,
    metric: PatchingMetric,
    top_k: int,
    strategy: str,
    batch_size: int | None,
    progress: bool,
    description: str = "",
) -> SweepOutput:
    """Restore every cell in ``cells`` (``[layer, pos]`` rows) and score it.

    Rows of a batch are ``(cell, sample)`` pairs, cell-major. The final
    residuals of all batches are decoded together in large chunks, so the
    unembedding matrix (671 MB for Gemma) is read a few times per trace rather
    than once per forward pass. Returns the metric averaged over samples and
    the top-k of the sample-averaged next-token distribution of each cell.
    """
    n_layer, n_pos = n_layers(model), tokens.shape[0]
    samples = noise.shape[0]
    windows = restore_windows(cells, window, n_layer)

    def rows_for(length: int) -> int:
        return batch_size or auto_batch_size(model, length, samples)

    batches = _plan_batches(cells, windows, strategy, rows_for, n_pos, samples)
    names = [hook_name(kind, layer) for layer in range(n_layer)]
    order: list[Tensor] = []
    finals: list[Tensor] = []
    for members, start, pos0 in tqdm(batches, desc=description or "trace", disable=not progress):
        batch_cells, batch_windows = cells[members], windows[members]
        onehot = torch.nn.functional.one_hot(batch_cells[:, 1] - pos0, n_pos - pos0).bool()
        hooks: list[tuple[str, Any]] = []
        for layer in range(start, n_layer):
            restore = batch_windows[:, layer, None] & onehot  # [cell, pos]
            if not restore.any():
                continue
            mask = einops.repeat(restore, "cell pos -> (cell sample) pos", sample=samples)
            clean_act = clean.activations[names[layer]][pos0:]
            hooks.append((names[layer], _restore_hook(clean_act, mask.to(tokens.device))))
        if strategy == "full":
            inputs = einops.repeat(tokens, "pos -> rows pos", rows=len(members) * samples)
            hooks.insert(0, (EMBED_HOOK, _noise_hook(noise, subject_range)))
            finals.append(run_to_final_resid(model, inputs, hooks))
        else:
            if corrupted.resid_pre is None:
                raise RuntimeError("the prefix strategy needs the corrupted run's resid_pre")
            inputs = einops.repeat(
                corrupted.resid_pre[start][:, pos0:], "s p d -> (c s) p d", c=len(members)
            )
            cache = _frozen_cache(corrupted.kv_cache, start, pos0, len(members)) if pos0 else None
            finals.append(
                run_to_final_resid(model, inputs, hooks, start_at_layer=start, past_kv_cache=cache)
            )
        order.append(members)
    return _score_cells(
        model, cells, torch.cat(order), torch.cat(finals), n_pos, samples, answer_id, metric, top_k
    )


def _score_cells(
    model: torch.nn.Module,
    cells: Int[Tensor, "cell 2"],
    order: Int[Tensor, " cell"],
    finals: Float[Tensor, "row d_model"],
    n_pos: int,
    samples: int,
    answer_id: int,
    metric: PatchingMetric,
    top_k: int,
) -> SweepOutput:
    """Decode final residuals in chunks and reduce them to per-cell scores and top-k."""
    n_layer = n_layers(model)
    scores = torch.full((n_layer, n_pos), float("nan"))
    top_ids = torch.full((n_layer, n_pos, top_k), -1, dtype=torch.long)
    top_probs = torch.full((n_layer, n_pos, top_k), float("nan"))
    # ~256 MB of float32 logits per chunk, whole cells only.
    chunk_cells = max(1, (1 << 26) // (model.cfg.d_vocab * samples))
    for first in range(0, len(order), chunk_cells):
        members = order[first : first + chunk_cells]
        rows = finals[first * samples : (first + len(members)) * samples]
        logits = decode_resid(model, rows)
        per_copy = metric(logits, answer_id).float()
        cell_scores = einops.reduce(per_copy, "(cell sample) -> cell", "mean", sample=samples)
        probs = einops.reduce(
            torch.softmax(logits, dim=-1), "(cell sample) v -> cell v", "mean", sample=samples
        )
        best = probs.topk(top_k, dim=-1)
        layer_idx, pos_idx = cells[members, 0], cells[members, 1]
        scores[layer_idx, pos_idx] = cell_scores.cpu()
        top_ids[layer_idx, pos_idx] = best.indices.cpu()
        top_probs[layer_idx, pos_idx] = best.values.cpu()
    return SweepOutput(scores=scores, top_ids=top_ids, top_probs=top_probs)
