"""How well neuron attribution patching finds the neurons an exact trace finds (Gemma-3-270m).

Prompt "The Eiffel Tower is located in the city of", subject "The Eiffel
Tower", answer " Paris", ROME's Gaussian noise (10 samples, seed 0), metric
``prob``, window 1. Neuron AtP (``tracer.attribute``, ``kinds=("mlp_post",)``,
``by="neuron"``) estimates every neuron of every layer restored at the last
subject token from one backward; the exact engine sweep restores

* the top 20 neurons by attribution, and
* every neuron of the candidate layers at the last subject token
  (``--layers``: e.g. ``0-5``; default ``auto``, the one layer whose
  ``mlp_out`` restored alone (exact, window 1) at the last subject token
  restores the most of " Paris", a choice that does not look at the
  estimate),

and the script reports, on the candidate set, recall@20 (the exact top 20
among the estimate's top 20), Pearson and Spearman correlation, the exact
scores of the estimate's top 20, and the times. ``--time-one-layer`` only
times the exact sweep of one layer.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/neuron_recall.py``.
"""

import argparse
import json
import time

import torch

import lenscope
from lenscope import engine, metrics
from lenscope.attribution import _pearson, _ranks
from lenscope.settings import TraceSettings, resolve_prompt

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
ANSWER = " Paris"


def exact_scores(model, settings, cells, strategy="prefix", progress=False):
    """The engine's exact sweep of ``cells`` (``(layer, neuron)``), the ``prob`` of each."""
    resolved = resolve_prompt(model, PROMPT, SUBJECT, settings)
    tokens, span = resolved.tokens, resolved.subject_range
    settings = settings.for_model(model)
    pos_list = settings.position_list(tokens.shape[0], span)
    where = settings.sites[0].for_model(model).at_positions(pos_list)
    n_layer = model.cfg.n_layers
    with torch.inference_mode(), engine.matmul_friendly_weights(model):
        corrupted = settings.corruption.bind(model, tokens, span)
        engine.check_memory(model, corrupted, [where], strategy)
        names = where.hook_names(n_layer)
        clean = engine.clean_run(model, tokens, names)
        state = engine.corrupted_run(model, corrupted, keep_prefix_state=strategy == "prefix")
        out = engine.sweep(
            model,
            site=where,
            window=1,
            cells=cells,
            source={name: act[None] for name, act in clean.activations.items()},
            base=corrupted,
            base_state=state,
            answer_id=int(resolved.answer_id),
            metrics=[metrics.prob],
            top_k=1,
            strategy=strategy,
            batch_size=None,
            progress=progress,
        )
    return out.scores[0]


def main() -> None:
    """Measure and print one JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="auto", help="candidate layers, e.g. 0-5, or auto")
    parser.add_argument("--time-one-layer", type=int, default=None, metavar="LAYER")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--target", default="metric", help="AtP target: metric or log_prob")
    parser.add_argument(
        "--exact-from", default=None, help="reuse the exact candidate grid a --save file holds"
    )
    parser.add_argument("--save", default="neuron_recall.pt", help="grids and record (torch.save)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    model = lenscope.load_model("gemma-3-270m", device="cpu")
    load_s = time.perf_counter() - started
    base = TraceSettings.from_options(kinds=("mlp_post",), by="neuron", answer=ANSWER, windows=1)
    span = resolve_prompt(model, PROMPT, SUBJECT, base).subject_range
    settings = TraceSettings.from_options(base, positions=[span[1] - 1])
    n_layer, d_mlp = model.cfg.n_layers, model.cfg.d_mlp

    if args.time_one_layer is not None:
        cells = torch.cartesian_prod(torch.tensor([args.time_one_layer]), torch.arange(d_mlp))
        t = time.perf_counter()
        exact_scores(model, settings, cells)
        print(
            json.dumps(
                {
                    "layer": args.time_one_layer,
                    "cells": d_mlp,
                    "exact_s": round(time.perf_counter() - t, 1),
                }
            )
        )
        return

    tracer = lenscope.CausalTracer(model, progress=False)
    t = time.perf_counter()
    (grid,) = tracer.attribute(PROMPT, SUBJECT, settings, target=args.target).values()
    atp_s = time.perf_counter() - t
    estimate = grid.scores  # [layer, neuron], prob scale (corrupted + estimated change)

    mlp_out = None
    saved = torch.load(args.exact_from) if args.exact_from else None
    if saved is not None:
        lo, hi = saved["record"]["candidate_layers"]
    elif args.layers == "auto":
        t = time.perf_counter()
        trace = tracer.trace(
            PROMPT, SUBJECT, kind="mlp_out", window=1, positions=[span[1] - 1], answer=ANSWER
        )
        mlp_out = [round(float(v), 4) for v in trace.scores[:, span[1] - 1]]
        lo = hi = int(trace.scores[:, span[1] - 1].argmax())
        mlp_out_s = time.perf_counter() - t
    else:
        lo, hi = (int(x) for x in args.layers.split("-"))
    candidates = torch.cartesian_prod(torch.arange(lo, hi + 1), torch.arange(d_mlp))
    t = time.perf_counter()
    if saved is not None:
        exact = saved["exact"]
    else:
        exact = exact_scores(model, settings, candidates, progress=True)
    exact_s = time.perf_counter() - t

    k = args.k
    flat = estimate.flatten()
    top_all = flat.topk(k).indices
    top_cells = torch.stack([top_all // d_mlp, top_all % d_mlp], dim=1)
    t = time.perf_counter()
    top_exact = exact_scores(model, settings, top_cells)
    top_s = time.perf_counter() - t

    x = estimate[lo : hi + 1].flatten().double()
    y = exact[lo : hi + 1].flatten().double()
    best_x = set(x.topk(k).indices.tolist())
    best_y = set(y.topk(k).indices.tolist())
    record = {
        "model": "gemma-3-270m",
        "layers_x_d_mlp": [n_layer, d_mlp],
        "subject_last_pos": span[1] - 1,
        "clean_prob": grid.clean_score,
        "corrupted_prob": grid.corrupted_score,
        "target": args.target,
        "candidate_layers": [lo, hi],
        "mlp_out_window1_at_subject_last": mlp_out,
        "candidate_cells": len(candidates),
        f"recall_at_{k}": len(best_x & best_y) / k,
        "pearson": _pearson(x, y),
        "spearman": _pearson(_ranks(x), _ranks(y)),
        "atp_top": [
            {
                "layer": int(c[0]),
                "neuron": int(c[1]),
                "atp": round(float(estimate[c[0], c[1]]), 5),
                "exact": round(float(top_exact[c[0], c[1]]), 5),
            }
            for c in top_cells
        ],
        "exact_top_in_candidates": [
            {
                "layer": lo + i // d_mlp,
                "neuron": i % d_mlp,
                "exact": round(float(y[i]), 5),
                "atp": round(float(x[i]), 5),
            }
            for i in y.topk(k).indices.tolist()
        ],
        "seconds": {
            "load": round(load_s, 1),
            "atp_all_layers": round(atp_s, 1),
            "mlp_out_trace": round(mlp_out_s, 1) if mlp_out else None,
            "exact_candidates": round(exact_s, 1),
            f"exact_atp_top_{k}": round(top_s, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(record, indent=1))
    torch.save({"estimate": estimate, "exact": exact, "record": record}, args.save)


if __name__ == "__main__":
    main()
