"""Dataset-level causal tracing: average indirect effects over many facts.

A single trace is an anecdote; ROME's localisation claims (Meng et al.,
"Locating and Editing Factual Associations in GPT", NeurIPS 2022,
arXiv 2202.05262, Section 2.2 and Figure 2) are averages over the ~1000
"known facts" the model gets right. This module loads fact lists (the ROME
set ships with lenscope, :func:`known_facts`), keeps the facts a model
predicts correctly (:func:`filter_known`), traces each fact with the answer
fixed to the model's clean top-1 token (:func:`trace_dataset`), appending
every finished fact to a JSONL checkpoint so that long runs resume, and
averages the indirect effects per token bucket and layer into a
:class:`DatasetSummary` (ROME's average indirect effect, AIE, and average
total effect, ATE).

Token buckets follow ROME's Figure 2 (see :func:`token_buckets`): first
subject token, middle subject tokens, last subject token, first subsequent
token, further tokens, last token. Tokens before the subject (BOS, and words
such as "In" in "In Marshall Islands, ...") belong to no bucket. The
``lenscope dataset`` command runs the whole pipeline (:func:`run_dataset_cli`).
"""

import argparse
import dataclasses
import functools
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenscope.hooks import (
    decode_resid,
    model_name,
    n_layers,
    preserved_model,
    run_to_final_resid,
)
from lenscope.metrics import PatchingMetric, resolve_metric
from lenscope.tokens import find_subject, prompt_tokens, token_labels
from lenscope.tracer import DEFAULT_KINDS, CausalTracer, _check_kinds, _resolve_windows

BUCKETS: tuple[str, ...] = (
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_subsequent",
    "further",
    "last",
)
"""Token buckets of ROME's Figure 2, in the paper's (top-to-bottom) order."""

BUCKET_LABELS: dict[str, str] = {
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_subsequent": "first subsequent token",
    "further": "further tokens",
    "last": "last token",
}
"""Human-readable name of each bucket, as the paper labels its rows."""

CI_Z = 1.96
"""Normal quantile of the two-sided 95% confidence intervals."""

CHECKPOINT_FORMAT = "lenscope.dataset-checkpoint/1"
_SUMMARY_FORMAT = "lenscope.DatasetSummary/1"
_FACT_FORMAT = "lenscope.FactTrace/1"


def _check_format(data: Mapping[str, Any], expected: str, writer: str) -> None:
    """Raise a ``ValueError`` unless ``data`` says it was written by ``writer``."""
    if data.get("format") != expected:
        raise ValueError(
            f"expected a dict saved by {writer} (format {expected!r}), "
            f"got format {data.get('format')!r}"
        )


Facts = Sequence[Mapping[str, Any]] | str | os.PathLike[str] | Any
"""A list of dicts, a pandas DataFrame, or the path of a JSON / JSONL file."""


# --------------------------------------------------------------------------- facts


def known_facts() -> list[dict[str, Any]]:
    """The ROME known-facts set shipped with lenscope (1209 records).

    Each record has ``known_id``, ``subject``, ``attribute``, ``template``,
    ``prediction`` (GPT-2 XL's greedy continuation), ``prompt`` and
    ``relation_id``. The set is what GPT-2 XL knows; run :func:`filter_known`
    to keep what *your* model knows.

    Returns:
        A fresh list of fresh dicts (safe to modify).
    """
    return [dict(record) for record in _known_records()]


@functools.cache
def _known_records() -> tuple[dict[str, Any], ...]:
    text = resources.files("lenscope").joinpath("data/known_1000.json").read_text()
    return tuple(json.loads(text))


def load_facts(facts: Facts) -> list[dict[str, Any]]:
    """Turn any supported fact source into a list of dicts.

    Args:
        facts: A sequence of mappings, a pandas ``DataFrame`` (one fact per
            row; NaN cells count as missing), or the path of a ``.json`` file
            (a list of records) or ``.jsonl`` file (one record per line).

    Returns:
        One dict per fact, in order. Records are not validated here: a fact
        with missing fields is reported by :func:`trace_dataset`, not refused.

    Raises:
        TypeError: ``facts`` is none of the supported sources.
        ValueError: a JSON/JSONL file cannot be parsed.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(facts, str | os.PathLike):
        return _read_fact_file(Path(facts))
    if hasattr(facts, "to_dict") and hasattr(facts, "columns"):  # a pandas DataFrame
        records = facts.to_dict(orient="records")
        return [{k: v for k, v in r.items() if not _is_missing(v)} for r in records]
    if isinstance(facts, Mapping) or not isinstance(facts, Iterable):
        raise TypeError(
            f"facts must be a list of dicts, a pandas DataFrame, or a JSON/JSONL path, "
            f"got {type(facts).__name__}; pass e.g. lenscope.datasets.known_facts()"
        )
    return [dict(f) if isinstance(f, Mapping) else f for f in facts]


def _read_fact_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(
            f"fact file {str(path)!r} does not exist; pass the path of a .json or .jsonl file"
        )
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"every line of a JSONL fact file must be one JSON record, but line "
                    f"{number} of {str(path)!r} is not valid JSON ({e.msg}); fix or remove it"
                ) from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"a .json fact file must hold a JSON list of records, but {str(path)!r} is not "
            f"valid JSON ({e.msg}); for one record per line name the file .jsonl"
        ) from e
    if not isinstance(data, list):
        raise ValueError(
            f"a .json fact file must hold a JSON list of records, got a "
            f"{type(data).__name__} in {str(path)!r}; wrap the records in [...]"
        )
    return data


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fact_id(fact: Any, index: int) -> int | str:
    """A fact's id: its ``known_id``, else its ``id``, else its index in the input."""
    if isinstance(fact, Mapping):
        for key in ("known_id", "id"):
            value = fact.get(key)
            if _is_missing(value) or isinstance(value, bool):
                continue
            if isinstance(value, numbers.Integral):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)  # a pandas column with NaN turns ints into floats
            return str(value)
    return index


