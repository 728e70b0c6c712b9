"""docs/attribution.md's Gemma-3-270m tables agree with the records committed beside them.

``scripts/attribution_judge.py work`` writes one JSON line per (run, estimator,
target, fact) to ``docs/attribution_judge.jsonl.gz``; ``recheck`` writes
``docs/attribution_judge_recheck.jsonl``; ``report`` prints the tables. Here
every row is recomputed from the records and the committed exact grids
(``docs/replication/``) with plain Python, so a table edited by hand, or a table
and records from different runs, fail.
"""

import gzip
import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import TINY_PROMPT, TINY_SUBJECT
from plain_stats import pearson, ranks, top_k

import lenscope

DOCS = Path(__file__).resolve().parents[1] / "docs"
KINDS = ("resid_post", "mlp_out", "attn_out")
EXACT = {"noise": "noise", "str": "str_nld"}
SAMPLES = {"noise": 10, "str": 1}
N_LAYERS = 18
AGREEMENT = "| corruption | estimator | target | kind | N | Pearson mean (median) |"
SUBSET = "`atp` on the same facts: `mlp_out` Pearson / recall |"
RECHECK = "| corruption | estimator | k | N | exact top 5 among the top k: `resid_post` |"
VERIFIED = (
    "| corruption | estimator | facts | re-traced cells against the committed exact grid "
    "(max abs diff) |"
)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    text = gzip.decompress((DOCS / "attribution_judge.jsonl.gz").read_bytes()).decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def exact() -> dict[str, list[dict]]:
    """Each judged run's committed exact facts, as JSON."""
    out = {}
    for run, name in EXACT.items():
        raw = gzip.decompress((DOCS / "replication" / f"{name}.json.gz").read_bytes())
        out[run] = json.loads(raw)["facts"]
    return out


@pytest.fixture(scope="module")
def page() -> str:
    return (DOCS / "attribution.md").read_text()


def _table(page: str, header: str, whole: bool = False) -> list[list[str]]:
    """The rows of the one table whose header line contains ``header`` (is it: ``whole``)."""
    (line,) = [
        x
        for x in page.splitlines()
        if x.startswith("|") and (x == header if whole else header in x)
    ]
    rows = []
    for row in page[page.index(line) :].splitlines()[2:]:
        if not row.startswith("|"):
            break
        rows.append([cell.strip() for cell in row.strip("|").split("|")])
    return rows


def _group(records: list[dict], run: str, estimator: str, target: str) -> list[dict]:
    return [
        r
        for r in records
        if "kinds" in r
        and (r["run"], f"`{r['estimator']}`", r["target"]) == (run, estimator, target)
    ]


def _rows(estimator: str, samples: int, n_layers: int = N_LAYERS) -> str:
    """Forward / backward rows of an estimate, from docs/attribution.md's table of passes."""
    forward, backward = 1 + samples, samples
    if estimator == "`atp-star`":
        forward, backward = forward + n_layers * samples, backward + n_layers * samples
    elif estimator.startswith("`ig:") or estimator == "`atp:window`":
        steps = 1 if estimator == "`atp:window`" else int(estimator.strip("`").split(":")[1])
        forward += len(KINDS) * n_layers * steps * samples
        backward += len(KINDS) * n_layers * steps * samples
    return f"{forward} / {backward}"


@pytest.mark.parametrize("estimator", ["atp", "relp", "atp-star", "ig:2", "atp:window"])
def test_the_rows_column_is_what_the_estimate_reports(estimator, tiny_gated_bridge, one_thread):
    """The table's rows are counted from each estimator's ``passes`` (here on a tiny model)."""
    tracer = lenscope.CausalTracer(tiny_gated_bridge, progress=False)
    result = tracer.attribute(
        TINY_PROMPT, TINY_SUBJECT, kinds=KINDS, samples=3, seed=0, estimator=estimator
    )
    passes = result["mlp_out"].passes
    rows = sum(passes.get(k, 0) for k in ("corrupted_rows", "graddrop_rows", "interpolated_rows"))
    n_layers = tiny_gated_bridge.cfg.n_layers
    assert _rows(f"`{estimator}`", 3, n_layers) == f"{passes['clean_forward'] + rows} / {rows}"


