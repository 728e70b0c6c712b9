"""The ``lenscope`` command line: causal traces (and dataset runs) from a shell.

``lenscope trace PROMPT --subject SUBJECT`` loads a model (the built-in
offline Gemma-3-270m by default), traces the hook-point types ROME's
Figure 1 shows (Meng et al., 2022, arXiv 2202.05262), prints the answer,
the clean and corrupted probabilities and each kind's peak cell, and writes
the side-by-side heatmaps as a self-contained HTML file. ``lenscope dataset``
averages traces over ROME's known facts (Figure 2). ``lenscope lens train``
trains a tuned lens (Belrose et al., 2023) on text files and saves it. Both subcommands take the
same trace options (:func:`add_trace_arguments`), checked when the arguments
are parsed. A user error exits with status 2 and a one-line reason; anything
else is a bug or an environment problem: exit 1, with a hint to rerun with
``LENSCOPE_TRACEBACK=1`` for the traceback.

This module is the top layer: it imports everything else, lazily, so that
``--help`` and argument errors come back without loading torch.
"""

import argparse
import contextlib
import functools
import math
import os
import re
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lenscope._version import __version__
from lenscope.names import DEFAULT_KINDS, KINDS, METRIC_NAMES

DEFAULT_PROMPT_HELP = '"The Eiffel Tower is located in the city of"'
# lenscope.settings.POSITION_NAMES, repeated so that parsing needs no torch.
POSITION_NAMES = ("all", "subject", "from_subject", "last")
ModelFactory = Callable[..., Any]
# The noise corruptions, repeated so that parsing needs no torch (tests check that
# they agree); kinds and metrics come from the torch-free lenscope.names.
NOISE_KINDS = ("gaussian", "uniform", "student_t", "multivariate")
DIRECTIONS = ("denoise", "noise")
# lenscope.corruptions.ABLATION_SITES, repeated for the same reason.
ABLATION_KINDS = ("zero", "mean", "resample")
ABLATION_SITES = (*KINDS, "z", "q", "k", "v")


def _corruption_arg(text: str) -> tuple[str, float | None]:
    """The noise of ``--corruption``: gaussian, uniform, t<df>, multivariate (ROME: s, u, t, m)."""
    value = text.strip().lower()
    aliases = {"s": "gaussian", "u": "uniform", "m": "multivariate", "t": "student_t"}
    value = aliases.get(value, value)
    match = re.fullmatch(r"(?:t|student_t:?)(\d+(?:\.\d+)?)", value)
    if match:
        return "student_t", float(match[1])
    if value in NOISE_KINDS:
        return value, None
    raise argparse.ArgumentTypeError(
        f"expected one of gaussian, uniform, t<df> (Student-t, e.g. t3) or multivariate, "
        f"got {text!r}"
    )


def _ablate_arg(text: str) -> tuple[str, str, tuple[int, ...] | None]:
    """``KIND:SITE[@LAYERS]`` of ``--ablate``, e.g. ``zero:mlp_out@2-4`` (no layers: all)."""
    found = re.fullmatch(r"\s*(\w+)\s*:\s*(\w+)\s*(?:@(.+))?", text)
    layers = None
    try:
        if found is None or found[1] not in ABLATION_KINDS or found[2] not in ABLATION_SITES:
            raise ValueError(text)
        if found[3] is not None:
            layers = _index_list(found[3])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected KIND:SITE[@LAYERS] with KIND one of {', '.join(ABLATION_KINDS)} and "
            f"SITE one of {', '.join(ABLATION_SITES)}, got {text!r}; pass e.g. "
            "--ablate zero:mlp_out@2-4 (layers 2 to 4; without @ every layer)"
        ) from None
    return found[1], found[2], layers


def _metric_arg(text: str) -> str:
    if text not in METRIC_NAMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(METRIC_NAMES)}, got {text!r}")
    return text


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
        example = "3s" if multiple else "0.5"
        raise argparse.ArgumentTypeError(
            f"noise must be a finite number >= 0 (a multiple of sigma such as 3s, or an "
            f"absolute std such as 0.5), got {text!r}; pass e.g. --noise {example}"
        )
    return ("multiplier" if multiple else "absolute"), parsed


def _kinds_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"kinds must be a comma-separated list of {','.join(KINDS)}, got {text!r}"
        )
    return kinds


def _index_list(text: str) -> tuple[int, ...]:
    """``"0-9"``, ``"0,3,5"``, ``"4"`` or a mix such as ``"0-3,7"``: distinct integers >= 0."""
    values: list[int] = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None:
            raise ValueError(part)
        low = int(found[1])
        high = low if found[2] is None else int(found[2])
        if high < low:
            raise ValueError(part)
        values.extend(range(low, high + 1))
    if len(set(values)) != len(values):
        raise ValueError(text)
    return tuple(values)


def _layers_arg(text: str) -> tuple[int, ...]:
    try:
        return _index_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer numbers such as 0-9 (both ends included), 0,3,5 or 4, got {text!r}"
        ) from None


def _positions_arg(text: str) -> str | tuple[int | str, ...]:
    """A position name, or ranges and positions such as ``2-6``, ``3,4,5``, ``-1``, ``0,last``.

    Negative positions count from the end (``-1`` and ``last``: the last token);
    they are resolved against the prompt, by :class:`lenscope.TraceSettings`.
    """
    if text.strip() in POSITION_NAMES:
        return text.strip()
    parts = [part.strip() for part in text.split(",")]
    counted: list[int | str] = []
    try:
        for part in parts:
            if part == "last":
                counted.append(part)
            elif re.fullmatch(r"-\d+", part):
                counted.append(int(part))
            else:
                counted.extend(_index_list(part))
        if len(set(counted)) != len(counted):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(POSITION_NAMES)} or token positions such as 2-6 (both ends "
            f"included), 3,4,5 or -1 (counted from the end, as last), got {text!r}; pass e.g. "
            "--positions 2-6"
        ) from None
    return tuple(counted)