def _fact_problem(fact: Any, fields: Sequence[str]) -> str | None:
    """Why ``fact`` cannot be used (a missing or non-text field), or None."""
    if not isinstance(fact, Mapping):
        return f"a fact must be a dict with {', '.join(fields)}, got {type(fact).__name__}"
    missing = [f for f in fields if _is_missing(fact.get(f))]
    if missing:
        return (
            f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(a fact needs {', '.join(map(repr, fields))})"
        )
    for field in fields:
        value = fact[field]
        if not isinstance(value, str) or not value.strip():
            return f"field {field!r} must be non-empty text, got {value!r}"
    return None


def _prepared(facts: Facts) -> list[tuple[int | str, Any]]:
    """``(id, record)`` pairs; later duplicates of an id are kept for reporting."""
    return [(_fact_id(fact, index), fact) for index, fact in enumerate(load_facts(facts))]


# ------------------------------------------------------------------ known filter


def starts_attribute(prediction: str, attribute: str) -> bool:
    """ROME's "known" test: the predicted token, stripped, is a non-empty prefix of the attribute.

    The comparison is case-sensitive and ignores surrounding whitespace on
    both sides, so ``" Paris"`` starts ``"Paris"`` and ``" Par"`` does too
    (a sub-word start counts, as in ROME), while ``" the"`` or ``" "`` do not.

    Args:
        prediction: The decoded top-1 token.
        attribute: The fact's expected attribute, e.g. ``"Paris"``.

    Returns:
        Whether the prediction starts the attribute.
    """
    token = prediction.strip()
    return bool(token) and attribute.strip().startswith(token)


def filter_known(
    tracer: CausalTracer,
    facts: Facts,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    return_rejected: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list["SkippedFact"]]:
    """Keep the facts whose clean top-1 next token starts the attribute (ROME's filter).

    One clean forward pass per fact, batched over prompts of equal token
    length (no padding, so no position or BOS subtleties); only the last
    position's logits are decoded (:func:`lenscope.hooks.run_to_final_resid`),
    never the full ``[batch, pos, d_vocab]`` logits. See
    :func:`starts_attribute` for the exact test.

    Args:
        tracer: The tracer whose model is checked.
        facts: Facts with ``prompt`` and ``attribute`` (see :func:`load_facts`).
        limit: Stop once this many known facts are found (input order kept).
        batch_size: Prompts per forward pass.
        progress: Show a progress bar; default the tracer's setting.
        return_rejected: Also return the facts left out, with the reason.

    Returns:
        Copies of the known facts, each with ``top1_token`` and ``top1_prob``
        added; with ``return_rejected``, the pair ``(known, rejected)``.

    Raises:
        ValueError: ``limit`` or ``batch_size`` is not a positive integer.
    """
    _check_optional_positive_int("limit", limit, "e.g. limit=100")
    _check_optional_positive_int("batch_size", batch_size, "e.g. batch_size=64")
    model = tracer.model
    show = tracer.progress if progress is None else progress
    pairs = _prepared(facts)
    known: list[tuple[int, dict[str, Any]]] = []
    rejected: list[tuple[int, SkippedFact]] = []
    # Larger chunks give larger equal-length groups: a forward pass costs about
    # the same for 1 or 64 short prompts (reading the weights dominates).
    # With a small limit, check a few facts at a time so as not to overshoot.
    chunk_size = 256 if limit is None else min(256, max(32, 4 * limit))
    bar = tqdm(total=len(pairs), desc="filter known", unit="fact", disable=not show)
    with bar, preserved_model(model), torch.inference_mode():
        for chunk_start in range(0, len(pairs), chunk_size):
            by_length: dict[int, list[tuple[int, dict[str, Any], Tensor]]] = {}
            for order in range(chunk_start, min(chunk_start + chunk_size, len(pairs))):
                fact_id, fact = pairs[order]
                problem = _fact_problem(fact, ("prompt", "attribute"))
                tokens = None
                if problem is None:
                    try:
                        tokens = prompt_tokens(model, fact["prompt"])
                    except (ValueError, TypeError) as e:
                        problem = str(e)
                if problem is not None:
                    rejected.append((order, SkippedFact(fact_id, problem)))
                    continue
                by_length.setdefault(int(tokens.shape[0]), []).append((order, fact, tokens))
            for group in by_length.values():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    ids = torch.stack([tokens for _, _, tokens in batch])
                    logits = decode_resid(model, run_to_final_resid(model, ids, []))
                    probs = torch.softmax(logits, dim=-1)
                    top_prob, top_id = probs.max(dim=-1)
                    labels = token_labels(model, top_id.tolist())
                    for (order, fact, _), label, p in zip(batch, labels, top_prob, strict=True):
                        if starts_attribute(label, fact["attribute"]):
                            known.append(
                                (order, {**fact, "top1_token": label, "top1_prob": float(p)})
                            )
                        else:
                            reason = (
                                f"not known: top-1 token {label!r} does not start the "
                                f"attribute {fact['attribute']!r}"
                            )
                            rejected.append((order, SkippedFact(pairs[order][0], reason)))
            bar.update(min(chunk_start + chunk_size, len(pairs)) - chunk_start)
            if limit is not None and len(known) >= limit:
                break
    known.sort(key=lambda item: item[0])
    rejected.sort(key=lambda item: item[0])
    kept = [fact for _, fact in known]
    if limit is not None and len(kept) > limit:
        last_order = known[limit - 1][0]
        kept = kept[:limit]
        rejected = [item for item in rejected if item[0] < last_order]
    if return_rejected:
        return kept, [skip for _, skip in rejected]
    return kept


