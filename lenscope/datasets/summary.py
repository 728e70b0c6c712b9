"""What a dataset trace keeps of each fact, and ROME's averages over facts.

ROME's localisation claims (Meng et al., "Locating and Editing Factual
Associations in GPT", NeurIPS 2022, arXiv 2202.05262, Section 2.2 and
Figure 2) are averages over facts: the average total effect (ATE) of the
corruption and the average indirect effect (AIE) of each layer per token
bucket. Token buckets follow ROME's Figure 2 (:func:`token_buckets`): first
subject token, middle subject tokens, last subject token, first subsequent
token, further tokens, last token; tokens before the subject (BOS, and
words such as "In" in "In Marshall Islands, ...") belong to no bucket.
:class:`FactTrace` is one fact's trace, :class:`DatasetSummary` the facts
and their averages with 95% confidence intervals (:func:`mean_ci`).
"""

import dataclasses
import functools
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.datasets.checkpoint import DATASET_TRACE_FIXED, checkpoint_header
from lenscope.datasets.facts import SkippedFact
from lenscope.results import (
    NoiseProperties,
    check_record,
    corruption_text,
    fold_noise_fields,
    load_record,
    short_text,
    tensor_from_json,
    to_json_value,
    write_json,
)
from lenscope.validation import InvalidInput

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

