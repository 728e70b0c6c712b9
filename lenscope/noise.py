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
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np
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
    key, token_lists = _reference_tokens(model, subjects)
    per_model = _SIGMA_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _sigma_over_tokens(model, token_lists, batch_size)
    return per_model[key]


def _reference_tokens(
    model: torch.nn.Module, subjects: Sequence[str] | None
) -> tuple[Any, list[list[int]]]:
    """Cache key and token lists of the reference subjects (no tokenizer: the vocabulary)."""
    tokenizer = getattr(model, "tokenizer", None)
    subjects = tuple(subjects) if subjects is not None else None
    if tokenizer is None:
        ids = torch.arange(model.cfg.d_vocab)
        return ("vocabulary",), [ids[i : i + 512].tolist() for i in range(0, len(ids), 512)]
    texts = subjects if subjects is not None else known_subjects()
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return (subjects or "known_1000",), [tokens for tokens in token_lists if tokens]


def _embeddings(
    model: torch.nn.Module, token_lists: list[list[int]], batch_size: int
) -> Iterator[Float[Tensor, "token d_model"]]:
    """``hook_embed`` activations of the given tokens (float64, padding excluded), in chunks."""
    device = model.cfg.device
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
            yield embed.detach().double()[mask.to(embed.device)]


def _sigma_over_tokens(
    model: torch.nn.Module, token_lists: list[list[int]], batch_size: int
) -> float:
    """Pooled std of ``hook_embed`` over the given token lists (padding excluded)."""
    total, total_sq, count = 0.0, 0.0, 0
    for values in _embeddings(model, token_lists, batch_size):
        total += float(values.sum())
        total_sq += float((values**2).sum())
        count += values.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1))


_MOMENTS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Any]]" = (
    weakref.WeakKeyDictionary()
)


def embedding_moments(
    model: torch.nn.Module,
    subjects: Sequence[str] | None = None,
    *,
    batch_size: int = 128,
) -> tuple[Float[Tensor, " d_model"], Float[Tensor, "d_model d_model"], int]:
    """Mean and covariance of ``hook_embed`` activations over reference subject tokens.

    ROME's ``m`` noise (``collect_embedding_gaussian`` in its ``causal_trace.py``)
    draws from the Gaussian with these moments. Computed in float64 once per
    model and reference list, then cached; measured at the hook, like
    :func:`embedding_sigma`.

    Returns:
        ``(mean, covariance, number of tokens)``, float64 on the CPU.
    """
    check_hook_points(model, [EMBED_HOOK])
    key, token_lists = _reference_tokens(model, subjects)
    per_model = _MOMENTS_CACHE.setdefault(model, {})
    if key not in per_model:
        d_model = int(model.cfg.d_model)
        total = torch.zeros(d_model, dtype=torch.float64)
        outer = torch.zeros(d_model, d_model, dtype=torch.float64)
        count = 0
        for values in _embeddings(model, token_lists, batch_size):
            values = values.cpu()
            total += values.sum(dim=0)
            outer += values.T @ values
            count += values.shape[0]
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / max(count - 1, 1)
        per_model[key] = (mean, cov, count)
    return per_model[key]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def draw_noise(
    samples: int, n_tokens: int, d_model: int, std: float, seed: int
) -> Float[Tensor, "samples subject_pos d_model"]:
    """Gaussian noise for ``samples`` corrupted copies, identical for a given seed.

    Drawn in float32 on the CPU from its own generator, so the draws do not
    depend on the device, dtype, the kind being traced, or global RNG state.
    """
    return torch.randn(samples, n_tokens, d_model, generator=_generator(seed)) * std


def draw_uniform(
    samples: int, n_tokens: int, d_model: int, std: float, seed: int
) -> Float[Tensor, "samples subject_pos d_model"]:
    """Uniform noise on ``[-a, a]`` with ``a = sqrt(3) * std`` (so its std is ``std``).

    ROME's ``u<a>`` noise draws ``a * U(-1, 1)``: the same family, named by
    its half-width ``a`` rather than its std.
    """
    unit = torch.rand(samples, n_tokens, d_model, generator=_generator(seed)) * 2 - 1
    return unit * (math.sqrt(3.0) * std)


def draw_student_t(
    samples: int, n_tokens: int, d_model: int, std: float, seed: int, df: float
) -> Float[Tensor, "samples subject_pos d_model"]:
    """Student-t noise with ``df`` degrees of freedom, scaled to standard deviation ``std``.

    A t variable has variance ``df / (df - 2)`` (finite only for ``df > 2``),
    so each draw is scaled by ``sqrt((df - 2) / df) * std``; drawn as
    ``z / sqrt(chi2_df / df)`` from the seed's own generator. Excess kurtosis
    is ``6 / (df - 4)`` for ``df > 4``: heavier tails than Gaussian noise of
    the same std.
    """
    generator = _generator(seed)
    shape = (samples, n_tokens, d_model)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    # chi2 with df degrees of freedom = 2 * Gamma(df / 2); torch's gamma sampler
    # takes no generator, so draw it from numpy seeded by this generator.
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    chi2 = torch.from_numpy(rng.chisquare(df, size=shape))
    t = z / torch.sqrt(chi2 / df)
    return (t * (math.sqrt((df - 2) / df) * std)).float()
