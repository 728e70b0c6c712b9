"""Dataset-level causal tracing: average indirect effects over many facts.

A single trace is an anecdote; ROME's localisation claims (Meng et al.,
"Locating and Editing Factual Associations in GPT", NeurIPS 2022,
arXiv 2202.05262, Section 2.2 and Figure 2) are averages over the ~1000
"known facts" the model gets right. One module per concept:

* :mod:`~lenscope.datasets.facts`: fact lists (ROME's set ships with
  lenscope, :func:`known_facts`), and the facts a model knows
  (:func:`filter_known`).
* :mod:`~lenscope.datasets.summary`: ROME's token buckets, one fact's trace
  (:class:`FactTrace`) and the averages over facts (:class:`DatasetSummary`:
  ATE and AIE with 95% intervals).
* :mod:`~lenscope.datasets.checkpoint`: the resumable JSONL checkpoint.
* :mod:`~lenscope.datasets.executors`: where the facts are traced: in this
  process (:class:`LocalExecutor`) or on Ray workers (:class:`RayExecutor`).
* :mod:`~lenscope.datasets.run`: :func:`trace_dataset`, which ties them together.

The ``lenscope dataset`` command (:mod:`lenscope.cli`) runs the whole pipeline.
"""

from lenscope.datasets.checkpoint import CHECKPOINT_FORMAT
from lenscope.datasets.executors import (
    Executor,
    LocalExecutor,
    RayExecutor,
    WorkerLostWarning,
    WorkerSetupError,
)
from lenscope.datasets.facts import (
    CounterfactualPairs,
    Facts,
    SkippedFact,
    attribute_answer,
    filter_known,
    known_facts,
    load_facts,
    long_answer_facts,
    pair_counterfactuals,
    starts_attribute,
)
from lenscope.datasets.run import merge_checkpoints, trace_dataset
from lenscope.datasets.summary import (
    BUCKET_LABELS,
    BUCKETS,
    CI_Z,
    DatasetSummary,
    FactTrace,
    Plateau,
    WorkerStats,
    bucket_effects,
    mean_ci,
    token_buckets,
)

__all__ = [
    "BUCKETS",
    "BUCKET_LABELS",
    "CHECKPOINT_FORMAT",
    "CI_Z",
    "CounterfactualPairs",
    "DatasetSummary",
    "Plateau",
    "Executor",
    "FactTrace",
    "Facts",
    "LocalExecutor",
    "RayExecutor",
    "SkippedFact",
    "WorkerLostWarning",
    "WorkerSetupError",
    "WorkerStats",
    "bucket_effects",
    "filter_known",
    "attribute_answer",
    "known_facts",
    "long_answer_facts",
    "load_facts",
    "merge_checkpoints",
    "mean_ci",
    "pair_counterfactuals",
    "starts_attribute",
    "token_buckets",
    "trace_dataset",
]
