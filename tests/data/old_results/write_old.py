"""Wrote the result files in this folder, with lenscope at commit 1aa87ff (before named axes).

Kept to show how the old-format files were made; it only runs at that commit
(``python tests/data/old_results/write_old.py`` from the repository root).
"""

import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, "tests")
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model, make_tiny_tokenizer

import lenscope
from lenscope.lens import lens_trace_cell

torch.set_num_threads(1)
warnings.simplefilter("ignore")
out = Path("tests/data/old_results")
out.mkdir(exist_ok=True)
tok = make_tiny_tokenizer(tempfile.mkdtemp())
model = make_tiny_model(tok, gated=True, n_layers=2)
tracer = lenscope.CausalTracer(model, progress=False)
common = dict(samples=2, seed=1, top_k=2)
tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", **common).save(out / "trace.json")
tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="v", by="head", **common).save(out / "head_trace.json")
tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="z", by="head_pos", positions=[-2, -1], **common).save(
    out / "head_pos_trace.json"
)
tracer.patch(
    TINY_PROMPT,
    "The Big Ben is located in the city of",
    kind="resid_pre",
    top_k=2,
    answer=" paris",
    foil=" london",
).save(out / "str_trace.json")
tracer.attribute(TINY_PROMPT, TINY_SUBJECT, kinds=("mlp_out",), samples=2, seed=1)["mlp_out"].save(
    out / "attribution.json"
)
facts = [{"prompt": TINY_PROMPT, "subject": TINY_SUBJECT, "attribute": " paris"}]
lenscope.trace_dataset(tracer, facts, kinds=("mlp_out",), samples=2, seed=1, progress=False).save(
    out / "dataset.json"
)
print(sorted(p.name for p in out.iterdir()))
r = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", **common)
cell = lens_trace_cell(tracer, r, 1, 3, top_k=2)
cell.corrupted.save(out / "lens_corrupted.json")
cell.clean.save(out / "lens_clean.json")
print(sorted(p.name for p in out.iterdir()))
