"""How live the notebook explorer is: time to its first heatmap and to the full trace.

``lenscope.explore(model)`` shows every kind's attribution estimate first (one
forward and one backward pass), then traces kind by kind in a worker thread,
streaming each kind's exact cells into its heatmap as the sweep's batches
finish (over the estimate), and replacing it with the kind's result when its
sweep is done. This script runs the explorer on the Eiffel Tower prompt
(ROME's three kinds, windows and ``--samples`` noise copies), records when
each of those reached the widget's ``heatmaps`` trait, then times
``tracer.trace_kinds`` with the same settings (what the command line runs) for
comparison, checks the two give equal results, and prints a table. With
``--lens`` it also times the lens view of the peak cell (what a click
computes beyond its top-k).

Example:
    python benchmarks/bench_explorer.py --samples 10
"""

import argparse
import os
import time

import lenscope

PROMPT = "The Eiffel Tower is located in the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--lens", action="store_true", help="time a click's lens view too")
    args = parser.parse_args()
    model = lenscope.load_model(args.model)
    explorer = lenscope.explore(model, prompt=PROMPT, samples=args.samples)
    explorer.wait()
    events: list[tuple[float, str]] = []

    def seen(change: dict) -> None:
        now = time.perf_counter()
        for drawn in change["new"]:
            state = (
                "estimate"
                if drawn.get("estimate")
                else "exact"
                if not drawn.get("partial")
                else ("first exact cells")
            )
            key = f"{drawn['kind']}: {state}"
            if all(k != key for _, k in events):
                events.append((now, key))

    explorer.observe(seen, "heatmaps")
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    run = explorer.run(wait=True)
    full, full_cpu = time.perf_counter() - start, time.process_time() - cpu
    tracer = lenscope.CausalTracer(model, progress=False)
    begun, cpu = time.perf_counter(), time.process_time()
    expected = tracer.trace_kinds(PROMPT, tuple(explorer.subject), samples=args.samples)
    cli, cli_cpu = time.perf_counter() - begun, time.process_time() - cpu
    load = max(load, os.getloadavg()[0])
    same = all(run.results[k].to_dict() == r.to_dict() for k, r in expected.items())
    rows = [(key, at - start) for at, key in events]
    rows += [("explorer: full three-kind trace", full), ("trace_kinds (as the CLI)", cli)]
    print(f"{args.model}, {args.samples} samples, 1-minute load average up to {load:.1f}")
    print(f"{'event':<40} {'seconds after Run':>18}")
    for key, seconds in rows:
        print(f"{key:<40} {seconds:>18.1f}")
    print(f"explorer results equal trace_kinds': {same}")
    # On a shared machine the wall times swing with the load; CPU seconds (all threads)
    # compare the work.
    print(f"CPU seconds: explorer {full_cpu:.1f}, trace_kinds {cli_cpu:.1f}")
    if args.lens:
        layer, pos, _ = run.results["mlp_out"].peak()
        begun = time.perf_counter()
        explorer.cell = {"kind": "mlp_out", "layer": int(layer), "pos": int(pos)}
        top = time.perf_counter() - begun
        explorer.wait()
        print(f"cell click: top-k {top:.3f} s, lens view {time.perf_counter() - begun:.1f} s")
    explorer.close()


if __name__ == "__main__":
    main()
