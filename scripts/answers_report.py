"""Write ``docs/answers.md`` and a page per model: what changes when the whole answer is scored.

``trace_dataset(answers="attribute")`` scores each fact's whole attribute by
teacher forcing instead of the model's top-1 next token (ROME's choice). This
script compares the two on the same facts: lenscope's facts with answers of
several tokens (``lenscope.long_answer_facts()``) that the model knows by its
greedy continuation (``filter_known(..., by="attribute")``), traced with ROME's
Gaussian-noise settings twice (``scripts/replicate_runs.py`` runs ``noise`` and
``noise_attribute``). It saves the two runs' summaries under
``docs/answers/<model>/``, writes ``docs/answers/<model>.md`` for every model
saved there and ``docs/answers.md`` with the models side by side, and can redraw
all of them without tracing::

    python scripts/replicate_runs.py prepare --dir runs/answers-smollm2 \\
        --model smollm2-135m --fact-file lenscope/data/long_answers.json \\
        --known-by attribute --min-answer-tokens 2
    python scripts/replicate_runs.py work --dir runs/answers-smollm2 --model smollm2-135m \\
        --facts 1000 --only noise_attribute,noise
    python scripts/answers_report.py --dir runs/answers-smollm2 --model smollm2-135m
    python scripts/answers_report.py --from-docs
"""

import argparse
import gzip
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from replicate import MODELS, _rounded, at, ci, paired, peak, row, share, weights
from replicate_runs import merged_run

