"""Compute the traces behind ``docs/replication.md``: ROME's known facts on a built-in model.

The replication (``scripts/replicate.py`` writes the report) needs four
dataset traces of the same facts, each hours of CPU time, so this script
splits them into chunks of facts that any number of worker processes share
and that resume over several sittings:

* ``noise``: ROME's causal trace (Gaussian noise on the subject at
  ``hook_embed``, 3 sigma, 10 samples, seed 0; restore one cell; the answer's
  probability), kinds ``resid_post`` / ``mlp_out`` / ``attn_out`` with windows
  1 / W / W, W = ROME's 10 of 48 layers scaled to the model's depth.
* ``str_prob`` and ``str_nld``: the same cells with symmetric token
  replacement (each fact's subject swapped for the subject of another fact
  of the same relation with as many tokens, ``pair_counterfactuals``),
  scored by the probability and by the normalised logit difference.
* ``attr_noise`` and ``attr_str``: attribution patching of ``noise`` and
  ``str_nld`` (one forward and one backward pass per fact).
* ``noise_w10``: ``noise`` for MLP and attention with ROME's literal window
  of 10 layers, on the first ``RUN_FACTS["noise_w10"]`` (100) of the selected facts.
* ``noise_attribute``: ``noise`` scoring each fact's whole attribute
  (``answers="attribute"``) instead of the top-1 token; with ``prepare
  --fact-file lenscope/data/long_answers.json --known-by attribute`` (answers of
  several tokens; ROME's attributes are one token on large vocabularies).
* ``noise_seed1``, ``noise_seed2``: ``noise`` with noise seeds 1 and 2, and
  ``noise_fp32``: ``noise`` with the model in float32 (a worker started with
  ``--dtype float32`` does only this run, one with bfloat16 never does), each on
  the same ``SUBSET`` facts: the first ``SUBSET`` known facts in a random order
  of all 1,209 fact ids drawn with ``SUBSET_SEED``, so that two models share the
  facts both know.

``prepare`` filters the known facts once (``known.json``: the model's own
``filter_known`` over the whole set, with the counterfactual pairs); ``work``
loops over the (run, chunk) jobs in its priority order, claiming each with an
exclusive file so that workers never duplicate a chunk; each chunk is its own
``trace_dataset`` checkpoint, so a killed worker loses at most one fact::

    python scripts/replicate_runs.py prepare --dir runs/smollm2 --model smollm2-135m --facts 1209
    python scripts/replicate_runs.py work --dir runs/smollm2 --model smollm2-135m --facts 1209 \
        --threads 1 &   # one per core
    python scripts/replicate_runs.py status --dir runs/smollm2 --model smollm2-135m --facts 1209

The pages' runs: Gemma-3-270m with ``--dir runs/gemma --model gemma-3-270m --facts 300
--order random``, SmolLM2-135M-Instruct with ``--dir runs/smollm2 --model smollm2-135m
--facts 1209`` (every known fact); ``scripts/replicate.py`` reads both (``MODELS``).

A new sitting reuses the finished checkpoints; pass a new ``--sitting`` name
(claims are per sitting) so that chunks a killed worker had claimed are free.

The run folders are not committed; the pages' data is. On a new machine, resume from it
(the known facts as committed, then every committed fact of every run, bfloat16 and
float32), and ``work`` traces only what is missing::

    python scripts/replicate_runs.py prepare --dir runs/smollm2 --model smollm2-135m \
        --facts 1209 --from docs/replication/smollm2-135m
    python scripts/replicate_runs.py import --dir runs/smollm2 --model smollm2-135m \
        --facts 1209 --from docs/replication/smollm2-135m            # and --dtype float32
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

KINDS = ("resid_post", "mlp_out", "attn_out")
RUNS = (
    "noise",
    "str_prob",
    "str_nld",
    "attr_noise",
    "attr_str",
    "noise_w10",
    "noise_seed1",
    "noise_seed2",
    "noise_fp32",
    "noise_attribute",
)
SUBSET_RUNS = ("noise_seed1", "noise_seed2", "noise_fp32")
RUN_FACTS = {"noise_w10": 100}
"""Runs that trace only the first this many of the selected facts."""
RUN_DTYPE = {"noise_fp32": "float32"}
"""The dtype a run's worker loads the model in (default bfloat16)."""
SUBSET = 60
SUBSET_SEED = 2026
ROME_LAYERS = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("prepare", "work", "status", "import"))
    parser.add_argument("--dir", type=Path, default=Path("runs/replication"))
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--facts", type=int, default=300, help="known facts traced (first N)")
    parser.add_argument("--chunk", type=int, default=10, help="facts per chunk")
    parser.add_argument("--first", default="noise", help="comma list: runs to work on first")
    parser.add_argument("--only", default=None, help="comma list: work on these runs only")
    parser.add_argument("--sitting", default="0", help="claims are per sitting")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window", default="scaled", choices=("scaled", "rome"))
    parser.add_argument("--fact-file", default=None, help="prepare: facts (default ROME's known)")
    parser.add_argument(
        "--order",
        default="file",
        choices=("file", "random"),
        help="the --facts traced: the first known in file order, or in the random order of "
        "subset_order (SUBSET_SEED)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="import: a folder of committed DatasetSummary files (<run>.json.gz) to reuse; "
        "prepare: the folder whose meta.json fixes the known facts",
    )
    parser.add_argument(
        "--min-answer-tokens",
        type=int,
        default=1,
        help="prepare: keep the known facts whose attribute is at least this many tokens",
    )
    parser.add_argument("--known-by", default="first_token", choices=("first_token", "attribute"))
    parser.add_argument(
        "--start",
        type=int,
        default=0,
        help="first known fact traced (earlier ones come from a previous run's data)",
    )
    return parser.parse_args(argv)


