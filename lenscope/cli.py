"""The ``lenscope`` command line: causal traces (and dataset runs) from a shell.

``lenscope trace PROMPT --subject SUBJECT`` loads a model (the built-in
offline Gemma-3-270m by default), traces the hook-point types ROME's
Figure 1 shows (Meng et al., 2022, arXiv 2202.05262), prints the answer,
the clean and corrupted probabilities and each kind's peak cell, and writes
the side-by-side heatmaps as a self-contained HTML file. ``lenscope dataset``
averages traces over ROME's known facts (Figure 2). Both subcommands take the
same trace options (:func:`add_trace_arguments`), checked when the arguments
are parsed. A user error exits with status 2 and a one-line reason; anything
else is a bug or an environment problem: exit 1, with a hint to rerun with
``LENSCOPE_TRACEBACK=1`` for the traceback.

This module is the top layer: it imports everything else, lazily, so that
``--help`` and argument errors come back without loading torch.
"""

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lenscope._version import __version__

DEFAULT_PROMPT_HELP = '"The Eiffel Tower is located in the city of"'
DEFAULT_KINDS = ("resid_post", "mlp_out", "attn_out")
KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
ModelFactory = Callable[..., Any]


def _noise_arg(text: str) -> tuple[str, float]:
    """``3s`` / ``s3`` = multiple of sigma (ROME's notation), a plain number = absolute std."""
    value = text.strip().lower()
    multiple = value.endswith("s") or value.startswith("s")
    number = value.strip("s")
    try:
        parsed = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an absolute std (e.g. 0.5) or a multiple of sigma (e.g. 3s), got {text!r}"
        ) from None
    if not math.isfinite(parsed) or parsed < 0:
        raise argparse.ArgumentTypeError(f"noise must be finite and >= 0, got {text!r}")
    return ("multiplier" if multiple else "absolute"), parsed


def _kinds_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"kinds must be a comma-separated list of {','.join(KINDS)}, got {text!r}"
        )
    return kinds


