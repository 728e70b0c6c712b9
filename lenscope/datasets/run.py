"""``trace_dataset``: trace many facts, resumably, and average them.

Each fact is traced with :meth:`lenscope.CausalTracer.trace_kinds` under one
:class:`~lenscope.settings.TraceSettings` (the answer fixed to the model's
clean top-1 token, as ROME does: Meng et al., 2022, arXiv 2202.05262), each
finished fact appended to a JSONL checkpoint
(:mod:`lenscope.datasets.checkpoint`) so that long runs resume, and the
effects averaged into a :class:`~lenscope.datasets.summary.DatasetSummary`.
"""

import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenscope import engine
from lenscope._version import __version__
from lenscope.corruptions import Corruption, CounterfactualColumn, pack_inputs
from lenscope.datasets.checkpoint import (
    DATASET_TRACE_FIXED,
    Checkpoint,
    checkpoint_header,
    settings_differences,
)
from lenscope.datasets.executors import Executor, LocalExecutor
from lenscope.datasets.facts import (
    Facts,
    SkippedFact,
    _fact_problem,
    _prepared,
    attribute_answer,
)
from lenscope.datasets.summary import DatasetSummary, FactTrace
from lenscope.experiment import prepare
from lenscope.hooks import model_name, n_layers, preserved_model, weights_description
from lenscope.metrics import PatchingMetric
from lenscope.results import TraceInterrupted
from lenscope.settings import TraceSettings
from lenscope.sites import Site
from lenscope.tokens import find_subject, prompt_tokens, token_labels
from lenscope.tracer import CausalTracer
from lenscope.validation import AnswerWarning, InvalidInput, InvalidInputType, is_int


