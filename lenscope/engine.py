"""The vectorised sweep engine behind every causal trace.

One generic routine restores clean activations into corrupted runs for many
cells at once (Meng et al., 2022, arXiv 2202.05262): each batch row is one
corrupted copy carrying one cell, and a hook at the site's hook point
swaps in the clean activation where an einops-built boolean mask says so.
What is restored is a :class:`~lenscope.sites.Site` (a cell is a point of its
index space, ``(layer, pos)`` for the residual-width sites); how the
corrupted run differs from the clean one is a
:class:`~lenscope.corruptions.CorruptedInput` (its tokens, its hooks, its
first changed position). The engine knows nothing more about either. Only
the last position's final residual is decoded, never ``[batch, pos,
d_vocab]`` logits.

Two strategies run the same computation:

* ``"full"``: every batch runs the whole model from the noised embeddings.
  Works on any model with TransformerLens hook names (HookedTransformer and
  TransformerBridge).
* ``"prefix"``: restoring cell ``(l, t)`` changes nothing before its first
  restored layer nor at positions before ``t`` (causal attention). The cells
  of one position run together as a "staircase": each joins the batch at
  its first restored layer, from the corrupted run's residual stream
  (``start_at_layer``/``stop_at_layer``, one block at a time), and only
  positions ``t:`` are computed, reading the corrupted keys and values of
  earlier positions from a frozen key/value cache. That is exactly the
  minimal token-layer count; restoring ``resid_post`` skips even the first
  block. How a model class keeps those keys and values and runs one block
  is behind :class:`lenscope._prefix.PrefixRunner`: ``start_at_layer`` on a
  HookedTransformer, direct calls of the decoder blocks on a
  TransformerBridge (:mod:`lenscope._bridge_prefix`).

Both skip restorations that provably change nothing (positions before the
corruption's first changed position, sites attention does not read in the
last block at earlier positions): such cells take the corrupted run's scores.

Before any forward pass, :func:`check_memory` refuses a trace whose smallest
batch (one cell: ``samples`` rows of the whole prompt) would not fit in the
memory available. :func:`trace_meter` counts the work of a whole trace
before it runs (:func:`estimate_sweep` per sweep, plus the clean and
corrupted runs) into a :class:`~lenscope.progress.TraceMeter`, which every
forward pass and decoded chunk advances: one progress bar whose remaining
time is the speed measured on the trace's own batches, and a warning when
the first sweep batch shows that the trace will take long.
"""

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenscope import metrics
from lenscope._bridge_prefix import BridgePrefixRunner, bridge_unsupported
from lenscope._prefix import HookedPrefixRunner, PrefixRunner
from lenscope.corruptions import CorruptedInput, HookFn
from lenscope.hooks import (
    FINAL_RESID,
    capture_forward,
    decode_resid,
    hook_name,
    is_bridge,
    model_class,
    n_layers,
)
from lenscope.metrics import BoundMetric, PatchingMetric
from lenscope.progress import TraceMeter, decode_weight, duration
from lenscope.sites import Site, source_rows
from lenscope.validation import InvalidInput, warn

STRATEGIES = ("auto", "prefix", "full")


@dataclasses.dataclass(frozen=True)
class CleanRun:
    """Clean activations of one prompt at the hook points a trace restores.

    ``logits`` are the next-token logits after the prompt. For an answer of
    ``k > 1`` tokens the run's input is the prompt followed by the answer's
    first ``k - 1`` tokens (teacher forcing), and ``answer_logits`` holds the
    logits of the ``k`` positions that predict the answer's tokens
    (``logits`` is its first row).
    """

    activations: dict[str, Float[Tensor, "pos ..."]]
    logits: Float[Tensor, " d_vocab"]
    answer_logits: Float[Tensor, "k d_vocab"] | None = None


@dataclasses.dataclass(frozen=True)
class CorruptedRun:
    """The corrupted copies (or, when noising, the clean copies) with nothing patched.

    ``resid_pre`` (residual stream entering each block) and ``kv_cache`` (every
    layer's keys and values, in the form the model's
    :class:`~lenscope._prefix.PrefixRunner` reads) are kept only for the
    prefix strategy; ``activations`` only when asked for (the source of a
    noising sweep). ``logits`` are the next-token logits after the prompt;
    for an answer of ``k > 1`` tokens (teacher-forced, see :class:`CleanRun`)
    ``final_resid`` holds the final residuals of the ``k`` positions that
    predict them.
    """

    logits: Float[Tensor, "samples d_vocab"]
    resid_pre: list[Float[Tensor, "samples pos d_model"]] | None
    kv_cache: Any
    activations: dict[str, Float[Tensor, "samples pos ..."]] = dataclasses.field(
        default_factory=dict
    )
    final_resid: Float[Tensor, "samples k d_model"] | None = None


@dataclasses.dataclass(frozen=True)
class SweepOutput:
    """Per-cell metric and top-k of the restored runs; NaN / -1 for cells not traced.

    A sweep of packed prompts (``base.prompts > 1``) adds a last ``prompt`` axis
    to ``scores`` and one before ``k`` to ``top_ids`` / ``top_probs``.
    """

    scores: Float[Tensor, "metric layer ..."]
    top_ids: Int[Tensor, "layer *unit k"]
    top_probs: Float[Tensor, "layer *unit k"]
    token_log_probs: Float[Tensor, "layer *unit answer"] | None = None


@dataclasses.dataclass(frozen=True)
class Members:
    """Members of an answer set scored from one teacher-forced run (a sweep's ``answer_id``).

    Every member but its last token is a beginning of the run's continuation
    (the longest member's first tokens), so that one run decodes them all:
    member ``m``'s token ``j`` is read at decoded position ``j``. A sweep of
    members reports ``prob``/``log_prob`` of the log-sum-exp of their
    teacher-forced log-probabilities, and in ``token_log_probs`` each row's
    log-probability of each member (``[..., sample * member]``, not averaged),
    so that members decoded in other runs can be added to them per copy.

    Attributes:
        ids: Each member's token ids.
    """

    ids: tuple[tuple[int, ...], ...]

    @property
    def decoded(self) -> int:
        """Positions a row decodes: the longest member's tokens."""
        return max(len(member) for member in self.ids)


def answer_length(answer_id: int | Tensor | Sequence[int] | Members) -> int:
    """Positions a sweep decodes per row: the tokens of an answer given as a sequence, else 1."""
    if isinstance(answer_id, Members):
        return answer_id.decoded
    if isinstance(answer_id, int | Tensor):
        return 1
    return len(answer_id)


def _single(
    answer_id: int | Tensor | Sequence[int] | Members,
) -> "int | Tensor | tuple[int, ...] | Members":
    """A one-token answer as the engine's single-token form (an int), else as it is."""
    if isinstance(answer_id, int | Tensor | Members):
        return answer_id
    return int(answer_id[0]) if len(answer_id) == 1 else tuple(answer_id)


def prefix_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run the prefix strategy, or None if it can."""
    if is_bridge(model):
        return bridge_unsupported(model)
    if model.cfg.positional_embedding_type == "shortformer":
        return (
            "a HookedTransformer with shortformer position embeddings adds them to "
            "every block's queries and keys, which start_at_layer does not reproduce"
        )
    return None


def prefix_runner(model: torch.nn.Module) -> PrefixRunner:
    """The :class:`PrefixRunner` for ``model``'s class."""
    if is_bridge(model):
        return BridgePrefixRunner(model)
    return HookedPrefixRunner(model)


def choose_strategy(model: torch.nn.Module, strategy: str) -> str:
    """Resolve ``"auto"`` to the fastest strategy ``model`` supports."""
    if strategy not in STRATEGIES:
        raise InvalidInput(
            f"strategy must be one of {STRATEGIES}, got {strategy!r}; "
            "'auto' picks 'prefix' where the model supports it and 'full' otherwise"
        )
    unsupported = prefix_unsupported(model)
    if strategy == "prefix" and unsupported:
        raise InvalidInput(
            f"strategy='prefix' cannot run on this {model_class(model)}: {unsupported}; "
            "pass strategy='full' or 'auto'"
        )
    if strategy == "auto" and unsupported:
        # Said once per tracer (each CausalTracer resolves its strategy once).
        warn(
            f"the fast prefix strategy cannot run on this {model_class(model)}: {unsupported}; "
            "tracing with the 'full' strategy instead (the same numbers, one whole forward pass "
            "per batch of cells, so slower); pass strategy='full' to choose it explicitly",
            UserWarning,
        )
        return "full"
    if strategy == "auto":
        return "prefix"
    return strategy


