"""Checks of user input, and the error types that mark a mistake as the user's.

Every argument lenscope accepts from a user is checked here, once, with a
message that states the rule, the value received and the fix (the equinox
convention). The errors are :class:`InvalidInput` (a ``ValueError``) and
:class:`InvalidInputType` (a ``TypeError``): the command line reports them
with exit status 2 as usage errors, while any other exception is a bug (or
an environment problem) and exits 1 with a hint to rerun with a traceback.
:class:`AnswerWarning` is the warning for a trace that runs but follows a
token the user probably did not mean.
This module imports nothing from lenscope: it sits at the bottom.
"""

import math
import numbers
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Runtime type checkers wrap lenscope's functions (the tests run under jaxtyping's
# import hook): their frames stand between lenscope's and the user's.
_WRAPPERS = {"jaxtyping", "beartype", "typeguard"}


class InvalidInput(ValueError):
    """A value the user passed breaks a rule; the message says which and how to fix it."""


class InvalidInputType(TypeError):
    """An argument of the wrong type; the message says what to pass instead."""


class AnswerWarning(UserWarning):
    """The token a trace follows is probably not the one the user meant.

    Warned, not raised: the trace is still computed, but its numbers follow a
    token (``'Paris'`` without its leading space, a filler such as ``' the'``)
    or a corruption that does not lower the answer's score, so they mean
    little. The message lists the clean run's top predictions and says what
    to pass instead.
    """


USER_ERRORS: tuple[type[Exception], ...] = (InvalidInput, InvalidInputType)
"""Exceptions that mean "the input was wrong", not "lenscope is broken"."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first caller outside lenscope.

    A fixed ``stacklevel`` points into lenscope whenever the call path from
    the user's code is deeper or shallower than its author counted (a trace
    started by ``trace`` rather than ``trace_kinds``, or by the command line).
    """
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE)
        or frame.f_globals.get("__name__", "").partition(".")[0] in _WRAPPERS
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: Any, fix: str) -> int:
    """``value`` if it is an integer >= 1, else :class:`InvalidInput`.

    Args:
        name: The argument's name, as the user wrote it.
        value: What was passed.
        fix: What to pass instead, e.g. ``"pass e.g. samples=10"``.
    """
    if not is_int(value) or value < 1:
        raise InvalidInput(f"{name} must be a positive integer, got {value!r}; {fix}")
    return int(value)


def optional_positive_int(name: str, value: Any, fix: str) -> int | None:
    """:func:`positive_int`, letting ``None`` through."""
    return None if value is None else positive_int(name, value, fix)


def finite_number(name: str, value: Any, fix: str, *, minimum: float | int = -math.inf) -> float:
    """``value`` as a float if it is a finite real number ``>= minimum``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value >= minimum
    if not ok:
        rule = "a finite number" if minimum == -math.inf else f"a finite number >= {minimum:g}"
        raise InvalidInput(f"{name} must be {rule}, got {value!r}; {fix}")
    return float(value)


LAST = "last"
"""The name of the last token position, wherever positions are taken (as ``-1``)."""


def distinct_indices(
    name: str,
    what: str,
    values: Sequence[Any],
    size: int,
    fix: str,
    *,
    original: Any = None,
    count_back: bool = False,
) -> list[int]:
    """Sorted distinct integers in ``[0, size)``; :class:`InvalidInput` otherwise.

    Args:
        name: The argument's name.
        what: What the integers index, e.g. ``"layer indices"``.
        values: The integers.
        size: One past the largest allowed index.
        fix: What to pass instead.
        original: The value as the user passed it, shown in the message.
        count_back: Also take Python's negative indices (``-1`` is ``size - 1``)
            and :data:`LAST` (the same), as token positions are given; the
            result holds the resolved, non-negative indices.
    """
    shown = values if original is None else original
    low = -size if count_back else 0

    def index(v: Any) -> int | None:
        if count_back and isinstance(v, str) and v == LAST and size > 0:
            return size - 1
        return int(v) % size if is_int(v) and low <= v < size else None

    chosen = [index(v) for v in values]
    rule = f"{name} must be distinct {what} in [0, {size})"
    if count_back:
        rule += f" (or counted back from the end: -1 or {LAST!r} is the last, -{size} the first)"
    if not chosen or any(v is None for v in chosen):
        raise InvalidInput(f"{rule}, got {shown!r}; {fix}")
    if len(set(chosen)) != len(chosen):
        same = f", which are the positions {chosen}" if chosen != list(values) else ""
        raise InvalidInput(f"{rule}, got {shown!r}{same}; {fix}")
    return sorted(v for v in chosen if v is not None)


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
"""The precisions a model can be loaded and run in (torch's names, without ``torch.``)."""

DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
}
"""Every name :func:`model_dtype_name` accepts, and the dtype it stands for."""


def model_dtype_name(value: Any) -> str:
    """The torch name (``"float32"``, ...) of a precision a model can run in.

    Kept free of torch, so that the command line can refuse ``--dtype float8``
    before it imports torch: ``value`` is a name (``"bf16"``, ``"torch.float16"``)
    or a ``torch.dtype`` (recognised by its string form, ``"torch.float16"``).
    Float8 and integer dtypes are refused: TransformerLens' layers cannot run
    in them (the matrix products and layer norms raise deep inside torch).

    Args:
        value: A dtype name or a ``torch.dtype``.

    Returns:
        One of :data:`MODEL_DTYPES`.

    Raises:
        InvalidInput: If ``value`` names no precision a model can run in.
    """
    key = str(value).strip().lower().removeprefix("torch.")
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    shown = str(value) if not isinstance(value, str) else repr(value)
    raise InvalidInput(
        f"dtype must be a precision a model can run in: {', '.join(MODEL_DTYPES)} (or the "
        f"short names {', '.join(k for k in DTYPE_ALIASES if k not in MODEL_DTYPES)}), got "
        f"{shown}; pass dtype='float32' (the default), dtype='bfloat16' or dtype='float16' instead"
    )
