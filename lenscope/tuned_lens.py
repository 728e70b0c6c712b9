"""The tuned lens for TransformerLens models: train, evaluate, save, load, decode.

A tuned lens (Belrose et al., "Eliciting Latent Predictions from Transformers
with the Tuned Lens", 2023, arXiv 2303.08112) gives every layer an affine
translator, ``h -> h + W h + b``, initialised to the identity (``W = 0``,
``b = 0``: the untrained lens *is* the logit lens) and trained so that
decoding the translated residual stream with the model's own final norm and
unembedding matches the model's final output distribution:
``KL(p_final ‖ p_lens)`` at every position, summed over layers. Training
follows the paper and its ``tuned-lens`` package: SGD with Nesterov momentum
0.9, learning rate 1 (PyTorch's SGD gets ``lr * (1 - momentum)``, as there),
weight decay 1e-3 towards the identity, gradient norm clipped at 1, a linear
decay to zero after an optional warmup, 250 steps of 2^18 tokens by default.
The KL is computed a block of rows at a time with lenscope's one softmax
kernel, and its gradient (``q - p`` per logit) is the only ``[rows, d_vocab]``
tensor kept for the backward pass, so a 262,144-token vocabulary fits in
memory.

Translator ``i`` reads ``blocks.{i}.hook_resid_pre`` (the stream entering
block ``i``; Hugging Face's ``hidden_states[i]``), ``i = 0 .. n_layers - 1``,
the layout of the ``tuned-lens`` package; the last block's ``resid_post`` is
the model's output and needs none. Lenses are saved in that package's format
(``config.json`` + ``params.pt``) with a ``lenscope.json`` beside them, so
lenses trained by either load in both.

Residual-stream conventions. ``tuned-lens`` trains on Hugging Face hidden
states. A ``HookedTransformer``, and a ``TransformerBridge`` in compatibility
mode, centre the weights that write to the residual stream
(``center_writing_weights``) of LayerNorm models, so their stream is the
Hugging Face stream minus its mean over ``d_model``: the mean is gone and a
translator that reads it cannot be applied. (RMSNorm models such as Gemma are
not centred; their streams agree.) lenscope handles both directions exactly
and checks the vectors it is given rather than trusting a flag:

* a lens trained on a centred stream has the centring folded into its
  weights (``W -> W C - 11ᵀ/d`` with ``C = I - 11ᵀ/d``), which gives the same
  output on a centred stream and makes it valid on the raw stream too
  (``basis="any"``);
* a lens trained on a raw stream (``basis="raw"``; every lens from the
  ``tuned-lens`` package) refuses, with an error that says how to load the
  model unprocessed, any stream whose every vector has zero mean.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.hooks import (
    FINAL_RESID,
    capture_forward,
    check_hook_points,
    decode_resid,
    hook_name,
    model_name,
    n_layers,
    preserved_model,
)
from lenscope.lens import LogitLens
from lenscope.metrics import log_softmax
from lenscope.results import short_text
from lenscope.validation import (
    InvalidInput,
    InvalidInputType,
    finite_number,
    is_int,
    positive_int,
    warn,
)

CONFIG_FILE = "config.json"
"""The ``tuned-lens`` package's config file (``TunedLensConfig``)."""
PARAMS_FILE = "params.pt"
"""The ``tuned-lens`` package's translator weights (a ``ModuleList`` state dict)."""
LENSCOPE_FILE = "lenscope.json"
"""What lenscope adds beside them: the residual-stream basis, model, training record."""
HUB_REPO = "AlignmentResearch/tuned-lens"
"""The Hugging Face space of the ``tuned-lens`` package's pretrained lenses (``lens/<model>``)."""

BASES: dict[str, str] = {
    "raw": "the stream as the model computes it unprocessed (Hugging Face hidden states)",
    "any": "either stream: trained on a centred stream, with the centring folded in",
}
"""Which residual streams a lens may decode."""

DECODABLE_KINDS = ("resid_pre", "resid_post")
"""Hook-point types a tuned lens has translators for."""

_FORMAT = "lenscope.TunedLens/1"
_EVAL_FORMAT = "lenscope.LensEvaluation/1"
_ROW_BYTES = 256 << 20  # per [rows, d_vocab] float32 buffer while training or evaluating
_CENTRED_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
_CENTRED_TOL_LOW = 2e-3  # 16-bit streams


# ---------------------------------------------------------------------------
# The lens
# ---------------------------------------------------------------------------


