"""How live the notebook explorer is: time to its first heatmap and to the full trace.

``lenscope.explore(model)`` traces kind by kind in a worker thread and shows
each kind's heatmap as soon as its sweep finishes. This script runs the
explorer on the Eiffel Tower prompt (ROME's three kinds, windows and
``--samples`` noise copies), records when the first heatmap and the last one
reached the widget's ``heatmaps`` trait, then times ``tracer.trace_kinds`` with
the same settings (what the command line runs) for comparison, and the lens
view of the peak cell (what a click computes beyond its top-k).

Example:
    python benchmarks/bench_explorer.py --samples 10
"""

import argparse
import time

import lenscope

PROMPT = "The Eiffel Tower is located in the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    model = lenscope.load_model(args.model)
    explorer = lenscope.explore(model, prompt=PROMPT, samples=args.samples)
    explorer.wait()
    arrived = []
    explorer.observe(lambda c: c["new"] and arrived.append(time.perf_counter()), "heatmaps")
    start = time.perf_counter()
    run = explorer.run(wait=True)
    full = time.perf_counter() - start
    print(f"explorer: first heatmap {arrived[0] - start:.1f} s, full trace {full:.1f} s")
    print("  kinds arrived at " + ", ".join(f"{t - start:.1f} s" for t in arrived))
    tracer = lenscope.CausalTracer(model, progress=False)
    start = time.perf_counter()
    expected = tracer.trace_kinds(PROMPT, tuple(explorer.subject), samples=args.samples)
    print(f"trace_kinds (as the CLI): {time.perf_counter() - start:.1f} s")
    same = all(run.results[k].to_dict() == r.to_dict() for k, r in expected.items())
    print(f"explorer results equal trace_kinds': {same}")
    layer, pos, _ = run.results["mlp_out"].peak()
    start = time.perf_counter()
    explorer.cell = {"kind": "mlp_out", "layer": int(layer), "pos": int(pos)}
    top = time.perf_counter() - start
    explorer.wait()
    print(f"cell click: top-k {top:.3f} s, lens view {time.perf_counter() - start:.1f} s")
    explorer.close()


if __name__ == "__main__":
    main()