# ------------------------------------------------------------------ buckets


def token_buckets(subject_range: tuple[int, int], n_pos: int) -> dict[str, tuple[int, ...]]:
    """Token positions of each ROME bucket, for a prompt of ``n_pos`` tokens.

    Buckets as in ROME's Figure 2, with the subject at positions
    ``start..end-1`` and the prediction read at position ``n_pos - 1``:

    ====================  ============================================
    ``first_subject``     ``start``
    ``middle_subject``    ``start+1 .. end-2`` (empty for < 3 subject tokens)
    ``last_subject``      ``end-1``
    ``first_subsequent``  ``end``
    ``further``           ``end+1 .. n_pos-2``
    ``last``              ``n_pos-1``
    ====================  ============================================

    Every position falls in at most one bucket; where two definitions meet
    the same position, precedence is
    ``last > last_subject > first_subject`` and ``last > first_subsequent``:
    the last token is always the ``last`` bucket (it is where the answer is
    read, and attention there is a distinct effect), and a one-token
    subject is the ``last_subject`` bucket (the paper's key bucket) and not
    ``first_subject``. ROME's own notebook lets such a position count in
    both buckets; keeping buckets disjoint means no effect is counted twice.
    Positions before the subject (BOS included) belong to no bucket.

    Args:
        subject_range: ``(start, end)`` token positions of the subject, end exclusive.
        n_pos: Number of tokens of the prompt.

    Returns:
        ``{bucket: positions}`` for every name in :data:`BUCKETS` (possibly empty).

    Raises:
        ValueError: the range does not lie inside the prompt.
    """
    start, end = subject_range
    if not (isinstance(n_pos, int) and 0 <= start < end <= n_pos):
        raise ValueError(
            f"subject_range must satisfy 0 <= start < end <= n_pos={n_pos}, got "
            f"{tuple(subject_range)}; pass the range TraceResult.subject_range reports"
        )
    last = n_pos - 1
    out: dict[str, tuple[int, ...]] = {bucket: () for bucket in BUCKETS}
    out["last"] = (last,)
    if end - 1 != last:
        out["last_subject"] = (end - 1,)
    if start not in (end - 1, last):
        out["first_subject"] = (start,)
    out["middle_subject"] = tuple(range(start + 1, end - 1))
    if end < last:
        out["first_subsequent"] = (end,)
    out["further"] = tuple(range(end + 1, last))
    return out


def bucket_effects(
    scores: Float[Tensor, "layer pos"], corrupted_score: float, subject_range: tuple[int, int]
) -> Float[Tensor, "bucket layer"]:
    """One fact's indirect effect per bucket and layer, averaged over the bucket's tokens.

    Args:
        scores: The fact's trace scores (restored metric per cell).
        corrupted_score: The metric with the subject corrupted and nothing restored.
        subject_range: ``(start, end)`` of the subject.

    Returns:
        ``mean over the bucket's positions of (score - corrupted_score)`` in
        float64, rows in :data:`BUCKETS` order; NaN rows for empty buckets.
    """
    effect = scores.double() - corrupted_score
    rows = [
        effect[:, list(positions)].mean(dim=-1)
        if positions
        else torch.full((effect.shape[0],), math.nan, dtype=torch.float64)
        for positions in token_buckets(subject_range, int(scores.shape[1])).values()
    ]
    return torch.stack(rows)


def mean_ci(
    values: Float[Tensor, " fact *rest"],
) -> tuple[Float[Tensor, " *rest"], Float[Tensor, " *rest"], Int[Tensor, " *rest"]]:
    """Mean over facts, half-width of its 95% normal-approximation CI, and count.

    NaN entries (a bucket a fact does not have) are left out. The half-width
    is ``1.96 * std / sqrt(n)`` with the sample std (``n - 1``); NaN for
    ``n < 2``. The mean is NaN where ``n == 0``.

    Args:
        values: One row per fact.

    Returns:
        ``(mean, half_width, n)``.
    """
    values = values.double()
    present = ~torch.isnan(values)
    n = present.sum(dim=0)
    filled = torch.where(present, values, torch.zeros_like(values))
    mean = filled.sum(dim=0) / n  # 0/0 -> NaN where no fact has the bucket
    centred = torch.where(present, values - mean, torch.zeros_like(values))
    var = (centred**2).sum(dim=0) / (n - 1)
    half = CI_Z * torch.sqrt(var / n)
    half = torch.where(n >= 2, half, torch.full_like(half, math.nan))
    return mean, half, n


# ------------------------------------------------------------------ result objects


