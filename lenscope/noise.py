"""Corruption of the subject: Gaussian noise at ``hook_embed``.

ROME (Meng et al., 2022, arXiv 2202.05262, Section 2.1) corrupts the subject
by adding noise of standard deviation ``3 * sigma`` to its token embeddings,
with sigma the empirical standard deviation of embeddings of the subjects of
the known-facts set. lenscope measures sigma *at the hook*, on the activations
``hook_embed`` actually carries, because some models scale embeddings after
the lookup (Gemma multiplies by ``sqrt(d_model)``); a sigma taken from
``W_E`` would be off by that factor and the noise would barely corrupt.
"""

import math
import weakref
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope._data import known_records
from lenscope.hooks import EMBED_HOOK, capture_forward, check_hook_points

DEFAULT_NOISE_MULTIPLIER = 3.0

_SIGMA_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, float]]" = (
    weakref.WeakKeyDictionary()
)


@cache
def known_subjects() -> tuple[str, ...]:
    """Subjects of the ROME known-facts set shipped with lenscope (1209 records)."""
    return tuple(dict.fromkeys(record["subject"] for record in known_records()))


def embedding_sigma(
    model: torch.nn.Module,
    subjects: Sequence[str] | None = None,
    *,
    batch_size: int = 128,
) -> float:
    """Standard deviation of ``hook_embed`` activations over reference subject tokens.

    Computed once per model and reference list, then cached.

    Args:
        model: HookedTransformer or TransformerBridge.
        subjects: Reference subjects; default: the ROME known-facts subjects.
            A model without a tokenizer falls back to every token of the vocabulary.
        batch_size: Subjects embedded per forward pass.

    Returns:
        The standard deviation over all elements of the subject tokens' embeddings.
    """
    check_hook_points(model, [EMBED_HOOK])
    tokenizer = getattr(model, "tokenizer", None)
    subjects = tuple(subjects) if subjects is not None else None
    key = ("vocabulary",) if tokenizer is None else (subjects or "known_1000",)
    per_model = _SIGMA_CACHE.setdefault(model, {})
    if key not in per_model:
        if tokenizer is None:
            ids = torch.arange(model.cfg.d_vocab)
            token_lists = [ids[i : i + 512].tolist() for i in range(0, len(ids), 512)]
        else:
            texts = subjects if subjects is not None else known_subjects()
            token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            token_lists = [tokens for tokens in token_lists if tokens]
        per_model[key] = _sigma_over_tokens(model, token_lists, batch_size)
    return per_model[key]


def _sigma_over_tokens(
    model: torch.nn.Module, token_lists: list[list[int]], batch_size: int
) -> float:
    """Pooled std of ``hook_embed`` over the given token lists (padding excluded)."""
    device = model.cfg.device
    total, total_sq, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(token_lists), batch_size):
            chunk = token_lists[start : start + batch_size]
            width = max(len(tokens) for tokens in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, tokens in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = True
            embed = capture_forward(model, ids.to(device), [], stop_at=EMBED_HOOK)[EMBED_HOOK]
            values = embed.detach().double()[mask.to(embed.device)]
            total += float(values.sum())
            total_sq += float((values**2).sum())
            count += values.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1))


def draw_noise(
    samples: int, n_tokens: int, d_model: int, std: float, seed: int
) -> Float[Tensor, "samples subject_pos d_model"]:
    """Gaussian noise for ``samples`` corrupted copies, identical for a given seed.

    Drawn in float32 on the CPU from its own generator, so the draws do not
    depend on the device, dtype, the kind being traced, or global RNG state.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(samples, n_tokens, d_model, generator=generator) * std