def window_of(n_layers: int, choice: str) -> int:
    """ROME's 10 of 48 layers, literally (``rome``) or as the same share of depth."""
    return 10 if choice == "rome" else max(1, round(10 * n_layers / ROME_LAYERS))


def run_options(run: str, window: int) -> dict:
    """``trace_dataset`` keywords of one run."""
    import lenscope

    options = {
        "kinds": KINDS,
        "windows": {"resid_post": 1, "mlp_out": window, "attn_out": window},
    }
    if run == "noise_w10":  # ROME's literal window, for the two windowed kinds
        options.update(kinds=("mlp_out", "attn_out"), windows={"mlp_out": 10, "attn_out": 10})
    if run in ("str_prob", "str_nld", "attr_str"):
        options["corruption"] = lenscope.CounterfactualColumn()
        options["metric"] = "prob" if run == "str_prob" else "normalized_logit_diff"
    else:
        seed = int(run.removeprefix("noise_seed")) if run.startswith("noise_seed") else 0
        options.update(samples=10, seed=seed, noise_multiplier=3.0, metric="prob")
    if run.startswith("attr_"):
        options["method"] = "attribution"
    if run == "noise_attribute":
        options["answers"] = "attribute"
    return options


def load(args: argparse.Namespace):
    """The model (in ``--dtype``) and a tracer."""
    import lenscope

    model = lenscope.load_model(args.model, device="cpu", dtype=getattr(torch, args.dtype))
    return model, lenscope.CausalTracer(model, progress=False)