def trace_dataset(
    tracer: CausalTracer,
    facts: Facts,
    settings: TraceSettings | None = None,
    *,
    kinds: Sequence[str | Site] | None = None,
    windows: int | Mapping[str, int] | None = None,
    samples: int | None = None,
    noise: float | None = None,
    noise_multiplier: float | None = None,
    seed: int | None = None,
    metric: str | PatchingMetric | None = None,
    corruption: Corruption | None = None,
    checkpoint: str | Path | None = None,
    max_seconds: float | int | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    executor: Executor | None = None,
    prompts_per_batch: int | None = None,
    method: str = "exact",
    recheck: int = 0,
    estimator: Any = "atp",
    target: str = "metric",
    answers: str = "top1",
) -> DatasetSummary:
    """Trace every fact and average the effects per ROME token bucket and layer.

    Each fact is traced with :meth:`CausalTracer.trace_kinds` on its
    ``prompt`` and ``subject``, the answer fixed to the model's clean top-1
    token (ROME's choice; filter with :func:`filter_known` first so that it
    is the right answer; the per-trace :class:`~lenscope.validation.AnswerWarning`
    is silenced here), the same noise seed for every fact, and only the
    positions from the subject's first token on (earlier ones belong to no
    bucket; their scores are NaN).

    Facts that cannot be traced (not a dict, missing or empty ``prompt`` /
    ``subject``, a subject absent from its prompt, a prompt too long for
    the model, a duplicate id) are skipped with a reason and counted in the
    summary, never raised halfway through a run.

    With ``checkpoint``, the JSONL file gets a header line with the settings
    (:func:`~lenscope.datasets.checkpoint.checkpoint_header`: model, layers,
    lenscope version and :meth:`TraceSettings.to_dict`), then one line per
    finished or skipped fact, flushed and fsynced as it finishes. Calling
    again with the same file resumes: facts already there are read back,
    never recomputed; a torn final line
    (an interrupted write) is dropped; a file written with other settings
    is refused. Ctrl-C raises :class:`~lenscope.TraceInterrupted` (a
    ``KeyboardInterrupt``) whose ``.results`` is the summary of the facts
    finished so far, and leaves a valid checkpoint.

    Args:
        tracer: The tracer (model, noise multiplier, strategy, batch size).
        facts: Facts with ``prompt`` and ``subject`` (ids from ``known_id`` or
            ``id``, else their index); see :func:`load_facts`.
        settings: A :class:`TraceSettings` (its answer, top-k, layers and
            positions are replaced by the dataset's: clean top-1, 1, all, from
            the subject on); the keywords below change single fields of it.
        kinds: Hook-point types to trace (default ROME's three).
        windows: Layers restored around each cell; default ROME's (1 for
            residual kinds, 10 for ``mlp_out``/``attn_out``).
        samples: Corrupted copies per fact (default 10, as in ROME).
        noise: Absolute noise std; default ``noise_multiplier * tracer.sigma``.
        noise_multiplier: Multiple of the embedding sigma; default the tracer's (3).
        seed: Seed of the noise draws, shared by all facts (as in ROME; default 0).
        metric: A metric name (default: the corruption's: ``"prob"`` for
            noise, as in ROME; ``"normalized_logit_diff"`` for counterfactuals)
            or a named callable.
        corruption: The corruption (default: the tracer's Gaussian noise);
            :class:`~lenscope.corruptions.CounterfactualColumn` traces each fact
            against its own counterfactual prompt (symmetric token
            replacement; :func:`pair_counterfactuals` builds the column). A
            fact whose counterfactual is missing or of another token length
            is skipped with the reason.
        checkpoint: JSONL file to write and resume from.
        max_seconds: Stop starting new facts after this much time; the
            facts not reached are counted in ``n_pending``.
        batch_size: Corrupted copies per forward pass; default the tracer's.
        progress: Show a progress bar over facts with an ETA; default the tracer's setting.
        executor: Where facts are traced: :class:`~lenscope.datasets.executors.LocalExecutor`
            (default: this process) or :class:`~lenscope.datasets.executors.RayExecutor`
            (Ray workers, each with its own copy of the model). This process
            alone writes the checkpoint, so a run resumes on either.
        prompts_per_batch: Facts traced together in the same forward passes
            (facts of equal token length, :func:`~lenscope.corruptions.pack_inputs`):
            the same cells of every fact in one batch, so a forward pass has
            more rows and the per-pass costs (kernel launches, Python, hook
            and cache set-up) are paid once per pack. Default (None): up to
            :data:`PROMPTS_PER_BATCH` on CUDA where the metric allows it
            (``prob`` or ``log_prob``, restoring clean activations), else 1:
            on a CPU the trace is bound by arithmetic, and packing measured
            no faster there (docs/benchmarks.md). Scores equal one-at-a-time
            traces to float rounding (batched matrix products round
            differently), not bitwise.
        method: ``"exact"`` (default: every cell restored) or ``"attribution"``
            (every cell estimated by attribution patching, one forward and one
            backward pass per fact: a fast first pass; see
            :func:`lenscope.attribution.attribute`).
        recheck: With ``method="attribution"``, trace each fact's ``recheck``
            highest cells per kind exactly (:func:`lenscope.attribution.recheck_top`).
        estimator: With ``method="attribution"``, how cells are estimated:
            ``"atp"`` (default), ``"atp:window"``, ``"relp"``, ``"atp-star"``, ``"ig:M"`` or
            ``"ig:M:layer"``
            (:func:`lenscope.attribution.estimator_from_name`); recorded in the
            checkpoint header, so a checkpoint never mixes two estimators.
        target: With ``method="attribution"``, ``"metric"`` (default),
            ``"log_prob"`` or ``"logit_diff"`` (see :func:`lenscope.attribution.attribute`).
        answers: What each fact is scored on: ``"top1"`` (default, ROME's
            choice: the model's clean top-1 next token) or ``"attribute"``
            (the fact's whole ``attribute``, with a leading space, as an
            answer of however many tokens it encodes to, scored by teacher
            forcing: ``prob`` is the whole attribute's probability; see
            the README's "Many facts"). A fact without an attribute is skipped with the
            reason. Filter with ``filter_known(..., by="attribute")`` first so
            that the model's greedy continuation is the attribute. Recorded
            in the checkpoint header, so a checkpoint never mixes the two.

    Returns:
        The :class:`DatasetSummary` of the facts in ``facts`` (in their order;
        a checkpoint may hold more).

    Raises:
        ValueError: bad settings, a checkpoint with different settings, or a
            checkpoint fact whose prompt or subject differs from the input's.
    """
    settings = dataset_settings(
        tracer,
        settings,
        kinds=kinds,
        windows=windows,
        samples=samples,
        noise=noise,
        noise_multiplier=noise_multiplier,
        seed=seed,
        metric=metric,
        corruption=corruption,
    )
    if max_seconds is not None and not (
        isinstance(max_seconds, int | float)
        and not isinstance(max_seconds, bool)
        and max_seconds > 0
    ):
        raise InvalidInput(
            f"max_seconds must be a positive number of seconds, got {max_seconds!r}; "
            "pass e.g. max_seconds=1800 for half an hour"
        )
    if executor is None:
        executor = LocalExecutor()
    elif not isinstance(executor, Executor):
        raise InvalidInputType(
            f"executor must be a lenscope Executor, got {type(executor).__name__} "
            f"{executor!r}; pass lenscope.RayExecutor(num_workers=...), or leave it out to "
            "trace in this process"
        )
    _check_method(method, recheck)
    _check_answers(answers)
    estimator, target = _check_estimator(method, estimator, target, settings)
    pack_size = _pack_size(tracer, settings, prompts_per_batch, method, answers)
    header = dataset_header(tracer, settings)
    if answers != "top1":  # top-1 checkpoints predate the key
        header = {**header, "answers": answers}
    if method != "exact":  # a checkpoint of estimates never resumes an exact run
        header = {
            **header,
            "method": method,
            "recheck": recheck,
            "estimator": estimator,
            "target": target,
        }
    if checkpoint is not None:
        _check_checkpoint_kind(checkpoint, method, answers)
    pairs = _prepared(facts)
    store = Checkpoint(checkpoint, header) if checkpoint is not None else None
    records: dict[str, dict[str, Any]] = dict(store.records) if store else {}
    seen: set[str] = set()
    todo: list[int] = []
    order_records: list[dict[str, Any] | None] = []
    for index, (fact_id, fact) in enumerate(pairs):
        key = json.dumps(fact_id)
        if key in seen:
            reason = f"duplicate id {fact_id!r} (each fact id must be unique)"
            order_records.append(_skip_record(fact_id, fact, reason))
            continue
        seen.add(key)
        old = records.get(key)
        if old is not None and _same_fact(old, fact):
            order_records.append(old)
            continue
        if old is not None and old["status"] == "done":
            raise InvalidInput(
                f"checkpoint {str(checkpoint)!r} holds fact {fact_id!r} with prompt "
                f"{old['fact']['prompt']!r} and subject {old['fact']['subject']!r}, but the "
                f"facts give {_field(fact, 'prompt')!r} and {_field(fact, 'subject')!r}; "
                "give each fact a unique id, or pass a new checkpoint path"
            )
        order_records.append(None)
        todo.append(index)

    show = tracer.progress if progress is None else progress
    started = time.perf_counter()

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - started >= max_seconds

    trace_fact = functools.partial(
        _trace_job,
        settings=settings,
        batch_size=batch_size,
        method=method,
        recheck=recheck,
        estimator=estimator,
        target=target,
        answers=answers,
    )
    bar = tqdm(
        total=len(pairs),
        initial=len(pairs) - len(todo),
        desc="trace dataset",
        unit="fact",
        disable=not show,
        dynamic_ncols=True,
    )
    try:
        with bar, executor.start(tracer, trace_fact) as workers:
            packs = _packs(tracer, settings, todo, pairs, pack_size)
            jobs = [_job(pack, pairs) for pack in packs]
            members = {pack[0]: pack for pack in packs}
            for first, answer in workers.trace(jobs, out_of_time):
                unpacked = answer["records"] if answer["status"] == "pack" else [answer]
                for index, record in zip(members[first], unpacked, strict=True):
                    if store is not None:
                        store.append(record)
                    order_records[index] = record
                    bar.update(1)
    except KeyboardInterrupt as e:
        raise _interrupted(
            e, order_records, header, settings, checkpoint, weights_description(tracer.model)
        ) from e
    finally:
        if store is not None:
            store.close()
    return dataclasses.replace(
        _summary(order_records, header, settings.corruption.to_dict(), workers.stats()),
        weights=weights_description(tracer.model),
    )


