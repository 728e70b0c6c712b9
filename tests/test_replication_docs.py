"""The committed replication (docs/replication.md) agrees with the summaries committed beside it.

``scripts/replicate.py`` writes the report and ``docs/replication/``: each
run's ``DatasetSummary`` (every fact's grids, gzipped) and the averages
behind the figures. These tests recompute the headline numbers from the
per-fact records with plain Python, so a report edited by hand, or data and
report from different runs, fail here.
"""

import gzip
import json
import math
from pathlib import Path

import pytest

from lenscope.datasets import BUCKETS, DatasetSummary

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = sorted(p.name.removesuffix(".json.gz") for p in (DOCS / "replication").glob("*.json.gz"))


def _load(run: str) -> DatasetSummary:
    raw = gzip.decompress((DOCS / "replication" / f"{run}.json.gz").read_bytes())
    return DatasetSummary.from_dict(json.loads(raw))


def _mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


@pytest.fixture(scope="module")
def report() -> str:
    return (DOCS / "replication.md").read_text()


@pytest.fixture(scope="module")
def aggregates() -> dict:
    return json.loads((DOCS / "replication" / "aggregates.json").read_text())


def test_at_least_300_known_facts_were_traced_with_noise(report):
    assert {"noise", "str_prob", "str_nld", "attr_noise", "attr_str"} <= set(RUNS)
    noise = _load("noise")
    assert noise.n_facts >= 300
    assert noise.samples == 10 and noise.metric == "prob"
    assert noise.windows == {"resid_post": 1, "mlp_out": 4, "attn_out": 4}
    assert f"**N = {noise.n_facts}** known facts" in report


@pytest.mark.parametrize("run", ["noise", "str_prob"])
def test_total_effect_in_the_report_is_recomputed_from_the_facts(run, report, aggregates):
    summary = _load(run)
    clean = [f.clean_score for f in summary.facts]
    corrupted = [f.corrupted_score for f in summary.facts]
    ate = _mean_ci([c - k for c, k in zip(clean, corrupted, strict=True)])
    for name, value in (("clean", _mean_ci(clean)), ("corrupted", _mean_ci(corrupted))):
        assert aggregates[run][name] == pytest.approx(value, rel=1e-3)
    assert aggregates[run]["ate"] == pytest.approx(ate, rel=1e-3)
    assert f"{_pct(ate[0])} ± {_pct(ate[1])}" in report


@pytest.mark.parametrize("run", RUNS)
def test_aggregates_are_the_average_of_the_committed_facts(run, aggregates):
    """The AIE of the last subject token's MLP and last token's attention, per layer, by hand."""
    summary = _load(run)
    assert summary.n_facts >= 100
    for kind, bucket in (("mlp_out", "last_subject"), ("attn_out", "last")):
        saved = aggregates[run][kind]["aie"][BUCKETS.index(bucket)]
        for layer in range(summary.n_layers):
            values = []
            for fact in summary.facts:
                positions = fact.buckets()[bucket]
                if positions:
                    cells = [float(fact.scores[kind][layer, p]) for p in positions]
                    values.append(sum(cells) / len(cells) - fact.corrupted_score)
            assert saved[layer] == pytest.approx(sum(values) / len(values), abs=1e-3)
