"""Plain-Python statistics the documentation tests recompute the pages' numbers with.

Lists and ``math`` only (not lenscope's aggregation), so a page whose numbers came from a
wrong aggregation, a hand edit or another run fails its test. Shared by
``test_replication_docs.py`` and ``test_answers_docs.py``.
"""

import math

Z = 1.96
"""The normal approximation's 95% quantile."""


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 x sample std / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, Z * std / math.sqrt(n)


def pct(value: float) -> str:
    """``0.1234`` -> ``"12.3%"``."""
    return f"{100 * value:.1f}%"


def where(effects: list[list[float | None]], n_layers: int) -> tuple[int, str]:
    """The peak layer of per-fact effects (None: a fact without the bucket) and the pages'
    words for it, by the plateau rule written out (:func:`plateau`): adjacent layers whose
    paired difference from the peak has a 95% CI containing zero extend the plateau; a tied
    layer further away is named."""
    p = plateau(effects, n_layers)
    return p["layer"], words(p, n_layers)


def words(p: dict, n_layers: int) -> str:
    """The pages' words for a :func:`plateau`: ``layer 5 of 18 (29% depth; plateau over
    layers 3-5; layer 1 within the CI)``."""
    notes = [f"{100 * p['layer'] / (n_layers - 1):.0f}% depth"]
    if p["high"] > p["low"]:
        notes.append(f"plateau over layers {p['low']}-{p['high']}")
    others = [o for o in p["tied"] if not p["low"] <= o <= p["high"]]
    if others:
        notes.append(
            f"layer{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} within the CI"
        )
    return f"layer {p['layer']} of {n_layers} ({'; '.join(notes)})"


def share_of_total(pairs: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """A ratio of means ``mean(e) / mean(t)`` over ``(e, t)`` pairs, its delta-method 95% CI
    half-width, and each pair's influence ``(e - R t) / mean(t)`` (for paired differences)."""
    n = len(pairs)
    mean_t = sum(t for _, t in pairs) / n
    ratio = (sum(e for e, _ in pairs) / n) / mean_t
    influence = [(e - ratio * t) / mean_t for e, t in pairs]
    mean = sum(influence) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in influence) / (n - 1))
    return ratio, Z * std / math.sqrt(n), influence


def buckets(subject_range: tuple[int, int], n_pos: int) -> dict[str, list[int]]:
    """ROME's six token buckets of a prompt, written out: the last token is ``last``; a
    one-token subject is ``last_subject`` only; positions before the subject are in none."""
    start, end = subject_range
    last = n_pos - 1
    out = {
        "first_subject": [start] if start not in (end - 1, last) else [],
        "middle_subject": list(range(start + 1, end - 1)),
        "last_subject": [end - 1] if end - 1 != last else [],
        "first_subsequent": [end] if end < last else [],
        "further": list(range(end + 1, last)),
        "last": [last],
    }
    return out


def bucket_effects(fact: dict, kind: str, bucket: str, n_layers: int) -> list[float] | None:
    """A fact's effect per layer in a bucket (mean restored score over the bucket's tokens
    minus the corrupted score), from its ``FactTrace`` record; None without that bucket."""
    positions = buckets(tuple(fact["subject_range"]), len(fact["tokens"]))[bucket]
    if not positions:
        return None
    grid = fact["scores"][kind]
    return [
        sum(grid[layer][p] for p in positions) / len(positions) - fact["corrupted_score"]
        for layer in range(n_layers)
    ]


def plateau(effects: list[list[float | None]], n_layers: int, layer: int | None = None) -> dict:
    """The peak of per-fact effects (or ``layer``) with its mean, CI and N, each other layer's
    paired difference from it, the plateau of adjacent tied layers and every tied layer."""
    facts = [row for row in effects if row is not None and row[0] is not None]
    means = [sum(row[i] for row in facts) / len(facts) for i in range(n_layers)]
    if layer is None:
        layer = max(range(n_layers), key=means.__getitem__)
    mean, half = mean_ci([row[layer] for row in facts])
    differences = {
        other: mean_ci([row[layer] - row[other] for row in facts])
        for other in range(n_layers)
        if other != layer
    }

    def tied(other: int) -> bool:
        d, h = differences[other]
        return d - h <= 0 <= d + h

    low = layer
    while low > 0 and tied(low - 1):
        low -= 1
    high = layer
    while high < n_layers - 1 and tied(high + 1):
        high += 1
    return {
        "layer": layer,
        "mean": mean,
        "half": half,
        "n": len(facts),
        "low": low,
        "high": high,
        "tied": [o for o in differences if tied(o)],
        "differences": differences,
        "means": means,
    }


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's correlation (NaN when either is constant)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = math.sqrt(sum((a - mx) ** 2 for a in x))
    syy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sxx * syy) if sxx * syy > 0 else math.nan


def ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(x)), key=x.__getitem__)
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def top_k(x: list[float], k: int) -> set[int]:
    """Indices of the ``k`` largest values, ties broken by index."""
    return set(sorted(range(len(x)), key=lambda i: (-x[i], i))[:k])
