"""The committed replication (docs/replication.md) agrees with the summaries committed beside it.

``scripts/replicate.py`` writes the report and ``docs/replication/``: each
run's ``DatasetSummary`` (every fact's grids, gzipped) and the averages
behind the figures. These tests recompute the headline numbers from the
per-fact records with plain Python, so a report edited by hand, or data and
report from different runs, fail here.
"""

import gzip
import json
from pathlib import Path

import pytest
from plain_stats import mean_ci as _mean_ci
from plain_stats import pct as _pct
from plain_stats import share_of_total, where

from lenscope.datasets import BUCKETS, DatasetSummary

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = sorted(p.name.removesuffix(".json.gz") for p in (DOCS / "replication").glob("*.json.gz"))


def _load(run: str) -> DatasetSummary:
    raw = gzip.decompress((DOCS / "replication" / f"{run}.json.gz").read_bytes())
    return DatasetSummary.from_dict(json.loads(raw))


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


def _effects(summary: DatasetSummary, kind: str, bucket: str) -> list[list[float | None]]:
    """Per fact and layer: mean restored score over the bucket's tokens minus corrupted."""
    out = []
    for fact in summary.facts:
        positions = fact.buckets()[bucket]
        row = []
        for layer in range(summary.n_layers):
            if positions:
                cells = [float(fact.scores[kind][layer, p]) for p in positions]
                row.append(sum(cells) / len(cells) - fact.corrupted_score)
            else:
                row.append(None)
        out.append(row)
    return out


@pytest.mark.parametrize(
    ("kind", "bucket", "words"),
    [
        ("mlp_out", "last_subject", "MLP AIE at the last subject token peaks at "),
        ("attn_out", "last", "attention AIE at the last token peaks at "),
        ("resid_post", "last_subject", "hidden-state AIE at the last subject token peaks at "),
    ],
)
def test_peaks_plateaus_and_shares_of_ate_are_recomputed(report, kind, bucket, words):
    summary = _load("noise")
    effects = _effects(summary, kind, bucket)
    peak, words_at = where(effects, summary.n_layers)
    assert words + words_at in report
    # The share of the ATE at the peak: a ratio of means, delta-method 95% CI.
    ratio, half, _ = share_of_total(
        [
            (row[peak], f.clean_score - f.corrupted_score)
            for row, f in zip(effects, summary.facts, strict=True)
            if row[peak] is not None
        ]
    )
    assert f"({_pct(ratio)} ± {_pct(half)} of the ATE) at {words_at}" in report


def test_the_page_is_redrawn_byte_identically_from_the_committed_data(tmp_path):
    import shutil
    import subprocess
    import sys

    docs = tmp_path / "docs"
    shutil.copytree(DOCS / "replication", docs / "replication")
    scripts = DOCS.parent / "scripts"
    subprocess.run(
        [sys.executable, "replicate.py", "--from-docs", "--no-screenshot", "--docs", str(docs)],
        check=True,
        capture_output=True,
        cwd=scripts,
    )
    assert (docs / "replication.md").read_text() == (DOCS / "replication.md").read_text()
