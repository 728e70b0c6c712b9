"""Lens views: what every layer would predict if the model stopped there.

The logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020)
decodes an intermediate residual stream with the model's own final norm and
unembedding; the tuned lens (Belrose et al., "Eliciting Latent Predictions
from Transformers with the Tuned Lens", 2023, arXiv 2303.08112) first passes
it through a learned affine translator per layer. :func:`lens_trajectory`
computes such a prediction trajectory for a TransformerLens model at every
``(layer, pos)`` of one hook-point type and keeps only what its plots need:
per-cell statistics over the vocabulary (entropy, the answer's probability
and rank, the top-1 probability, KL divergence from the final output) and
the top-k tokens. The vocabulary axis is reduced right after decoding a chunk
of layers, so ``[layer, pos, d_vocab]`` is never built for all layers at once
(Gemma-3 has 262,144 tokens). :func:`lens_trace_cell` looks at one cell of a
causal trace (Meng et al., 2022, arXiv 2202.05262) through the lens: the
clean, corrupted and restored runs, with the trace's own noise and the
engine's restoration hooks.

Which hook point is decoded (``kind``, the same hook-point types a causal
trace restores; ``component`` is accepted as an older name for it):

* ``resid_pre``, ``resid_mid``, ``resid_post``: the residual stream at
  ``blocks.{layer}.hook_{component}``, decoded directly (the logit lens
  proper). ``resid_pre`` at layer 0 is the embedding; ``resid_post`` at the
  last layer is the model's own output.
* ``attn_out``, ``mlp_out``: a block's output *alone*, pushed through the
  same final norm and unembedding, as in "direct logit" inspection. It is not
  a residual stream, and the final norm is fitted to the residual stream (its
  scale and mean come from the vector it is given), so these read-outs are an
  approximation of the block's direct contribution to the logits.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope import engine
from lenscope.corruptions import Corruption, GaussianNoise, corruption_from_dict
from lenscope.experiment import continued, prepare
from lenscope.hooks import (
    EMBED_HOOK,
    FINAL_RESID,
    KINDS,
    capture_forward,
    check_hook_points,
    decode_resid,
    hook_name,
    model_name,
    n_layers,
    preserved_model,
    weights_description,
)
from lenscope.metrics import log_softmax
from lenscope.results import (
    GridResult,
    NoiseProperties,
    TraceResult,
    corruption_rows,
    fold_noise_fields,
    html_facts,
    short_text,
)
from lenscope.settings import TraceSettings
from lenscope.sites import site
from lenscope.tokens import answer_tokens, find_subject, prompt_tokens, token_labels
from lenscope.validation import InvalidInput, InvalidInputType, warn

COMPONENTS: tuple[str, ...] = KINDS
"""Hook-point types a lens can decode (the TransformerLens ``blocks.L.hook_<component>``)."""

STATISTICS: dict[str, tuple[str, str]] = {
    "entropy": ("entropy", "nats"),
    "answer_prob": ("answer probability", ""),
    "answer_rank": ("answer rank", ""),
    "top1_prob": ("top-1 probability", ""),
    "kl_to_final": ("KL(final ‖ layer)", "nats"),
}
"""Per-cell statistics of a :class:`LensTrajectory`: name -> (readable name, units)."""

STATISTIC_ALIASES: dict[str, str] = {"kl": "kl_to_final", "rank": "answer_rank"}
"""Short names accepted wherever a statistic is named."""

_FORMAT = "lenscope.LensTrajectory/2"
_STAT_FIELDS = tuple(STATISTICS)
_TENSOR_FIELDS = {
    **{name: torch.float32 for name in _STAT_FIELDS},
    "token_ids": torch.int64,
    "top_ids": torch.int64,
    "top_probs": torch.float32,
}
_DEFAULT_CHUNK_BYTES = 512 << 20


def resolve_statistic(statistic: str) -> str:
    """The canonical name of ``statistic`` (``"kl"`` -> ``"kl_to_final"``).

    Args:
        statistic: One of :data:`STATISTICS` or :data:`STATISTIC_ALIASES`.

    Returns:
        A key of :data:`STATISTICS`.

    Raises:
        ValueError: Unknown statistic.
    """
    name = STATISTIC_ALIASES.get(statistic, statistic) if isinstance(statistic, str) else None
    if name not in STATISTICS:
        raise InvalidInput(
            f"statistic must be one of {tuple(STATISTICS)} (or the aliases "
            f"{tuple(STATISTIC_ALIASES)}), got {statistic!r}; pass e.g. statistic='entropy'"
        )
    return name


@runtime_checkable
class LensDecoder(Protocol):
    """What :func:`lens_trajectory` needs from a lens: hidden states in, logits out.

    Any object with this ``forward`` works, e.g. an affine translator followed
    by the model's unembedding. The logits must cover the model's whole
    vocabulary, in the model's token order. ``layer`` is the row being
    decoded: for ``kind="resid_post"`` the stream *leaving* block ``layer``.

    A decoder may also have ``for_model(model, kind)``, returning the decoder
    to use for that model and hook-point type; the lens views call it first.
    :class:`lenscope.TunedLens` does, which is how it knows that ``resid_post``
    of layer ``l`` is the input of translator ``l + 1`` and how it refuses hook
    points it was not trained on. A lens object of the ``tuned-lens`` package
    indexes Hugging Face ``hidden_states`` instead and is refused: convert it
    with ``lenscope.TunedLens.load(folder, model)`` from its saved files.
    """

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"], layer: int
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits predicted from the hidden states of ``layer``."""
        ...