@dataclasses.dataclass(frozen=True)
class SkippedFact:
    """A fact that was not traced, and why.

    Attributes:
        fact_id: The fact's ``known_id`` / ``id``, or its index in the input.
        reason: What was wrong with it, e.g. a missing field.
    """

    fact_id: int | str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class FactTrace:
    """What dataset aggregation keeps of one traced fact.

    Attributes:
        fact_id: The fact's ``known_id`` / ``id``, or its index in the input.
        prompt: The prompt text.
        subject: The subject text.
        tokens: Token labels of the prompt (BOS included when the model prepends one).
        subject_range: ``(start, end)`` token positions of the subject, end exclusive.
        answer: The answer token (the model's clean top-1, as in ROME).
        answer_id: Its token id.
        clean_score: Metric on the clean prompt.
        corrupted_score: Metric with the subject corrupted, averaged over copies.
        scores: ``{kind: [layer, pos]}`` restored metric; NaN at positions not
            traced (those before the subject, which no bucket uses).
        attribute: The fact's expected attribute, if given.
        seconds: Wall-clock time the trace took.
    """

    fact_id: int | str
    prompt: str
    subject: str
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    clean_score: float
    corrupted_score: float
    scores: dict[str, Float[Tensor, "layer pos"]]
    attribute: str | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        """Check that every score grid has one column per token."""
        n_pos = len(self.tokens)
        bad = [k for k, v in self.scores.items() if v.ndim != 2 or v.shape[1] != n_pos]
        start, end = self.subject_range
        if bad or not self.scores or not 0 <= start < end <= n_pos:
            raise ValueError(
                f"inconsistent FactTrace for fact {self.fact_id!r}: {n_pos} tokens, "
                f"subject_range {self.subject_range}, score shapes "
                f"{ {k: tuple(v.shape) for k, v in self.scores.items()} }; each must be "
                f"[layer, {n_pos}] and the range inside the prompt"
            )

    def buckets(self) -> dict[str, tuple[int, ...]]:
        """Positions of each bucket; see :func:`token_buckets`."""
        return token_buckets(self.subject_range, len(self.tokens))

    def bucket_effects(self, kind: str) -> Float[Tensor, "bucket layer"]:
        """Indirect effect per bucket and layer for ``kind``; see :func:`bucket_effects`."""
        return bucket_effects(self.scores[kind], self.corrupted_score, self.subject_range)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN scores as ``null``)."""
        return {
            "format": _FACT_FORMAT,
            "fact_id": self.fact_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": list(self.tokens),
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "answer_id": self.answer_id,
            "clean_score": self.clean_score,
            "corrupted_score": self.corrupted_score,
            "scores": {kind: _grid_to_json(grid) for kind, grid in self.scores.items()},
            "attribute": self.attribute,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FactTrace":
        """Inverse of :meth:`to_dict`."""
        _check_format(data, _FACT_FORMAT, "FactTrace.to_dict")
        kwargs = {k: v for k, v in data.items() if k != "format"}
        kwargs["tokens"] = tuple(kwargs["tokens"])
        kwargs["subject_range"] = tuple(kwargs["subject_range"])
        kwargs["scores"] = {kind: _grid_from_json(grid) for kind, grid in kwargs["scores"].items()}
        return cls(**kwargs)


def _grid_to_json(grid: Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in grid.tolist()]


def _grid_from_json(rows: list[list[float | None]]) -> Tensor:
    return torch.tensor(
        [[math.nan if v is None else v for v in row] for row in rows], dtype=torch.float32
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSummary:
    """Causal traces of many facts and their ROME-style averages.

    The per-fact results stay in :attr:`facts`; the aggregates are computed
    from them: mean clean and corrupted scores, the average total effect
    (ATE, ``mean(clean - corrupted)``) and the average indirect effect (AIE)
    of each ``(bucket, layer)``, ``mean over facts of (score - corrupted)``
    (each fact first averaged over its tokens in the bucket, so every fact
    counts once), each with a 95% normal-approximation confidence interval
    over facts (:func:`mean_ci`).

    Attributes:
        facts: One :class:`FactTrace` per traced fact, in input order.
        skipped: Facts that could not be traced, with the reason.
        kinds: Hook-point types traced.
        windows: Layers restored around each cell, per kind.
        n_layers: Number of layers of the model.
        model_name: The model's ``cfg.model_name``.
        samples: Corrupted copies per fact.
        noise_std: Absolute noise std added at ``hook_embed``.
        seed: Seed of the noise (the same for every fact, as in ROME).
        metric: Patching metric (``"prob"``: ROME's probability of the answer).
        lenscope_version: Version that computed the traces.
        n_pending: Facts of the input not reached (a time budget ran out).
    """

    facts: tuple[FactTrace, ...]
    skipped: tuple[SkippedFact, ...]
    kinds: tuple[str, ...]
    windows: dict[str, int]
    n_layers: int
    model_name: str
    samples: int
    noise_std: float
    seed: int
    metric: str
    lenscope_version: str
    n_pending: int = 0

    def __post_init__(self) -> None:
        """Check that every fact was traced for every kind at every layer."""
        problems = [
            f"fact {fact.fact_id!r} has {kind} scores of shape "
            f"{tuple(fact.scores[kind].shape) if kind in fact.scores else 'missing'}"
            for fact in self.facts
            for kind in self.kinds
            if kind not in fact.scores or fact.scores[kind].shape[0] != self.n_layers
        ]
        if problems or set(self.windows) != set(self.kinds):
            raise ValueError(
                f"inconsistent DatasetSummary for kinds {self.kinds} with {self.n_layers} "
                f"layers and windows {self.windows}: "
                + "; ".join(problems[:3])
                + "; every fact needs [n_layers, pos] scores for every kind"
            )

    @property
    def n_facts(self) -> int:
        """Number of traced facts."""
        return len(self.facts)

    @property
    def n_skipped(self) -> int:
        """Number of facts skipped with a reason."""
        return len(self.skipped)

    @property
    def seconds(self) -> float:
        """Total trace time of the facts (summed per-fact wall-clock)."""
        return float(sum(fact.seconds for fact in self.facts))

    def settings(self) -> dict[str, Any]:
        """The settings a checkpoint header records (see :func:`trace_dataset`)."""
        return _settings(
            self.model_name,
            self.n_layers,
            self.kinds,
            self.windows,
            self.samples,
            self.noise_std,
            self.seed,
            self.metric,
            self.lenscope_version,
        )

    @property
    def clean_scores(self) -> Float[Tensor, " fact"]:
        """Clean score of each fact (float64)."""
        return torch.tensor([f.clean_score for f in self.facts], dtype=torch.float64)

    @property
    def corrupted_scores(self) -> Float[Tensor, " fact"]:
        """Corrupted score of each fact (float64)."""
        return torch.tensor([f.corrupted_score for f in self.facts], dtype=torch.float64)

    def clean_mean(self) -> tuple[float, float]:
        """Mean clean score and the half-width of its 95% CI."""
        return _scalar_ci(self.clean_scores)

    def corrupted_mean(self) -> tuple[float, float]:
        """Mean corrupted score and the half-width of its 95% CI."""
        return _scalar_ci(self.corrupted_scores)

    def ate(self) -> tuple[float, float]:
        """Average total effect ``mean(clean - corrupted)`` and its 95% CI half-width."""
        return _scalar_ci(self.clean_scores - self.corrupted_scores)

    def effects(self, kind: str) -> Float[Tensor, "fact bucket layer"]:
        """Per-fact indirect effects by bucket and layer (NaN where a fact lacks a bucket)."""
        return self._effects()[self._check_kind(kind)]

    def aie(self, kind: str) -> Float[Tensor, "bucket layer"]:
        """Average indirect effect per bucket (rows in :data:`BUCKETS` order) and layer."""
        return mean_ci(self.effects(kind))[0]

    def aie_ci(self, kind: str) -> Float[Tensor, "bucket layer"]:
        """Half-width of the 95% CI of :meth:`aie`."""
        return mean_ci(self.effects(kind))[1]

    def bucket_counts(self, kind: str) -> Int[Tensor, " bucket"]:
        """Number of facts that have each bucket (the ``n`` behind each AIE row)."""
        return (~torch.isnan(self.effects(kind)[:, :, 0])).sum(dim=0)

    def best(self, kind: str, bucket: str | None = None) -> tuple[float, int, str]:
        """``(AIE, layer, bucket)`` of the largest AIE of ``kind`` (within ``bucket`` if given)."""
        aie = self.aie(kind)
        if bucket is not None:
            if bucket not in BUCKETS:
                raise ValueError(f"bucket must be one of {BUCKETS}, got {bucket!r}")
            row = BUCKETS.index(bucket)
            masked = torch.full_like(aie, math.nan)
            masked[row] = aie[row]
            aie = masked
        flat = torch.nan_to_num(aie, nan=-math.inf).flatten()
        if not torch.isfinite(flat).any():
            return math.nan, -1, bucket or ""
        index = int(flat.argmax())
        row, layer = divmod(index, self.n_layers)
        return float(aie[row, layer]), layer, BUCKETS[row]

    def table(self) -> Any:
        """Per kind: facts, mean clean / corrupted score, ATE, and the best AIE with its place.

        Returns:
            A pandas DataFrame, one row per kind, with columns ``kind``,
            ``n_facts``, ``n_skipped``, ``clean``, ``corrupted``, ``ate``,
            ``ate_ci``, ``best_aie``, ``best_aie_ci``, ``best_layer``,
            ``best_bucket`` (fractions, not percent).
        """
        import pandas as pd

        clean, _ = self.clean_mean()
        corrupted, _ = self.corrupted_mean()
        ate, ate_ci = self.ate()
        rows = []
        for kind in self.kinds:
            value, layer, bucket = self.best(kind)
            ci = float(self.aie_ci(kind)[BUCKETS.index(bucket), layer]) if layer >= 0 else math.nan
            rows.append(
                {
                    "kind": kind,
                    "n_facts": self.n_facts,
                    "n_skipped": self.n_skipped,
                    "clean": clean,
                    "corrupted": corrupted,
                    "ate": ate,
                    "ate_ci": ate_ci,
                    "best_aie": value,
                    "best_aie_ci": ci,
                    "best_layer": layer,
                    "best_bucket": bucket,
                }
            )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> Any:
        """A long table: one row per ``(kind, bucket, layer)`` with AIE, CI and fact count."""
        import pandas as pd

        rows = []
        for kind in self.kinds:
            mean, half, n = mean_ci(self.effects(kind))
            for b, bucket in enumerate(BUCKETS):
                for layer in range(self.n_layers):
                    rows.append(
                        {
                            "kind": kind,
                            "bucket": bucket,
                            "layer": layer,
                            "aie": float(mean[b, layer]),
                            "ci": float(half[b, layer]),
                            "n_facts": int(n[b, layer]),
                        }
                    )
        return pd.DataFrame(rows)

    def skipped_dataframe(self) -> Any:
        """The skipped facts: ``fact_id`` and ``reason``."""
        import pandas as pd

        return pd.DataFrame(
            [dataclasses.asdict(s) for s in self.skipped], columns=["fact_id", "reason"]
        )

    def plot(self, **kwargs: Any) -> Any:
        """ROME Figure-2 style plotly figure; see :func:`lenscope.plotting.dataset.plot_dataset`."""
        from lenscope.plotting.dataset import plot_dataset

        return plot_dataset(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "format": _SUMMARY_FORMAT,
            **{k: v for k, v in self.settings().items() if k != "format"},
            "n_pending": self.n_pending,
            "facts": [fact.to_dict() for fact in self.facts],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DatasetSummary":
        """Inverse of :meth:`to_dict`."""
        _check_format(data, _SUMMARY_FORMAT, "DatasetSummary.to_dict")
        return cls(
            facts=tuple(FactTrace.from_dict(f) for f in data["facts"]),
            skipped=tuple(SkippedFact(**s) for s in data["skipped"]),
            kinds=tuple(data["kinds"]),
            windows=dict(data["windows"]),
            n_layers=data["n_layers"],
            model_name=data["model_name"],
            samples=data["samples"],
            noise_std=data["noise_std"],
            seed=data["seed"],
            metric=data["metric"],
            lenscope_version=data["lenscope_version"],
            n_pending=data.get("n_pending", 0),
        )

    def save(self, path: str | Path) -> Path:
        """Write this summary as JSON; :meth:`load` reads it back exactly."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DatasetSummary":
        """Read a summary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def _check_kind(self, kind: str) -> str:
        if kind not in self.kinds:
            raise ValueError(
                f"kind must be one of the traced kinds {self.kinds}, got {kind!r}; "
                "trace it with trace_dataset(kinds=...)"
            )
        return kind

    @functools.cached_property
    def _cached_effects(self) -> dict[str, Tensor]:
        return {
            kind: torch.stack([fact.bucket_effects(kind) for fact in self.facts])
            if self.facts
            else torch.empty(0, len(BUCKETS), self.n_layers, dtype=torch.float64)
            for kind in self.kinds
        }

    def _effects(self) -> dict[str, Tensor]:
        return self._cached_effects


def _scalar_ci(values: Float[Tensor, " fact"]) -> tuple[float, float]:
    mean, half, _ = mean_ci(values)
    return float(mean), float(half)


# ------------------------------------------------------------------ checkpoint


def _settings(
    model: str,
    n_layer: int,
    kinds: Sequence[str],
    windows: Mapping[str, int],
    samples: int,
    noise_std: float,
    seed: int,
    metric: str,
    version: str,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "lenscope_version": version,
        "model_name": model,
        "n_layers": n_layer,
        "kinds": list(kinds),
        "windows": dict(windows),
        "samples": samples,
        "noise_std": noise_std,
        "seed": seed,
        "metric": metric,
        "answer": "clean top-1",
        "positions": "subject start to last token",
    }


def _settings_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in wanted.items():
        old = saved.get(key)
        if key == "noise_std" and isinstance(old, float) and math.isclose(old, value, rel_tol=1e-6):
            continue
        if old != value:
            out.append(f"{key}: checkpoint {old!r}, this call {value!r}")
    return out


class _Checkpoint:
    """An append-only JSONL file: a settings header, then one line per finished fact.

    Each line is written with one ``write`` and flushed and fsynced before
    the next fact starts, so an interruption (Ctrl-C, a killed process)
    leaves at most one torn final line, which the next open drops.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        header = None
        if self.path.exists():
            header, self.records = self._read(settings)
        if header is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w") as f:
                self._write_line(f, dict(settings))
        self._file: Any = None  # opened on the first append

    def _read(self, settings: Mapping[str, Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        parsed: list[Any] = []
        good_end = 0
        offset = 0
        for number, line in enumerate(lines, start=1):
            complete = number < len(lines)  # the last piece has no newline after it
            try:
                value = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                rest = b"".join(lines[number:]).strip()
                if rest:  # a bad line followed by good ones: not an interrupted write
                    raise ValueError(
                        f"checkpoint {str(self.path)!r} is corrupt: line {number} is not "
                        f"valid JSON ({e}) but more lines follow; delete the file (or that "
                        "line) to start over"
                    ) from e
                break  # torn final line from an interrupted write: dropped
            if not complete and line.strip():
                break  # no newline yet: the write was cut short
            offset += len(line) + 1
            if value is not None:
                parsed.append(value)
                good_end = offset
        if good_end < len(raw):
            with self.path.open("r+b") as f:  # drop the torn tail before appending
                f.truncate(good_end)
        if not parsed:
            return None, {}
        header = parsed[0]
        if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {str(self.path)!r} must start with a lenscope dataset header "
                f"(format {CHECKPOINT_FORMAT!r}), got {str(header)[:80]!r}; pass a new "
                "checkpoint path (lenscope never overwrites other files)"
            )
        differences = _settings_differences(header, settings)
        if differences:
            raise ValueError(
                f"checkpoint {str(self.path)!r} was written with different settings, so "
                f"its facts cannot be mixed with this run ({'; '.join(differences)}); "
                "pass the same settings to resume, or a new checkpoint path to start over"
            )
        records = {}
        for record in parsed[1:]:
            records[json.dumps(record["id"])] = record  # a later line for an id wins
        return header, records

    @staticmethod
    def _write_line(f: Any, record: Mapping[str, Any]) -> None:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a")
        self._write_line(self._file, record)
        self.records[json.dumps(record["id"])] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------ trace_dataset


def trace_dataset(
    tracer: CausalTracer,
    facts: Facts,
    *,
    kinds: Sequence[str] = DEFAULT_KINDS,
    windows: int | Mapping[str, int] | None = None,
    samples: int = 10,
    noise: float | None = None,
    noise_multiplier: float | None = None,
    seed: int = 0,
    metric: str | PatchingMetric = "prob",
    checkpoint: str | Path | None = None,
    max_seconds: float | int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> DatasetSummary:
    """Trace every fact and average the effects per ROME token bucket and layer.

    Each fact is traced with :meth:`CausalTracer.trace_kinds` on its
    ``prompt`` and ``subject``, the answer fixed to the model's clean top-1
    token (ROME's choice; filter with :func:`filter_known` first so that it
    is the right answer), the same noise seed for every fact, and only the
    positions from the subject's first token on (earlier ones belong to no
    bucket; their scores are NaN).

    Facts that cannot be traced (not a dict, missing or empty ``prompt`` /
    ``subject``, a subject absent from its prompt, a prompt too long for
    the model, a duplicate id) are skipped with a reason and counted in the
    summary, never raised halfway through a run.

    With ``checkpoint``, the JSONL file gets a header line with the settings
    (model, layers, kinds, windows, samples, noise std, seed, metric,
    lenscope version), then one line per finished or skipped fact, flushed
    and fsynced as it finishes. Calling again with the same file resumes:
    facts already there are read back, never recomputed; a torn final line
    (an interrupted write) is dropped; a file written with other settings
    is refused. Ctrl-C (``KeyboardInterrupt``) propagates and leaves a
    valid checkpoint.

    Args:
        tracer: The tracer (model, noise multiplier, strategy, batch size).
        facts: Facts with ``prompt`` and ``subject`` (ids from ``known_id`` or
            ``id``, else their index); see :func:`load_facts`.
        kinds: Hook-point types to trace.
        windows: Layers restored around each cell; default ROME's (1 for
            residual kinds, 10 for ``mlp_out``/``attn_out``).
        samples: Corrupted copies per fact (ROME: 10).
        noise: Absolute noise std; default ``noise_multiplier * tracer.sigma``.
        noise_multiplier: Multiple of the embedding sigma; default the tracer's (3).
        seed: Seed of the noise draws, shared by all facts (as in ROME).
        metric: ``"prob"`` (ROME), ``"log_prob"``, or a named callable.
        checkpoint: JSONL file to write and resume from.
        max_seconds: Stop starting new facts after this much time; the
            facts not reached are counted in ``n_pending``.
        batch_size: Corrupted copies per forward pass; default the tracer's.
        progress: Show a progress bar over facts with an ETA; default the tracer's setting.

    Returns:
        The :class:`DatasetSummary` of the facts in ``facts`` (in their order;
        a checkpoint may hold more).

    Raises:
        ValueError: bad settings, a checkpoint with different settings, or a
            checkpoint fact whose prompt or subject differs from the input's.
    """
    from lenscope import __version__

    model = tracer.model
    n_layer = n_layers(model)
    kinds = _check_kinds(kinds)
    window_of = _resolve_windows(windows, kinds, n_layer)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}; ROME uses 10")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0")
    if max_seconds is not None and not (
        isinstance(max_seconds, int | float)
        and not isinstance(max_seconds, bool)
        and max_seconds > 0
    ):
        raise ValueError(
            f"max_seconds must be a positive number of seconds, got {max_seconds!r}; "
            "pass e.g. max_seconds=1800 for half an hour"
        )
    metric_name, _ = resolve_metric(metric)
    noise_std = tracer._noise_std(noise, noise_multiplier)
    settings = _settings(
        model_name(model),
        n_layer,
        kinds,
        window_of,
        samples,
        noise_std,
        seed,
        metric_name,
        __version__,
    )
    pairs = _prepared(facts)
    store = _Checkpoint(checkpoint, settings) if checkpoint is not None else None
    records: dict[str, dict[str, Any]] = dict(store.records) if store else {}
    seen: set[str] = set()
    todo: list[int] = []
    order_records: list[dict[str, Any] | None] = []
    for index, (fact_id, fact) in enumerate(pairs):
        key = json.dumps(fact_id)
        if key in seen:
            reason = f"duplicate id {fact_id!r} (each fact id must be unique)"
            order_records.append(_skip_record(fact_id, fact, reason))
            continue
        seen.add(key)
        old = records.get(key)
        if old is not None and _same_fact(old, fact):
            order_records.append(old)
            continue
        if old is not None and old["status"] == "done":
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} holds fact {fact_id!r} with prompt "
                f"{old['fact']['prompt']!r} and subject {old['fact']['subject']!r}, but the "
                f"facts give {_field(fact, 'prompt')!r} and {_field(fact, 'subject')!r}; "
                "give each fact a unique id, or pass a new checkpoint path"
            )
        order_records.append(None)
        todo.append(index)

    show = tracer.progress if progress is None else progress
    started = time.perf_counter()
    n_pending = 0
    bar = tqdm(
        total=len(pairs),
        initial=len(pairs) - len(todo),
        desc="trace dataset",
        unit="fact",
        disable=not show,
        dynamic_ncols=True,
    )
    try:
        with bar:
            for done, index in enumerate(todo):
                if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                    n_pending = len(todo) - done
                    break
                fact_id, fact = pairs[index]
                record = _trace_one(
                    tracer,
                    fact_id,
                    fact,
                    kinds=kinds,
                    windows=window_of,
                    samples=samples,
                    noise_std=noise_std,
                    seed=seed,
                    metric=metric,
                    batch_size=batch_size,
                )
                if store is not None:
                    store.append(record)
                order_records[index] = record
                bar.update(1)
    finally:
        if store is not None:
            store.close()

    traced = tuple(
        FactTrace.from_dict(r["fact"])
        for r in order_records
        if r is not None and r["status"] == "done"
    )
    skipped = tuple(
        SkippedFact(r["id"], r["reason"])
        for r in order_records
        if r is not None and r["status"] == "skipped"
    )
    return DatasetSummary(
        facts=traced,
        skipped=skipped,
        kinds=kinds,
        windows=window_of,
        n_layers=n_layer,
        model_name=settings["model_name"],
        samples=samples,
        noise_std=noise_std,
        seed=seed,
        metric=metric_name,
        lenscope_version=__version__,
        n_pending=n_pending,
    )