class TunedLens:
    """Affine translators, one per layer, decoding through the model's own head.

    Build one with :meth:`identity`, :meth:`train` or :meth:`load`. It is a
    :class:`~lenscope.lens.LensDecoder` in the ``tuned-lens`` package's
    convention (``forward(h, i)`` decodes ``blocks.i.hook_resid_pre``), and
    every lens view accepts it: ``lens_trajectory(model, prompt, decoder=lens)``
    and ``lens_trace_cell(..., decoder=lens)`` decode ``resid_pre`` *and*
    ``resid_post`` (``resid_post`` of layer ``l`` is ``resid_pre`` of ``l + 1``)
    and refuse the other hook points, which the translators were not trained on.

    Attributes:
        weight: ``[layer, d_model, d_model]`` float32, ``W`` of ``h + h Wᵀ + b``
            (``torch.nn.Linear``'s layout).
        bias: ``[layer, d_model]`` float32.
        model_name: The model the lens was made for.
        d_vocab: That model's vocabulary size.
        basis: ``"raw"`` or ``"any"``; see :data:`BASES`.
        training: What :meth:`train` did (settings, tokens, seconds, loss per step).
        model: The model ``forward`` decodes with (set by :meth:`train`,
            :meth:`load` and :meth:`identity`; :meth:`for_model` uses the model it is given).
    """

    name = "tuned lens"

    def __init__(
        self,
        weight: Float[Tensor, "layer d_model d_model"],
        bias: Float[Tensor, "layer d_model"],
        *,
        model_name: str,
        d_vocab: int,
        basis: str = "raw",
        training: dict[str, Any] | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        """Wrap translator weights; see the class docstring."""
        if weight.ndim != 3 or weight.shape[1] != weight.shape[2] or bias.shape != weight.shape[:2]:
            raise InvalidInput(
                f"a tuned lens needs weight [layer, d_model, d_model] and bias [layer, d_model], "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}; pass translators of one model"
            )
        if basis not in BASES:
            raise InvalidInput(f"basis must be one of {tuple(BASES)}, got {basis!r}")
        self.weight = weight.detach().float().cpu().contiguous()
        self.bias = bias.detach().float().cpu().contiguous()
        self.model_name = str(model_name)
        self.d_vocab = int(d_vocab)
        self.basis = basis
        self.training = dict(training or {})
        self.model = model
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def n_layers(self) -> int:
        """Number of translators (the model's number of blocks)."""
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.weight.shape[1])

    @classmethod
    def identity(cls, model: torch.nn.Module) -> "TunedLens":
        """The untrained lens of ``model``: every translator is the identity (the logit lens)."""
        check_hook_points(model, _stream_hooks(model))
        n, d = n_layers(model), int(model.cfg.d_model)
        return cls(
            torch.zeros(n, d, d),
            torch.zeros(n, d),
            model_name=model_name(model),
            d_vocab=int(model.cfg.d_vocab),
            basis="any",  # the identity reads no mean: right on either stream
            model=model,
        )

    def __repr__(self) -> str:
        """``TunedLens(<model>, layers=..., d_model=..., basis=...)``."""
        tokens = self.training.get("tokens")
        trained = f", trained on {tokens:,} tokens" if tokens else ", untrained"
        return (
            f"TunedLens({self.model_name}, layers={self.n_layers}, d_model={self.d_model}, "
            f"basis={self.basis!r}{trained})"
        )

    # -- decoding -----------------------------------------------------------

    def transform_hidden(
        self, hidden: Float[Tensor, "*batch d_model"], index: int
    ) -> Float[Tensor, "*batch d_model"]:
        """Translator ``index`` applied to ``hidden``: ``h + h Wᵀ + b``.

        ``index`` follows ``tuned-lens``: the stream entering block ``index``;
        ``index == n_layers`` (the model's output) is the identity. The result
        has ``hidden``'s dtype; the translator computes in float32.

        Raises:
            ValueError: ``index`` is out of range, or the lens needs the raw
                stream and every vector of ``hidden`` has zero mean (a centred stream).
        """
        if not is_int(index) or not 0 <= index <= self.n_layers:
            raise InvalidInput(
                f"index must be an integer in [0, {self.n_layers}] (the stream entering block "
                f"index; {self.n_layers} is the output), got {index!r}; pass e.g. 0"
            )
        if self.basis == "raw":
            self._check_raw(hidden)
        if index == self.n_layers:
            return hidden
        weight, bias = self._params(hidden.device)
        h = hidden.float()
        return (h + (h @ weight[index].T + bias[index])).to(hidden.dtype)

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"], layer: int
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of ``blocks.{layer}.hook_resid_pre`` through the lens (``tuned-lens``'s call).

        Decodes with :attr:`model`'s own final norm and unembedding.
        """
        if self.model is None:
            raise InvalidInput(
                "this TunedLens has no model to decode with; pass the model to "
                "TunedLens.load(path, model), or use lens.for_model(model, kind)"
            )
        return self.for_model(self.model, "resid_pre").forward(hidden, layer)

    __call__ = forward

    def for_model(self, model: torch.nn.Module, kind: str) -> "LogitLens":
        """The decoder of ``kind`` hook points of ``model`` through this lens.

        :func:`~lenscope.lens.lens_trajectory` and
        :func:`~lenscope.lens.lens_trace_cell` call this, so a ``TunedLens``
        can be passed as their ``decoder``.

        Args:
            model: The model whose hook points are decoded, the model the lens
                was trained for (same ``d_model``, depth and vocabulary).
            kind: ``"resid_pre"`` or ``"resid_post"``.

        Returns:
            A :class:`~lenscope.lens.LogitLens` whose ``transform_hidden`` applies
            the translator of each layer.
        """
        if kind not in DECODABLE_KINDS:
            raise InvalidInput(
                f"a tuned lens has translators for the residual stream {DECODABLE_KINDS}, got "
                f"kind={kind!r}; decode kind='resid_post' (or 'resid_pre'), or use the logit "
                "lens (decoder=None) for attn_out / mlp_out / resid_mid"
            )
        self.check_model(model)
        return _TranslatedHead(model, self, 1 if kind == "resid_post" else 0)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if ``model``'s shapes differ from the lens's; warn on its name."""
        shapes = {
            "d_model": (int(model.cfg.d_model), self.d_model),
            "n_layers": (n_layers(model), self.n_layers),
            "d_vocab": (int(model.cfg.d_vocab), self.d_vocab or int(model.cfg.d_vocab)),
        }  # a tuned-lens file loaded without a model records no vocabulary (d_vocab 0)
        wrong = {k: v for k, v in shapes.items() if v[0] != v[1]}
        if wrong:
            what = ", ".join(f"{k} {m} (lens: {lens})" for k, (m, lens) in wrong.items())
            raise InvalidInput(
                f"this tuned lens was made for {self.model_name!r}, and the model "
                f"{model_name(model)!r} differs: {what}; pass the model the lens was trained for"
            )
        if model_name(model) != self.model_name:
            warn(
                f"this tuned lens was made for {self.model_name!r} but the model is "
                f"{model_name(model)!r} (same shapes); its translators assume the same weights"
            )

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = (self.weight.to(device), self.bias.to(device))
        return self._on[device]

    def _check_raw(self, hidden: Tensor) -> None:
        if hidden.shape[-1] == self.d_model and is_centred(hidden):
            raise InvalidInput(
                "this tuned lens was trained on the raw residual stream (Hugging Face hidden "
                "states, e.g. by the tuned-lens package), but every vector it was given has "
                "zero mean over d_model: the model centres its writing weights "
                "(TransformerLens center_writing_weights, on by default for LayerNorm models), "
                "which removes the mean this lens reads, so its predictions would be wrong. Load "
                "the model unprocessed: on TransformerLens 4 TransformerBridge.boot_transformers"
                "(name) then model.enable_compatibility_mode(no_processing=True); on 3.9 "
                "HookedTransformer.from_pretrained_no_processing(name); or train a lens on this "
                "model with TunedLens.train"
            )

    # -- saving and loading ---------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """The translators as ``tuned-lens`` saves them: ``{"0.weight", "0.bias", ...}``."""
        state: dict[str, Tensor] = {}
        for i in range(self.n_layers):
            state[f"{i}.weight"] = self.weight[i].clone()
            state[f"{i}.bias"] = self.bias[i].clone()
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """Write the lens to the folder ``path`` in the ``tuned-lens`` package's format.

        ``config.json`` and ``params.pt`` are what ``tuned_lens.TunedLens`` reads
        (``from_model_and_pretrained(model, path)``); ``lenscope.json`` adds the
        basis, the model's name and vocabulary, and the training record.
        :meth:`load` reads the tensors back bit for bit.

        Returns:
            The folder.
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise InvalidInput(
                f"path must be a folder (a lens is config.json + params.pt), got the file "
                f"{str(folder)!r}; pass e.g. path='gemma-270m.lens'"
            )
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "base_model_name_or_path": self.model_name,
            "d_model": self.d_model,
            "num_hidden_layers": self.n_layers,
            "bias": True,
            "base_model_revision": None,
            "unembed_hash": None,
            "lens_type": "linear_tuned_lens",
        }
        extra = {
            "format": _FORMAT,
            "model_name": self.model_name,
            "d_vocab": self.d_vocab,
            "basis": self.basis,
            "training": self.training,
        }
        _atomic(folder / PARAMS_FILE, lambda p: torch.save(self.state_dict(), p))
        _atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
        _atomic(folder / LENSCOPE_FILE, lambda p: p.write_text(json.dumps(extra, indent=2)))
        return folder

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: torch.nn.Module | None = None,
        *,
        basis: str | None = None,
    ) -> "TunedLens":
        """Read a lens saved by :meth:`save` or by the ``tuned-lens`` package.

        Args:
            path: A folder with ``config.json`` and ``params.pt``; or the name of a
                pretrained lens of the ``tuned-lens`` package (``"gpt2"``,
                ``"EleutherAI/pythia-160m"``, ...), fetched from its Hugging Face
                space ``AlignmentResearch/tuned-lens`` (``lens/<name>/``) when online.
            model: The model to decode with; its shapes are checked against the lens.
            basis: Override the residual-stream basis (default: ``lenscope.json``'s,
                or ``"raw"`` for a lens without it: the ``tuned-lens`` package trains
                on Hugging Face hidden states).

        Raises:
            ValueError: The files do not describe a linear tuned lens, or its
                shapes differ from ``model``'s.
            OSError: Not a local folder and the hub cannot be reached (the
                message names the file looked for).
        """
        folder = _lens_folder(path)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            state = torch.load(folder / PARAMS_FILE, map_location="cpu", weights_only=True)
        except (json.JSONDecodeError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise InvalidInput(
                f"{str(folder)!r} does not hold a readable tuned lens ({type(e).__name__}: {e}); "
                "pass a folder written by TunedLens.save or tuned-lens's lens.save"
            ) from e
        extra_path = folder / LENSCOPE_FILE
        extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
        lens_type = config.get("lens_type", "linear_tuned_lens")
        if lens_type != "linear_tuned_lens" or not config.get("bias", True):
            raise InvalidInput(
                f"only affine tuned lenses (lens_type 'linear_tuned_lens' with bias) can be "
                f"read, got lens_type={lens_type!r}, bias={config.get('bias')!r} in {str(folder)!r}"
            )
        n, d = int(config["num_hidden_layers"]), int(config["d_model"])
        state = {k.removeprefix("layer_translators."): v for k, v in state.items()}
        expected = {f"{i}.{p}" for i in range(n) for p in ("weight", "bias")}
        if set(state) != expected:
            raise InvalidInput(
                f"{str(folder / PARAMS_FILE)!r} must hold {sorted(expected)[:4]} ... for "
                f"num_hidden_layers={n}, got keys {sorted(state)[:4]} ...; the files do not match"
            )
        weight = torch.stack([state[f"{i}.weight"] for i in range(n)])
        bias = torch.stack([state[f"{i}.bias"] for i in range(n)])
        if tuple(weight.shape) != (n, d, d):
            raise InvalidInput(
                f"translator weights must be [{d}, {d}] per config.json, got "
                f"{tuple(weight.shape[1:])} in {str(folder)!r}"
            )
        name = extra.get("model_name") or config.get("base_model_name_or_path")
        if not name:  # tuned-lens records the Hugging Face name, sometimes empty
            name = model_name(model) if model is not None else "?"
        d_vocab = extra.get("d_vocab") or (int(model.cfg.d_vocab) if model is not None else 0)
        lens = cls(
            weight,
            bias,
            model_name=name,
            d_vocab=d_vocab,
            basis=basis or extra.get("basis", "raw"),
            training=extra.get("training"),
            model=model,
        )
        if model is not None:
            lens.check_model(model)
        return lens

    # -- training and evaluation ------------------------------------------------

    @classmethod
    def train(
        cls,
        model: torch.nn.Module,
        texts: Any,
        *,
        steps: int = 250,
        tokens_per_step: int = 2**18,
        seq_len: int = 2048,
        optimizer: str = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        batch_size: int = 1,
        seed: int = 0,
        init: "TunedLens | None" = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
    ) -> "TunedLens":
        """Train a tuned lens of ``model`` on ``texts`` (Belrose et al., 2023, Section 3).

        Each step reads ``tokens_per_step`` tokens (``tokens_per_step // seq_len``
        sequences, at least one), runs the model once per ``batch_size``
        sequences, and for every layer adds ``mean KL(p_final ‖ p_lens)`` over
        the step's positions to the loss (the BOS position, an attention sink,
        is left out). The sequences are ``texts`` tokenised, joined with the
        EOS token, cut into ``seq_len``-token pieces (BOS first when the model
        prepends one) and shuffled with ``seed``; step ``s`` always reads the
        same pieces, so a run is reproducible and a resumed run equals an
        uninterrupted one.

        Args:
            model: HookedTransformer or TransformerBridge; left exactly as it was.
            texts: A list of strings (documents), a path (or list of paths) to
                text files, or a ``datasets.Dataset`` with a ``"text"`` column.
            steps: Optimiser steps (paper: 250).
            tokens_per_step: Tokens per step (paper: 2^18).
            seq_len: Tokens per sequence (at most the model's context).
            optimizer: ``"sgd"`` (the paper's: Nesterov momentum) or ``"adam"``
                (``tuned-lens``'s other choice, invariant to the stream's scale).
            lr: Learning rate; default 1.0 for SGD (the paper's; PyTorch's SGD gets
                ``lr * (1 - momentum)``, as in ``tuned-lens``) and 1e-3 for Adam.
            momentum: Nesterov momentum (SGD), or Adam's first beta.
            weight_decay: Decay of ``W`` and ``b`` towards the identity translator.
            warmup_steps: Linear warmup steps before the linear decay to zero.
            max_grad_norm: Gradient-norm clip.
            batch_size: Sequences per forward pass.
            seed: Shuffles the sequences.
            init: A lens to start from (default the identity).
            checkpoint: A file to save progress to every ``checkpoint_every``
                steps; if it exists, training resumes from it (same settings and data).
            checkpoint_every: Steps between checkpoints.
            progress: Show a progress bar with the loss and the time left.

        Returns:
            The trained lens (``lens.training`` records settings, tokens, seconds, losses).
        """
        check_hook_points(model, _stream_hooks(model))
        settings = {
            "steps": positive_int("steps", steps, "pass e.g. steps=250"),
            "tokens_per_step": positive_int(
                "tokens_per_step", tokens_per_step, "pass e.g. tokens_per_step=2**18"
            ),
            "seq_len": _check_seq_len(model, seq_len),
            "optimizer": _optimizer_name(optimizer),
            "lr": finite_number(
                "lr",
                (1.0 if optimizer == "sgd" else 1e-3) if lr is None else lr,
                "pass e.g. lr=1.0",
                minimum=0,
            ),
            "momentum": finite_number("momentum", momentum, "pass e.g. momentum=0.9", minimum=0),
            "weight_decay": finite_number(
                "weight_decay", weight_decay, "pass e.g. weight_decay=1e-3", minimum=0
            ),
            "warmup_steps": _non_negative_int("warmup_steps", warmup_steps, steps),
            "max_grad_norm": finite_number(
                "max_grad_norm", max_grad_norm, "pass e.g. max_grad_norm=1.0", minimum=0
            ),
            "batch_size": positive_int("batch_size", batch_size, "pass e.g. batch_size=1"),
            "seed": _seed(seed),
        }
        if momentum >= 1:
            raise InvalidInput(f"momentum must be in [0, 1), got {momentum!r}; pass momentum=0.9")
        checkpoint_every = positive_int(
            "checkpoint_every", checkpoint_every, "pass e.g. checkpoint_every=10"
        )
        if init is not None and not isinstance(init, TunedLens):
            raise InvalidInputType(
                f"init must be a TunedLens, got {type(init).__name__}; pass e.g. "
                "init=TunedLens.load(path, model)"
            )
        lens = cls.identity(model) if init is None else init
        if init is not None:
            init.check_model(model)
        sequences = token_sequences(model, texts, settings["seq_len"])
        per_step = max(1, settings["tokens_per_step"] // settings["seq_len"])
        settings["data_sha256"] = _digest(sequences)
        return _Trainer(model, lens, sequences, per_step, settings).run(
            None if checkpoint is None else Path(checkpoint), checkpoint_every, progress
        )

    def evaluate(
        self,
        model: torch.nn.Module,
        texts: Any,
        *,
        seq_len: int = 2048,
        max_tokens: int | None = None,
        batch_size: int = 1,
        corpus: str | None = None,
    ) -> "LensEvaluation":
        """Per-layer quality of this lens against the logit lens, on held-out ``texts``.

        For every ``resid_pre`` layer and both lenses: the mean
        ``KL(p_final ‖ p_lens)`` over positions (BOS left out), the mean
        cross-entropy of the next token, and the mean entropy; all in nats,
        with lenscope's float32 softmax kernel.

        Args:
            model: The model the lens was trained for.
            texts: As for :meth:`train`.
            seq_len: Tokens per sequence.
            max_tokens: Stop after about this many tokens (whole sequences).
            batch_size: Sequences per forward pass.
            corpus: A name for the texts, kept in the result.

        Returns:
            A :class:`LensEvaluation`.
        """
        check_hook_points(model, _stream_hooks(model))
        self.check_model(model)
        seq_len = _check_seq_len(model, seq_len)
        sequences = token_sequences(model, texts, seq_len)
        if max_tokens is not None:
            max_tokens = positive_int("max_tokens", max_tokens, "pass e.g. max_tokens=4096")
            sequences = sequences[: max(1, math.ceil(max_tokens / seq_len))]
        batch_size = positive_int("batch_size", batch_size, "pass e.g. batch_size=1")
        decoders = {"tuned": self.for_model(model, "resid_pre"), "logit": LogitLens(model)}
        return _evaluate(model, decoders, sequences, batch_size, corpus, self)


class _TranslatedHead(LogitLens):
    """A model's head behind one tuned lens's translators, for one hook-point type."""

    def __init__(self, model: torch.nn.Module, lens: TunedLens, shift: int) -> None:
        super().__init__(model)
        self.lens = lens
        self.shift = shift  # resid_post of layer l is resid_pre of l + 1
        self.name = lens.name

    def transform_hidden(
        self, hidden: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """The translator of ``layer`` (shifted by one for ``resid_post``)."""
        return self.lens.transform_hidden(hidden, layer + self.shift)

    def __repr__(self) -> str:
        """``TunedLens(...) on <model>``."""
        return f"{self.lens!r} on {model_name(self.model)}"


def is_centred(hidden: Float[Tensor, "*batch d_model"]) -> bool:
    """Whether every vector of ``hidden`` has zero mean over ``d_model`` (up to rounding).

    A stream written only by centred weights (TransformerLens
    ``center_writing_weights``) is centred to float rounding, about 1e-7 of
    its RMS in float32; a raw stream's mean is a sizeable fraction of it
    (about ``1/sqrt(d_model)`` for unrelated directions, far more with the
    outlier dimensions of trained models). All-zero vectors are skipped.
    """
    flat = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    rms = flat.pow(2).mean(-1).sqrt()
    keep = rms > 0
    if not bool(keep.any()):
        return False
    tol = _CENTRED_TOL.get(hidden.dtype, _CENTRED_TOL_LOW)
    return bool((flat[keep].mean(-1).abs() <= tol * rms[keep]).all())


def fold_centring(
    weight: Float[Tensor, "layer d_model d_model"],
) -> Float[Tensor, "layer d_model d_model"]:
    """Weights that act on a raw stream as ``weight`` acts on its centred version.

    With ``C = I - 11ᵀ/d`` (subtracting the mean), ``C h + W C h + b = h + W' h + b``
    for ``W' = W C - 11ᵀ/d``; on a centred ``h`` (``1ᵀ h = 0``) ``W' h = W h``, so
    the folded translator gives the same output there and is right on the raw stream too.
    Folding twice changes nothing.
    """
    d = weight.shape[-1]
    return weight - weight.sum(-1, keepdim=True) / d - 1.0 / d


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _documents(texts: Any) -> Iterator[str]:
    """The documents of ``texts``: strings, text files, or a Dataset's ``"text"`` column."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise InvalidInput(
                f"texts given as one string must be the path of a text file, got "
                f"{short_text(str(texts), 60)!r}, which is not a file; to train on the string "
                "itself "
                "pass texts=[text]"
            )
        yield path.read_text(encoding="utf-8")
        return
    if hasattr(texts, "column_names"):  # datasets.Dataset
        if "text" not in texts.column_names:
            raise InvalidInput(
                f"a dataset passed as texts needs a 'text' column, got columns "
                f"{list(texts.column_names)}; pass dataset.rename_column(<name>, 'text')"
            )
        texts = texts["text"]
    if not isinstance(texts, Iterable):
        raise InvalidInputType(
            f"texts must be a list of strings, a text file's path or a datasets.Dataset, got "
            f"{type(texts).__name__}; pass e.g. texts=['first document', 'second document']"
        )
    for item in texts:
        if isinstance(item, os.PathLike):
            yield Path(item).read_text(encoding="utf-8")
        elif isinstance(item, str):
            yield item
        else:
            raise InvalidInputType(
                f"every text must be a str (or a pathlib.Path of a text file), got "
                f"{type(item).__name__}; pass e.g. texts=['first document', 'second document']"
            )


def token_sequences(
    model: torch.nn.Module, texts: Any, seq_len: int
) -> Int[Tensor, "sequence pos"]:
    """``texts`` tokenised, joined with EOS and cut into ``seq_len``-token sequences.

    As the ``tuned-lens`` package packs its data, except that each sequence
    starts with the BOS token when the model prepends one (Gemma's
    activations are far off-distribution without it). A remainder shorter
    than ``seq_len`` is dropped unless it is all there is.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InvalidInput(
            f"model {model_name(model)!r} has no tokenizer, so texts cannot be tokenised; "
            "set model.tokenizer, or load the model with lenscope.load_model"
        )
    bos = tokenizer.bos_token_id if getattr(model.cfg, "default_prepend_bos", True) else None
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in _documents(texts):
        if doc:
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(int(sep))
    body = seq_len - (bos is not None)
    if len(ids) < 2:
        raise InvalidInput(
            f"texts must hold at least two tokens of text, got {len(ids)}; pass real documents"
        )
    n = max(1, len(ids) // body)
    rows = [ids[i * body : (i + 1) * body] for i in range(n)]
    if len(rows[0]) < body:  # all there is: one short sequence
        body = len(rows[0])
    tokens = torch.tensor([row[:body] for row in rows], dtype=torch.long)
    if bos is not None:
        tokens = torch.cat([torch.full((n, 1), int(bos)), tokens], dim=1)
    return tokens


def _digest(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


def _check_seq_len(model: torch.nn.Module, seq_len: Any) -> int:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if not is_int(seq_len) or not 2 <= seq_len or (n_ctx and seq_len > n_ctx):
        raise InvalidInput(
            f"seq_len must be an integer in [2, n_ctx={n_ctx}], got {seq_len!r}; pass e.g. "
            f"seq_len={min(n_ctx or 2048, 2048)}"
        )
    return int(seq_len)


def _non_negative_int(name: str, value: Any, steps: Any) -> int:
    if not is_int(value) or value < 0 or (is_int(steps) and value >= steps):
        raise InvalidInput(
            f"{name} must be an integer in [0, steps={steps}), got {value!r}; pass e.g. {name}=0"
        )
    return int(value)


def _optimizer_name(name: Any) -> str:
    if name not in ("sgd", "adam"):
        raise InvalidInput(
            f"optimizer must be 'sgd' (the paper's) or 'adam', got {name!r}; pass optimizer='sgd'"
        )
    return name


def _seed(seed: Any) -> int:
    if not is_int(seed) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    return int(seed)


def _stream_hooks(model: torch.nn.Module) -> list[str]:
    return [hook_name("resid_pre", i) for i in range(n_layers(model))] + [
        hook_name("resid_post", n_layers(model) - 1)
    ]


def _step_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of the ``n`` sequences in pass ``epoch`` over them."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def _step_rows(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Which sequences step ``step`` reads: a fixed slice of the endless shuffled stream."""
    start = step * per_step
    rows = []
    for k in range(start, start + per_step):
        epoch, i = divmod(k, n)
        rows.append(int(_step_order(n, seed, epoch)[i]))
    return rows


# ---------------------------------------------------------------------------
# The KL and its gradient, a block of rows at a time
# ---------------------------------------------------------------------------


class _KLToTarget(torch.autograd.Function):
    """``Σ_rows KL(p ‖ softmax(logits))``, keeping the gradient ``q - p`` instead of activations."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target_logp: Tensor) -> Tensor:
        logq = log_softmax(logits.detach())
        p = target_logp.exp()
        kl = (p * (target_logp - logq)).sum()
        ctx.save_for_backward(logq.exp_().sub_(p))
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (q_minus_p,) = ctx.saved_tensors
        return q_minus_p * grad, None


def _rows_per_block(d_vocab: int) -> int:
    return max(1, _ROW_BYTES // (4 * d_vocab))


def _positions(tokens: Tensor, model: torch.nn.Module) -> slice:
    """Positions that count: all but a leading BOS (an attention sink, not a prediction)."""
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    skip = bos is not None and bool((tokens[:, 0] == bos).all())
    return slice(1 if skip else 0, None)


def _capture(
    model: torch.nn.Module, tokens: Tensor
) -> tuple[Float[Tensor, "layer batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
    names = [hook_name("resid_pre", i) for i in range(n_layers(model))]
    with torch.no_grad():
        store = capture_forward(model, tokens.to(model.cfg.device), [], names)
    return torch.stack([store[name] for name in names]), store[FINAL_RESID]


class _Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        lens: TunedLens,
        sequences: Tensor,
        per_step: int,
        settings: dict[str, Any],
    ) -> None:
        self.model, self.lens, self.sequences = model, lens, sequences
        self.per_step, self.settings = per_step, settings
        device = torch.device(model.cfg.device)
        self.weight = lens.weight.clone().to(device).requires_grad_(True)
        self.bias = lens.bias.clone().to(device).requires_grad_(True)
        beta = settings["momentum"]
        if settings["optimizer"] == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(
                [self.weight, self.bias],
                lr=settings["lr"],
                betas=(beta, 0.999),
                weight_decay=settings["weight_decay"],
            )
        else:
            self.opt = torch.optim.SGD(
                [self.weight, self.bias],
                lr=settings["lr"] * (1 - beta),
                momentum=beta,
                nesterov=beta > 0,
                weight_decay=settings["weight_decay"],
            )
        steps, warm = settings["steps"], settings["warmup_steps"]

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (steps - step) / (steps - warm))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.losses: list[list[float]] = []
        self.seconds = 0.0
        self.centred: bool | None = None

    def _save(self, path: Path, step: int) -> None:
        state = {
            "format": _FORMAT + "-checkpoint",
            "settings": self.settings,
            "step": step,
            "weight": self.weight.detach().cpu(),
            "bias": self.bias.detach().cpu(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "losses": self.losses,
            "seconds": self.seconds,
            "centred": self.centred,
        }
        _atomic(path, lambda p: torch.save(state, p))

    def _resume(self, path: Path) -> int:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("settings") != self.settings:
            theirs = state.get("settings") or {}
            diff = {k: (theirs.get(k), v) for k, v in self.settings.items() if theirs.get(k) != v}
            raise InvalidInput(
                f"checkpoint {str(path)!r} was written by a run with other settings or data "
                f"(checkpoint vs now: {diff}); pass the same arguments, or another checkpoint path"
            )
        with torch.no_grad():
            self.weight.copy_(state["weight"])
            self.bias.copy_(state["bias"])
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses, self.seconds = state["losses"], state["seconds"]
        self.centred = state["centred"]
        return int(state["step"])

    def run(self, checkpoint: Path | None, every: int, progress: bool) -> TunedLens:
        steps = self.settings["steps"]
        start = self._resume(checkpoint) if checkpoint and checkpoint.is_file() else 0
        bar = _progress(steps, start, progress, model_name(self.model))
        with preserved_model(self.model), bar as shown:
            for param in self.model.parameters():
                param.requires_grad_(False)
            for step in range(start, steps):
                began = time.perf_counter()
                layer_loss = self._step(step)
                self.seconds += time.perf_counter() - began
                self.losses.append(layer_loss)
                shown.update(1)
                shown.set_postfix(loss=f"{sum(layer_loss):.3f}", refresh=False)
                if checkpoint and ((step + 1) % every == 0 or step + 1 == steps):
                    self._save(checkpoint, step + 1)
        weight = self.weight.detach().cpu()
        basis = "raw"
        if self.centred:
            weight, basis = fold_centring(weight), "any"
        positions = self.sequences.shape[1] - _positions(self.sequences, self.model).start
        training = dict(
            self.settings,
            tokens=steps * self.per_step * self.sequences.shape[1],
            positions_trained=steps * self.per_step * positions,
            sequences_per_step=self.per_step,
            seconds=round(self.seconds, 3),
            loss=[round(sum(x), 6) for x in self.losses],
            final_layer_loss=[round(x, 6) for x in self.losses[-1]] if self.losses else [],
            centred_stream=bool(self.centred),
        )
        return TunedLens(
            weight,
            self.bias.detach().cpu(),
            model_name=self.lens.model_name,
            d_vocab=self.lens.d_vocab,
            basis=basis,
            training=training,
            model=self.model,
        )

    def _step(self, step: int) -> list[float]:
        model, s = self.model, self.settings
        rows = _step_rows(self.sequences.shape[0], self.per_step, s["seed"], step)
        tokens = self.sequences[rows]
        keep = _positions(tokens, model)
        n_tokens = tokens.shape[0] * tokens[:, keep].shape[1]
        totals = torch.zeros(n_layers(model), dtype=torch.float64)
        block = _rows_per_block(int(model.cfg.d_vocab))
        self.opt.zero_grad(set_to_none=False)
        for first in range(0, tokens.shape[0], s["batch_size"]):
            hidden, final = _capture(model, tokens[first : first + s["batch_size"]])
            hidden = hidden[:, :, keep].flatten(1, 2)  # [layer, rows, d_model]
            final = final[:, keep].flatten(0, 1)
            if self.centred is None:
                self.centred = is_centred(hidden)
            for lo in range(0, final.shape[0], block):
                with torch.no_grad():
                    target = log_softmax(decode_resid(model, final[lo : lo + block]))
                for layer in range(hidden.shape[0]):
                    h = hidden[layer, lo : lo + block].float()
                    x = h + h @ self.weight[layer].T + self.bias[layer]
                    logits = decode_resid(model, x.to(hidden.dtype))
                    kl = _KLToTarget.apply(logits, target)
                    (kl / n_tokens).backward()
                    totals[layer] += float(kl.detach())
        if s["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_([self.weight, self.bias], s["max_grad_norm"])
        self.opt.step()
        self.scheduler.step()
        return (totals / n_tokens).tolist()


@contextlib.contextmanager
def _no_bar() -> Iterator[Any]:
    class _Bar:
        def update(self, n: int) -> None: ...

        def set_postfix(self, **kwargs: Any) -> None: ...

    yield _Bar()


def _progress(steps: int, start: int, show: bool, name: str) -> Any:
    if not show:
        return _no_bar()
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc=f"tuned lens {name}", unit="step")


def _atomic(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file and a rename, so it is never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _lens_folder(path: Any) -> Path:
    """A local lens folder, or the tuned-lens space's ``lens/<name>`` fetched from the hub."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputType(
            f"path must be a folder or a tuned-lens model name (str), got {type(path).__name__}; "
            "pass e.g. 'gemma-270m.lens'"
        )
    folder = Path(path)
    if (folder / CONFIG_FILE).is_file() and (folder / PARAMS_FILE).is_file():
        return folder
    if folder.exists():
        raise InvalidInput(
            f"{str(folder)!r} is not a tuned lens: it needs {CONFIG_FILE} and {PARAMS_FILE}; "
            "pass a folder written by TunedLens.save"
        )
    remote = f"lens/{str(path).strip('/')}/{CONFIG_FILE}"
    looked = (
        f"no local folder {str(folder)!r} with {CONFIG_FILE}, and the tuned-lens package's "
        f"lens file {remote} in the Hugging Face space {HUB_REPO}"
    )
    from lenscope.loading import _offline_reason

    reason = _offline_reason()
    if reason:
        raise OSError(
            f"could not load the tuned lens {str(path)!r}: {looked} cannot be fetched ({reason}); "
            "pass the folder of a saved lens, or train one with TunedLens.train"
        )
    try:
        from huggingface_hub import hf_hub_download

        files = [
            hf_hub_download(HUB_REPO, name, subfolder=f"lens/{path}", repo_type="space")
            for name in (CONFIG_FILE, PARAMS_FILE)
        ]
    except Exception as e:
        raise OSError(
            f"could not load the tuned lens {str(path)!r}: {looked} could not be fetched "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass the folder "
            "of a saved lens"
        ) from e
    return Path(files[0]).parent


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LensEvaluation:
    """Per-layer quality of a tuned lens and of the logit lens on held-out text.

    Row ``layer`` is ``blocks.{layer}.hook_resid_pre``. Every value is a mean
    over the evaluated positions (the BOS position left out; cross-entropy
    over positions that have a next token), in nats, float64.

    Attributes:
        model_name: The model's name.
        hook_names: The hook point of each row.
        tokens: Tokens evaluated (positions counted in the KL and entropy).
        kl_tuned: ``KL(p_final ‖ p_tuned)`` per layer, ``[layer]``.
        kl_logit: ``KL(p_final ‖ p_logit)`` per layer.
        ce_tuned: Cross-entropy of the next token through the tuned lens.
        ce_logit: The same through the logit lens.
        entropy_tuned: Entropy of the tuned lens's distribution.
        entropy_logit: Entropy of the logit lens's distribution.
        final_ce: The model's own next-token cross-entropy.
        final_entropy: The model's own entropy.
        corpus: Name of the held-out texts.
        lens_training: The lens's training record (tokens, seconds, settings).
    """

    model_name: str
    hook_names: tuple[str, ...]
    tokens: int
    kl_tuned: Float[Tensor, " layer"]
    kl_logit: Float[Tensor, " layer"]
    ce_tuned: Float[Tensor, " layer"]
    ce_logit: Float[Tensor, " layer"]
    entropy_tuned: Float[Tensor, " layer"]
    entropy_logit: Float[Tensor, " layer"]
    final_ce: float
    final_entropy: float
    corpus: str | None = None
    lens_training: dict[str, Any] = dataclasses.field(default_factory=dict)

    _SERIES = ("kl_tuned", "kl_logit", "ce_tuned", "ce_logit", "entropy_tuned", "entropy_logit")

    def __post_init__(self) -> None:
        """Check that every series has one value per hook name."""
        n = len(self.hook_names)
        for name in self._SERIES:
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(
                    f"{name} must have shape ({n},) (one value per hook name), got "
                    f"{tuple(getattr(self, name).shape)}"
                )

    @property
    def n_layers(self) -> int:
        """Number of rows."""
        return len(self.hook_names)

    def to_dataframe(self) -> Any:
        """One row per layer and lens: ``layer, hook_name, lens, kl, ce, entropy``."""
        import pandas as pd

        rows = [
            {
                "layer": i,
                "hook_name": self.hook_names[i],
                "lens": lens,
                "kl": float(getattr(self, f"kl_{lens}")[i]),
                "ce": float(getattr(self, f"ce_{lens}")[i]),
                "entropy": float(getattr(self, f"entropy_{lens}")[i]),
            }
            for i in range(self.n_layers)
            for lens in ("tuned", "logit")
        ]
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        """A Markdown table: per layer, KL and cross-entropy under both lenses."""
        lines = [
            "| layer | KL logit lens | KL tuned lens | CE logit lens | CE tuned lens |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for i in range(self.n_layers):
            lines.append(
                f"| {i} | {float(self.kl_logit[i]):.3f} | {float(self.kl_tuned[i]):.3f} | "
                f"{float(self.ce_logit[i]):.3f} | {float(self.ce_tuned[i]):.3f} |"
            )
        lines.append(f"| model output | 0 | 0 | {self.final_ce:.3f} | {self.final_ce:.3f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (floats as Python floats)."""
        out: dict[str, Any] = {"format": _EVAL_FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.tolist() if isinstance(value, Tensor) else value
        out["hook_names"] = list(self.hook_names)
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "LensEvaluation":
        """Inverse of :meth:`to_dict`."""
        if record.get("format") != _EVAL_FORMAT:
            raise InvalidInput(
                f"not a lens evaluation record: format {record.get('format')!r}, expected "
                f"{_EVAL_FORMAT!r}; pass what LensEvaluation.save wrote"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in record.items() if k in fields}
        for name in cls._SERIES:
            kwargs[name] = torch.tensor(kwargs[name], dtype=torch.float64)
        kwargs["hook_names"] = tuple(kwargs["hook_names"])
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (exact: floats round-trip through ``repr``)."""
        path = Path(path)
        _atomic(path, lambda p: p.write_text(json.dumps(self.to_dict(), indent=1)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LensEvaluation":
        """Read what :meth:`save` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, **kwargs: Any) -> Any:
        """Per-layer curves of both lenses (:func:`lenscope.plotting.plot_lens_comparison`)."""
        from lenscope.plotting.tuned import plot_lens_comparison

        return plot_lens_comparison(self, **kwargs)

    def __repr__(self) -> str:
        """Model, tokens and the KL at the first, middle and last layers."""
        mid = self.n_layers // 2
        pairs = ", ".join(
            f"layer {i}: {float(self.kl_logit[i]):.2f} -> {float(self.kl_tuned[i]):.2f}"
            for i in (0, mid, self.n_layers - 1)
        )
        return (
            f"LensEvaluation({self.model_name}, {self.tokens:,} tokens, KL logit -> tuned: {pairs})"
        )


def _evaluate(
    model: torch.nn.Module,
    decoders: dict[str, LogitLens],
    sequences: Tensor,
    batch_size: int,
    corpus: str | None,
    lens: TunedLens,
) -> LensEvaluation:
    n_layer = n_layers(model)
    sums = {
        f"{stat}_{name}": torch.zeros(n_layer, dtype=torch.float64)
        for stat in ("kl", "ce", "entropy")
        for name in decoders
    }
    final_ce = final_entropy = 0.0
    n_pos = n_next = 0
    block = _rows_per_block(int(model.cfg.d_vocab))
    with preserved_model(model), torch.inference_mode():
        for first in range(0, sequences.shape[0], batch_size):
            tokens = sequences[first : first + batch_size]
            keep = _positions(tokens, model)
            hidden, final = _capture(model, tokens)
            hidden = hidden[:, :, keep]
            final = final[:, keep]
            # The next token of each kept position; -1 where the sequence ends.
            nxt = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -1)], dim=1)[:, keep]
            hidden, final, nxt = hidden.flatten(1, 2), final.flatten(0, 1), nxt.flatten()
            nxt = nxt.to(final.device)
            for lo in range(0, final.shape[0], block):
                sl = slice(lo, lo + block)
                target = log_softmax(decode_resid(model, final[sl]))
                p = target.exp()
                has_next = nxt[sl] >= 0
                picked = nxt[sl].clamp(min=0)[:, None]
                final_ce += float(-target.gather(1, picked)[has_next].sum())
                final_entropy += float(-(p * target).sum())
                for name, decoder in decoders.items():
                    for layer in range(n_layer):
                        x = decoder.transform_hidden(hidden[layer, sl], layer)
                        logq = log_softmax(decode_resid(model, x))
                        q = logq.exp()
                        sums[f"kl_{name}"][layer] += float((p * (target - logq)).sum())
                        sums[f"entropy_{name}"][layer] += float(-(q * logq).sum())
                        sums[f"ce_{name}"][layer] += float(-logq.gather(1, picked)[has_next].sum())
                n_pos += final[sl].shape[0]
                n_next += int(has_next.sum())
    means = {
        key: value / (n_next if key.startswith("ce") else n_pos) for key, value in sums.items()
    }
    return LensEvaluation(
        model_name=model_name(model),
        hook_names=tuple(hook_name("resid_pre", i) for i in range(n_layer)),
        tokens=n_pos,
        final_ce=final_ce / max(n_next, 1),
        final_entropy=final_entropy / n_pos,
        corpus=corpus,
        lens_training={k: v for k, v in lens.training.items() if k not in ("loss",)},
        **means,
    )
