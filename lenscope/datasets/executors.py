"""Where a dataset trace's facts are traced: in this process, or on Ray workers.

:func:`~lenscope.datasets.run.trace_dataset` decides what is traced (the
settings, the facts not yet in the checkpoint) and writes every record; an
executor only computes the records. It is handed a picklable function that
traces one fact with a tracer, and yields each finished record as it comes
back, in any order. The driver alone writes the one checkpoint, so a run
started on Ray resumes locally and the other way round.

* :class:`LocalExecutor` (the default) traces in this process, in input order.
* :class:`RayExecutor` starts ``num_workers`` Ray actors. Each builds its own
  copy of the model once, from the arguments :func:`lenscope.load_model` was
  given on the driver or from a picklable factory, and a tracer with the
  driver's options; the driver's weights are never shipped. Facts wait in a
  queue on the driver and go out one at a time to whichever worker is free.
  A worker that dies (killed, out of memory, its node lost) leaves the pool:
  its unfinished fact goes back to the front of the queue for another worker,
  the failure is warned (:class:`WorkerLostWarning`) and kept in the
  summary's :attr:`~lenscope.datasets.summary.DatasetSummary.workers`.

The queue is a dozen lines over ``ray.wait`` rather than ``ray.util.ActorPool``
or Ray Data (``docs/scaling.md`` argues the choice): ``ActorPool`` does not say
which value a dead actor was holding, and Ray Data's unit of work and retry is
a block of rows, while a checkpoint wants each fact written as it finishes and
exactly one retry of exactly the lost fact.
"""

import abc
import functools
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from lenscope.datasets.summary import WorkerStats
from lenscope.hooks import model_name, n_layers
from lenscope.tracer import CausalTracer
from lenscope.validation import (
    InvalidInput,
    InvalidInputType,
    finite_number,
    positive_int,
    warn,
)

Job = tuple[int, Any, Any]
"""One fact to trace: its index in the input, its id and the fact itself."""

TraceFact = Callable[[CausalTracer, Any, Any], dict[str, Any]]
"""Traces one fact ``(tracer, fact_id, fact)`` into its checkpoint record (picklable)."""

RAY_INSTALL_HINT = 'pip install "lenscope[ray]"'


class WorkerLostWarning(UserWarning):
    """A Ray worker died during a dataset trace; its unfinished fact went to another worker."""


class WorkerSetupError(OSError):
    """A Ray worker could not build its model or tracer: the worker's environment is at fault.

    Raised at once rather than retried, since every worker would fail the same way.
    """


def record_count(record: dict[str, Any]) -> int:
    """Facts in a worker's answer: one record, or a pack of facts traced together."""
    return len(record["records"]) if record.get("status") == "pack" else 1


class WorkerPool(abc.ABC):
    """The workers of one :func:`trace_dataset` call; a context manager that releases them."""

    @abc.abstractmethod
    def trace(self, jobs: Sequence[Job], out_of_time: Callable[[], bool]) -> Iterator[Any]:
        """Yield ``(index, record)`` for the jobs, in any order.

        No job is started once ``out_of_time()`` is true; jobs already running finish.
        """

    @abc.abstractmethod
    def stats(self) -> tuple[WorkerStats, ...]:
        """Each worker's facts, time and failure so far."""

    def close(self) -> None:
        """Release the workers."""

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Executor(abc.ABC):
    """Computes the records of a dataset trace; :func:`trace_dataset` writes them."""

    @abc.abstractmethod
    def start(self, tracer: CausalTracer, trace_fact: TraceFact) -> WorkerPool:
        """Workers that trace facts with ``trace_fact`` and ``tracer``'s model and options."""


class LocalExecutor(Executor):
    """Trace every fact in this process, in input order, with the caller's tracer (the default)."""

    def start(self, tracer: CausalTracer, trace_fact: TraceFact) -> WorkerPool:
        """One worker: this process."""
        return _LocalPool(tracer, trace_fact)

    def __repr__(self) -> str:
        return "LocalExecutor()"