def _dtype_arg(text: str) -> str:
    """A precision a model can run in, checked without importing torch."""
    from lenscope.validation import InvalidInput, model_dtype_name

    try:
        return model_dtype_name(text)
    except InvalidInput as e:
        raise argparse.ArgumentTypeError(cli_wording(str(e))) from None


def _minutes_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return value


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
        help="built in, offline: gemma-3-270m (default) or smollm2-135m; a local folder saved "
        "with save_pretrained or a .gguf file (offline; ~ is expanded); or a Hugging Face "
        "name TransformerLens knows, such as gpt2-xl (needs the hub or its local cache)",
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
    parser.add_argument(
        "--dtype", type=_dtype_arg, help="float32 (default), bfloat16, float16 or float64"
    )
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
        "--corruption",
        type=_corruption_arg,
        default=("gaussian", None),
        help="the noise added to the subject's embeddings (ROME's causal_trace.py): gaussian "
        "(default), uniform, t<df> (Student-t with df > 2 degrees of freedom, e.g. t3; all "
        "scaled to the --noise std), or multivariate (the Gaussian fitted to the subject "
        "embeddings; --noise does not apply)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace the subject's embeddings with the noise instead of adding it",
    )
    parser.add_argument(
        "--ablate",
        type=_ablate_arg,
        metavar="KIND:SITE[@LAYERS]",
        help="corrupt by ablating a site at the subject's tokens instead of adding noise: "
        f"KIND {'/'.join(ABLATION_KINDS)}, SITE {','.join(ABLATION_SITES)} (per-head sites: "
        "every head), LAYERS such as 2-4 or 1,3 (default: every layer); e.g. "
        "zero:mlp_out@2-4. mean averages over the --ablate-from prompts, resample takes "
        "their activations (one sample each); the noise flags do not apply",
    )
    parser.add_argument(
        "--ablate-from",
        action="append",
        metavar="PROMPT",
        help="a prompt for --ablate mean (averaged over) or resample (as many tokens as the "
        "traced prompt); repeat for several",
    )
    add_patch_arguments(parser)
    parser.add_argument(
        "--batch-size", type=positive_int_arg, help="corrupted copies per forward pass"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def add_patch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--metric``, ``--foil`` and ``--direction``, shared by every command that patches."""
    parser.add_argument(
        "--metric",
        type=_metric_arg,
        help=f"what is measured: {', '.join(METRIC_NAMES)} (default: prob with noise, as in "
        "ROME; normalized_logit_diff with a counterfactual prompt)",
    )
    parser.add_argument(
        "--foil",
        help="the competing answer of the logit-difference metrics, e.g. ' Rome' (default: "
        "the counterfactual prompt's top-1 token)",
    )
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="denoise",
        help="denoise: restore clean activations into the corrupted run (causal tracing, "
        "default); noise: patch corrupted activations into the clean run",
    )
    return parser


def add_cell_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--layers`` and ``--positions``: which cells ``lenscope trace`` restores.

    Fewer cells, a shorter trace. ``lenscope dataset`` has neither: its
    averages need every layer, and the positions from the subject on.
    """
    parser.add_argument(
        "--layers",
        type=_layers_arg,
        help="layers to trace: a range such as 0-9 (both ends included), a list such as "
        "0,3,5, or one layer (default: all)",
    )
    parser.add_argument(
        "--positions",
        type=_positions_arg,
        help="token positions to trace: all (default), subject, from_subject (the subject's "
        "first token to the last), last, a range such as 2-6 or a list such as 3,4,5; "
        "negative positions count from the end (-1: the last token, -2,-1: the last two)",
    )
    return parser


def trace_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`lenscope.TraceSettings` options of the trace flags.

    Those of :func:`add_trace_arguments`, and of :func:`add_cell_arguments`
    where the subcommand has them.
    """
    from lenscope import corruptions

    mode, value = args.noise
    kind, df = args.corruption
    if kind == "multivariate":
        corruption: Any = corruptions.MultivariateGaussianNoise(
            samples=args.samples, seed=args.seed, replace=args.replace
        )
    else:
        cls = {
            "gaussian": corruptions.GaussianNoise,
            "uniform": corruptions.UniformNoise,
            "student_t": corruptions.StudentTNoise,
        }[kind]
        extra = {"df": df} if df is not None else {}
        corruption = cls(
            samples=args.samples,
            noise=value if mode == "absolute" else None,
            noise_multiplier=value if mode == "multiplier" else 3.0,
            seed=args.seed,
            replace=args.replace,
            **extra,
        )
    if args.ablate is not None:
        corruption = _ablation(args.ablate, args.ablate_from)
    elif args.ablate_from:
        from lenscope.validation import InvalidInput

        raise InvalidInput(
            "--ablate-from gives the prompts of --ablate mean or resample, got it without "
            "--ablate; pass e.g. --ablate mean:mlp_out@2 --ablate-from 'The Colosseum is in'"
        )
    options = {
        "kinds": args.kinds,
        "windows": args.window,
        "corruption": corruption,
        **patch_options(args),
    }
    for name in ("layers", "positions"):
        if name in args:
            options[name] = getattr(args, name)
    return options


def _ablation(spec: tuple[str, str, tuple[int, ...] | None], prompts: list[str] | None) -> Any:
    """The :class:`lenscope.corruptions.SiteAblation` of ``--ablate`` and ``--ablate-from``."""
    from lenscope import corruptions
    from lenscope.validation import InvalidInput

    kind, site, layers = spec
    if kind != "zero" and not prompts:
        what = "averages over" if kind == "mean" else "takes the activations of"
        raise InvalidInput(
            f"--ablate {kind} {what} other prompts, got no --ablate-from; pass e.g. "
            "--ablate-from 'The Space Needle is located in the city of' (repeat for several)"
        )
    if kind == "zero":
        if prompts:
            raise InvalidInput(
                "--ablate zero sets the site to zero and takes no --ablate-from prompts, got "
                f"{len(prompts)}; drop --ablate-from, or pass --ablate mean:... or resample:..."
            )
        return corruptions.ZeroAblation(site, layers=layers)
    if kind == "mean":
        return corruptions.MeanAblation(site, layers=layers, prompts=prompts)
    return corruptions.ResampleAblation(site, layers=layers, source=prompts)


def patch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`lenscope.TraceSettings` options of :func:`add_patch_arguments`."""
    return {"metric": args.metric, "foil": args.foil, "direction": args.direction}


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
        "--answers",
        choices=("top1", "attribute"),
        default="top1",
        help="score each fact's clean top-1 token (default, as in ROME) or its whole attribute "
        "(teacher-forced; the filter then asks for the whole attribute by greedy decoding)",
    )
    parser.add_argument(
        "--out",
        type=output_path,
        default=Path("report.html"),
        help="HTML report (default report.html)",
    )
    parser.add_argument(
        "--summary", type=output_path, default=None, help="also save the DatasetSummary as JSON"
    )
    parser.add_argument(
        "--checkpoint",
        type=output_path,
        default=None,
        help="JSONL checkpoint, written as each fact finishes; rerun with the same file to resume",
    )
    parser.add_argument(
        "--counterfactuals",
        action="store_true",
        help="trace each fact against a counterfactual prompt (symmetric token replacement): "
        "its prompt with the subject of another fact of the same relation, another attribute "
        "and the same token length; facts without such a partner are left out",
    )
    parser.add_argument(
        "--minutes",
        type=_minutes_arg,
        default=None,
        help="stop starting new facts after this many minutes",
    )
    parser.add_argument(
        "--prompts-per-batch",
        type=positive_int_arg,
        default=None,
        help="facts of one token length traced together in the same forward passes "
        "(default: 8 on CUDA where the metric allows it, prob or log_prob; else 1, one at a "
        "time: a CPU gains nothing from it)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int_arg,
        default=None,
        help="trace on N Ray workers, each loading its own copy of the model "
        '(needs pip install "lenscope[ray]"; default: in this process)',
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=_gpus_arg,
        default=None,
        help="GPUs Ray reserves for each worker (fractions share one); workers with GPUs "
        "load the model on cuda, others on cpu (default 0)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join: auto (started with ray start --head on this machine) or "
        "ray://HOST:10001 (default: a local Ray on this machine)",
    )
    add_trace_arguments(parser)
    return parser


