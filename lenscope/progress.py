"""How far a trace has got and how long it will take: work counted in advance, speed measured.

A causal trace (Meng et al., 2022, arXiv 2202.05262) spends its time in two
kinds of work that lenscope counts exactly before anything runs: the
token-layers of its forward passes (``(row, position, block)`` triples, from
the sweep planner) and the rows it decodes through the unembedding. Their
costs are put on one scale, the *unit*: one token-layer, with a decoded row
worth :func:`decode_weight` units (the ratio of their multiply-adds). A
:class:`TraceMeter` holds the total, advances as each forward pass and each
decoded chunk finishes, and extrapolates the speed it measured on this
machine, as it is loaded now, to the units left. An estimate made before
anything ran (from a model's size, or from the first forward pass, which pays
one-time costs) was wrong by up to 5x either way on a shared 2-core machine;
this one is made from the trace's own batched work, once the first sweep batch
has finished, and the progress bar's remaining time is refreshed from it after
every step. Code that runs a trace for someone else (the notebook explorer,
:mod:`lenscope.explorer`) watches every meter created inside
:func:`watching`: its callback sees the meter after each step, and may raise to
stop the trace there (the trace then leaves the model as it was, as after any error).
A watch with ``cells=True`` also streams the trace: each kind's sweep decodes
its cells as their forward passes finish, and the meter's :attr:`TraceMeter.cells`
holds the kind's grid so far (NaN where a cell is still to come).
"""

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

LONG_TRACE_SECONDS = 600.0
"""A trace whose measured estimate exceeds this says so (a ``UserWarning``)."""

_LOG = logging.getLogger("lenscope.progress")

_WATCHERS: contextvars.ContextVar[tuple[Callable[["TraceMeter"], None], ...]] = (
    contextvars.ContextVar("lenscope_meter_watchers", default=())
)
_CELLS: contextvars.ContextVar[bool] = contextvars.ContextVar("lenscope_meter_cells", default=False)


@contextlib.contextmanager
def watching(callback: Callable[["TraceMeter"], None], *, cells: bool = False) -> Iterator[None]:
    """Call ``callback(meter)`` after every step of each :class:`TraceMeter` made inside.

    The watch is a context variable: a trace run in a worker thread is
    watched by what that thread set up, as the explorer does. The
    callback may raise: the step that called it raises, and the trace stops
    there.

    Args:
        callback: Called with the meter after each :meth:`TraceMeter.advance`
            and :meth:`TraceMeter.warmed_up` (``meter.done``, ``meter.total``,
            ``meter.description``, :meth:`TraceMeter.remaining`), and with
            ``cells``, after each :meth:`TraceMeter.show_cells`.
        cells: Stream the traces made inside: their sweeps decode cells as
            they finish and show them (:attr:`TraceMeter.cells`). The results
            are the same; the unembedding is read once per decoded batch.
    """
    token = _WATCHERS.set((*_WATCHERS.get(), callback))
    cells_token = _CELLS.set(_CELLS.get() or cells)
    try:
        yield
    finally:
        _CELLS.reset(cells_token)
        _WATCHERS.reset(token)


def decode_weight(model: torch.nn.Module, n_key: int) -> float:
    """Token-layers that decoding one row costs as much as, by their multiply-adds.

    A token-layer (one position through one block, attending to ``n_key``
    positions) multiplies its residual by the block's weight matrices and
    attends; a decoded row multiplies a residual by the unembedding
    ``[d_model, d_vocab]`` and takes a softmax and a top-k over the vocabulary
    (counted as a few more passes over it).

    Args:
        model: A TransformerLens model (its ``cfg``).
        n_key: Positions each token-layer attends to (the prompt's length).
    """
    cfg = model.cfg
    d_model, d_head = int(cfg.d_model), int(cfg.d_head)
    n_heads = int(cfg.n_heads)
    kv_heads = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    mlp_mats = 3 if getattr(cfg, "gated_mlp", False) else 2
    experts = int(getattr(cfg, "experts_per_token", None) or 1)
    block = (
        2 * d_model * n_heads * d_head  # queries and output
        + 2 * d_model * kv_heads * d_head  # keys and values
        + experts * mlp_mats * d_model * d_mlp
        + 2 * n_key * n_heads * d_head  # scores and the weighted sum of values
    )
    decode = d_model * cfg.d_vocab + 8 * cfg.d_vocab
    return decode / block