def positive_int_arg(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--model``, ``--bridge/--no-bridge``, ``--device``, ``--dtype``."""
    parser.add_argument(
        "--model",
        default="gemma-3-270m",
        help="model name: gemma-3-270m (built in, offline; default) or any "
        "TransformerLens name such as gpt2-xl (needs the Hugging Face hub)",
    )
    parser.add_argument(
        "--bridge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--bridge loads a TransformerBridge, --no-bridge a HookedTransformer "
        "(TransformerLens 3.9 only); default: the installed TransformerLens' own "
        "(TransformerBridge on 4.x, HookedTransformer on 3.9)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    return parser


def add_trace_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trace options every subcommand shares, each checked at parse time.

    ``--kinds``, ``--window``, ``--samples``, ``--noise``, ``--seed``,
    ``--batch-size`` and ``--quiet``; :func:`trace_options` turns them into
    :class:`lenscope.TraceSettings` options.
    """
    parser.add_argument(
        "--kinds",
        type=_kinds_arg,
        default=DEFAULT_KINDS,
        help=f"hook-point types, comma-separated (default {','.join(DEFAULT_KINDS)}; "
        "also resid_pre, resid_mid)",
    )
    parser.add_argument(
        "--window",
        type=positive_int_arg,
        help="layers restored around each cell for every kind (default: 1 for resid_*, "
        "10 for mlp_out/attn_out, as in ROME)",
    )
    parser.add_argument(
        "--samples",
        type=positive_int_arg,
        default=10,
        help="corrupted copies (default 10, as in ROME)",
    )
    parser.add_argument(
        "--noise",
        type=_noise_arg,
        default=("multiplier", 3.0),
        help="noise std: a multiple of the embedding sigma such as 3s (default), "
        "or an absolute number such as 0.5",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    parser.add_argument(
        "--batch-size", type=positive_int_arg, help="corrupted copies per forward pass"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def trace_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`lenscope.TraceSettings` options of :func:`add_trace_arguments`' flags."""
    mode, value = args.noise
    return {
        "kinds": args.kinds,
        "windows": args.window,
        "samples": args.samples,
        "noise": value if mode == "absolute" else None,
        "noise_multiplier": value if mode == "multiplier" else None,
        "seed": args.seed,
    }


def add_dataset_arguments(
    parser: argparse.ArgumentParser, *, model_arguments: bool = False
) -> argparse.ArgumentParser:
    """Add the options of ``lenscope dataset`` to ``parser``.

    Args:
        parser: The subcommand's parser.
        model_arguments: Also add the model options (:func:`add_model_arguments`).

    Returns:
        The same parser.
    """
    if model_arguments:
        add_model_arguments(parser)
    parser.add_argument(
        "--facts",
        type=Path,
        default=None,
        help="JSON/JSONL fact file (default: the ROME known facts shipped with lenscope)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int_arg,
        default=None,
        help="trace the first N facts the model knows (default: all)",
    )
    parser.add_argument(
        "--no-filter",
        action="store_true",
        help="trace the facts as given, without keeping only the known ones",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="HTML report (default report.html)"
    )
    parser.add_argument(
        "--summary", type=Path, default=None, help="also save the DatasetSummary as JSON"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="JSONL checkpoint, written as each fact finishes; rerun with the same file to resume",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop starting new facts after this many minutes",
    )
    add_trace_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lenscope`` command."""
    parser = argparse.ArgumentParser(
        prog="lenscope",
        description="See where a transformer keeps and moves the information behind a "
        "prediction: vectorised causal tracing (ROME) for TransformerLens models.",
    )
    parser.add_argument("--version", action="version", version=f"lenscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    trace = sub.add_parser(
        "trace",
        help="causal-trace one prompt and write interactive heatmaps",
        description="Corrupt the subject with Gaussian noise at hook_embed, restore each "
        "(layer, token) cell's clean activation, and report how much of the answer's "
        "probability comes back. Example: lenscope trace "
        f'{DEFAULT_PROMPT_HELP} --subject "The Eiffel Tower" --out trace.html',
    )
    trace.add_argument("prompt", help="the prompt text")
    trace.add_argument(
        "--subject",
        help="the subject to corrupt (text in the prompt); guessed as the longest "
        "capitalised span when omitted",
    )
    add_model_arguments(trace)
    add_trace_arguments(trace)
    trace.add_argument("--answer", help="answer token text (default: the clean top-1 token)")
    trace.add_argument(
        "--out", type=Path, default=Path("trace.html"), help="HTML file (default trace.html)"
    )
    trace.add_argument("--json", type=Path, help="also write the results as JSON")
    trace.set_defaults(run=run_trace)

    dataset = sub.add_parser(
        "dataset",
        help="average causal traces over the ROME known facts and write an HTML report",
        description="Keep the facts the model knows, trace them (resumable with --checkpoint) "
        "and write ROME Figure-2 averages. Example: lenscope dataset --limit 20 --out report.html",
    )
    add_dataset_arguments(dataset, model_arguments=True)
    dataset.set_defaults(run=run_dataset)
    return parser


def _load(args: argparse.Namespace, model_factory: ModelFactory | None) -> Any:
    if model_factory is None:
        from lenscope.loading import load_model

        model_factory = load_model
    return model_factory(
        args.model,
        bridge=getattr(args, "bridge", None),
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
    )


def run_trace(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope trace``; returns the exit status."""
    import lenscope
    from lenscope.plotting import plot_traces, save_html
    from lenscope.validation import InvalidInput

    subject = args.subject
    if subject is None:
        try:
            subject = lenscope.guess_subject(args.prompt)
        except ValueError as e:
            raise InvalidInput(f"{e} (use --subject)") from e
        print(f"guessed subject: {subject!r} (pass --subject to choose)", file=sys.stderr)
    model = _load(args, model_factory)
    tracer = lenscope.CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    results = tracer.trace_kinds(args.prompt, subject, answer=args.answer, **trace_options(args))
    print(format_table(results))
    save_html(plot_traces(results), args.out)
    print(f"wrote {args.out}")
    if args.json:
        from lenscope.results import write_json

        write_json({k: r.to_dict() for k, r in results.items()}, args.json)
        print(f"wrote {args.json}")
    return 0


def run_dataset(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope dataset``: filter the known facts, trace them, write an HTML report.

    Prints the per-kind table (:meth:`DatasetSummary.table`) on stdout. A
    checkpoint written under other settings is refused before the
    known-fact filter runs.

    Args:
        args: Options from :func:`add_dataset_arguments` with ``model_arguments=True``.
        model_factory: Replaces :func:`lenscope.loading.load_model`, called as
            ``model_factory(name, bridge=..., device=..., dtype=...)``.

    Returns:
        The exit status, 0.
    """
    from lenscope.datasets import filter_known, known_facts, load_facts, trace_dataset
    from lenscope.datasets.checkpoint import Checkpoint
    from lenscope.datasets.run import dataset_header, dataset_settings
    from lenscope.hooks import model_name
    from lenscope.plotting.dataset import save_dataset_report
    from lenscope.tracer import CausalTracer

    model = _load(args, model_factory)
    tracer = CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    settings = dataset_settings(tracer, **trace_options(args))
    if args.checkpoint is not None:
        Checkpoint.check(args.checkpoint, dataset_header(tracer, settings))
    facts = load_facts(args.facts) if args.facts else known_facts()
    if args.no_filter:
        chosen = facts[: args.limit] if args.limit else facts
    else:
        chosen = filter_known(tracer, facts, limit=args.limit)
        print(f"{len(chosen)} facts known to {model_name(model)} selected", file=sys.stderr)
    summary = trace_dataset(
        tracer,
        chosen,
        settings,
        checkpoint=args.checkpoint,
        max_seconds=None if args.minutes is None else args.minutes * 60,
    )
    path = save_dataset_report(summary, args.out)
    if args.summary:
        summary.save(args.summary)
    print(summary.table().to_string(index=False))
    print(
        f"{summary.n_facts} facts traced, {summary.n_skipped} skipped, {summary.n_pending} "
        f"not reached; report written to {path}",
        file=sys.stderr,
    )
    return 0


def format_table(results: dict[str, Any]) -> str:
    """The summary the command prints: answer, clean/corrupted scores, peak cell per kind."""
    first = next(iter(results.values()))
    start, end = first.subject_range
    lines = [
        f"model      {first.model_name}",
        f"subject    {''.join(first.tokens[start:end])!r} (tokens {start}..{end - 1})",
        f"answer     {first.answer!r}",
        f"clean      p = {first.clean_score:.4f}",
        f"corrupted  p = {first.corrupted_score:.4f}   (noise std {first.noise_std:.4g}, "
        f"{first.samples} samples)",
        "",
        f"{'kind':<11}{'window':>6}  {'peak layer':>10}  {'peak token':<20}{'score':>8}"
        f"{'normalized':>12}",
    ]
    for kind, r in results.items():
        layer, pos, score = r.peak()
        normalized = float(r.normalized()[layer, pos])
        token = f"{pos}:{r.tokens[pos]!r}"
        lines.append(
            f"{kind:<11}{r.window:>6}  {layer:>10}  {token:<20}{score:>8.4f}{normalized:>11.1%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, model_factory: ModelFactory | None = None) -> int:
    """Entry point of the ``lenscope`` command.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
        model_factory: Replaces :func:`lenscope.load_model` (tests inject a tiny model).

    Returns:
        The exit status: 0 on success, 2 on bad input, 1 when a model cannot be
        loaded, a file cannot be written, or lenscope fails (a bug), 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from lenscope.validation import USER_ERRORS

    command = f"lenscope {args.command}"
    try:
        return args.run(args, model_factory)
    except USER_ERRORS as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LENSCOPE_TRACEBACK"):
            raise
        print(
            f"{command}: internal error: {type(e).__name__}: {e}; this is a bug in lenscope "
            "or a problem with the installed libraries, not with your arguments: rerun with "
            "LENSCOPE_TRACEBACK=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
