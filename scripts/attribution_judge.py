"""Judge attribution estimators against the committed exact traces of docs/replication/.

Each estimator (``atp``, ``ig:M``, ``ig:M:layer``, each with target ``metric``
or ``log_prob``) estimates the same facts as the committed exact runs, with the
same settings (``scripts/replicate_runs.py``'s ``run_options``: Gaussian noise
3 sigma, 10 samples, seed 0, windows 1 / 4 / 4, p(answer); or STR with the
normalised logit difference), through ``trace_dataset(method="attribution")``,
the pipeline that wrote ``attr_noise`` / ``attr_str``. Per fact and kind it
records Pearson, Spearman and top-5 recall against the exact grid
(``lenscope.compare``) and the estimate's seconds, one JSON line per
(run, estimator, fact), so an interrupted judge resumes::

    python scripts/attribution_judge.py work --run noise --facts 300 --estimators atp,relp \\
        --out runs/judge.jsonl
    python scripts/attribution_judge.py recheck --run str --facts 20 --estimators relp \\
        --out runs/judge_recheck.jsonl
    python scripts/attribution_judge.py report      # docs/attribution.md's tables
    python scripts/attribution_judge.py tiny        # the same on the test suite's tiny models

Each record also keeps the estimate's 20 highest cells per kind, so ``report``
judges ``recheck=20`` offline against the committed exact grids; ``recheck``
runs it for real on a few facts (the re-traced cells must equal the committed
grid). ``report`` reads the committed records, ``docs/attribution_judge.jsonl.gz``
and ``docs/attribution_judge_recheck.jsonl``. The exact trace's per-fact time is
the committed one (``FactTrace.seconds``).
"""

import argparse
import functools
import gzip
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from replicate_runs import KINDS, run_options, window_of  # noqa: E402

RECHECK = 20
"""Cells per kind whose position each record keeps (the estimate's highest): ``recheck=20``."""

EXACT = {"noise": "noise", "str": "str_nld"}
"""Judge run -> the committed exact run it is judged against."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("work", "report", "tiny", "recheck", "committed"))
    parser.add_argument("--run", choices=tuple(EXACT), default="noise")
    parser.add_argument("--facts", type=int, default=30, help="first N facts of the exact run")
    parser.add_argument(
        "--estimators",
        default="atp,atp/log_prob,ig:1/log_prob,ig:1:layer/log_prob",
        help="comma list of ESTIMATOR[/TARGET]",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "judge.jsonl")
    parser.add_argument(
        "--records",
        type=Path,
        default=ROOT / "docs" / "attribution_judge.jsonl.gz",
        help="the committed records the report reads",
    )
    parser.add_argument(
        "--recheck-records",
        type=Path,
        default=ROOT / "docs" / "attribution_judge_recheck.jsonl",
        help="the committed records of the recheck command",
    )
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def exact_summary(run: str):
    """The committed exact ``DatasetSummary`` that ``run`` is judged against."""
    from lenscope.datasets import DatasetSummary

    raw = gzip.decompress((ROOT / "docs" / "replication" / f"{EXACT[run]}.json.gz").read_bytes())
    return DatasetSummary.from_dict(json.loads(raw))


def fact_rows(run: str, summary, n: int, model, tracer) -> list[dict]:
    """The first ``n`` facts of the exact run as ``trace_dataset`` input (STR: re-paired)."""
    facts = summary.facts[:n]
    rows = [{"known_id": f.fact_id, "prompt": f.prompt, "subject": f.subject} for f in facts]
    if run == "str":  # the counterfactuals are not stored: pair again as `prepare` did
        from lenscope.datasets import filter_known, known_facts, pair_counterfactuals

        known = filter_known(tracer, known_facts())
        paired = {json.dumps(f["known_id"]): f for f in pair_counterfactuals(model, known).facts}
        for row in rows:
            row["counterfactual"] = paired[json.dumps(row["known_id"])]["counterfactual"]
    return rows


def done_keys(path: Path) -> set[tuple]:
    """(run, estimator, target, fact id) already judged."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        r = json.loads(line)
        keys.add((r["run"], r["estimator"], r["target"], json.dumps(r["fact_id"])))
    return keys


