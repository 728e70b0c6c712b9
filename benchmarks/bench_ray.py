"""Dataset trace on Gemma-3-270m: this process vs two Ray workers, same facts, same settings.

Traces the first N known facts (filter_known on ROME's set) two ways and prints one
table from this one run:
  local, T threads    trace_dataset in this process with T torch threads (default every core)
  Ray, W x 1 thread   RayExecutor(num_workers=W): W actors, each loading its own
                      Gemma (Ray sets OMP_NUM_THREADS=1 per actor)
Wall time is the trace_dataset call, Ray's worker start-up (model load) included;
the Ray lines also split start-up from tracing. The summaries must
agree: the largest |AIE difference| against the local run is printed.

  python benchmarks/bench_ray.py [--facts 10] [--workers 2] [--samples 10]
"""

import argparse
import os
import platform
import time

import torch

import lenscope
from lenscope.datasets import filter_known, known_facts


def largest_difference(a, b):
    worst = 0.0
    for kind in a.kinds:
        diff = (a.aie(kind) - b.aie(kind)).abs().nan_to_num(0.0)
        worst = max(worst, float(diff.max()))
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--local-threads", type=int, default=None, help="default: every core")
    args = parser.parse_args()

    import ray

    model = lenscope.load_model("gemma-3-270m", device="cpu")
    tracer = lenscope.CausalTracer(model, progress=False)
    cores = os.cpu_count() or 1
    threads = args.local_threads or cores
    torch.set_num_threads(threads)
    facts = filter_known(tracer, known_facts(), limit=args.facts)
    options = {"samples": args.samples, "progress": False}

    rows = []
    start = time.perf_counter()
    reference = lenscope.trace_dataset(tracer, facts, **options)
    rows.append((f"local, {threads} threads", time.perf_counter() - start, reference, None))
    torch.set_num_threads(1)

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    executor = lenscope.RayExecutor(num_workers=args.workers)
    start = time.perf_counter()
    summary = lenscope.trace_dataset(tracer, facts, executor=executor, **options)
    wall = time.perf_counter() - start
    tracing = max(w.seconds for w in summary.workers)  # from model ready to last fact
    rows.append((f"Ray, {args.workers} x 1 thread", wall, summary, tracing))
    ray.shutdown()

    print(
        f"Gemma-3-270m, {len(facts)} known facts, {args.samples} samples, kinds "
        f"{', '.join(reference.kinds)}; {platform.processor() or platform.machine()}, "
        f"{cores} cores, torch {torch.__version__}, lenscope {lenscope.__version__}, "
        f"ray {ray.__version__}"
    )
    base = rows[0][1]
    print("| run | wall s | s / fact | speed-up vs local | max abs AIE diff vs local |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, wall, summary, _ in rows:
        print(
            f"| {name} | {wall:.1f} | {wall / len(facts):.2f} | {base / wall:.2f}x | "
            f"{largest_difference(summary, reference):.1e} |"
        )
    ray_summary = rows[-1][2]
    print()
    print("| Ray worker | facts | model load s | facts / s after load |")
    print("| --- | ---: | ---: | ---: |")
    for w in ray_summary.workers:
        print(f"| {w.worker} | {w.n_facts} | {w.setup_seconds:.1f} | {w.facts_per_second:.3f} |")
    wall, tracing = rows[-1][1], rows[-1][3]
    print(
        f"\nRay: {wall - tracing:.1f} s starting workers (processes, imports, model loads), "
        f"{tracing:.1f} s tracing ({tracing / len(facts):.2f} s / fact)"
    )


if __name__ == "__main__":
    main()