def _interrupted(
    error: KeyboardInterrupt,
    records: Sequence[Mapping[str, Any] | None],
    header: Mapping[str, Any],
    settings: TraceSettings,
    checkpoint: str | Path | None,
    weights: str | None,
) -> TraceInterrupted:
    """The :class:`TraceInterrupted` of a dataset trace: the summary of the facts finished."""
    summary = _summary(records, header, settings.corruption.to_dict())
    summary = dataclasses.replace(summary, weights=weights)
    done = len(records) - summary.n_pending
    kept = (
        ""
        if checkpoint is None
        else f" and in the checkpoint {str(checkpoint)!r} (rerun with it to resume)"
    )
    message = (
        f"interrupted after {done} of {len(records)} facts ({summary.n_pending} not traced); "
        f"the summary of the finished ones is in this exception's .results (except "
        f"lenscope.TraceInterrupted as e: summary = e.results){kept}"
    )
    return TraceInterrupted(message, summary, done, len(records))


def _summary(
    records: Sequence[Mapping[str, Any] | None],
    header: Mapping[str, Any],
    corruption: Mapping[str, Any],
    workers: tuple[Any, ...] = (),
) -> DatasetSummary:
    """The summary of checkpoint ``records`` in order (None: a fact not reached)."""
    return DatasetSummary(
        facts=tuple(FactTrace.from_dict(r["fact"]) for r in records if r and r["status"] == "done"),
        skipped=tuple(
            SkippedFact(r["id"], r["reason"]) for r in records if r and r["status"] == "skipped"
        ),
        kinds=tuple(header["kinds"]),
        windows=dict(header["windows"]),
        n_layers=header["n_layers"],
        model_name=header["model_name"],
        metric=header["metric"],
        lenscope_version=header["lenscope_version"],
        n_pending=sum(r is None for r in records),
        corruption=dict(corruption),
        workers=workers,
        answers=header.get("answers", "top1"),
        direction=header.get("direction", "denoise"),
    )


