"""Which TransformerLens is installed, and the model classes it offers.

lenscope supports TransformerLens 3.9+ (``HookedTransformer`` and the
``TransformerBridge`` beside it) and TransformerLens 4.x (``TransformerBridge``
only: 4.0 removed ``HookedTransformer``). Nothing here imports a name that the
installed version lacks; every other lenscope module asks this one.
"""

import functools
from importlib import metadata
from typing import Any

SUPPORTED = ">=3.9,<5"
"""The TransformerLens versions lenscope is tested with (both CI legs)."""

_FIX = 'pip install "transformer-lens>=4,<5" (or "transformer-lens>=3.9,<4" for HookedTransformer)'


@functools.cache
def tl_version() -> tuple[int, int]:
    """The installed TransformerLens version as ``(major, minor)``.

    Raises:
        ImportError: If TransformerLens is missing or its version is not supported.
    """
    try:
        text = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError as e:
        raise ImportError(
            f"lenscope needs TransformerLens {SUPPORTED}, but it is not installed; run {_FIX}"
        ) from e
    parts = (text.split("+")[0].split(".") + ["0"])[:2]
    try:
        version = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except ValueError as e:
        raise ImportError(
            f"could not parse the TransformerLens version {text!r}; run {_FIX}"
        ) from e
    if not (3, 9) <= version < (5, 0):
        raise ImportError(
            f"lenscope supports TransformerLens {SUPPORTED}, but {text} is installed; run {_FIX}"
        )
    return version


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (3.x)."""
    return tl_version() < (4, 0)


def hooked_transformer_class() -> Any:
    """``transformer_lens.HookedTransformer``, or an ``ImportError`` that says how to get it."""
    if not has_hooked_transformer():
        raise ImportError(
            f"HookedTransformer was removed in TransformerLens 4.0 (installed: "
            f"{metadata.version('transformer-lens')}); use a TransformerBridge "
            "(lenscope.load_model returns one), or install TransformerLens 3.9 with "
            'pip install "transformer-lens>=3.9,<4"'
        )
    from transformer_lens import HookedTransformer

    return HookedTransformer


def bridge_class() -> Any:
    """``transformer_lens.model_bridge.TransformerBridge``."""
    tl_version()
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


# Importing lenscope with a TransformerLens it does not support fails here, at
# once and with the fix, not later inside a trace.
tl_version()
