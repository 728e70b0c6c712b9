"""Attribution patching against exact causal traces on Gemma-3-270m (docs/attribution.md).

For ROME's Eiffel Tower prompt and the first ``--facts`` known facts that
Gemma-3-270m completes correctly (``lenscope.known_facts`` through
``filter_known``), traces the kinds ``resid_post``, ``mlp_out`` and
``attn_out`` exactly (``trace_kinds``, ROME's settings: 10 noise samples,
3 sigma, windows 1/10/10, the answer's probability) and estimates them by
attribution patching (``tracer.attribute``) with the same settings and seed,
then compares them (``lenscope.compare``: Pearson, Spearman, recall of the
top 5 cells). Both are timed in the same process, one after the other per
fact, on one CPU thread. The Eiffel Tower is also compared under symmetric
token replacement (counterfactual "The Colosseum ...", normalised logit
difference, window 1). Results are written after every fact, so a partial
run is usable::

    OMP_NUM_THREADS=1 python scripts/attribution_gemma.py --facts 30   # docs/attribution.json
    python scripts/attribution_gemma.py --figure          # docs/attribution_eiffel.png
    python scripts/attribution_gemma.py --summary         # the tables of docs/attribution.md
    python scripts/attribution_gemma.py --diagnose        # Eiffel mlp_out, window and metric
"""

import argparse
import json
import time
from pathlib import Path

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
COUNTERFACTUAL = "The Colosseum is located in the city of"
KINDS = ("resid_post", "mlp_out", "attn_out")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def timed(fn, *args, **kwargs):
    """``(result, seconds)``."""
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def one_fact(tracer, prompt, subject, **options):
    """Exact trace and attribution of one fact, their comparison and times."""
    import lenscope

    exact, exact_s = timed(tracer.trace_kinds, prompt, subject, kinds=KINDS, seed=0, **options)
    estimate, attr_s = timed(tracer.attribute, prompt, subject, kinds=KINDS, seed=0, **options)
    cmp = lenscope.compare(estimate, exact, k=5)
    return (
        exact,
        estimate,
        {
            "prompt": prompt,
            "subject": subject,
            "answer": exact[KINDS[0]].answer,
            "exact_seconds": exact_s,
            "attribution_seconds": attr_s,
            "passes": estimate[KINDS[0]].passes,
            "clean_score": exact[KINDS[0]].clean_score,
            "corrupted_score": exact[KINDS[0]].corrupted_score,
            "compare": cmp.to_dict(),
        },
    )


def run(n_facts: int, out: Path) -> None:
    import warnings

    import torch

    import lenscope

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = lenscope.load_model("gemma-3-270m", device="cpu")
    tracer = lenscope.CausalTracer(model, progress=False)
    record = {"model": "gemma-3-270m", "kinds": KINDS, "threads": 1, "facts": []}

    exact, estimate, row = one_fact(tracer, PROMPT, SUBJECT)
    record["eiffel"] = row
    exact_str = tracer.trace_kinds(
        PROMPT, kinds=KINDS, windows=1, corruption=lenscope.CounterfactualPrompt(COUNTERFACTUAL)
    )
    estimate_str = tracer.attribute(
        PROMPT, kinds=KINDS, windows=1, corruption=lenscope.CounterfactualPrompt(COUNTERFACTUAL)
    )
    record["eiffel_str"] = lenscope.compare(estimate_str, exact_str).to_dict()
    for kind in KINDS:
        exact[kind].save(out.parent / f"attribution_eiffel_exact_{kind}.json")
        estimate[kind].save(out.parent / f"attribution_eiffel_estimate_{kind}.json")
    out.write_text(json.dumps(record, indent=1))
    print("eiffel", row["compare"], row["exact_seconds"], row["attribution_seconds"], flush=True)

    facts = lenscope.filter_known(tracer, lenscope.known_facts(), limit=n_facts + 1)
    facts = [f for f in facts if f["subject"] != SUBJECT][:n_facts]
    for fact in facts:
        try:
            _, _, row = one_fact(tracer, fact["prompt"], fact["subject"])
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row = {"prompt": fact["prompt"], "subject": fact["subject"], "error": repr(e)}
        record["facts"].append(row)
        out.write_text(json.dumps(record, indent=1))
        print(len(record["facts"]), row.get("compare"), flush=True)


