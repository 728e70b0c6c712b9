"""docs/attribution.md's Gemma-3-270m table agrees with the records committed beside it.

``scripts/attribution_judge.py work`` writes one JSON line per (run, estimator,
target, fact) to ``docs/attribution_judge.jsonl``; ``report`` prints the table.
Here every row of the table is recomputed from the records with plain Python
(means and medians over the facts every estimator of a run judged), so a table
edited by hand, or a table and records from different runs, fail.
"""

import json
import statistics
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
HEADER = "| corruption | estimator | target | kind | N | Pearson mean (median) |"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    lines = (DOCS / "attribution_judge.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def table() -> list[list[str]]:
    text = (DOCS / "attribution.md").read_text()
    start = text.index(HEADER)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_row_is_recomputed_from_the_records(records, table):
    facts: dict[str, set[str]] = {}
    judged: dict[tuple, set[str]] = {}
    for r in records:
        judged.setdefault((r["run"], r["estimator"], r["target"]), set()).add(
            json.dumps(r["fact_id"])
        )
    for (run, *_), ids in judged.items():
        facts[run] = facts[run] & ids if run in facts else set(ids)
    assert len(table) == 3 * len(judged)  # one row per kind of every (run, estimator, target)
    for run, estimator, target, kind, n, pearson, spearman, recall, zeros, seconds in table:
        group = [
            r
            for r in records
            if (r["run"], f"`{r['estimator']}`", r["target"]) == (run, estimator, target)
            and json.dumps(r["fact_id"]) in facts[run]
            and "kinds" in r
        ]
        values = [r["kinds"][kind.strip("`")] for r in group]
        p = [v["pearson"] for v in values]
        r5 = [v["top_k_recall"] for v in values]
        assert int(n) == len(group)
        assert pearson == f"{statistics.fmean(p):.2f} ({statistics.median(p):.2f})"
        assert spearman == f"{statistics.fmean(v['spearman'] for v in values):.2f}"
        assert recall == f"{statistics.fmean(r5):.2f}"
        assert int(zeros) == sum(x == 0 for x in r5)
        own = statistics.median(r["seconds"] for r in group)
        exact = statistics.median(r["exact_seconds"] for r in group)
        assert seconds == f"{own:.1f} ({exact:.1f})"