def judged_facts(args: argparse.Namespace) -> tuple:
    """Gemma-3-270m as the replication ran it, the facts of ``args.run`` to judge, the
    committed exact grids by fact id, and the attribution run's options (method left out)."""
    import lenscope

    model = lenscope.load_model("gemma-3-270m", device="cpu", dtype=torch.bfloat16)
    tracer = lenscope.CausalTracer(model, progress=False)
    summary = exact_summary(args.run)
    rows = fact_rows(args.run, summary, args.facts, model, tracer)
    exact = {json.dumps(f.fact_id): f for f in summary.facts}
    options = run_options(
        "attr_noise" if args.run == "noise" else "attr_str", window_of(18, "scaled")
    )
    options.pop("method")
    return tracer, rows, exact, options


def work(args: argparse.Namespace) -> None:
    """Estimate the facts with each estimator and record the agreement per fact."""
    torch.set_num_threads(args.threads)
    import lenscope
    from lenscope.attribution import _top_cells, estimator_from_name
    from lenscope.datasets import trace_dataset

    tracer, rows, exact, options = judged_facts(args)
    seen = done_keys(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.estimators.split(","):
        estimator, _, target = spec.partition("/")
        target = target or "metric"
        for row in rows:
            key = (
                args.run,
                estimator_from_name(estimator).name,
                target,
                json.dumps(row["known_id"]),
            )
            if key in seen:
                continue
            started = time.perf_counter()
            result = trace_dataset(
                tracer,
                [row],
                method="attribution",
                estimator=estimator,
                target=target,
                progress=False,
                **options,
            )
            seconds = time.perf_counter() - started
            name = estimator_from_name(estimator).name  # "ig:4:window" is "ig:4"
            record = {"run": args.run, "estimator": name, "target": target}
            record["fact_id"] = row["known_id"]
            if not result.facts:
                record["skipped"] = [s.reason for s in result.skipped]
            else:
                (estimate,) = result.facts
                truth = exact[json.dumps(row["known_id"])]
                comparison = lenscope.compare(
                    {k: SimpleNamespace(scores=estimate.scores[k]) for k in KINDS},
                    {k: SimpleNamespace(scores=truth.scores[k]) for k in KINDS},
                )
                record |= {
                    "kinds": comparison.to_dict(),
                    # the estimate's RECHECK highest cells per kind, (layer, position):
                    # what recheck=k re-traces, judged offline against the exact grid
                    "top": {k: _top_cells(estimate.scores[k], RECHECK).tolist() for k in KINDS},
                    "seconds": estimate.seconds,
                    "wall": seconds,
                    "exact_seconds": truth.seconds,
                }
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record)[:200], file=sys.stderr, flush=True)


def recheck(args: argparse.Namespace) -> None:
    """``trace_dataset(method="attribution", recheck=RECHECK)`` on the first facts, checked.

    Per fact: the seconds of the estimate with its top cells re-traced exactly
    (beside the committed exact trace's), the largest difference between a
    re-traced cell and the committed exact grid there (the re-trace is the
    exact trace, same settings and noise, so it should be float rounding), and
    whether the rechecked grid's 5 highest cells per kind are the exact
    trace's. One JSON line per fact, ``"recheck"`` set, in ``--out``.
    """
    torch.set_num_threads(args.threads)
    from lenscope.attribution import _top_cells
    from lenscope.datasets import trace_dataset

    tracer, rows, exact, options = judged_facts(args)
    (estimator,) = args.estimators.split(",")
    for row in rows:
        plain, checked = (
            trace_dataset(
                tracer,
                [row],
                method="attribution",
                estimator=estimator,
                progress=False,
                recheck=k,
                **options,
            ).facts[0]
            for k in (0, RECHECK)
        )
        truth = exact[json.dumps(row["known_id"])]
        record = {"run": args.run, "estimator": estimator, "recheck": RECHECK}
        record |= {"fact_id": row["known_id"], "seconds": checked.seconds}
        record |= {"estimate_seconds": plain.seconds, "exact_seconds": truth.seconds}
        diffs, same = [], {}
        for kind in KINDS:
            top = tuple(_top_cells(plain.scores[kind], RECHECK).T)
            diffs.append((checked.scores[kind][top] - truth.scores[kind][top]).abs().max().item())
            same[kind] = set(map(tuple, _top_cells(checked.scores[kind], 5).tolist())) == set(
                map(tuple, _top_cells(truth.scores[kind], 5).tolist())
            )
        record |= {"max_diff": max(diffs), "top5_exact": same}
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), file=sys.stderr, flush=True)