def prepare(args: argparse.Namespace) -> None:
    """Filter the known facts and pair them for STR; write ``known.json``.

    With ``--from`` (a model's ``docs/replication/<model>`` folder) the known facts are
    the committed ones (``meta.json``'s ``known_ids``) instead of a new filter: the
    filter's top-1 check runs in bfloat16, where a few facts near the threshold flip with
    the number of threads or the library versions (on 2026-12-05 a new machine kept 482
    of Gemma's facts where the committed runs kept 486, and 284 or 281 of SmolLM2's, with
    one or two threads, where they kept 278), and a resumed run must trace the facts its
    committed part was drawn from. The pairing for STR is recomputed; it depends on the
    known facts and the tokenizer only. The new filter still runs, and what it keeps is
    recorded (``refilter``) for the page."""
    from importlib.metadata import version

    from lenscope.datasets import filter_known, known_facts, load_facts, pair_counterfactuals

    model, tracer = load(args)
    facts = load_facts(args.fact_file) if args.fact_file else known_facts()
    started = time.perf_counter()
    known = filter_known(tracer, facts, by=args.known_by)
    filter_seconds, n_known = time.perf_counter() - started, len(known)
    if args.source is not None:  # the committed selection, not this filter's (see above)
        committed = json.loads((args.source / "meta.json").read_text())
        fresh = {json.dumps(f["known_id"]) for f in known}
        refilter = {  # what the filter keeps on this machine, for the page to report
            "n_known": len(known),
            "n_kept": len(fresh & {json.dumps(i) for i in committed["known_ids"]}),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": version("transformers"),
        }
        by_id = {json.dumps(f["known_id"]): f for f in facts}
        known = [dict(by_id[json.dumps(i)]) for i in committed["known_ids"]]
        filter_seconds, n_known = committed["filter_seconds"], committed["n_known"]
    if args.min_answer_tokens > 1:  # whole answers: the facts whose attribute is several tokens
        known = [f for f in known if len(f["attribute_tokens"]) >= args.min_answer_tokens]
    pairs = pair_counterfactuals(model, known, seed=0)
    counterfactual = {json.dumps(f["known_id"]): f for f in pairs.facts}
    rows = [counterfactual.get(json.dumps(f["known_id"]), f) for f in known]
    out = {
        "model": args.model,
        "dtype": args.dtype,
        "fact_file": args.fact_file,
        "known_by": args.known_by,
        "n_checked": len(facts),
        "n_known": n_known,
        "filter_seconds": filter_seconds,
        "sigma": tracer.sigma,
        "known": rows,
        "unpaired": [[s.fact_id, s.reason] for s in pairs.unpaired],
    }
    if args.source is not None:
        out["refilter"] = refilter
    if args.min_answer_tokens > 1:
        out["n_known_multi_token"] = len(known)
        out["note"] = "facts known by attribute whose attribute is several tokens"
    args.dir.mkdir(parents=True, exist_ok=True)
    partial = args.dir / "known.json.partial"  # replaced at once: workers may be reading it
    partial.write_text(json.dumps(out, indent=0))
    os.replace(partial, args.dir / "known.json")
    print(
        f"{len(known)} of {len(facts)} facts known ({filter_seconds:.0f} s); "
        f"{len(pairs.facts)} paired for STR",
        file=sys.stderr,
    )


def subset_order(n_facts: int = 1209) -> list[int]:
    """ROME's fact ids (``known_id`` 0 .. n - 1) in the random order the subset runs take."""
    import random

    order = list(range(n_facts))
    random.Random(SUBSET_SEED).shuffle(order)
    return order


def subset(known: list[dict]) -> list[dict]:
    """The ``SUBSET`` known facts first in :func:`subset_order`, in known-file order."""
    rank = {fact_id: i for i, fact_id in enumerate(subset_order())}
    chosen = sorted(known, key=lambda f: rank.get(f["known_id"], len(rank)))[:SUBSET]
    ids = {f["known_id"] for f in chosen}
    return [f for f in known if f["known_id"] in ids]


def first_known(args: argparse.Namespace, known: list[dict]) -> list[dict]:
    """The ``--facts`` known facts traced: the first in file order, or (``--order random``)
    the first in :func:`subset_order`'s random order, kept in file order."""
    if getattr(args, "order", "file") == "file":
        return known[: args.facts]
    rank = {fact_id: i for i, fact_id in enumerate(subset_order())}
    chosen = sorted(known, key=lambda f: rank.get(f["known_id"], len(rank)))[: args.facts]
    ids = {f["known_id"] for f in chosen}
    return [f for f in known if f["known_id"] in ids]


def imported_path(args: argparse.Namespace, run: str) -> Path:
    """The checkpoint of a run's facts imported from committed data (``import``)."""
    return args.dir / run / "imported.jsonl"