def _field(fact: Any, name: str) -> Any:
    return fact.get(name) if isinstance(fact, Mapping) else None


def _same_fact(record: Mapping[str, Any], fact: Any) -> bool:
    saved = record["fact"] if record["status"] == "done" else record
    return all(saved.get(name) == _field(fact, name) for name in ("prompt", "subject"))


def _skip_record(fact_id: int | str, fact: Any, reason: str) -> dict[str, Any]:
    prompt, subject = _field(fact, "prompt"), _field(fact, "subject")
    return {
        "id": fact_id,
        "status": "skipped",
        "reason": reason,
        "prompt": prompt if isinstance(prompt, str) else None,
        "subject": subject if isinstance(subject, str) else None,
    }


def _trace_one(
    tracer: CausalTracer,
    fact_id: int | str,
    fact: Any,
    *,
    kinds: tuple[str, ...],
    windows: dict[str, int],
    samples: int,
    noise_std: float,
    seed: int,
    metric: str | PatchingMetric,
    batch_size: int | None,
) -> dict[str, Any]:
    """Trace one fact; a checkpoint record (``done`` or ``skipped`` with the reason)."""
    problem = _fact_problem(fact, ("prompt", "subject"))
    if problem is None and fact["subject"].strip() not in fact["prompt"]:
        problem = f"subject {fact['subject']!r} does not occur in the prompt {fact['prompt']!r}"
    if problem is None:
        try:
            tokens = prompt_tokens(tracer.model, fact["prompt"])
            subject_range = find_subject(tracer.model, tokens, fact["subject"])
        except (ValueError, TypeError) as e:
            problem = str(e)
    if problem is not None:
        return _skip_record(fact_id, fact, problem)
    started = time.perf_counter()
    results = tracer.trace_kinds(
        tokens,
        subject_range,
        kinds=kinds,
        windows=windows,
        samples=samples,
        noise=noise_std,
        seed=seed,
        metric=metric,
        positions=list(range(subject_range[0], int(tokens.shape[0]))),
        batch_size=batch_size,
        progress=False,
        top_k=1,
    )
    first = results[kinds[0]]
    attribute = fact.get("attribute")
    trace = FactTrace(
        fact_id=fact_id,
        prompt=fact["prompt"],
        subject=fact["subject"],
        tokens=first.tokens,
        subject_range=first.subject_range,
        answer=first.answer,
        answer_id=first.answer_id,
        clean_score=first.clean_score,
        corrupted_score=first.corrupted_score,
        scores={kind: result.scores for kind, result in results.items()},
        attribute=attribute if isinstance(attribute, str) else None,
        seconds=float(time.perf_counter() - started),
    )
    return {"id": fact_id, "status": "done", "fact": trace.to_dict()}