# Header keys that are not the corruption's parameters: the checkpoint's own,
# TraceSettings' fields (as TraceSettings.from_dict splits them), the method's.
_HEADER_KEYS = frozenset(
    {*checkpoint_header("", 0, "", {}), *(f.name for f in dataclasses.fields(TraceSettings))}
    | {"method", "recheck", "estimator", "target", "answers"}
)


def merge_checkpoints(
    paths: Sequence[str | Path] | str | Path, facts: Facts | None = None
) -> DatasetSummary:
    """The summary of one dataset trace split over several checkpoints.

    A long trace can run as several ``trace_dataset`` calls over parts of
    the facts (several machines, processes or sittings), each with its own
    checkpoint; this reads them back together without tracing anything.
    Every checkpoint must have been written with the same settings (model,
    lenscope version, kinds, windows, metric, corruption, method), as
    resuming requires.

    Args:
        paths: The checkpoint files (JSONL written by ``trace_dataset``); a
            list, even of one.
        facts: The facts the summary covers, in their order (as given to
            ``trace_dataset``; a fact found in no checkpoint counts in
            ``n_pending``). Default: every fact of the checkpoints, in file
            order.

    Returns:
        The :class:`DatasetSummary`, as ``trace_dataset`` over all the facts
        would return it (without worker statistics).

    Raises:
        ValueError: no paths, a missing or foreign file, checkpoints written
            with different settings, one fact id with two different prompts,
            or a fact whose prompt or subject differs from its record.
    """
    if isinstance(paths, str | Path) or not paths:
        raise InvalidInput(
            f"paths must be a non-empty list of checkpoint files, got {paths!r}; pass e.g. "
            "merge_checkpoints(['part1.jsonl', 'part2.jsonl'])"
        )
    header: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        own, found = Checkpoint.read(path)
        if header is None:
            header = own
        differences = settings_differences(header, own) + settings_differences(own, header)
        if differences:
            raise InvalidInput(
                f"checkpoint {str(path)!r} was written with other settings than "
                f"{str(paths[0])!r} ({'; '.join(sorted(set(differences)))}), so their facts "
                "cannot be averaged together; merge only the parts of one trace"
            )
        for key, record in found.items():
            old = records.get(key)
            if old is not None and not _same_fact(old, _record_fact(record)):
                raise InvalidInput(
                    f"fact {record['id']!r} is in two checkpoints with different prompts or "
                    f"subjects ({_record_fact(old)} and {_record_fact(record)}, the second in "
                    f"{str(path)!r}); give each fact a unique id"
                )
            if old is None or old["status"] != "done":
                records[key] = record
    assert header is not None
    if facts is None:
        ordered: list[dict[str, Any] | None] = list(records.values())
    else:
        ordered = []
        for fact_id, fact in _prepared(facts):
            record = records.get(json.dumps(fact_id))
            if record is not None and not _same_fact(record, fact):
                raise InvalidInput(
                    f"the checkpoints hold fact {fact_id!r} as {_record_fact(record)}, but "
                    f"the facts give {_field(fact, 'prompt')!r} / {_field(fact, 'subject')!r}; "
                    "pass the facts the checkpoints were traced from"
                )
            ordered.append(record)
    corruption = {"name": header["corruption"]}
    corruption |= {k: v for k, v in header.items() if k not in _HEADER_KEYS}
    return _summary(ordered, header, corruption)


def _record_fact(record: Mapping[str, Any]) -> dict[str, Any]:
    saved = record["fact"] if record["status"] == "done" else record
    return {"prompt": saved.get("prompt"), "subject": saved.get("subject")}


PROMPTS_PER_BATCH = 8
"""Facts of equal token length a dataset trace on CUDA runs together by default."""


