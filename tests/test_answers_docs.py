"""docs/answers.md agrees with the two runs committed beside it (docs/answers/).

``scripts/answers_report.py`` writes the page and each run's ``DatasetSummary``
(the first-token run and the whole-attribute run of the same facts). These tests
recompute every number of the page from the per-fact records in plain Python
(lists and ``math``, not lenscope's aggregation), so a page edited by hand, or
page and data from different runs, fail here.
"""

import gzip
import json
import statistics
from pathlib import Path

import pytest
from plain_stats import buckets, share_of_total, where
from plain_stats import mean_ci as _mean_ci
from plain_stats import pct as _pct

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = DOCS / "answers"
BUCKETS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")

pytestmark = pytest.mark.skipif(
    not (DATA / "noise_attribute.json.gz").exists(), reason="docs/answers/ not committed yet"
)


def _load(run: str) -> dict:
    return json.loads(gzip.decompress((DATA / f"{run}.json.gz").read_bytes()))


def _ci(pair: tuple[float, float]) -> str:
    return f"{_pct(pair[0])} ± {_pct(pair[1])}"


def _effect(fact: dict, kind: str, bucket: str, layer: int) -> float | None:
    start, end = fact["subject_range"]
    positions = buckets((start, end), len(fact["tokens"]))[bucket]
    if not positions:
        return None
    row = fact["scores"][kind][layer]
    return sum(row[p] for p in positions) / len(positions) - fact["corrupted_score"]


@pytest.fixture(scope="module")
def page() -> str:
    return (DOCS / "answers.md").read_text()


@pytest.fixture(scope="module")
def runs() -> dict:
    return {run: _load(run) for run in ("noise", "noise_attribute")}


def test_both_runs_hold_the_same_facts_and_at_least_100(runs, page):
    top, whole = runs["noise"], runs["noise_attribute"]
    assert [f["fact_id"] for f in top["facts"]] == [f["fact_id"] for f in whole["facts"]]
    assert len(top["facts"]) >= 100
    assert whole.get("answers") == "attribute" and "answers" not in top
    for a, b in zip(top["facts"], whole["facts"], strict=True):
        assert len(b["answer_ids"]) >= 2 and a["answer_id"] == b["answer_ids"][0]
    assert f"# Scoring the whole answer: {len(top['facts'])} facts" in page


def test_total_effects_and_ratios_are_recomputed(runs, page):
    top, whole = runs["noise"]["facts"], runs["noise_attribute"]["facts"]
    for facts in (top, whole):
        clean = [f["clean_score"] for f in facts]
        corrupted = [f["corrupted_score"] for f in facts]
        ate = [c - k for c, k in zip(clean, corrupted, strict=True)]
        assert f"{_ci(_mean_ci(clean))} | {_ci(_mean_ci(corrupted))} | {_ci(_mean_ci(ate))}" in page
    for field in ("clean_score", "corrupted_score"):
        ratio = [b[field] / a[field] for a, b in zip(top, whole, strict=True)]
        assert _ci(_mean_ci(ratio)) in page


SITES = (
    ("resid_post", "last_subject", "hidden state, last subject token"),
    ("mlp_out", "last_subject", "MLP, last subject token"),
    ("attn_out", "last", "attention, last token"),
    ("resid_post", "last", "hidden state, last token"),
)