def committed(args: argparse.Namespace) -> None:
    """Records of ``atp`` from the committed attribution runs, without running a model.

    The replication estimated every fact with AtP (``docs/replication/attr_noise``,
    ``attr_str``: the same settings as the exact runs, their own seconds); each
    fact's grids are judged against the exact run's as ``work`` judges its own,
    one record per fact marked with its ``"source"``, appended to ``--out``
    unless that (run, estimator, target, fact) is there already.
    """
    import lenscope
    from lenscope.attribution import _top_cells
    from lenscope.datasets import DatasetSummary

    seen = done_keys(args.out)
    for run in EXACT:
        path = ROOT / "docs" / "replication" / f"attr_{run}.json.gz"
        estimates = DatasetSummary.from_dict(json.loads(gzip.decompress(path.read_bytes())))
        exact = {json.dumps(f.fact_id): f for f in exact_summary(run).facts}
        for estimate in estimates.facts:
            truth = exact.get(json.dumps(estimate.fact_id))
            if truth is None or (run, "atp", "metric", json.dumps(estimate.fact_id)) in seen:
                continue
            comparison = lenscope.compare(
                {k: SimpleNamespace(scores=estimate.scores[k]) for k in KINDS},
                {k: SimpleNamespace(scores=truth.scores[k]) for k in KINDS},
            )
            record = {"run": run, "estimator": "atp", "target": "metric"}
            record |= {
                "fact_id": estimate.fact_id,
                "kinds": comparison.to_dict(),
                "top": {k: _top_cells(estimate.scores[k], RECHECK).tolist() for k in KINDS},
                "seconds": estimate.seconds,
                "exact_seconds": truth.seconds,
                "source": f"docs/replication/attr_{run}.json.gz",
            }
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The judge's records (a ``.jsonl`` or ``.jsonl.gz`` file), in file order."""
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
    return [json.loads(line) for line in text.splitlines()]


def estimate_rows(estimator: str, samples: int, n_layers: int, n_kinds: int) -> tuple[int, int]:
    """Forward and backward rows an estimate costs (its ``AttributionResult.passes``).

    AtP and RelP: the clean row, and the ``samples`` corrupted rows forward and
    backward; AtP* adds GradDrop's ``n_layers x samples`` rows (the committed
    kinds have no query or key heads, so no QK rows); ``ig:M``: ``n_layers x M x
    samples`` rows per kind (``atp:window``: ``M`` = 1). ``tests/test_attribution_docs.py``
    checks this against ``passes`` on a tiny model.
    """
    forward, backward = 1 + samples, samples
    if estimator == "atp-star":
        forward, backward = forward + n_layers * samples, backward + n_layers * samples
    elif estimator.startswith("ig:") or estimator == "atp:window":
        steps = 1 if estimator == "atp:window" else int(estimator.split(":")[1])
        extra = n_kinds * n_layers * steps * samples
        forward, backward = forward + extra, backward + extra
    return forward, backward


def exact_rows(record: dict, samples: int) -> int:
    """Forward rows of the exact trace of one fact: clean, corrupted, one per cell and copy."""
    return 1 + samples + samples * sum(k["cells"] for k in record["kinds"].values())


@functools.cache
def exact_tops(run: str) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Per fact (``json.dumps(fact_id)``) and kind, the exact trace's 5 highest cells.

    Among the traced (finite) cells, as :func:`lenscope.compare` ranks them.
    """
    raw = json.loads(
        gzip.decompress((ROOT / "docs" / "replication" / f"{EXACT[run]}.json.gz").read_bytes())
    )
    out = {}
    for fact in raw["facts"]:
        tops = {}
        for kind in KINDS:
            cells = [
                (value, layer, pos)
                for layer, row in enumerate(fact["scores"][kind])
                for pos, value in enumerate(row)
                if value is not None and math.isfinite(value)
            ]
            ranked = sorted(range(len(cells)), key=lambda i: (-cells[i][0], i))[:5]
            tops[kind] = [cells[i][1:] for i in ranked]
        out[json.dumps(fact["fact_id"])] = tops
    return out


SAMPLES = {"noise": 10, "str": 1}
"""Corrupted copies per fact of each judged run (``run_options``)."""


def group_records(records: list[dict]) -> dict[tuple, list[dict]]:
    """The judged records per (run, estimator, target), in file order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "kinds" in r:
            groups.setdefault((r["run"], r["estimator"], r["target"]), []).append(r)
    return groups