def _pack_size(
    tracer: CausalTracer,
    settings: TraceSettings,
    prompts_per_batch: int | None,
    method: str,
    answers: str = "top1",
) -> int:
    """Facts per pack: checked, or the default where the settings and the device call for it."""
    packable = (
        method == "exact"
        and answers == "top1"
        and settings.direction == "denoise"
        and all(name in ("prob", "log_prob") for name in settings.metric_names)
    )
    if prompts_per_batch is None:
        on_gpu = str(tracer.model.cfg.device).startswith("cuda")
        return PROMPTS_PER_BATCH if packable and on_gpu else 1
    if not is_int(prompts_per_batch) or prompts_per_batch < 1:
        raise InvalidInput(
            f"prompts_per_batch must be an integer >= 1, got {prompts_per_batch!r}; pass e.g. "
            f"prompts_per_batch={PROMPTS_PER_BATCH}, or 1 to trace one fact at a time"
        )
    if prompts_per_batch > 1 and not packable:
        raise InvalidInput(
            f"facts are packed into one batch only in exact traces (method 'exact') of the top-1 "
            f"answer (answers 'top1') restoring clean activations (direction 'denoise') and "
            f"scoring prob or log_prob, got method {method!r}, answers {answers!r}, direction "
            f"{settings.direction!r} and metric {settings.metric_name!r}; "
            "pass prompts_per_batch=1 (or leave it out)"
        )
    return int(prompts_per_batch)