def figure(results: Path, out: Path) -> None:
    """The README figure: exact trace and attribution of the Eiffel Tower, side by side."""
    from screenshot import screenshot

    import lenscope
    from lenscope.plotting import plot_traces, save_html

    panels = {}
    for kind in ("mlp_out", "attn_out"):
        panels[f"{kind}: exact"] = lenscope.TraceResult.load(
            results / f"attribution_eiffel_exact_{kind}.json"
        )
        panels[f"{kind}: attribution"] = lenscope.AttributionResult.load(
            results / f"attribution_eiffel_estimate_{kind}.json"
        )
    fig = plot_traces(
        panels,
        allow_mismatch=True,
        # Own colour scale per panel: the estimates are ~15x too small (the softmax is
        # saturated at the corrupted run's p = 0.005), and a shared scale would hide their shape.
        shared_scale=False,
        title="Eiffel Tower on Gemma-3-270m: exact trace vs attribution patching, p(' Paris'), "
        "each panel on its own scale",
    )
    html = out.with_suffix(".html")
    save_html(fig, html)
    screenshot(html, out.with_suffix(".png"), width=1400, height=520, scale=1.5)
    html.unlink()


def summary(path: Path) -> None:
    """Print the markdown tables of docs/attribution.md from the run's JSON."""
    import statistics

    record = json.loads(path.read_text())
    facts = [f for f in record["facts"] if "compare" in f]
    failed = [f for f in record["facts"] if "compare" not in f]
    print(f"{len(facts)} facts compared, {len(failed)} failed: {[f['subject'] for f in failed]}")
    print("\n| kind | Pearson mean (median) | Spearman mean (median) | top-5 recall mean |")
    print("| --- | ---: | ---: | ---: |")
    for kind in KINDS:
        p = [f["compare"][kind]["pearson"] for f in facts]
        s = [f["compare"][kind]["spearman"] for f in facts]
        r = [f["compare"][kind]["top_k_recall"] for f in facts]
        print(
            f"| `{kind}` | {statistics.mean(p):.2f} ({statistics.median(p):.2f}) | "
            f"{statistics.mean(s):.2f} ({statistics.median(s):.2f}) | {statistics.mean(r):.2f} |"
        )
    exact = sum(f["exact_seconds"] for f in facts)
    attr = sum(f["attribution_seconds"] for f in facts)
    ratios = [f["exact_seconds"] / f["attribution_seconds"] for f in facts]
    print(
        f"\nwall time: exact {exact:.0f} s, attribution {attr:.1f} s, ratio {exact / attr:.0f}x "
        f"(per fact: median {statistics.median(ratios):.0f}x, "
        f"range {min(ratios):.0f}x-{max(ratios):.0f}x)"
    )
    e = record["eiffel"]
    print(
        f"\nEiffel: exact {e['exact_seconds']:.1f} s, attribution {e['attribution_seconds']:.2f} s"
    )
    for name, cmp in (("noise", e["compare"]), ("STR", record.get("eiffel_str", {}))):
        for kind, c in cmp.items():
            print(
                f"| {name} | `{kind}` | {c['pearson']:.2f} | {c['spearman']:.2f} | "
                f"{c['top_k_recall']:.1f} |"
            )
    print("\nper fact:")
    for f in facts:
        ratio = f["corrupted_score"] / f["clean_score"]
        cells = " | ".join(
            f"{f['compare'][k]['pearson']:.2f} / {f['compare'][k]['top_k_recall']:.1f}"
            for k in KINDS
        )
        print(f"| {f['subject']} | {f['answer']!r} | {ratio:.2f} | {cells} |")


def diagnose() -> None:
    """Eiffel Tower, mlp_out: which of the metric's saturation and the window sum breaks it."""
    import warnings

    import torch

    import lenscope

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model = lenscope.load_model("gemma-3-270m", device="cpu")
    tracer = lenscope.CausalTracer(model, progress=False)
    for metric in ("prob", "log_prob"):
        for window in (1, 10):
            options = dict(kinds=("mlp_out",), windows=window, metric=metric, seed=0)
            exact = tracer.trace_kinds(PROMPT, SUBJECT, **options)
            estimate = tracer.attribute(PROMPT, SUBJECT, **options)
            c = lenscope.compare(estimate, exact)["mlp_out"]
            e = exact["mlp_out"].scores - exact["mlp_out"].corrupted_score
            a = estimate["mlp_out"].scores - estimate["mlp_out"].corrupted_score
            n_pos = e.shape[1]
            print(
                f"| {metric} | {window} | {c.pearson:.2f} | {c.spearman:.2f} | "
                f"{c.top_k_recall:.1f} | {float(e.max()):.3f} at {divmod(int(e.argmax()), n_pos)} "
                f"| {float(a.max()):.3f} at {divmod(int(a.argmax()), n_pos)} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DOCS / "attribution.json")
    parser.add_argument("--figure", action="store_true", help="render the README figure only")
    parser.add_argument("--summary", action="store_true", help="print the doc's tables only")
    parser.add_argument("--diagnose", action="store_true", help="Eiffel mlp_out diagnosis only")
    args = parser.parse_args()
    if args.diagnose:
        diagnose()
    elif args.summary:
        summary(args.out)
    elif args.figure:
        figure(args.out.parent, DOCS / "attribution_eiffel")
    else:
        run(args.facts, args.out)


if __name__ == "__main__":
    main()
