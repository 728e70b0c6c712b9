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
    words for it, by the plateau rule written out: adjacent layers whose paired difference
    from the peak has a 95% CI containing zero extend the plateau; a tied layer further away
    is named."""
    facts = [row for row in effects if row[0] is not None]
    means = [sum(row[layer] for row in facts) / len(facts) for layer in range(n_layers)]
    peak = max(range(n_layers), key=means.__getitem__)

    def tied(other: int) -> bool:
        mean, half = mean_ci([row[peak] - row[other] for row in facts])
        return mean - half <= 0 <= mean + half

    low = peak
    while low > 0 and tied(low - 1):
        low -= 1
    high = peak
    while high < n_layers - 1 and tied(high + 1):
        high += 1
    notes = [f"{100 * peak / (n_layers - 1):.0f}% depth"]
    if high > low:
        notes.append(f"plateau over layers {low}-{high}")
    others = [o for o in range(n_layers) if o != peak and not low <= o <= high and tied(o)]
    if others:
        notes.append(
            f"layer{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} within the CI"
        )
    return peak, f"layer {peak} of {n_layers} ({'; '.join(notes)})"


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