def _check_row(row: list[str], group: list[dict]) -> None:
    run, estimator, _, kind, n, pearson, spearman, recall, zeros, rows, seconds = row[:11]
    values = [r["kinds"][kind.strip("`")] for r in group]
    p = [v["pearson"] for v in values]
    r5 = [v["top_k_recall"] for v in values]
    assert int(n) == len(group)
    assert pearson == f"{statistics.fmean(p):.2f} ({statistics.median(p):.2f})"
    assert spearman == f"{statistics.fmean(v['spearman'] for v in values):.2f}"
    assert recall == f"{statistics.fmean(r5):.2f}"
    assert int(zeros) == sum(x == 0 for x in r5)
    s = SAMPLES[run]
    cells = statistics.median(
        1 + s + s * sum(v["cells"] for v in r["kinds"].values()) for r in group
    )
    assert rows == f"{_rows(estimator, s)} ({cells:.0f})"
    own = statistics.median(r["seconds"] for r in group)
    truth = statistics.median(r["exact_seconds"] for r in group)
    assert seconds == f"{own:.1f} ({truth:.1f})"


def test_the_300_fact_table_is_recomputed_from_the_records(records, exact, page):
    header = (
        f"{AGREEMENT} Spearman | top-5 recall | recall 0 | rows fwd / bwd (exact fwd) | "
        "s / fact (exact s / fact) |"
    )
    table = _table(page, header, whole=True)
    assert {row[0] for row in table} == set(EXACT)  # both runs, every fact of each
    for row in table:
        group = _group(records, *row[:3])
        ids = [json.dumps(r["fact_id"]) for r in group]
        # every fact of the committed exact run, each once
        assert sorted(ids) == sorted(json.dumps(f["fact_id"]) for f in exact[row[0]])
        _check_row(row, group)


def test_the_subset_table_is_recomputed_from_the_records(records, page):
    table = _table(page, SUBSET)
    assert table
    for row in table:
        group = _group(records, *row[:3])
        _check_row(row, group)
        ids = {json.dumps(r["fact_id"]) for r in group}
        same = [
            r for r in _group(records, row[0], "`atp`", "metric") if json.dumps(r["fact_id"]) in ids
        ]
        assert len(same) == len(group)
        p = statistics.fmean(r["kinds"]["mlp_out"]["pearson"] for r in same)
        r5 = statistics.fmean(r["kinds"]["mlp_out"]["top_k_recall"] for r in same)
        assert row[11] == f"{p:.2f} / {r5:.2f}"


def _exact_top5(fact: dict, kind: str) -> set[tuple[int, int]]:
    cells = [
        (value, layer, pos)
        for layer, row in enumerate(fact["scores"][kind])
        for pos, value in enumerate(row)
        if value is not None and math.isfinite(value)
    ]
    # highest first; equal values by their order in the grid, as torch.topk on the flat grid
    cells.sort(key=lambda c: -c[0])
    return {(layer, pos) for _, layer, pos in cells[:5]}


def test_the_recheck_table_is_recomputed_from_the_records_and_exact_grids(records, exact, page):
    table = _table(page, RECHECK)
    assert table
    for run, estimator, k, n, *found, every, kept, product, alone in table:
        group = [r for r in _group(records, run, estimator, "metric") if "top" in r]
        truth = {json.dumps(f["fact_id"]): f for f in exact[run]}
        assert int(n) == len(group) == len(truth)
        inside, covered = [], []
        ratios, alones = [], []
        for r in group:
            fact = truth[json.dumps(r["fact_id"])]
            top = {kind: {tuple(c) for c in r["top"][kind][: int(k)]} for kind in KINDS}
            inside.append({kind: _exact_top5(fact, kind) <= top[kind] for kind in KINDS})
            cells = sum(v["cells"] for v in r["kinds"].values())
            layers = {c[0] for kind in KINDS for c in top[kind]}
            positions = {c[1] for kind in KINDS for c in top[kind]}
            covered.append(
                all(
                    x in layers and y in positions
                    for kind in KINDS
                    for x, y in _exact_top5(fact, kind)
                )
            )
            ratios.append(len(KINDS) * len(layers) * len(positions) / cells)
            alones.append(sum(len(top[kind]) for kind in KINDS) / cells)
        for kind, shown in zip(KINDS, found, strict=True):
            assert shown == f"{sum(i[kind] for i in inside) / len(group):.2f}"
        assert every == f"{sum(all(i.values()) for i in inside) / len(group):.2f}"
        assert kept == f"{sum(covered) / len(group):.2f}"
        assert product == f"{statistics.median(ratios):.2f} ({max(ratios):.2f})"
        assert alone == f"{statistics.median(alones):.2f}"


def test_the_recheck_runs_are_recomputed_from_their_records(page):
    lines = (DOCS / "attribution_judge_recheck.jsonl").read_text().splitlines()
    checks = [json.loads(line) for line in lines]
    table = _table(page, VERIFIED)
    assert table
    for run, estimator, n, diff, top5, seconds in table:
        group = [c for c in checks if (c["run"], f"`{c['estimator']}`") == (run, estimator)]
        assert int(n) == len(group)
        assert diff == f"{max(c['max_diff'] for c in group):.1e}"
        exact_top = sum(all(c["top5_exact"].values()) for c in group)
        assert top5 == f"{exact_top} of {len(group)}"
        own = statistics.median(c["seconds"] for c in group)
        plain = statistics.median(c["estimate_seconds"] for c in group)
        truth = statistics.median(c["exact_seconds"] for c in group)
        assert seconds == f"{own:.1f} ({plain:.1f}; {truth:.1f})"


