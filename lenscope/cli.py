"""The ``lenscope`` command line: causal traces (and dataset runs) from a shell.

``lenscope trace PROMPT --subject SUBJECT`` loads a model (the built-in
offline Gemma-3-270m by default), traces the hook-point types ROME's
Figure 1 shows (Meng et al., 2022, arXiv 2202.05262), prints the answer,
the clean and corrupted probabilities and each kind's peak cell, and writes
the side-by-side heatmaps as a self-contained HTML file. User errors exit
with status 2 and a one-line reason, never a traceback.
"""

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PROMPT_HELP = '"The Eiffel Tower is located in the city of"'
ModelFactory = Callable[..., Any]


class _UsageError(Exception):
    """A bad argument found after parsing; reported with exit status 2."""


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
    from lenscope.hooks import KINDS

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lenscope`` command."""
    parser = argparse.ArgumentParser(
        prog="lenscope",
        description="See where a transformer keeps and moves the information behind a "
        "prediction: vectorised causal tracing (ROME) for TransformerLens models.",
    )
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
    _add_model_args(trace)
    trace.add_argument(
        "--kinds",
        type=_kinds_arg,
        default=("resid_post", "mlp_out", "attn_out"),
        help="hook-point types, comma-separated (default resid_post,mlp_out,attn_out; "
        "also resid_pre, resid_mid)",
    )
    trace.add_argument(
        "--window",
        type=positive_int_arg,
        help="layers restored around each cell for every kind (default: 1 for resid_*, "
        "10 for mlp_out/attn_out, as in ROME)",
    )
    trace.add_argument(
        "--samples", type=positive_int_arg, default=10, help="corrupted copies (default 10)"
    )
    trace.add_argument(
        "--noise",
        type=_noise_arg,
        default=("multiplier", 3.0),
        help="noise std: a multiple of the embedding sigma such as 3s (default), "
        "or an absolute number such as 0.5",
    )
    trace.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    trace.add_argument("--answer", help="answer token text (default: the clean top-1 token)")
    trace.add_argument(
        "--out", type=Path, default=Path("trace.html"), help="HTML file (default trace.html)"
    )
    trace.add_argument("--json", type=Path, help="also write the results as JSON")
    trace.add_argument(
        "--batch-size", type=positive_int_arg, help="corrupted copies per forward pass"
    )
    trace.add_argument("--quiet", action="store_true", help="no progress bars")

    from lenscope.datasets import add_dataset_arguments, run_dataset_cli

    dataset = sub.add_parser(
        "dataset",
        help="average causal traces over the ROME known facts and write an HTML report",
        description="Keep the facts the model knows, trace them (resumable with --checkpoint) "
        "and write ROME Figure-2 averages. Example: lenscope dataset --limit 20 --out report.html",
    )
    _add_model_args(dataset)
    add_dataset_arguments(dataset)
    dataset.set_defaults(run=run_dataset_cli)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
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


def _load(args: argparse.Namespace, model_factory: ModelFactory | None) -> Any:
    from lenscope.loading import load_model

    factory = model_factory or load_model
    return factory(args.model, bridge=args.bridge, device=args.device, dtype=args.dtype)


def run_trace(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope trace``; returns the exit status."""
    import lenscope
    from lenscope.plotting import plot_traces, save_html

    subject = args.subject
    if subject is None:
        try:
            subject = lenscope.guess_subject(args.prompt)
        except ValueError as e:
            raise _UsageError(f"{e} (use --subject)") from e
        print(f"guessed subject: {subject!r} (pass --subject to choose)", file=sys.stderr)
    model = _load(args, model_factory)
    tracer = lenscope.CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    mode, value = args.noise
    results = tracer.trace_kinds(
        args.prompt,
        subject,
        kinds=args.kinds,
        windows=args.window,
        samples=args.samples,
        noise=value if mode == "absolute" else None,
        noise_multiplier=value if mode == "multiplier" else None,
        seed=args.seed,
        answer=args.answer,
    )
    print(format_table(results))
    save_html(plot_traces(results), args.out)
    print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps({k: r.to_dict() for k, r in results.items()}))
        print(f"wrote {args.json}")
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
        The exit status: 0 on success, 2 on bad arguments, 1 when a model cannot be loaded.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "trace":
            return run_trace(args, model_factory)
        if args.command == "dataset":
            return args.run(args, model_factory)
    except (_UsageError, ValueError, TypeError) as e:
        print(f"lenscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as e:
        print(f"lenscope {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lenscope {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