# Eager attention builds [head, query, key] tensors whole, the softmax in
# float32: the scores, their scaled and masked copies, the pattern, and (in
# TransformerLens' compatibility mode) the fully-masked-row and NaN scrubs.
# About this many are alive at once: Gemma-3-270m on a 5050-token prompt,
# two corrupted copies, peaked at 6.7 GB above the loaded model, 2.6 GB a
# copy of which 2.2 GB attention (5.3 buffers of 0.41 GB).
_ATTENTION_BUFFERS = 5
# Bytes of activations a forward pass may hold when the batch size is chosen
# automatically (on CUDA: a quarter of the memory PyTorch could still use).
_BATCH_BYTES = 1 << 30


def _value_bytes(model: torch.nn.Module) -> int:
    return torch.finfo(model.cfg.dtype).bits // 8


def row_bytes(
    model: torch.nn.Module, n_query: int, n_key: int | None = None, *, width: int | None = None
) -> int:
    """Peak bytes one row (one corrupted copy) holds while a block runs ``n_query`` positions.

    Counts a few residual-sized buffers, the restored activation (``width``
    values per position, the copy its restoring hook makes) and the MLP hidden layer per position,
    the attention scores and pattern ``[head, query, key]`` in float32 (as
    eager attention builds them, several alive at once), and a copy of every
    layer's keys and values of the ``n_key`` positions attended to (the
    prefix strategy's frozen cache, Hugging Face's cache on a
    TransformerBridge).

    Args:
        model: The model.
        n_query: Positions the row computes.
        n_key: Positions its attention reads; default ``n_query``.
        width: Values per position of the restored activation
            (:meth:`Site.width <lenscope.sites.Site.width>`); default ``d_model``.

    Returns:
        The bytes.
    """
    cfg = model.cfg
    n_key = n_query if n_key is None else n_key
    width = cfg.d_model if width is None else width
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    value = _value_bytes(model)
    per_query = value * (7 * cfg.d_model + width + 3 * d_mlp)
    attention = 4 * _ATTENTION_BUFFERS * cfg.n_heads * n_query * n_key
    keys_values = value * 2 * n_layers(model) * kv_heads * cfg.d_head * n_key
    return n_query * per_query + attention + keys_values


