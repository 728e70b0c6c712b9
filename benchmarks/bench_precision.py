"""Mixed precision on Gemma-3-270m: a bfloat16 trace against the float32 one, same run.

The model runs in its dtype up to the logits; lenscope casts them to float32
before the softmax and the metric (``hooks.decode_resid``), so what differs is
the rounding of the forward passes and of the unembedding. Prints, per
kind, the largest |score difference| between the two traces of the Eiffel Tower
prompt (ROME's settings: 10 samples, noise 3 sigma, windows 1/10/10), the
clean and corrupted scores of both, and both wall times.

  python benchmarks/bench_precision.py [--dtype bfloat16] [--threads 2]
"""

import argparse
import os
import time

import torch

import lenscope

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
KINDS = ("resid_post", "mlp_out", "attn_out")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    traces, seconds = {}, {}
    for dtype in ("float32", args.dtype):
        model = lenscope.load_model("gemma-3-270m", device=args.device, dtype=getattr(torch, dtype))
        tracer = lenscope.CausalTracer(model, progress=False)
        # The same absolute noise for both: sigma measured on the float32 model.
        noise = traces["float32"]["mlp_out"].noise_std if traces else None
        started = time.perf_counter()
        traces[dtype] = tracer.trace_kinds(
            PROMPT, SUBJECT, kinds=KINDS, samples=args.samples, noise=noise
        )
        seconds[dtype] = time.perf_counter() - started
        del model, tracer

    full, low = traces["float32"], traces[args.dtype]
    print(f"Gemma-3-270m, {PROMPT!r}, {args.samples} samples, {args.device}")
    print()
    print(
        f"| kind | max abs score difference ({args.dtype} vs float32) | at cell | "
        f"float32 peak | {args.dtype} peak |"
    )
    print("|---|---|---|---|---|")
    for kind in KINDS:
        diff = (low[kind].scores - full[kind].scores).abs()
        layer, pos = divmod(int(diff.argmax()), diff.shape[1])
        print(
            f"| {kind} | {float(diff.max()):.2e} | ({layer}, {pos}) | "
            f"{float(full[kind].scores.max()):.4f} | {float(low[kind].scores.max()):.4f} |"
        )
    first_full, first_low = full[KINDS[0]], low[KINDS[0]]
    print()
    print(
        f"clean p: float32 {first_full.clean_score:.4f}, {args.dtype} {first_low.clean_score:.4f}"
    )
    print(
        f"corrupted p: float32 {first_full.corrupted_score:.5f}, "
        f"{args.dtype} {first_low.corrupted_score:.5f}"
    )
    print(
        f"noise std {first_full.noise_std:.4g} (both); "
        f"answer {first_full.answer!r} / {first_low.answer!r}"
    )
    print(
        f"wall time: float32 {seconds['float32']:.1f} s, {args.dtype} {seconds[args.dtype]:.1f} s"
    )


if __name__ == "__main__":
    main()