# ---------------------------------------------------------------- neurons

NEURONS = "| prompts | estimator | N | recall@10 | recall@20 |"


@pytest.fixture(scope="module")
def neuron_records() -> list[dict]:
    text = gzip.decompress((DOCS / "neuron_recall.jsonl.gz").read_bytes()).decode()
    return [json.loads(line) for line in text.splitlines()]


def test_the_neuron_table_is_recomputed_from_the_records(neuron_records, page):
    """Each row: recall of the exact layer's top 10 / 20 neurons among the estimate's top 10 /
    20 (and the top 10 among its top 50), Pearson and Spearman over that layer's neurons, and
    how many of the estimate's top 20 over all layers, re-traced, restore at least as much as
    the exact layer's 20th best neuron, averaged over the prompts."""
    table = _table(page, NEURONS)
    assert len(table) >= 6
    groups = {
        "Eiffel": [r for r in neuron_records if r["fact_id"] == "eiffel"],
        "STR": [r for r in neuron_records if r["fact_id"] != "eiffel"],
    }
    assert len(groups["Eiffel"]) == 1 and len(groups["STR"]) >= 30
    for row in table:
        group = groups["Eiffel" if row[0].startswith("Eiffel") else "STR"]
        name = row[1].strip("`")
        assert int(row[2]) == len(group)
        stats: dict[str, list[float]] = {}
        for r in group:
            x, y = r["estimates"][name]["layer_scores"], r["exact"]
            twentieth = sorted(y)[-20]
            top = r["estimates"][name]["top"]
            for key, value in (
                ("r10", len(top_k(x, 10) & top_k(y, 10)) / 10),
                ("r20", len(top_k(x, 20) & top_k(y, 20)) / 20),
                ("in50", len(top_k(y, 10) & top_k(x, 50)) / 10),
                ("p", pearson(x, y)),
                ("s", pearson(ranks(x), ranks(y))),
                ("found", sum(c[3] >= twentieth for c in top)),
                ("outside", sum(c[0] != r["layer"] for c in top)),
            ):
                stats.setdefault(key, []).append(value)
        m = {key: sum(v) / len(v) for key, v in stats.items()}
        assert row[3:9] == [
            f"{m['r10']:.2f}",
            f"{m['r20']:.2f}",
            f"{m['in50']:.2f}",
            f"{m['p']:.3f}",
            f"{m['s']:.3f}",
            f"{m['found']:.1f} of 20 ({m['outside']:.1f})",
        ]


def test_the_neuron_rechecks_agree_with_the_exact_layer(neuron_records):
    """Two exact computations in each record: the candidate layer's sweep of every neuron and
    recheck_top's re-trace of the estimate's top 20; where both traced a neuron, they agree.
    The estimates' top 20 are the highest estimates of the layer's scores committed."""
    checked = 0
    for r in neuron_records:
        for name, e in r["estimates"].items():
            for layer, neuron, estimate, exact in e["top"]:
                if layer == r["layer"]:
                    assert exact == pytest.approx(r["exact"][neuron], abs=1e-6)
                    assert estimate == e["layer_scores"][neuron]
                    checked += 1
            assert [c[2] for c in e["top"]] == sorted((c[2] for c in e["top"]), reverse=True)
    assert checked >= 20


def test_the_neuron_size_table_is_recomputed_from_the_records(neuron_records, page):
    """The median candidate layer, and the largest single-neuron effects: the exact layer's
    best and the best of AtP's re-traced top 20 (median and max over the prompts)."""
    table = _table(page, "| prompts | N | candidate layer (median) |")
    assert len(table) == 2
    for row in table:
        eiffel = row[0].startswith("Eiffel")
        group = [r for r in neuron_records if (r["fact_id"] == "eiffel") == eiffel]
        layer = sorted(max(r["exact"]) for r in group)
        anywhere = sorted(max(c[3] for c in r["estimates"]["atp"]["top"]) for r in group)

        def median(values: list[float]) -> float:
            n = len(values)
            return (values[(n - 1) // 2] + values[n // 2]) / 2

        assert row[1:] == [
            str(len(group)),
            f"{median(sorted(r['layer'] for r in group)):g}",
            f"{median(layer):.4f} ({layer[-1]:.4f})",
            f"{median(anywhere):.4f} ({anywhere[-1]:.4f})",
        ]
