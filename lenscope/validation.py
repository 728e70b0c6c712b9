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
from collections.abc import Sequence
from typing import Any


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


def distinct_indices(
    name: str, what: str, values: Sequence[Any], size: int, fix: str, *, original: Any = None
) -> list[int]:
    """Sorted distinct integers in ``[0, size)``; :class:`InvalidInput` otherwise.

    Args:
        name: The argument's name.
        what: What the integers index, e.g. ``"layer indices"``.
        values: The integers.
        size: One past the largest allowed index.
        fix: What to pass instead.
        original: The value as the user passed it, shown in the message.
    """
    shown = values if original is None else original
    chosen = [int(v) for v in values] if all(is_int(v) for v in values) else None
    if not chosen or any(not 0 <= v < size for v in chosen) or len(set(chosen)) != len(chosen):
        raise InvalidInput(f"{name} must be distinct {what} in [0, {size}), got {shown!r}; {fix}")
    return sorted(chosen)


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
