"""scripts/replicate_runs.py: reading a run back whatever its chunks, and resuming the
replication's runs on a new machine from the committed page data (slow: loads Gemma-3-270m
in bfloat16, as the runs did; traces nothing)."""

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from lenscope.datasets import DatasetSummary, trace_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import replicate_runs as rr  # noqa: E402

PAGE = ROOT / "docs" / "replication" / "gemma-3-270m"
GEMMA = ["--model", "gemma-3-270m", "--facts", "300", "--order", "random"]
DROPPED_RUN = "noise_seed1"


def committed(folder: Path, run: str) -> DatasetSummary:
    return DatasetSummary.from_dict(json.loads(gzip.decompress((folder / run).read_bytes())))


@pytest.fixture(scope="module")
def loaded():
    """Gemma-3-270m in bfloat16 and its tracer, as ``replicate_runs.load`` gives the workers."""
    return rr.load(rr.parse_args(["work", *GEMMA]))


def test_a_run_reads_back_whole_whatever_chunk_size_its_workers_used(tmp_path, tiny_model, capsys):
    """Workers split a run by ``--chunk``; the report and ``status`` must read every chunk
    checkpoint, not the chunks of the reader's own ``--chunk`` (with the default 10 they
    read the first 4 checkpoints of workers that split 10 facts by 2, and lost 6 facts)."""
    from types import SimpleNamespace

    from lenscope.datasets import merge_checkpoints
    from lenscope.tracer import CausalTracer

    facts = [
        {"known_id": i, "prompt": prompt, "subject": subject, "attribute": attribute}
        for i, (prompt, subject, attribute) in enumerate(
            [
                ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris"),
                ("Paris is the capital of", "Paris", "France"),
                ("In the city of Big Ben and", "Big Ben", "London"),
                ("The Space Needle is located in", "The Space Needle", "Seattle"),
                ("The capital of France is Paris", "Paris", "France"),
            ]
            * 2
        )
    ]
    (tmp_path / "known.json").write_text(json.dumps({"known": facts}))
    (tmp_path / "noise").mkdir()
    tracer = CausalTracer(tiny_model, progress=False)
    for index in range(5):  # what workers with --chunk 2 leave
        trace_dataset(
            tracer,
            facts[2 * index : 2 * index + 2],
            samples=2,
            checkpoint=tmp_path / "noise" / f"chunk{index:03d}.jsonl",
            progress=False,
        )
    args = SimpleNamespace(dir=tmp_path, facts=1000, chunk=10, start=0, order="file")
    merged = rr.merged_run(args, "noise")
    paths = [tmp_path / "noise" / f"chunk{i:03d}.jsonl" for i in range(5)]
    want = merge_checkpoints(paths, facts)
    assert merged.n_facts == 10 and merged.n_pending == 0
    assert [f.to_dict() for f in merged.facts] == [f.to_dict() for f in want.facts]
    rr.status(args)
    assert "noise 10 / 10" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_a_new_machine_resumes_every_run_from_the_committed_page(tmp_path, monkeypatch, loaded):
    """prepare --from keeps the committed known facts and pairs; import brings every
    committed fact and skip of every bfloat16 run, with the header a worker's checkpoint
    has (resuming on it traces nothing and gives the committed run back), leaves the
    float32 run to a float32 call, keeps the page's record of reused facts, and leaves
    exactly the facts missing from the committed data (a partial run's, and three
    dropped here) to ``work``."""
    page = tmp_path / "page"
    shutil.copytree(PAGE, page)
    data = json.loads(gzip.decompress((page / f"{DROPPED_RUN}.json.gz").read_bytes()))
    dropped = [f["fact_id"] for f in data["facts"][-3:]]  # as if these were never traced
    data["facts"] = data["facts"][:-3]
    (page / f"{DROPPED_RUN}.json.gz").write_bytes(gzip.compress(json.dumps(data).encode()))
    monkeypatch.setattr(rr, "load", lambda args: loaded)
    runs = tmp_path / "runs"
    args = rr.parse_args(["prepare", "--dir", str(runs), *GEMMA, "--from", str(page)])
    rr.prepare(args)

    meta = json.loads((PAGE / "meta.json").read_text())
    known = json.loads((runs / "known.json").read_text())
    assert [f["known_id"] for f in known["known"]] == meta["known_ids"]
    assert [f["known_id"] for f in known["known"] if "counterfactual" in f] == meta["paired_ids"]
    assert known["n_known"] == meta["n_known"] and known["sigma"] == meta["sigma"]
    again = known["refilter"]  # the filter run again here, for the page to report
    assert 0 < again["n_kept"] <= min(again["n_known"], meta["n_known"])

    rr.import_runs(args)
    assert json.loads((runs / "reused.json").read_text()) == meta["imported"]
    model, tracer = loaded
    window = rr.window_of(model.cfg.n_layers, "scaled")
    seen = set()
    for path in sorted(PAGE.glob("*.json.gz")):
        run = path.name.removesuffix(".json.gz")
        seen.add(run)
        left = [f["known_id"] for chunk in rr.chunks(args, run) for f in chunk]
        if run == "noise_fp32":  # a float32 run: imported by a call with --dtype float32
            assert not rr.imported_path(args, run).exists()
            assert len(left) == meta["planned"][run]
            continue
        want = committed(PAGE, path.name)
        done = {f.fact_id for f in want.facts} | {s.fact_id for s in want.skipped}
        if run == DROPPED_RUN:
            done -= set(dropped)
        facts = [f for f in rr.selected(args, run) if f["known_id"] in done]
        assert left == [f["known_id"] for f in rr.selected(args, run) if f not in facts], run
        resumed = trace_dataset(  # a worker resuming on the imported checkpoint
            tracer,
            facts,
            checkpoint=rr.imported_path(args, run),
            progress=False,
            **rr.run_options(run, window),
        )
        kept = [f.to_dict() for f in want.facts if f.fact_id in done]
        assert [f.to_dict() for f in resumed.facts] == kept, run
        assert resumed.skipped == want.skipped and resumed.n_pending == 0, run
        if run == DROPPED_RUN:
            assert set(dropped) <= set(left)
    assert {"noise", "str_nld", "attr_str", "noise_fp32", DROPPED_RUN} <= seen
