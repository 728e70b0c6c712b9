"""An explorer in the notebook: type a prompt, mark the subject, watch the trace fill in.

:func:`explore` returns an :class:`Explorer`, an anywidget
(https://anywidget.dev: JupyterLab, Notebook 7, VS Code, Colab) whose
traitlets are the settings of a causal trace (Meng et al., 2022, arXiv
2202.05262): the prompt, the subject's token range, the answer, the kinds,
the window, the corruption (ROME's Gaussian noise, or a counterfactual prompt:
symmetric token replacement, Zhang & Nanda, 2023, arXiv 2309.16042), the
direction and the metric. A run traces in a worker thread, one kind after the
other with :meth:`~lenscope.tracer.CausalTracer.trace_kinds` and the same
settings (the noise is seeded, so each kind is the one a single
``trace_kinds`` call of every kind gives), so the kernel stays responsive and
each kind's heatmap reaches the front end as soon as it is finished. Before
that, every kind's attribution estimate is shown (one forward and one
backward pass), and each kind's exact cells stream in over it as the sweep's
batches finish. Progress and those cells come from the engine's own
:class:`~lenscope.progress.TraceMeter` (:func:`lenscope.progress.watching`),
which is also where a cancel stops the sweep: the trace then leaves the model
as it was (hooks, parameters, grad flags, modes), and the kinds already
finished are kept. Clicking a cell shows
the restored run's top-k (the trace's own) and the cell through the lens
(:func:`~lenscope.lens.lens_trace_cell`), and for an attention cell, on demand,
each head restored alone (:meth:`Explorer.heads`). Every finished run is kept in
:attr:`Explorer.results` as an :class:`ExplorerRun`; :meth:`Explorer.compare`
draws two of them side by side or as a difference
(:func:`lenscope.plotting.plot_traces`).

The front end (``explorer.js``) draws the heatmaps itself, as a grid of
elements (no plotly.js in the notebook: the widget stays small, works
offline, and every cell can be read from the page); the exports of the
current view (HTML, PNG: :meth:`Explorer.export`) and of the runs (JSON) use
lenscope's plotly figures and result records.
"""

import dataclasses
import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lenscope.corruptions import CounterfactualPrompt
from lenscope.hooks import decode_resid, preserved_model, run_to_final_resid
from lenscope.lens import lens_trace_cell
from lenscope.metrics import softmax
from lenscope.names import DEFAULT_KINDS
from lenscope.progress import TraceMeter, watching
from lenscope.results import TraceResult, check_record, read_json, write_json
from lenscope.tokens import (
    answer_tokens,
    find_subject,
    guess_subject,
    prompt_tokens,
    token_labels,
)
from lenscope.tracer import CausalTracer, _check_answer
from lenscope.validation import AnswerWarning, InvalidInput, InvalidInputType

__all__ = [
    "EXPLORE_INSTALL_HINT",
    "ExplorerRun",
    "TraceCancelled",
    "explore",
    "heatmap_data",
    "load_runs",
]

EXPLORE_INSTALL_HINT = 'pip install "lenscope[explore]"'

CORRUPTION_CHOICES = ("noise", "counterfactual")
"""What the explorer's ``corruption`` trait may say: ROME's noise, or a counterfactual prompt."""

_FORMAT = "lenscope.ExplorerRun/1"

_EXPORT_SUFFIXES = (".html", ".png", ".svg", ".pdf")
"""What :meth:`Explorer.export` writes: a page, or an image through kaleido."""

_KIND_COLOURS = {"resid": "#6a3d9a", "mlp": "#1b7837", "attn": "#b2182b"}
"""ROME's colours: purple for the residual stream, green for MLPs, red for attention."""


class TraceCancelled(Exception):
    """Raised inside a trace (from its meter) to stop it when the explorer's Cancel is pressed."""