RUNS = {"noise": "first token (top-1)", "noise_attribute": "whole attribute"}
SITES = (  # (kind, bucket): ROME's early and late sites and the hidden state's hand-off
    ("resid_post", "last_subject"),
    ("mlp_out", "last_subject"),
    ("attn_out", "last"),
    ("resid_post", "last"),
)
COUNTS = {1: "one", 2: "two", 3: "three"}
NAMES = {"resid_post": "hidden state", "mlp_out": "MLP", "attn_out": "attention"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/answers"), help="the model's runs")
    parser.add_argument("--model", choices=tuple(MODELS), default="gemma-3-270m")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument(
        "--from-docs", action="store_true", help="only redraw the pages from docs/answers/"
    )
    return parser.parse_args(argv)


def rome_multi_token(model: str) -> dict:
    """How many of ROME's known facts have an attribute of several tokens on the model's
    tokenizer (``" " + attribute``, as the traces encode it), and the vocabulary's size."""
    from lenscope.datasets import known_facts
    from lenscope.loading import local_tokenizer

    tokenizer = local_tokenizer(model)
    if tokenizer is None:
        sys.exit(f"{model}'s tokenizer is not on this machine: load the model once first")
    facts = known_facts()
    multi = sum(
        len(tokenizer(" " + f["attribute"], add_special_tokens=False)["input_ids"]) > 1
        for f in facts
    )
    return {"vocab_size": len(tokenizer), "rome_facts": len(facts), "rome_multi_token": multi}


def load_runs(args: argparse.Namespace) -> tuple[dict, dict]:
    """``{run: DatasetSummary}`` of both runs on the facts both finished under ``--dir``,
    and the metadata."""
    options = SimpleNamespace(dir=args.dir, facts=1000)
    known = json.loads((args.dir / "known.json").read_text())
    if known["model"] != args.model:
        sys.exit(f"{args.dir} holds runs of {known['model']}, not --model {args.model}")
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
    return runs, meta | rome_multi_token(args.model)


def load_saved(folder: Path) -> tuple[dict, dict]:
    """A model's two runs and metadata as ``save_runs`` wrote them."""
    from lenscope.datasets import DatasetSummary

    meta = json.loads((folder / "meta.json").read_text())
    runs = {
        run: DatasetSummary.from_dict(
            json.loads(gzip.decompress((folder / f"{run}.json.gz").read_bytes()))
        )
        for run in RUNS
    }
    return runs, meta


def comparable(runs: dict) -> tuple[dict, list]:
    """Both runs on the facts whose traced top-1 token is the attribute's first token, and
    the facts left out.

    The filter ranks the next tokens of 64 prompts at a time, the trace one prompt at a time,
    both in bfloat16; where two tokens nearly tie, the top-1 can differ, and the first-token
    run then scores another word than the attribute.
    """
    top, whole = runs["noise"], runs["noise_attribute"]
    left_out = [
        a for a, b in zip(top.facts, whole.facts, strict=True) if a.answer_id != b.answer_ids[0]
    ]
    dropped = {f.fact_id for f in left_out}
    keep = [f.fact_id for f in top.facts if f.fact_id not in dropped]
    return {run: summary.subset(keep) for run, summary in runs.items()}, left_out


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


def direction(mean: float, half: float) -> str:
    """``"smaller"``, ``"larger"`` or ``"the same"``: a paired difference by its 95% CI."""
    return "smaller" if mean + half < 0 else "larger" if mean - half > 0 else "the same"


def verdict(mean: float, half: float) -> str:
    """A paired share difference (whole attribute minus first token) in words."""
    word = direction(mean, half)
    if word == "the same":
        return f"the same within its CI ({ci(mean, half, 'prob')}, points)"
    return f"{word} by {ci(abs(mean), half, 'prob')} (points)"


def rest_ratios(top, whole) -> tuple[tuple, tuple]:
    """The later tokens' probability given the first (the ratio of a fact's two scores),
    clean and with the subject corrupted, each ``paired`` over facts."""
    return (
        paired(whole.clean_scores / top.clean_scores),
        paired(whole.corrupted_scores / top.corrupted_scores),
    )


def site_differences(top, whole) -> dict:
    """``{(kind, bucket): ([first-token peak, whole peak], paired AIE difference, paired
    share difference)}``, both differences at the first-token run's peak cell."""
    from lenscope.datasets import BUCKETS

    out = {}
    for kind, bucket in SITES:
        b = BUCKETS.index(bucket)
        peaks = [peak(summary, kind, bucket) for summary in (top, whole)]
        layer = peaks[0]["layer"]
        diff = paired(whole.effects(kind)[:, b, layer] - top.effects(kind)[:, b, layer])
        out[kind, bucket] = (peaks, diff, share_difference(top, whole, kind, b, layer))
    return out


def correlations(top, whole) -> dict:
    """Per kind, the mean and median over facts of :func:`fact_pearson`, and how many facts
    fall below 0.9."""
    out = {}
    for kind in top.kinds:
        values = fact_pearson(top, whole, kind)
        out[kind] = (
            sum(values) / len(values),
            statistics.median(values),
            sum(v < 0.9 for v in values),
        )
    return out


def left_out_lines(left_out: list) -> list[str]:
    """The page's words for the facts :func:`comparable` leaves out."""
    if not left_out:
        return []
    return [
        f"  {len(left_out)} of them {'is' if len(left_out) == 1 else 'are'} left out: "
        "the trace's top-1 token is not the attribute's first token, though",
        "  the filter ranked it first (the filter runs 64 prompts at a time, the trace one, both",
        "  in bfloat16, and two tokens nearly tie):",
        *(
            f"  fact {f.fact_id} ({f.prompt!r}: top-1 {f.answer!r} at "
            f"{100 * f.clean_score:.1f}%, attribute {f.attribute!r})"
            + ("." if i == len(left_out) - 1 else ";")
            for i, f in enumerate(left_out)
        ),
    ]


def answer_lengths(runs: dict, meta: dict) -> dict[int, int]:
    """``{answer tokens: facts}`` of the facts traced."""
    lengths = [meta["answer_tokens"][str(f.fact_id)] for f in runs["noise_attribute"].facts]
    return {k: lengths.count(k) for k in sorted(set(lengths))}


def findings(differences: dict, rest_clean: tuple, rest_corrupted: tuple) -> list[str]:
    """What changes at each site when the whole attribute is scored, in words from the numbers.

    ``differences``: ``{(kind, bucket): ([first-token peak, whole peak], paired AIE
    difference, paired share difference)}`` as the site table computed them; ``rest_*``:
    the later tokens' probability given the first, clean and with the subject corrupted.
    """
    from lenscope.datasets import BUCKET_LABELS

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
        change = verdict(mean, half)
        if mean + half < 0 and bucket == "last":
            lower_last.append(NAMES[kind])
        lines.append(
            f"- {NAMES[kind]}, {BUCKET_LABELS[bucket]}: the whole attribute {moved}; its share "
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


INTRO = [
    "A dataset trace scores the model's clean top-1 next token (ROME's choice).",
    '`trace_dataset(..., answers="attribute")` scores the fact\'s whole attribute instead,',
    "by teacher forcing: the prompt is followed by the attribute's first k-1 tokens, the",
    "noise and the restorations act on the prompt's positions only, and the score is the",
    "probability of the whole attribute (the product of its tokens' probabilities).",
]


def report(runs: dict, meta: dict) -> str:
    """A model's Markdown page, ``docs/answers/<model>.md``."""
    from lenscope.datasets import BUCKET_LABELS

    model = meta["model"]
    n_both = runs["noise"].n_facts
    runs, left_out = comparable(runs)
    top, whole = runs["noise"], runs["noise_attribute"]
    n, n_layers = top.n_facts, top.n_layers
    counts = answer_lengths(runs, meta)
    lines = [
        f"# Scoring the whole answer on {MODELS[model]['label']}: {n} facts with answers of "
        "several tokens",
        "",
        *INTRO,
        "This page traces the same facts both ways; [docs/answers.md](../answers.md) puts the",
        "models side by side. Generated by `scripts/answers_report.py` from",
        f"`docs/answers/{model}/` (each run's `DatasetSummary`); `tests/test_answers_docs.py`",
        "recomputes every number below from it.",
        "",
        "## Setup",
        "",
        f"- **Model.** {weights(model, meta['dtype'])}",
        "  (float32 softmax and metric), CPU.",
        "- **Facts.** ROME's known facts have short attributes (on this model's "
        f"{meta['vocab_size']:,}-token",
        f"  vocabulary {meta['rome_multi_token']} of {meta['rome_facts']:,} encode"
        f"{'s' if meta['rome_multi_token'] == 1 else ''} to more than one token), so lenscope "
        "ships facts",
        "  whose answers are names (`lenscope.long_answer_facts()`, "
        f"{meta['n_checked']} facts: capitals,",
        "  landmark cities, authors, painters, composers, founders, discoverers, inventors).",
        f"  {meta['n_known']} are known by the whole attribute (the model's greedy continuation",
        '  is exactly the attribute\'s tokens: `filter_known(..., by="attribute")`); the',
        f"  {meta['n_selected']} of them whose attribute is several tokens are traced, "
        f"{n_both} finished in both runs.",
        *left_out_lines(left_out),
        f"  The {n} facts compared (answer lengths: "
        + ", ".join(f"{c} fact{'s' if c != 1 else ''} of {k} tokens" for k, c in counts.items())
        + ")",
        "  have the attribute's first token as the top-1 run's answer.",
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
    rest_clean, rest_corrupted = rest_ratios(top, whole)
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
    differences = site_differences(top, whole)
    for (kind, bucket), (peaks, diff, shares) in differences.items():
        lines.append(
            row(
                f"{NAMES[kind]}, {BUCKET_LABELS[bucket]}",
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
    for kind, (mean, median, below) in correlations(top, whole).items():
        lines.append(row(NAMES[kind], f"{mean:.3f}", f"{median:.3f}", str(below)))
    seconds = [sum(f.seconds for f in runs[r].facts) / n for r in RUNS]
    runs_dir = f"runs/answers-{MODELS[model]['runs']}"
    common = f"--dir {runs_dir} --model {model}"
    lines += [
        "",
        "## Cost",
        "",
        "Mean seconds per fact (three kinds, one CPU thread on a 2-core machine shared with",
        f"other work): {seconds[0]:.1f} for the first token, {seconds[1]:.1f} for the whole",
        "attribute. The runs' sittings shared the machine with other work, so their ratio",
        f"({seconds[1] / seconds[0]:.2f}x) is not a measurement of the cost; "
        "`benchmarks/bench_answers.py`",
        "times a 3-token answer against a 1-token answer in one process (docs/benchmarks.md: a",
        "k-token answer adds k-1 positions to each restored copy, not k forward passes, and",
        "k-1 more decodings through the unembedding).",
        "",
        "## Reproduce",
        "",
        '<!--pytest.mark.skip(reason="the runs: hours of CPU time")-->',
        "```bash",
        f"python scripts/replicate_runs.py prepare {common} \\",
        "    --fact-file lenscope/data/long_answers.json --known-by attribute \\",
        "    --min-answer-tokens 2",
        f"python scripts/replicate_runs.py work {common} --facts 1000 \\",
        "    --only noise_attribute,noise --threads 1 &  # a worker a core; rerun: it resumes",
        f"python scripts/answers_report.py {common}   # saves docs/answers/{model}/",
        "python scripts/answers_report.py --from-docs   # redraw every page from docs/answers/",
        "```",
    ]
    return "\n".join(lines) + "\n"


def overview(models: dict) -> str:
    """``docs/answers.md``: ``{model: (runs, meta)}`` side by side."""
    from lenscope.datasets import BUCKET_LABELS

    labels = [MODELS[model]["label"] for model in models]
    compared = {model: comparable(runs)[0] for model, (runs, _) in models.items()}
    differences = {
        model: site_differences(runs["noise"], runs["noise_attribute"])
        for model, runs in compared.items()
    }
    lines = [
        f"# Scoring the whole answer on {COUNTS.get(len(models), len(models))} models",
        "",
        *INTRO,
        "Each model's page traces the same facts both ways, with ROME's Gaussian noise:",
        "",
    ]
    for model, (runs, meta) in models.items():
        lines.append(
            f"- [{MODELS[model]['label']}](answers/{model}.md): {weights(model, meta['dtype'])}; "
            f"{compared[model]['noise'].n_facts} facts."
        )
    lines += [
        "",
        "## The models side by side",
        "",
        "Each cell is on the model's page, with its method; 95% CIs over facts. A share",
        "difference is the whole attribute's share of its ATE minus the first token's, at the",
        "first-token run's peak layer of the site (points, paired over facts, delta method).",
        "",
        row("", *labels),
        row("---", *("---" for _ in labels)),
    ]
    cells: dict[str, list[str]] = {}

    def add(label: str, value: str) -> None:
        cells.setdefault(label, []).append(value)

    for model, (saved, meta) in models.items():
        add(f"facts known by the whole attribute (of {meta['n_checked']})", str(meta["n_known"]))
        add("of them with answers of several tokens, traced", str(saved["noise"].n_facts))
        runs = compared[model]
        top, whole = runs["noise"], runs["noise_attribute"]
        counts = answer_lengths(runs, meta)
        add("compared (the top-1 run's answer is the attribute's first token)", str(top.n_facts))
        add("answer length (tokens)", f"{min(counts)} to {max(counts)}")
        add("ATE, first token", ci(*top.ate(), "prob"))
        add("ATE, whole attribute", ci(*whole.ate(), "prob"))
        rest_clean, rest_corrupted = rest_ratios(top, whole)
        add("later tokens given the first, clean", ci(*rest_clean[:2], "prob"))
        add("later tokens given the first, subject corrupted", ci(*rest_corrupted[:2], "prob"))
        for (kind, bucket), (peaks, _, (mean, half, _)) in differences[model].items():
            add(
                f"share difference, {NAMES[kind]}, {BUCKET_LABELS[bucket]}",
                f"layer {peaks[0]['layer']}: {ci(mean, half, 'prob')}",
            )
        add(
            "per-fact Pearson of the two runs' grids, mean (hidden state / MLP / attention)",
            " / ".join(f"{c[0]:.3f}" for c in correlations(top, whole).values()),
        )
    lines += [row(label, *values) for label, values in cells.items()]
    lines += ["", *site_verdicts(differences)]
    lines += [
        "",
        "## Reproduce",
        "",
        "Each model's page ends with the commands that traced it; `python",
        "scripts/answers_report.py --from-docs` redraws this page and the models' pages from",
        "`docs/answers/<model>/`, and `tests/test_answers_docs.py` recomputes them.",
    ]
    return "\n".join(lines) + "\n"


def site_verdicts(differences: dict) -> list[str]:
    """In words, from ``{model: site_differences(...)}``: at which sites the whole
    attribute's share of the ATE is smaller (by its paired 95% CI) on every model, and how
    each other site differs per model."""
    from lenscope.datasets import BUCKET_LABELS

    verdicts: dict[str, list[str]] = {}
    drops: dict[str, list[float]] = {"last_subject": [], "last": []}
    for sites in differences.values():
        for (kind, bucket), (_, _, (mean, half, _)) in sites.items():
            site = f"{NAMES[kind]}, {BUCKET_LABELS[bucket]}"
            verdicts.setdefault(site, []).append(direction(mean, half))
            drops[bucket].append(-mean)
    everywhere = [site for site, words in verdicts.items() if set(words) == {"smaller"}]
    lines = [
        "By the paired 95% CIs, the whole attribute's share of the ATE at the first token's",
        "peak is smaller on every model at "
        + (f"{len(everywhere)} of the {len(verdicts)} sites:" if everywhere else "no site."),
        *(f"- {site}" for site in everywhere),
    ]
    labels = [MODELS[model]["label"] for model in differences]
    for site, words in verdicts.items():
        if site not in everywhere:
            lines.append(
                f"At {site}: "
                + ", ".join(f"{w} on {label}" for w, label in zip(words, labels, strict=True))
                + "."
            )
    subject, last = max(drops["last_subject"]), min(drops["last"])
    if subject < last:
        lines += [
            "",
            "The subject's sites lose less than the last token's on every model: at most "
            f"{100 * subject:.1f}",
            f"points at the last subject token, at least {100 * last:.1f} at the last token "
            "(point estimates;",
            "each with its CI in the table).",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Save the model's runs (unless ``--from-docs``), then write every page from docs."""
    args = parse_args(argv)
    folder = args.docs / "answers"
    if not args.from_docs:
        runs, meta = load_runs(args)
        if not runs["noise"].n_facts:
            sys.exit(f"no fact finished in both runs under {args.dir}")
        save_runs(runs, meta, folder / args.model)
    models = {m: load_saved(folder / m) for m in MODELS if (folder / m / "meta.json").exists()}
    for model, (runs, meta) in models.items():
        (folder / f"{model}.md").write_text(report(runs, meta))
        print(f"{model}: {runs['noise'].n_facts} facts in both runs", file=sys.stderr)
    (args.docs / "answers.md").write_text(overview(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