def agreement_rows(groups: dict[tuple, list[dict]], keys: list[tuple]) -> list[str]:
    """One markdown row per (group, kind): agreement and cost over the group's facts."""
    lines = []
    for run, estimator, target in keys:
        rs = groups[(run, estimator, target)]
        seconds = statistics.median(r["seconds"] for r in rs)
        exact = statistics.median(r["exact_seconds"] for r in rs)
        forward, backward = estimate_rows(estimator, SAMPLES[run], 18, len(KINDS))
        rows = statistics.median(exact_rows(r, SAMPLES[run]) for r in rs)
        for kind in KINDS:
            pearson = [r["kinds"][kind]["pearson"] for r in rs]
            spearman = [r["kinds"][kind]["spearman"] for r in rs]
            recall = [r["kinds"][kind]["top_k_recall"] for r in rs]
            lines.append(
                f"| {run} | `{estimator}` | {target} | `{kind}` | {len(rs)} | "
                f"{statistics.fmean(pearson):.2f} ({statistics.median(pearson):.2f}) | "
                f"{statistics.fmean(spearman):.2f} | {statistics.fmean(recall):.2f} | "
                f"{sum(x == 0 for x in recall)} | {forward} / {backward} ({rows:.0f}) | "
                f"{seconds:.1f} ({exact:.1f}) |"
            )
    return lines


