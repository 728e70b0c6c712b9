"""Tests of lenscope.datasets.executors: dataset traces in this process and on Ray workers.

The Ray tests start a local Ray with two CPU workers, each building the tiny
model of ``conftest.py`` from a factory (same seed, same weights), and are
skipped where Ray is not installed (``pip install "lenscope[ray]"``; the
``test`` extra installs it, so CI runs them). The reference is always the
local run of the same facts.
"""

import json
import os
import sys
import tempfile
import threading
import time

import conftest
import pytest
import torch

import lenscope
import lenscope.cli as cli
import lenscope.datasets as ds
from lenscope.tracer import CausalTracer

SAMPLES = 2
TESTS = os.path.dirname(os.path.abspath(__file__))
_PAIRS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Paris is the capital of", "Paris"),
    ("In the city of Big Ben and", "Big Ben"),
    ("The Space Needle is located in", "The Space Needle"),
    ("The capital of France is Paris", "Paris"),
    ("The Colosseum is located in the city of", "The Colosseum"),
]
# Distinct ids, each prompt twice: facts are told apart by id.
FACTS = [{"id": i, "prompt": p, "subject": s} for i, (p, s) in enumerate(_PAIRS * 2)]


def tiny_factory():
    """Builds the tiny model on a worker: the same seed gives the same weights everywhere."""
    return conftest.make_tiny_model(conftest.make_tiny_tokenizer(tempfile.mkdtemp()))


def slow_tiny_factory():
    """The tiny model, 10 ms slower per pass through its last block (~0.4 s a fact).

    Same weights, same numbers; the run lasts long enough that a worker is
    surely killed while facts remain.
    """
    model = tiny_factory()
    model.blocks[-1].register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_factory()


@pytest.fixture(scope="module")
def reference(model):
    return ds.trace_dataset(CausalTracer(model, progress=False), FACTS, samples=SAMPLES)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    # Workers unpickle tiny_factory by reference: they import this module, so they need
    # tests/ on their path (and lenscope, from this process's PYTHONPATH or install).
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    # Ray puts the driver's working directory first on its workers' path: from the
    # repository root, "conftest" would be the root conftest.py (the documentation's
    # hooks), not tests/conftest.py. Start Ray from tests/.
    cwd = os.getcwd()
    os.chdir(TESTS)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        yield ray
    finally:
        ray.shutdown()
        os.chdir(cwd)


def ray_executor(factory=tiny_factory):
    return ds.RayExecutor(num_workers=2, model_factory=factory)


def assert_same_summary(got, want):
    """Equal per-fact results and aggregates, to float tolerance."""
    assert [f.fact_id for f in got.facts] == [f.fact_id for f in want.facts]
    for a, b in zip(got.facts, want.facts, strict=True):
        assert a.answer_id == b.answer_id and a.tokens == b.tokens
        assert a.clean_score == pytest.approx(b.clean_score, rel=1e-5, abs=1e-7)
        assert a.corrupted_score == pytest.approx(b.corrupted_score, rel=1e-5, abs=1e-7)
        for kind in want.kinds:
            torch.testing.assert_close(a.scores[kind], b.scores[kind], equal_nan=True)
    assert got.ate() == pytest.approx(want.ate(), rel=1e-5)
    for kind in want.kinds:
        torch.testing.assert_close(got.aie(kind), want.aie(kind), equal_nan=True)
    assert got.settings() == want.settings()


def checkpoint_ids(path):
    lines = path.read_text().splitlines()
    return [json.loads(line)["id"] for line in lines[1:]]


# ---------------------------------------------------------------- local (no Ray)


def test_local_executor_reports_one_worker_and_round_trips(reference, tmp_path):
    assert len(reference.workers) == 1
    local = reference.workers[0]
    assert local.worker == "local" and local.n_facts == len(FACTS) and local.failure is None
    assert local.facts_per_second == pytest.approx(local.n_facts / local.seconds)
    back = ds.DatasetSummary.load(reference.save(tmp_path / "s.json"))
    assert back.workers == reference.workers
    table = reference.workers_dataframe()
    assert list(table.worker) == ["local"] and list(table.n_facts) == [len(FACTS)]