@pytest.mark.parametrize(("kind", "bucket", "label"), SITES)
def test_every_site_row_and_its_finding_are_recomputed(runs, page, kind, bucket, label):
    top, whole = runs["noise"], runs["noise_attribute"]
    n_layers = top["n_layers"]
    cells, peaks, influences = [], [], []
    for run in (top, whole):
        effects = [
            [_effect(f, kind, bucket, layer) for layer in range(n_layers)] for f in run["facts"]
        ]
        peak, words = where(effects, n_layers)
        peaks.append((peak, words))
        aie = _mean_ci([row[peak] for row in effects if row[peak] is not None])
        ratio, half, _ = share_of_total(
            [
                (row[peak], f["clean_score"] - f["corrupted_score"])
                for row, f in zip(effects, run["facts"], strict=True)
                if row[peak] is not None
            ]
        )
        cells.append(f"{words} | {_ci(aie)} ({_pct(ratio)} ± {_pct(half)} of the ATE)")
    # The paired differences at the first-token run's peak: raw AIE, and share of ATE by the
    # delta method (each fact's influence on the whole run's share minus the first's).
    layer = peaks[0][0]
    pairs = [
        (_effect(a, kind, bucket, layer), _effect(b, kind, bucket, layer), a, b)
        for a, b in zip(top["facts"], whole["facts"], strict=True)
        if _effect(a, kind, bucket, layer) is not None
    ]
    raw = _mean_ci([e2 - e1 for e1, e2, _, _ in pairs])
    shares = []
    for i, run_facts in ((0, [p[2] for p in pairs]), (1, [p[3] for p in pairs])):
        ratio, _, influence = share_of_total(
            [(p[i], f["clean_score"] - f["corrupted_score"]) for p, f in zip(pairs, run_facts)]
        )
        shares.append(ratio)
        influences.append(influence)
    spread = _mean_ci([w - f for f, w in zip(*influences, strict=True)])[1]
    difference = (shares[1] - shares[0], spread)
    assert f"| {label} | {cells[0]} | {cells[1]} | {_ci(raw)}; {_ci(difference)} |" in page
    # The finding's words follow from the same numbers.
    mean, half = difference
    if mean + half < 0:
        change = f"smaller by {_pct(-mean)} ± {_pct(half)} (points)"
    elif mean - half > 0:
        change = f"larger by {_ci(difference)} (points)"
    else:
        change = f"the same within its CI ({_ci(difference)}, points)"
    assert f"- {label}: the whole attribute " in page
    bullet = page.split(f"- {label}: the whole attribute ")[1].split("\n- ")[0]
    if peaks[1][0] == peaks[0][0]:
        assert bullet.startswith(f"peaks at the same layer ({layer});")
    else:
        assert f"peaks at layer {peaks[1][0]}" in bullet
    assert f"its share of the ATE at the first-token peak is {change}." in bullet


def test_per_fact_correlations_are_recomputed(runs, page):
    names = {"resid_post": "hidden state", "mlp_out": "MLP", "attn_out": "attention"}
    for kind, name in names.items():
        values = []
        for a, b in zip(runs["noise"]["facts"], runs["noise_attribute"]["facts"], strict=True):
            pairs = [
                (x, y)
                for row_a, row_b in zip(a["scores"][kind], b["scores"][kind], strict=True)
                for x, y in zip(row_a, row_b, strict=True)
                if x is not None and y is not None
            ]
            values.append(statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs]))
        row = (
            f"| {name} | {statistics.fmean(values):.3f} | {statistics.median(values):.3f} | "
            f"{sum(v < 0.9 for v in values)} |"
        )
        assert row in page


def test_the_page_is_redrawn_from_the_committed_data(tmp_path):
    import shutil
    import subprocess
    import sys

    docs = tmp_path / "docs"
    shutil.copytree(DATA, docs / "answers")
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    subprocess.run(
        [sys.executable, str(scripts / "answers_report.py"), "--from-docs", "--docs", str(docs)],
        check=True,
        capture_output=True,
        cwd=scripts,
    )
    assert (docs / "answers.md").read_text() == (DOCS / "answers.md").read_text()


def test_the_readme_quotes_the_page(page):
    """Every number of the README's paragraph on docs/answers.md is one the page states (the
    page's own numbers are recomputed above)."""
    import re

    readme = (DOCS.parent / "README.md").read_text()
    paragraph = readme.split("**What changes when the whole answer is scored**")[1].split("\n\n")[0]
    quoted = re.findall(r"\d+\.\d+% ± \d+\.\d+%", paragraph)
    assert len(quoted) >= 6
    for value in quoted:
        assert value in page, value
    n_facts = int(re.search(r"\): (\d+) of those facts", paragraph).group(1))
    assert f"# Scoring the whole answer: {n_facts} facts" in page