AGREEMENT = (
    "| corruption | estimator | target | kind | N | Pearson mean (median) | Spearman | "
    "top-5 recall | recall 0 | rows fwd / bwd (exact fwd) | s / fact (exact s / fact) |\n"
    "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def report(args: argparse.Namespace) -> None:
    """The markdown tables of docs/attribution.md, from the committed records.

    1. Every (run, estimator, target) judged on all facts of its exact run, each
       over those facts. 2. Those judged on the first N facts only, beside
       ``atp`` on the same facts. 3. ``recheck=20`` judged offline: how often the
       exact top 5 of a kind lie among the estimate's 20 highest cells, and what
       re-tracing costs (``recheck_top`` traces the product of the top cells'
       layers and positions, for every kind together).
    """
    records = read_records(args.records)
    groups = group_records(records)
    full = {run: len(exact_tops(run)) for run in EXACT}  # the facts of the committed exact run

    def order(key: tuple) -> tuple:
        return (key[0], key[1] != "atp", key[1], key[2] != "metric")

    print(AGREEMENT)
    print(
        "\n".join(
            agreement_rows(
                groups, sorted((k for k in groups if len(groups[k]) == full[k[0]]), key=order)
            )
        )
    )
    print()
    subset = sorted((k for k in groups if len(groups[k]) < full[k[0]]), key=order)
    print(
        AGREEMENT.replace(
            "| s / fact (exact s / fact) |",
            "| s / fact (exact s / fact) | `atp` on the same facts: `mlp_out` Pearson / recall |",
        ).replace("---: |\n", "---: |\n", 1)
        + " ---: |"
    )
    for key in subset:
        ids = {json.dumps(r["fact_id"]) for r in groups[key]}
        same = [r for r in groups[(key[0], "atp", "metric")] if json.dumps(r["fact_id"]) in ids]
        ref = (
            f"{statistics.fmean(r['kinds']['mlp_out']['pearson'] for r in same):.2f} / "
            f"{statistics.fmean(r['kinds']['mlp_out']['top_k_recall'] for r in same):.2f}"
        )
        for line in agreement_rows(groups, [key]):
            print(f"{line} {ref} |")
    print()
    print(
        "| corruption | estimator | k | N | exact top 5 among the top k: `resid_post` | `mlp_out` "
        "| `attn_out` | all three | all three, every re-traced cell kept (what recheck_top does) | "
        "re-traced cells / exact cells, median (max) | k cells per kind / exact cells, median |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key in sorted(groups, key=order):
        rs = [r for r in groups[key] if "top" in r]
        if key[2] != "metric" or len(rs) < full[key[0]]:
            continue
        tops = exact_tops(key[0])
        for k in (5, 10, RECHECK):  # a record's cells are highest first: its top k lead
            found = {kind: 0 for kind in KINDS}
            every = kept = 0
            product, alone = [], []
            for r in rs:
                truth = tops[json.dumps(r["fact_id"])]
                top = {kind: [tuple(c) for c in r["top"][kind][:k]] for kind in KINDS}
                inside = {kind: set(truth[kind]) <= set(top[kind]) for kind in KINDS}
                for kind in KINDS:
                    found[kind] += inside[kind]
                every += all(inside.values())
                cells = sum(v["cells"] for v in r["kinds"].values())
                layers = {c[0] for kind in KINDS for c in top[kind]}
                positions = {c[1] for kind in KINDS for c in top[kind]}
                kept += all(c[0] in layers and c[1] in positions for t in truth.values() for c in t)
                product.append(len(KINDS) * len(layers) * len(positions) / cells)
                alone.append(sum(len(top[kind]) for kind in KINDS) / cells)
            n = len(rs)
            print(
                f"| {key[0]} | `{key[1]}` | {k} | {n} | "
                + " | ".join(f"{found[kind] / n:.2f}" for kind in KINDS)
                + f" | {every / n:.2f} | {kept / n:.2f} | "
                f"{statistics.median(product):.2f} ({max(product):.2f}) | "
                f"{statistics.median(alone):.2f} |"
            )
    if not args.recheck_records.exists():
        return
    checks = read_records(args.recheck_records)
    print()
    print(
        "| corruption | estimator | facts | re-traced cells against the committed exact grid "
        "(max abs diff) | top 5 of every kind exact after the recheck | s / fact with recheck=20 "
        "(estimate alone; exact) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for run, estimator in dict.fromkeys((c["run"], c["estimator"]) for c in checks):
        group = [c for c in checks if (c["run"], c["estimator"]) == (run, estimator)]
        exact_top = sum(all(c["top5_exact"].values()) for c in group)
        seconds = [
            statistics.median(c[key] for c in group)
            for key in ("seconds", "estimate_seconds", "exact_seconds")
        ]
        print(
            f"| {run} | `{estimator}` | {len(group)} | "
            f"{max(c['max_diff'] for c in group):.1e} | {exact_top} of {len(group)} | "
            f"{seconds[0]:.1f} ({seconds[1]:.1f}; {seconds[2]:.1f}) |"
        )


def tiny(args: argparse.Namespace) -> None:
    """Every estimator against exact traces on the tiny bridges of tests/conftest.py."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    torch.set_num_threads(args.threads)
    from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_bridge, make_tiny_tokenizer

    import lenscope

    tokenizer = make_tiny_tokenizer(tempfile.mkdtemp())
    kinds = ("resid_post", "mlp_out", "attn_out")
    options = dict(
        kinds=kinds, samples=10, seed=0, windows={"resid_post": 1, "mlp_out": 3, "attn_out": 3}
    )
    print(
        "| model | estimator | target | "
        + " | ".join(f"`{k}` Pearson / top-5" for k in kinds)
        + " |"
    )
    print("| --- | --- | --- |" + " ---: |" * len(kinds))
    for gated, seed in ((False, 1), (True, 3)):
        model = make_tiny_bridge(tokenizer, gated=gated, init_range=0.5, seed=seed)
        tracer = lenscope.CausalTracer(model, progress=False)
        exact = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, **options)
        for spec in args.estimators.split(","):
            estimator, _, target = spec.partition("/")
            target = target or "metric"
            estimate = tracer.attribute(
                TINY_PROMPT, TINY_SUBJECT, estimator=estimator, target=target, **options
            )
            c = lenscope.compare(estimate, exact)
            cells = " | ".join(f"{c[k].pearson:.2f} / {c[k].top_k_recall:.1f}" for k in kinds)
            name = "Gemma-3" if gated else "GPT-2"
            print(f"| tiny {name} | `{estimator}` | {target} | {cells} |")


if __name__ == "__main__":
    arguments = parse_args()
    {
        "work": work,
        "report": report,
        "tiny": tiny,
        "recheck": recheck,
        "committed": committed,
    }[arguments.command](arguments)