def duration(seconds: float) -> str:
    """``"47 s"``, ``"12 minutes"`` or ``"1.9 hours"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


class TraceMeter:
    """The work of one trace, in units, and the time it is taking.

    Steps come in two phases. *Warm-up* steps (the first forward pass of a
    trace, which pays one-time costs: allocations, kernel selection) count
    towards the progress but not towards the speed. *Work* steps (batched
    passes and decoding, like the sweeps') are timed, and their speed,
    units per second since the warm-up ended, is what the estimate
    extrapolates. The first step marked ``decides`` (the first sweep batch)
    makes the one long-trace decision: if the estimated total exceeds
    :data:`LONG_TRACE_SECONDS`, ``on_long`` is called with it (the caller's
    warning, with its advice).

    Args:
        total: Units the trace will run (token-layers plus weighted decoded rows).
        progress: Show a tqdm bar (percentage, elapsed and remaining time).
        description: The bar's label.
        on_long: Called once with the estimated total seconds when they exceed
            :data:`LONG_TRACE_SECONDS`.
        clock: Seconds, monotonic (a fake one in tests).
    """

    def __init__(
        self,
        total: float | int,
        *,
        progress: bool = False,
        description: str = "trace",
        on_long: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total = float(total)
        self.done = 0.0
        self.on_long = on_long
        self.clock = clock
        self.started = clock()
        self.work_started: float | None = None
        self.work_done = 0.0
        self.decided = False
        self.first_estimate: float | None = None
        """The estimated total seconds at the decision (None before it)."""
        self.description = description
        """The label of the work in progress (e.g. the kind being traced)."""
        self._watchers = _WATCHERS.get()
        self.streams = _CELLS.get()
        """Someone watches cells (``watching(..., cells=True)``): sweeps should stream."""
        self.cells: tuple[str, Float[torch.Tensor, "layer ..."]] | None = None
        """The latest :meth:`show_cells`: ``(kind, scores so far)``."""
        self._bar = (
            tqdm(
                total=self.total,
                desc=description,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}",
                postfix="time left ?",
            )
            if progress
            else None
        )

    def describe(self, description: str) -> None:
        """Relabel the progress bar (e.g. the kind being traced)."""
        self.description = description
        if self._bar is not None:
            self._bar.set_description_str(description, refresh=False)

    def warmed_up(self, units: float | int) -> None:
        """Count ``units`` that ran as warm-up: progress, but not speed."""
        self.done += units
        self.work_started = self.clock()
        self._refresh(units)
        self._notify()

    def advance(self, units: float | int, *, decides: bool = False) -> None:
        """Count ``units`` of timed work that just finished.

        Args:
            units: The units the finished step ran.
            decides: The step is representative of what is left (a sweep
                batch): make the long-trace decision now if not made yet.
        """
        if self.work_started is None:  # nothing ran as warm-up: time from the start
            self.work_started = self.started
        self.done += units
        self.work_done += units
        if decides and not self.decided:
            self.decided = True
            estimate = self.estimate()
            self.first_estimate = estimate
            if estimate is not None:
                _LOG.info(
                    "trace estimate: %.1f s in all, after %.1f s and %.0f of %.0f units",
                    estimate,
                    self.clock() - self.started,
                    self.done,
                    self.total,
                )
                if estimate > LONG_TRACE_SECONDS and self.on_long is not None:
                    self.on_long(estimate)
        self._refresh(units)
        self._notify()

    def show_cells(self, kind: str, scores: Float[torch.Tensor, "layer ..."]) -> None:
        """Show a kind's cells so far (NaN: still to come) to the watchers."""
        self.cells = (kind, scores)
        self._notify()

    def _notify(self) -> None:
        for callback in self._watchers:
            callback(self)

    def seconds_per_unit(self) -> float | None:
        """The measured speed of the work steps, or None before one has run."""
        if self.work_started is None or self.work_done <= 0:
            return None
        return max(self.clock() - self.work_started, 0.0) / self.work_done

    def remaining(self) -> float | None:
        """Estimated seconds left: the units left at the measured speed."""
        rate = self.seconds_per_unit()
        if rate is None:
            return None
        return max(self.total - self.done, 0.0) * rate

    def estimate(self) -> float | None:
        """Estimated total seconds: elapsed plus :meth:`remaining`."""
        left = self.remaining()
        return None if left is None else self.clock() - self.started + left

    def _refresh(self, units: float | int) -> None:
        if self._bar is None:
            return
        left = self.remaining()
        left_text = "?" if left is None else _clock(left)
        self._bar.set_postfix_str(f"time left {left_text}", refresh=False)
        # Float sums of the units can pass the total by a rounding error, which
        # tqdm would warn about ("clamping frac"): the bar stops at its total.
        self._bar.update(min(units, max(self._bar.total - self._bar.n, 0)))

    def close(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "TraceMeter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    """``"01:05"`` or ``"1:02:03"``, as tqdm writes times."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