def test_a_fully_resumed_run_reports_no_worker(model, tmp_path):
    tracer = CausalTracer(model, progress=False)
    path = tmp_path / "c.jsonl"
    ds.trace_dataset(tracer, FACTS[:2], samples=SAMPLES, checkpoint=path)
    again = ds.trace_dataset(tracer, FACTS[:2], samples=SAMPLES, checkpoint=path)
    assert again.workers == () and again.n_facts == 2


def unchecked(function):
    """``function`` without the test run's runtime type checker, which refuses first."""
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def test_executor_must_be_an_executor(model):
    tracer = CausalTracer(model, progress=False)
    with pytest.raises(TypeError, match="executor must be a lenscope Executor, got str 'ray'"):
        unchecked(ds.trace_dataset)(tracer, FACTS[:1], executor="ray")


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r'RayExecutor needs Ray.*pip install "lenscope\[ray\]"'):
        ds.RayExecutor(num_workers=2)
    assert lenscope.LocalExecutor is ds.LocalExecutor  # local runs need no Ray


def test_workers_rebuild_a_load_model_model_from_its_arguments(model, monkeypatch):
    from lenscope import loading
    from lenscope.datasets.executors import worker_model_factory

    tracer = CausalTracer(model, progress=False)
    assert loading.load_arguments(model) is None  # built by a test, not by load_model
    recorded = {"name": "gemma-3-270m", "bridge": True, "dtype": torch.bfloat16}
    monkeypatch.setitem(loading._LOAD_ARGUMENTS, model, recorded)
    assert loading.load_arguments(model) == recorded
    on_cpu, on_gpu = worker_model_factory(tracer, 0), worker_model_factory(tracer, 0.5)
    assert on_cpu.func is loading.load_model and on_cpu.args == ()
    assert on_cpu.keywords == {**recorded, "device": "cpu"}
    assert on_gpu.keywords == {**recorded, "device": "cuda"}


def test_cli_worker_flags_need_workers(capsys):
    assert cli.main(["dataset", "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "--gpus-per-worker and --ray-address need --workers N" in err


# ---------------------------------------------------------------- Ray


def test_ray_executor_checks_its_arguments(ray_session, model):
    with pytest.raises(ValueError, match="num_workers must be a positive integer, got 0"):
        ds.RayExecutor(num_workers=0)
    with pytest.raises(ValueError, match="num_gpus_per_worker must be a finite number >= 0"):
        ds.RayExecutor(num_workers=1, num_gpus_per_worker=-1)
    # Under --jaxtyping-packages the annotation refuses it first, also with a TypeError.
    with pytest.raises(TypeError, match="model_factory"):
        ds.RayExecutor(num_workers=1, model_factory="gpt2")
    # The tiny model was not made by load_model: its workers could not rebuild it.
    with pytest.raises(ValueError, match=r"lenscope.load_model did not make it.*model_factory"):
        ds.trace_dataset(
            CausalTracer(model, progress=False),
            FACTS[:2],
            samples=SAMPLES,
            executor=ds.RayExecutor(num_workers=2),
        )


def test_ray_summary_equals_local(ray_session, model, reference):
    summary = ds.trace_dataset(
        CausalTracer(model, progress=False), FACTS, samples=SAMPLES, executor=ray_executor()
    )
    assert_same_summary(summary, reference)
    assert len(summary.workers) == 2
    assert all(w.worker.startswith(f"ray-{i} (") for i, w in enumerate(summary.workers))
    assert sum(w.n_facts for w in summary.workers) == len(FACTS)
    assert all(w.failure is None and w.setup_seconds > 0 for w in summary.workers)


def test_killed_worker_loses_nothing_and_repeats_nothing(ray_session, model, reference, tmp_path):
    ray = ray_session
    path = tmp_path / "ray.jsonl"
    before = set(ray.util.list_named_actors())
    killed = []

    def kill_worker_0_after_three_facts():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_text().splitlines()) > 3:
                name = next(
                    n
                    for n in ray.util.list_named_actors()
                    if n not in before and n.endswith("-worker-0")
                )
                ray.kill(ray.get_actor(name))
                killed.append(name)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_worker_0_after_three_facts)
    killer.start()
    with pytest.warns(ds.WorkerLostWarning, match=r"Ray worker ray-0 \(.*\) died"):
        summary = ds.trace_dataset(
            CausalTracer(model, progress=False),
            FACTS,
            samples=SAMPLES,
            checkpoint=path,
            executor=ray_executor(slow_tiny_factory),
        )
    killer.join()
    assert killed, "the run finished before a worker could be killed"
    ids = checkpoint_ids(path)
    assert sorted(ids) == [f["id"] for f in FACTS]  # every fact once: none lost, none twice
    assert_same_summary(summary, reference)
    dead, alive = summary.workers
    assert dead.failure is not None and alive.failure is None
    assert dead.n_facts + alive.n_facts == len(FACTS)


