"""Time a full causal trace: lenscope against causal-tracer, a plain loop and the minimal work.

One run loads one model and times, on the same weights, prompt, noise and
settings (ROME's causal tracing, Meng et al., 2022, arXiv 2202.05262):

* lenscope: ``CausalTracer.trace_kinds`` for each kind (``resid_post`` window
  1, ``mlp_out`` and ``attn_out`` window 10) and for the three together;
* causal-tracer 1.1.0 (``pip install --no-deps causal-tracer==1.1.0``: it pins
  ``transformers<5`` but runs on 5.x), on the Hugging Face model holding the
  same weights, told the same absolute noise std (and, by default, handed the
  very same noise draws);
* a plain loop: one ``run_with_hooks`` per ``(layer, pos)`` cell on the
  TransformerLens model with full logits, as a first implementation would do
  it (``--plain-cells N`` times N random cells per kind and extrapolates);
* the minimal work: the token-layers a trace cannot avoid (restoring cell
  ``(l, t)`` changes nothing before its first restored layer nor before
  position ``t``), pushed through plain batched forwards with
  ``start_at_layer``/``stop_at_layer``, plus the last-position decoding of
  every copy (a lower bound on a TransformerBridge: see :func:`run_minimal`).

The TransformerLens model is the installed version's default class, as
``lenscope.load_model`` gives it: a ``HookedTransformer`` on TransformerLens
3.9, a compatibility-mode ``TransformerBridge`` on TransformerLens 4 (where
lenscope can only use its ``"full"`` strategy). The report names the class,
the TransformerLens version and the lenscope strategy.

It checks that the tools compute the same thing (the plain loop exactly,
causal-tracer up to float error, or sampling error with ``--ct-noise own``)
and prints a markdown table of median times, ratios and peak memory; ``--out``
writes it with the machine details to a report.

Peak memory is measured per phase inside one process: Linux's peak-RSS
counter (``VmHWM``) is reset through ``/proc/self/clear_refs`` before each
phase and read after it, relative to the resident size when the phase starts
(so the loaded models are not counted); on CUDA, ``max_memory_allocated``
above the allocation at the start.

Examples:
    python benchmarks/bench_trace.py                        # offline Gemma-3-270m, CPU
    python benchmarks/bench_trace.py --plain-cells 20 --out docs/benchmarks.md
    python benchmarks/bench_trace.py --model random-gemma-3-270m --threads 2
    python benchmarks/bench_trace.py --model gpt2-medium    # needs the HF hub
    python benchmarks/bench_trace.py --model random-gpt2-xl --device cuda
    python benchmarks/bench_trace.py --model random-gpt2-tiny --repeats 1 --plain-cells 2  # smoke
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
KINDS = ("resid_post", "mlp_out", "attn_out")
WINDOWS = {"resid_post": 1, "mlp_out": 10, "attn_out": 10}
# causal-tracer's names for the same hook points: a decoder layer's output is
# resid_post; its MLP / self-attention outputs restore exactly as mlp_out /
# attn_out do (a post-norm, where a model has one, acts on each position alone).
CT_KINDS = {"resid_post": "hidden", "mlp_out": "mlp", "attn_out": "attention"}
# GPT-2's shapes, for a random-weight model of that size (no download); "tiny"
# keeps GPT-2 small's depth, layout and vocabulary at width 64, for smoke runs,
# with weights drawn wide enough that its next-token distribution is not flat
# (at GPT-2's 0.02 every probability is ~1/50257 and the agreement checks pass
# trivially).
GPT2_SIZES = {
    "tiny": dict(n_layers=12, d_model=64, n_heads=4, initializer_range=0.5),
    "small": dict(n_layers=12, d_model=768, n_heads=12),
    "medium": dict(n_layers=24, d_model=1024, n_heads=16),
    "large": dict(n_layers=36, d_model=1280, n_heads=20),
    "xl": dict(n_layers=48, d_model=1600, n_heads=25),
}


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """The models and the prompt every tool traces."""

    name: str
    model: Any  # HookedTransformer (TransformerLens 3.9) or TransformerBridge (4.x)
    hf_model: Any  # a plain Hugging Face model with the same weights, for causal-tracer
    hf_tokenizer: Any
    prompt: str | Tensor  # what lenscope is given (text, or ids for a tokenizer-less model)
    subject: str | tuple[int, int]
    ct_prompt: str  # the same tokens as text for causal-tracer's tokenizer
    ct_subject: str
    tokens: Int[Tensor, " pos"]
    ct_layer_config: Any = None  # set by main when causal-tracer runs: see ct_layer_config


def load_setup(name: str, device: str, dtype: torch.dtype) -> Setup:
    """Load ``name`` in the installed TransformerLens' default class, plus an HF model.

    The TransformerLens model is a ``HookedTransformer`` on TransformerLens 3.9
    and a compatibility-mode ``TransformerBridge`` on 4.x; the Hugging Face
    model holds the same weights, unwrapped, for causal-tracer.
    """
    if name.startswith("random-gpt2"):
        return _random_gpt2(name, device, dtype)
    if name == "random-gemma-3-270m":
        return _random_gemma(device, dtype)
    if name in ("gemma-3-270m", "google/gemma-3-270m"):
        return _offline_gemma(device, dtype)
    return _hub_model(name, device, dtype)


def _text_setup(name, model, hf_model, tokenizer) -> Setup:
    import lenscope.tokens

    tokens = model.to_tokens(PROMPT)[0]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][0].to(tokens.device)
    if not torch.equal(ids, tokens):
        raise RuntimeError(
            f"TransformerLens and the HF tokenizer disagree on the prompt's tokens: "
            f"{tokens.tolist()} vs {ids.tolist()}; the tools would trace different inputs"
        )
    lenscope.tokens.find_subject(model, tokens, SUBJECT)
    return Setup(name, model, hf_model, tokenizer, PROMPT, SUBJECT, PROMPT, SUBJECT, tokens)


def _offline_gemma(device: str, dtype: torch.dtype) -> Setup:
    """Gemma-3-270m from the offline GGUF package, through ``lenscope.loading``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lenscope import loading

    model = loading.load_model("gemma-3-270m", device=device, dtype=dtype)
    # The Hugging Face checkpoint load_model converted the GGUF file into:
    # causal-tracer runs on exactly the weights the TransformerLens model was built from.
    checkpoint = loading._ensure_offline_checkpoint(loading._import_offline_package())
    hf_model = (
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        .to(device)
        .eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    return _text_setup("gemma-3-270m", model, hf_model, tokenizer)


def _hub_model(name: str, device: str, dtype: torch.dtype) -> Setup:
    """A model from the Hugging Face hub (needs the network), e.g. ``gpt2-medium``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lenscope
    from lenscope import compat

    if compat.has_hooked_transformer():
        from transformer_lens.loading_from_pretrained import get_official_model_name
    else:
        from transformer_lens.supported_models import get_official_model_name

    official = get_official_model_name(name)
    hf_model = AutoModelForCausalLM.from_pretrained(official, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(official)
    if compat.has_hooked_transformer():
        from transformer_lens import HookedTransformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer.from_pretrained(
                official, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
    else:
        # A bridge wraps the HF model it is given in place, so it loads its own.
        model = lenscope.load_model(official, device=device, dtype=dtype)
    return _text_setup(name, model.eval(), hf_model, tokenizer)


def ct_layer_config(hf_model: Any, name: str) -> Any:
    """causal-tracer's LayerConfig for ``hf_model``: where its layers, MLPs and attention are."""
    from causal_tracer.causal_tracing.LayerConfig import get_layer_config

    try:
        return get_layer_config(hf_model)
    except ValueError:
        # causal-tracer knows GPT-2, GPT-J and Llama by name; most newer decoders
        # (Gemma, Mistral, Qwen, ...) use Llama's module paths.
        return _llama_style_layer_config(hf_model, name)


def _llama_style_layer_config(hf_model: Any, name: str) -> Any:
    """causal-tracer's LayerConfig for models laid out as ``model.layers[i].{self_attn,mlp}``."""
    from causal_tracer import LayerConfig

    modules = dict(hf_model.named_modules())
    needed = ["model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp"]
    if any(path not in modules for path in needed):
        raise ValueError(
            f"causal-tracer needs a LayerConfig for {name!r}, whose modules are not laid out "
            f"as {needed}; pass --skip-causal-tracer, or add its LayerConfig to this script"
        )
    return LayerConfig(
        hidden_layers_matcher="model.layers.{num}",
        attention_layers_matcher="model.layers.{num}.self_attn",
        mlp_layers_matcher="model.layers.{num}.mlp",
        embedding_layer="model.embed_tokens",
    )


def _word_tokenizer(d_vocab: int) -> Any:
    """A tokenizer mapping the word ``w{i}.`` to id ``i``, for causal-tracer's text API."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}.": i for i in range(d_vocab - 1)}
    vocab["<|endoftext|>"] = d_vocab - 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _bridge_around(
    name: str, hf_model: Any, tokenizer: Any, device: str, dtype: torch.dtype
) -> Any:
    """A compatibility-mode TransformerBridge (TransformerLens 4) around a copy of ``hf_model``.

    Booting wraps the model it is given in place: its modules become bridge
    components running the processed (folded, centred) weights with hook
    points on every call. The bridge therefore gets a deep copy, and
    causal-tracer keeps the plain Hugging Face model with the original
    weights (the same logits up to a constant per position, so the same
    probabilities).
    """
    import copy

    from lenscope import compat
    from lenscope.loading import _compatible

    wrapped = copy.deepcopy(hf_model)
    wrapped.config.architectures = [type(hf_model).__name__]
    # The bridge reads hooks off HF's eager attention (lenscope.load_model does the same).
    wrapped.set_attn_implementation("eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = compat.bridge_class().boot_transformers(
            name, hf_model=wrapped, tokenizer=tokenizer, device=device, dtype=dtype
        )
        return _compatible(model).eval()


def _random_gpt2(name: str, device: str, dtype: torch.dtype) -> Setup:
    """GPT-2 with random weights (``random-gpt2-xl`` etc.), identical in HF and TransformerLens.

    No tokenizer and no download: the prompt is 10 random token ids and the
    subject is positions 1 to 3, as in the Eiffel Tower prompt. On
    TransformerLens 4 the model is a TransformerBridge around the HF model.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from lenscope import compat

    size = name.removeprefix("random-gpt2").lstrip("-") or "small"
    if size not in GPT2_SIZES:
        raise ValueError(
            f"--model random-gpt2-SIZE needs SIZE in {sorted(GPT2_SIZES)}, got {name!r}"
        )
    dims = GPT2_SIZES[size]
    d_vocab, n_ctx = 50257, 1024
    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=d_vocab,
        n_positions=n_ctx,
        n_embd=dims["d_model"],
        n_layer=dims["n_layers"],
        n_head=dims["n_heads"],
        initializer_range=dims.get("initializer_range", 0.02),
    )
    with torch.device(device):
        hf_model = GPT2LMHeadModel(hf_config).to(dtype).eval()
    tokenizer = _word_tokenizer(d_vocab)
    if not compat.has_hooked_transformer():
        model = _bridge_around(name, hf_model, tokenizer, device, dtype)
        return _id_setup(name, model, hf_model, tokenizer)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    cfg = HookedTransformerConfig(
        n_layers=dims["n_layers"],
        d_model=dims["d_model"],
        n_heads=dims["n_heads"],
        d_head=dims["d_model"] // dims["n_heads"],
        d_mlp=4 * dims["d_model"],
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=False,
        device=device,
        dtype=dtype,
        model_name=name,
        original_architecture="GPT2LMHeadModel",
        init_weights=False,  # the weights come from the HF model below
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    # No folding or centring: the HookedTransformer holds HF's weights as they are.
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.setup()
    return _id_setup(name, model.eval(), hf_model, tokenizer)


def _random_gemma(device: str, dtype: torch.dtype) -> Setup:
    """Gemma-3-270m's architecture with random weights: its exact shapes, nothing downloaded.

    On TransformerLens 4 the model is a TransformerBridge around the HF model.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lenscope import compat

    torch.manual_seed(0)
    sliding, full = "sliding_attention", "full_attention"
    hf_config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        sliding_window=512,
        layer_types=([sliding] * 5 + [full]) * 3,
        rms_norm_eps=1e-6,
        rope_parameters={
            full: {"rope_theta": 1e6, "rope_type": "default"},
            sliding: {"rope_theta": 1e4, "rope_type": "default"},
        },
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        architectures=["Gemma3ForCausalLM"],
    )
    with torch.device(device):
        hf_model = Gemma3ForCausalLM(hf_config).to(dtype).eval()
    tokenizer = _word_tokenizer(hf_config.vocab_size)
    if compat.has_hooked_transformer():
        from transformer_lens import HookedTransformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # TransformerLens knows this architecture by name, so nothing is fetched.
            model = HookedTransformer.from_pretrained(
                "google/gemma-3-270m",
                hf_model=hf_model,
                tokenizer=tokenizer,
                device=device,
                dtype=dtype,
            )
    else:
        model = _bridge_around("random-gemma-3-270m", hf_model, tokenizer, device, dtype)
    return _id_setup("random-gemma-3-270m", model.eval(), hf_model, tokenizer)


def _id_setup(name: str, model: Any, hf_model: Any, tokenizer: Any) -> Setup:
    """A 10-token prompt of random ids, subject at positions 1-3 as in the Eiffel Tower prompt."""
    generator = torch.Generator().manual_seed(0)
    d_vocab = model.cfg.d_vocab
    tokens = torch.randint(0, d_vocab - 1, (10,), generator=generator).to(model.cfg.device)
    ct_prompt = " ".join(f"w{i}." for i in tokens.tolist())
    ct_subject = " ".join(f"w{i}." for i in tokens[1:4].tolist())
    return Setup(name, model, hf_model, tokenizer, tokens, (1, 4), ct_prompt, ct_subject, tokens)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Wall-clock times of the repeats of one phase and its peak memory above the start."""

    seconds: list[float]
    peak_rss: int  # bytes above the resident size at the start of the phase
    peak_gpu: int  # bytes of CUDA memory allocated above the start (0 on CPU)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        # Hand freed heap pages back to the OS, so the next phase's peak starts clean.
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[Timing, Any]:
    """Run ``fn`` ``repeats`` times; return the timings and the last result."""
    seconds: list[float] = []
    peak_rss = peak_gpu = 0
    result = None
    for _ in range(repeats):
        result = None
        _release_memory(device)
        exact = _reset_peak_rss()
        start_rss = _status_kb("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start_gpu = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        peak_kb = _status_kb("VmHWM") if exact else _status_kb("VmRSS")
        peak_rss = max(peak_rss, (peak_kb - start_rss) * 1024)
        if device.type == "cuda":
            peak_gpu = max(peak_gpu, torch.cuda.max_memory_allocated(device) - start_gpu)
    return Timing(seconds, peak_rss, peak_gpu), result


# --------------------------------------------------------------------------
# The cells a trace restores, and the minimal work
# --------------------------------------------------------------------------


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers ROME restores for a cell at ``layer``: ``[l - w//2, l - w//2 + w)`` clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window))


def minimal_token_layers(n_layers: int, n_pos: int, window: int, samples: int) -> dict[int, int]:
    """Token-layers of the restored runs, by first restored position ``t``.

    Cell ``(l, t)`` must run its ``samples`` copies from its first restored
    layer to the last, at positions ``t`` onwards; everything else equals the
    corrupted run.
    """
    by_pos = {}
    for t in range(n_pos):
        by_pos[t] = (
            samples
            * (n_pos - t)
            * sum(
                n_layers - window_layers(layer, window, n_layers).start for layer in range(n_layers)
            )
        )
    return by_pos


def run_minimal(
    model: Any, tokens: Int[Tensor, " pos"], kinds: Sequence[str], samples: int, max_rows: int
) -> tuple[float, int]:
    """Push the minimal token-layer count of tracing ``kinds`` through plain batched forwards.

    For each position ``t``, the ``S_t`` token-layers of length ``n_pos - t``
    run as ``S_t // n_layers`` rows through the whole stack (plus one row
    through the remainder of layers), via ``start_at_layer``/``stop_at_layer``;
    then every restored copy, the corrupted copies and the clean run are
    decoded at the last position only. It runs on the same kernels as
    lenscope (weights in TransformerLens's read order, one in-place softmax
    per decoded chunk), so the ratio measures scheduling, not kernels. One
    clean and one corrupted run of the whole prompt are included: every trace
    needs them.

    On a TransformerBridge only the whole-stack rows run, from the tokens and
    cut off after the last block's ``hook_resid_post`` as lenscope's own
    forwards are: a bridge given ``start_at_layer=k`` still executes blocks
    ``0..k-1`` and discards their output, so the remainder rows would cost a
    whole stack each. They are left out, which keeps the minimal work a lower
    bound (the second value returned counts them).

    Returns:
        The seconds spent decoding (final norm, unembedding, softmax), and the
        token-layers left out (0 on a HookedTransformer).
    """
    from lenscope import engine, metrics
    from lenscope.hooks import decode_resid, is_bridge, run_to_final_resid

    bridge = is_bridge(model)
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[0]
    embed = model.embed(tokens[None])  # realistic magnitudes; values do not change the cost
    if not bridge and getattr(model.cfg, "positional_embedding_type", "") == "standard":
        embed = embed + model.pos_embed(tokens[None])
    need: dict[int, int] = {0: (samples + 1) * n_pos * n_layers}  # clean + corrupted runs
    decode_rows = samples + 1
    for kind in kinds:
        for t, count in minimal_token_layers(n_layers, n_pos, WINDOWS[kind], samples).items():
            need[t] = need.get(t, 0) + count
        decode_rows += n_layers * n_pos * samples

    # The same kernels lenscope gets: weights in the order TransformerLens reads
    # them (CPU) and one in-place softmax per decoded chunk. Every copy is
    # decoded on its own (top-k per copy: lenscope takes it per cell).
    left_out = 0
    with engine.matmul_friendly_weights(model), torch.inference_mode():
        resid = embed[0, -1:]
        for t, count in need.items():
            length = n_pos - t
            rows, rest = divmod(count // length, n_layers)
            for start in range(0, rows, max_rows):
                size = min(max_rows, rows - start)
                if bridge:
                    batch = tokens[None, t:].expand(size, -1)
                    resid = run_to_final_resid(model, batch, [])[:1]
                else:
                    batch = embed[:, t:].expand(size, -1, -1)
                    resid = model(batch, start_at_layer=0, stop_at_layer=n_layers)[:1, -1]
            if rest and bridge:
                left_out += rest * length
            elif rest:
                model(embed[:, t:], start_at_layer=n_layers - rest, stop_at_layer=n_layers)
        _sync(resid.device)
        decode_start = time.perf_counter()
        chunk = max(1, (1 << 30) // (4 * model.cfg.d_vocab))
        resid = resid.expand(chunk, -1)
        for start in range(0, decode_rows, chunk):
            logits = decode_resid(model, resid[: min(chunk, decode_rows - start)])
            engine._score_rows(logits, 1, 0, metrics.prob, 5)
        _sync(resid.device)
    return time.perf_counter() - decode_start, left_out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lenscope_count(
    n_layers: int,
    n_pos: int,
    kinds: Sequence[str],
    samples: int,
    subject_start: int,
    strategy: str = "prefix",
) -> int:
    """Token-layers lenscope computes (restored + corrupted + clean runs).

    With the prefix strategy, fewer than :func:`minimal_count`: it also skips
    restorations that provably change nothing and, for ``resid_post``, the
    first restored block. With the full strategy (a TransformerBridge) every
    restoration that is not a provable no-op runs the whole stack at every
    position.
    """
    from lenscope import engine
    from lenscope.sites import site

    cells = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_pos))
    total = (samples + 1) * n_pos * n_layers
    for kind in kinds:
        windows = engine.effective_windows(
            engine.restore_windows(cells, WINDOWS[kind], n_layers),
            cells,
            site(kind),
            subject_start,
            n_pos,
        )
        active = windows.any(dim=1)
        if strategy == "full":
            total += samples * int(active.sum()) * n_pos * n_layers
            continue
        entries = engine._entry_layers(windows[active], site(kind))
        total += samples * int(((n_pos - cells[active, 1]) * (n_layers - entries)).sum())
    return total


def minimal_count(n_layers: int, n_pos: int, kinds: Sequence[str], samples: int) -> int:
    """Token-layers of the minimal work for ``kinds`` (restored + corrupted + clean runs)."""
    restored = sum(
        sum(minimal_token_layers(n_layers, n_pos, WINDOWS[k], samples).values()) for k in kinds
    )
    return restored + (samples + 1) * n_pos * n_layers


# --------------------------------------------------------------------------
# The tools
# --------------------------------------------------------------------------


def run_lenscope(
    tracer: Any,
    setup: Setup,
    kinds: Sequence[str],
    samples: int,
    noise: float,
    seed: int,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    return tracer.trace_kinds(
        setup.prompt,
        setup.subject,
        kinds=tuple(kinds),
        windows={k: WINDOWS[k] for k in kinds},
        samples=samples,
        noise=noise,
        seed=seed,
        layers=layers,
        progress=False,
    )


def _noise_hook(noise: Float[Tensor, "samples subject_pos d_model"], subject: tuple[int, int]):
    start, end = subject

    def hook(embed: Tensor, hook: Any) -> Tensor:
        embed = embed.clone()
        embed[:, start:end] = embed[:, start:end] + noise.to(embed.dtype)
        return embed

    return hook


def _restore_hook(clean: Float[Tensor, "pos d_model"], pos: int):
    def hook(act: Tensor, hook: Any) -> Tensor:
        act[:, pos] = clean[pos].to(act.dtype)
        return act

    return hook


def plain_trace(
    model: Any,
    tokens: Int[Tensor, " pos"],
    subject: tuple[int, int],
    kind: str,
    cells: Sequence[tuple[int, int]],
    noise: Float[Tensor, "s p d"],
    answer: int,
) -> dict[str, Any]:
    """The obvious implementation: one ``run_with_hooks`` per cell, full logits.

    Returns the clean score, the corrupted score and ``{(layer, pos): score}``.
    """
    from lenscope.hooks import hook_name

    samples = noise.shape[0]
    batch = tokens[None].expand(samples, -1)
    n_layers = model.cfg.n_layers
    names = [hook_name(kind, layer) for layer in range(n_layers)]
    with torch.inference_mode():
        clean_logits, cache = model.run_with_cache(tokens[None], names_filter=names)
        # float64 softmax: torch's float32 CPU softmax is off by up to ~4e-5 on Gemma.
        clean_score = float(torch.softmax(clean_logits[0, -1].double(), -1)[answer])
        noise_hook = ("hook_embed", _noise_hook(noise, subject))
        logits = model.run_with_hooks(batch, fwd_hooks=[noise_hook])
        corrupted = float(torch.softmax(logits[:, -1].double(), -1)[:, answer].mean())
        scores = {}
        for layer, pos in cells:
            hooks = [noise_hook] + [
                (names[j], _restore_hook(cache[names[j]][0], pos))
                for j in window_layers(layer, WINDOWS[kind], n_layers)
            ]
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            scores[(layer, pos)] = float(
                torch.softmax(logits[:, -1].double(), -1)[:, answer].mean()
            )
    return {"clean": clean_score, "corrupted": corrupted, "scores": scores}


@contextlib.contextmanager
def shared_noise(noise: Float[Tensor, "samples subject_pos d_model"], std: float) -> Iterator[None]:
    """Make causal-tracer draw lenscope's noise (it multiplies unit draws by its ``noise``)."""
    from causal_tracer.causal_tracing.AsyncTracePatchProcessor import AsyncTracePatchProcessor

    unit = (noise.double().cpu() / std).numpy() if std > 0 else noise.double().cpu().numpy()
    original = AsyncTracePatchProcessor._get_consistent_noise

    def draws(self: Any, sample_num: int, subj_len: int, layer_size: int) -> Any:
        if (subj_len, layer_size) != unit.shape[1:]:
            raise RuntimeError(
                f"causal-tracer asked for noise {subj_len}x{layer_size}, "
                f"lenscope drew {unit.shape[1:]}"
            )
        return unit[sample_num]

    AsyncTracePatchProcessor._get_consistent_noise = draws
    try:
        yield
    finally:
        AsyncTracePatchProcessor._get_consistent_noise = original


def run_causal_tracer(
    setup: Setup, kind: str, samples: int, noise_std: float, batch_size: int, device: torch.device
) -> Any:
    from causal_tracer import CausalTracer as PeerTracer

    tracer = PeerTracer(
        setup.hf_model,
        setup.hf_tokenizer,
        layer_config=setup.ct_layer_config,
        noise=noise_std,
        device=device,
    )
    return tracer.calculate_hidden_flow(
        setup.ct_prompt,
        subject=setup.ct_subject,
        kind=CT_KINDS[kind],
        window=WINDOWS[kind],
        samples=samples,
        batch_size=batch_size,
    )


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def _seconds(s: float) -> str:
    return f"{s:,.2f}" if s < 100 else f"{s:,.0f}"


def model_class(model: Any) -> str:
    """E.g. ``TransformerBridge (TransformerLens 4.3.0, compatibility mode)``."""
    from importlib.metadata import version

    mode = ", compatibility mode" if getattr(model, "compatibility_mode", False) else ""
    return f"{type(model).__name__} (TransformerLens {version('transformer-lens')}{mode})"


def machine_info(device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1) if match else cpu
    from importlib.metadata import version

    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads "
        f"{torch.get_num_threads()}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformer-lens "
        f"{version('transformer-lens')}, transformers {version('transformers')}",
    ]
    # LENSCOPE_COMMIT: for a copy of the tree without its git history (a lent GPU machine).
    commit = os.environ.get("LENSCOPE_COMMIT") or _git("rev-parse", "--short", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--", "lenscope")
        lines.append(
            f"- lenscope at commit {commit}"
            + (" with uncommitted changes in lenscope/" if dirty else "")
        )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    return lines


def _git(*args: str) -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="gemma-3-270m",
        help="gemma-3-270m (offline), a TransformerLens name (needs the hub), "
        "random-gemma-3-270m or random-gpt2-{tiny,small,medium,large,xl} "
        "(random weights, no download)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--samples", type=int, default=10, help="corrupted copies (ROME: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of lenscope and of the minimal work (median reported)",
    )
    parser.add_argument(
        "--peer-repeats",
        type=int,
        default=1,
        help="timed runs of causal-tracer and of the plain loop",
    )
    parser.add_argument("--strategy", default="auto", help="lenscope strategy: auto, prefix, full")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="lenscope copies per forward (default: automatic)",
    )
    parser.add_argument(
        "--ct-batch-size", type=int, default=32, help="causal-tracer batch size (its default: 32)"
    )
    parser.add_argument(
        "--ct-noise",
        choices=["shared", "own"],
        default="shared",
        help="shared: causal-tracer gets lenscope's noise draws (exact check); "
        "own: its own RNG at the same std (check within sampling error)",
    )
    parser.add_argument(
        "--plain-cells",
        type=int,
        default=0,
        help="time N random cells per kind in the plain loop and extrapolate (0: every cell)",
    )
    parser.add_argument("--skip-causal-tracer", action="store_true")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one three-kind lenscope trace and print the top N "
        "entries (cProfile by cumulative time, torch ops by self time)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    if not args.skip_causal_tracer:
        try:
            import causal_tracer  # noqa: F401
        except ImportError as e:  # before minutes of loading, not after
            parser.error(
                f"causal-tracer could not be imported ({e}); run pip install "
                "--no-deps causal-tracer==1.1.0 and pip install 'matplotlib>=3.7' "
                "(its plotting import), or pass --skip-causal-tracer"
            )

    if args.model in ("gemma-3-270m", "google/gemma-3-270m") or args.model.startswith("random-"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import lenscope
    from lenscope.noise import draw_noise

    log = print
    info = machine_info(device)
    t0 = time.perf_counter()
    setup = load_setup(args.model, args.device, dtype)
    if not args.skip_causal_tracer:
        setup.ct_layer_config = ct_layer_config(setup.hf_model, args.model)
    model = setup.model
    n_layers, n_pos = model.cfg.n_layers, setup.tokens.shape[0]
    log(
        f"loaded {args.model} ({n_layers} layers, {n_pos} tokens) in "
        f"{time.perf_counter() - t0:.0f} s"
    )

    tracer = lenscope.CausalTracer(
        model, strategy=args.strategy, batch_size=args.batch_size, progress=False
    )
    model_line = f"model class: {model_class(model)}; lenscope strategy {tracer.strategy!r}"
    if lenscope.hooks.is_bridge(model):
        # A bridge given start_at_layer still runs the blocks before it.
        model_line += (
            "; the minimal work runs whole stacks only and leaves out the rows "
            "that need a partial stack, so on a TransformerBridge it is a lower bound"
        )
    log(model_line)
    sigma = tracer.sigma
    noise_std = 3 * sigma
    from lenscope.tokens import find_subject

    subject = find_subject(model, setup.tokens, setup.subject)
    noise = draw_noise(
        args.samples, subject[1] - subject[0], model.cfg.d_model, noise_std, args.seed
    ).to(device, dtype)
    log(f"sigma at hook_embed {sigma:.4g}, noise std {noise_std:.4g}, subject tokens {subject}")

    # Warm up every code path once, off the clock (two layers keep it short).
    run_lenscope(tracer, setup, KINDS, args.samples, noise_std, args.seed, layers=[0, n_layers - 1])
    with torch.inference_mode():
        setup.hf_model(setup.tokens[None])

    timings: dict[tuple[str, str], Timing] = {}
    agreement: list[str] = []

    # lenscope: each kind, then the three together.
    lens_results: dict[str, Any] = {}
    for kinds in [(k,) for k in KINDS] + [KINDS]:
        label = "all three" if len(kinds) > 1 else kinds[0]
        timing, result = measure(
            lambda kinds=kinds: run_lenscope(
                tracer, setup, kinds, args.samples, noise_std, args.seed
            ),
            args.repeats,
            device,
        )
        timings[("lenscope", label)] = timing
        if len(kinds) == 1:
            lens_results[kinds[0]] = result[kinds[0]]
        else:
            for k in kinds:  # the three-kind trace equals the single-kind ones
                if not torch.allclose(
                    result[k].scores, lens_results[k].scores, atol=1e-6, equal_nan=True
                ):
                    raise RuntimeError(f"lenscope's {k} scores differ alone and with other kinds")
        log(f"lenscope {label}: {timing.median:.2f} s")
    clean_score = lens_results[KINDS[0]].clean_score
    corrupted_score = lens_results[KINDS[0]].corrupted_score
    answer_id = lens_results[KINDS[0]].answer_id
    log(
        f"answer {lens_results[KINDS[0]].answer!r}: clean {clean_score:.4f}, "
        f"corrupted {corrupted_score:.4f}"
    )

    # The minimal work.
    max_rows = lenscope.engine.auto_batch_size(model, n_pos, args.samples)
    for kinds in [(k,) for k in KINDS] + [KINDS]:
        label = "all three" if len(kinds) > 1 else kinds[0]
        timing, (decode_s, left_out) = measure(
            lambda kinds=kinds: run_minimal(model, setup.tokens, kinds, args.samples, max_rows),
            args.repeats,
            device,
        )
        # Without the shortcut every cell's copies would run the whole model.
        full = (1 + args.samples + len(kinds) * n_layers * n_pos * args.samples) * n_pos * n_layers
        count = minimal_count(n_layers, n_pos, kinds, args.samples)
        ours = lenscope_count(n_layers, n_pos, kinds, args.samples, subject[0], tracer.strategy)
        timing.note = (
            f"{count:,} token-layers ({count / full:.0%} of running every copy "
            f"fully; lenscope computes {ours:,} with its {tracer.strategy!r} "
            f"strategy, skipping provable no-ops); decoding {decode_s:.2f} s of it"
        )
        if left_out:
            timing.note += (
                f"; a lower bound: the {left_out:,} token-layers of partial stacks "
                f"left out (a TransformerBridge runs every block before "
                f"start_at_layer)"
            )
        timings[("minimal work", label)] = timing
        log(f"minimal {label}: {timing.median:.2f} s, {timing.note}")

    # The plain loop.
    if not args.skip_plain:
        generator = torch.Generator().manual_seed(args.seed)
        all_cells = [(layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
        total_plain = []
        for kind in KINDS:
            if 0 < args.plain_cells < len(all_cells):
                pick = torch.randperm(len(all_cells), generator=generator)[: args.plain_cells]
                cells = [all_cells[i] for i in sorted(pick.tolist())]
            else:
                cells = all_cells
            timing, plain = measure(
                lambda kind=kind, cells=cells: plain_trace(
                    model, setup.tokens, subject, kind, cells, noise, answer_id
                ),
                args.peer_repeats,
                device,
            )
            if len(cells) < len(all_cells):
                # Two fixed runs (clean + corrupted) plus one run per cell.
                per_run = [s / (len(cells) + 2) for s in timing.seconds]
                timing.seconds = [r * (len(all_cells) + 2) for r in per_run]
                timing.note = f"extrapolated from {len(cells)} of {len(all_cells)} cells"
            timings[("plain loop", kind)] = timing
            total_plain.append(timing)
            diffs = [abs(plain["scores"][c] - float(lens_results[kind].scores[c])) for c in cells]
            diffs += [abs(plain["clean"] - clean_score), abs(plain["corrupted"] - corrupted_score)]
            ok = max(diffs) <= 1e-5
            agreement.append(
                f"- plain loop vs lenscope, {kind}: max |difference| {max(diffs):.1e} over "
                f"{len(cells)} cells + clean + corrupted ({'OK' if ok else 'FAIL'}, atol 1e-5)"
            )
            log(agreement[-1].removeprefix("- ") + f"; {timing.median:.1f} s")
        timings[("plain loop", "all three")] = Timing(
            [sum(t.median for t in total_plain)],
            max(t.peak_rss for t in total_plain),
            max(t.peak_gpu for t in total_plain),
            total_plain[0].note,
        )

    # causal-tracer.
    if not args.skip_causal_tracer:
        total_ct = []
        for kind in KINDS:
            noise_ctx = (
                shared_noise(noise, noise_std)
                if args.ct_noise == "shared"
                else contextlib.nullcontext()
            )
            with noise_ctx:
                timing, flow = measure(
                    lambda kind=kind: run_causal_tracer(
                        setup, kind, args.samples, noise_std, args.ct_batch_size, device
                    ),
                    args.peer_repeats,
                    device,
                )
            timings[("causal-tracer", kind)] = timing
            total_ct.append(timing)
            answer = setup.hf_tokenizer.decode([lens_results[kind].answer_id])
            agreement.append(_compare_ct(flow, lens_results[kind], answer, kind, args.ct_noise))
            log(agreement[-1].removeprefix("- ") + f"; {timing.median:.1f} s")
        timings[("causal-tracer", "all three")] = Timing(
            [sum(t.median for t in total_ct)],
            max(t.peak_rss for t in total_ct),
            max(t.peak_gpu for t in total_ct),
        )

    table = _table(timings, device)
    lines = [
        f"## Causal tracing speed: {args.model}, {args.device}",
        "",
        model_line[0].upper() + model_line[1:] + ".",
        "",
        (
            f"Prompt {PROMPT!r} (subject {SUBJECT!r}) as {n_pos} tokens"
            if isinstance(setup.prompt, str)
            else f"{n_pos} random token ids (random weights), "
            f"subject positions {subject[0]}-{subject[1] - 1}"
        )
        + f"; {n_layers} layers; {args.samples} samples; noise std {noise_std:.4g} "
        f"(3 x sigma {sigma:.4g} measured at hook_embed); windows resid_post 1, mlp_out 10, "
        f"attn_out 10; lenscope strategy {tracer.strategy!r}, batch size "
        f"{args.batch_size or 'automatic'}; causal-tracer batch size {args.ct_batch_size}, "
        f"noise {'shared with lenscope' if args.ct_noise == 'shared' else 'its own draws'}. "
        f"Median of {args.repeats} runs for lenscope and the minimal work, "
        f"{args.peer_repeats} for the others.",
        "",
        *table,
        "",
        "Agreement (speed must not come from computing something else):",
        "",
        f"- clean score {clean_score:.6f}, corrupted score {corrupted_score:.6f} "
        f"(answer {lens_results[KINDS[0]].answer!r})",
        *agreement,
        "",
        "Machine:",
        "",
        *info,
        f"- load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "Command:",
        "",
        "```",
        "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "```",
    ]
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        log(f"\nwrote {args.out}")
    if args.profile:
        profile(tracer, setup, args, noise_std)
    return 0


def _compare_ct(flow: Any, result: Any, answer: str, kind: str, mode: str) -> str:
    ct_scores = flow.scores.T.float()  # causal-tracer: [pos, layer]
    lens = result.scores.float().cpu()
    grid = (ct_scores - lens).abs().max().item()
    clean = abs(flow.high_score - result.clean_score)
    corrupted = abs(flow.low_score - result.corrupted_score)
    if flow.answer != answer:
        return (
            f"- causal-tracer vs lenscope, {kind}: different answers {flow.answer!r} vs "
            f"{answer!r} (FAIL)"
        )
    if mode == "shared":
        ok = max(grid, clean, corrupted) <= 1e-3
        rule = "atol 1e-3: same noise, float differences between HF and TransformerLens"
    else:
        # Different draws: compare at the level of the sampling error of a 10-sample mean.
        tol = 0.1 * max(result.clean_score, 1e-6)
        ok = clean <= 1e-3 and corrupted <= tol and grid <= 3 * tol
        rule = "clean atol 1e-3; corrupted and grid within sampling error"
    return (
        f"- causal-tracer vs lenscope, {kind}: clean |diff| {clean:.1e}, corrupted "
        f"|diff| {corrupted:.1e}, grid max |diff| {grid:.1e} ({'OK' if ok else 'FAIL'}, "
        f"{rule})"
    )


def _table(timings: dict[tuple[str, str], Timing], device: torch.device) -> list[str]:
    labels = [*KINDS, "all three"]
    header = ["tool", *labels, "peak memory above model (MB)", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tools = ["lenscope", "causal-tracer", "plain loop", "minimal work"]
    for tool in tools:
        if (tool, labels[-1]) not in timings:
            continue
        cells = [_seconds(timings[(tool, lab)].median) + " s" for lab in labels]
        peak = max(t.peak_rss for (name, _), t in timings.items() if name == tool)
        memory = _mb(peak)
        if device.type == "cuda":
            gpu = max(t.peak_gpu for (name, _), t in timings.items() if name == tool)
            memory = f"{memory} RSS, {_mb(gpu)} GPU"
        note = timings[(tool, labels[-1])].note or timings[(tool, labels[0])].note
        lines.append(f"| {tool} | " + " | ".join(cells) + f" | {memory} | {note} |")
    lens = {lab: timings[("lenscope", lab)].median for lab in labels}
    for tool, name in [
        ("causal-tracer", "causal-tracer / lenscope"),
        ("plain loop", "plain loop / lenscope"),
    ]:
        if (tool, labels[-1]) in timings:
            ratios = [f"{timings[(tool, lab)].median / lens[lab]:.1f}x" for lab in labels]
            lines.append(f"| {name} | " + " | ".join(ratios) + " | | |")
    ratios = [f"{lens[lab] / timings[('minimal work', lab)].median:.2f}x" for lab in labels]
    lines.append("| lenscope / minimal work | " + " | ".join(ratios) + " | | |")
    return lines


def profile(tracer: Any, setup: Setup, args: argparse.Namespace, noise_std: float) -> None:
    """Where one three-kind lenscope trace spends its time."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def call() -> None:
        run_lenscope(tracer, setup, KINDS, args.samples, noise_std, args.seed)

    profiler = cProfile.Profile()
    profiler.runcall(call)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.profile)
    print("\ncProfile, one three-kind trace, by cumulative time:\n" + stream.getvalue())
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        call()
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(
        "torch profiler, by self time:\n"
        + prof.key_averages().table(sort_by=sort, row_limit=args.profile)
    )


if __name__ == "__main__":
    sys.exit(main())
