"""Replicate ROME's dataset-level causal tracing on the built-in Gemma-3-270m.

ROME (Meng et al., 2022, arXiv 2202.05262, Section 2.2, Figure 2) averages
causal traces over the known facts GPT-2 XL gets right and reads three
patterns off the averages: corrupting the subject removes most of the
answer's probability (ATE 18.6%), MLP outputs at the last subject token in
early-middle layers carry the fact, and attention at the last token in late
layers moves it. This script filters the shipped ROME known-facts set to the
facts Gemma-3-270m knows, traces as many as fit in a time budget (resuming
from a checkpoint), and writes ``docs/replication.md`` with the figure, the
table and a side-by-side comparison with the paper's GPT-2 XL numbers::

    python scripts/replicate.py --minutes 30 --threads 1  # the full run
    python scripts/replicate.py --limit 3 --samples 3     # a smoke test

On a small machine shared with other processes, ``--threads 1`` is many
times faster than torch's default of one thread per core (threads that wait
for each other's cores spin); on a quiet machine compare both on ``--limit 1``.

Outputs: ``docs/replication.md``, ``docs/replication.html`` (interactive
report), ``docs/replication.png`` (ROME Figure-2 heatmaps) and
``docs/replication_lines.png`` (AIE with 95% CI bands), plus the checkpoint
and the summary JSON under ``runs/``.
"""

import argparse
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

CHROMIUM = "/usr/bin/chromium"
KINDS = ("resid_post", "mlp_out", "attn_out")
ROME_LAYERS = 48