def imported_ids(args: argparse.Namespace, run: str) -> set[str]:
    """The fact ids (``json.dumps``) of the run's imported checkpoint."""
    from lenscope.datasets.checkpoint import Checkpoint

    path = imported_path(args, run)
    return set(Checkpoint.read(path)[1]) if path.exists() else set()


def selected(args: argparse.Namespace, run: str) -> list[dict]:
    """The first ``--facts`` known facts; for STR runs, those of them with a partner;
    for a run in ``RUN_FACTS``, its first that many.

    The subset runs take :func:`subset` of all known facts instead.
    """
    known = json.loads((args.dir / "known.json").read_text())["known"]
    if run in SUBSET_RUNS:
        return subset(known)
    known = first_known(args, known)
    if run in ("str_prob", "str_nld", "attr_str"):
        return [f for f in known if "counterfactual" in f]
    return known[: RUN_FACTS.get(run)]


def chunks(args: argparse.Namespace, run: str) -> list[list[dict]]:
    """The run's facts in chunks of ``--chunk`` (by position among all selected facts).

    Chunks wholly before ``--start`` are empty (their facts were traced before).
    """
    if run in SUBSET_RUNS:
        done = imported_ids(args, run)
        chosen = [f for f in selected(args, run) if json.dumps(f["known_id"]) not in done]
        return [chosen[i : i + args.chunk] for i in range(0, len(chosen), args.chunk)]
    known = first_known(args, json.loads((args.dir / "known.json").read_text())["known"])
    chosen = {json.dumps(f["known_id"]) for f in selected(args, run)} - imported_ids(args, run)
    out = []
    for start in range(0, len(known), args.chunk):
        part = [f for f in known[start : start + args.chunk] if json.dumps(f["known_id"]) in chosen]
        out.append(part if start + args.chunk > args.start else [])
    return out


def checkpoint_path(args: argparse.Namespace, run: str, index: int) -> Path:
    """Where chunk ``index`` of ``run`` is checkpointed."""
    return args.dir / run / f"chunk{index:03d}.jsonl"


def finished(path: Path, facts: list[dict]) -> bool:
    """Whether the checkpoint holds a record for every fact."""
    from lenscope.datasets.checkpoint import Checkpoint

    if not path.exists():
        return False
    _, records = Checkpoint.read(path)
    return all(json.dumps(f["known_id"]) in records for f in facts)


def jobs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(run, chunk) pairs in this worker's priority order."""
    first = [r for r in args.first.split(",") if r]
    runs = [r for r in first if r in RUNS] + [r for r in RUNS if r not in first]
    if args.only:
        runs = [r for r in runs if r in args.only.split(",")]
    runs = [r for r in runs if RUN_DTYPE.get(r, "bfloat16") == args.dtype]
    order = []
    for run in runs:
        n = len(chunks(args, run))
        order += [(run, i) for i in range(n)]
    return order