def _gpus_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of GPUs >= 0, got {text!r}")
    return value


def dataset_executor(args: argparse.Namespace, model_factory: ModelFactory | None) -> Any:
    """The executor ``--workers``, ``--gpus-per-worker`` and ``--ray-address`` ask for.

    Checked before the model loads: worker options without ``--workers`` are
    refused, and a missing Ray is reported with the extra that installs it.

    Returns:
        ``None`` (trace in this process) or a :class:`lenscope.RayExecutor`.
    """
    from lenscope.validation import InvalidInput

    gpus, address = getattr(args, "gpus_per_worker", None), getattr(args, "ray_address", None)
    if getattr(args, "workers", None) is None:
        if gpus is not None or address is not None:
            raise InvalidInput(
                "--gpus-per-worker and --ray-address need --workers N (the number of Ray "
                f"workers), got --gpus-per-worker {gpus} and --ray-address {address} without "
                "it; add e.g. --workers 2"
            )
        return None
    from lenscope.datasets.executors import RayExecutor

    factory = None
    if model_factory is not None:  # the loader a test injected, called on each worker
        factory = functools.partial(
            model_factory,
            args.model,
            bridge=args.bridge,
            device="cuda" if gpus else "cpu",
            dtype=args.dtype,
        )
    return RayExecutor(
        num_workers=args.workers,
        num_gpus_per_worker=gpus or 0,
        address=address,
        model_factory=factory,
    )


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, and whose options take negative values.

    An error is ``lenscope trace: error: <reason>; <fix>`` and exit status 2,
    without argparse's usage block (``--help`` prints it). A value that starts
    with ``-`` and a digit (``--noise -3s``, ``--positions -2,-1``) is the
    option's value, not an option, so that lenscope's own checks explain it.
    Subcommand parsers are of this class too.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse's, after joining ``--option -value`` into ``--option=-value``."""
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(_attach_negative_values(self, args), namespace)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's; unknown arguments are reported by the subcommand they were given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            words = [getattr(parsed, name, None) for name in ("command", "lens_command")]
            prog = " ".join([self.prog, *(w for w in words if w)])
            self.error(f"unrecognized arguments: {' '.join(extras)}", prog=prog)
        return parsed

    def error(self, message: str, *, prog: str | None = None) -> Any:  # type: ignore[override]
        """Print ``<prog>: error: <message>; <fix>`` on one line and exit with status 2."""
        prog = prog or self.prog
        fix = "" if "; " in message else f"; run '{prog} --help' for the options"
        self.exit(2, f"{prog}: error: {message}{fix}\n")


_NEGATIVE_VALUE = re.compile(r"-\.?\d")