# What the paper reports for GPT-2 XL (1000 known facts, Section 2.2 and Figure 2).
ROME = {
    "clean": 0.270,
    "corrupted": 0.0847,
    "ate": 0.186,
    "text": {"clean": "27.0%", "corrupted": "8.47%", "ate": "18.6%"},
    "resid_last_subject": (0.087, 15),
    "mlp_last_subject": (0.066, 17),
    "attn_last_layer": 32,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--limit", type=int, default=None, help="trace at most N known facts")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop starting new facts after this many minutes of tracing",
    )
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (ROME: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window",
        choices=("scaled", "rome"),
        default="scaled",
        help="mlp/attn window: 'rome' = 10 layers; 'scaled' = the same fraction "
        "of depth as ROME's 10 of 48 layers (4 of Gemma's 18)",
    )
    parser.add_argument("--checkpoint", default="runs/replication.jsonl")
    parser.add_argument("--summary", default="runs/replication_summary.json")
    parser.add_argument("--docs", default="docs", help="folder for replication.{md,html,png}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-screenshot", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the replication and write the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lenscope
    from lenscope.datasets import filter_known, known_facts, trace_dataset
    from lenscope.loading import load_model

    started = time.perf_counter()
    model = load_model(args.model, device="cpu")
    load_seconds = time.perf_counter() - started
    n_layers = model.cfg.n_layers
    window = 10 if args.window == "rome" else max(1, round(10 * n_layers / ROME_LAYERS))
    windows = {"resid_post": 1, "mlp_out": window, "attn_out": window}
    tracer = lenscope.CausalTracer(model, progress=True)

    facts = known_facts()
    t0 = time.perf_counter()
    known, rejected = filter_known(tracer, facts, limit=args.limit, return_rejected=True)
    filter_seconds = time.perf_counter() - t0
    checked = len(known) + len(rejected)
    print(
        f"{len(known)} of {checked} facts checked are known to {args.model} "
        f"({filter_seconds:.0f} s)",
        file=sys.stderr,
    )

    t0 = time.perf_counter()
    summary = trace_dataset(
        tracer,
        known,
        kinds=KINDS,
        windows=windows,
        samples=args.samples,
        seed=args.seed,
        checkpoint=args.checkpoint,
        max_seconds=None if args.minutes is None else args.minutes * 60,
    )
    trace_seconds = time.perf_counter() - t0
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    summary.save(args.summary)

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_figures(summary, docs, screenshot=not args.no_screenshot)
    info = {
        "model": args.model,
        "checked": checked,
        "known": len(known),
        "total_facts": len(facts),
        "filter_seconds": filter_seconds,
        "load_seconds": load_seconds,
        "trace_seconds": trace_seconds,
        "limit": args.limit,
        "minutes": args.minutes,
        "window_choice": args.window,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
        "n_params": _n_params(model),
    }
    (docs / "replication.md").write_text(report(summary, info))
    per_fact = summary.seconds / max(summary.n_facts, 1)
    print(
        f"traced {summary.n_facts} facts in {summary.seconds:.0f} s "
        f"({per_fact:.1f} s per fact; {summary.n_pending} pending, "
        f"{summary.n_skipped} skipped); wrote {docs / 'replication.md'}",
        file=sys.stderr,
    )
    return 0


def write_figures(summary, docs: Path, *, screenshot: bool) -> None:
    """``replication.html`` (full report) and, with Chromium, the two PNG figures."""
    from lenscope.plotting.dataset import plot_dataset, save_dataset_report

    save_dataset_report(
        summary, docs / "replication.html", title=f"ROME known facts on {summary.model_name}"
    )
    if not screenshot:
        return
    for style, name in (("heatmap", "replication.png"), ("lines", "replication_lines.png")):
        fig = plot_dataset(summary, style=style)
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "figure.html"
            fig.write_html(
                page,
                include_plotlyjs=True,
                full_html=True,
                config={"displaylogo": False, "staticPlot": True},
            )
            take_screenshot(page, docs / name, int(fig.layout.width), int(fig.layout.height))


def take_screenshot(page: Path, png: Path, width: int, height: int) -> None:
    """Headless Chromium screenshot of ``page`` (offline: plotly.js is embedded)."""
    with tempfile.TemporaryDirectory(prefix="lenscope-chromium-") as profile:
        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                f"--screenshot={png.resolve()}",
                f"--window-size={width + 20},{height + 20}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def pct(value: float) -> str:
    """A fraction in percent, one decimal (``n/a`` for NaN)."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}%"


def depth(layer: int, n_layers: int) -> str:
    """``layer L of N (x% depth)``, with depth = L / (N - 1)."""
    return f"{layer} of {n_layers} ({100 * layer / (n_layers - 1):.0f}% depth)"


def _n_params(model) -> int:
    """Parameters, counting a tied unembedding (a copy of W_E in TransformerLens) once."""
    total = sum(p.numel() for p in model.parameters())
    w_e, w_u = getattr(model, "W_E", None), getattr(model, "W_U", None)
    if w_e is not None and w_u is not None and w_u.shape == w_e.T.shape and torch.equal(w_u, w_e.T):
        total -= w_u.numel()
    return total


def report(summary, info: dict) -> str:
    """The Markdown report: settings, figure, table, comparison, verdicts, closing note."""
    from lenscope.datasets import BUCKET_LABELS, BUCKETS

    n_layers = summary.n_layers
    clean, clean_ci = summary.clean_mean()
    corrupted, corrupted_ci = summary.corrupted_mean()
    ate, ate_ci = summary.ate()

    def peak(kind: str, bucket: str) -> tuple[float, float, int]:
        value, layer, _ = summary.best(kind, bucket=bucket)
        ci = float(summary.aie_ci(kind)[BUCKETS.index(bucket), layer]) if layer >= 0 else math.nan
        return value, ci, layer

    resid_ls = peak("resid_post", "last_subject")
    mlp_ls = peak("mlp_out", "last_subject")
    attn_last = peak("attn_out", "last")
    mlp_fs = peak("mlp_out", "first_subject")
    resid_last = peak("resid_post", "last")
    rome_resid, rome_resid_layer = ROME["resid_last_subject"]
    rome_mlp, rome_mlp_layer = ROME["mlp_last_subject"]

    def share(value: float, total: float) -> str:
        return pct(value / total) if total else "n/a"

    mlp_buckets = {b: summary.best("mlp_out", bucket=b)[0] for b in BUCKETS}
    attn_buckets = {b: summary.best("attn_out", bucket=b)[0] for b in BUCKETS}
    best_mlp_bucket = max(
        mlp_buckets, key=lambda b: -math.inf if math.isnan(mlp_buckets[b]) else mlp_buckets[b]
    )
    best_attn_bucket = max(
        attn_buckets, key=lambda b: -math.inf if math.isnan(attn_buckets[b]) else attn_buckets[b]
    )
    rel = lambda layer: layer / (n_layers - 1)  # noqa: E731

    def unsure(significant: bool) -> str:
        return "" if significant else " (CI includes zero)"

    def verdict(site: bool, layers: bool, significant: bool) -> str:
        if site and layers:
            return "holds" if significant else "inconclusive"
        if site or layers:
            return "partly" if significant else "inconclusive"
        return "does not hold"

    verdicts = []
    ate_holds = ate - ate_ci > 0
    verdicts.append(
        (
            "Corrupting the subject removes most of the answer's probability",
            "holds"
            if ate_holds and ate / clean >= 0.5
            else "partly"
            if ate_holds
            else "does not hold",
            f"ATE {pct(ate)} \u00b1 {pct(ate_ci)} = {share(ate, clean)} of the clean probability "
            f"(GPT-2 XL: {ROME['text']['ate']} = {share(ROME['ate'], ROME['clean'])})",
        )
    )
    # ROME's MLP claim is about where among the subject tokens: the last one.
    mlp_middle = summary.best("mlp_out", bucket="middle_subject")[0]
    mlp_site = all(math.isnan(other) or mlp_ls[0] > other for other in (mlp_fs[0], mlp_middle))
    mlp_early = rel(mlp_ls[2]) <= 2 / 3
    mlp_sig = mlp_ls[0] - mlp_ls[1] > 0
    verdicts.append(
        (
            "MLPs at the last subject token, in early-middle layers, carry the fact",
            verdict(mlp_site, mlp_early, mlp_sig),
            f"at the last subject token the MLP AIE peaks at {pct(mlp_ls[0])} \u00b1 "
            f"{pct(mlp_ls[1])}{unsure(mlp_sig)}, layer {depth(mlp_ls[2], n_layers)}, vs "
            f"{pct(mlp_fs[0])} at the first and {pct(mlp_middle)} at the middle subject tokens "
            f"(GPT-2 XL: {pct(rome_mlp)} at layer {depth(rome_mlp_layer, ROME_LAYERS)}); the "
            f"largest MLP AIE of all is in the {BUCKET_LABELS[best_mlp_bucket]} bucket",
        )
    )
    attn_site = best_attn_bucket == "last"
    attn_late = rel(attn_last[2]) > 0.5
    attn_sig = attn_last[0] - attn_last[1] > 0
    verdicts.append(
        (
            "Attention at the last token, in late layers, moves the fact",
            verdict(attn_site, attn_late, attn_sig),
            f"attention AIE peaks in the {BUCKET_LABELS[best_attn_bucket]} bucket; at the last "
            f"token it peaks at {pct(attn_last[0])} \u00b1 {pct(attn_last[1])}{unsure(attn_sig)}, "
            f"layer "
            f"{depth(attn_last[2], n_layers)} (GPT-2 XL: layer "
            f"{depth(ROME['attn_last_layer'], ROME_LAYERS)})",
        )
    )
    handover = resid_ls[2] < resid_last[2]
    handover_sig = resid_ls[0] - resid_ls[1] > 0 and resid_last[0] - resid_last[1] > 0
    verdicts.append(
        (
            "The residual stream carries the fact at the last subject token early, at the last "
            "token late",
            verdict(handover, handover, handover_sig),
            f"hidden-state AIE at the last subject token peaks at layer {resid_ls[2]}: "
            f"{pct(resid_ls[0])} \u00b1 {pct(resid_ls[1])}{unsure(resid_ls[0] > resid_ls[1])}; at "
            f"the last token at layer {resid_last[2]}: {pct(resid_last[0])} \u00b1 "
            f"{pct(resid_last[1])}{unsure(resid_last[0] > resid_last[1])}",
        )
    )

    table = summary.table()
    kind_rows = "\n".join(
        f"| `{r.kind}` | {summary.windows[r.kind]} | {pct(r.best_aie)} \u00b1 "
        f"{pct(r.best_aie_ci)} | {r.best_layer} | {BUCKET_LABELS.get(r.best_bucket, '')} |"
        for r in table.itertuples()
    )
    bucket_counts = summary.bucket_counts("mlp_out").tolist()
    counts = ", ".join(
        f"{BUCKET_LABELS[b]} {n}" for b, n in zip(BUCKETS, bucket_counts, strict=True)
    )

    def row(*cells: str) -> str:
        return "| " + " | ".join(cells) + " |"

    def effect(value: float, ci: float | None, total: float, layer: int, layers: int) -> str:
        spread = "" if ci is None else f" \u00b1 {pct(ci)}"
        where = depth(layer, layers)
        return f"{pct(value)}{spread} ({share(value, total)} of ATE) at layer {where}"

    comparison_rows = "\n".join(
        [
            row("facts", "1000", str(summary.n_facts)),
            row(
                "mean clean probability",
                ROME["text"]["clean"],
                f"{pct(clean)} \u00b1 {pct(clean_ci)}",
            ),
            row(
                "mean corrupted probability",
                ROME["text"]["corrupted"],
                f"{pct(corrupted)} \u00b1 {pct(corrupted_ci)}",
            ),
            row("ATE", ROME["text"]["ate"], f"{pct(ate)} \u00b1 {pct(ate_ci)}"),
            row(
                "hidden AIE peak, last subject token",
                effect(rome_resid, None, ROME["ate"], rome_resid_layer, ROME_LAYERS),
                effect(resid_ls[0], resid_ls[1], ate, resid_ls[2], n_layers),
            ),
            row(
                "MLP AIE peak, last subject token",
                "~" + effect(rome_mlp, None, ROME["ate"], rome_mlp_layer, ROME_LAYERS),
                effect(mlp_ls[0], mlp_ls[1], ate, mlp_ls[2], n_layers),
            ),
            row(
                "attention AIE peak, last token",
                f"at layer ~{depth(ROME['attn_last_layer'], ROME_LAYERS)}",
                effect(attn_last[0], attn_last[1], ate, attn_last[2], n_layers),
            ),
        ]
    )
    quant_note = (
        "; and the offline model's weights are 4-bit quantised (Q4_K_M), which may add "
        "noise to small effects"
        if "270m" in info["model"]
        else ""
    )
    window_note = (
        "ROME's 10 layers"
        if info["window_choice"] == "rome"
        else "ROME's 10 of 48 layers scaled to the same share of depth"
    )
    verdict_rows = "\n".join(f"| {claim} | **{v}** | {why} |" for claim, v, why in verdicts)
    minutes = info["trace_seconds"] / 60
    per_fact = summary.seconds / max(summary.n_facts, 1)
    stop = (
        f"the {info['minutes']:g}-minute budget"
        if info["minutes"]
        else f"--limit {info['limit']}"
        if info["limit"]
        else "the end of the known facts"
    )
    held = [claim for claim, v, _ in verdicts[:3] if v == "holds"]
    notheld = [f"{claim} ({v})" for claim, v, _ in verdicts[:3] if v != "holds"]

    return f"""# Replicating ROME's causal tracing on {info["model"]}

ROME (Meng et al., "Locating and Editing Factual Associations in GPT",
NeurIPS 2022, arXiv 2202.05262, Section 2.2 and Figure 2) averaged causal
traces over the 1000 known facts GPT-2 XL (48 layers, 1.5B parameters) gets
right. This page repeats that measurement with lenscope on {info["model"]}
({summary.model_name}: {n_layers} layers, {info["n_params"] / 1e6:.0f}M parameters).
Generated by `scripts/replicate.py` on {date.today().isoformat()}; the
interactive version (hover for CIs and fact
counts) is [replication.html](replication.html).

## Setup

- Facts: the ROME known-facts set shipped with lenscope ({info["total_facts"]} records).
  {info["known"]} of the {info["checked"]} checked facts are *known* to {info["model"]}
  (clean top-1 token, stripped, is a non-empty prefix of the attribute, ROME's test).
- Traced: **N = {summary.n_facts}** known facts in dataset order ({summary.n_skipped}
  skipped, {summary.n_pending} not reached), stopped by {stop}.
- Corruption: Gaussian noise at `hook_embed` on the subject tokens, std
  {summary.noise_std:.4g} (3 x the embedding sigma over the known subjects, as in
  ROME), {summary.samples} samples per fact, seed {summary.seed} for every fact.
- Answer: the model's clean top-1 token; score: its probability.
- Windows: hidden state 1 layer; MLP and attention {summary.windows["mlp_out"]} layers
  ({window_note}).
- Facts having each bucket: {counts} (a one-token subject counts as the last subject
  token only; see `lenscope.datasets.token_buckets`).
- CIs: 95% normal approximation over facts (1.96 x std / sqrt(n)).
- Time: {minutes:.1f} min of tracing ({per_fact:.1f} s per fact) on {platform.machine()}
  CPU with {info["threads"]} torch threads, plus {info["filter_seconds"]:.0f} s for the
  known-fact filter and {info["load_seconds"]:.0f} s to load the model.
- Command: `{info["command"]}`

## Figure

![Average indirect effect by token bucket and layer](replication.png)

Average indirect effect (restored probability minus corrupted probability),
ROME Figure 2 style: rows are token buckets, columns layers; left hidden
state, middle MLP output, right attention output.
[replication_lines.png](replication_lines.png) shows the same numbers as
lines with 95% confidence bands.

## Table

| kind | window | best AIE | layer | bucket |
|---|---|---|---|---|
{kind_rows}

Mean clean probability {pct(clean)} \u00b1 {pct(clean_ci)}, mean corrupted probability
{pct(corrupted)} \u00b1 {pct(corrupted_ci)}, ATE {pct(ate)} \u00b1 {pct(ate_ci)}.

## Side by side with GPT-2 XL

Layers are also given as a share of depth (layer / (layers - 1)), since the
models differ in depth; effects are also given as a share of the ATE, since
the models differ in how confident they are.

| quantity | GPT-2 XL (ROME) | {info["model"]} (lenscope) |
|---|---|---|
{comparison_rows}

## Which patterns hold

Criteria: the MLP pattern needs the last subject token's peak to exceed the first and
middle subject tokens' peaks, in the first two thirds of depth; the attention pattern
needs the last token to be the bucket with the largest attention AIE, beyond half of
depth. "Holds": site and depth match and the 95% CI excludes zero; "partly": only one
of site and depth matches; "inconclusive": the CI includes zero (too few facts).

| ROME's pattern | on {info["model"]} | evidence |
|---|---|---|
{verdict_rows}

Caveats: N = {summary.n_facts} facts is {"far " if summary.n_facts < 300 else ""}fewer than
ROME's 1000, so the CIs are wider; a window of {summary.windows["mlp_out"]} layers on an
{n_layers}-layer model blurs the layer at which an effect peaks{quant_note}.

## Closing note

N = {summary.n_facts} known facts of {info["model"]}, traced in {minutes:.1f} minutes
({per_fact:.1f} s per fact, {summary.samples} noise samples, three kinds). Headline findings:

1. Total effect: corrupting the subject takes the answer from {pct(clean)} to
   {pct(corrupted)} (ATE {pct(ate)}; GPT-2 XL: {ROME["text"]["clean"]} to
   {ROME["text"]["corrupted"]}, ATE {ROME["text"]["ate"]}).
2. MLP: {verdicts[1][2]}; ROME's pattern **{verdicts[1][1]}**.
3. Attention: {verdicts[2][2]}; ROME's pattern **{verdicts[2][1]}**.

Holding on this model: {"; ".join(held) if held else "none of the three"}.
Not (fully) holding: {"; ".join(notheld) if notheld else "none"}.
"""


if __name__ == "__main__":
    sys.exit(main())