def claim(args: argparse.Namespace, run: str, index: int) -> bool:
    """Claim a job for this sitting (an exclusive file); False if another worker has it."""
    path = args.dir / "claims" / args.sitting / f"{run}.{index:03d}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def work(args: argparse.Namespace) -> None:
    """Trace unclaimed, unfinished chunks until none is left."""
    from lenscope.datasets import trace_dataset

    model, tracer = load(args)
    window = window_of(model.cfg.n_layers, args.window)
    for run, index in jobs(args):
        facts = chunks(args, run)[index]
        path = checkpoint_path(args, run, index)
        if not facts or finished(path, facts) or not claim(args, run, index):
            continue
        started = time.perf_counter()
        summary = trace_dataset(
            tracer, facts, checkpoint=path, progress=False, **run_options(run, window)
        )
        print(
            f"{time.strftime('%H:%M:%S')} {run} chunk {index}: {summary.n_facts} traced, "
            f"{summary.n_skipped} skipped, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def import_runs(args: argparse.Namespace) -> None:
    """Write each committed run's facts that this selection traces as the run's imported
    checkpoint, with the header ``trace_dataset`` writes for the run's settings (so the
    settings are checked, and ``work`` traces only the facts not imported).

    Only the runs computed in this call's ``--dtype`` are imported (``noise_fp32`` needs a
    call with ``--dtype float32``): a new machine resumes every run from the committed
    data with two calls. Importing a page's own folder (``docs/replication/<model>``)
    also copies its record of the facts it had reused from the earlier file-order trace
    (``meta.json``'s ``imported``) to ``reused.json``, which ``replicate.py`` reports
    instead of counting the resumed facts as reused."""
    import gzip

    from lenscope.datasets import DatasetSummary
    from lenscope.datasets.checkpoint import Checkpoint
    from lenscope.datasets.run import dataset_header, dataset_settings

    model, tracer = load(args)
    window = window_of(model.cfg.n_layers, args.window)
    page_meta = args.source / "meta.json"
    if page_meta.exists():  # a page's own folder: keep its record of what it reused
        reused = json.loads(page_meta.read_text()).get("imported", {})
        (args.dir / "reused.json").write_text(json.dumps(reused, indent=1) + "\n")
    for run in RUNS:
        source = args.source / f"{run}.json.gz"
        if not source.exists() or RUN_DTYPE.get(run, "bfloat16") != args.dtype:
            continue  # a run in another dtype is imported by a call with that --dtype
        summary = DatasetSummary.from_dict(json.loads(gzip.decompress(source.read_bytes())))
        options = run_options(run, window)
        method = {k: options.pop(k) for k in ("method",) if k in options}
        settings = dataset_settings(tracer, **options)
        header = dataset_header(tracer, settings)
        if method:
            header |= {"method": "attribution", "recheck": 0, "estimator": "atp"}
            header |= {"target": "metric"}
        wanted = {json.dumps(f["known_id"]): f for f in selected(args, run)}
        facts = [f for f in summary.facts if json.dumps(f.fact_id) in wanted]
        skipped = [s for s in summary.skipped if json.dumps(s.fact_id) in wanted]
        path = imported_path(args, run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        store = Checkpoint(path, header)
        for fact in facts:
            store.append({"id": fact.fact_id, "status": "done", "fact": fact.to_dict()})
        for skip in skipped:  # with the fact's prompt and subject, as trace_dataset writes it
            known = wanted[json.dumps(skip.fact_id)]
            record = {"id": skip.fact_id, "status": "skipped", "reason": skip.reason}
            store.append(record | {"prompt": known["prompt"], "subject": known["subject"]})
        store.close()
        print(
            f"{run}: {len(facts)} traced and {len(skipped)} skipped of {len(wanted)} facts "
            f"imported from {source}",
            file=sys.stderr,
        )


def run_checkpoints(args: argparse.Namespace, run: str) -> list[Path]:
    """Every checkpoint of the run: its chunks', whatever ``--chunk`` the workers split it
    by, and any imported one (:func:`import_runs`)."""
    paths = sorted((args.dir / run).glob("chunk*.jsonl"))
    return [*paths, imported_path(args, run)] if imported_path(args, run).exists() else paths


def merged_run(args: argparse.Namespace, run: str):
    """The run's summary over its selected facts, from its checkpoints
    (:func:`run_checkpoints`); None before any checkpoint exists."""
    from lenscope.datasets import merge_checkpoints

    paths = run_checkpoints(args, run)
    return merge_checkpoints(paths, selected(args, run)) if paths else None


def status(args: argparse.Namespace) -> None:
    """Facts done (traced or skipped) of each run's selected facts."""
    from lenscope.datasets.checkpoint import Checkpoint

    for run in RUNS:
        wanted = {json.dumps(f["known_id"]) for f in selected(args, run)}
        done = set()
        for path in run_checkpoints(args, run):
            done |= wanted & set(Checkpoint.read(path)[1])
        print(f"{run:11s} {len(done):4d} / {len(wanted)}")


def main(argv: list[str] | None = None) -> int:
    """Dispatch the command."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"prepare": prepare, "work": work, "status": status, "import": import_runs}
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