class _LocalPool(WorkerPool):
    def __init__(self, tracer: CausalTracer, trace_fact: TraceFact) -> None:
        self._tracer = tracer
        self._trace_fact = trace_fact
        self._started = time.perf_counter()
        self._finished = self._started
        self._n_facts = 0

    def trace(self, jobs: Sequence[Job], out_of_time: Callable[[], bool]) -> Iterator[Any]:
        for index, fact_id, fact in jobs:
            if out_of_time():
                return
            record = self._trace_fact(self._tracer, fact_id, fact)
            self._n_facts += record_count(record)
            self._finished = time.perf_counter()
            yield index, record

    def stats(self) -> tuple[WorkerStats, ...]:
        if not self._n_facts:
            return ()
        return (WorkerStats("local", self._n_facts, self._finished - self._started),)


class RayExecutor(Executor):
    """Trace facts on Ray workers, each with its own copy of the model.

    Example:
        >>> summary = lenscope.trace_dataset(  # doctest: +SKIP
        ...     tracer, facts, checkpoint="gpt2xl.jsonl",
        ...     executor=lenscope.RayExecutor(num_workers=8, num_gpus_per_worker=1))

    The driver's tracer fixes the settings (the noise std is measured once, on
    the driver) and its options (strategy, batch size); with the same facts
    the summary equals a local run's to float rounding. Needs the ``ray``
    extra: ``pip install "lenscope[ray]"``.

    Args:
        num_workers: Ray actors to start; each loads the model once.
        num_gpus_per_worker: GPUs Ray reserves for each worker (fractions share
            a GPU). With any, a worker loads its model on ``"cuda"`` (the GPUs
            Ray gave it), without, on ``"cpu"``.
        num_cpus_per_worker: CPUs Ray reserves for each worker; Ray also sets
            ``OMP_NUM_THREADS`` of the worker to it, so torch uses that many threads.
        address: The Ray cluster: ``None`` uses the Ray this process is
            already connected to (``ray.init`` with your own options, e.g. a
            ``runtime_env``), else starts a local one on this machine;
            ``"auto"`` joins the cluster started with ``ray start --head`` on
            this machine; ``"ray://HOST:10001"`` connects through Ray Client.
        model_factory: A picklable function of no arguments that returns the
            model, called once on each worker. Needed when the tracer's model
            was not made by :func:`lenscope.load_model` in this process; by
            default each worker calls ``load_model`` with the driver's name,
            ``bridge`` and ``dtype``.

    Raises:
        ImportError: Ray is not installed (the message names the extra).
        ValueError: a count is not positive.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        num_gpus_per_worker: float | int = 0,
        num_cpus_per_worker: float | int = 1,
        address: str | None = None,
        model_factory: Callable[[], torch.nn.Module] | None = None,
    ) -> None:
        import_ray()
        self.num_workers = positive_int(
            "num_workers", num_workers, "pass the number of Ray workers, e.g. num_workers=8"
        )
        self.num_gpus_per_worker = finite_number(
            "num_gpus_per_worker",
            num_gpus_per_worker,
            "pass e.g. num_gpus_per_worker=1 (0 for CPU workers)",
            minimum=0,
        )
        self.num_cpus_per_worker = finite_number(
            "num_cpus_per_worker", num_cpus_per_worker, "pass e.g. num_cpus_per_worker=1", minimum=0
        )
        if address is not None and not isinstance(address, str):
            raise InvalidInputType(
                f"address must be a str or None, got {type(address).__name__} {address!r}; "
                "pass address='auto' for the cluster on this machine, 'ray://HOST:10001' for "
                "a remote one, or None for a local Ray"
            )
        if model_factory is not None and not callable(model_factory):
            raise InvalidInputType(
                f"model_factory must be a function of no arguments that returns the model, got "
                f"{type(model_factory).__name__}; pass e.g. "
                "functools.partial(lenscope.load_model, 'gpt2-xl')"
            )
        self.address = address
        self.model_factory = model_factory

    def start(self, tracer: CausalTracer, trace_fact: TraceFact) -> WorkerPool:
        """The Ray workers (started when the first jobs come, so a finished run starts none)."""
        return _RayPool(self, tracer, trace_fact)

    def __repr__(self) -> str:
        return (
            f"RayExecutor(num_workers={self.num_workers}, "
            f"num_gpus_per_worker={self.num_gpus_per_worker:g}, address={self.address!r})"
        )


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            f"RayExecutor needs Ray, which is not installed: {RAY_INSTALL_HINT} (or pip install "
            "ray); leave out the executor (--workers on the command line) to trace in this "
            "process"
        ) from e
    return ray


def worker_model_factory(
    tracer: CausalTracer, num_gpus_per_worker: float | int
) -> Callable[[], torch.nn.Module]:
    """How a worker builds the tracer's model: ``load_model`` with the driver's arguments.

    Raises:
        ValueError: the model was not made by :func:`lenscope.load_model` in this process.
    """
    from lenscope.loading import load_arguments, load_model

    arguments = load_arguments(tracer.model)
    if arguments is None:
        raise InvalidInput(
            f"RayExecutor workers cannot rebuild this {type(tracer.model).__name__} "
            f"({model_name(tracer.model)!r}): lenscope.load_model did not make it in this "
            "process, so its name is unknown; pass RayExecutor(model_factory=...) a picklable "
            "function of no arguments that builds the same model on a worker"
        )
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    return functools.partial(load_model, **arguments, device=device)


class _Worker:
    """A Ray actor's state: its own model and a tracer with the driver's options."""

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        tracer_options: dict[str, Any],
        trace_fact: TraceFact,
    ) -> None:
        started = time.perf_counter()
        model = model_factory()
        self._tracer = CausalTracer(model, **tracer_options)
        self._trace_fact = trace_fact
        self._ready = {
            "name": f"{socket.gethostname()}, pid {os.getpid()}",
            "setup_seconds": time.perf_counter() - started,
            "model_name": model_name(model),
            "n_layers": n_layers(model),
        }

    def ready(self) -> dict[str, Any]:
        return self._ready

    def trace(self, fact_id: Any, fact: Any) -> dict[str, Any]:
        return self._trace_fact(self._tracer, fact_id, fact)


class _WorkerLedger:
    """What the driver knows of one Ray worker."""

    def __init__(self, index: int, actor: Any) -> None:
        self.index = index
        self.actor = actor
        self.name = f"ray-{index}"
        self.ready_at: float | None = None
        self.last_at: float | None = None
        self.setup_seconds = 0.0
        self.n_facts = 0
        self.failure: str | None = None

    def stats(self) -> WorkerStats:
        seconds = (self.last_at or self.ready_at or 0.0) - (self.ready_at or 0.0)
        return WorkerStats(self.name, self.n_facts, seconds, self.setup_seconds, self.failure)


class _RayPool(WorkerPool):
    def __init__(self, executor: RayExecutor, tracer: CausalTracer, trace_fact: TraceFact) -> None:
        self._executor = executor
        self._tracer = tracer
        self._trace_fact = trace_fact
        self._workers: list[_WorkerLedger] = []

    def _start_workers(self) -> Any:
        ray = import_ray()
        executor, tracer = self._executor, self._tracer
        factory = executor.model_factory or worker_model_factory(
            tracer, executor.num_gpus_per_worker
        )
        if not ray.is_initialized():
            ray.init(address=executor.address, log_to_driver=True)
        actor_class = ray.remote(
            num_cpus=executor.num_cpus_per_worker,
            num_gpus=executor.num_gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
        )(_Worker)
        options = {
            "noise_multiplier": tracer.noise_multiplier,
            "reference_subjects": tracer.reference_subjects,
            "batch_size": tracer.batch_size,
            "strategy": tracer.strategy,
            "progress": False,
        }
        run = uuid.uuid4().hex[:8]  # names let an operator (or a test) find this run's actors
        for index in range(executor.num_workers):
            actor = actor_class.options(name=f"lenscope-{run}-worker-{index}").remote(
                factory, options, self._trace_fact
            )
            self._workers.append(_WorkerLedger(index, actor))
        return ray

    def trace(self, jobs: Sequence[Job], out_of_time: Callable[[], bool]) -> Iterator[Any]:
        if not jobs or out_of_time():
            return
        ray = self._start_workers()
        died = _death_errors(ray)
        queue: deque[Job] = deque(jobs)
        waiting: dict[Any, tuple[_WorkerLedger, Job | None]] = {
            worker.actor.ready.remote(): (worker, None) for worker in self._workers
        }
        idle: list[_WorkerLedger] = []
        while True:
            while idle and queue and not out_of_time():
                worker, job = idle.pop(0), queue.popleft()
                waiting[worker.actor.trace.remote(job[1], job[2])] = (worker, job)
            busy = [ref for ref, (_, job) in waiting.items() if job is not None]
            if not busy and (not queue or out_of_time()):
                return  # jobs left behind by the time budget are counted as pending
            if not waiting:
                raise RuntimeError(
                    f"all {len(self._workers)} Ray workers died with {len(queue)} facts left "
                    f"(the checkpoint keeps every finished fact; rerun to resume): "
                    + "; ".join(f"{w.name}: {w.failure}" for w in self._workers)
                )
            [ref], _ = ray.wait(list(waiting), num_returns=1)
            worker, job = waiting.pop(ref)
            try:
                value = ray.get(ref)
            except died as e:
                if getattr(e, "actor_init_failed", False):
                    raise WorkerSetupError(
                        f"Ray worker {worker.index} could not build its model "
                        f"({_failure_text(e)}); each worker needs the driver's lenscope, its "
                        "TransformerLens and the model's weights (README: Scaling out)"
                    ) from e
                ray.kill(worker.actor)  # an unreachable actor must not come back half-way
                self._lost(worker, job, e, queue)
                continue
            now = time.perf_counter()
            if job is None:
                self._check_model(worker, value)
                worker.name = f"ray-{worker.index} ({value['name']})"
                worker.setup_seconds = float(value["setup_seconds"])
                worker.ready_at = worker.last_at = now
            else:
                worker.n_facts += record_count(value)
                worker.last_at = now
                yield job[0], value
            idle.append(worker)

    def _check_model(self, worker: _WorkerLedger, ready: dict[str, Any]) -> None:
        want = (model_name(self._tracer.model), n_layers(self._tracer.model))
        got = (ready["model_name"], ready["n_layers"])
        if got != want:
            raise InvalidInput(
                f"Ray worker {worker.index} built model {got[0]!r} with {got[1]} layers, but the "
                f"tracer's is {want[0]!r} with {want[1]} layers; pass "
                "RayExecutor(model_factory=...) a function that builds the tracer's model"
            )

    def _lost(
        self,
        worker: _WorkerLedger,
        job: Job | None,
        error: BaseException,
        queue: "deque[Job]",
    ) -> None:
        """Take a dead worker out of the pool and put its unfinished fact back in the queue."""
        worker.failure = _failure_text(error)
        worker.last_at = time.perf_counter()
        if job is not None:
            queue.appendleft(job)
        left = sum(w.failure is None for w in self._workers)
        retried = "" if job is None else f"; fact {job[1]!r} goes back to the queue"
        warn(
            f"Ray worker {worker.name} died ({worker.failure}){retried}; {left} workers left",
            WorkerLostWarning,
        )

    def stats(self) -> tuple[WorkerStats, ...]:
        return tuple(worker.stats() for worker in self._workers)

    def close(self) -> None:
        if not self._workers:
            return
        ray = import_ray()
        for worker in self._workers:
            try:
                ray.kill(worker.actor)
            except Exception:  # already gone, or Ray itself shut down
                pass


def _death_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's errors that mean the worker process (not the traced fact) failed."""
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure_text(error: BaseException, limit: int = 160) -> str:
    """The gist of a Ray error: its first line, and its last one (which names the cause)."""
    text = _ANSI.sub("", str(error))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first, last = (_shortened(line, limit) for line in (lines[0], lines[-1]))
    return first if len(lines) == 1 else f"{first} ... {last}"


def _shortened(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit // 2 - 2] + " ... " + line[-limit // 2 :]


def workers_line(workers: Sequence[WorkerStats]) -> str:
    """One line per worker: facts, facts per second, setup time, failure."""
    out = []
    for w in workers:
        rate = w.facts_per_second
        shown = f"{rate:.3g} facts/s" if not math.isnan(rate) else "no facts"
        failure = f", failed: {w.failure}" if w.failure else ""
        built = f"model built in {w.setup_seconds:.1f} s"
        out.append(f"{w.worker}: {w.n_facts} facts, {shown}, {built}{failure}")
    return "\n".join(out)