@dataclasses.dataclass(frozen=True)
class ExplorerRun:
    """One run of the explorer: its settings and the kinds it finished.

    Attributes:
        settings: The explorer's traits the run was started with (prompt,
            subject, answer, kinds, window, corruption, noise_multiplier,
            samples, counterfactual, direction, metric).
        results: ``{kind: TraceResult}`` of the kinds that finished, in the
            order they were traced; each holds the full record of what
            reproduces it.
        complete: False when the run was cancelled before every kind finished.
        seconds: Wall time of the run.
    """

    settings: dict[str, Any]
    results: dict[str, TraceResult]
    complete: bool = True
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (``format`` ``lenscope.ExplorerRun/1``)."""
        return {
            "format": _FORMAT,
            "settings": dict(self.settings),
            "results": {kind: result.to_dict() for kind, result in self.results.items()},
            "complete": self.complete,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ExplorerRun":
        """Read back :meth:`to_dict`'s record."""
        check_record(data, _FORMAT, "ExplorerRun.to_dict", ("settings", "results"))
        return cls(
            settings=dict(data["settings"]),
            results={k: TraceResult.from_dict(v) for k, v in data["results"].items()},
            complete=bool(data.get("complete", True)),
            seconds=float(data.get("seconds", 0.0)),
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "ExplorerRun":
        """Read a file written by :meth:`save`."""
        return cls.from_dict(read_json(path, "an explorer run"))

    def plot(self, **kwargs: Any) -> Any:
        """The kinds side by side (:func:`lenscope.plotting.plot_traces`)."""
        from lenscope.plotting import plot_traces

        return plot_traces(self.results, **kwargs)


def explore(model_or_tracer: Any, **traits: Any) -> Any:
    """An :class:`Explorer` widget on a model or a :class:`~lenscope.tracer.CausalTracer`.

    Example:
        >>> explorer = lenscope.explore(model, prompt="The Eiffel Tower is in")  # doctest: +SKIP
        >>> explorer  # doctest: +SKIP

    Args:
        model_or_tracer: A TransformerLens model, or a tracer (its noise
            multiplier, reference subjects, batch size and strategy are used).
        **traits: Initial values of the widget's traits (``prompt``,
            ``subject``, ``answer``, ``kinds``, ``window``, ``corruption``,
            ``noise_multiplier``, ``samples``, ``counterfactual``,
            ``direction``, ``metric``).

    Returns:
        The widget; display it as the last expression of a cell.

    Raises:
        ImportError: anywidget is not installed (``pip install "lenscope[explore]"``).
    """
    return explorer_class()(model_or_tracer, **traits)


_CLASS: list[type] = []


def explorer_class() -> type:
    """The :class:`Explorer` class (defined on first use, when anywidget is imported)."""
    if not _CLASS:
        _CLASS.append(_define_explorer())
    return _CLASS[0]


def __getattr__(name: str) -> Any:
    if name == "Explorer":
        return explorer_class()
    raise AttributeError(f"module 'lenscope.explorer' has no attribute {name!r}")


def _import_anywidget() -> Any:
    try:
        import anywidget
    except ImportError as e:
        raise ImportError(
            f"lenscope.explore() needs anywidget, which is not installed: {EXPLORE_INSTALL_HINT} "
            "(or pip install anywidget); the rest of lenscope works without it"
        ) from e
    return anywidget


def kind_colour(kind: str) -> str:
    """The heatmap colour of a kind: ROME's purple, green or red, else grey-blue."""
    for prefix, colour in _KIND_COLOURS.items():
        if kind.startswith(prefix):
            return colour
    return "#2c5d8a"


def heatmap_data(result: TraceResult, *, title: str, scores: torch.Tensor | None = None) -> dict:
    """What the front end draws of one result: the grid, its labels and its colour range.

    Args:
        result: The trace (a 2-D grid: ``("layer", "pos")`` or ``("layer", unit)``).
        title: The panel's title.
        scores: Values to draw instead of ``result.scores`` (a difference).
    """
    values = result.scores if scores is None else scores
    grid = values.float()
    if grid.ndim != 2:
        grid = grid.flatten(1)
    finite = grid[torch.isfinite(grid)]
    low = float(finite.min()) if finite.numel() else 0.0
    high = float(finite.max()) if finite.numel() else 1.0
    diverging = scores is not None
    if diverging:
        high = max(abs(low), abs(high)) or 1.0
        low = -high
    axis = result.axes[1] if len(result.axes) > 1 else "unit"
    columns = (
        list(result.tokens) if axis == "pos" else [f"{axis} {i}" for i in range(grid.shape[1])]
    )
    return {
        "kind": result.kind,
        "title": title,
        "axis": axis,
        "columns": columns,
        "subject": list(result.subject_range) if axis == "pos" else None,
        "scores": [[_json_float(v) for v in row] for row in grid.tolist()],
        "zmin": low,
        "zmax": high,
        "diverging": diverging,
        "colour": kind_colour(result.kind),
        "metric": result.metric,
        "answer": result.answer,
        "clean": _json_float(result.clean_score),
        "corrupted": _json_float(result.corrupted_score),
        "window": result.window,
    }


def partial_heatmap(
    kind: str,
    scores: torch.Tensor,
    *,
    index: int,
    tokens: list[str],
    subject: Any = None,
    estimate: list[list[float | None]] | None = None,
    like: Mapping[str, Any] | None = None,
) -> dict | None:
    """What the front end draws of a kind while its sweep streams: exact cells so far.

    Args:
        kind: The kind being swept.
        scores: The grid so far (``[layer, unit]``, NaN: not yet traced), on
            the result's scale (:attr:`TraceMeter.cells`).
        index: The run's index.
        tokens: The prompt's token labels (the columns when there is no
            earlier map of the kind).
        subject: The subject's ``[start, end)``.
        estimate: The kind's attribution estimate (drawn, faded, in the cells
            still to come).
        like: The kind's earlier map (its estimate or a partial one): its
            columns and labels are kept.

    Returns:
        The map (``partial`` True), or None for a grid that is not
        ``(layer, unit)`` with a known column for each unit.
    """
    if scores.ndim != 2:
        return None
    if like is not None:
        columns, axis, subject = like["columns"], like["axis"], like["subject"]
    elif scores.shape[1] == len(tokens):
        columns, axis = list(tokens), "pos"
    else:
        return None
    if len(columns) != scores.shape[1]:
        return None
    grid = scores.float()
    done = torch.isfinite(grid)
    seen = grid[done].tolist()
    if estimate is not None:
        seen += [v for row in estimate for v in row if v is not None]
    low, high = (min(seen), max(seen)) if seen else (0.0, 1.0)
    n_done, n_cells = int(done.sum()), grid.numel()
    return {
        "kind": kind,
        "title": f"{kind} (exact: {n_done} of {n_cells} cells"
        + (", the rest estimated)" if estimate is not None else ")"),
        "axis": axis,
        "columns": columns,
        "subject": None if subject is None or axis != "pos" else list(subject),
        "scores": [[_json_float(v) for v in row] for row in grid.tolist()],
        "estimate_scores": estimate,
        "zmin": low,
        "zmax": high,
        "diverging": False,
        "colour": kind_colour(kind),
        "run": index,
        "partial": True,
        "done": n_done,
        "cells": n_cells,
    }


def shared_vocab(results: Mapping[str, TraceResult]) -> dict[str, TraceResult]:
    """The results with one ``vocab``: the text of every token id any of them shows.

    A joint :meth:`~lenscope.tracer.CausalTracer.trace_kinds` gives every
    kind the vocabulary of all of them (sorted ids); kinds traced one at a
    time each know only their own, so the explorer merges them.
    """
    union: dict[int, str] = {}
    for result in results.values():
        union.update(result.vocab)
    vocab = {i: union[i] for i in sorted(union)}
    return {kind: dataclasses.replace(result, vocab=vocab) for kind, result in results.items()}


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _define_explorer() -> type:
    anywidget = _import_anywidget()
    import traitlets

    here = Path(__file__).parent

    class Explorer(anywidget.AnyWidget):
        """The explorer widget; build it with :func:`lenscope.explore`.

        Traits set by the front end or by code: ``prompt``, ``subject``
        (``[start, end]`` token positions, end exclusive; lenscope's guess
        until set), ``answer`` (``""``: the clean top-1), ``kinds``,
        ``window`` (None: ROME's per kind), ``corruption`` (``"noise"`` or
        ``"counterfactual"``), ``noise_multiplier``, ``samples``,
        ``counterfactual`` (the counterfactual prompt), ``direction``,
        ``metric`` (``""``: the corruption's default), ``preview`` (first show
        every kind's attribution estimate, one backward pass; then stream each
        kind's exact cells over it as the sweep's batches finish, and show the
        kind's result when its sweep is done) and ``cell``
        (``{"run", "kind", "layer", "pos"}``: a clicked cell). Traits set
        here: ``tokens``, ``subject_note``, ``answer_info``,
        ``answer_warning``, ``status`` (``idle``, ``running``,
        ``cancelling``, ``done``, ``cancelled``, ``error``), ``progress``
        (0 to 1), ``progress_text``, ``error`` (lenscope's message),
        ``heatmaps`` (the shown run's kinds, as they finish), ``cell_info``,
        ``history``, ``comparison`` and ``exported`` (the path the last
        export wrote). ``lens`` (default True) computes the
        clicked cell's lens view (:func:`~lenscope.lens.lens_trace_cell`), which
        decodes every layer and position of three runs: minutes on a large
        vocabulary on a CPU, during which the next run waits; a new click or a
        run drops a lens view still queued.
        """

        _esm = here / "explorer.js"
        _css = here / "explorer.css"

        prompt = traitlets.Unicode("").tag(sync=True)
        tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
        subject = traitlets.List(traitlets.Int()).tag(sync=True)
        subject_note = traitlets.Unicode("").tag(sync=True)
        answer = traitlets.Unicode("").tag(sync=True)
        answer_info = traitlets.Dict().tag(sync=True)
        answer_warning = traitlets.Unicode("").tag(sync=True)
        kinds = traitlets.List(traitlets.Unicode(), list(DEFAULT_KINDS)).tag(sync=True)
        window = traitlets.Int(None, allow_none=True).tag(sync=True)
        corruption = traitlets.Unicode("noise").tag(sync=True)
        noise_multiplier = traitlets.Float(3.0).tag(sync=True)
        samples = traitlets.Int(10).tag(sync=True)
        counterfactual = traitlets.Unicode("").tag(sync=True)
        direction = traitlets.Unicode("denoise").tag(sync=True)
        metric = traitlets.Unicode("").tag(sync=True)
        preview = traitlets.Bool(True).tag(sync=True)
        lens = traitlets.Bool(True).tag(sync=True)
        status = traitlets.Unicode("idle").tag(sync=True)
        progress = traitlets.Float(0.0).tag(sync=True)
        progress_text = traitlets.Unicode("").tag(sync=True)
        error = traitlets.Unicode("").tag(sync=True)
        heatmaps = traitlets.List(traitlets.Dict()).tag(sync=True)
        cell = traitlets.Dict().tag(sync=True)
        cell_info = traitlets.Dict().tag(sync=True)
        history = traitlets.List(traitlets.Dict()).tag(sync=True)
        comparison = traitlets.Dict().tag(sync=True)
        exported = traitlets.Unicode("").tag(sync=True)

        def __init__(self, model_or_tracer: Any, **traits: Any) -> None:
            if isinstance(model_or_tracer, CausalTracer):
                tracer = model_or_tracer
            else:
                tracer = CausalTracer(model_or_tracer, progress=False)
            self.tracer = tracer
            self.results: list[ExplorerRun] = []
            """Every finished (or cancelled, with finished kinds) run, oldest first."""
            self.cell_views: dict[tuple[int, str, int, int], Any] = {}
            """The lens views of clicked cells: ``{(run, kind, layer, pos): CellTrajectories}``."""
            self.head_views: dict[tuple[int, str, int, int], TraceResult] = {}
            """Per-head breakdowns asked for: ``{(run, kind, layer, pos): TraceResult}``."""
            self._run_settings: dict[str, Any] = {}
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="lenscope-explore")
            self._cancel = threading.Event()
            self._partial: dict[str, TraceResult] = {}
            self._running = False
            self._cell_clicks = 0
            self._lens_job: Future | None = None
            # A subject given with the prompt is kept; a prompt typed later gets a guess.
            self._keep_subject = "subject" in traits
            traits.setdefault("noise_multiplier", tracer.noise_multiplier)
            super().__init__(**traits)
            self.on_msg(self._on_front_end_message)
            if self.prompt and not self.tokens:
                self._new_prompt()
            self._keep_subject = False

        # --- what the front end asks for -------------------------------------

        def _on_front_end_message(self, _: Any, content: Any, buffers: Any = None) -> None:
            action = content.get("action") if isinstance(content, Mapping) else None
            if action == "run":
                self.run()
            elif action == "cancel":
                self.cancel()
            elif action == "heads":
                cell = {k: content.get(k) for k in ("run", "kind", "layer", "pos")}
                self._submit(lambda: self._show_heads(cell), "per-head breakdown")
            elif action == "export":
                path = content.get("path", "")
                self._submit(lambda: self._export(path), "export")
            elif action == "compare":
                self.compare(int(content["a"]), int(content["b"]), mode=content.get("mode", "side"))

        @traitlets.observe("prompt")
        def _on_prompt(self, change: Any) -> None:
            self._new_prompt()

        @traitlets.observe("answer")
        def _on_answer(self, change: Any) -> None:
            self._preview()

        @traitlets.observe("cell")
        def _on_cell(self, change: Any) -> None:
            if change["new"]:
                self._show_cell(change["new"])

        def _new_prompt(self) -> None:
            """Tokens, lenscope's guess of the subject, and the answer's clean probability."""
            model = self.tracer.model
            self.subject_note = ""
            try:
                ids = prompt_tokens(model, self.prompt)
            except (InvalidInput, InvalidInputType):
                self.tokens, self.subject = [], []
                self.answer_info, self.answer_warning = {}, ""
                return
            self.tokens = list(token_labels(model, ids))
            if not self._keep_subject:
                try:
                    guess = guess_subject(self.prompt)
                    self.subject = list(find_subject(model, ids, guess))
                    self.subject_note = f"guessed subject: {guess!r} (click tokens to choose)"
                except (InvalidInput, InvalidInputType) as e:
                    self.subject = []
                    self.subject_note = str(e)
            self._preview()

        def _preview(self) -> None:
            """The answer and its clean probability, and the answer warning (worker thread)."""
            prompt, answer = self.prompt, self.answer
            if not self.tokens:
                return
            self._submit(lambda: self._answer_preview(prompt, answer), "preview")

        def _answer_preview(self, prompt: str, answer: str) -> None:
            model = self.tracer.model
            try:
                ids = prompt_tokens(model, prompt)
                with preserved_model(model), torch.inference_mode():
                    logits = decode_resid(model, run_to_final_resid(model, ids[None], []))[0]
                answer_ids = answer_tokens(model, answer) if answer else (int(logits.argmax()),)
            except (InvalidInput, InvalidInputType) as e:
                self.answer_info, self.answer_warning = {}, str(e)
                return
            probs = softmax(logits)
            first = answer_ids[0]
            self.answer_info = {
                "text": "".join(token_labels(model, answer_ids)),
                "tokens": len(answer_ids),
                "prob": float(probs[first]),
                "top1": answer == "",
            }
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # (1, 0): a corruption that lowers the score, so only the warnings
                # about the answer itself (its leading space, filler) can come.
                _check_answer(model, answer or None, first, logits, (1.0, 0.0), "prob")
            self.answer_warning = "\n".join(str(w.message) for w in caught)

        # --- runs -------------------------------------------------------------

        def run_settings(self) -> dict[str, Any]:
            """The explorer's settings as they are now (what a run records)."""
            return {
                "prompt": self.prompt,
                "subject": list(self.subject),
                "answer": self.answer,
                "kinds": list(self.kinds),
                "window": self.window,
                "corruption": self.corruption,
                "noise_multiplier": self.noise_multiplier,
                "samples": self.samples,
                "counterfactual": self.counterfactual,
                "direction": self.direction,
                "metric": self.metric,
                "preview": self.preview,
            }

        def trace_options(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
            """The arguments of ``tracer.trace_kinds`` that a run with ``settings`` makes.

            ``{"prompt", "subject", "settings"}``: the run calls
            ``tracer.trace_kinds(prompt, subject, settings)`` with
            ``settings.kinds`` cut to one kind at a time.

            Raises:
                InvalidInput: A setting lenscope refuses (its own message).
            """
            s = dict(self.run_settings() if settings is None else settings)
            model = self.tracer.model
            if s["corruption"] not in CORRUPTION_CHOICES:
                raise InvalidInput(
                    f"corruption must be one of {CORRUPTION_CHOICES}, got {s['corruption']!r}; "
                    "'noise' adds Gaussian noise to the subject, 'counterfactual' runs the "
                    "counterfactual prompt"
                )
            if not s["kinds"]:
                raise InvalidInput(
                    "kinds must name at least one kind, got none; pick e.g. 'resid_post'"
                )
            options: dict[str, Any] = {
                "kinds": tuple(s["kinds"]),
                "windows": s["window"],
                "answer": s["answer"] or None,
                "direction": s["direction"],
                "metric": s["metric"] or None,
            }
            if s["corruption"] == "counterfactual":
                if not s["counterfactual"]:
                    raise InvalidInput(
                        "corruption='counterfactual' needs the counterfactual prompt, got none; "
                        "type it (the prompt with other tokens in places, e.g. the subject "
                        "replaced)"
                    )
                options["corruption"] = CounterfactualPrompt(s["counterfactual"])
                subject = None
            else:
                options["samples"] = s["samples"]
                options["noise_multiplier"] = s["noise_multiplier"]
                ids = prompt_tokens(model, s["prompt"])  # lenscope's message for a bad prompt
                if len(s["subject"]) != 2:
                    raise InvalidInput(
                        f"subject must be a (start, end) token range, got {s['subject']!r}; "
                        "click the subject's first and last tokens"
                    )
                subject = find_subject(model, ids, tuple(int(i) for i in s["subject"]))
            return {
                "prompt": s["prompt"],
                "subject": subject,
                "settings": self.tracer.settings(**options),
            }

        def run(self, *, wait: bool = False) -> ExplorerRun | None:
            """Start a run with the current settings; kinds stream into ``heatmaps``.

            Args:
                wait: Block until it finishes (for code; the front end never waits).

            Returns:
                With ``wait``, the run (None after an error or a cancel before
                any kind finished); otherwise None.
            """
            if self._running:
                self.error = "a run is in progress; press Cancel (explorer.cancel()) first"
                return None
            self.error = ""
            try:
                call = self.trace_options()
            except (InvalidInput, InvalidInputType) as e:
                self.status, self.error = "error", str(e)
                return None
            self._running = True
            if self._lens_job is not None:
                self._lens_job.cancel()  # a queued lens view would hold the run back
            self._cancel.clear()
            self._partial = {}
            self.heatmaps, self.cell_info, self.comparison = [], {}, {}
            self.status, self.progress, self.progress_text = "running", 0.0, "starting"
            settings = self.run_settings()
            self._run_settings = settings
            future = self._submit(lambda: self._run(settings, call), "run")
            if not wait:
                return None
            future.result()
            return self.results[-1] if self.status in ("done", "cancelled") else None

        def cancel(self) -> None:
            """Stop the run at its next step; the kinds already finished are kept."""
            if self._running:
                self._cancel.set()
                self.status = "cancelling"

        def wait(self, timeout: float | None = None) -> None:
            """Block until the work queued so far (runs, previews, cell views) is done."""
            self._worker.submit(lambda: None).result(timeout)

        def _run(self, settings: dict[str, Any], call: dict[str, Any]) -> None:
            started = time.perf_counter()
            kinds = list(call["settings"].kinds)
            finished: dict[str, TraceResult] = {}
            cancelled = False
            index = len(self.results)
            try:
                if settings.get("preview"):
                    self._estimate(call, index)
                for done, kind in enumerate(kinds):
                    if self._cancel.is_set():
                        cancelled = True
                        break
                    watcher = self._watcher(kind, done, len(kinds), index, settings)
                    with watching(watcher, cells=bool(settings.get("preview"))):
                        one = dataclasses.replace(call["settings"], kinds=(kind,))
                        out = self.tracer.trace_kinds(
                            call["prompt"], call["subject"], one, progress=False
                        )
                    finished[kind] = out[kind]
                    self._partial = dict(finished)  # before the heatmap: its cells open
                    exact = {**heatmap_data(out[kind], title=kind), "run": index}
                    if any(m["kind"] == kind for m in self.heatmaps):  # its estimate
                        self.heatmaps = [exact if m["kind"] == kind else m for m in self.heatmaps]
                    else:
                        self.heatmaps = [*self.heatmaps, exact]
                    self.progress = (done + 1) / len(kinds)
            except TraceCancelled:
                cancelled = True
            except Exception as e:  # shown in the widget, not lost in the thread
                self.error = _message(e)
            seconds = time.perf_counter() - started
            if finished:
                finished = shared_vocab(finished)
                run = ExplorerRun(settings, finished, not cancelled and not self.error, seconds)
                self.results.append(run)
                self.history = [*self.history, _summary(index, run)]
            self._partial = {}
            self._running = False
            self.progress_text = f"{len(finished)} of {len(kinds)} kinds in {seconds:.1f} s"
            self.status = "error" if self.error else "cancelled" if cancelled else "done"

        def _estimate(self, call: dict[str, Any], index: int) -> None:
            """Attribution estimates of every kind (one backward pass), shown until refined.

            Attribution patching (:func:`lenscope.attribution.attribute`) takes
            one forward and one backward pass of the corrupted copies for all
            kinds; each estimate is replaced by its kind's exact sweep as soon as
            that finishes. Settings attribution does not take (an answer of
            several tokens for some estimators, say) skip the estimate.
            """
            self.progress_text = "attribution estimate"
            try:
                estimates = self.tracer.attribute(call["prompt"], call["subject"], call["settings"])
            except (InvalidInput, InvalidInputType) as e:
                self.progress_text = f"no attribution estimate: {e}"
                return
            self.heatmaps = [
                {
                    **heatmap_data(result, title=f"{kind} (attribution estimate)"),
                    "run": index,
                    "estimate": True,
                }
                for kind, result in estimates.items()
            ]

        def _watcher(
            self, kind: str, done: int, total: int, index: int, settings: Mapping[str, Any]
        ) -> Callable[[TraceMeter], None]:
            shown: list[Any] = [None]

            def watch(meter: TraceMeter) -> None:
                if self._cancel.is_set():
                    raise TraceCancelled(f"cancelled during {kind}")
                if meter.cells is not None and meter.cells is not shown[0]:
                    shown[0] = meter.cells
                    self._show_partial(kind, meter.cells[1], index, settings)
                part = meter.done / meter.total if meter.total else 1.0
                self.progress = (done + min(part, 1.0)) / total
                left = meter.remaining()
                self.progress_text = f"{kind}: {part:.0%}" + (
                    "" if left is None else f", about {left:.0f} s left in this kind"
                )

            return watch

        def _show_partial(
            self, kind: str, scores: torch.Tensor, index: int, settings: Mapping[str, Any]
        ) -> None:
            """A kind's exact cells so far, over its estimate where there is one.

            Drawn until the kind's sweep finishes and its result replaces it;
            like an estimate, not clickable.
            """
            earlier = next((m for m in self.heatmaps if m["kind"] == kind), None)
            estimate = None
            if earlier is not None and earlier.get("partial"):
                estimate = earlier["estimate_scores"]
            elif earlier is not None and earlier.get("estimate"):
                estimate = earlier["scores"]
            map_ = partial_heatmap(
                kind,
                scores,
                index=index,
                tokens=self.tokens,
                subject=settings.get("subject"),
                estimate=estimate,
                like=earlier,
            )
            if map_ is None:
                return
            if earlier is not None:
                self.heatmaps = [map_ if m["kind"] == kind else m for m in self.heatmaps]
            else:
                self.heatmaps = [*self.heatmaps, map_]

        def _submit(self, job: Callable[[], None], what: str) -> Future:
            def guarded() -> None:
                try:
                    job()
                except Exception as e:  # a bug: shown, never lost in the thread
                    self.error = f"{what} failed: {_message(e)}"
                    if what == "run":
                        self._running = False
                        self.status = "error"

            return self._worker.submit(guarded)

        # --- cells --------------------------------------------------------------

        def _result(self, run: int | None, kind: str) -> tuple[int, TraceResult]:
            """``(run index, result)`` of a kind of a run (None: the one shown)."""
            runs = self.results
            partial = self._partial
            if run is None or (run == len(runs) and partial):
                index, source = (len(runs), partial) if partial else (len(runs) - 1, None)
                source = source if source is not None else (runs[-1].results if runs else {})
            elif 0 <= run < len(runs):
                index, source = run, runs[run].results
            else:
                raise InvalidInput(
                    f"run must be the index of a run in explorer.results (0 to {len(runs) - 1}), "
                    f"got {run!r}"
                )
            if kind not in source:
                raise InvalidInput(
                    f"kind {kind!r} is not among the run's finished kinds {list(source)}; "
                    "click a cell of a finished heatmap"
                )
            return index, source[kind]

        def _show_cell(self, cell: Mapping[str, Any]) -> None:
            """The clicked cell's top-k now; its lens view from the worker thread."""
            try:
                run = cell.get("run")
                index, result = self._result(None if run is None else int(run), str(cell["kind"]))
                coords = (int(cell["layer"]), int(cell["pos"]))
                top = result.top_predictions(*coords)
            except (InvalidInput, InvalidInputType, KeyError, IndexError, TypeError) as e:
                self.cell_info = {"error": _message(e)}
                return
            self._cell_clicks += 1
            click = self._cell_clicks
            info = {
                **dict(cell),
                "run": index,
                "score": _json_float(float(result.scores[coords])),
                "top": [[token, float(p)] for token, p in top],
                "lens": None,
                "lens_note": "computing the lens view",
            }
            self.cell_info = info
            if not self.lens:
                self.cell_info = {**info, "lens_note": ""}
                return
            if result.direction != "denoise" or result.axes[:2] != ("layer", "pos"):
                self.cell_info = {
                    **info,
                    "lens_note": "the lens view needs a denoising (layer, pos) trace",
                }
                return
            if self._lens_job is not None:
                self._lens_job.cancel()  # a lens view still queued is no longer wanted
            self._lens_job = self._submit(
                lambda: self._lens(index, result, coords, info, click), "lens view"
            )

        def _lens(
            self, index: int, result: TraceResult, coords: tuple, info: dict, click: int
        ) -> None:
            try:
                views = lens_trace_cell(self.tracer, result, *coords, top_k=3)
            except (InvalidInput, InvalidInputType) as e:
                if click == self._cell_clicks:
                    self.cell_info = {**info, "lens_note": str(e)}
                return
            self.cell_views[(index, result.kind, *coords)] = views
            last = result.n_pos - 1
            lens = {}
            for name, view in zip(("clean", "corrupted", "restored"), views, strict=True):
                lens[name] = {
                    "answer_prob": [float(p) for p in view.answer_prob[:, last]],
                    "top1": [view.vocab[int(i)] for i in view.top_ids[:, last, 0]],
                }
            if click == self._cell_clicks:  # the latest click: show it
                self.cell_info = {**info, "lens": lens, "lens_note": ""}

        def heads(
            self, layer: int, pos: int, *, kind: str = "attn_out", run: int | None = None
        ) -> TraceResult:
            """The per-head breakdown of an attention cell: each head restored alone.

            An ``attn_out`` cell restores the attention output at position
            ``pos`` in the layers of its window; the breakdown restores one
            head's output (its ``hook_z``: ``attn_out`` is the sum of the heads'
            ``z @ W_O``) at ``pos`` in the same layers, with the run's
            corruption, answer and metric: ``tracer.trace_kinds`` of kind
            ``"z"``, ``by="head_pos"``, ``layers=[layer]``, ``positions=[pos]``
            and the cell's window. The heads' effects need not add up to the
            cell's (the model is not linear in them).

            Args:
                layer: The cell's layer.
                pos: The cell's position.
                kind: An attention kind of the run (``attn_out``).
                run: The run's index in :attr:`results` (None: the one shown).

            Returns:
                The trace (axes ``("layer", "head", "pos")``; the cell's column
                is ``result.scores[layer, :, pos]``), also kept in
                :attr:`head_views`.

            Raises:
                InvalidInput: A kind that is not an attention kind, a run or
                    kind that has not finished, a layer or position outside the grid.
            """
            if not str(kind).startswith("attn"):
                raise InvalidInput(
                    f"the per-head breakdown is of an attention cell (kind 'attn_out'), got "
                    f"kind {kind!r}; click a cell of the attn_out heatmap"
                )
            index, result = self._result(run, kind)
            n_layer, n_pos = result.scores.shape[:2]
            if not (0 <= layer < n_layer and 0 <= pos < n_pos):
                raise InvalidInput(
                    f"the cell must lie in the {kind} grid (layers 0 to {n_layer - 1}, positions "
                    f"0 to {n_pos - 1}), got layer {layer!r}, pos {pos!r}; click a cell"
                )
            settings = (
                self.results[index].settings if index < len(self.results) else self._run_settings
            )
            call = self.trace_options(settings)
            per_head = self.tracer.settings(
                call["settings"],
                kinds=("z",),
                by="head_pos",
                layers=[layer],
                positions=[pos],
                windows=result.window,
            )
            with warnings.catch_warnings():
                # The run already showed its answer warnings.
                warnings.simplefilter("ignore", AnswerWarning)
                out = self.tracer.trace_kinds(
                    call["prompt"], call["subject"], per_head, progress=False
                )["z"]
            self.head_views[(index, kind, layer, pos)] = out
            return out

        def _show_heads(self, cell: Mapping[str, Any]) -> None:
            """The per-head breakdown of the clicked cell, into ``cell_info`` (worker thread)."""
            key = {k: cell.get(k) for k in ("run", "kind", "layer", "pos")}
            try:
                run = None if key["run"] is None else int(key["run"])
                layer, pos = int(key["layer"]), int(key["pos"])
                result = self.heads(layer, pos, kind=str(key["kind"]), run=run)
                heads = [_json_float(v) for v in result.scores[layer, :, pos].tolist()]
                shown = {"heads": heads, "heads_note": ""}
            except (InvalidInput, InvalidInputType, TypeError, ValueError) as e:
                shown = {"heads": None, "heads_note": _message(e)}
            info = self.cell_info
            if all(info.get(k) == key[k] for k in ("kind", "layer", "pos")):
                self.cell_info = {**info, **shown}

        # --- history and export -------------------------------------------------

        def compare(self, i: int, j: int, *, mode: str = "side") -> Any:
            """Two runs side by side (``"side"``) or as a difference, run i − run j.

            The widget shows them (``comparison``); the returned plotly figure
            (:func:`lenscope.plotting.plot_traces`) can be saved or shown.

            Raises:
                InvalidInput: An index outside :attr:`results`, an unknown mode,
                    or (difference) runs of other tokens, grids or metrics.
            """
            fig, maps = self._comparison(i, j, mode)
            self.comparison = {"mode": mode, "runs": [i, j], "heatmaps": maps}
            return fig

        def _comparison(self, i: int, j: int, mode: str) -> tuple[Any, list[dict]]:
            """The figure and the front end's maps of :meth:`compare`."""
            from lenscope.plotting import plot_traces

            modes = ("side", "difference")
            if mode not in modes:
                raise InvalidInput(f"mode must be one of {modes}, got {mode!r}")
            n = len(self.results)
            for name, value in (("i", i), ("j", j)):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                    raise InvalidInput(
                        f"{name} must be the index of a run in explorer.results (0 to {n - 1}), "
                        f"got {value!r}; run twice, then compare(0, 1)"
                    )
            a, b = self.results[i].results, self.results[j].results
            if mode == "difference":
                fig = plot_traces({f"run {i}": a, f"run {j}": b}, mode="difference")
                maps = [
                    heatmap_data(
                        a[k], title=f"{k}: run {i} − run {j}", scores=a[k].scores - b[k].scores
                    )
                    for k in a
                    if k in b
                ]
            else:
                panels = {
                    f"run {r}: {k}": res for r, run in ((i, a), (j, b)) for k, res in run.items()
                }
                fig = plot_traces(panels, allow_mismatch=True)
                maps = [heatmap_data(res, title=name) for name, res in panels.items()]
            return fig, maps

        def figure(self, run: int = -1) -> Any:
            """The plotly figure of a run's kinds (default the last run)."""
            if not self.results:
                raise InvalidInput("no run has finished yet; press Run (explorer.run()) first")
            return self.results[run].plot()

        def save_html(self, path: str | Path, run: int = -1, **options: Any) -> Path:
            """Write a run's heatmaps as a page (:func:`lenscope.plotting.save_html`)."""
            from lenscope.plotting import save_html

            return save_html(self.figure(run), path, **options)

        def view_figure(self) -> Any:
            """The plotly figure of what the widget shows now.

            The comparison when one is shown (:meth:`compare`, side by side or
            the difference), else the last run's kinds (:meth:`figure`).
            """
            view = self.comparison
            if view and view.get("runs"):
                return self._comparison(*view["runs"], view["mode"])[0]
            return self.figure()

        def export(self, path: str | Path, **options: Any) -> Path:
            """Write the current view (:meth:`view_figure`) as a page or an image.

            The widget's Export buttons call it with the name typed beside
            them (relative to the kernel's working folder) and show the path
            written in ``exported``.

            Args:
                path: ``.html`` (:func:`lenscope.plotting.save_html`: offline,
                    with linked hover and the settings table) or ``.png``,
                    ``.svg``, ``.pdf`` (:func:`lenscope.plotting.save_image`,
                    through kaleido).
                **options: Passed on to ``save_html`` or ``save_image``.

            Returns:
                The path written.

            Raises:
                InvalidInput: Another suffix, or no run finished yet.
                ImportError: An image without kaleido installed.
            """
            from lenscope.plotting import save_html, save_image

            path = Path(path)
            suffix = path.suffix.lower()
            if suffix not in _EXPORT_SUFFIXES:
                raise InvalidInput(
                    f"export path must end in one of {_EXPORT_SUFFIXES}, got {str(path)!r}; "
                    "e.g. explorer.export('view.png') or explorer.export('view.html')"
                )
            fig = self.view_figure()
            written = save_html(fig, path, **options) if suffix == ".html" else None
            if written is None:
                written = save_image(fig, path, **options)
            self.exported = str(written)
            return written

        def _export(self, path: Any) -> None:
            """The front end's Export: the path written, or the reason, in the widget."""
            try:
                self.export(str(path))
                self.error = ""
            except (InvalidInput, InvalidInputType, ImportError) as e:
                self.exported, self.error = "", str(e)

        def save_json(self, path: str | Path) -> Path:
            """Write every run (:meth:`ExplorerRun.to_dict`) as one JSON list."""
            return write_json([run.to_dict() for run in self.results], path)

        def close(self) -> None:
            """Cancel a run, stop the worker thread and close the widget."""
            self.cancel()
            self._worker.shutdown(wait=True)
            super().close()

    Explorer.__module__ = __name__
    return Explorer


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>{css}</style></head><body>
<div id="root"></div>
<script id="state" type="application/json">{state}</script>
<script type="module">
{js}
const state = JSON.parse(document.getElementById("state").textContent);
const listeners = {{}};
window.sets = []; window.sent = [];
window.model = {{
  get: (name) => state[name],
  set: (name, value) => {{
    state[name] = value; window.sets.push([name, value]);
    (listeners["change:" + name] || []).forEach((f) => f());
  }},
  on: (event, f) => (listeners[event] = listeners[event] || []).push(f),
  save_changes: () => {{}},
  send: (content) => window.sent.push(content),
}};
render({{ model: window.model, el: document.getElementById("root") }});
window.ready = true;
</script></body></html>"""


def widget_page(state: Mapping[str, Any]) -> str:
    """The widget's front end drawn from a snapshot of its state, without a kernel.

    A stand-in for anywidget's model (``get``, ``set``, ``on``,
    ``save_changes``, ``send``) holds ``state`` (``explorer.get_state()``)
    and records what the page sets and sends (``window.sets``,
    ``window.sent``): the browser test drives it, and
    ``scripts/explorer_screenshots.py`` takes the README's pictures of it.
    """
    here = Path(__file__).parent
    shown = {k: v for k, v in state.items() if not k.startswith("_")}
    js = (here / "explorer.js").read_text().replace("export default { render };", "")
    text = json.dumps(shown).replace("</", "<\\/")
    return _PAGE.format(css=(here / "explorer.css").read_text(), state=text, js=js)


def load_runs(path: str | Path) -> list[ExplorerRun]:
    """Read the runs :meth:`Explorer.save_json` wrote."""
    data = read_json(path, "explorer runs")
    if not isinstance(data, list):
        raise InvalidInput(
            f"an explorer's runs file holds a list of runs, got {type(data).__name__} in "
            f"{str(path)!r}; pass a file written by explorer.save_json"
        )
    return [ExplorerRun.from_dict(item) for item in data]


def _summary(index: int, run: ExplorerRun) -> dict[str, Any]:
    s = run.settings
    how = (
        f"counterfactual {s['counterfactual']!r}"
        if s["corruption"] == "counterfactual"
        else f"noise {s['noise_multiplier']:g}σ × {s['samples']}"
    )
    return {
        "run": index,
        "prompt": s["prompt"],
        "kinds": list(run.results),
        "corruption": how,
        "direction": s["direction"],
        "complete": run.complete,
        "seconds": round(run.seconds, 2),
    }


def _message(error: BaseException) -> str:
    if isinstance(error, InvalidInput | InvalidInputType):
        return str(error)
    return f"{type(error).__name__}: {error}"
