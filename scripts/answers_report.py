"""Write ``docs/answers.md``: what changes when a dataset trace scores the whole answer.

``trace_dataset(answers="attribute")`` scores each fact's whole attribute by
teacher forcing instead of the model's top-1 next token (ROME's choice). This
script compares the two on the same facts: lenscope's facts with answers of
several tokens (``lenscope.long_answer_facts()``) that the model knows by its
greedy continuation (``filter_known(..., by="attribute")``), traced with ROME's
Gaussian-noise settings twice (``scripts/replicate_runs.py`` runs ``noise`` and
``noise_attribute``), and writes the page and the two runs' summaries under
``docs/answers/``, from which it can redraw the page without tracing::

    python scripts/replicate_runs.py prepare --dir runs/answers \\
        --fact-file lenscope/data/long_answers.json --known-by attribute \\
        --min-answer-tokens 2
    python scripts/replicate_runs.py work --dir runs/answers --facts 1000 \\
        --only noise_attribute,noise
    python scripts/answers_report.py --dir runs/answers
    python scripts/answers_report.py --from-docs
"""

import argparse
import gzip
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from replicate import _rounded, at, ci, paired, peak, row, share
from replicate_runs import merged_run

RUNS = {"noise": "first token (top-1)", "noise_attribute": "whole attribute"}
SITES = (  # (kind, bucket): ROME's early and late sites and the hidden state's hand-off
    ("resid_post", "last_subject"),
    ("mlp_out", "last_subject"),
    ("attn_out", "last"),
    ("resid_post", "last"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/answers"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--from-docs", action="store_true", help="redraw from docs/answers")
    return parser.parse_args(argv)


def load_runs(args: argparse.Namespace) -> tuple[dict, dict]:
    """``{run: DatasetSummary}`` of both runs on the facts both finished, and the metadata."""
    from lenscope.datasets import DatasetSummary

    out_dir = args.docs / "answers"
    if args.from_docs:
        meta = json.loads((out_dir / "meta.json").read_text())
        runs = {
            run: DatasetSummary.from_dict(
                json.loads(gzip.decompress((out_dir / f"{run}.json.gz").read_bytes()))
            )
            for run in RUNS
        }
        return runs, meta
    options = SimpleNamespace(dir=args.dir, facts=1000, chunk=10, start=0)
    known = json.loads((args.dir / "known.json").read_text())
    runs = {run: merged_run(options, run) for run in RUNS}
    if any(summary is None for summary in runs.values()):
        sys.exit(f"no checkpoint of {list(RUNS)} under {args.dir} yet")
    both = {f.fact_id for f in runs["noise"].facts} & {
        f.fact_id for f in runs["noise_attribute"].facts
    }
    order = [f["known_id"] for f in known["known"] if f["known_id"] in both]
    runs = {run: summary.subset(order) for run, summary in runs.items()}
    meta = {k: v for k, v in known.items() if k not in ("known", "unpaired")}
    meta["n_selected"] = len(known["known"])
    meta["answer_tokens"] = {str(f["known_id"]): len(f["attribute_tokens"]) for f in known["known"]}
    return runs, meta


def save_runs(runs: dict, meta: dict, out_dir: Path) -> None:
    """Both runs' summaries (scores to 4 significant digits, gzipped) and the metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for run, summary in runs.items():
        data = summary.to_dict()
        data["workers"] = []
        for fact in data["facts"]:
            fact["scores"] = _rounded(fact["scores"])
        raw = json.dumps(data, separators=(",", ":")).encode()
        (out_dir / f"{run}.json.gz").write_bytes(gzip.compress(raw, mtime=0))


def fact_pearson(a, b, kind: str) -> list[float]:
    """Per fact, the Pearson correlation of the two runs' grids (cells both have)."""
    out = []
    for x, y in zip(a.facts, b.facts, strict=True):
        u, v = x.scores[kind].flatten().double(), y.scores[kind].flatten().double()
        keep = torch.isfinite(u) & torch.isfinite(v)
        u, v = u[keep] - u[keep].mean(), v[keep] - v[keep].mean()
        out.append(float((u * v).sum() / (u.norm() * v.norm())))
    return out


def share_difference(top, whole, kind: str, b: int, layer: int) -> tuple[float, float, int]:
    """Whole-attribute share of ATE minus first-token share at one cell, paired over facts.

    ``D = mean(e2) / mean(t2) - mean(e1) / mean(t1)`` over the facts with bucket ``b``
    (``e`` a fact's indirect effect at the cell, ``t`` its total effect), with the delta
    method's 95% CI: each fact's influence is ``(e2 - R2 t2) / mean(t2) - (e1 - R1 t1) /
    mean(t1)``, so what the two runs share per fact cancels.
    """
    from lenscope.datasets import CI_Z

    parts = []
    for summary in (top, whole):
        effect = summary.effects(kind)[:, b, layer].double()
        total = (summary.clean_scores - summary.corrupted_scores).double()
        parts.append((effect, total))
    keep = ~torch.isnan(parts[0][0]) & ~torch.isnan(parts[1][0])
    influence, difference = 0, 0.0
    for sign, (effect, total) in zip((-1, 1), parts, strict=True):
        effect, total = effect[keep], total[keep]
        ratio = effect.mean() / total.mean()
        difference += sign * float(ratio)
        influence = influence + sign * (effect - ratio * total) / total.mean()
    n = int(keep.sum())
    return difference, CI_Z * float(influence.std()) / math.sqrt(n), n


def findings(differences: dict, rest_clean: tuple, rest_corrupted: tuple) -> list[str]:
    """What changes at each site when the whole attribute is scored, in words from the numbers.

    ``differences``: ``{(kind, bucket): ([first-token peak, whole peak], paired AIE
    difference, paired share difference)}`` as the site table computed them; ``rest_*``:
    the later tokens' probability given the first, clean and with the subject corrupted.
    """
    from lenscope.datasets import BUCKET_LABELS

    names = {"resid_post": "hidden state", "mlp_out": "MLP", "attn_out": "attention"}
    lines = [
        "",
        "What changes, site by site. The two runs score different things (the whole attribute's",
        "probability is the first token's times the rest's), so the raw AIEs differ in scale;",
        "the share of each run's ATE at the same cell does not, and its paired difference",
        "(95% CI) is the comparison:",
        "",
    ]
    lower_last = []
    for (kind, bucket), (peaks, _, (mean, half, _)) in differences.items():
        first, whole = peaks
        plateau = first.get("plateau")
        if whole["layer"] == first["layer"]:
            moved = f"peaks at the same layer ({first['layer']})"
        elif plateau is not None and whole["layer"] in (*plateau.layers, *plateau.tied):
            moved = (
                f"peaks at layer {whole['layer']}, which the first-token run cannot tell apart "
                f"from its own peak ({first['layer']})"
            )
        else:
            moved = f"peaks at layer {whole['layer']} instead of {first['layer']}"
        if mean + half < 0:
            change = f"smaller by {ci(-mean, half, 'prob')} (points)"
            if bucket == "last":
                lower_last.append(names[kind])
        elif mean - half > 0:
            change = f"larger by {ci(mean, half, 'prob')} (points)"
        else:
            change = f"the same within its CI ({ci(mean, half, 'prob')}, points)"
        lines.append(
            f"- {names[kind]}, {BUCKET_LABELS[bucket]}: the whole attribute {moved}; its share "
            f"of the ATE at the first-token peak is {change}."
        )
    if lower_last:
        lines += [
            "",
            f"An interpretation of the last token's rows ({', '.join(lower_last)}), not tested",
            "separately: a restoration acts on the prompt's positions only. Restoring what",
            "reaches the last prompt token brings back the attribute's first token, but its",
            "later tokens are predicted at",
            "the attribute's own positions, which stay in the corrupted run and read the",
            "corrupted subject through attention; with the subject corrupted, the later tokens'",
            f"probability given the first is {ci(*rest_corrupted[:2], 'prob')} against "
            f"{ci(*rest_clean[:2], 'prob')} clean (above). Sites that",
            "act before the information has left the subject (its hidden state and MLPs) restore",
            "what every later position reads, and change less.",
        ]
    return lines


def report(runs: dict, meta: dict) -> str:
    """The Markdown page."""
    from lenscope.datasets import BUCKET_LABELS, BUCKETS

    top, whole = runs["noise"], runs["noise_attribute"]
    n, n_layers = top.n_facts, top.n_layers
    lengths = [meta["answer_tokens"][str(f.fact_id)] for f in whole.facts]
    counts = {k: lengths.count(k) for k in sorted(set(lengths))}
    lines = [
        f"# Scoring the whole answer: {n} facts with answers of several tokens",
        "",
        "A dataset trace scores the model's clean top-1 next token (ROME's choice).",
        '`trace_dataset(..., answers="attribute")` scores the fact\'s whole attribute instead,',
        "by teacher forcing: the prompt is followed by the attribute's first k-1 tokens, the",
        "noise and the restorations act on the prompt's positions only, and the score is the",
        "probability of the whole attribute (the product of its tokens' probabilities). This",
        "page traces the same facts both ways. Generated by `scripts/answers_report.py` from",
        "`docs/answers/` (each run's `DatasetSummary`); `tests/test_answers_docs.py` recomputes",
        "every number below from it.",
        "",
        "## Setup",
        "",
        f"- **Model.** {meta['model']} from its 4-bit Q4_K_M GGUF weights, dequantised, run in",
        f"  {meta['dtype']} (float32 softmax and metric), CPU.",
        "- **Facts.** ROME's known facts have one-word attributes (on this model's 262k-token",
        "  vocabulary 1 of 1,209 encodes to more than one token), so lenscope ships facts",
        "  whose answers are names (`lenscope.long_answer_facts()`, "
        f"{meta['n_checked']} facts: capitals,",
        "  landmark cities, authors, painters, composers, founders, discoverers, inventors).",
        f"  {meta['n_known']} are known by the whole attribute (the model's greedy continuation",
        '  is exactly the attribute\'s tokens: `filter_known(..., by="attribute")`); the',
        f"  {meta['n_selected']} of them whose attribute is several tokens are traced, "
        f"{n} finished in both runs",
        "  (answer lengths: "
        + ", ".join(f"{c} facts of {k} tokens" for k, c in counts.items())
        + ").",
        "  Greedy decoding means the top-1 run's answer is the attribute's first token.",
        f"- **Corruption and cells.** ROME's: Gaussian noise of std {top.noise_std:.3f} (3 x",
        f"  the embedding sigma) on the subject at `hook_embed`, {top.samples} samples, seed",
        f"  {top.seed}; windows {top.windows['resid_post']} / {top.windows['mlp_out']} /",
        f"  {top.windows['attn_out']} (hidden state / MLP / attention); positions from the",
        "  subject on; ROME's six token buckets. 95% CIs: normal approximation over facts",
        "  (1.96 x std / sqrt(N)); differences are paired over facts.",
        "",
        "## Total effect",
        "",
        row("score", "clean", "corrupted", "ATE"),
        row("---", "---:", "---:", "---:"),
    ]
    for run, label in RUNS.items():
        summary = runs[run]
        lines.append(
            row(
                label,
                ci(*summary.clean_mean(), "prob"),
                ci(*summary.corrupted_mean(), "prob"),
                ci(*summary.ate(), "prob"),
            )
        )
    rest_clean = paired(whole.clean_scores / top.clean_scores)
    rest_corrupted = paired(whole.corrupted_scores / top.corrupted_scores)
    lines += [
        "",
        "The ratio of the two scores of a fact is the probability of the attribute's later",
        "tokens given its first (teacher-forced). Clean it is "
        f"{ci(*rest_clean[:2], 'prob')} (mean over facts);",
        f"with the subject corrupted, {ci(*rest_corrupted[:2], 'prob')}. "
        + (
            "Corrupting the subject lowers the later tokens' probability too: the name's"
            " continuation depends on the subject, not only on its first token."
            if rest_corrupted[0] + rest_corrupted[1] < rest_clean[0] - rest_clean[1]
            else "The corruption leaves the later tokens' probability within the CIs: once"
            " the first token is given, the rest of the name follows from it."
        ),
        "",
        "## Where the answer comes back",
        "",
        "The largest average indirect effect (AIE) of each site in each run, where it is (a",
        "plateau names the adjacent layers whose paired difference from the peak has a 95% CI",
        "containing zero; a tied layer further away is named too), its share of the run's ATE",
        "(a ratio of means over the same facts, delta-method 95% CI), and the paired",
        "difference of the two runs at the first-token run's peak cell:",
        "",
        row(
            "site",
            "first token: peak",
            "AIE (share of ATE)",
            "whole attribute: peak",
            "AIE (share of ATE)",
            "whole - first at the first's peak: AIE; share of ATE",
        ),
        row("---", "---", "---:", "---", "---:", "---:"),
    ]
    names = {"resid_post": "hidden state", "mlp_out": "MLP", "attn_out": "attention"}
    differences = {}
    for kind, bucket in SITES:
        b = BUCKETS.index(bucket)
        peaks = [peak(summary, kind, bucket) for summary in (top, whole)]
        layer = peaks[0]["layer"]
        diff = paired(whole.effects(kind)[:, b, layer] - top.effects(kind)[:, b, layer])
        shares = share_difference(top, whole, kind, b, layer)
        differences[kind, bucket] = (peaks, diff, shares)
        lines.append(
            row(
                f"{names[kind]}, {BUCKET_LABELS[bucket]}",
                *(
                    cell
                    for p in peaks
                    for cell in (
                        at(p, n_layers),
                        f"{ci(p['aie'], p['ci'], 'prob')} ({share(p)})",
                    )
                ),
                f"{ci(*diff[:2], 'prob')}; {ci(*shares[:2], 'prob')}",
            )
        )
    lines += findings(differences, rest_clean, rest_corrupted)
    lines += [
        "",
        "Per fact, the two runs' grids agree at a Pearson correlation of (mean, median over",
        "facts):",
        "",
        row("kind", "mean", "median", "facts below 0.9"),
        row("---", "---:", "---:", "---:"),
    ]
    for kind in top.kinds:
        values = fact_pearson(top, whole, kind)
        ordered = sorted(values)
        middle = len(ordered) // 2
        median = (
            ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        )
        lines.append(
            row(
                names[kind],
                f"{sum(values) / len(values):.3f}",
                f"{median:.3f}",
                str(sum(v < 0.9 for v in values)),
            )
        )
    seconds = [sum(f.seconds for f in runs[r].facts) / n for r in RUNS]
    lines += [
        "",
        "## Cost",
        "",
        "Mean seconds per fact (three kinds, one CPU thread on a 2-core machine shared with",
        f"other work): {seconds[0]:.1f} for the first token, {seconds[1]:.1f} for the whole",
        "attribute. The two runs ran at different times under different loads, so their ratio",
        f"({seconds[1] / seconds[0]:.2f}x) is not a measurement of the cost; "
        "`benchmarks/bench_answers.py`",
        "times a 3-token answer against a 1-token answer in one process (docs/benchmarks.md: a",
        "k-token answer adds k-1 positions to each restored copy, not k forward passes, and",
        "k-1 more decodings through the unembedding).",
        "",
        "## Reproduce",
        "",
        "See the docstring of `scripts/answers_report.py`; `python scripts/answers_report.py",
        "--from-docs` redraws this page from `docs/answers/`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Merge the runs, save their summaries, write the page."""
    args = parse_args(argv)
    runs, meta = load_runs(args)
    if not runs["noise"].n_facts:
        sys.exit(f"no fact finished in both runs under {args.dir}")
    if not args.from_docs:
        save_runs(runs, meta, args.docs / "answers")
    (args.docs / "answers.md").write_text(report(runs, meta))
    print(f"{runs['noise'].n_facts} facts in both runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