def _check_optional_positive_int(name: str, value: Any, example: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass {example}")


# ------------------------------------------------------------------ command line


def add_dataset_arguments(
    parser: argparse.ArgumentParser, *, model_arguments: bool = False
) -> argparse.ArgumentParser:
    """Add the options of ``lenscope dataset`` to ``parser``.

    Args:
        parser: The subcommand's parser.
        model_arguments: Also add ``--model``, ``--bridge``, ``--device`` and
            ``--dtype`` (leave False when the caller adds its shared model options).

    Returns:
        The same parser.
    """
    from lenscope.cli import positive_int_arg

    if model_arguments:
        parser.add_argument(
            "--model",
            default="gemma-3-270m",
            help="model name for lenscope.load_model (default gemma-3-270m)",
        )
        parser.add_argument(
            "--bridge",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="--bridge: TransformerBridge, --no-bridge: HookedTransformer (TransformerLens "
            "3.9); default: the installed TransformerLens' own class",
        )
        parser.add_argument("--device", help="torch device, e.g. cpu or cuda")
        parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument(
        "--facts",
        type=Path,
        default=None,
        help="JSON/JSONL fact file (default: the ROME known facts shipped with lenscope)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int_arg,
        default=None,
        help="trace the first N facts the model knows (default: all)",
    )
    parser.add_argument(
        "--no-filter",
        action="store_true",
        help="trace the facts as given, without keeping only the known ones",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML report (default report.html)"
    )
    parser.add_argument(
        "--summary", type=Path, default=None, help="also save the DatasetSummary as JSON"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="JSONL checkpoint, written as each fact finishes; rerun with the same file to resume",
    )
    parser.add_argument(
        "--kinds",
        default=",".join(DEFAULT_KINDS),
        help=f"hook-point types, comma-separated (default {','.join(DEFAULT_KINDS)})",
    )
    parser.add_argument(
        "--samples",
        type=positive_int_arg,
        default=10,
        help="corrupted copies per fact (default 10, as in ROME)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop starting new facts after this many minutes",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_dataset_cli(args: argparse.Namespace, model_factory: Any = None) -> int:
    """Run ``lenscope dataset``: filter the known facts, trace them, write an HTML report.

    Prints the per-kind table (:meth:`DatasetSummary.table`) on stdout.

    Args:
        args: Options from :func:`add_dataset_arguments` plus ``--model``,
            ``--bridge``, ``--device`` and ``--dtype``.
        model_factory: Replaces :func:`lenscope.loading.load_model`, called as
            ``model_factory(name, bridge=..., device=..., dtype=...)``.

    Returns:
        The exit status, 0.
    """
    from lenscope.plotting.dataset import save_dataset_report

    factory = model_factory or _load_model
    model = factory(
        args.model,
        bridge=getattr(args, "bridge", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
    )
    tracer = CausalTracer(model, progress=not args.quiet)
    facts = load_facts(args.facts) if args.facts else known_facts()
    if args.no_filter:
        chosen = facts[: args.limit] if args.limit else facts
    else:
        chosen = filter_known(tracer, facts, limit=args.limit)
        print(f"{len(chosen)} facts known to {model_name(model)} selected", file=sys.stderr)
    summary = trace_dataset(
        tracer,
        chosen,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        samples=args.samples,
        seed=args.seed,
        checkpoint=args.checkpoint,
        max_seconds=None if args.minutes is None else args.minutes * 60,
    )
    path = save_dataset_report(summary, args.out)
    if args.summary:
        summary.save(args.summary)
    print(summary.table().to_string(index=False))
    print(
        f"{summary.n_facts} facts traced, {summary.n_skipped} skipped, {summary.n_pending} "
        f"not reached; report written to {path}",
        file=sys.stderr,
    )
    return 0


def _load_model(name: str, **kwargs: Any) -> torch.nn.Module:
    from lenscope.loading import load_model

    return load_model(name, **kwargs)