def test_checkpoints_resume_across_executors(ray_session, model, reference, tmp_path):
    tracer = CausalTracer(model, progress=False)
    half = len(FACTS) // 2
    # Started on Ray, finished locally.
    path = tmp_path / "ray_first.jsonl"
    ds.trace_dataset(
        tracer, FACTS[:half], samples=SAMPLES, checkpoint=path, executor=ray_executor()
    )
    local = ds.trace_dataset(tracer, FACTS, samples=SAMPLES, checkpoint=path)
    assert_same_summary(local, reference)
    assert [w.n_facts for w in local.workers] == [len(FACTS) - half]  # the rest only
    assert sorted(checkpoint_ids(path)) == [f["id"] for f in FACTS]
    # Started locally, finished on Ray.
    path = tmp_path / "local_first.jsonl"
    ds.trace_dataset(tracer, FACTS[:half], samples=SAMPLES, checkpoint=path)
    remote = ds.trace_dataset(
        tracer, FACTS, samples=SAMPLES, checkpoint=path, executor=ray_executor()
    )
    assert_same_summary(remote, reference)
    assert sum(w.n_facts for w in remote.workers) == len(FACTS) - half
    assert sorted(checkpoint_ids(path)) == [f["id"] for f in FACTS]


def test_ray_traces_a_counterfactual_column_like_local(ray_session, model):
    facts = [
        {**FACTS[0], "counterfactual": "The Space Needle is located in the city of"},
        {**FACTS[1], "counterfactual": "Rome is the capital of"},
        {**FACTS[3], "counterfactual": "The Eiffel Tower is located in"},
    ]
    options = {"kinds": ("mlp_out",), "windows": 1, "metric": "prob"}
    options["corruption"] = lenscope.CounterfactualColumn()
    tracer = CausalTracer(model, progress=False)
    local = ds.trace_dataset(tracer, facts, **options)
    remote = ds.trace_dataset(tracer, facts, **options, executor=ray_executor())
    assert local.n_facts == 3 and remote.corruption == local.corruption
    assert_same_summary(remote, local)


def test_cli_dataset_on_ray_workers(ray_session, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS[:6]))
    argv = ["dataset", "--facts", str(facts), "--no-filter", "--samples", str(SAMPLES)]
    argv += ["--kinds", "resid_post", "--quiet", "--out", str(tmp_path / "r.html")]
    argv += ["--checkpoint", str(tmp_path / "c.jsonl"), "--summary", str(tmp_path / "s.json")]
    status = cli.main(argv + ["--workers", "2"], model_factory=_cli_factory)
    assert status == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # One line per worker. On a loaded machine one worker may still be building its
    # model when the other has traced every fact: it reports no facts and no host.
    lines = [line for line in err.splitlines() if line.startswith("ray-")]
    assert [line.split()[0].rstrip(":") for line in lines] == ["ray-0", "ray-1"]
    assert "facts/s" in err
    summary = ds.DatasetSummary.load(tmp_path / "s.json")
    assert len(summary.workers) == 2 and summary.n_facts == 6
    local = ds.trace_dataset(
        CausalTracer(tiny_factory(), progress=False),
        FACTS[:6],
        samples=SAMPLES,
        kinds=("resid_post",),
    )
    assert_same_summary(summary, local)


def _cli_factory(name, *, bridge=None, device=None, dtype=None):
    """What tests give ``cli.main`` instead of ``load_model``: the tiny model, whatever the name."""
    return tiny_factory()
