"""How right the time estimate is: the estimate a trace makes against the time it takes.

A trace's :class:`~lenscope.progress.TraceMeter` estimates the total time once
its first sweep batch has run (the estimate behind the long-trace warning and
the progress bar's remaining time; logged on ``lenscope.progress``). This
script runs the traces a new user runs first, reads that estimate, times the
whole call, and prints a table of estimate / measured, on a quiet machine and,
with ``--load``, again while another process keeps one core busy (a torch
matrix loop in a subprocess), all in one run:

* the README command: ``lenscope trace PROMPT --subject ... --out ...`` (in
  process, through ``lenscope.cli.main``, on the already loaded model): three
  kinds, ROME's windows, 10 samples;
* the Python quickstart's first call: ``tracer.trace(..., kind="mlp_out",
  window=10)``;
* the same two on a tiny random model (``--model random-tiny``), where
  one-time costs weigh most.

Examples:
    python benchmarks/bench_estimate.py                      # Gemma-3-270m, quiet
    python benchmarks/bench_estimate.py --load               # quiet, then loaded
    python benchmarks/bench_estimate.py --model random-tiny --load
"""

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

import lenscope
from lenscope import cli

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a\n"


class _Estimates(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _model(name: str) -> object:
    if name != "random-tiny":
        return lenscope.load_model(name)
    # The tests' tiny random model (word tokenizer, d_model 32; the installed
    # TransformerLens's default class), 12 layers deep for ROME's window of 10.
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import make_tiny_model, make_tiny_tokenizer

    return make_tiny_model(make_tiny_tokenizer(tempfile.mkdtemp()), n_layers=12)


@contextlib.contextmanager
def _busy(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(2.0)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _measure(run: Callable[[], object]) -> tuple[float, float | None, float | None]:
    """``(seconds, estimated total, elapsed when estimated)`` of one call."""
    handler = _Estimates()
    log = logging.getLogger("lenscope.progress")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
    finally:
        log.removeHandler(handler)
    if not handler.lines:
        return seconds, None, None
    # "trace estimate: 95.1 s in all, after 12.3 s and ..."
    words = handler.lines[0].split()
    return seconds, float(words[2]), float(words[7])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--load", action="store_true", help="repeat with one core kept busy")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args.model)
    tracer = lenscope.CausalTracer(model, progress=False)
    out = os.path.join(tempfile.mkdtemp(), "trace.html")

    def readme() -> None:
        code = cli.main(
            ["trace", PROMPT, "--subject", SUBJECT, "--out", out, "--quiet"],
            model_factory=lambda *a, **k: model,
        )
        if code != 0:
            raise SystemExit(f"lenscope trace exited {code}")

    def quickstart() -> None:
        tracer.trace(PROMPT, subject=SUBJECT, kind="mlp_out", window=10)

    rows = []
    for loaded in (False, True) if args.load else (False,):
        with _busy(loaded):
            for name, run in (("README command", readme), ("quickstart trace", quickstart)):
                rows.append((name, loaded, *_measure(run)))
    print(f"model {args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    header = ("trace", "machine", "estimated (s)", "estimated after (s)", "measured (s)")
    print("| " + " | ".join(header) + " | estimate / measured |")
    print("|---|---|---:|---:|---:|---:|")
    for name, loaded, seconds, estimate, after in rows:
        machine = "one core busy" if loaded else "quiet"
        if estimate is None:
            print(f"| {name} | {machine} | - | - | {seconds:.1f} | - |")
            continue
        print(
            f"| {name} | {machine} | {estimate:.1f} | {after:.1f} | {seconds:.1f} | "
            f"{estimate / seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