def _packs(
    tracer: CausalTracer,
    settings: TraceSettings,
    todo: Sequence[int],
    pairs: Sequence[tuple[Any, Any]],
    size: int,
) -> list[list[int]]:
    """The facts to trace, as packs of up to ``size`` facts of equal token length, input order.

    A fact whose prompt cannot be tokenised goes alone (its record says why).
    """
    if size == 1:
        return [[index] for index in todo]
    samples = settings.corruption.to_dict().get("samples", 1)
    by_length: dict[int, list[int]] = {}
    alone = []
    for index in todo:
        prompt = _field(pairs[index][1], "prompt")
        try:
            n_pos = len(prompt_tokens(tracer.model, prompt)) if isinstance(prompt, str) else None
        except (ValueError, TypeError):
            n_pos = None
        if n_pos is None:
            alone.append([index])
        else:
            by_length.setdefault(n_pos, []).append(index)
    packs = alone
    for n_pos, group in by_length.items():
        # One cell of a pack (samples rows per fact) stays within the automatic
        # batch's memory budget, so packing never raises the peak.
        fits = max(1, engine.auto_batch_size(tracer.model, n_pos, samples) // samples)
        step = min(size, fits)
        packs += [group[i : i + step] for i in range(0, len(group), step)]
    return sorted(packs, key=lambda pack: pack[0])


def _job(pack: list[int], pairs: Sequence[tuple[Any, Any]]) -> tuple[Any, ...]:
    if len(pack) == 1:
        return (pack[0], *pairs[pack[0]])
    return (pack[0], tuple(pairs[i][0] for i in pack), tuple(pairs[i][1] for i in pack))


def dataset_settings(
    tracer: CausalTracer, settings: TraceSettings | None = None, **options: Any
) -> TraceSettings:
    """The settings every fact of a dataset trace uses, checked against the model.

    Args:
        tracer: The tracer.
        settings: Base settings (default the tracer's).
        **options: Fields to change; None keeps the base's.

    Returns:
        Settings with the dataset's fixed answer, top-k, layers and positions
        (:data:`~lenscope.datasets.checkpoint.DATASET_TRACE_FIXED`), resolved
        for the tracer's model (the noise std is measured once, here).
    """
    options = {k: v for k, v in options.items() if v is not None}
    chosen = tracer.settings(settings, **options)
    other = [(w.name, w.index_axes) for w in chosen.sites if w.index_axes != ("layer", "pos")]
    if other:
        name, axes = other[0]
        raise InvalidInput(
            f"a dataset trace averages (layer, pos) grids over facts by token bucket, but kind "
            f"{name!r} gives {axes} grids; trace it one prompt at a time with "
            f"tracer.trace(prompt, subject, kind={name!r}) (or tracer.attribute)"
        )
    return tracer.settings(chosen, **DATASET_TRACE_FIXED).for_model(tracer.model)


def dataset_header(tracer: CausalTracer, settings: TraceSettings) -> dict[str, Any]:
    """The checkpoint header of a dataset trace with (resolved) ``settings``."""
    model = tracer.model
    return checkpoint_header(model_name(model), n_layers(model), __version__, settings.to_dict())


def _field(fact: Any, name: str) -> Any:
    return fact.get(name) if isinstance(fact, Mapping) else None


def _same_fact(record: Mapping[str, Any], fact: Any) -> bool:
    saved = record["fact"] if record["status"] == "done" else record
    return all(saved.get(name) == _field(fact, name) for name in ("prompt", "subject"))


def _skip_record(fact_id: int | str, fact: Any, reason: str) -> dict[str, Any]:
    prompt, subject = _field(fact, "prompt"), _field(fact, "subject")
    return {
        "id": fact_id,
        "status": "skipped",
        "reason": reason,
        "prompt": prompt if isinstance(prompt, str) else None,
        "subject": subject if isinstance(subject, str) else None,
    }


def _trace_job(
    tracer: CausalTracer,
    fact_id: Any,
    fact: Any,
    settings: TraceSettings,
    batch_size: int | None,
    method: str = "exact",
    recheck: int = 0,
    estimator: str = "atp",
    target: str = "metric",
    answers: str = "top1",
) -> dict[str, Any]:
    """One fact's record; for a pack (tuples of ids and facts) ``{"status": "pack", "records"}``."""
    if isinstance(fact_id, tuple):
        records = _trace_pack(tracer, fact_id, fact, settings, batch_size)
        return {"status": "pack", "records": records}
    return _trace_one(
        tracer, fact_id, fact, settings, batch_size, method, recheck, estimator, target, answers
    )


def _fact_input(
    tracer: CausalTracer, fact: Any, settings: TraceSettings, answers: str = "top1"
) -> tuple[Tensor, tuple[int, int], TraceSettings] | str:
    """A fact's tokens, subject range and settings (own counterfactual and answer), or why not."""
    corruption = settings.corruption
    column = corruption.column if isinstance(corruption, CounterfactualColumn) else None
    fields = ("prompt", "subject", *([column] if column else []))
    if answers == "attribute":
        fields = (*fields, "attribute")
    problem = _fact_problem(fact, fields)
    if problem is None and fact["subject"].strip() not in fact["prompt"]:
        problem = f"subject {fact['subject']!r} does not occur in the prompt {fact['prompt']!r}"
    if problem is not None:
        return problem
    try:
        tokens = prompt_tokens(tracer.model, fact["prompt"])
        subject_range = find_subject(tracer.model, tokens, fact["subject"])
    except (ValueError, TypeError) as e:
        return str(e)
    if column is not None:
        try:
            settings = dataclasses.replace(settings, corruption=corruption.for_fact(fact))
            settings.corruption.tokens(tracer.model, tokens)
        except (ValueError, TypeError) as e:
            return f"counterfactual {fact.get(column)!r}: {e}"
    if answers == "attribute":
        settings = dataclasses.replace(settings, answer=attribute_answer(fact["attribute"]))
    return tokens, subject_range, settings


def _trace_one(
    tracer: CausalTracer,
    fact_id: int | str,
    fact: Any,
    settings: TraceSettings,
    batch_size: int | None,
    method: str = "exact",
    recheck: int = 0,
    estimator: str = "atp",
    target: str = "metric",
    answers: str = "top1",
) -> dict[str, Any]:
    """Trace one fact; a checkpoint record (``done`` or ``skipped`` with the reason)."""
    prepared = _fact_input(tracer, fact, settings, answers)
    if isinstance(prepared, str):
        return _skip_record(fact_id, fact, prepared)
    tokens, subject_range, settings = prepared
    started = time.perf_counter()
    with warnings.catch_warnings():
        # The answer is the clean top-1 by design (ROME); filter_known, not a
        # warning per fact, is how a dataset keeps to facts the model knows.
        warnings.simplefilter("ignore", AnswerWarning)
        try:
            if method == "exact":
                results = tracer.trace_kinds(
                    tokens, subject_range, settings, batch_size=batch_size, progress=False
                )
            else:
                results = _attribute_one(
                    tracer, tokens, subject_range, settings, recheck, estimator, target
                )
        except InvalidInput as e:
            # Only what this fact's run reveals can fail here (a counterfactual
            # whose answer is the fact's own, an unmoved logit difference):
            # the settings were checked before the first fact.
            return _skip_record(fact_id, fact, str(e))
    first = results[settings.kinds[0]]
    trace = FactTrace(
        fact_id=fact_id,
        prompt=fact["prompt"],
        subject=fact["subject"],
        tokens=first.tokens,
        subject_range=first.subject_range,
        answer=first.answer,
        answer_id=first.answer_id,
        clean_score=first.clean_score,
        corrupted_score=first.corrupted_score,
        scores={kind: result.scores for kind, result in results.items()},
        attribute=_attribute(fact),
        seconds=float(time.perf_counter() - started),
        answer_ids=(
            tuple(first.answer_split["answer_ids"]) if first.answer_split is not None else None
        ),
        normalization=first.normalization,
    )
    return {"id": fact_id, "status": "done", "fact": trace.to_dict()}


def _attribute(fact: Mapping[str, Any]) -> str | None:
    attribute = fact.get("attribute")
    return attribute if isinstance(attribute, str) else None


def _trace_pack(
    tracer: CausalTracer,
    fact_ids: Sequence[int | str],
    facts: Sequence[Any],
    settings: TraceSettings,
    batch_size: int | None,
) -> list[dict[str, Any]]:
    """Trace facts of one token length together; one record per fact, in their order.

    Each fact is bound to its own corruption, clean run and clean top-1
    answer as :meth:`CausalTracer.trace_kinds` binds it; the bound inputs are
    packed (:func:`~lenscope.corruptions.pack_inputs`) and every kind is one
    :func:`~lenscope.engine.sweep` over the union of the facts' positions, so
    each forward pass carries the same cells of every fact. Positions before
    a fact's own subject stay NaN, as in a one-fact trace.
    """
    records: list[dict[str, Any] | None] = [None] * len(facts)
    ready = []
    for i, (fact_id, fact) in enumerate(zip(fact_ids, facts, strict=True)):
        prepared = _fact_input(tracer, fact, settings)
        if isinstance(prepared, str):
            records[i] = _skip_record(fact_id, fact, prepared)
        else:
            ready.append((i, *prepared))
    if ready:
        started = time.perf_counter()
        traces = _packed_traces(tracer, ready, settings, batch_size)
        seconds = (time.perf_counter() - started) / len(ready)
        for (i, *_), trace in zip(ready, traces, strict=True):
            fact = facts[i]
            trace = dataclasses.replace(
                trace,
                fact_id=fact_ids[i],
                prompt=fact["prompt"],
                subject=fact["subject"],
                attribute=_attribute(fact),
                seconds=seconds,
            )
            records[i] = {"id": fact_ids[i], "status": "done", "fact": trace.to_dict()}
    return [r for r in records if r is not None]


def _packed_traces(
    tracer: CausalTracer,
    ready: Sequence[tuple[int, Tensor, tuple[int, int], TraceSettings]],
    settings: TraceSettings,
    batch_size: int | None,
) -> list[FactTrace]:
    """The packed sweep of :func:`_trace_pack` (fact ids, prompts and times left blank)."""
    model, strategy = tracer.model, tracer.strategy
    preps = [prepare(model, tokens, subject, own) for _, tokens, subject, own in ready]
    names = list(preps[0].names)
    layers = list(settings.layers)
    union = sorted(set().union(*(p.positions for p in preps)))
    with (
        preserved_model(model),
        engine.matmul_friendly_weights(model),
        torch.inference_mode(),
    ):
        base = pack_inputs([p.bind() for p in preps])
        engine.check_memory(model, base, preps[0].sites, strategy)
        cleans = [p.clean_run() for p in preps]
        state = engine.corrupted_run(model, base, keep_prefix_state=strategy == "prefix")
        samples = base.samples
        corrupted_logits = [
            state.logits[k * samples : (k + 1) * samples] for k in range(len(preps))
        ]
        measures = [
            p.measure(clean.logits, logits)
            for p, clean, logits in zip(preps, cleans, corrupted_logits, strict=True)
        ]
        source = {
            name: torch.cat(
                [
                    c.activations[name][None].expand(samples, *c.activations[name].shape)
                    for c in cleans
                ]
            )
            for name in names
        }
        swept = {
            where.name: engine.sweep(
                model,
                site=where,
                window=settings.windows[where.name],
                cells=where.cells(model, layers, union),
                source=source,
                base=base,
                base_state=state,
                answer_id=torch.tensor([m.answer_id for m in measures]),
                # prob and log_prob only (_pack_size): bound alike for every fact.
                metrics=measures[0].metrics,
                top_k=1,
                strategy=strategy,
                batch_size=batch_size,
                progress=False,
            ).scores[0]
            for where in preps[0].sites
        }
        if base.prompts == 1:  # one fact of the pack left: the sweep's outputs have no prompt axis
            swept = {kind: grid[..., None] for kind, grid in swept.items()}
        traces = []
        for k, (prep, clean, measure) in enumerate(zip(preps, cleans, measures, strict=True)):
            baselines = measure.baselines(clean.logits, corrupted_logits[k], 1)
            outside = torch.ones(prep.n_pos, dtype=torch.bool)
            outside[list(prep.positions)] = False
            scores = {}
            for kind, grid in swept.items():
                grid = grid[..., k].clone()
                grid[:, outside] = float("nan")
                scores[kind] = grid
            traces.append(
                FactTrace(
                    fact_id=0,
                    prompt="",
                    subject="",
                    tokens=tuple(token_labels(model, prep.tokens)),
                    subject_range=prep.subject_range,
                    answer=token_labels(model, [measure.answer_id])[0],
                    answer_id=measure.answer_id,
                    clean_score=baselines.clean_scores[0],
                    corrupted_score=baselines.corrupted_scores[0],
                    scores=scores,
                )
            )
    return traces


METHODS = ("exact", "attribution")
"""How :func:`trace_dataset` scores the cells of each fact."""


def _check_method(method: Any, recheck: Any) -> None:
    if method not in METHODS:
        raise InvalidInput(
            f"method must be one of {METHODS}, got {method!r}; pass 'attribution' for a fast "
            "first pass (one backward per fact) or 'exact'"
        )
    if isinstance(recheck, bool) or not isinstance(recheck, int) or recheck < 0:
        raise InvalidInput(
            f"recheck must be a whole number of cells, got {recheck!r}; pass e.g. recheck=5"
        )
    if recheck and method != "attribution":
        raise InvalidInput(
            f"recheck re-traces the top cells of attribution estimates, got recheck={recheck} "
            f"with method={method!r}; pass method='attribution', or recheck=0"
        )


def _check_estimator(
    method: str, estimator: Any, target: Any, settings: TraceSettings
) -> tuple[str, str]:
    """The estimator's name and the target, checked (other than the defaults: attribution only)."""
    from lenscope.attribution import check_target, estimator_from_name

    if method != "attribution" and (estimator != "atp" or target != "metric"):
        raise InvalidInput(
            f"estimator and target choose how attribution estimates cells, got "
            f"estimator={estimator!r}, target={target!r} with method={method!r}; pass "
            "method='attribution', or leave them out"
        )
    name = estimator_from_name(estimator).name
    check_target(target, settings)
    return name, target


def _attribute_one(
    tracer: CausalTracer,
    tokens: Any,
    subject_range: tuple[int, int],
    settings: TraceSettings,
    recheck: int,
    estimator: str = "atp",
    target: str = "metric",
) -> dict[str, Any]:
    """One fact's attribution estimates (``recheck`` top cells per kind traced exactly)."""
    from lenscope.attribution import attribute, recheck_top

    results = attribute(tracer, tokens, subject_range, settings, estimator=estimator, target=target)
    if recheck:
        results = recheck_top(tracer, tokens, subject_range, results, settings, k=recheck)
    return results


ANSWERS = ("top1", "attribute")
"""What :func:`trace_dataset` scores each fact on (``answers=``)."""


def _check_answers(answers: Any) -> None:
    if answers not in ANSWERS:
        raise InvalidInput(
            f"answers must be one of {ANSWERS}, got {answers!r}; pass 'attribute' to score "
            "each fact's whole attribute, or 'top1' (ROME's choice) for the model's top-1 token"
        )


def _check_checkpoint_kind(path: str | Path, method: str, answers: str) -> None:
    """Refuse to resume from a checkpoint of another method or other answers.

    Checkpoints of exact top-1 traces carry neither a ``method`` nor an
    ``answers`` key (they predate both), so the header comparison, which asks
    for this call's keys, would not see them.
    """
    try:
        with Path(path).open() as f:
            header = json.loads(f.readline() or "null")
    except (OSError, ValueError):
        return  # a missing or unreadable file is the checkpoint's own business
    if not isinstance(header, dict):
        return
    if method == "exact" and header.get("method", "exact") != "exact":
        raise InvalidInput(
            f"checkpoint {str(path)!r} holds attribution estimates "
            f"(method={header['method']!r}), so its facts cannot be mixed with an exact run; "
            "pass method='attribution' to resume it, or a new checkpoint path"
        )
    if header.get("answers", "top1") != answers:
        raise InvalidInput(
            f"checkpoint {str(path)!r} scored answers={header.get('answers', 'top1')!r}, so its "
            f"facts cannot be mixed with a run of answers={answers!r}; pass "
            f"answers={header.get('answers', 'top1')!r} to resume it, or a new checkpoint path"
        )
