"""Dataset throughput: facts per forward pass (packing) against one fact at a time, same run.

Traces the first N known facts that Gemma-3-270m knows (``filter_known`` on
ROME's set; Meng et al., 2022, arXiv 2202.05262) with ROME's settings (three
kinds, windows 1/10/10, 10 samples, noise 3 sigma) and prints one table from
this one run:

  lenscope, packed        trace_dataset(prompts_per_batch=K): facts of one token
                          length share every forward pass
  lenscope, one by one    trace_dataset(prompts_per_batch=1): what it did before
  causal-tracer loop      causal-tracer 1.1.0's calculate_hidden_flow, fact by fact
                          and kind by kind, on the same weights (--ct-facts of them;
                          ``pip install --no-deps causal-tracer==1.1.0``)

The packed and one-by-one runs must agree: the largest |score difference| over
every fact, kind and cell, and the largest |AIE difference|, are printed.
Also printed: how the facts fall into packs (token lengths), the transformer-block
calls per fact (each a kernel sequence on a GPU, where launches and Python bound the
run), and, on CUDA, the GPU time (CUDA events around each run) beside the wall time.

  python benchmarks/bench_dataset.py [--facts 20] [--prompts-per-batch 8] [--threads 2]
"""

import argparse
import collections
import os
import platform
import time

import torch

import lenscope
from lenscope.datasets import filter_known, known_facts
from lenscope.datasets.run import PROMPTS_PER_BATCH
from lenscope.tokens import prompt_tokens

KINDS = ("resid_post", "mlp_out", "attn_out")


def timed(fn, device):
    """``(wall seconds, GPU seconds or None, result)``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
    wall = time.perf_counter()
    out = fn()
    gpu = None
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / 1e3
    return time.perf_counter() - wall, gpu, out


class BlockCalls:
    """Counts calls of the model's transformer blocks (forward hooks, removed on exit).

    Each call is one kernel sequence on a GPU, where the issue's profile found the run
    bound by launches and Python: the count per fact is the CPU-side measure of that.
    """

    def __init__(self, model):
        self.model, self.count, self.handles = model, 0, []

    def __enter__(self):
        def hook(*_):
            self.count += 1

        self.handles = [block.register_forward_hook(hook) for block in self.model.blocks]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def largest_differences(a, b):
    """Max |score difference| over facts, kinds and cells; max |AIE difference|."""
    cells = 0.0
    for x, y in zip(a.facts, b.facts, strict=True):
        assert x.fact_id == y.fact_id and x.answer_id == y.answer_id
        for kind in a.kinds:
            diff = (x.scores[kind] - y.scores[kind]).abs().nan_to_num(0.0)
            cells = max(cells, float(diff.max()))
    aie = max(float((a.aie(kind) - b.aie(kind)).abs().nan_to_num(0.0).max()) for kind in a.kinds)
    return cells, aie


def causal_tracer_loop(model, facts, samples, noise_std):
    """causal-tracer on the Hugging Face model with the same weights, one fact and kind per call."""
    from bench_trace import CT_KINDS, WINDOWS, _offline_gemma, ct_layer_config
    from causal_tracer import CausalTracer as PeerTracer

    setup = _offline_gemma(str(model.cfg.device), model.cfg.dtype)
    peer = PeerTracer(
        setup.hf_model,
        setup.hf_tokenizer,
        layer_config=ct_layer_config(setup.hf_model, "gemma-3-270m"),
        noise=noise_std,
        device=model.cfg.device,
    )

    def run():
        for fact in facts:
            for kind in KINDS:
                peer.calculate_hidden_flow(
                    fact["prompt"],
                    subject=fact["subject"],
                    kind=CT_KINDS[kind],
                    window=WINDOWS[kind],
                    samples=samples,
                    batch_size=32,
                )

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--prompts-per-batch", type=int, default=PROMPTS_PER_BATCH)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: every core)"
    )
    parser.add_argument("--ct-facts", type=int, default=0, help="facts for the causal-tracer loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = lenscope.load_model("gemma-3-270m", device=args.device, dtype=dtype)
    tracer = lenscope.CausalTracer(model, progress=False)
    facts = filter_known(tracer, known_facts(), limit=args.facts)
    lengths = collections.Counter(len(prompt_tokens(model, f["prompt"])) for f in facts)
    options = {"samples": args.samples, "kinds": KINDS, "progress": False}
    load = [os.getloadavg()[0]]

    rows = []
    with BlockCalls(model) as calls:
        wall, gpu, packed = timed(
            lambda: lenscope.trace_dataset(
                tracer, facts, prompts_per_batch=args.prompts_per_batch, **options
            ),
            device,
        )
    name = f"lenscope, packed (prompts_per_batch={args.prompts_per_batch})"
    rows.append((name, len(facts), wall, gpu, calls.count))
    print(f"measured: {rows[-1]}", flush=True)
    load.append(os.getloadavg()[0])
    with BlockCalls(model) as calls:
        wall, gpu, single = timed(
            lambda: lenscope.trace_dataset(tracer, facts, prompts_per_batch=1, **options), device
        )
    rows.append(("lenscope, one by one (prompts_per_batch=1)", len(facts), wall, gpu, calls.count))
    print(f"measured: {rows[-1]}", flush=True)
    load.append(os.getloadavg()[0])
    if args.ct_facts:
        run = causal_tracer_loop(model, facts[: args.ct_facts], args.samples, packed.noise_std)
        wall, gpu, _ = timed(run, device)
        rows.append(("causal-tracer, fact by fact", args.ct_facts, wall, gpu, None))
        load.append(os.getloadavg()[0])

    base = rows[1][2] / rows[1][1]
    print(
        f"Gemma-3-270m ({type(model).__name__}, {args.dtype}, {args.device}), {len(facts)} known "
        f"facts, {args.samples} samples, kinds {', '.join(KINDS)} (windows "
        f"{packed.windows}), torch threads {threads}"
    )
    print(f"token lengths: {dict(sorted(lengths.items()))}")
    print()
    print(
        "| run | facts | wall time | s/fact | facts/minute | speed vs one by one | "
        "block calls per fact | GPU time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, wall, gpu, blocks in rows:
        shown = "n/a (CPU)" if gpu is None else f"{gpu:.2f} s"
        per_fact = "" if blocks is None else f"{blocks / n:,.0f}"
        print(
            f"| {name} | {n} | {wall:.1f} s | {wall / n:.2f} | {60 * n / wall:.2f} | "
            f"{base / (wall / n):.2f}x | {per_fact} | {shown} |"
        )
    cells, aie = largest_differences(packed, single)
    print()
    print(
        f"packed vs one by one: max |score difference| {cells:.2e}, max |AIE difference| {aie:.2e}"
    )
    print(
        f"load average (1 min) before/after each run: {', '.join(f'{x:.2f}' for x in load)}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
