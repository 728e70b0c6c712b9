"""Time a full (layer, head) grid of head outputs: lenscope against TransformerLens ``patching.py``.

One run loads one model (the offline Gemma-3-270m by default, in the
installed TransformerLens' default class) and traces the Eiffel Tower fact
with ROME's corruption (Meng et al., 2022, arXiv 2202.05262: Gaussian noise
of 3 embedding sigmas on the subject, ``--samples`` copies), restoring the
clean ``blocks.L.attn.hook_z`` of one head at a time:

* lenscope: ``CausalTracer.trace(kind="z", by="head")`` (every position) and
  ``by="head_pos", positions=[last]`` (the last token only);
* TransformerLens ``patching.get_act_patch_attn_head_out_all_pos`` and
  ``get_act_patch_attn_head_out_by_pos`` (restricted to the last token with an
  ``index_df``) on the same corrupted copies: the noise is added by a hook at
  ``hook_embed`` held around the call, the metric is the answer's probability
  averaged over the copies, on full logits, one forward pass per cell.

It checks that both give the same grid (to 1e-4: float32 noise, different
batching) and prints a markdown table of median times and ratios, the heads
with the largest effect at the last token, and (``--figure``) writes the
lenscope heatmap of the last-token grid as a PNG.

Examples:
    python benchmarks/bench_heads.py                       # offline Gemma-3-270m, CPU
    python benchmarks/bench_heads.py --figure docs/heads_eiffel.png --out docs/heads.md
"""

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def _tl_patching(model, tokens, draws, span, answer, function, index_df=None):
    """TransformerLens patching.py on the noised copies (noise held by an outer hook)."""
    from transformer_lens import patching

    start, end = span
    corrupted = tokens.repeat(len(draws), 1)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += draws.to(embed.dtype)
        return embed

    def prob(logits):
        return torch.softmax(logits[:, -1].float(), -1)[:, answer].mean()

    _, clean_cache = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[("hook_embed", add_noise)]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"index_df": index_df, "index_axis_names": None} if index_df is not None else {}
        return getattr(patching, function)(model, corrupted, clean_cache, prob, **kwargs).cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the last-token grid")
    parser.add_argument("--out", type=Path, default=None, help="append the report here")
    parser.add_argument("--save", type=Path, default=None, help="directory for the result JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # patching.py's per-cell progress bars

    import pandas as pd

    import lenscope
    from lenscope.noise import draw_noise

    model = lenscope.load_model(device="cpu")
    cfg = model.cfg
    tracer = lenscope.CausalTracer(model, progress=False)
    tokens = model.to_tokens(PROMPT)
    last = tokens.shape[1] - 1
    options = {"subject": SUBJECT, "kind": "z", "samples": args.samples, "seed": 0}
    # Warm-up (first-call costs), and the settings both tools share.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first call's long-trace estimate counts warm-up
        first = tracer.trace(PROMPT, **options)
    span, answer = first.subject_range, first.answer_id
    start, end = span
    draws = draw_noise(args.samples, end - start, cfg.d_model, first.noise_std, 0)

    index_df = pd.DataFrame(
        [(layer, last, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)],
        columns=["layer", "pos", "head"],
    )
    runs = {
        "ours_all": lambda: tracer.trace(PROMPT, by="head", **options),
        "tl_all": lambda: _tl_patching(
            model, tokens, draws, span, answer, "get_act_patch_attn_head_out_all_pos"
        ),
        "ours_last": lambda: tracer.trace(PROMPT, by="head_pos", positions=[last], **options),
        "tl_last": lambda: _tl_patching(
            model, tokens, draws, span, answer, "get_act_patch_attn_head_out_by_pos", index_df
        ),
    }
    # Interleaved repeats: a machine shared with other work slows both tools alike.
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    out = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out[name] = fn()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    t = {name: statistics.median(v) for name, v in wall.items()}
    c = {name: statistics.median(v) for name, v in cpu.items()}
    ours_all, tl_all, ours_last, tl_last = (
        out[k] for k in ("ours_all", "tl_all", "ours_last", "tl_last")
    )
    rows = []
    tl_last = tl_last.reshape(cfg.n_layers, cfg.n_heads)
    diff_all = float((ours_all.scores - tl_all.float()).abs().max())
    diff_last = float((ours_last.scores[:, :, last] - tl_last.float()).abs().max())
    cells = cfg.n_layers * cfg.n_heads
    for name, key, diff in (
        ("(layer, head), every position", "all", diff_all),
        ("(layer, head) at the last token", "last", diff_last),
    ):
        rows.append(
            (name, cells, t[f"ours_{key}"], t[f"tl_{key}"], c[f"ours_{key}"], c[f"tl_{key}"], diff)
        )

    lines = [
        f"Model {lenscope.hooks.model_name(model)} ({type(model).__name__}, "
        f"TransformerLens {version('transformer-lens')}), {cfg.n_layers} layers x "
        f"{cfg.n_heads} heads ({getattr(cfg, 'n_key_value_heads', None)} key/value heads), "
        f"{tokens.shape[1]} tokens, {args.samples} noised copies, strategy "
        f"{tracer.strategy!r}, {torch.get_num_threads()} threads, {platform.processor() or ''} "
        f"{platform.machine()}, median of {args.repeats}.",
        "",
        "| grid | cells | lenscope wall (s) | TL patching.py wall (s) | ratio | lenscope CPU (s) "
        "| TL CPU (s) | CPU ratio | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, n, ours, theirs, ours_cpu, theirs_cpu, diff in rows:
        lines.append(
            f"| {name} | {n} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x | "
            f"{ours_cpu:.2f} | {theirs_cpu:.2f} | {theirs_cpu / ours_cpu:.1f}x | {diff:.1e} |"
        )
    lines += [
        "",
        f"Answer {ours_last.answer!r}: clean p = {ours_last.clean_score:.3f}, corrupted "
        f"{ours_last.corrupted_score:.3f}. Heads restoring the most of it at the last token:",
        "",
        "| layer | head | p after restoring | share of clean - corrupted |",
        "| ---: | ---: | ---: | ---: |",
    ]
    last_grid = ours_last.scores[:, :, last]
    gap = ours_last.clean_score - ours_last.corrupted_score
    best = last_grid.flatten().topk(5)
    for value, index in zip(best.values.tolist(), best.indices.tolist(), strict=True):
        layer, head = divmod(index, cfg.n_heads)
        share = (value - ours_last.corrupted_score) / gap
        lines.append(f"| {layer} | {head} | {value:.3f} | {share:.1%} |")
    all_best = ours_all.peak()
    lines += [
        "",
        f"Every position: peak p = {all_best[-1]:.3f} at layer {all_best[0]}, head {all_best[1]}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        ours_all.save(args.save / "heads_z_all_positions.json")
        ours_last.save(args.save / "heads_z_last_token.json")
    if args.figure:
        lenscope.save_image(ours_last.plot(pos=last), args.figure, scale=2)
        print(f"figure: {args.figure}")
    if max(diff_all, diff_last) > 1e-4:
        print("lenscope and TransformerLens disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