def _attach_negative_values(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with ``--opt -3s`` as ``--opt=-3s``, for options of ``parser`` taking one value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        action = parser._option_string_actions.get(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if (
            action is not None
            and action.nargs is None
            and action.option_strings
            and following is not None
            and _NEGATIVE_VALUE.match(following)
            and following not in parser._option_string_actions
        ):
            out.append(f"{arg}={following}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def output_path(text: str) -> Path:
    """An argparse type: an output file (or folder) whose parent folder exists.

    A mistyped folder is refused at parse time, before any model loads,
    rather than created: ``--out no/such/dir/x.html`` names the folder and
    says to create it first.
    """
    path = Path(text)
    folder = path.parent
    if not folder.exists():
        raise argparse.ArgumentTypeError(
            f"the folder {str(folder)!r} of {text!r} does not exist (lenscope creates no "
            f"folders); create it first (mkdir -p {shlex.quote(str(folder))}), or pass a path "
            "in an existing folder"
        )
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"{str(folder)!r} of {text!r} is a file, not a folder; pass a path in a folder"
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lenscope`` command."""
    parser = Parser(
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
    add_cell_arguments(trace)
    trace.add_argument(
        "--answer",
        help="the answer's text, one token or several (e.g. ' New York City': the whole "
        "answer is scored, teacher-forced); default: the clean top-1 token",
    )
    trace.add_argument(
        "--out", type=output_path, default=Path("trace.html"), help="HTML file (default trace.html)"
    )
    trace.add_argument("--json", type=output_path, help="also write the results as JSON")
    trace.add_argument(
        "--method",
        choices=("exact", "attribution"),
        default="exact",
        help="exact: one restored run per cell (default); attribution: every cell estimated "
        "at once by attribution patching, one forward and one backward pass "
        "(docs/attribution.md says where it can be trusted)",
    )
    trace.add_argument(
        "--estimator",
        default="atp",
        help="with --method attribution: atp (default: the gradient at the corrupted run), "
        "relp (relevance patching: AtP with LRP rules in the backward pass, same cost), "
        "atp-star (AtP*: GradDrop, and the QK fix for q/k heads), "
        "ig:M (integrated gradients, M points on the path of each window's layers), ig:M:layer, "
        "or atp:window (AtP of each window restored as one joint patch)",
    )
    trace.add_argument(
        "--target",
        choices=("metric", "log_prob", "logit_diff"),
        default="metric",
        help="with --method attribution: what the estimator differentiates: the trace's metric "
        "(default), the answer's log-probability, or its logit minus the foil's (--foil; a "
        "counterfactual's top token by default), converted to the metric's scale",
    )
    trace.set_defaults(run=run_trace)

    patch = sub.add_parser(
        "patch",
        help="activation patching between a prompt and a counterfactual of the same length",
        description="Symmetric token replacement (Zhang & Nanda 2023): run CLEAN and "
        "COUNTERFACTUAL, patch each (layer, token) cell of one into the other, and report "
        "the normalised logit difference of CLEAN's answer against COUNTERFACTUAL's. "
        'Example: lenscope patch "The Eiffel Tower is located in the city of" '
        '"The Colosseum is located in the city of" --out patch.html',
    )
    patch.add_argument("clean", help="the prompt whose answer is measured")
    patch.add_argument(
        "counterfactual", help="the same prompt with other tokens, as many as the clean one has"
    )
    add_model_arguments(patch)
    patch.add_argument(
        "--kinds",
        type=_kinds_arg,
        default=("resid_pre", "attn_out", "mlp_out"),
        help="hook-point types, comma-separated (default resid_pre,attn_out,mlp_out)",
    )
    patch.add_argument(
        "--window",
        type=positive_int_arg,
        default=1,
        help="layers patched around each cell (default 1)",
    )
    add_patch_arguments(patch)
    add_cell_arguments(patch)
    patch.add_argument(
        "--answer",
        help="the answer's text, one token or several (teacher-forced); default: the clean "
        "top-1 token",
    )
    patch.add_argument(
        "--batch-size", type=positive_int_arg, help="corrupted copies per forward pass"
    )
    patch.add_argument("--quiet", action="store_true", help="no progress bars")
    patch.add_argument(
        "--out", type=output_path, default=Path("patch.html"), help="HTML file (default patch.html)"
    )
    patch.add_argument("--json", type=output_path, help="also write the results as JSON")
    patch.set_defaults(run=run_patch)

    dataset = sub.add_parser(
        "dataset",
        help="average causal traces over the ROME known facts and write an HTML report",
        description="Keep the facts the model knows, trace them (resumable with --checkpoint) "
        "and write ROME Figure-2 averages. Example: lenscope dataset --limit 20 --out report.html",
    )
    add_dataset_arguments(dataset, model_arguments=True)
    dataset.set_defaults(run=run_dataset)

    lens = sub.add_parser(
        "lens",
        help="train a tuned lens (Belrose et al., 2023) and compare it with the logit lens",
        description="Tuned lenses: affine translators per layer, trained so that decoding "
        "each layer matches the model's output. Example: lenscope lens train --texts "
        "corpus.txt --out gemma.lens",
    )
    lens_sub = lens.add_subparsers(dest="lens_command", metavar="LENS_COMMAND", required=True)
    train = lens_sub.add_parser(
        "train",
        help="train a tuned lens on text files and save it (tuned-lens's format)",
        description="Train a tuned lens on the texts (SGD with Nesterov momentum, KL to the "
        "model's output, the paper's schedule), showing a progress bar with the loss and the "
        "time left, and save it as a folder (config.json + params.pt, readable by the "
        "tuned-lens package). With --held-out, print the per-layer KL of the tuned and the "
        "logit lens on those texts. Example: lenscope lens train --texts corpus.txt --out "
        "gemma.lens --steps 50 --tokens-per-step 4096 --seq-len 256",
    )
    train.add_argument(
        "--texts",
        type=Path,
        nargs="+",
        required=True,
        help="UTF-8 text files to train on (each file one document)",
    )
    train.add_argument(
        "--out", type=output_path, required=True, help="folder to save the lens to (created)"
    )
    add_model_arguments(train)
    train.add_argument("--steps", type=positive_int_arg, default=250, help="steps (default 250)")
    train.add_argument(
        "--tokens-per-step",
        type=positive_int_arg,
        default=2**18,
        help="tokens per step (default 262144, the paper's)",
    )
    train.add_argument(
        "--seq-len", type=positive_int_arg, default=2048, help="tokens per sequence (default 2048)"
    )
    train.add_argument(
        "--batch-size", type=positive_int_arg, default=1, help="sequences per forward pass"
    )
    train.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd (the paper's: Nesterov momentum; default) or adam",
    )
    train.add_argument(
        "--lr", type=float, help="learning rate (default 1.0 for sgd, the paper's; 1e-3 for adam)"
    )
    train.add_argument("--seed", type=int, default=0, help="shuffles the sequences (default 0)")
    train.add_argument(
        "--checkpoint",
        type=output_path,
        help="file to save progress to every 10 steps; an existing one is resumed",
    )
    train.add_argument(
        "--held-out", type=Path, nargs="+", help="text files to evaluate the lens on afterwards"
    )
    train.add_argument(
        "--eval-tokens",
        type=positive_int_arg,
        default=8192,
        help="held-out tokens to evaluate (default 8192)",
    )
    train.add_argument("--json", type=output_path, help="write the held-out evaluation as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run_lens_train)
    for writes_html in (trace, patch, dataset):
        writes_html.add_argument(
            "--plotly-js",
            choices=("inline", "file", "cdn"),
            default="inline",
            help="where the HTML page gets plotly.js: inline (default; about 4.7 MB, works "
            "offline), file (a sibling plotly-<version>.min.js shared by the pages in that "
            "folder) or cdn (needs a network to view)",
        )
    return parser


def run_lens_train(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """``lenscope lens train``: train, save, and optionally evaluate on held-out texts."""
    from lenscope.validation import InvalidInput

    for path in [*args.texts, *(args.held_out or [])]:
        if not path.is_file():
            raise InvalidInput(
                f"--texts and --held-out take text files, got {str(path)!r}, which is not a "
                "file; pass e.g. --texts corpus.txt"
            )
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInput(
            f"--out must name a folder (a lens is config.json + params.pt), got {str(args.out)!r}, "
            "which is a file; pass e.g. --out gemma.lens"
        )
    check_outputs([("--json", args.json), ("--checkpoint", args.checkpoint)])
    from lenscope.tuned_lens import TunedLens

    model = _load(args, model_factory)
    lens = TunedLens.train(
        model,
        list(args.texts),
        steps=args.steps,
        tokens_per_step=args.tokens_per_step,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        checkpoint=args.checkpoint,
        progress=not args.quiet,
    )
    lens.save(args.out)
    info = lens.training
    print(
        f"trained a tuned lens of {lens.model_name} on {info['tokens']:,} tokens "
        f"({info['steps']} steps) in {info['seconds']:.1f} s; final loss "
        f"{info['loss'][-1]:.4f} nats summed over {lens.n_layers} layers; saved to {args.out}"
    )
    if args.held_out:
        report = lens.evaluate(
            model,
            list(args.held_out),
            seq_len=args.seq_len,
            max_tokens=args.eval_tokens,
            batch_size=args.batch_size,
            corpus=", ".join(p.name for p in args.held_out),
        )
        print(f"held-out: {report.tokens:,} tokens")
        print(report.to_markdown())
        if args.json:
            report.save(args.json)
    return 0


def _load(args: argparse.Namespace, model_factory: ModelFactory | None) -> Any:
    from lenscope.loading import progress_bars

    if model_factory is None:
        from lenscope.loading import load_model

        model_factory = load_model
    # --quiet silences transformers' own bars ("Loading weights") too.
    with progress_bars(not getattr(args, "quiet", False)):
        return model_factory(
            args.model,
            bridge=getattr(args, "bridge", None),
            device=getattr(args, "device", None),
            dtype=getattr(args, "dtype", None),
        )


def check_outputs(outputs: Sequence[tuple[str, Path | None]]) -> None:
    """Check that every output file can be written, before anything is loaded or traced.

    Missing parent folders are refused when the arguments are parsed
    (:func:`output_path`), never created. A file that does not exist yet is
    created and removed again; one that exists is opened for appending and
    left unchanged.

    Args:
        outputs: ``(flag, path)`` pairs, e.g. ``("--json", Path("t.json"))``;
            None paths (flags not given) are skipped.

    Raises:
        InvalidInput: A path is a directory, two flags name the same file, or
            a file cannot be created there; the message names the flag, the
            path, the reason and a fix.
    """
    from lenscope.validation import InvalidInput

    seen: dict[Path, str] = {}
    for flag, path in outputs:
        if path is None:
            continue
        if path.is_dir():
            suffix = {"--json": ".json", "--summary": ".json", "--checkpoint": ".jsonl"}
            raise InvalidInput(
                f"{flag} must name a file, got {str(path)!r}, which is a folder; pass e.g. "
                f"{flag} {path / ('lenscope' + suffix.get(flag, '.html'))}"
            )
        resolved = path.resolve()
        if resolved in seen:
            raise InvalidInput(
                f"{seen[resolved]} and {flag} must name different files, got {str(path)!r} "
                "for both; pass another path to one of them"
            )
        seen[resolved] = flag
        reason = _unwritable(path)
        if reason is not None:
            raise InvalidInput(
                f"{flag} must name a file lenscope can write, got {str(path)!r}: {reason}; "
                f"pass {flag} a file in a folder you can write to, e.g. {flag} {path.name}"
            )


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or None once its folder exists and a file opens there."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{str(folder)!r} is a file, not a folder"
    if folder != path.parent:
        return f"the folder {str(path.parent)!r} does not exist; create it first"
    existed = path.exists()
    try:
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        verb = "open" if existed else "create"
        return f"cannot {verb} a file in {str(path.parent)!r} ({e.strerror or e})"
    return None


def _keep(save: Callable[[Path], object], stem: str) -> Path | None:
    """Save results that could not go where asked: the current folder, else the temp folder."""
    for folder in (os.curdir, tempfile.gettempdir()):
        try:
            handle, name = tempfile.mkstemp(prefix=f"lenscope-{stem}-", suffix=".json", dir=folder)
        except OSError:
            continue
        os.close(handle)
        path = Path(name).resolve()
        try:
            save(path)
            return path
        except OSError:
            path.unlink(missing_ok=True)
    return None


def _not_written(target: str, error: OSError, kept: Path | None, what: str) -> OSError:
    """The error of an output written at the end of a run, saying where the results went.

    ``what`` names the results with their verb and how to read them back,
    e.g. ``"the results are kept in {} (the format of --json)"``.
    """
    if kept is None:
        where = (
            f"{what.split(' kept in ')[0]} not kept anywhere else either (writing in "
            f"{os.getcwd()!r} and {tempfile.gettempdir()!r} failed too)"
        )
    else:
        where = what.format(repr(str(kept)))
    reason = error.strerror or str(error)
    return OSError(
        f"could not write {target}: {reason}; {where}; free some space or pass another path "
        "and run again"
    )


def _check_before_loading(args: argparse.Namespace, subject: str) -> None:
    """Refuse, before the model loads, a subject absent from the prompt.

    The test is on text alone (case-insensitive, so that no tokenizer could
    find it either); the tracer checks it again, exactly, once the model is
    loaded. Answers of any length are taken by every method (teacher forcing),
    so an answer needs no check here.
    """
    from lenscope.validation import InvalidInput

    if subject.strip().lower() not in args.prompt.lower():
        raise InvalidInput(
            f"subject {subject!r} must occur in the prompt {args.prompt!r}; check spelling, "
            "or pass --subject with text copied from the prompt"
        )


def run_patch(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope patch``; returns the exit status."""
    check_outputs([("--out", args.out), ("--json", args.json)])
    import lenscope

    model = _load(args, model_factory)
    tracer = lenscope.CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    with _partial_results_kept(args):
        results = tracer.trace_kinds(
            args.clean,
            corruption=lenscope.CounterfactualPrompt(args.counterfactual),
            kinds=args.kinds,
            windows=args.window,
            answer=args.answer,
            layers=args.layers,
            positions=args.positions,
            **patch_options(args),
        )
    return _report(args, results, "patch")


def run_trace(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope trace``; returns the exit status.

    The output files are checked before the model is loaded
    (:func:`check_outputs`). If one still cannot be written at the end, the
    results are saved as JSON in the current (else the temp) folder, and the
    error says where.
    """
    check_outputs([("--out", args.out), ("--json", args.json)])
    import lenscope

    subject = args.subject
    if subject is None:
        subject = lenscope.guess_subject(args.prompt)
        print(f"guessed subject: {subject!r} (pass --subject to choose)", file=sys.stderr)
    _check_before_loading(args, subject)
    from lenscope.attribution import estimator_from_name
    from lenscope.validation import InvalidInput

    estimator = getattr(args, "estimator", "atp")
    target = getattr(args, "target", "metric")
    if estimator != "atp" and getattr(args, "method", "exact") != "attribution":
        raise InvalidInput(
            f"--estimator chooses how attribution estimates cells, got --estimator {estimator} "
            "without --method attribution; add --method attribution, or leave --estimator out"
        )
    if target != "metric" and getattr(args, "method", "exact") != "attribution":
        raise InvalidInput(
            f"--target chooses what attribution differentiates, got --target {target} "
            "without --method attribution; add --method attribution, or leave --target out"
        )
    estimator_from_name(estimator)  # a bad name is refused before the model loads
    model = _load(args, model_factory)
    tracer = lenscope.CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    if getattr(args, "method", "exact") == "attribution":
        results = tracer.attribute(
            args.prompt,
            subject,
            answer=args.answer,
            estimator=estimator,
            target=target,
            **trace_options(args),
        )
        passes = next(iter(results.values())).passes
        print(
            f"attribution patching: {passes['clean_forward']} clean forward pass, "
            f"{passes['corrupted_forward']} forward and {passes['corrupted_backward']} backward "
            f"pass of {passes['corrupted_rows']} corrupted copies, for all kinds",
            file=sys.stderr,
        )
        return _report(args, results, "trace")
    with _partial_results_kept(args):
        results = tracer.trace_kinds(
            args.prompt, subject, answer=args.answer, **trace_options(args)
        )
    return _report(args, results, "trace")


def partial_path(args: argparse.Namespace) -> Path:
    """Where an interrupted command keeps what finished.

    ``--json`` (``--summary`` for a dataset) if given, else beside ``--out``
    (``trace.html`` -> ``trace.partial.json``).
    """
    given = getattr(args, "json", None) or getattr(args, "summary", None)
    return given if given is not None else args.out.with_name(f"{args.out.stem}.partial.json")


@contextlib.contextmanager
def _partial_results_kept(args: argparse.Namespace) -> Iterator[None]:
    """On Ctrl-C (:class:`lenscope.TraceInterrupted`), save what finished as JSON and say where.

    Re-raised as a ``KeyboardInterrupt`` whose message :func:`main` prints
    (exit status 130): how many parts finished and the file that holds them,
    in the format of ``--json`` (a trace's kinds) or ``--summary`` (a dataset's
    facts, :meth:`lenscope.DatasetSummary.load`).
    """
    from lenscope.results import TraceInterrupted, write_json

    try:
        yield
    except TraceInterrupted as e:
        results, parts = e.results, "facts" if hasattr(e.results, "n_pending") else "kinds"
        done = f"{e.finished} of {e.total} {parts} finished"
        if not e.finished:
            raise KeyboardInterrupt(f"{done}; nothing to keep") from None
        if parts == "facts":
            save, how = results.save, "DatasetSummary.load reads it"
        else:
            save, how = (
                lambda path: write_json({k: r.to_dict() for k, r in results.items()}, path),
                "in the format of --json",
            )
        path = partial_path(args)
        try:
            save(path)
        except OSError:
            path = _keep(save, "partial")
        if path is None:
            raise KeyboardInterrupt(f"{done}; they could not be saved anywhere") from None
        raise KeyboardInterrupt(f"{done}; they are saved in {str(path)!r} ({how})") from None


def _report(args: argparse.Namespace, results: dict[str, Any], stem: str) -> int:
    """Print the table, write the heatmaps (``--out``) and the JSON (``--json``)."""
    from lenscope.plotting import plot_traces, save_html
    from lenscope.results import write_json

    print(format_table(results))

    def save_json(path: Path) -> None:
        write_json({k: r.to_dict() for k, r in results.items()}, path)

    target = f"--out {str(args.out)!r}"
    try:
        save_html(plot_traces(results), args.out, plotly_js=getattr(args, "plotly_js", "inline"))
        print(f"wrote {args.out}")
        if args.json:
            target = f"--json {str(args.json)!r}"
            save_json(args.json)
            print(f"wrote {args.json}")
    except OSError as e:
        kept = _keep(save_json, stem)
        what = "the results are kept in {} (in the format of --json)"
        raise _not_written(target, e, kept, what) from e
    return 0


def run_dataset(args: argparse.Namespace, model_factory: ModelFactory | None = None) -> int:
    """Run ``lenscope dataset``: filter the known facts, trace them, write an HTML report.

    Prints the per-kind table (:meth:`DatasetSummary.table`) on stdout. The
    output files are checked before the model is loaded, and a checkpoint
    written under other settings is refused before the known-fact filter
    runs. If the report or summary still cannot be written at the end, the
    summary is saved as JSON in the current (else the temp) folder, and the
    error says where.

    Args:
        args: Options from :func:`add_dataset_arguments` with ``model_arguments=True``.
        model_factory: Replaces :func:`lenscope.loading.load_model`, called as
            ``model_factory(name, bridge=..., device=..., dtype=...)``.

    Returns:
        The exit status, 0.
    """
    executor = dataset_executor(args, model_factory)
    check_outputs(
        [("--out", args.out), ("--summary", args.summary), ("--checkpoint", args.checkpoint)]
    )
    from lenscope.datasets import filter_known, known_facts, load_facts, trace_dataset
    from lenscope.datasets.checkpoint import Checkpoint
    from lenscope.datasets.executors import workers_line
    from lenscope.datasets.run import dataset_header, dataset_settings
    from lenscope.hooks import model_name
    from lenscope.plotting.dataset import save_dataset_report
    from lenscope.tracer import CausalTracer

    model = _load(args, model_factory)
    tracer = CausalTracer(model, batch_size=args.batch_size, progress=not args.quiet)
    options = trace_options(args)
    if args.counterfactuals:
        from lenscope.corruptions import CounterfactualColumn

        options["corruption"] = CounterfactualColumn()
    settings = dataset_settings(tracer, **options)
    answers = getattr(args, "answers", "top1")
    if args.checkpoint is not None:
        header = dataset_header(tracer, settings)
        Checkpoint.check(
            args.checkpoint, header if answers == "top1" else {**header, "answers": answers}
        )
    facts = load_facts(args.facts) if args.facts else known_facts()
    if args.no_filter:
        chosen = facts[: args.limit] if args.limit else facts
    else:
        by = "attribute" if answers == "attribute" else "first_token"
        chosen = filter_known(tracer, facts, limit=args.limit, by=by)
        print(f"{len(chosen)} facts known to {model_name(model)} selected", file=sys.stderr)
    if args.counterfactuals:
        from lenscope.datasets import pair_counterfactuals

        pairs = pair_counterfactuals(model, chosen)
        print(
            f"{len(pairs.facts)} of {pairs.n_facts} facts paired with a counterfactual of the "
            "same relation and token length",
            file=sys.stderr,
        )
        chosen = pairs.facts
    with _partial_results_kept(args):
        summary = trace_dataset(
            tracer,
            chosen,
            settings,
            checkpoint=args.checkpoint,
            max_seconds=None if args.minutes is None else args.minutes * 60,
            executor=executor,
            prompts_per_batch=args.prompts_per_batch,
            answers=answers,
        )
    print(summary.table().to_string(index=False))
    if executor is not None and summary.workers:
        print(workers_line(summary.workers), file=sys.stderr)
    target = f"--out {str(args.out)!r}"
    try:
        path = save_dataset_report(
            summary, args.out, plotly_js=getattr(args, "plotly_js", "inline")
        )
        if args.summary:
            target = f"--summary {str(args.summary)!r}"
            summary.save(args.summary)
    except OSError as e:
        kept = _keep(summary.save, "dataset")
        what = "the summary is kept in {} (DatasetSummary.load reads it)"
        raise _not_written(target, e, kept, what) from e
    print(
        f"{summary.n_facts} facts traced, {summary.n_skipped} skipped, {summary.n_pending} "
        f"not reached; report written to {path}",
        file=sys.stderr,
    )
    return 0


def format_table(results: dict[str, Any]) -> str:
    """The summary the command prints: answer, clean/corrupted scores, peak cell per kind."""
    from lenscope.results import corruption_text

    first = next(iter(results.values()))
    start, end = first.subject_range
    corrupted = corruption_text(first.corruption, limit=200)
    if first.foil is not None:
        corrupted += f"; foil {first.foil!r}"
    if first.direction != "denoise":
        corrupted += f"; direction {first.direction}"
    lines = [
        f"model      {first.model_name}",
        f"subject    {''.join(first.tokens[start:end])!r} (tokens {start}..{end - 1})",
        f"answer     {first.answer!r}",
        f"clean      {first.metric} = {first.clean_score:.4f}",
        f"corrupted  {first.metric} = {first.corrupted_score:.4f}   by {corrupted}",
        *_split_lines(first),
        "",
        f"{'kind':<11}{'window':>6}  {'peak layer':>10}  {'peak token':<20}{'score':>8}"
        f"{'normalized':>12}",
    ]
    for kind, r in results.items():
        *cell, score = r.peak()
        layer, normalized = cell[0], float(r.normalized()[tuple(cell)])
        token = ", ".join(
            f"{i}:{r.tokens[i]!r}" if axis == "pos" else f"{axis} {i}"
            for axis, i in zip(r.axes[1:], cell[1:], strict=True)
        )
        lines.append(
            f"{kind:<11}{r.window:>6}  {layer:>10}  {token:<20}{score:>8.4f}{normalized:>11.1%}"
        )
    return "\n".join(lines)


def _split_lines(result: Any) -> list[str]:
    """The per-token split of an answer of several tokens (per member, of an answer set).

    Each token's log-probability in the clean run, the corrupted run and
    (for an exact trace) the restored run of the first kind's peak cell: which
    token the restoration brings back. Nothing for a one-token answer.
    """
    from lenscope.results import short_text

    split = result.answer_split
    if split is None:
        return []
    unit = "member" if split.get("members") is not None else "token"
    header = f"{'per ' + unit:<11}{'':<22}{'log p clean':>12}{'corrupted':>11}"
    columns = [split["clean_log_probs"].tolist(), split["corrupted_log_probs"].tolist()]
    if split.get("log_probs") is not None:  # an exact trace's cells (not an estimate's)
        *cell, _ = result.peak()
        where = ", ".join(f"{axis} {i}" for axis, i in zip(result.axes, cell, strict=True))
        header += f"{'restored':>10}   (restored: {result.kind} peak, {where})"
        columns.append(split["log_probs"][tuple(cell)].tolist())
    lines = [header]
    for label, *values in zip(split["answer_tokens"], *columns, strict=True):
        widths = (12, 11, 10)
        numbers = "".join(f"{v:>{w}.4f}" for v, w in zip(values, widths, strict=False))
        lines.append(f"{'':<11}{short_text(label, 20):<22}{numbers}")
    return lines


# Fixes that lenscope's messages state in Python terms, as a command-line user
# would make them; applied in order (the specific before the generic) to
# errors and warnings. A pattern matches only at the start of a name.
_CLI_FIXES: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (
        r"pass subject=\(start, end\) token positions",
        "pass --subject with the exact text of those tokens",
    ),
    (r"pass subject=\(start, end\)", "pass --subject with the exact text"),
    (r"pass the subject explicitly", "pass it with --subject"),
    (r'load_model\("([^"]+)"\) \(--model [^;)]+; needs', r"--model \1 (needs"),
    (r'(?:lenscope\.)?load_model\("([^"]+)"\)', r"--model \1"),
    (r"pass the name of a hub model", "pass --model with the name of a hub model"),
    (r"device='cpu' \(--device cpu on the command line\)", "--device cpu"),
    (r"device=None to let", "no --device to let"),
    (r"device='([^']*)'", r"--device \1"),
    (r"dtype=(?:torch\.)?'?(\w+)'?", r"--dtype \1"),
    (r"torch\.float32, torch\.bfloat16 or torch\.float16", "--dtype float32, bfloat16 or float16"),
    (r"bridge=True", "--bridge"),
    (r"bridge=False", "--no-bridge"),
    (r"noise_multiplier=(\d+(?:\.\d+)?)", lambda m: f"--noise {m[1].removesuffix('.0')}s"),
    (r"e\.g\. ' Paris'\) or its id", "e.g. --answer ' Paris')"),
    (r"estimator='([\w:]+)'", r"--estimator \1"),
    (r"max_seconds=1800 for half an hour", "--minutes 30 for half an hour"),
    (r"pass e\.g\. range\((\d+), (\d+)\)", lambda m: f"pass e.g. --layers {m[1]}-{int(m[2]) - 1}"),
    (r"layers=range\((\d+), (\d+)\)", lambda m: f"--layers {m[1]}-{int(m[2]) - 1}"),
    (r"positions='(\w+)'", r"--positions \1"),
    (r"or a list of positions", "or positions such as 3,4,5"),
    (r"positions=\[([-\d, ]+)\]", lambda m: "--positions " + m[1].replace(" ", "")),
    (
        r"pass positions of the prompt's tokens, or 'all'",
        "pass --positions with positions of the prompt's tokens (e.g. 2-6), or --positions all",
    ),
    (r"a new checkpoint path", "a new --checkpoint path"),
    (r"(positions|layers|samples|noise|window)=\.\.\.", r"--\1"),
    (
        r"(answer|window|samples|noise|seed|limit|batch_size)=",
        lambda m: f"--{m[1].replace('_', '-')} ",
    ),
)
_CLI_PATTERNS = tuple((re.compile(r"(?<![\w.])" + old), new) for old, new in _CLI_FIXES)


def cli_wording(message: str) -> str:
    """``message`` with the Python fixes it suggests replaced by command-line flags.

    Example:
        >>> cli_wording("check spelling, or pass subject=(start, end)")
        'check spelling, or pass --subject with the exact text'
    """
    for pattern, replacement in _CLI_PATTERNS:
        message = pattern.sub(replacement, message)
    return message


def _show_warnings(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing lenscope's warnings as one CLI line each."""
    original = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, UserWarning):
            original(message, category, *args, **kwargs)
            return
        print(f"{command}: warning: {cli_wording(str(message))}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None, *, model_factory: ModelFactory | None = None) -> int:
    """Entry point of the ``lenscope`` command.

    Errors and warnings come out as one line each on stderr, with the fixes
    they suggest in terms of the command's flags (:func:`cli_wording`).

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
    if getattr(args, "lens_command", None):
        command += f" {args.lens_command}"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warnings(command)
            return args.run(args, model_factory)
    except USER_ERRORS as e:
        print(f"{command}: error: {cli_wording(str(e))}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as e:
        print(f"{command}: error: {cli_wording(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        detail = f": {e}" if str(e) else ""
        print(f"{command}: interrupted{detail}", file=sys.stderr)
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
