"""Result objects of a causal trace.

A :class:`TraceResult` holds the ``(layer, pos)`` score grid of one trace
(Meng et al., 2022, arXiv 2202.05262, Figure 1), the top-k predictions of
every restored run (what the heatmap's hover shows), the token labels, and
every setting needed to reproduce it. It is frozen: methods return new
objects or plain arrays. ``save``/``load`` round-trip exactly through JSON
(float32 values survive a trip through Python floats unchanged).
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

_FORMAT = "lenscope.TraceResult/1"
_TENSOR_FIELDS = {
    "scores": torch.float32,
    "token_ids": torch.int64,
    "top_ids": torch.int64,
    "top_probs": torch.float32,
    "clean_top_ids": torch.int64,
    "clean_top_probs": torch.float32,
    "corrupted_top_ids": torch.int64,
    "corrupted_top_probs": torch.float32,
}


class JsonRoundTrip:
    """``to_dict``/``from_dict``/``save``/``load`` for frozen result dataclasses.

    Exact through JSON: float32 values survive a trip through Python floats.
    Subclasses name their format and which fields are tensors or tuples.
    """

    _format: ClassVar[str]
    _tensor_fields: ClassVar[dict[str, torch.dtype]]
    _tuple_fields: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tensors as nested lists)."""
        out: dict[str, Any] = {"format": self._format}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                value = value.tolist()
            elif field.name == "vocab":
                value = {str(k): v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != cls._format:
            raise ValueError(
                f"expected a dict saved by {cls.__name__}.to_dict (format {cls._format!r}), "
                f"got format {data.get('format')!r}; load it with the class that saved it"
            )
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in data:
                continue
            value = data[field.name]
            if field.name in cls._tensor_fields:
                value = torch.tensor(value, dtype=cls._tensor_fields[field.name])
            elif field.name == "vocab":
                value = {int(k): v for k, v in value.items()}
            elif field.name in cls._tuple_fields and value is not None:
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write this result as JSON; :meth:`load` reads it back exactly."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a result written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclasses.dataclass(frozen=True, eq=False)
class TraceResult(JsonRoundTrip):
    """One causal trace: the metric with each ``(layer, pos)`` cell restored.

    Attributes:
        scores: Metric averaged over corrupted copies with that cell restored;
            NaN where the cell was not traced.
        clean_score: Metric on the clean prompt.
        corrupted_score: Metric averaged over the corrupted copies, nothing restored.
        tokens: Token labels of the prompt, as the tokenizer decodes each id.
        token_ids: The prompt's token ids (BOS included when the model prepends one).
        subject_range: ``(start, end)`` token positions of the subject, end exclusive.
        answer: The answer token's text.
        answer_id: The answer token's id.
        kind: Hook-point type restored (``"mlp_out"`` etc.).
        hook_names: The hook name of ``kind`` at every layer (row of ``scores``).
        window: Number of consecutive layers restored around each cell's layer.
        samples: Number of corrupted copies.
        noise_std: Absolute standard deviation of the noise added at ``hook_embed``.
        seed: Seed of the noise draws (None when an explicit noise tensor was given).
        model_name: The model's ``cfg.model_name``.
        metric: Name of the patching metric (``"prob"`` for ROME's score).
        top_ids: Top-k next tokens of each restored run (probabilities averaged over copies).
        top_probs: Their probabilities.
        clean_top_ids: Top-k of the clean run.
        clean_top_probs: Their probabilities.
        corrupted_top_ids: Top-k of the corrupted run (averaged over copies).
        corrupted_top_probs: Their probabilities.
        vocab: Text of every token id that appears above.
        prompt: The prompt text, if it was given as text.
    """

    scores: Float[Tensor, "layer pos"]
    clean_score: float
    corrupted_score: float
    tokens: tuple[str, ...]
    token_ids: Int[Tensor, " pos"]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    kind: str
    hook_names: tuple[str, ...]
    window: int
    samples: int
    noise_std: float
    seed: int | None
    model_name: str
    metric: str
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    clean_top_ids: Int[Tensor, " k"]
    clean_top_probs: Float[Tensor, " k"]
    corrupted_top_ids: Int[Tensor, " k"]
    corrupted_top_probs: Float[Tensor, " k"]
    vocab: dict[int, str]
    prompt: str | None = None

    _format: ClassVar[str] = _FORMAT
    _tensor_fields: ClassVar[dict[str, torch.dtype]] = _TENSOR_FIELDS
    _tuple_fields: ClassVar[tuple[str, ...]] = ("tokens", "hook_names", "subject_range")

    def __post_init__(self) -> None:
        """Check that shapes agree with each other."""
        n_layers, n_pos = self.scores.shape
        problems = []
        if self.token_ids.shape != (n_pos,) or len(self.tokens) != n_pos:
            problems.append(
                f"token_ids {tuple(self.token_ids.shape)} and {len(self.tokens)} tokens "
                f"should both have {n_pos} positions"
            )
        if len(self.hook_names) != n_layers:
            problems.append(f"{len(self.hook_names)} hook_names for {n_layers} layers")
        if (
            self.top_ids.shape[:2] != (n_layers, n_pos)
            or self.top_ids.shape != self.top_probs.shape
        ):
            problems.append(
                f"top_ids {tuple(self.top_ids.shape)} and top_probs "
                f"{tuple(self.top_probs.shape)} should be ({n_layers}, {n_pos}, k)"
            )
        start, end = self.subject_range
        if not 0 <= start < end <= n_pos:
            problems.append(f"subject_range {self.subject_range} outside 0..{n_pos}")
        if problems:
            raise ValueError(
                f"inconsistent TraceResult with scores {tuple(self.scores.shape)}: "
                + "; ".join(problems)
            )

    @property
    def n_layers(self) -> int:
        """Number of layers (rows of ``scores``)."""
        return int(self.scores.shape[0])

    @property
    def n_pos(self) -> int:
        """Number of token positions (columns of ``scores``)."""
        return int(self.scores.shape[1])

    @property
    def indirect_effect(self) -> Float[Tensor, "layer pos"]:
        """Score minus corrupted score: ROME's indirect effect of each cell."""
        return self.scores - self.corrupted_score

    def normalized(self) -> Float[Tensor, "layer pos"]:
        """``(score - corrupted) / (clean - corrupted)``: 1 = fully restored, 0 = no effect."""
        gap = self.clean_score - self.corrupted_score
        if gap == 0:
            return torch.full_like(self.scores, math.nan)
        return (self.scores - self.corrupted_score) / gap

    def window_layers(self, layer: int) -> tuple[int, int]:
        """Layers ``[lo, hi)`` restored for a cell at ``layer``, as ROME clips them."""
        half = self.window // 2
        return max(0, layer - half), min(self.n_layers, layer - half + self.window)

    def top_predictions(self, layer: int, pos: int) -> list[tuple[str, float]]:
        """The restored run's top-k ``(token, probability)`` for one cell."""
        return [
            (self.vocab[int(i)], float(p))
            for i, p in zip(self.top_ids[layer, pos], self.top_probs[layer, pos], strict=True)
        ]

    def peak(self) -> tuple[int, int, float]:
        """``(layer, pos, score)`` of the highest traced cell."""
        flat = torch.nan_to_num(self.scores, nan=-math.inf).flatten()
        index = int(flat.argmax())
        layer, pos = divmod(index, self.n_pos)
        return layer, pos, float(self.scores[layer, pos])

    def to_dataframe(self) -> Any:
        """A long table: one row per ``(layer, pos)`` cell with its token and effects."""
        import pandas as pd

        normalized = self.normalized()
        start, end = self.subject_range
        rows = [
            {
                "kind": self.kind,
                "layer": layer,
                "pos": pos,
                "token": self.tokens[pos],
                "is_subject": start <= pos < end,
                "score": float(self.scores[layer, pos]),
                "indirect_effect": float(self.scores[layer, pos] - self.corrupted_score),
                "normalized": float(normalized[layer, pos]),
                "top1": self.vocab[int(self.top_ids[layer, pos, 0])],
                "top1_prob": float(self.top_probs[layer, pos, 0]),
            }
            for layer in range(self.n_layers)
            for pos in range(self.n_pos)
        ]
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any) -> Any:
        """A plotly heatmap of this trace; see :func:`lenscope.plotting.plot_trace`."""
        from lenscope.plotting import plot_trace

        return plot_trace(self, **kwargs)
