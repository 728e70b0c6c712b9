"""Time activation patching with a counterfactual prompt: lenscope against TransformerLens.

One run loads one model and times, on the same prompts and metric
(symmetric token replacement, Zhang & Nanda 2023, arXiv 2309.16042: the
normalised logit difference of the clean answer against the counterfactual's
answer):

* lenscope: ``CausalTracer.trace_kinds`` with a
  :class:`~lenscope.CounterfactualPrompt`, the four kinds of
  TransformerLens ``patching.py`` together (window 1), then each direction;
* TransformerLens ``patching.py``: ``get_act_patch_resid_pre``,
  ``..._resid_mid``, ``..._attn_out`` and ``..._mlp_out``, one forward pass
  with full logits per ``(layer, pos)`` cell; noising by swapping the caches.

It checks that both compute the same grid (max absolute difference) and
prints a markdown table of times and ratios.

Examples:
    python benchmarks/bench_patch.py                  # offline Gemma-3-270m, CPU
    python benchmarks/bench_patch.py --threads 2 --repeats 3
"""

import argparse
import statistics
import time
import warnings

KINDS = {
    "resid_pre": "get_act_patch_resid_pre",
    "resid_mid": "get_act_patch_resid_mid",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
}


def _timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--counterfactual", default="The Colosseum is located in the city of")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformer_lens import patching

    import lenscope

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = lenscope.load_model(args.model, device="cpu")
    tracer = lenscope.CausalTracer(model, progress=False)
    clean = model.to_tokens(args.prompt)
    counterfactual = model.to_tokens(args.counterfactual)
    rows = []
    for direction in ("denoise", "noise"):
        seconds, results = _timed(
            lambda direction=direction: tracer.trace_kinds(
                args.prompt,
                corruption=lenscope.CounterfactualPrompt(args.counterfactual),
                kinds=tuple(KINDS),
                windows=1,
                direction=direction,
            ),
            args.repeats,
        )
        first = results["resid_pre"]
        answer, foil = first.answer_id, first.foil_id
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean)
            cf_logits, cf_cache = model.run_with_cache(counterfactual)

        def logit_diff(logits, answer=answer, foil=foil):
            return logits[0, -1, answer] - logits[0, -1, foil]

        clean_ld, cf_ld = logit_diff(clean_logits), logit_diff(cf_logits)

        def metric(logits, clean_ld=clean_ld, cf_ld=cf_ld):
            return (logit_diff(logits) - cf_ld) / (clean_ld - cf_ld)

        tokens, cache = (
            (counterfactual, clean_cache) if direction == "denoise" else (clean, cf_cache)
        )

        def run_tl(tokens=tokens, cache=cache, metric=metric):
            with torch.no_grad():
                return {
                    k: getattr(patching, f)(model, tokens, cache, metric) for k, f in KINDS.items()
                }

        tl_seconds, expected = _timed(run_tl, args.repeats)
        diff = max(float((results[k].scores - expected[k]).abs().max()) for k in KINDS)
        rows.append((direction, seconds, tl_seconds, diff, first))
    first = rows[0][4]
    print(
        f"model {first.model_name} ({type(model).__name__}), {len(first.tokens)} tokens, "
        f"answer {first.answer!r} vs foil {first.foil!r}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print("| direction | kinds | lenscope (s) | TL patching.py (s) | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for direction, seconds, tl_seconds, diff, _ in rows:
        print(
            f"| {direction} | {', '.join(KINDS)} | {seconds:.2f} | {tl_seconds:.2f} | "
            f"{tl_seconds / seconds:.1f}x | {diff:.2g} |"
        )


if __name__ == "__main__":
    main()