def auto_batch_size(
    model: torch.nn.Module,
    n_pos: int,
    samples: int,
    *,
    n_key: int | None = None,
    width: int | None = None,
) -> int:
    """Rows (corrupted copies) per forward pass that keep activations near 1 GB.

    On CUDA the budget is a quarter of the memory PyTorch could still use
    (free on the device plus what its caching allocator holds unused).
    Decoding is chunked separately (:func:`_decode_cells`), so the vocabulary
    does not count here. Never fewer than ``samples`` rows (one cell): whether
    those fit at all is :func:`check_memory`'s question, asked before a trace
    starts.

    Args:
        model: The model.
        n_pos: Positions each row computes.
        samples: Corrupted copies per cell.
        n_key: Positions each row's attention reads; default ``n_pos``.
        width: Values per position of the restored activation; default ``d_model``.
    """
    budget = _BATCH_BYTES
    device = _device(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = (free + cached) // 4
    rows = max(samples, budget // row_bytes(model, n_pos, n_key, width=width))
    return int(min(rows, 4096))


def _device(model: torch.nn.Module) -> torch.device:
    device = model.cfg.device
    return torch.device(device) if device is not None else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a trace holds at its smallest batch: one cell, ``samples`` rows of the prompt.

    Attributes:
        per_copy: One corrupted copy of the whole prompt in a forward pass
            (:func:`row_bytes`), and its float32 logits when decoded.
        kept_per_copy: The corrupted run's state the prefix strategy keeps
            for the whole trace, per copy: every layer's ``resid_pre``, keys
            and values.
        fixed: The clean activations kept for restoring.
    """

    per_copy: int
    kept_per_copy: int
    fixed: int

    def peak(self, samples: int) -> int:
        """The estimated peak with ``samples`` corrupted copies."""
        return self.fixed + samples * (self.per_copy + self.kept_per_copy)


def memory_estimate(
    model: torch.nn.Module, n_pos: int, hook_points: int | Sequence[Site], strategy: str
) -> MemoryEstimate:
    """What one cell of a trace of an ``n_pos``-token prompt holds (see :class:`MemoryEstimate`).

    Args:
        model: The model.
        n_pos: Tokens in the prompt.
        hook_points: The sites whose clean activations are kept (at every
            layer, each at its own :meth:`~lenscope.sites.Site.width`), or a
            number of residual-width hook points.
        strategy: ``"prefix"`` or ``"full"``.
    """
    cfg = model.cfg
    value = _value_bytes(model)
    kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    kept = 0
    if strategy == "prefix":
        kept = value * n_layers(model) * n_pos * (cfg.d_model + 2 * kv_heads * cfg.d_head)
    return MemoryEstimate(
        per_copy=row_bytes(model, n_pos) + 4 * cfg.d_vocab,
        kept_per_copy=kept,
        fixed=value * n_pos * kept_width(model, n_pos, hook_points),
    )


def kept_width(model: torch.nn.Module, n_pos: int, hook_points: int | Sequence[Site]) -> int:
    """Values per position of the clean activations kept at ``hook_points`` (each site's layers)."""
    if isinstance(hook_points, int):
        return hook_points * int(model.cfg.d_model)
    return n_layers(model) * sum(where.width(model, n_pos) for where in hook_points)


def available_memory(device: torch.device) -> int | None:
    """Bytes a trace can still allocate on ``device``; None when unknown.

    CUDA: free device memory plus what PyTorch's allocator holds unused. CPU:
    the smallest of ``MemAvailable`` (``/proc/meminfo``, else psutil if
    installed), the room left under a cgroup v2 memory limit, and the address
    space left under ``RLIMIT_AS`` (``ulimit -v``). Other devices: None.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    known = [
        x
        for x in (_system_available(), _cgroup_available(), _address_space_left())
        if x is not None
    ]
    return min(known) if known else None


def _meminfo(path: str, key: str) -> int | None:
    """A ``key: value kB`` entry of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _system_available() -> int | None:
    found = _meminfo("/proc/meminfo", "MemAvailable")
    if found is not None:
        return found
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_available() -> int | None:
    """Room under this process's cgroup v2 memory limit (reclaimable file cache counted free)."""
    root = "/sys/fs/cgroup"
    try:
        with open(f"{root}/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(f"{root}/memory.current") as f:
            current = int(f.read())
        inactive = 0
        with open(f"{root}/memory.stat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "inactive_file":
                    inactive = int(value)
        return max(0, int(limit) - current + inactive)
    except (OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    """Address space left under ``RLIMIT_AS``, where one is set."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _meminfo(f"/proc/{os.getpid()}/status", "VmSize")
    return None if used is None else max(0, soft - used)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.2g} MB"


def check_memory(
    model: torch.nn.Module,
    corrupted: CorruptedInput,
    hook_points: int | Sequence[Site],
    strategy: str,
) -> None:
    """Refuse, before any forward pass, a trace whose smallest batch would not fit in memory.

    The smallest batch is one cell: ``corrupted.samples`` copies of the whole
    prompt in one forward pass, beside the clean activations and (prefix
    strategy) the corrupted run's kept state (:func:`memory_estimate`).
    Attention makes a row grow with the square of the prompt's length, so a
    long prompt can need more than the machine has even one cell at a time;
    without this check the process would grow until the system killed it.

    Args:
        model: The model.
        corrupted: The bound corruption (its tokens give the prompt length and samples).
        hook_points: The sites whose clean activations the trace keeps (at
            every layer), or a number of residual-width hook points.
        strategy: ``"prefix"`` or ``"full"``.

    Raises:
        InvalidInput: If the estimate exceeds :func:`available_memory`.
    """
    device = _device(model)
    available = available_memory(device)
    if available is None:
        return
    n_pos, samples = int(corrupted.tokens.shape[1]), corrupted.rows
    estimate = memory_estimate(model, n_pos, hook_points, strategy)
    needed = estimate.peak(samples)
    if needed <= available:
        return
    per_copy = estimate.per_copy + estimate.kept_per_copy
    fits = (available - estimate.fixed) // per_copy
    fixes = "trace a shorter prompt (a row's memory grows with the square of its length)"
    if 1 <= fits < samples:
        fixes = f"pass samples={fits} (or fewer), or {fixes}"
    where = "in RAM" if device.type == "cpu" else f"on {device}"
    raise InvalidInput(
        f"one cell of a trace must fit in memory, but this {n_pos}-token prompt needs about "
        f"{_size(needed)} ({samples} corrupted copies of {_size(per_copy)} each, plus "
        f"{_size(estimate.fixed)} of clean activations) and {_size(available)} is available "
        f"{where}; {fixes}; neither positions=... nor layers=... lowers what one cell needs"
    )


# TransformerLens 3.x rearranges some weights on every call before its matmul
# (GatedMLP: ``W.T.contiguous()``; attention: ``W_Q`` to ``[(head d_head),
# d_model]``, ``W_O`` to ``[d_model, (head d_head)]``), one copy per weight per
# block per forward pass: about a fifth of a CPU trace of Gemma-3-270m. With
# the same values stored in the order those calls read them, the rearranges
# are free views and the matmuls receive identical contiguous operands.
# Parameter name -> the axis order TransformerLens reads it in.
_READ_ORDER = {
    "GatedMLP": {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)},
    "Attention": {"W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "W_O": (2, 0, 1)},
    "GroupedQueryAttention": {
        "W_Q": (0, 2, 1),
        "_W_K": (0, 2, 1),
        "_W_V": (0, 2, 1),
        "W_O": (2, 0, 1),
    },
}
# At most this many bytes of weights are held twice while a trace runs.
_RELAYOUT_BYTES = 2 << 30


@contextlib.contextmanager
def matmul_friendly_weights(model: torch.nn.Module) -> Iterator[None]:
    """Store a CPU HookedTransformer's weights in the order its forward reads them.

    Values, shapes and parameter objects are unchanged; only strides differ.
    On exit (also after an error or Ctrl-C) every parameter gets back its
    original tensor. Nothing happens on other devices (the copies are cheap
    there and memory is scarcer) or for a TransformerBridge.
    """
    device = torch.device(model.cfg.device) if model.cfg.device is not None else None
    if is_bridge(model) or device is None or device.type != "cpu":
        yield
        return
    originals: list[tuple[torch.nn.Parameter, Tensor]] = []
    spent = 0
    try:
        with torch.no_grad():
            for module in model.modules():
                orders = _READ_ORDER.get(type(module).__name__, {})
                for name, param in module.named_parameters(recurse=False):
                    order = orders.get(name)
                    if order is None or param.dim() != len(order):
                        continue
                    if spent + param.nbytes > _RELAYOUT_BYTES:
                        break
                    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
                    relaid = param.data.permute(order).contiguous().permute(inverse)
                    originals.append((param, param.data))
                    param.data = relaid
                    spent += param.nbytes
        yield
    finally:
        for param, original in originals:
            param.data = original


def _capture_hook(store: dict[str, Tensor], name: str) -> Callable[[Tensor, Any], None]:
    # Keyed by the name we asked for: a TransformerBridge reports canonical
    # names (e.g. blocks.0.hook_out) to hooks attached through an alias.
    def hook(act: Tensor, hook: Any) -> None:
        store[name] = act

    return hook


def clean_run(
    model: torch.nn.Module,
    tokens: Int[Tensor, " pos"],
    hook_names: Sequence[str],
    *,
    decoded: int = 1,
) -> CleanRun:
    """Run the clean prompt once, keeping ``hook_names`` and the logits of the last positions.

    Args:
        model: The model.
        tokens: The prompt, followed by an answer's first ``decoded - 1`` tokens.
        hook_names: Hook points whose activations to keep.
        decoded: Positions to decode (the answer's tokens): the last ``decoded``.
    """
    store = capture_forward(model, tokens[None], [], hook_names)
    final = store.pop(FINAL_RESID)
    activations = {name: store[name][0] for name in hook_names}
    if decoded == 1:
        return CleanRun(activations=activations, logits=decode_resid(model, final[:, -1])[0])
    answer_logits = decode_resid(model, final[0, -decoded:])
    return CleanRun(activations=activations, logits=answer_logits[0], answer_logits=answer_logits)


def corrupted_run(
    model: torch.nn.Module,
    corrupted: CorruptedInput,
    *,
    keep_prefix_state: bool,
    capture: Sequence[str] = (),
    decoded: int = 1,
) -> CorruptedRun:
    """Run the corrupted samples once; keep what the prefix strategy starts from.

    Args:
        model: The model.
        corrupted: The bound corruption (or the clean copies of a noising sweep).
        keep_prefix_state: Keep every layer's ``resid_pre`` and keys and values.
        capture: Hook points whose activations to keep (``[samples, pos, ...]``).
        decoded: Positions a sweep decodes (an answer's tokens, teacher-forced):
            for more than one, their final residuals are kept too.
    """
    batch = corrupted.tokens
    hooks = list(corrupted.fwd_hooks)
    if not keep_prefix_state:
        store = capture_forward(model, batch, hooks, capture)
        final = store.pop(FINAL_RESID)
        return CorruptedRun(
            logits=decode_resid(model, final[:, -decoded]),
            resid_pre=None,
            kv_cache=None,
            activations={name: store[name] for name in capture},
            final_resid=final[:, -decoded:] if decoded > 1 else None,
        )

    store = {}
    names = [hook_name("resid_pre", layer) for layer in range(n_layers(model))]
    last = hook_name("resid_post", n_layers(model) - 1)
    wanted = [*names, *capture, *([last] if decoded > 1 else [])]
    hooks += [(name, _capture_hook(store, name)) for name in dict.fromkeys(wanted)]
    resid, kv_cache = prefix_runner(model).corrupted_forward(batch, hooks)
    final = store[last][:, -decoded:] if decoded > 1 else None
    return CorruptedRun(
        logits=decode_resid(model, resid if final is None else final[:, 0]),
        resid_pre=[store[name] for name in names],
        kv_cache=kv_cache,
        activations={name: store[name] for name in capture},
        final_resid=final,
    )


def restore_windows(
    cells: Int[Tensor, "cell axis"], window: int, n_layer: int
) -> Bool[Tensor, "cell layer"]:
    """Which layers each cell restores: ``[l - w//2, l - w//2 + w)`` clipped, as in ROME.

    ``cells[:, 0]`` is each cell's layer (the first axis of every index space).
    """
    layers = torch.arange(n_layer)
    lo = (cells[:, 0] - window // 2).clamp(min=0)
    hi = (cells[:, 0] - window // 2 + window).clamp(max=n_layer)
    return (layers[None, :] >= lo[:, None]) & (layers[None, :] < hi[:, None])


def _touched_positions(
    site: Site, cells: Int[Tensor, "cell axis"], n_pos: int
) -> Bool[Tensor, "cell pos"]:
    """Token positions each cell restores at."""
    return site.touched_positions(cells[:, 1:], n_pos)


def effective_windows(
    windows: Bool[Tensor, "cell layer"],
    cells: Int[Tensor, "cell axis"],
    site: Site,
    first_changed: int,
    n_pos: int,
    decoded: int = 1,
) -> Bool[Tensor, "cell layer"]:
    """Drop the restorations that provably change nothing at the decoded positions.

    The decoded positions are the last ``decoded`` (an answer of several
    tokens, teacher-forced: the last prompt position and the answer's);
    cells restore prompt positions only, all at or before the first of them.

    Positions before the corruption's first changed position never see it
    (causal attention), so their clean and corrupted activations are equal
    and restoring them is a no-op. In the last block, an activation at an
    earlier position reaches the last one only if attention in that block
    reads it (:attr:`Site.feeds_attention`: ``resid_pre`` only, among the
    residual-width sites); restoring any other site there is a no-op too. A
    cell left with no layer to restore scores exactly like the corrupted run.
    """
    touched = _touched_positions(site, cells, n_pos)
    if decoded > 1:
        touched = touched & _prompt_positions(n_pos, decoded)
    keep = windows & touched[:, first_changed:].any(dim=1)[:, None]
    if not site.feeds_attention:
        keep[:, -1] &= touched[:, -1] if decoded == 1 else touched[:, -decoded:].any(dim=1)
    return keep


def _prompt_positions(n_pos: int, decoded: int) -> Bool[Tensor, " pos"]:
    """The prompt's positions of an input that ends with an answer's first ``decoded - 1`` tokens.

    Restoration and corruption act on the prompt only: the answer's tokens
    are what the run is scored on, never restored.
    """
    return torch.arange(n_pos) < n_pos - decoded + 1


def _entry_layers(windows: Bool[Tensor, "cell layer"], site: Site) -> Int[Tensor, " cell"]:
    """The block each cell's restored run starts at in the prefix strategy.

    A cell starts at its first restored layer, from the corrupted residual
    stream there, plus the site's :attr:`~lenscope.sites.Site.entry_offset`
    (restoring ``resid_post`` of layer ``a`` is the same as starting at
    block ``a + 1`` with the clean value put into the residual stream).
    """
    return windows.float().argmax(dim=1) + site.entry_offset


def _stair_groups(
    first_pos: Int[Tensor, " cell"],
    entries: Int[Tensor, " cell"],
    max_cells: Callable[[int], int],
) -> list[Int[Tensor, " member"]]:
    """Cells of one first position together, in order of entry layer, cut to fit a batch."""
    groups = []
    for pos in first_pos.unique().tolist():
        members = torch.nonzero(first_pos == pos).flatten()
        members = members[torch.argsort(entries[members], stable=True)]
        size = max_cells(pos)
        groups += [members[i : i + size] for i in range(0, len(members), size)]
    return groups


def _rows(mask: Bool[Tensor, "cell ..."], samples: int) -> Bool[Tensor, "row ..."]:
    """One row per ``(cell, sample)``, cell-major."""
    return einops.repeat(mask, "cell ... -> (cell sample) ...", sample=samples)


def _run_stair(
    model: torch.nn.Module,
    pos: int,
    entries: Int[Tensor, " member"],
    windows: Bool[Tensor, "member layer"],
    masks: Bool[Tensor, "member pos ..."],
    site: Site,
    source: Mapping[str, Float[Tensor, "src ..."]],
    base: CorruptedRun,
    samples: int,
    switches: Mapping[str, "_Switch"],
    corruption_hooks: Sequence[tuple[str, HookFn]] = (),
    decoded: int = 1,
) -> Float[Tensor, "row d_model"] | Float[Tensor, "row decoded d_model"]:
    """Run the cells of one first position, each joining the batch at its entry layer.

    Returns the final residuals of the last position (of the last
    ``decoded`` positions, an answer's, for ``decoded > 1``).

    Every row runs positions ``pos:`` only (the base run's keys and values of
    earlier positions come from a frozen cache) and only the blocks from its
    entry layer on, so the token-layers computed are exactly the minimal
    ones; one block at a time, the batch grows as cells join. Rows are
    ``(cell, sample)`` pairs, cell-major, in the order of ``entries``. The
    restoring hooks are the sweep's ``switches``, attached once per sweep
    (:func:`_switchboard`): this stair only sets what they do. A corruption
    that acts inside the blocks (an ablation at a later layer) carries
    ``corruption_hooks`` (:meth:`~lenscope.corruptions.CorruptedInput.stair_hooks`:
    its hooks for positions ``pos:``), switched on before the restoring hooks.
    """
    if base.resid_pre is None or base.kv_cache is None:
        raise RuntimeError("the prefix strategy needs the base run's resid_pre and cache")
    n_layer = n_layers(model)
    device = base.resid_pre[0].device
    names = site.hook_names(n_layer)
    masks = masks[:, pos:]
    joined = [int((entries <= layer).sum()) for layer in range(n_layer)]
    hooks: list[tuple[str, HookFn]] = list(corruption_hooks)
    for layer in range(int(entries[0]), n_layer):
        restore = windows[: joined[layer], layer]
        if not restore.any():
            continue
        mask = _rows(masks[: joined[layer]] & _per_cell(restore, masks.ndim), samples)
        hooks.append(
            (
                names[layer],
                site.restore_hook(site.clean_suffix(source[names[layer]], pos), mask.to(device)),
            )
        )
    resid = None
    # The stair is set up before the restoring hooks are switched on: a
    # TransformerBridge runs a one-row probe forward there.
    with (
        prefix_runner(model).stair(base.kv_cache, pos, joined) as run_block,
        _switched(switches, hooks),
    ):
        for layer in range(int(entries[0]), n_layer):
            first = joined[layer - 1] if layer else 0
            count = joined[layer] - first
            if count:
                # A copy (rows (cell sample), cell-major), never a view: restoring
                # hooks write in place and must not reach the base run's state.
                new = base.resid_pre[layer][:, pos:].repeat(count, 1, 1)
                if site.entry_offset:
                    # These cells restored the previous layer's activation, which
                    # is this block's input: put its patched-in value in directly.
                    before = _rows(masks[first : joined[layer]], samples).to(device)
                    value = source_rows(source[names[layer - 1]][:, pos:], len(new))
                    new = torch.where(before[..., None], value.to(new.dtype), new)
                resid = new if resid is None else torch.cat([resid, new])
            resid = run_block(resid, layer)
    return _last(resid, decoded)


def _cell_masks(
    site: Site, units: Int[Tensor, "cell unit"], n_pos: int, decoded: int
) -> Bool[Tensor, "cell pos ..."]:
    """Where each cell restores, cut to the prompt's positions when an answer follows it.

    A per-head site's "every position" then means every prompt position: the
    ``decoded - 1`` teacher-forced answer positions are never restored.
    """
    masks = site.cell_mask(units, n_pos)
    if decoded > 1:
        keep = _prompt_positions(n_pos, decoded).to(masks.device)
        masks = masks & keep.reshape(1, n_pos, *([1] * (masks.ndim - 2)))
    return masks


def _last(resid: Float[Tensor, "row pos d_model"], decoded: int) -> Tensor:
    """The final residuals a sweep decodes: the last position's, or the last ``decoded``."""
    return resid[:, -1] if decoded == 1 else resid[:, -decoded:]


class _Switch:
    """A hook attached for a whole sweep; what it does (if anything) is set per stair.

    It runs its functions in order, each on what the previous one returned (a
    corruption's hook before the restoring hook of the same hook point, as
    the full strategy attaches them).
    """

    def __init__(self) -> None:
        self.fns: tuple[HookFn, ...] = ()

    def __call__(self, act: Tensor, hook: Any) -> Tensor | None:
        result = None
        for fn in self.fns:
            out = fn(act, hook)
            if out is not None:
                act = result = out
        return result


@contextlib.contextmanager
def _switchboard(model: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, _Switch]]:
    """One idle :class:`_Switch` per hook point, attached for the duration of a sweep.

    Attaching and removing hooks walks the model's hook points; a sweep
    with many stairs would otherwise pay it once per stair (about a sixth
    of a bfloat16 GPU trace on TransformerLens 3.9, in the issue's profile).
    """
    switches = {name: _Switch() for name in dict.fromkeys(names)}
    if not switches:
        yield switches
        return
    with model.hooks(fwd_hooks=list(switches.items())):
        yield switches


@contextlib.contextmanager
def _switched(
    switches: Mapping[str, _Switch], hooks: Sequence[tuple[str, HookFn]]
) -> Iterator[None]:
    """Switch ``hooks`` on for the duration of the block; all switches idle afterwards."""
    try:
        for name, fn in hooks:
            switches[name].fns += (fn,)
        yield
    finally:
        for switch in switches.values():
            switch.fns = ()


def _per_cell(restore: Bool[Tensor, " cell"], ndim: int) -> Tensor:
    """``restore`` with singleton axes appended, to broadcast against ``ndim``-d cell masks."""
    return restore.reshape(-1, *([1] * (ndim - 1)))


@dataclasses.dataclass(frozen=True)
class _SweepPlan:
    """Which cells of a sweep run, and in which forward passes.

    Shared by :func:`sweep` and :func:`estimate_sweep`, so that the estimate
    counts exactly what runs. ``batches`` index the active cells;
    ``entries``, ``first_pos`` and ``done`` (cells whose final residual is
    the clean one) exist for the prefix strategy.
    """

    windows: Bool[Tensor, "cell layer"]
    active: Bool[Tensor, " cell"]
    batches: list[Tensor]  # each Int[Tensor, " member"]
    entries: Int[Tensor, " active"] | None
    first_pos: Int[Tensor, " active"] | None
    done: Bool[Tensor, " active"] | None
    batch_token_layers: list[int]

    @property
    def token_layers(self) -> int:
        """Token-layers of all batches."""
        return sum(self.batch_token_layers)


def _plan_sweep(
    model: torch.nn.Module,
    site: Site,
    window: int,
    cells: Int[Tensor, "cell axis"],
    corrupted: CorruptedInput,
    strategy: str,
    batch_size: int | None,
    decoded: int = 1,
) -> _SweepPlan:
    n_layer, n_pos = n_layers(model), corrupted.tokens.shape[1]
    samples = corrupted.rows
    windows = effective_windows(
        restore_windows(cells, window, n_layer),
        cells,
        site,
        corrupted.first_changed,
        n_pos,
        decoded,
    )
    active = windows.any(dim=1)
    traced = cells[active]

    width = site.width(model, n_pos)

    def rows_for(length: int) -> int:
        return batch_size or auto_batch_size(model, length, samples, n_key=n_pos, width=width)

    if strategy == "full":
        per_batch = max(1, rows_for(n_pos) // samples)
        batches = [b for b in torch.arange(len(traced)).split(per_batch) if len(b)]
        work = [len(b) * samples * n_pos * n_layer for b in batches]
        return _SweepPlan(windows, active, batches, None, None, None, work)
    entries = _entry_layers(windows[active], site)
    first_pos = site.first_position(traced[:, 1:])
    # Restoring only the last block's resid_post at the last position:
    # the final residual is the clean one.
    done = entries == n_layer
    pending = torch.nonzero(~done).flatten()
    batches = [
        pending[group]
        for group in _stair_groups(
            first_pos[pending],
            entries[pending],
            lambda pos: max(1, rows_for(n_pos - pos) // samples),
        )
    ]
    # Each row computes positions first_pos: through blocks entry:.
    per_cell = (n_pos - first_pos) * (n_layer - entries) * samples
    work = [int(per_cell[members].sum()) for members in batches]
    return _SweepPlan(windows, active, batches, entries, first_pos, done, work)


def sweep(
    model: torch.nn.Module,
    *,
    site: Site,
    window: int,
    cells: Int[Tensor, "cell axis"],
    source: Mapping[str, Float[Tensor, "src ..."]],
    base: CorruptedInput,
    base_state: CorruptedRun,
    answer_id: int | Int[Tensor, " prompt"] | Sequence[int] | Members,
    metrics: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
    strategy: str,
    batch_size: int | None,
    progress: bool,
    description: str = "",
    meter: TraceMeter | None = None,
    on_cells: Callable[[SweepOutput], None] | None = None,
) -> SweepOutput:
    """Patch every cell of ``cells`` (rows of ``site.index_axes`` coordinates) and score it.

    The base run (``base``: its tokens and hooks; ``base_state``: its scores
    and the prefix strategy's state) receives the ``source`` activations at
    each cell. Denoising (causal tracing) patches the clean run's activations
    (one row, ``[1, pos, ...]`` per hook name) into the corrupted copies;
    noising patches each corrupted copy's activations (``[samples, pos,
    ...]``) into copies of the clean run. Rows of a batch are ``(cell,
    sample)`` pairs, cell-major. Cells whose patches are all no-ops
    (:func:`effective_windows`) take the base run's scores without a forward
    pass. The final residuals of all
    batches are decoded together in large chunks, so the unembedding matrix
    (671 MB for Gemma) is read a few times per trace rather than once per
    forward pass. Returns each metric averaged over samples (``scores``:
    ``[metric, layer, *unit]``) and the top-k of the sample-averaged
    next-token distribution of each cell.

    A base of several packed prompts (:func:`~lenscope.corruptions.pack_inputs`,
    ``base.prompts > 1``) traces the same cells of every prompt in the same
    forward passes: ``source`` then holds each row's own activations, and
    ``answer_id`` one answer per prompt (only :func:`~lenscope.metrics.prob`
    and :func:`~lenscope.metrics.log_prob` read it per row); the outputs gain
    a last axis, ``prompt`` (``scores``: ``[metric, layer, *unit, prompt]``).

    An answer of ``k > 1`` tokens (``answer_id`` a sequence of ids) is
    scored by teacher forcing: ``base``'s tokens end with its first ``k - 1``
    tokens, cells restore prompt positions only, and the final residuals
    of the last ``k`` positions are decoded; ``prob``/``log_prob`` are the
    whole answer's, and ``token_log_probs`` (``[layer, *unit, k]``, means over
    samples) splits ``log_prob`` by token. A ``k``-token answer adds ``k - 1``
    positions to every row, not forward passes.

    Each forward pass and decoded chunk advances ``meter`` (the trace's
    :class:`~lenscope.progress.TraceMeter`, see :func:`trace_meter`);
    without one, ``progress=True`` shows this sweep's own.

    ``on_cells(output)`` (optional) streams the sweep: the finished forward
    passes are decoded as soon as they hold at least :data:`STREAM_ROWS`
    rows (whole cells), not all together at the end, and ``on_cells`` gets
    the outputs so far (cells not yet decoded are NaN / -1) after each
    decode. The per-cell arithmetic is the same, and the CPU matmul's rows
    do not depend on how many rows it multiplies once there are several (a
    remainder smaller than :data:`STREAM_ROWS` is decoded with rows
    already decoded before it), so the final outputs equal the
    unstreamed sweep's, bit for bit on one thread; with several threads
    the matmul may split the rows otherwise and round one by a float32
    ulp (tested to 1e-6); the unembedding is read once per decode
    instead of a few times per trace. The prefix strategy's stairs then run
    cheapest first (the last positions'), so that the first cells show soonest.
    """
    n_pos, samples = base.tokens.shape[1], base.rows
    answer_id = _single(answer_id)
    decoded = answer_length(answer_id)
    plan = _plan_sweep(model, site, window, cells, base, strategy, batch_size, decoded)
    label = description or "trace"
    with contextlib.ExitStack() as stack:
        if meter is None:
            weight = decode_weight(model, n_pos)
            total = plan.token_layers + weight * int(plan.active.sum()) * samples * decoded
            meter = stack.enter_context(TraceMeter(total, progress=progress, description=label))
        meter.describe(label)
        return _sweep(
            model,
            plan,
            site,
            cells,
            source,
            base,
            base_state,
            answer_id,
            metrics,
            top_k,
            meter,
            on_cells,
        )


def _sweep(
    model: torch.nn.Module,
    plan: "_SweepPlan",
    site: Site,
    cells: Int[Tensor, "cell axis"],
    source: Mapping[str, Float[Tensor, "src ..."]],
    base: CorruptedInput,
    base_state: CorruptedRun,
    answer_id: int | Int[Tensor, " prompt"] | Sequence[int] | Members,
    metrics: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
    meter: TraceMeter,
    on_cells: Callable[[SweepOutput], None] | None = None,
) -> SweepOutput:
    """:func:`sweep` after planning."""
    n_layer, n_pos = n_layers(model), base.tokens.shape[1]
    samples, prompts = base.rows, base.prompts
    decoded = answer_length(answer_id)
    weight = decode_weight(model, n_pos)
    active = plan.active
    # The grid keeps the prompt's positions (the answer's are never restored).
    unit_shape = site.unit_shape(model, n_pos - decoded + 1)
    split = None if decoded == 1 else decoded  # token_log_probs' width
    if isinstance(answer_id, Members):
        split = samples * len(answer_id.ids)
    out = _empty_output(len(metrics), (n_layer, *unit_shape, prompts), top_k, split)
    if not active.all():
        if isinstance(answer_id, Members):
            unchanged = _score_members(
                _base_logits(model, base_state, decoded), samples, answer_id, metrics, top_k
            )
            unchanged = (unchanged[0][:, :, None], *(x[:, None] for x in unchanged[1:]))
        elif decoded == 1:
            unchanged = _score_cells(
                base_state.logits.float().clone(), base, answer_id, metrics, top_k
            )
        else:
            unchanged = _decode_cells(
                model, _base_finals(base_state), base, answer_id, metrics, top_k
            )
        n_unchanged = int((~active).sum())
        _fill_cells(
            out,
            cells[~active],
            *(part.expand(-1, n_unchanged, *part.shape[2:]) for part in unchanged[:1]),
            *(part.expand(n_unchanged, *part.shape[1:]) for part in unchanged[1:]),
        )
    cells, windows = cells[active], plan.windows[active]

    order: list[Tensor] = []
    finals: list[Tensor] = []
    if plan.done is not None and plan.done.any():
        final = source[site.hook_name(n_layer - 1)][:, n_pos - decoded]
        done = int(plan.done.sum())
        rows = done * samples
        order.append(torch.nonzero(plan.done).flatten())
        restored = source_rows(final, rows).expand(rows, -1)
        if decoded > 1:
            # Restoring the last block's output at the last prompt position leaves
            # the answer positions' final residuals as the base run's.
            after = einops.repeat(_base_finals(base_state)[:, 1:], "s k d -> (c s) k d", c=done).to(
                restored.dtype
            )
            restored = torch.cat([restored[:, None], after], dim=1)
        finals.append(restored)
    # Streaming: finals[:streamed] are decoded and in ``out``.
    streamed = 0
    least = base.rows * -(-STREAM_ROWS // base.rows)  # whole cells

    def stream(last: bool) -> None:
        nonlocal streamed
        new = torch.cat(finals[streamed:]) if finals[streamed:] else None
        if on_cells is None or new is None or (not last and new.shape[0] < least):
            return
        # A small remainder is decoded with rows decoded before it, so that no
        # matmul has fewer than ``least`` rows (one row takes another kernel).
        pad = 0
        if streamed and new.shape[0] < least:
            before = torch.cat(finals[:streamed])
            pad = min(least - new.shape[0], before.shape[0])
            new = torch.cat([before[before.shape[0] - pad :], new])
        skip = [pad]

        def advance(rows: int) -> None:
            counted = max(rows - skip[0], 0)
            skip[0] = max(skip[0] - rows, 0)
            meter.advance(weight * counted * decoded)

        parts = _decode_cells(model, new, base, answer_id, metrics, top_k, on_chunk=advance)
        pad_cells = pad // base.rows
        parts = (parts[0][:, pad_cells:], *(part[pad_cells:] for part in parts[1:]))
        _fill_cells(out, cells[torch.cat(order[streamed:])], *parts)
        streamed = len(finals)
        on_cells(_one_prompt(out, prompts))

    entries, first_pos = plan.entries, plan.first_pos
    prefix = entries is not None and first_pos is not None
    corruption_names = [name for name, _ in base.stair_hooks(0)] if prefix else []
    names = [*site.hook_names(n_layer), *corruption_names] if prefix else []
    batches = list(zip(plan.batches, plan.batch_token_layers, strict=True))
    if on_cells is not None and prefix:
        # Streamed, the cheap stairs (late positions: few positions per row) go first,
        # so that the first cells show soonest; batches are independent.
        batches.reverse()
    with _switchboard(model, names) as switches:
        for members, work in batches:
            if entries is None or first_pos is None:  # the full strategy
                masks = _cell_masks(site, cells[members, 1:], n_pos, decoded)
                finals.append(
                    _last(
                        forward_cells(model, base, site, windows[members], masks, source)[
                            FINAL_RESID
                        ],
                        decoded,
                    )
                )
            else:
                pos = int(first_pos[members[0]])
                finals.append(
                    _run_stair(
                        model,
                        pos,
                        entries[members],
                        windows[members],
                        # Built per batch: a per-unit mask of every cell at once can be large.
                        _cell_masks(site, cells[members, 1:], n_pos, decoded),
                        site,
                        source,
                        base_state,
                        samples,
                        switches,
                        base.stair_hooks(pos),
                        decoded,
                    )
                )
            order.append(members)
            meter.advance(work, decides=True)
            stream(last=False)
    if on_cells is not None:
        stream(last=True)
    elif order:
        decoded_cells = _decode_cells(
            model,
            torch.cat(finals),
            base,
            answer_id,
            metrics,
            top_k,
            on_chunk=lambda rows: meter.advance(weight * rows * decoded),
        )
        _fill_cells(out, cells[torch.cat(order)], *decoded_cells)
    return _one_prompt(out, prompts)


def _one_prompt(out: SweepOutput, prompts: int) -> SweepOutput:
    """The outputs without their ``prompt`` axis when one prompt was swept."""
    if prompts != 1:
        return out
    return SweepOutput(
        out.scores[..., 0],
        out.top_ids[..., 0, :],
        out.top_probs[..., 0, :],
        None if out.token_log_probs is None else out.token_log_probs[..., 0, :],
    )


def _base_logits(
    model: torch.nn.Module, state: CorruptedRun, decoded: int
) -> Float[Tensor, "samples k d_vocab"]:
    """The base run's float32 logits of its ``decoded`` positions (a copy)."""
    if decoded == 1:
        return state.logits.float()[:, None].clone()
    final = _base_finals(state)
    return decode_resid(model, final.flatten(0, 1)).unflatten(0, tuple(final.shape[:2])).float()


def _base_finals(state: CorruptedRun) -> Float[Tensor, "samples k d_model"]:
    if state.final_resid is None:
        raise RuntimeError(
            "a sweep of an answer of several tokens needs the base run's final residuals "
            "(corrupted_run(..., decoded=k)); this is a bug in lenscope"
        )
    return state.final_resid


@dataclasses.dataclass(frozen=True)
class SweepEstimate:
    """The work of one or more sweeps, counted before they run.

    Attributes:
        cells: Cells requested.
        batches: Forward passes (batches) they run in.
        token_layers: ``(row, position, block)`` triples computed, the unit
            a forward pass's time is roughly proportional to.
        decoded_rows: Final residuals decoded through the unembedding.
    """

    cells: int
    batches: int
    token_layers: int
    decoded_rows: int = 0

    def __add__(self, other: "SweepEstimate") -> "SweepEstimate":
        """The work of both."""
        return SweepEstimate(
            self.cells + other.cells,
            self.batches + other.batches,
            self.token_layers + other.token_layers,
            self.decoded_rows + other.decoded_rows,
        )


def estimate_sweep(
    model: torch.nn.Module,
    *,
    site: Site,
    window: int,
    cells: Int[Tensor, "cell axis"],
    corrupted: CorruptedInput,
    strategy: str,
    batch_size: int | None,
    decoded: int = 1,
) -> SweepEstimate:
    """Count the forward passes and token-layers :func:`sweep` would run, without running them.

    Same arguments as :func:`sweep` (``decoded``: the answer's tokens, each
    a decoded row); the batches are planned by the same code.
    """
    plan = _plan_sweep(model, site, window, cells, corrupted, strategy, batch_size, decoded)
    rows = int(plan.active.sum()) * corrupted.rows * decoded
    return SweepEstimate(len(cells), len(plan.batches), plan.token_layers, rows)


def run_units(model: torch.nn.Module, n_pos: int, rows: int, decoded: int = 1) -> float:
    """Units (:mod:`lenscope.progress`) of ``rows`` copies of an ``n_pos``-token prompt run whole.

    Each copy's last ``decoded`` positions are decoded (1: the last one).
    """
    return rows * (n_pos * n_layers(model) + decoded * decode_weight(model, n_pos))


def trace_meter(
    model: torch.nn.Module,
    sites: Sequence[Site],
    windows: Mapping[str, int],
    cells: Int[Tensor, "cell axis"] | Mapping[str, Tensor],
    base: CorruptedInput,
    runs: Sequence[int],
    *,
    strategy: str,
    batch_size: int | None,
    progress: bool,
    description: str = "trace",
    decoded: int = 1,
    foil: tuple[CorruptedInput, int] | None = None,
    more: Sequence[tuple[CorruptedInput, int]] = (),
) -> TraceMeter:
    """The :class:`~lenscope.progress.TraceMeter` of a trace: all its work, counted in advance.

    The work is the whole-prompt runs before the sweeps (``runs``: their rows,
    the clean run's first: it is the warm-up) and each site's sweep
    (:func:`estimate_sweep`), every run's decoded rows weighted by
    :func:`~lenscope.progress.decode_weight`. When the first sweep batch
    shows that the trace will take over
    :data:`~lenscope.progress.LONG_TRACE_SECONDS`, a ``UserWarning`` says so,
    with the counts and how to trace fewer cells.

    Args:
        model: The model.
        sites: The sites, one sweep each.
        windows: ``{site name: window}``.
        cells: The cells each sweep patches, or ``{site name: cells}``.
        base: The run the sweeps patch (the bound corruption when denoising).
        runs: Rows of each whole-prompt run before the sweeps, in order.
        strategy: ``"prefix"`` or ``"full"``.
        batch_size: Rows per forward pass, or None for automatic.
        progress: Show the progress bar.
        description: The bar's label until the first sweep relabels it.
        decoded: Positions each row decodes (an answer's tokens, teacher-forced).
        foil: A foil scored in runs and sweeps of its own (teacher-forced):
            their base (ending with the foil's first tokens) and the foil's
            length. Its whole-prompt runs have the rows of ``runs``.
        more: Further runs and sweeps of their own, as ``foil`` (an answer
            set's groups of members after the first).
    """
    n_layer = n_layers(model)
    per_site = cells if isinstance(cells, Mapping) else {where.name: cells for where in sites}
    total = SweepEstimate(0, 0, 0)
    units = 0.0
    for run_base, run_decoded in [(base, decoded), *([foil] if foil is not None else []), *more]:
        n_pos = int(run_base.tokens.shape[1])
        work = SweepEstimate(0, 0, 0)
        for where in sites:
            work += estimate_sweep(
                model,
                site=where,
                window=windows[where.name],
                cells=per_site[where.name],
                corrupted=run_base,
                strategy=strategy,
                batch_size=batch_size,
                decoded=run_decoded,
            )
        units += (
            sum(run_units(model, n_pos, rows, run_decoded) for rows in runs)
            + work.token_layers
            + decode_weight(model, n_pos) * work.decoded_rows
        )
        total += work
    kinds = len(sites)
    plural = "s" if kinds != 1 else ""
    counted = (
        f"{total.cells:,} cells of {kinds} kind{plural}"
        if isinstance(cells, Mapping)
        else f"{len(cells):,} cells x {kinds} kind{plural} = {total.cells:,} cells"
    )

    def on_long(seconds: float) -> None:
        rate = meter.seconds_per_unit() or 0.0
        warn(
            f"this trace will take about {duration(seconds)}: {counted} in "
            f"{total.batches:,} forward passes, {total.token_layers:,} token-layers and "
            f"{total.decoded_rows:,} decoded rows, at the speed its first forward passes ran "
            f"({rate * 1e3:.3g} ms per token-layer); to trace fewer cells pass "
            f"positions='subject' (or positions='from_subject', or a list of positions) and a "
            f"range of layers such as layers=range(0, {max(1, n_layer // 2)}), or fewer "
            "samples=..."
        )

    meter = TraceMeter(units, progress=progress, description=description, on_long=on_long)
    return meter


def forward_cells(
    model: torch.nn.Module,
    corrupted: CorruptedInput,
    site: Site,
    windows: Bool[Tensor, "cell layer"],
    masks: Bool[Tensor, "cell pos ..."],
    source: Mapping[str, Float[Tensor, "src ..."]],
    capture: Sequence[str] = (),
    *,
    clone: bool = False,
) -> dict[str, Tensor]:
    """Run copies of the base run, one per ``(cell, sample)``, patching each cell.

    Cell ``c`` patches ``site`` where ``masks[c]`` is true, at the layers
    where ``windows[c]`` is (a row of False patches nothing: the base run
    itself). The forward pass stops at the last block's ``resid_post``.

    Args:
        model: The model.
        corrupted: The base run (the bound corruption, when denoising).
        site: Where to patch.
        windows: Layers each cell patches.
        masks: Where each cell patches, as ``site.cell_mask`` gives it.
        source: The patched-in activations at ``site``, ``[1 or samples, pos, ...]``
            per hook name (see :func:`sweep`).
        capture: Further hook points whose activations to return; they are
            read after the restoration.
        clone: Return copies of the captured activations.

    Returns:
        ``{name: activation}`` for ``capture`` and :data:`FINAL_RESID`
        (``[row, pos, d_model]``, rows cell-major).
    """
    samples = corrupted.rows
    device = corrupted.tokens.device
    hooks = list(corrupted.fwd_hooks)
    for layer, name in enumerate(site.hook_names(n_layers(model))):
        restore = windows[:, layer]
        if not restore.any():
            continue
        mask = _rows(masks & _per_cell(restore, masks.ndim), samples)
        hooks.append((name, site.restore_hook(source[name], mask.to(device))))
    inputs = corrupted.batch_tokens(windows.shape[0])
    return capture_forward(model, inputs, hooks, capture, clone=clone)


def _empty_output(
    n_metrics: int, shape: tuple[int, ...], top_k: int, split: int | None = None
) -> SweepOutput:
    """NaN-filled outputs; ``split``: the width of ``token_log_probs`` (None: none)."""
    return SweepOutput(
        scores=torch.full((n_metrics, *shape), float("nan")),
        top_ids=torch.full((*shape, top_k), -1, dtype=torch.long),
        top_probs=torch.full((*shape, top_k), float("nan")),
        token_log_probs=None if split is None else torch.full((*shape, split), float("nan")),
    )


def _fill_cells(
    out: SweepOutput,
    cells: Int[Tensor, "cell axis"],
    scores: Float[Tensor, "metric cell prompt"],
    top_ids: Int[Tensor, "cell prompt k"],
    top_probs: Float[Tensor, "cell prompt k"],
    token_log_probs: Float[Tensor, "cell prompt answer"] | None = None,
) -> None:
    """Write per-cell results into ``out`` (cells index its leading axes)."""
    index = tuple(cells.T)
    out.scores[(slice(None), *index)] = scores.cpu()
    out.top_ids[index] = top_ids.cpu()
    out.top_probs[index] = top_probs.cpu()
    if out.token_log_probs is not None and token_log_probs is not None:
        out.token_log_probs[index] = token_log_probs.cpu()


STREAM_ROWS = 32
"""A streamed sweep (``sweep(on_cells=...)``) decodes once this many rows have finished."""

# Float32 logits decoded at once: large enough for an efficient unembedding
# matmul, small enough to stay well inside the memory budget.
_DECODE_BYTES = 1 << 30


def _decode_cells(
    model: torch.nn.Module,
    finals: Float[Tensor, "row d_model"] | Float[Tensor, "row answer d_model"],
    base: CorruptedInput,
    answer_id: int | Int[Tensor, " prompt"] | Sequence[int] | Members,
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[Tensor, ...]:
    """Decode final residuals (``base.rows`` rows per cell) in chunks of whole cells.

    For an answer of several tokens each row holds the final residuals of
    its decoded positions, and a fourth tensor, each token's log-probability
    (``[cell, prompt, answer]``, means over samples), comes back too.
    ``on_chunk(rows)`` is called after each chunk (progress).
    """
    rows = base.rows
    decoded = answer_length(answer_id)
    most_cells = max(1, _DECODE_BYTES // (4 * model.cfg.d_vocab * rows * decoded))
    n_cells = finals.shape[0] // rows
    n_chunks = -(-n_cells // most_cells)
    chunk_rows = rows * -(-n_cells // n_chunks)  # equal chunks: no small, slow last one
    parts = []
    for i in range(0, finals.shape[0], chunk_rows):
        chunk = finals[i : i + chunk_rows]
        if decoded == 1 and not isinstance(answer_id, Members):
            parts.append(_score_cells(decode_resid(model, chunk), base, answer_id, metrics_, top_k))
        else:
            flat = chunk.reshape(-1, chunk.shape[-1])
            logits = decode_resid(model, flat).unflatten(0, (-1, decoded))
            parts.append(
                tuple(
                    x[:, None] if j else x[:, :, None]
                    for j, x in enumerate(
                        _score_sequence(logits, base.samples, answer_id, metrics_, top_k)  # type: ignore[arg-type]
                    )
                )
            )
        if on_chunk is not None:
            on_chunk(chunk.shape[0])
    joined = zip(*parts, strict=True)
    return (torch.cat(next(joined), dim=1), *(torch.cat(part) for part in joined))


def _score_sequence(
    logits: Float[Tensor, "row answer d_vocab"],
    samples: int,
    answer_ids: Sequence[int] | Members,
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
) -> tuple[
    Float[Tensor, "metric cell"],
    Int[Tensor, "cell k"],
    Float[Tensor, "cell k"],
    Float[Tensor, "cell split"],
]:
    """:func:`_score_rows` of an answer of several tokens, teacher-forced.

    ``logits[:, j]`` predicts the answer's token ``j``. ``prob`` and
    ``log_prob`` are the whole answer's (``log_prob`` the sum over its
    tokens); metrics the engine calls, and the top-k, see the first position
    (the next-token distribution after the prompt). Also returns each
    token's log-probability, averaged over samples. ``logits`` is overwritten.
    """
    if isinstance(answer_ids, Members):
        return _score_members(logits, samples, answer_ids, metrics_, top_k)
    ids = torch.tensor(list(answer_ids), device=logits.device)
    per_token = _token_log_probs(logits, ids)
    scores, top_ids, top_probs = _score_rows(
        logits[:, 0], samples, int(ids[0]), metrics_, top_k, sequence_log_prob=per_token.sum(1)
    )
    split = einops.reduce(per_token, "(cell sample) k -> cell k", "mean", sample=samples)
    return scores, top_ids, top_probs, split


def _score_members(
    logits: Float[Tensor, "row answer d_vocab"],
    samples: int,
    members: Members,
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
) -> tuple[
    Float[Tensor, "metric cell"],
    Int[Tensor, "cell k"],
    Float[Tensor, "cell k"],
    Float[Tensor, "cell split"],
]:
    """:func:`_score_rows` of an answer set's members decoded from one run.

    ``prob``/``log_prob`` are the set's: the log-sum-exp of the members'
    teacher-forced log-probabilities, per row. The fourth tensor holds each
    row's log-probability of each member (``[cell, sample * member]``).
    ``logits`` is overwritten.
    """
    per_member = member_log_probs(logits, members.ids)
    scores, top_ids, top_probs = _score_rows(
        logits[:, 0],
        samples,
        members.ids[0][0],
        metrics_,
        top_k,
        sequence_log_prob=torch.logsumexp(per_member, dim=1),
    )
    rows = einops.rearrange(per_member, "(cell sample) m -> cell (sample m)", sample=samples)
    return scores, top_ids, top_probs, rows


def member_log_probs(
    logits: Float[Tensor, "row answer d_vocab"], members: Sequence[Sequence[int]]
) -> Float[Tensor, "row member"]:
    """Each row's teacher-forced log-probability of each member (:func:`_token_log_probs`'s sums).

    Member ``m``'s token ``j`` is read at position ``j``; the logits are not
    overwritten, and each position's normaliser is computed once.
    """
    top, log_total = _normalizers(logits)
    out = []
    for member in members:
        value = torch.zeros(logits.shape[0], device=logits.device)
        for j, token in enumerate(member):
            value = value + (logits[:, j, token] - top[:, j] - log_total[:, j])
        out.append(value)
    return torch.stack(out, dim=1)


def _normalizers(
    logits: Float[Tensor, "row answer d_vocab"],
) -> tuple[Float[Tensor, "row answer"], Float[Tensor, "row answer"]]:
    """Each position's maximum logit and log of its sum of ``exp(logit - maximum)``.

    The float32 arithmetic of :func:`lenscope.metrics.softmax_` (exponentials
    clamped at ``EXP_FLOOR``), so that ``logit - top - log_total`` is the
    log-probability :func:`_score_rows` computes; the logits are not
    overwritten. One position at a time in one scratch buffer: ``1 / answer``
    of the decoded chunk, allocated once (fresh memory per position cost as
    much as the arithmetic).
    """
    scratch = torch.empty_like(logits[:, 0])
    tops, totals = [], []
    for j in range(logits.shape[1]):
        position = logits[:, j]
        top = position.max(dim=-1, keepdim=True).values
        torch.sub(position, top, out=scratch).clamp_(min=metrics.EXP_FLOOR).exp_()
        tops.append(top[:, 0])
        totals.append(scratch.sum(dim=-1).log())
    return torch.stack(tops, dim=1), torch.stack(totals, dim=1)


def _token_log_probs(
    logits: Float[Tensor, "row answer d_vocab"], ids: Int[Tensor, " answer"]
) -> Float[Tensor, "row answer"]:
    """Each position's log-probability of its answer token, as :func:`_score_rows` computes one.

    See :func:`_normalizers`; the logits are not overwritten.
    """
    top, log_total = _normalizers(logits)
    picked = logits.gather(2, ids.expand(logits.shape[0], -1)[..., None])[..., 0]
    return picked - top - log_total


def _score_cells(
    logits: Float[Tensor, "row d_vocab"],
    base: CorruptedInput,
    answer_id: int | Int[Tensor, " prompt"],
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
) -> tuple[
    Float[Tensor, "metric cell prompt"],
    Int[Tensor, "cell prompt k"],
    Float[Tensor, "cell prompt k"],
]:
    """:func:`_score_rows` of whole cells of ``base`` (rows ``(cell, prompt, sample)``)."""
    samples, prompts = base.samples, base.prompts
    if isinstance(answer_id, Tensor):
        if answer_id.shape != (prompts,):
            raise ValueError(
                f"expected one answer per packed prompt ({prompts}), got {tuple(answer_id.shape)}"
            )
        answer_id = einops.repeat(
            answer_id.to(logits.device),
            "prompt -> (cell prompt sample)",
            cell=logits.shape[0] // base.rows,
            sample=samples,
        )
    scores, top_ids, top_probs = _score_rows(logits, samples, answer_id, metrics_, top_k)
    return (
        einops.rearrange(scores, "metric (cell prompt) -> metric cell prompt", prompt=prompts),
        einops.rearrange(top_ids, "(cell prompt) k -> cell prompt k", prompt=prompts),
        einops.rearrange(top_probs, "(cell prompt) k -> cell prompt k", prompt=prompts),
    )


def score_copies(
    logits: Float[Tensor, "samples d_vocab"],
    answer_id: int,
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
) -> tuple[list[float], Int[Tensor, " k"], Float[Tensor, " k"]]:
    """Each metric averaged over copies; top-k ids and probabilities of their mean distribution.

    The clean and corrupted runs are scored with the same code as every
    patched cell, so a cell that restores everything scores exactly clean.
    """
    scores, top_ids, top_probs = _score_rows(
        logits.float().clone(), logits.shape[0], answer_id, metrics_, top_k
    )
    return scores[:, 0].tolist(), top_ids[0], top_probs[0]


def score_sequence_copies(
    logits: Float[Tensor, "samples answer d_vocab"],
    answer_ids: Sequence[int],
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
) -> tuple[list[float], Int[Tensor, " k"], Float[Tensor, " k"], Float[Tensor, " answer"]]:
    """:func:`score_copies` of an answer of several tokens, teacher-forced.

    ``logits[:, j]`` predicts the answer's token ``j``; also returns each
    token's log-probability, averaged over copies.
    """
    scores, top_ids, top_probs, split = _score_sequence(
        logits.float().clone(), logits.shape[0], answer_ids, metrics_, top_k
    )
    return scores[:, 0].tolist(), top_ids[0], top_probs[0], split[0]


def _score_rows(
    logits: Float[Tensor, "row d_vocab"],
    samples: int,
    answer_id: int | Int[Tensor, " row"],
    metrics_: Sequence[BoundMetric | PatchingMetric],
    top_k: int,
    sequence_log_prob: Float[Tensor, " row"] | None = None,
) -> tuple[Float[Tensor, "metric cell"], Int[Tensor, "cell k"], Float[Tensor, "cell k"]]:
    """Per-cell metrics (means over samples) and top-k of the mean next-token distribution.

    ``logits`` holds ``samples`` consecutive rows per cell and is overwritten:
    one softmax, computed in place, serves the probability metrics and the
    top-k; every other metric reads the logits before it. ``answer_id`` is
    one token, or one per row (packed prompts; probability metrics only).
    ``sequence_log_prob``: each row's log-probability of a whole answer of
    several tokens, which ``prob`` and ``log_prob`` then report.
    """
    per_copy: dict[int, Tensor] = {}
    per_row = isinstance(answer_id, Tensor)
    answer_logit = _answer_column(logits, answer_id).clone()
    bound = [metrics.as_bound(metric) for metric in metrics_]
    for i, metric in enumerate(bound):
        if metric.reads is None:
            if per_row:
                raise InvalidInput(
                    f"packed prompts are scored with prob or log_prob only, got "
                    f"{metric.name!r}; trace prompts one at a time for other metrics "
                    "(prompts_per_batch=1)"
                )
            # A copy: the softmax below overwrites ``logits``, which the
            # metric's result may be a view of.
            per_copy[i] = metric.fn(logits, answer_id).float().clone()
    probs, top, total = metrics.softmax_(logits)
    for i, metric in enumerate(bound):
        if metric.reads == "prob":
            per_copy[i] = (
                _answer_column(probs, answer_id)
                if sequence_log_prob is None
                else sequence_log_prob.exp()
            )
        elif metric.reads == "log_prob":
            per_copy[i] = (
                answer_logit - top[:, 0] - total[:, 0].log()
                if sequence_log_prob is None
                else sequence_log_prob
            )
    stacked = torch.stack([per_copy[i] for i in range(len(bound))])
    scores = einops.reduce(stacked, "metric (cell sample) -> metric cell", "mean", sample=samples)
    mean_probs = einops.reduce(probs, "(cell sample) v -> cell v", "mean", sample=samples)
    best = mean_probs.topk(top_k, dim=-1)
    return scores, best.indices, best.values


def _answer_column(
    values: Float[Tensor, "row d_vocab"], answer_id: int | Int[Tensor, " row"]
) -> Float[Tensor, " row"]:
    """Each row's entry at its answer token (one token for all rows, or one per row)."""
    if isinstance(answer_id, Tensor):
        return values.gather(1, answer_id[:, None])[:, 0]
    return values[:, answer_id]
