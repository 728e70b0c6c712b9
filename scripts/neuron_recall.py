"""How well neuron attribution finds the neurons an exact trace finds (Gemma-3-270m).

Two measurements, one record (a JSON line) per prompt, in ``--out``:

* ``eiffel``: "The Eiffel Tower is located in the city of" -> " Paris",
  ROME's Gaussian noise (10 samples, 3 sigma, seed 0), metric ``prob``.
* ``facts``: the first ``--facts`` facts of the committed STR run
  (docs/replication/str_nld.json.gz, the facts docs/attribution.md's 30-fact
  table judges), each with its counterfactual subject (paired as
  ``replicate_runs.py prepare`` paired them), metric ``normalized_logit_diff``.
  STR needs one corrupted run instead of ten noised copies, which is what makes
  an exact sweep of 2,048 neurons affordable on 30 prompts.

For each prompt, in float32 (one neuron moves a metric by about 1e-4 of its
range, under bfloat16's rounding), every neuron restored (window 1) at the last
subject token (``kinds=("mlp_post",)``, ``by="neuron"``):

1. the candidate layer: the one whose ``mlp_out`` restored alone (exact,
   window 1) at the last subject token restores the most, a choice that does
   not look at any estimate;
2. the exact trace of that layer's ``d_mlp`` neurons (``tracer.trace``);
3. per estimator (``--estimators``), the estimate of every neuron of every
   layer (``tracer.attribute``), and its 20 highest neurons over all layers
   re-traced exactly (``lenscope.attribution.recheck_top``, ``k=20``: the
   product of their layers and neurons).

``report`` prints docs/attribution.md's neuron table from the committed
records (``docs/neuron_recall.jsonl.gz``); tests/test_attribution_docs.py
recomputes it. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/neuron_recall.py eiffel
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/neuron_recall.py facts --facts 30
    python scripts/neuron_recall.py report
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
ANSWER = " Paris"
K = 20
"""Neurons per estimate re-traced over all layers, and the k of recall@k."""
RECORDS = ROOT / "docs" / "neuron_recall.jsonl.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("eiffel", "facts", "report"))
    parser.add_argument("--facts", type=int, default=30, help="first N facts of the STR run")
    parser.add_argument("--estimators", default="atp,relp,ig:4")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "neuron_recall.jsonl")
    parser.add_argument("--records", type=Path, default=RECORDS, help="what report reads")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def rounded(values) -> list[float]:
    """Scores as committed: 6 significant digits (the report reads these)."""
    return [float(f"{float(v):.6g}") for v in values]


def measure(tracer, prompt, subject, options: dict, estimators: list[str], record: dict) -> dict:
    """Steps 1-3 of the module docstring for one prompt; ``record`` gains the results."""
    from lenscope.attribution import _top_cells, recheck_top
    from lenscope.settings import resolve_prompt

    started = time.perf_counter()
    settings = tracer.settings(None, **options)
    last = resolve_prompt(tracer.model, prompt, subject, settings).subject_range[1] - 1
    mlp_out = tracer.trace(prompt, subject, kind="mlp_out", window=1, positions=[last], **options)
    column = mlp_out.scores[:, last]
    layer = int(column.argmax())
    neuron = dict(options, kinds=("mlp_post",), by="neuron", positions=[last], windows=1)
    t = time.perf_counter()
    exact = tracer.trace_kinds(prompt, subject, layers=[layer], **neuron)["mlp_post"]
    record |= {
        "subject_last_pos": last,
        "clean": exact.clean_score,
        "corrupted": exact.corrupted_score,
        "mlp_out_window1": rounded(column),
        "layer": layer,
        "exact": rounded(exact.scores[layer]),
        "seconds": {"exact_layer": round(time.perf_counter() - t, 1)},
        "estimates": {},
    }
    for name in estimators:
        t = time.perf_counter()
        estimate = tracer.attribute(prompt, subject, estimator=name, **neuron)
        estimate_s = time.perf_counter() - t
        t = time.perf_counter()
        checked = recheck_top(tracer, prompt, subject, estimate, k=K, **neuron)["mlp_post"]
        recheck_s = time.perf_counter() - t
        scores = estimate["mlp_post"].scores
        record["estimates"][name] = {
            "layer_scores": rounded(scores[layer]),
            "top": [  # the cells recheck_top re-traced first: (layer, neuron, estimate, exact)
                [x, n] + rounded([scores[x, n], checked.scores[x, n]])
                for x, n in _top_cells(scores, K).tolist()
            ],
            "exact_cells": checked.passes["exact_cells"],
            "seconds": round(estimate_s, 2),
            "recheck_seconds": round(recheck_s, 1),
        }
    record["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return record


def done(path: Path) -> set[str]:
    """Fact ids already measured."""
    if not path.exists():
        return set()
    return {json.dumps(json.loads(line)["fact_id"]) for line in path.read_text().splitlines()}


def run(args: argparse.Namespace) -> None:
    """``eiffel`` or ``facts``: measure and append one record per prompt."""
    import torch

    import lenscope

    torch.set_num_threads(args.threads)
    model = lenscope.load_model("gemma-3-270m", device="cpu", dtype=torch.float32)
    tracer = lenscope.CausalTracer(model, progress=False)
    estimators = args.estimators.split(",")
    if args.command == "eiffel":
        prompts = [(PROMPT, SUBJECT, {"fact_id": "eiffel", "answer": ANSWER})]
        options = dict(answer=ANSWER, samples=10, seed=0, noise_multiplier=3.0, metric="prob")
    else:
        from attribution_judge import exact_summary, fact_rows

        rows = fact_rows("str", exact_summary("str"), args.facts, model, tracer)
        prompts = [
            (
                r["prompt"],
                r["subject"],
                {"fact_id": r["known_id"], "counterfactual": r["counterfactual"]},
            )
            for r in rows
        ]
        options = dict(metric="normalized_logit_diff")
    seen = done(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for prompt, subject, record in prompts:
        if json.dumps(record["fact_id"]) in seen:
            continue
        extra = {}
        if "counterfactual" in record:
            extra["corruption"] = lenscope.CounterfactualPrompt(record["counterfactual"])
        record = {"prompt": prompt, "subject": subject} | record
        record["metric"] = options["metric"]
        record = measure(tracer, prompt, subject, options | extra, estimators, record)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(record["fact_id"], record["layer"], record["seconds"], file=sys.stderr, flush=True)


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's correlation (lenscope's, as ``compare`` computes it; the tests recompute the
    tables with plain Python)."""
    import torch

    from lenscope.attribution import _pearson

    return _pearson(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's correlation: Pearson's of the ranks, ties averaged (lenscope's ``_ranks``)."""
    import torch

    from lenscope.attribution import _pearson, _ranks

    a, b = (torch.tensor(v, dtype=torch.float64) for v in (x, y))
    return _pearson(_ranks(a), _ranks(b))


def top(values: list[float], k: int) -> set[int]:
    """Indices of the ``k`` highest values (ties broken by index)."""
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def agreement(record: dict, name: str) -> dict:
    """One estimator's agreement with the exact layer, and its re-traced top 20."""
    x, y = record["estimates"][name]["layer_scores"], record["exact"]
    best = record["estimates"][name]["top"]
    return {
        "recall10": len(top(x, 10) & top(y, 10)) / 10,
        "recall20": len(top(x, K) & top(y, K)) / K,
        "top10_in_50": len(top(y, 10) & top(x, 50)) / 10,
        "pearson": pearson(x, y),
        "spearman": spearman(x, y),
        # the re-traced top 20 over all layers: how many restore at least as much as the
        # exact layer's 20th best neuron
        "found": sum(c[3] >= sorted(y)[-K] for c in best),
        "outside": sum(c[0] != record["layer"] for c in best),
    }


def report(args: argparse.Namespace) -> None:
    """docs/attribution.md's neuron table: one row per (prompts, estimator)."""
    from attribution_judge import read_records

    records = read_records(args.records)
    print(
        "| prompts | estimator | N | recall@10 | recall@20 | exact top 10 in the estimate's "
        "top 50 | Pearson | Spearman | of the estimate's top 20 over all layers: at least the "
        "exact layer's 20th best (outside that layer) | s / prompt: estimate, recheck=20 "
        "(exact layer) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, group in groups(records).items():
        for name in group[0]["estimates"]:
            rows = [agreement(r, name) for r in group]

            def mean(key: str, rows=rows) -> float:
                return statistics.fmean(row[key] for row in rows)

            seconds = [
                statistics.median(r["estimates"][name][key] for r in group)
                for key in ("seconds", "recheck_seconds")
            ]
            exact_s = statistics.median(r["seconds"]["exact_layer"] for r in group)
            print(
                f"| {label} | `{name}` | {len(group)} | {mean('recall10'):.2f} | "
                f"{mean('recall20'):.2f} | {mean('top10_in_50'):.2f} | {mean('pearson'):.3f} | "
                f"{mean('spearman'):.3f} | {mean('found'):.1f} of 20 ({mean('outside'):.1f}) | "
                f"{seconds[0]:.1f}, {seconds[1]:.0f} ({exact_s:.0f}) |"
            )
    print()
    size_table(records)


def size_table(records: list[dict]) -> None:
    """How large single neurons' effects are: the best of the exact layer, and the best of
    AtP's top 20 over all layers (re-traced), median and max over the prompts."""
    print(
        "| prompts | N | candidate layer (median) | best neuron of the exact layer: median "
        "(max) | best of `atp`'s top 20 over all layers, re-traced: median (max) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, group in groups(records).items():
        layer = [max(r["exact"]) for r in group]
        anywhere = [max(c[3] for c in r["estimates"]["atp"]["top"]) for r in group]
        print(
            f"| {label} | {len(group)} | {statistics.median(r['layer'] for r in group):g} | "
            f"{statistics.median(layer):.4f} ({max(layer):.4f}) | "
            f"{statistics.median(anywhere):.4f} ({max(anywhere):.4f}) |"
        )


def groups(records: list[dict]) -> dict[str, list[dict]]:
    """The Eiffel Tower and the STR facts, each labelled as the tables label them."""
    out = {
        "Eiffel Tower, noise, `prob`": [r for r in records if r["fact_id"] == "eiffel"],
        "STR facts, `normalized_logit_diff`": [r for r in records if r["fact_id"] != "eiffel"],
    }
    return {label: group for label, group in out.items() if group}


def main(argv: list[str] | None = None) -> int:
    """Dispatch."""
    args = parse_args(argv)
    if args.command == "report":
        report(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
