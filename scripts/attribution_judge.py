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

    python scripts/attribution_judge.py work --run noise --facts 30 \\
        --estimators atp,atp/log_prob,ig:1/log_prob,ig:1:layer/log_prob
    python scripts/attribution_judge.py report      # the markdown table
    python scripts/attribution_judge.py tiny        # the same on the test suite's tiny models

The exact trace's per-fact time is the committed one (``FactTrace.seconds``).
"""

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from replicate_runs import KINDS, run_options, window_of  # noqa: E402

EXACT = {"noise": "noise", "str": "str_nld"}
"""Judge run -> the committed exact run it is judged against."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("work", "report", "tiny"))
    parser.add_argument("--run", choices=tuple(EXACT), default="noise")
    parser.add_argument("--facts", type=int, default=30, help="first N facts of the exact run")
    parser.add_argument(
        "--estimators",
        default="atp,atp/log_prob,ig:1/log_prob,ig:1:layer/log_prob",
        help="comma list of ESTIMATOR[/TARGET]",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "judge.jsonl")
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


def work(args: argparse.Namespace) -> None:
    """Estimate the facts with each estimator and record the agreement per fact."""
    torch.set_num_threads(args.threads)
    import lenscope
    from lenscope.attribution import estimator_from_name
    from lenscope.datasets import trace_dataset

    model = lenscope.load_model("gemma-3-270m", device="cpu", dtype=torch.bfloat16)
    tracer = lenscope.CausalTracer(model, progress=False)
    summary = exact_summary(args.run)
    rows = fact_rows(args.run, summary, args.facts, model, tracer)
    exact = {json.dumps(f.fact_id): f for f in summary.facts}
    options = run_options(
        "attr_noise" if args.run == "noise" else "attr_str", window_of(18, "scaled")
    )
    options.pop("method")
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
                    "seconds": estimate.seconds,
                    "wall": seconds,
                    "exact_seconds": truth.seconds,
                }
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record)[:200], file=sys.stderr, flush=True)


def report(args: argparse.Namespace) -> None:
    """Markdown table: per run, estimator, target and kind, the mean agreement over facts.

    Only the facts every estimator of a run has judged count, so rows compare like with like.
    """
    records = [json.loads(line) for line in args.out.read_text().splitlines()]
    judged: dict[tuple, set[str]] = {}
    for r in records:
        judged.setdefault((r["run"], r["estimator"], r["target"]), set()).add(
            json.dumps(r["fact_id"])
        )
    common: dict[str, set[str]] = {}  # per run: the facts every estimator judged
    for (run, *_), ids in judged.items():
        common[run] = common[run] & ids if run in common else set(ids)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "kinds" in r and json.dumps(r["fact_id"]) in common[r["run"]]:
            groups.setdefault((r["run"], r["estimator"], r["target"]), []).append(r)
    print(
        "| corruption | estimator | target | kind | N | Pearson mean (median) | Spearman | "
        "top-5 recall | recall 0 | s / fact (exact s / fact) |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    order = sorted(groups, key=lambda g: (g[0], g[1] != "atp", g[1], g[2] != "metric"))
    for run, estimator, target in order:
        rs = groups[(run, estimator, target)]
        seconds = statistics.median(r["seconds"] for r in rs)
        exact = statistics.median(r["exact_seconds"] for r in rs)
        for kind in KINDS:
            pearson = [r["kinds"][kind]["pearson"] for r in rs]
            spearman = [r["kinds"][kind]["spearman"] for r in rs]
            recall = [r["kinds"][kind]["top_k_recall"] for r in rs]
            print(
                f"| {run} | `{estimator}` | {target} | `{kind}` | {len(rs)} | "
                f"{statistics.fmean(pearson):.2f} ({statistics.median(pearson):.2f}) | "
                f"{statistics.fmean(spearman):.2f} | {statistics.fmean(recall):.2f} | "
                f"{sum(x == 0 for x in recall)} | {seconds:.1f} ({exact:.1f}) |"
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
    {"work": work, "report": report, "tiny": tiny}[arguments.command](arguments)