class LogitLens:
    """The logit lens: the model's own final norm, unembedding and logit soft-cap.

    The identity translator of the tuned-lens family (nostalgebraist, 2020):
    ``layer`` is ignored, every hidden state goes through exactly what the
    model applies after its last block (:func:`lenscope.hooks.decode_resid`),
    so the last layer's ``resid_post`` decodes to the model's own logits.

    Args:
        model: HookedTransformer or TransformerBridge.
    """

    name = "logit lens"

    def __init__(self, model: torch.nn.Module) -> None:
        """Decode with ``model``'s own head."""
        self.model = model

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"], layer: int
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Float32 logits of every position's hidden state.

        Args:
            hidden: Hidden states at one hook point.
            layer: The layer they come from (unused: the logit lens has no translator).

        Returns:
            The logits, as the model's head would produce them from ``hidden``.
        """
        batch = hidden.shape[0]
        hidden = self.transform_hidden(hidden, layer)
        flat = einops.rearrange(hidden, "batch pos d_model -> (batch pos) d_model")
        logits = decode_resid(self.model, flat)
        return einops.rearrange(logits, "(batch pos) d_vocab -> batch pos d_vocab", batch=batch)

    def transform_hidden(
        self, hidden: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """The hidden state the head decodes: ``hidden`` itself (a tuned lens translates it)."""
        return hidden

    __call__ = forward

    def __repr__(self) -> str:
        """``LogitLens(<model name>)``."""
        return f"LogitLens({model_name(self.model)})"


def _decoder_name(decoder: Any) -> str:
    return str(getattr(decoder, "name", None) or type(decoder).__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class LensTrajectory(NoiseProperties, GridResult):
    """A prediction trajectory: per ``(layer, pos)`` statistics of the lens's next-token guess.

    Row ``layer`` holds what decoding ``hook_names[layer]`` predicts at each
    position. All statistics are in float32 and use natural logarithms.

    When the trajectory comes from several runs at once (the corrupted copies
    of a causal trace, ``copies > 1``), the probabilities are first averaged
    over copies, ``p̄ = mean_c softmax(logits_c)``, and every statistic and
    the top-k are computed on that mean distribution, as the causal-tracing
    engine does for its top-k. The answer's probability is then the mean of
    the per-copy probabilities (ROME's score); entropy and KL are those of the
    mean distribution, not the mean of per-copy entropies.

    Attributes:
        component: Hook-point type decoded (``"resid_post"`` etc., see :data:`COMPONENTS`);
            also available as :attr:`kind`, the name lenscope uses elsewhere.
        hook_names: The hook name decoded at each layer (row).
        tokens: Token labels of the prompt.
        token_ids: The prompt's token ids.
        model_name: The model's ``cfg.model_name``.
        answer: The answer token's text.
        answer_id: The answer token's id; by default the final output's top-1
            token at the last position.
        entropy: Entropy of the lens distribution, in nats.
        answer_prob: Probability of the answer token.
        answer_rank: Rank of the answer token, 1 = most probable (ties do not
            push the answer down: rank is 1 + the number of strictly more probable tokens).
        top1_prob: Probability of the most probable token.
        kl_to_final: ``KL(final ‖ layer) = Σ p_final (log p_final - log p_layer)`` in
            nats, with ``p_final`` the same run's output distribution at the same
            position (decoded by the model's own head, not the lens): the
            "forward KL" of tuned-lens and the loss its translators minimise
            (Belrose et al., 2023, Section 3). It is 0 at the last ``resid_post`` layer.
        top_ids: Top-k token ids of the lens distribution, most probable first.
        top_probs: Their probabilities.
        vocab: Text of every token id in ``top_ids`` and of the answer.
        decoder: Name of the decoder (``"logit lens"`` for :class:`LogitLens`).
        copies: Number of runs averaged (1 for a single clean run).
        label: Name of the run, used as a panel title (``"clean"``, ``"corrupted"``, ...).
        prompt: The prompt text, if it was given as text.
        subject_range: ``(start, end)`` token positions of the subject, if known.
        corruption: The record of the corruption of the corrupted and
            restored runs (:meth:`lenscope.corruptions.Corruption.to_dict`: the
            trace's own, for :func:`lens_trace_cell`); None for a clean run.
            :attr:`noise_std` and :attr:`seed` read it (None without noise).
        restored_hooks: Hook points restored to their clean activations.
        restored_pos: Token position restored at those hook points.
        answer_ids: For an answer of several tokens, all of them (``answer_id``
            is the first, whose probability and rank the grids track; ``answer``
            the whole text); empty for one token.
        answer_log_prob: For an answer of several tokens, the whole answer's
            teacher-forced log-probability through the lens, per layer: the run
            is the prompt followed by the answer's first ``k - 1`` tokens, and
            row ``layer`` decodes that layer at the last prompt position and at
            each answer position, summing the log-probabilities of the tokens
            they predict. Only the last prompt position predicts the answer's
            first token, so the whole answer has one score per layer, not a
            grid. Empty for one token.
        weights: Where the model's weights came from and the precision it
            ran in (:func:`lenscope.loading.weights_description`); None for a
            model :func:`lenscope.load_model` did not build.
    """

    component: str
    hook_names: tuple[str, ...]
    tokens: tuple[str, ...]
    token_ids: Int[Tensor, " pos"]
    model_name: str
    answer: str
    answer_id: int
    entropy: Float[Tensor, "layer pos"]
    answer_prob: Float[Tensor, "layer pos"]
    answer_rank: Float[Tensor, "layer pos"]
    top1_prob: Float[Tensor, "layer pos"]
    kl_to_final: Float[Tensor, "layer pos"]
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    vocab: dict[int, str]
    decoder: str = "logit lens"
    copies: int = 1
    label: str = "clean"
    prompt: str | None = None

    _grid_field: ClassVar[str] = "entropy"
    _format: ClassVar[str] = _FORMAT
    _old_formats: ClassVar[tuple[str, ...]] = ("lenscope.LensTrajectory/1",)
    _tensor_fields: ClassVar[dict[str, torch.dtype]] = _TENSOR_FIELDS
    _tuple_fields: ClassVar[tuple[str, ...]] = (
        "tokens",
        "hook_names",
        "restored_hooks",
        "subject_range",
        "answer_ids",
        "answer_log_prob",
    )
    subject_range: tuple[int, int] | None = None
    corruption: dict[str, Any] | None = None
    restored_hooks: tuple[str, ...] = ()
    restored_pos: int | None = None
    answer_ids: tuple[int, ...] = ()
    answer_log_prob: tuple[float, ...] = ()
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`JsonRoundTrip.to_dict`; answer tokens and weights only when there are some."""
        out = super().to_dict()
        for name in ("answer_ids", "answer_log_prob", "weights"):
            if not getattr(self, name):
                del out[name]
        return out

    def __post_init__(self) -> None:
        """Check that shapes agree with each other."""
        if self.component not in COMPONENTS:
            raise InvalidInput(
                f"component must be one of {COMPONENTS}, got {self.component!r}; "
                "pass e.g. component='resid_post'"
            )
        n_layer, n_pos = self.entropy.shape
        problems = [
            f"{name} {tuple(getattr(self, name).shape)} should be ({n_layer}, {n_pos})"
            for name in _STAT_FIELDS
            if tuple(getattr(self, name).shape) != (n_layer, n_pos)
        ]
        problems += self._grid_problems()
        if self.answer_id not in self.vocab:
            problems.append(f"answer_id {self.answer_id} missing from vocab")
        if self.answer_log_prob and len(self.answer_log_prob) != n_layer:
            problems.append(
                f"answer_log_prob has {len(self.answer_log_prob)} layers, should have {n_layer}"
            )
        if problems:
            raise InvalidInput(
                f"inconsistent LensTrajectory with entropy {(n_layer, n_pos)}: "
                + "; ".join(problems)
            )

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A ``LensTrajectory/1`` record (noise std and seed as fields) in this format."""
        return {**fold_noise_fields(data, samples=data.get("copies", 1)), "format": cls._format}

    @property
    def kind(self) -> str:
        """The hook-point type decoded (the field ``component``, under lenscope's common name)."""
        return self.component

    def statistic(self, name: str) -> Float[Tensor, "layer pos"]:
        """The ``[layer, pos]`` grid of one statistic (a :data:`STATISTICS` key, or ``"kl"``)."""
        return getattr(self, resolve_statistic(name))

    def with_label(self, label: str) -> "LensTrajectory":
        """A copy with another run label (the panel title in :func:`plot_lens`)."""
        return dataclasses.replace(self, label=label)

    def __repr__(self) -> str:
        """One line: run, model, lens, component, prompt, answer and its fate at the last token."""
        prompt = "token ids" if self.prompt is None else short_text(self.prompt)
        return (
            f"LensTrajectory(label={short_text(self.label, 30)}, "
            f"model={short_text(self.model_name, 40)}, decoder={short_text(self.decoder, 30)}, "
            f"component={self.component!r}, prompt={prompt} ({self.n_pos} tokens), "
            f"answer={short_text(self.answer, 30)}: {self._answer_text()})"
        )

    def settings_rows(self, *, tokens: bool = False) -> list[tuple[str, str]]:
        """The run's settings as ``(name, text)`` rows, for settings tables.

        Run, model (and its weights, where known), decoder, component, prompt (and
        with ``tokens`` its length), answer.
        """
        return [
            ("run", f"{self.label} ({self.copies} cop{'y' if self.copies == 1 else 'ies'})"),
            ("model", self.model_name),
            *([("weights", self.weights)] if self.weights else []),
            ("decoder", self.decoder),
            ("component", f"{self.component} ({self.hook_names[0]} ... {self.hook_names[-1]})"),
            ("prompt", "(token ids)" if self.prompt is None else repr(self.prompt)),
            *([("tokens", str(self.n_pos))] if tokens else []),
            ("answer", f"{self.answer!r} (id {self.answer_id})"),
        ]

    def _repr_html_(self) -> str:
        """The facts of :meth:`__repr__` and the run's settings, as a small table (Jupyter)."""
        rows = [*self.settings_rows(tokens=True), ("at the last token", self._answer_text())]
        if self.corruption is not None:
            rows += corruption_rows(self.corruption)
        if self.restored_hooks:
            rows.append(
                (
                    "restored",
                    f"{', '.join(self.restored_hooks)} at pos {self.restored_pos}",
                )
            )
        return html_facts("LensTrajectory", rows)

    def _answer_text(self) -> str:
        """The answer's probability at the last layer and token, and where it first ranks 1."""
        first = (self.answer_rank[:, -1] == 1).nonzero().flatten().tolist()
        where = f"first top-1 at layer {first[0]}" if first else "never top-1"
        return f"p={float(self.answer_prob[-1, -1]):.3g} at the last layer, {where}"

    def to_dataframe(self) -> Any:
        """A long table: one row per ``(layer, pos)`` cell with every statistic and the top-1."""
        import pandas as pd

        stats = {name: getattr(self, name).tolist() for name in _STAT_FIELDS}
        rows = [
            {
                "label": self.label,
                "component": self.component,
                "hook_name": self.hook_names[layer],
                "layer": layer,
                "pos": pos,
                "token": self.tokens[pos],
                **{name: grid[layer][pos] for name, grid in stats.items()},
                "top1": self.vocab[int(self.top_ids[layer, pos, 0])],
            }
            for layer in range(self.n_layers)
            for pos in range(self.n_pos)
        ]
        frame = pd.DataFrame(rows)
        frame["answer_rank"] = frame["answer_rank"].astype("int64")
        return frame

    def plot(self, statistic: str = "entropy", **kwargs: Any) -> Any:
        """A plotly heatmap of one statistic; see :func:`lenscope.plotting.lens.plot_lens`."""
        from lenscope.plotting.lens import plot_lens

        return plot_lens(self, statistic=statistic, **kwargs)


class CellTrajectories(NamedTuple):
    """A causal-trace cell through the lens: three runs with the same noise.

    Unpacks as ``clean, corrupted, restored`` and plots with
    ``plot_lens(*cell, statistic=...)``.
    """

    clean: LensTrajectory
    corrupted: LensTrajectory
    restored: LensTrajectory


def _lens_kind(kind: str | None, component: str | None) -> str:
    """The hook-point type a lens decodes, given as ``kind`` or by its older name ``component``."""
    if kind is not None and component is not None and kind != component:
        raise InvalidInput(
            f"kind and component name the same thing (component is its older name), got "
            f"kind={kind!r} and component={component!r}; pass only kind=..."
        )
    return check_component(kind or component or "resid_post")


def check_component(component: str) -> str:
    """Return ``component`` if it is a known hook-point type, else raise a ``ValueError``."""
    if component not in COMPONENTS:
        raise InvalidInput(
            f"component must be one of {COMPONENTS} (the hook point decoded at every "
            f"layer), got {component!r}; pass e.g. component='resid_post'"
        )
    return component


def lens_trajectory(
    model: torch.nn.Module,
    prompt: str | Tensor | Sequence[int],
    *,
    kind: str | None = None,
    component: str | None = None,
    answer: str | int | Sequence[int] | None = None,
    subject: str | tuple[int, int] | None = None,
    decoder: LensDecoder | None = None,
    top_k: int = 10,
    layer_chunk: int | None = None,
    label: str = "clean",
) -> LensTrajectory:
    """The prediction trajectory of one prompt through a lens.

    Runs the model once, keeping ``blocks.{layer}.hook_{component}`` at every
    layer and the final residual stream (the forward pass stops there), then
    decodes ``layer_chunk`` layers at a time and reduces each chunk to
    statistics and top-k before decoding the next.

    Example:
        >>> prompt = "The Eiffel Tower is located in the city of"
        >>> traj = lens_trajectory(model, prompt)  # doctest: +SKIP
        >>> traj.plot(statistic="entropy")  # doctest: +SKIP

    Args:
        model: HookedTransformer or TransformerBridge.
        prompt: Text (tokenised with the model's default BOS handling) or 1-D token ids.
        kind: Hook-point type decoded at every layer (default ``resid_post``); see the
            module docstring for how ``attn_out`` and ``mlp_out`` are read.
        component: The older name of ``kind``.
        answer: Token whose probability and rank are tracked (text, an id or
            ids); default the model's top-1 prediction at the last position.
            An answer of several tokens: the grids track its first token, and
            ``answer_log_prob`` holds the whole answer's teacher-forced
            log-probability per layer (see :class:`LensTrajectory`).
        subject: The subject's text or token range, only to mark it in plots.
        decoder: Lens that turns hidden states into logits; default :class:`LogitLens`.
        top_k: Predictions kept per cell (for hover tables and cell text).
        layer_chunk: Layers decoded at once; default as many as fit in about
            512 MB of float32 ``[pos, d_vocab]`` buffers.
        label: Name of this run in plots.

    Returns:
        The :class:`LensTrajectory`.
    """
    component = _lens_kind(kind, component)
    n_layer = n_layers(model)
    _check_top_k(top_k, model)
    _check_layer_chunk(layer_chunk)
    names = [hook_name(component, layer) for layer in range(n_layer)]
    final_name = hook_name("resid_post", n_layer - 1)
    check_hook_points(model, [*names, final_name])
    tokens = prompt_tokens(model, prompt)
    answer_ids = None if answer is None else answer_tokens(model, answer)
    answer_id = None if answer_ids is None else answer_ids[0]
    subject_range = None if subject is None else find_subject(model, tokens, subject)
    decoder = LogitLens(model) if decoder is None else _check_decoder(decoder, model, component)
    several = answer_ids is not None and len(answer_ids) > 1
    extra: dict[str, Any] = {}

    with preserved_model(model), torch.inference_mode():
        if several:
            # Teacher forcing: the prompt's positions are the grid, the answer's
            # first k - 1 tokens follow them (a causal model's prompt positions
            # do not see them).
            n_pos = int(tokens.shape[0])
            store = capture_forward(
                model, continued(tokens, answer_ids[:-1])[None], [], names, clone=True
            )
            hidden = torch.stack([store[name] for name in names])
            extra = dict(
                answer_ids=tuple(answer_ids),
                answer_log_prob=tuple(
                    _answer_log_prob(
                        decoder, hidden[:, :, n_pos - 1 :], answer_ids, int(model.cfg.d_vocab)
                    ).tolist()
                ),
            )
            hidden, final = hidden[:, :, :n_pos], store[FINAL_RESID][:, :n_pos]
        else:
            store = capture_forward(model, tokens[None], [], names, clone=True)
            hidden = torch.stack([store[name] for name in names])
            final = store[FINAL_RESID]
        stats = _statistics(model, decoder, hidden, final, answer_id, top_k, layer_chunk)
    return _make_trajectory(
        model,
        stats,
        tokens,
        component,
        names,
        decoder,
        label=label,
        prompt=prompt if isinstance(prompt, str) else None,
        subject_range=subject_range,
        **extra,
    )


def _answer_log_prob(
    decoder: LensDecoder,
    hidden: Float[Tensor, "layer batch answer d_model"],
    answer_ids: Sequence[int],
    d_vocab: int,
) -> Float[Tensor, " layer"]:
    """Each layer's teacher-forced log-probability of the whole answer through the lens.

    ``hidden[:, :, j]`` is the position predicting answer token ``j``; with
    several copies, the mean over copies of each copy's log-probability.
    """
    ids = torch.tensor(list(answer_ids), device=hidden.device)
    out = []
    for layer, h in enumerate(hidden):
        log_probs = log_softmax(_decode(decoder, h, layer, d_vocab))
        picked = log_probs.gather(-1, ids.expand(h.shape[0], -1)[..., None])[..., 0]
        out.append(picked.double().sum(-1).mean())
    return torch.stack(out).float().cpu()


def lens_trace_cell(
    tracer_or_model: Any,
    result: TraceResult,
    layer: int,
    pos: int,
    *,
    kind: str | None = None,
    component: str | None = None,
    decoder: LensDecoder | None = None,
    noise_tensor: Float[Tensor, "samples subject_pos d_model"] | None = None,
    top_k: int = 10,
    layer_chunk: int | None = None,
) -> CellTrajectories:
    """One cell of a causal trace seen through the lens: clean, corrupted and restored runs.

    The corrupted copies get exactly the trace's corruption (rebuilt from its
    record, ``result.corruption``: for noise, its ``samples``, ``noise_std``
    and ``seed`` with :func:`lenscope.noise.draw_noise`),
    and the restored run puts the clean ``result.kind`` activation back at
    ``pos`` in the cell's window of layers (:func:`lenscope.engine.restore_windows`)
    with the engine's own hooks. So the restored trajectory's final answer
    probability at the last position is the trace's score for that cell when
    the trace's metric is ``"prob"``. The corrupted and restored trajectories
    are averaged over the ``samples`` copies as :class:`LensTrajectory` describes.
    Each run's ``kl_to_final`` is to its own final output, so restoring a
    cell changes the restored run's KL at every layer of the positions it affects.

    Args:
        tracer_or_model: A :class:`~lenscope.tracer.CausalTracer` or its model.
        result: The trace the cell belongs to, traced on this model.
        layer: The cell's layer (row of ``result.scores``).
        pos: The cell's token position.
        kind: Hook-point type decoded by the lens (default ``resid_post``; need not
            be ``result.kind``, the type the trace restored).
        component: The older name of ``kind``.
        decoder: Lens that turns hidden states into logits; default :class:`LogitLens`.
        noise_tensor: The noise, for a trace that was given an explicit
            ``noise_tensor`` (``result.seed is None``).
        top_k: Predictions kept per cell.
        layer_chunk: Layers decoded at once; see :func:`lens_trajectory`.

    Returns:
        ``CellTrajectories(clean, corrupted, restored)``, all tracking ``result.answer``.
    """
    model = getattr(tracer_or_model, "model", tracer_or_model)
    if not isinstance(result, TraceResult):
        raise InvalidInputType(
            f"result must be a TraceResult, got {type(result).__name__}; "
            "pass the result of CausalTracer.trace"
        )
    if result.direction != "denoise":
        raise InvalidInput(
            f"lens_trace_cell views a restored (denoising) run, but this trace has "
            f"direction={result.direction!r}; trace with direction='denoise' to view its cells"
        )
    component = _lens_kind(kind, component)
    n_layer = n_layers(model)
    if n_layer != result.n_layers:
        raise InvalidInput(
            f"result must come from this model: it has {result.n_layers} layers, the model "
            f"{model_name(model)!r} has {n_layer}; pass the model that was traced"
        )
    if result.model_name != model_name(model):
        warn(
            f"result was traced on {result.model_name!r} but the model is "
            f"{model_name(model)!r}; the lens assumes they are the same model"
        )
    for name, value, size in (("layer", layer, result.n_layers), ("pos", pos, result.n_pos)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise InvalidInput(
                f"{name} must be an integer in [0, {size}) (a cell of result.scores), "
                f"got {value!r}; pass e.g. the first two entries of result.peak()"
            )
    _check_top_k(top_k, model)
    _check_layer_chunk(layer_chunk)

    corruption = _trace_corruption(result, noise_tensor)
    names = [hook_name(component, j) for j in range(n_layer)]
    where = site(result.kind)
    cells = torch.tensor([[layer, pos], [layer, pos]])
    # Two cells: the first restores nothing (the corrupted run), the second the cell.
    windows = engine.restore_windows(cells, result.window, n_layer)
    windows[0] = False
    restored_names = [name for name, w in zip(where.hook_names(n_layer), windows[1]) if w]
    final_name = hook_name("resid_post", n_layer - 1)
    check_hook_points(model, [EMBED_HOOK, *names, *restored_names, final_name])
    decoder = LogitLens(model) if decoder is None else _check_decoder(decoder, model, component)
    tokens = result.token_ids.to(model.cfg.device)
    samples = result.samples

    # The trace's own corruption, bound through the stage every method shares.
    prepared = prepare(
        model,
        tokens,
        result.subject_range,
        TraceSettings(kinds=(where,), windows=result.window, corruption=corruption),
    )
    with preserved_model(model), torch.inference_mode():
        bound = prepared.bind()
        clean_store = capture_forward(
            model, tokens[None], [], [*names, *restored_names], clone=True
        )
        # Rows (cell sample): cell 0 is the corrupted run, cell 1 the restored one.
        # The lens reads each hook point after the restoring hook there.
        store = engine.forward_cells(
            model,
            bound,
            where,
            windows,
            where.cell_mask(cells[:, 1:], tokens.shape[0]),
            {name: clean_store[name] for name in restored_names},
            names,
            clone=True,
        )
        hidden = torch.stack([store[name] for name in names])
        final = store[FINAL_RESID]
        clean_hidden = torch.stack([clean_store[name] for name in names])
        runs = {
            "clean": (clean_hidden, clean_store[FINAL_RESID]),
            "corrupted": (hidden[:, :samples], final[:samples]),
            "restored": (hidden[:, samples:], final[samples:]),
        }
        stats = {
            run: _statistics(model, decoder, h, f, result.answer_id, top_k, layer_chunk)
            for run, (h, f) in runs.items()
        }

    common = dict(
        prompt=result.prompt, subject_range=result.subject_range, tokens_labels=result.tokens
    )
    clean = _make_trajectory(
        model, stats["clean"], tokens, component, names, decoder, label="clean", **common
    )
    noisy = dict(copies=samples, corruption=dict(result.corruption), **common)
    corrupted = _make_trajectory(
        model, stats["corrupted"], tokens, component, names, decoder, label="corrupted", **noisy
    )
    lo, hi = result.window_layers(layer)
    where = f"layer {lo}" if hi - lo == 1 else f"layers {lo}–{hi - 1}"
    restored = _make_trajectory(
        model,
        stats["restored"],
        tokens,
        component,
        names,
        decoder,
        label=f"restored {result.kind} @ {where}, pos {pos}",
        restored_hooks=tuple(restored_names),
        restored_pos=pos,
        **noisy,
    )
    return CellTrajectories(clean=clean, corrupted=corrupted, restored=restored)


def _trace_corruption(result: TraceResult, noise_tensor: Tensor | None) -> Corruption:
    """The corruption ``result`` was traced with, rebuilt from its record."""
    if noise_tensor is not None:
        return GaussianNoise(samples=result.samples, noise_tensor=noise_tensor)
    return corruption_from_dict(dict(result.corruption))


def _check_top_k(top_k: Any, model: torch.nn.Module) -> None:
    d_vocab = int(model.cfg.d_vocab)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= d_vocab:
        raise InvalidInput(
            f"top_k must be an integer in [1, d_vocab={d_vocab}], got {top_k!r}; pass e.g. top_k=10"
        )


def _check_layer_chunk(layer_chunk: Any) -> None:
    if layer_chunk is None:
        return
    if isinstance(layer_chunk, bool) or not isinstance(layer_chunk, int) or layer_chunk < 1:
        raise InvalidInput(
            f"layer_chunk must be a positive integer (layers decoded at once), got "
            f"{layer_chunk!r}; pass e.g. layer_chunk=4, or None for automatic"
        )


def _check_decoder(decoder: Any, model: torch.nn.Module, kind: str) -> LensDecoder:
    """``decoder`` checked, and bound to ``model`` and ``kind`` if it can be (``for_model``)."""
    if type(decoder).__module__.split(".")[0] == "tuned_lens":
        raise InvalidInputType(
            f"decoder is a lens object of the tuned-lens package ({type(decoder).__name__}), "
            "which indexes Hugging Face hidden_states (and expects their basis), not lenscope's "
            "rows; save it with lens.save(folder) and pass lenscope.TunedLens.load(folder, model)"
        )
    bind = getattr(decoder, "for_model", None)
    if callable(bind):
        decoder = bind(model, kind)
    if not callable(getattr(decoder, "forward", None)):
        raise InvalidInputType(
            f"decoder must have a method forward(hidden [batch, pos, d_model], layer) -> "
            f"logits [batch, pos, d_vocab], got {type(decoder).__name__}; pass e.g. "
            "LogitLens(model) or a trained tuned lens"
        )
    return decoder


def _auto_layer_chunk(batch: int, n_pos: int, d_vocab: int, n_layer: int) -> int:
    """Layers per chunk keeping the float32 ``[pos, d_vocab]`` buffers near 512 MB.

    Chunks are balanced (18 layers that fit 7 at a time go as 6 + 6 + 6): a
    bigger matrix product per chunk runs closer to the CPU's peak speed.
    """
    # Per copy: the unembedding's product and bias sum, and the log-softmax;
    # then the copy-mean log-probs, probabilities, the KL's difference and a mask.
    per_layer = 4 * n_pos * d_vocab * (3 * batch + 4)
    fits = int(min(n_layer, max(1, _DEFAULT_CHUNK_BYTES // per_layer)))
    return math.ceil(n_layer / math.ceil(n_layer / fits))


def _log_probs(
    logits: Float[Tensor, "*chunk batch pos d_vocab"],
) -> Float[Tensor, "*chunk pos d_vocab"]:
    """Log of the copy-mean distribution, ``log mean_c softmax(logits_c)``, computed stably.

    Clamped to the smallest finite float32, so a token with probability 0
    (a decoder masking it with ``-inf``) adds ``0 * finite = 0`` to sums of
    ``p log p`` rather than NaN.
    """
    log_probs = log_softmax(logits)
    copies = log_probs.shape[-3]
    if copies == 1:
        log_probs = log_probs.squeeze(-3)
    else:
        log_probs = torch.logsumexp(log_probs, dim=-3) - math.log(copies)
    return log_probs.clamp_(min=torch.finfo(torch.float32).min)


def _chunk_logits(
    decoder: LensDecoder,
    hidden: Float[Tensor, "chunk batch pos d_model"],
    first: int,
    d_vocab: int,
) -> Float[Tensor, "chunk batch pos d_vocab"]:
    """Decode consecutive layers ``first, first + 1, ...`` of ``hidden``.

    A :class:`LogitLens` (and a tuned lens bound to a model, which is one)
    translates each layer with its ``transform_hidden``, then the whole chunk
    goes through the unembedding in one matrix product: the
    ``[d_model, d_vocab]`` matrix (671 MB on Gemma-3) is then read once per
    chunk, not once per layer.
    """
    if isinstance(decoder, LogitLens):
        n = hidden.shape[0]
        if type(decoder).transform_hidden is not LogitLens.transform_hidden:
            hidden = torch.stack(
                [decoder.transform_hidden(h, first + i) for i, h in enumerate(hidden)]
            )
        flat = einops.rearrange(hidden, "chunk batch pos d_model -> (chunk batch) pos d_model")
        logits = _decode(LogitLens(decoder.model), flat, first, d_vocab)
        return einops.rearrange(
            logits, "(chunk batch) pos d_vocab -> chunk batch pos d_vocab", chunk=n
        )
    return torch.stack(
        [_decode(decoder, layer, first + i, d_vocab) for i, layer in enumerate(hidden)]
    )


def _statistics(
    model: torch.nn.Module,
    decoder: LensDecoder,
    hidden: Float[Tensor, "layer batch pos d_model"],
    final: Float[Tensor, "batch pos d_model"],
    answer_id: int | None,
    top_k: int,
    layer_chunk: int | None,
) -> dict[str, Any]:
    """Statistics and top-k of every ``(layer, pos)``, decoding ``layer_chunk`` layers at a time."""
    n_layer, batch, n_pos, _ = hidden.shape
    d_vocab = int(model.cfg.d_vocab)
    final_logits = decode_resid(model, einops.rearrange(final, "batch pos d -> (batch pos) d"))
    final_logp = _log_probs(
        einops.rearrange(final_logits, "(batch pos) d_vocab -> batch pos d_vocab", batch=batch)
    )  # [pos, d_vocab]
    del final_logits
    if answer_id is None:
        answer_id = int(final_logp[-1].argmax())
    final_p = final_logp.exp().double()
    final_logp = final_logp.double()
    chunk = layer_chunk or _auto_layer_chunk(batch, n_pos, d_vocab, n_layer)

    parts: dict[str, list[Tensor]] = {name: [] for name in (*_STAT_FIELDS, "top_ids", "top_probs")}
    for first in range(0, n_layer, chunk):
        logits = _chunk_logits(decoder, hidden[first : first + chunk], first, d_vocab)
        logp = _log_probs(logits)  # [chunk, pos, d_vocab]
        del logits
        probs = logp.exp()
        entropy = torch.stack([-_vocab_dot(p, lp) for p, lp in zip(probs, logp)])
        kl = torch.stack([_vocab_dot(final_p, final_logp - lp.double()) for lp in logp])
        answer_logp = logp[..., answer_id]
        rank = 1 + (logp > answer_logp[..., None]).sum(-1)
        best = probs.topk(top_k, dim=-1)
        parts["entropy"].append(entropy)
        parts["answer_prob"].append(answer_logp.exp())
        parts["answer_rank"].append(rank.float())
        parts["top1_prob"].append(best.values[..., 0])
        parts["kl_to_final"].append(kl)
        parts["top_ids"].append(best.indices)
        parts["top_probs"].append(best.values)
        del logp, probs
    out: dict[str, Any] = {name: torch.cat(grids).cpu() for name, grids in parts.items()}
    for name in (*_STAT_FIELDS, "top_probs"):
        out[name] = out[name].float()
    out["answer_id"] = answer_id
    return out


def _vocab_dot(
    weights: Float[Tensor, "pos d_vocab"], values: Float[Tensor, "pos d_vocab"]
) -> Float[Tensor, " pos"]:
    """``sum_v weights * values`` at each position, accumulated in float64.

    A float32 dot product over Gemma-3's 262,144 tokens is off by up to 1e-2
    nats (entropy and KL of the logit lens on "Angela Merkel is the chancellor
    of"); in float64 the sum is exact to far below the float32 rounding of its
    inputs. One layer at a time, the float64 copies are ``[pos, d_vocab]``.
    """
    return torch.einsum("p v, p v -> p", weights.double(), values.double())


def _decode(
    decoder: LensDecoder, hidden: Float[Tensor, "batch pos d_model"], layer: int, d_vocab: int
) -> Float[Tensor, "batch pos d_vocab"]:
    logits = decoder.forward(hidden, layer)
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (*hidden.shape[:2], d_vocab):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InvalidInput(
            f"decoder.forward(hidden, layer) must return logits of shape (batch, pos, d_vocab) "
            f"= {(*hidden.shape[:2], d_vocab)}, got {shape} at layer {layer}; the lens must "
            "decode to the model's whole vocabulary"
        )
    return logits.float()


def _make_trajectory(
    model: torch.nn.Module,
    stats: dict[str, Any],
    tokens: Int[Tensor, " pos"],
    component: str,
    names: Sequence[str],
    decoder: LensDecoder,
    *,
    label: str,
    tokens_labels: tuple[str, ...] | None = None,
    **fields: Any,
) -> LensTrajectory:
    answer_id = stats["answer_id"]
    ids = sorted({answer_id, *stats["top_ids"].unique().tolist()})
    vocab = dict(zip(ids, token_labels(model, ids), strict=True))
    several = fields.get("answer_ids", ())
    return LensTrajectory(
        component=component,
        hook_names=tuple(names),
        tokens=tokens_labels if tokens_labels is not None else token_labels(model, tokens),
        token_ids=tokens.cpu(),
        model_name=model_name(model),
        answer="".join(token_labels(model, list(several))) if several else vocab[answer_id],
        answer_id=answer_id,
        entropy=stats["entropy"],
        answer_prob=stats["answer_prob"],
        answer_rank=stats["answer_rank"],
        top1_prob=stats["top1_prob"],
        kl_to_final=stats["kl_to_final"],
        top_ids=stats["top_ids"],
        top_probs=stats["top_probs"],
        vocab=vocab,
        decoder=_decoder_name(decoder),
        label=label,
        weights=weights_description(model),
        **fields,
    )
