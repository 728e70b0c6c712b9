"""Capture every method's output on tiny models, to compare a refactor bit for bit.

``capture`` runs a fixed set of calls (every kind, both strategies, both
directions, several metrics, STR, per-head sites, attribution estimators,
packed and one-at-a-time datasets, the lens cell) on the seeded tiny models
of ``tests/conftest.py`` and writes every result's ``to_dict()`` to one JSON
file; ``compare`` diffs two such files value by value (floats compared
exactly: a refactor of the orchestration must not move a single bit)::

    python scripts/capture_harness.py capture before.json
    # ... change the code ...
    python scripts/capture_harness.py capture after.json
    python scripts/capture_harness.py compare before.json after.json

Keys renamed on purpose are listed with ``--renamed old=new``.
"""

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
COUNTERFACTUAL = "The Space Needle is located in the city of"
FACTS = [
    {"known_id": 1, "prompt": "The Space Needle is located in the city", "subject": "Space Needle"},
    {"known_id": 2, "prompt": "In the city of Big Ben and the", "subject": "Big Ben"},
    {"known_id": 3, "prompt": "Paris is the capital of the country and", "subject": "Paris"},
    {"known_id": 4, "prompt": "The capital of France is Paris", "subject": "France"},
    {"known_id": 6, "prompt": PROMPT, "subject": SUBJECT},
]
KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")


TIMES = ("seconds", "started", "finished", "elapsed")
"""Keys holding wall-clock times: left out (they differ between any two runs)."""


def _plain(value):
    """JSON values with NaN/inf spelled out, so that they compare exactly; no timings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _dicts(out):
    if hasattr(out, "to_dict"):
        return _plain(out.to_dict())
    if isinstance(out, dict):
        return {str(k): _dicts(v) for k, v in out.items()}
    if isinstance(out, tuple | list):
        return [_dicts(v) for v in out]
    return _plain(out)


def capture(path: Path) -> None:
    """Run every call and write ``{name: to_dict()}``."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    import lenscope
    from lenscope import CausalTracer, compat
    from lenscope.lens import lens_trace_cell

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tokenizer = make_tiny_tokenizer(tempfile.mkdtemp())
    out = {"transformer_lens": ".".join(map(str, compat.tl_version()))}
    for label, gated in (("plain", False), ("gated", True)):
        model = make_tiny_model(tokenizer, gated=gated)
        for strategy in ("prefix", "full"):
            tracer = CausalTracer(model, strategy=strategy, progress=False)
            key = f"{label}/{strategy}"
            common = {"samples": 3, "seed": 1}
            out[f"{key}/denoise"] = _dicts(
                tracer.trace_kinds(
                    PROMPT, SUBJECT, kinds=KINDS, metrics=("prob", "log_prob"), **common
                )
            )
            out[f"{key}/noise"] = _dicts(
                tracer.trace_kinds(PROMPT, SUBJECT, kinds=KINDS, direction="noise", **common)
            )
            out[f"{key}/heads"] = _dicts(
                tracer.trace_kinds(PROMPT, SUBJECT, kinds=("z", "v"), **common)
            )
            out[f"{key}/head_pos"] = _dicts(
                tracer.trace(PROMPT, SUBJECT, kind="k", by="head_pos", positions=[-1], **common)
            )
            out[f"{key}/str"] = _dicts(
                tracer.patch(
                    PROMPT,
                    COUNTERFACTUAL,
                    kind="resid_pre",
                    metric=("normalized_logit_diff", "logit_diff", "prob"),
                    answer=" paris",
                    foil=" seattle",
                )
            )
            out[f"{key}/str_noise"] = _dicts(
                tracer.patch(
                    PROMPT,
                    COUNTERFACTUAL,
                    kind="mlp_out",
                    window=2,
                    direction="noise",
                    answer=" paris",
                    foil=" seattle",
                )
            )
            out[f"{key}/kl"] = _dicts(
                tracer.trace(PROMPT, SUBJECT, kind="attn_out", metric="kl_div", **common)
            )
        tracer = CausalTracer(model, progress=False)
        kinds = ("resid_post", "mlp_out", "attn_out")
        for estimator in ("atp", "ig:2", "ig:2:layer"):
            out[f"{label}/attr/{estimator}"] = _dicts(
                tracer.attribute(PROMPT, SUBJECT, kinds=kinds, estimator=estimator, samples=3)
            )
        out[f"{label}/attr/str"] = _dicts(
            tracer.attribute(
                PROMPT,
                None,
                kinds=kinds,
                corruption=lenscope.CounterfactualPrompt(COUNTERFACTUAL),
                target="metric",
                answer=" paris",
                foil=" seattle",
            )
        )
        for packed in (None, 3):
            summary = lenscope.trace_dataset(
                tracer,
                FACTS,
                kinds=kinds,
                samples=3,
                windows=2,
                prompts_per_batch=packed,
                progress=False,
            )
            out[f"{label}/dataset/pack{packed}"] = _dicts(summary)
        summary = lenscope.trace_dataset(
            tracer, FACTS, kinds=kinds, samples=3, method="attribution", progress=False
        )
        out[f"{label}/dataset/attribution"] = _dicts(summary)
        result = tracer.trace(PROMPT, SUBJECT, kind="mlp_out", window=2, samples=3)
        cell = lens_trace_cell(tracer, result, 1, 3, top_k=3)
        out[f"{label}/lens_cell"] = _dicts(cell._asdict())
    path.write_text(json.dumps(out, sort_keys=True))
    print(f"wrote {path} ({len(out)} captures)")


def _diff(a, b, where, renamed, found):
    if isinstance(a, dict) and isinstance(b, dict):
        b = {renamed.get(k, k): v for k, v in b.items()} if renamed else b
        a = {renamed.get(k, k): v for k, v in a.items()} if renamed else a
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{where}/{k}: only in {'after' if k in b else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", renamed, found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", renamed, found)
    elif a != b:
        found.append(f"{where}: {str(a)[:60]} != {str(b)[:60]}")


def compare(before: Path, after: Path, renamed: dict[str, str]) -> int:
    """Print every difference; 0 when there is none."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    found: list[str] = []
    _diff(a, b, "", renamed, found)
    for line in found[:50]:
        print(line)
    print(f"{len(found)} differences in {len(a)} captures")
    return 1 if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("capture", "compare"))
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--renamed", action="append", default=[], help="old=new key")
    args = parser.parse_args()
    if args.command == "capture":
        capture(args.paths[0])
        return 0
    renamed = dict(item.split("=", 1) for item in args.renamed)
    return compare(args.paths[0], args.paths[1], renamed)


if __name__ == "__main__":
    sys.exit(main())