_SUMMARY_FORMAT = "lenscope.DatasetSummary/2"
_OLD_SUMMARY_FORMAT = "lenscope.DatasetSummary/1"
"""Summaries with ``samples``/``noise_std``/``seed`` fields beside the corruption's record."""
_FACT_FORMAT = "lenscope.FactTrace/1"


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
        raise InvalidInput(
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
        answer_ids: Every token of an answer of several tokens (a trace with
            ``answers="attribute"``: ``answer`` is then its whole text and
            ``answer_id`` its first token); None for a one-token answer.
        normalization: For a normalised metric (``normalized_logit_diff``),
            the fact's raw clean and corrupted values (its logit differences),
            as :attr:`lenscope.TraceResult.normalization`; None otherwise.
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
    answer_ids: tuple[int, ...] | None = None
    normalization: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Check that every score grid has one column per token."""
        n_pos = len(self.tokens)
        bad = [k for k, v in self.scores.items() if v.ndim != 2 or v.shape[1] != n_pos]
        start, end = self.subject_range
        if bad or not self.scores or not 0 <= start < end <= n_pos:
            raise InvalidInput(
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
            "scores": {kind: to_json_value(grid) for kind, grid in self.scores.items()},
            "attribute": self.attribute,
            "seconds": self.seconds,
            **({} if self.answer_ids is None else {"answer_ids": list(self.answer_ids)}),
            **({} if self.normalization is None else {"normalization": list(self.normalization)}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "FactTrace":
        """Inverse of :meth:`to_dict`."""
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        check_record(data, _FACT_FORMAT, "FactTrace.to_dict", required)
        kwargs = {k: v for k, v in data.items() if k != "format"}
        kwargs["tokens"] = tuple(kwargs["tokens"])
        kwargs["subject_range"] = tuple(kwargs["subject_range"])
        for name in ("answer_ids", "normalization"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(kwargs[name])
        kwargs["scores"] = {
            kind: tensor_from_json(grid, torch.float32) for kind, grid in kwargs["scores"].items()
        }
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Plateau:
    """A peak of a dataset's AIE and the layers it cannot be told apart from.

    See :meth:`DatasetSummary.plateau`.

    Attributes:
        kind: The kind.
        bucket: The token bucket.
        layer: The peak's layer.
        aie: The AIE there.
        ci: Its 95% CI half-width.
        n: Facts that have the bucket.
        layers: The adjacent layers (peak included, ascending) whose paired
            difference from the peak has a 95% CI containing zero.
        differences: ``{layer: (mean, half_width, n)}`` of the per-fact
            difference peak - layer, for every other layer.
    """

    kind: str
    bucket: str
    layer: int
    aie: float
    ci: float
    n: int
    layers: tuple[int, ...]
    differences: dict[int, tuple[float, float, int]]

    @property
    def is_plateau(self) -> bool:
        """Whether a neighbouring layer cannot be told apart from the peak."""
        return len(self.layers) > 1

    @property
    def tied(self) -> tuple[int, ...]:
        """Every other layer, adjacent or not, whose difference's 95% CI contains zero."""
        return tuple(
            layer
            for layer, (mean, half, _) in sorted(self.differences.items())
            if not (mean - half > 0 or mean + half < 0)
        )

    def describe(self) -> str:
        """In words: ``"layer 5"`` or ``"a plateau over layers 3-5 (peak 5)"``.

        Other layers that cannot be told apart are added: ``"layer 3 (layer 1 within the CI)"``.
        """
        text = (
            f"a plateau over layers {self.layers[0]}-{self.layers[-1]} (peak {self.layer})"
            if self.is_plateau
            else f"layer {self.layer}"
        )
        others = [layer for layer in self.tied if layer not in self.layers]
        if others:
            names = ", ".join(str(layer) for layer in others)
            text += f" ({'layer' if len(others) == 1 else 'layers'} {names} within the CI)"
        return text


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """One worker's share of a dataset trace (:mod:`lenscope.datasets.executors`).

    Attributes:
        worker: Its name: ``"local"`` for the calling process, ``"ray-0 (host, pid 123)"``
            for the first Ray worker.
        n_facts: Facts it finished in this call (facts read back from a
            checkpoint count for no worker).
        seconds: Wall-clock time from its model being ready to its last
            finished fact (or its failure).
        setup_seconds: Time it took to build its model (0 for ``"local"``,
            whose model the caller built).
        failure: Why it stopped before the run ended (a killed process, out of
            memory), or ``None``. Its unfinished fact went to another worker.
    """

    worker: str
    n_facts: int
    seconds: float
    setup_seconds: float = 0.0
    failure: str | None = None

    @property
    def facts_per_second(self) -> float:
        """Throughput: ``n_facts / seconds`` (NaN before the first fact)."""
        return self.n_facts / self.seconds if self.seconds > 0 else math.nan


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSummary(NoiseProperties):
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
        corruption: The corruption's settings record
            (:meth:`lenscope.corruptions.Corruption.to_dict`): for Gaussian
            noise its samples, std and seed (the same for every fact, as in
            ROME), for counterfactual prompts their column. :attr:`samples`,
            :attr:`noise_std` and :attr:`seed` read it.
        metric: Patching metric (``"prob"``: ROME's probability of the answer).
        lenscope_version: Version that computed the traces.
        n_pending: Facts of the input not reached (a time budget ran out).
        workers: Who traced the facts of this call, with each one's
            throughput and failure (:class:`WorkerStats`); empty when every
            fact came from a checkpoint.
        answers: What each fact was scored on: ``"top1"`` (the clean top-1
            token, as in ROME) or ``"attribute"`` (the whole attribute,
            teacher-forced; ``trace_dataset(answers=...)``).
        direction: ``"denoise"`` (clean activations restored into the
            corrupted run, ROME's) or ``"noise"`` (corrupted activations
            patched into the clean run), as :class:`lenscope.TraceSettings`
            records it.
        weights: Where the model's weights came from and the precision it
            ran in (:func:`lenscope.loading.weights_description`), as the
            traced model reported it; None for a model
            :func:`lenscope.load_model` did not build and for a summary
            merged from checkpoints alone (they do not record it).
    """

    facts: tuple[FactTrace, ...]
    skipped: tuple[SkippedFact, ...]
    kinds: tuple[str, ...]
    windows: dict[str, int]
    n_layers: int
    model_name: str
    corruption: dict[str, Any]
    metric: str
    lenscope_version: str
    n_pending: int = 0
    workers: tuple[WorkerStats, ...] = ()
    answers: str = "top1"
    direction: str = "denoise"
    weights: str | None = None

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
            raise InvalidInput(
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
        return checkpoint_header(
            self.model_name, self.n_layers, self.lenscope_version, self.trace_settings()
        )

    def trace_settings(self) -> dict[str, Any]:
        """The :meth:`lenscope.TraceSettings.to_dict` record every fact was traced with."""
        record = self.corruption
        return {
            "kinds": list(self.kinds),
            "windows": dict(self.windows),
            "metric": self.metric,
            **DATASET_TRACE_FIXED,
            "corruption": record["name"],
            **{k: v for k, v in record.items() if k != "name"},
            # As TraceSettings.to_dict: the direction only when it is not the default.
            **({} if self.direction == "denoise" else {"direction": self.direction}),
        }

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

    def raw_means(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """For a normalised metric, the mean raw clean and corrupted values, each with its CI.

        The raw values are each fact's :attr:`FactTrace.normalization` (its
        logit differences for ``normalized_logit_diff``), whose normalised
        clean and corrupted scores are 1 and 0 by definition.

        Returns:
            ``((clean mean, CI half-width), (corrupted mean, CI half-width))``,
            or None when a fact does not record its raw values (another
            metric, or a summary written before they were recorded).
        """
        raw = [f.normalization for f in self.facts]
        if not raw or any(r is None for r in raw):
            return None
        values = torch.tensor(raw, dtype=torch.float64)
        return _scalar_ci(values[:, 0]), _scalar_ci(values[:, 1])

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

    def difference(
        self, kind: str, bucket: str, other: str, layer: int
    ) -> tuple[float, float, int]:
        """How much larger the effect is in ``bucket`` than in ``other``, paired over facts.

        Each fact's indirect effect in ``bucket`` minus its effect in
        ``other`` at ``layer``, averaged over the facts that have both
        buckets, with the 95% CI of that mean (:func:`mean_ci`). Paired, so
        the facts' differing totals cancel: the test behind "the MLP effect
        at the last subject token exceeds the first subject token's".

        Returns:
            ``(mean, half_width, n)``; NaN half-width for ``n < 2``.
        """
        _check_bucket("bucket", bucket)
        _check_bucket("other", other)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InvalidInput(
                f"layer must be an integer in [0, {self.n_layers}), got {layer!r}; pass e.g. "
                f"the layer of summary.best({kind!r}, bucket={bucket!r})"
            )
        effects = self.effects(kind)[:, :, layer]
        paired = effects[:, BUCKETS.index(bucket)] - effects[:, BUCKETS.index(other)]
        mean, half, n = mean_ci(paired)
        return float(mean), float(half), int(n)

    def plateau(self, kind: str, bucket: str, layer: int | None = None) -> "Plateau":
        """The peak of ``kind`` in ``bucket`` and the layers it cannot be told apart from.

        A peak is the layer of the largest AIE (or ``layer``). Each other
        layer is compared with it *paired over facts*: per fact, the effect
        at the peak minus the effect there (:func:`mean_ci` of those
        differences). The plateau is the run of adjacent layers around the
        peak whose difference's 95% CI contains zero:
        "the peak is at layer 5" only when that run is the peak alone, else
        "a plateau over layers 3-5". Every layer's difference is kept in
        :attr:`Plateau.differences`.

        Args:
            kind: A traced kind.
            bucket: A bucket of :data:`BUCKETS`.
            layer: The layer to compare with (default: the peak's).

        Returns:
            The :class:`Plateau`.
        """
        _check_bucket("bucket", bucket)
        effects = self.effects(kind)[:, BUCKETS.index(bucket)]
        if layer is None:
            layer = self.best(kind, bucket=bucket)[1]
        elif (
            isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers
        ):
            raise InvalidInput(
                f"layer must be an integer in [0, {self.n_layers}), got {layer!r}; pass e.g. "
                f"the layer of summary.best({kind!r}, bucket={bucket!r}), or leave it out"
            )
        if layer < 0:
            raise InvalidInput(
                f"no fact has bucket {bucket!r}, so it has no peak; pick another bucket"
            )
        mean, half, n = mean_ci(effects[:, layer])
        differences = {}
        for other in range(self.n_layers):
            if other != layer:
                d_mean, d_half, d_n = mean_ci(effects[:, layer] - effects[:, other])
                differences[other] = (float(d_mean), float(d_half), int(d_n))

        def tied(other: int) -> bool:
            d_mean, d_half, _ = differences[other]
            # NaN half-width (n < 2): cannot be told apart
            return not (d_mean - d_half > 0 or d_mean + d_half < 0)

        low = layer
        while low > 0 and tied(low - 1):
            low -= 1
        high = layer
        while high < self.n_layers - 1 and tied(high + 1):
            high += 1
        return Plateau(
            kind=kind,
            bucket=bucket,
            layer=layer,
            aie=float(mean),
            ci=float(half),
            n=int(n),
            layers=tuple(range(low, high + 1)),
            differences=differences,
        )

    def share_of_ate(self, kind: str, bucket: str, layer: int) -> tuple[float, float, int]:
        """The AIE of a cell as a share of the ATE, with a 95% CI (ratio estimator).

        ``R = mean(e) / mean(t)`` over the facts that have ``bucket``, with
        ``e`` a fact's indirect effect there and ``t`` its total effect
        (clean - corrupted). The CI is the delta method's normal approximation
        for a ratio of means of paired values: ``1.96 * std(e - R t) /
        (sqrt(n) * |mean(t)|)``, so the facts' shared variation cancels.

        Returns:
            ``(share, half_width, n)``; NaN half-width for ``n < 2``.
        """
        _check_bucket("bucket", bucket)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InvalidInput(
                f"layer must be an integer in [0, {self.n_layers}), got {layer!r}; pass e.g. "
                f"the layer of summary.best({kind!r}, bucket={bucket!r})"
            )
        effect = self.effects(kind)[:, BUCKETS.index(bucket), layer]
        total = self.clean_scores - self.corrupted_scores
        keep = ~torch.isnan(effect)
        effect, total = effect[keep], total[keep]
        n = int(keep.sum())
        if n == 0:
            return math.nan, math.nan, 0
        ratio = float(effect.mean() / total.mean())
        if n < 2:
            return ratio, math.nan, n
        residual = effect - ratio * total
        half = CI_Z * float(residual.std()) / (math.sqrt(n) * abs(float(total.mean())))
        return ratio, half, n

    def subset(self, fact_ids: Any) -> "DatasetSummary":
        """The summary of only the facts whose ids are in ``fact_ids`` (their order kept).

        For comparisons on the same facts, e.g. the facts traced both with
        noise and with a counterfactual: ``a.subset({f.fact_id for f in b.facts})``.
        Skipped and pending facts and worker statistics are left out.
        """
        keep = set(fact_ids)
        return dataclasses.replace(
            self,
            facts=tuple(f for f in self.facts if f.fact_id in keep),
            skipped=(),
            n_pending=0,
            workers=(),
        )

    def best(self, kind: str, bucket: str | None = None) -> tuple[float, int, str]:
        """``(AIE, layer, bucket)`` of the largest AIE of ``kind`` (within ``bucket`` if given)."""
        aie = self.aie(kind)
        if bucket is not None:
            _check_bucket("bucket", bucket)
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

    def __repr__(self) -> str:
        """One line: model, number of facts (traced, skipped, pending), kinds and samples."""
        pending = f", {self.n_pending} pending" if self.n_pending else ""
        return (
            f"DatasetSummary(model={short_text(self.model_name, 40)}, {self.n_facts} facts, "
            f"{self.n_skipped} skipped{pending}, kinds={self.kinds}, "
            f"corruption={short_text(corruption_text(self.corruption), 50)}, "
            f"metric={self.metric!r})"
        )

    def _repr_html_(self) -> str:
        """The counts of :meth:`__repr__` above :meth:`table` (Jupyter)."""
        pending = f", {self.n_pending} pending" if self.n_pending else ""
        head = (
            f"<p><b>DatasetSummary</b> of {html.escape(self.model_name)}: {self.n_facts} facts, "
            f"{self.n_skipped} skipped{pending}; {html.escape(corruption_text(self.corruption))}, "
            f"metric {html.escape(self.metric)}</p>"
        )
        return head + self.table().to_html(index=False, float_format=lambda x: f"{x:.3g}")

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

    def workers_dataframe(self) -> Any:
        """Per worker: facts finished, seconds, facts per second, setup seconds, failure."""
        import pandas as pd

        columns = ["worker", "n_facts", "seconds", "facts_per_second", "setup_seconds", "failure"]
        return pd.DataFrame(
            [
                {**dataclasses.asdict(w), "facts_per_second": w.facts_per_second}
                for w in self.workers
            ],
            columns=columns,
        )

    def plot(self, **kwargs: Any) -> Any:
        """ROME Figure-2 style plotly figure; see :func:`lenscope.plotting.dataset.plot_dataset`."""
        from lenscope.plotting.dataset import plot_dataset

        return plot_dataset(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "format": _SUMMARY_FORMAT,
            "lenscope_version": self.lenscope_version,
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "kinds": list(self.kinds),
            "windows": dict(self.windows),
            "metric": self.metric,
            "corruption": self.corruption,
            "n_pending": self.n_pending,
            "facts": [fact.to_dict() for fact in self.facts],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "workers": [dataclasses.asdict(w) for w in self.workers],
            **({} if self.answers == "top1" else {"answers": self.answers}),
            **({} if self.direction == "denoise" else {"direction": self.direction}),
            **({} if self.weights is None else {"weights": self.weights}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "DatasetSummary":
        """Inverse of :meth:`to_dict`."""
        if isinstance(data, Mapping) and data.get("format") == _OLD_SUMMARY_FORMAT:
            data = {**fold_noise_fields(data), "format": _SUMMARY_FORMAT}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        check_record(data, _SUMMARY_FORMAT, "DatasetSummary.to_dict", required)
        return cls(
            facts=tuple(FactTrace.from_dict(f) for f in data["facts"]),
            skipped=tuple(SkippedFact(**s) for s in data["skipped"]),
            kinds=tuple(data["kinds"]),
            windows=dict(data["windows"]),
            n_layers=data["n_layers"],
            model_name=data["model_name"],
            corruption=dict(data["corruption"]),
            metric=data["metric"],
            lenscope_version=data["lenscope_version"],
            n_pending=data.get("n_pending", 0),
            workers=tuple(WorkerStats(**w) for w in data.get("workers", ())),
            answers=data.get("answers", "top1"),
            direction=data.get("direction", "denoise"),
            weights=data.get("weights"),
        )

    def save(self, path: str | Path) -> Path:
        """Write this summary as JSON; :meth:`load` reads it back exactly."""
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "DatasetSummary":
        """Read a summary written by :meth:`save`."""
        return load_record(path, cls.__name__, cls.from_dict)

    def _check_kind(self, kind: str) -> str:
        if kind not in self.kinds:
            raise InvalidInput(
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


def _check_bucket(name: str, bucket: Any) -> None:
    if bucket not in BUCKETS:
        raise InvalidInput(f"{name} must be one of {BUCKETS}, got {bucket!r}")


def _scalar_ci(values: Float[Tensor, " fact"]) -> tuple[float, float]:
    mean, half, _ = mean_ci(values)
    return float(mean), float(half)
