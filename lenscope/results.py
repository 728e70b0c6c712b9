"""Result objects of a causal trace.

A :class:`TraceResult` holds the ``(layer, pos)`` score grid of one trace
(Meng et al., 2022, arXiv 2202.05262, Figure 1), the top-k predictions of
every restored run (what the heatmap's hover shows), the token labels, and
every setting needed to reproduce it. It is frozen: methods return new
objects or plain arrays. ``save``/``load`` round-trip exactly through
standard JSON (float32 values survive a trip through Python floats
unchanged; cells not traced, NaN in memory, are ``null`` in the file). The
JSON policy and the base shared by every ``(layer, pos)`` result
(:class:`GridResult`) live here too.
"""

import dataclasses
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenscope.validation import InvalidInput

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


def to_json_value(value: Any) -> Any:
    """A JSON-ready copy of ``value``: tensors as nested lists, NaN and infinities as ``null``.

    The one JSON policy of lenscope's results: standard JSON (``jq`` and
    JavaScript's ``JSON.parse`` read it), exact for float32 values, which
    survive a trip through Python floats unchanged.
    """
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    return value


def tensor_from_json(value: Any, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`to_json_value` for a tensor (``null`` becomes NaN)."""
    if dtype.is_floating_point:
        value = _nulls_to_nan(value)
    return torch.tensor(value, dtype=dtype)


def _nulls_to_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return value


def short_text(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut to about ``limit`` characters with an ellipsis (for reprs)."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def html_facts(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A small HTML table of ``(name, value)`` rows under a bold title, every text escaped.

    The rich display of result objects in Jupyter (their ``_repr_html_``).
    """
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(name)}</th>"
        f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table><caption><b>{html.escape(title)}</b></caption>{body}</table>"


_JSON_KINDS = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def check_record(data: Any, expected: str, writer: str, required: Sequence[str] = ()) -> None:
    """Raise :class:`InvalidInput` unless ``data`` is a record ``writer`` wrote.

    Args:
        data: The parsed JSON.
        expected: The ``"format"`` field ``writer`` writes, e.g. ``"lenscope.TraceResult/1"``.
        writer: What writes such records, e.g. ``"TraceResult.to_dict"``.
        required: Fields every such record has.
    """
    rule = f"expected a dict saved by {writer} (format {expected!r})"
    if not isinstance(data, Mapping):
        kind = _JSON_KINDS.get(type(data), type(data).__name__)
        raise InvalidInput(
            f"{rule}, got a JSON {kind}; it was not written by lenscope: pass what {writer} wrote"
        )
    found = data.get("format")
    if found is None:
        raise InvalidInput(
            f"{rule}, got a dict without a 'format' field; it is damaged or was not written "
            f"by lenscope: save the result again"
        )
    if found != expected:
        fix = "load it with the class that saved it"
        if str(found).startswith("lenscope."):
            fix = f"load it with {str(found).removeprefix('lenscope.').partition('/')[0]}.load"
        raise InvalidInput(f"{rule}, got format {found!r}; {fix}")
    missing = [name for name in required if name not in data]
    if missing:
        raise InvalidInput(
            f"a {writer.partition('.')[0]} record needs the fields {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, which this one lacks; it is damaged "
            "or was not written by lenscope: save the result again"
        )


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, saying which file and what to do when it cannot be read.

    Args:
        path: The file.
        what: What the file should hold, e.g. ``"a TraceResult saved by TraceResult.save"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist or is not a file; pass the path of {what}"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(
            f"{str(path)!r} must hold {what}, but it is not valid JSON ({e}); the file is "
            "damaged or truncated: save the result again"
        ) from e


def load_record(path: str | Path, name: str, from_dict: Callable[[Any], Any]) -> Any:
    """Read a result file, saying which file and what to do when it is damaged.

    Args:
        path: The file.
        name: The result class's name, e.g. ``"TraceResult"``.
        from_dict: Builds the result from the parsed JSON.
    """
    what = f"a {name} saved by {name}.save"
    data = read_json(path, what)
    try:
        return from_dict(data)
    except InvalidInput as e:
        raise InvalidInput(f"{str(path)!r} must hold {what}: {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise InvalidInput(
            f"{str(path)!r} must hold {what}, but a field has the wrong type or shape "
            f"({type(e).__name__}: {e}); the file is damaged: save the result again"
        ) from e


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` (already :func:`to_json_value`-ready) as standard JSON."""
    path = Path(path)
    path.write_text(json.dumps(data, allow_nan=False))
    return path


class TraceInterrupted(KeyboardInterrupt):
    """Ctrl-C in a call of several parts (kinds of a trace, facts of a dataset), with those done.

    A ``KeyboardInterrupt``, so that it stops a program as Ctrl-C does; catch
    it to keep what finished. The model is left exactly as it was.

    Example:
        >>> try:  # doctest: +SKIP
        ...     results = tracer.trace_kinds(prompt, subject)
        ... except lenscope.TraceInterrupted as e:
        ...     results = e.results  # the kinds that finished

    Attributes:
        results: What finished, in the shape the call returns: ``{kind:
            TraceResult}`` (``{metric: {kind: TraceResult}}`` with several
            metrics) for a trace, a :class:`~lenscope.DatasetSummary` of the
            facts traced for a dataset.
        finished: How many parts finished.
        total: How many parts the call had.
    """

    def __init__(self, message: str, results: Any, finished: int, total: int) -> None:
        """Keep ``results``; ``message`` says what finished and how to get it."""
        super().__init__(message)
        self.results = results
        self.finished = finished
        self.total = total

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle with every argument (Ray workers send exceptions back pickled)."""
        return (type(self), (str(self), self.results, self.finished, self.total))


def interrupted_trace(
    error: KeyboardInterrupt, results: Mapping[str, Any], kinds: Sequence[str]
) -> TraceInterrupted:
    """The :class:`TraceInterrupted` of a trace whose ``kinds`` were cut short by ``error``.

    Args:
        error: The Ctrl-C.
        results: The results of the kinds that finished, as the call returns
            them (``{kind: result}`` or ``{metric: {kind: result}}``).
        kinds: Every kind the call traces, in order.
    """
    first = next(iter(results.values()), None)
    done = [k for k in kinds if k in (first if isinstance(first, Mapping) else results)]
    left = [k for k in kinds if k not in done]
    if done:
        how = (
            f"{', '.join(done)} finished; their results are in this exception's .results "
            "(except lenscope.TraceInterrupted as e: results = e.results)"
        )
    else:
        how = "no kind finished, so .results holds none"
    message = (
        f"interrupted after {len(done)} of {len(kinds)} kinds ({', '.join(left)} not traced); {how}"
    )
    return TraceInterrupted(message, dict(results), len(done), len(kinds))


class JsonRoundTrip:
    """``to_dict``/``from_dict``/``save``/``load`` for frozen result dataclasses.

    Exact through standard JSON (:func:`to_json_value`). Subclasses name
    their format and which fields are tensors or tuples.
    """

    _format: ClassVar[str]
    _tensor_fields: ClassVar[dict[str, torch.dtype]]
    _tuple_fields: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tensors as nested lists, NaN as ``null``)."""
        out: dict[str, Any] = {"format": self._format}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            out[field.name] = to_json_value(getattr(self, field.name))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Inverse of :meth:`to_dict`; :class:`InvalidInput` for parsed JSON it did not write."""
        required = [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        check_record(data, cls._format, f"{cls.__name__}.to_dict", required)
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in data:
                continue
            value = data[field.name]
            if field.name in cls._tensor_fields:
                value = tensor_from_json(value, cls._tensor_fields[field.name])
            elif field.name == "vocab":
                value = {int(k): v for k, v in value.items()}
            elif field.name in cls._tuple_fields and value is not None:
                value = tuple(value)
            kwargs[field.name] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write this result as standard JSON; :meth:`load` reads it back exactly."""
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a result written by :meth:`save`."""
        return load_record(path, cls.__name__, cls.from_dict)


class GridResult(JsonRoundTrip):
    """What every ``(layer, pos)`` result shares: a grid per layer and token, with top-k per cell.

    Subclasses are frozen dataclasses with ``tokens``, ``token_ids``,
    ``hook_names``, ``top_ids``, ``top_probs``, ``vocab`` and an optional
    ``subject_range``, and name their main grid in ``_grid_field``.
    """

    _grid_field: ClassVar[str]

    @property
    def n_layers(self) -> int:
        """Number of layers (rows)."""
        return int(getattr(self, self._grid_field).shape[0])

    @property
    def n_pos(self) -> int:
        """Number of token positions (columns)."""
        return int(getattr(self, self._grid_field).shape[1])

    @property
    def top_k(self) -> int:
        """Number of top predictions kept per cell."""
        return int(self.top_ids.shape[-1])  # type: ignore[attr-defined]

    def top_predictions(self, layer: int, pos: int) -> list[tuple[str, float]]:
        """The top-k ``(token, probability)`` at one cell (negative indices count back)."""
        if not (-self.n_layers <= layer < self.n_layers and -self.n_pos <= pos < self.n_pos):
            raise InvalidInput(
                f"cell must lie in layers [0, {self.n_layers}) and positions "
                f"[0, {self.n_pos}) (or count back from the end), got layer={layer}, "
                f"pos={pos}; pass e.g. layer=-1, pos=-1 for the output at the last token"
            )
        ids, probs = self.top_ids[layer, pos], self.top_probs[layer, pos]  # type: ignore[attr-defined]
        return [
            (self.vocab[int(i)], float(p))  # type: ignore[attr-defined]
            for i, p in zip(ids, probs, strict=True)
        ]

    def _grid_problems(self) -> list[str]:
        """Shape disagreements between the grid and the other fields."""
        n_layers, n_pos = self.n_layers, self.n_pos
        problems = []
        tokens, token_ids = self.tokens, self.token_ids  # type: ignore[attr-defined]
        if token_ids.shape != (n_pos,) or len(tokens) != n_pos:
            problems.append(
                f"token_ids {tuple(token_ids.shape)} and {len(tokens)} tokens "
                f"should both have {n_pos} positions"
            )
        hook_names = self.hook_names  # type: ignore[attr-defined]
        if len(hook_names) != n_layers:
            problems.append(f"{len(hook_names)} hook_names for {n_layers} layers")
        top_ids, top_probs = self.top_ids, self.top_probs  # type: ignore[attr-defined]
        if top_ids.shape[:2] != (n_layers, n_pos) or top_ids.shape != top_probs.shape:
            problems.append(
                f"top_ids {tuple(top_ids.shape)} and top_probs "
                f"{tuple(top_probs.shape)} should be ({n_layers}, {n_pos}, k)"
            )
        subject_range = getattr(self, "subject_range", None)
        if subject_range is not None:
            start, end = subject_range
            if not 0 <= start < end <= n_pos:
                problems.append(f"subject_range {subject_range} outside 0..{n_pos}")
        return problems


@dataclasses.dataclass(frozen=True, eq=False)
class TraceResult(GridResult):
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
        corruption: The corruption's settings record (its ``name`` and
            parameters, :meth:`lenscope.corruptions.Corruption.to_dict`).
        direction: ``"denoise"`` (clean activations restored into the
            corrupted run: causal tracing) or ``"noise"`` (corrupted
            activations patched into the clean run).
        foil: The foil token's text (logit-difference metrics, and the
            counterfactual prompt's top-1 token), or None.
        foil_id: Its id.
        normalization: For a normalised metric, the raw ``(clean,
            corrupted)`` values it maps to 1 and 0; None otherwise.
        answer_split: For an answer or foil of several tokens (scored by
            teacher forcing; ``answer``/``foil`` are then their whole text,
            ``answer_id``/``foil_id`` their first tokens), the per-token record:
            ``answer_ids``, ``answer_tokens``, ``foil_ids``, ``log_probs``
            (each answer token's log-probability per cell, ``[layer, *unit,
            answer]``, means over copies, summing to the cell's ``log_prob``;
            None for a one-token answer) and ``clean_log_probs`` /
            ``corrupted_log_probs`` (``[answer]``). None otherwise (and then
            left out of :meth:`to_dict`).
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
    corruption: dict[str, Any] | None = None
    direction: str = "denoise"
    foil: str | None = None
    foil_id: int | None = None
    normalization: tuple[float, float] | None = None
    answer_split: dict[str, Any] | None = None

    _grid_field: ClassVar[str] = "scores"
    _format: ClassVar[str] = _FORMAT
    _tensor_fields: ClassVar[dict[str, torch.dtype]] = _TENSOR_FIELDS
    _tuple_fields: ClassVar[tuple[str, ...]] = (
        "tokens",
        "hook_names",
        "subject_range",
        "normalization",
    )

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`JsonRoundTrip.to_dict`; ``answer_split`` only when there is one."""
        out = super().to_dict()
        if self.answer_split is None:
            del out["answer_split"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """As :meth:`JsonRoundTrip.from_dict`; ``answer_split``'s tensors read back as tensors."""
        split = data.get("answer_split") if isinstance(data, Mapping) else None
        if split is not None:
            split = dict(split)
            for name in ("log_probs", "clean_log_probs", "corrupted_log_probs"):
                if split.get(name) is not None:
                    split[name] = tensor_from_json(split[name], torch.float32)
            data = {**data, "answer_split": split}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        """Check that shapes agree with each other."""
        problems = [] if self.scores.ndim == 2 else ["scores must be [layer, pos]"]
        problems = problems or self._grid_problems()
        if problems:
            raise InvalidInput(
                f"inconsistent TraceResult with scores {tuple(self.scores.shape)}: "
                + "; ".join(problems)
            )

    @property
    def indirect_effect(self) -> Float[Tensor, "layer ..."]:
        """Score minus corrupted score: ROME's indirect effect of each cell."""
        return self.scores - self.corrupted_score

    def normalized(self) -> Float[Tensor, "layer ..."]:
        """``(score - corrupted) / (clean - corrupted)``: 1 = fully restored, 0 = no effect."""
        gap = self.clean_score - self.corrupted_score
        if gap == 0:
            return torch.full_like(self.scores, math.nan)
        return (self.scores - self.corrupted_score) / gap

    def window_layers(self, layer: int) -> tuple[int, int]:
        """Layers ``[lo, hi)`` restored for a cell at ``layer``, as ROME clips them."""
        half = self.window // 2
        return max(0, layer - half), min(self.n_layers, layer - half + self.window)

    def peak(self) -> tuple[int, int, float]:
        """``(layer, pos, score)`` of the highest traced cell."""
        flat = torch.nan_to_num(self.scores, nan=-math.inf).flatten()
        index = int(flat.argmax())
        layer, pos = divmod(index, self.n_pos)
        return layer, pos, float(self.scores[layer, pos])

    def __repr__(self) -> str:
        """One line: model, prompt, kind, window, answer, clean and corrupted scores, peak cell."""
        prompt = "token ids" if self.prompt is None else short_text(self.prompt)
        return (
            f"{type(self).__name__}(model={short_text(self.model_name, 40)}, prompt={prompt} "
            f"({self.n_pos} tokens), kind={self.kind!r}, window={self.window}, "
            f"{'direction=noise, ' if self.direction == 'noise' else ''}"
            f"answer={short_text(self.answer, 30)}, {self.metric}: "
            f"clean={self.clean_score:.3g} corrupted={self.corrupted_score:.3g}, "
            f"peak={self._peak_text()})"
        )

    def _repr_html_(self) -> str:
        """The facts of :meth:`__repr__` and the settings, as a small table (Jupyter)."""
        start, end = self.subject_range
        record = self.corruption or {"samples": self.samples, "noise_std": self.noise_std}
        rows = [
            ("model", self.model_name),
            ("prompt", "(token ids)" if self.prompt is None else repr(self.prompt)),
            (
                "tokens",
                f"{self.n_pos}; subject {''.join(self.tokens[start:end])!r} at [{start}, {end})",
            ),
            ("kind", f"{self.kind} ({self.hook_names[0]} ... {self.hook_names[-1]})"),
            ("window", f"{self.window} layer{'s' if self.window != 1 else ''}"),
            ("answer", f"{self.answer!r} (id {self.answer_id})"),
            *([("foil", f"{self.foil!r} (id {self.foil_id})")] if self.foil is not None else []),
            ("direction", self.direction),
            (f"clean {self.metric}", f"{self.clean_score:.4g}"),
            (f"corrupted {self.metric}", f"{self.corrupted_score:.4g}"),
            ("peak", self._peak_text()),
            ("corruption", ", ".join(f"{k}={_short_value(v)}" for k, v in record.items())),
        ]
        return html_facts(type(self).__name__, rows)

    def _peak_text(self) -> str:
        layer, pos, score = self.peak()
        if math.isnan(score):
            return "no cell traced"
        return f"{score:.3g} at layer {layer}, pos {pos} {short_text(self.tokens[pos], 20)}"

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


@dataclasses.dataclass(frozen=True, eq=False)
class HeadTraceResult(TraceResult):
    """A per-head trace: the metric with one attention head restored (at every position or one).

    Everything a :class:`TraceResult` holds, with a head axis: ``scores`` is
    ``[layer, head]`` (``by="head"``: the head restored at every position) or
    ``[layer, head, pos]`` (``by="head_pos"``; for ``kind="pattern"``, ``pos``
    is the destination position), and ``top_ids``/``top_probs`` add the
    top-k axis. For ``kind`` ``"k"`` or ``"v"`` on a grouped-query model the
    heads are the key/value heads, each shared by ``query_heads_per_head``
    query heads (key/value head ``h`` serves query heads ``h * group`` to
    ``(h + 1) * group - 1``).

    Attributes:
        by: ``"head"`` or ``"head_pos"``.
        query_heads_per_head: Query heads sharing each head of ``scores``.
    """

    scores: Float[Tensor, "layer head *dest"]
    top_ids: Int[Tensor, "layer head *dest k"]
    top_probs: Float[Tensor, "layer head *dest k"]
    by: str = "head"
    query_heads_per_head: int = 1

    _format: ClassVar[str] = "lenscope.HeadTraceResult/1"

    def __post_init__(self) -> None:
        """Check that shapes agree with each other."""
        n_pos = len(self.tokens)
        expected = 2 if self.by == "head" else 3
        problems = []
        if self.by not in ("head", "head_pos"):
            problems.append(f"by must be 'head' or 'head_pos', got {self.by!r}")
        if self.scores.ndim != expected:
            problems.append(f"scores must have {expected} axes for by={self.by!r}")
        elif self.by == "head_pos" and self.scores.shape[2] != n_pos:
            problems.append(f"scores' last axis should have the {n_pos} token positions")
        if self.token_ids.shape != (n_pos,):
            problems.append(f"token_ids {tuple(self.token_ids.shape)} for {n_pos} tokens")
        if len(self.hook_names) != self.scores.shape[0]:
            problems.append(f"{len(self.hook_names)} hook_names for {self.scores.shape[0]} layers")
        top_shapes = (self.top_ids.shape[:-1], self.top_probs.shape)
        if top_shapes != (self.scores.shape, self.top_ids.shape):
            problems.append(
                f"top_ids {tuple(self.top_ids.shape)} and top_probs {tuple(self.top_probs.shape)} "
                f"should be scores' shape plus k"
            )
        start, end = self.subject_range
        if not 0 <= start < end <= n_pos:
            problems.append(f"subject_range {self.subject_range} outside 0..{n_pos}")
        if problems:
            raise InvalidInput(
                f"inconsistent HeadTraceResult with scores {tuple(self.scores.shape)}: "
                + "; ".join(problems)
            )

    @property
    def n_pos(self) -> int:
        """Number of token positions."""
        return len(self.tokens)

    @property
    def n_heads(self) -> int:
        """Number of heads (key/value heads for ``k``/``v`` on a grouped-query model)."""
        return int(self.scores.shape[1])

    def _check_cell(self, layer: int, head: int, pos: int | None) -> tuple[int, ...]:
        bounds = [("layer", layer, self.n_layers), ("head", head, self.n_heads)]
        if self.by == "head_pos":
            if pos is None:
                raise InvalidInput(
                    "a by='head_pos' result needs a position, got pos=None; pass e.g. pos=-1"
                )
            bounds.append(("pos", pos, self.n_pos))
        elif pos is not None:
            raise InvalidInput(
                f"a by='head' result restores every position, got pos={pos}; leave pos unset"
            )
        for name, value, size in bounds:
            if not -size <= value < size:
                raise InvalidInput(
                    f"{name} must lie in [0, {size}) (or count back from the end), got "
                    f"{name}={value}; pass e.g. {name}=-1"
                )
        return tuple(value for _, value, _ in bounds)

    def top_predictions(  # type: ignore[override]
        self, layer: int, head: int, pos: int | None = None
    ) -> list[tuple[str, float]]:
        """The top-k ``(token, probability)`` of one cell (negative indices count back)."""
        index = self._check_cell(layer, head, pos)
        ids, probs = self.top_ids[index], self.top_probs[index]
        return [(self.vocab[int(i)], float(p)) for i, p in zip(ids, probs, strict=True)]

    def peak(self) -> tuple[Any, ...]:  # type: ignore[override]
        """``(layer, head, score)``, or ``(layer, head, pos, score)`` for ``by="head_pos"``."""
        flat = torch.nan_to_num(self.scores, nan=-math.inf).flatten()
        index = tuple(int(i) for i in torch.unravel_index(flat.argmax(), self.scores.shape))
        return (*index, float(self.scores[index]))

    def top_heads(self, n: int = 5) -> list[tuple[Any, ...]]:
        """The ``n`` cells with the highest scores, best first, as ``(*cell, score)``."""
        flat = torch.nan_to_num(self.scores, nan=-math.inf).flatten()
        best = flat.topk(min(n, flat.numel())).indices
        out = []
        for i in best.tolist():
            index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), self.scores.shape))
            if not math.isnan(float(self.scores[index])):
                out.append((*index, float(self.scores[index])))
        return out

    def __repr__(self) -> str:
        """As :class:`TraceResult`'s, with the head axis and its grouping."""
        heads = f"{self.n_heads} heads"
        if self.query_heads_per_head > 1:
            heads = f"{self.n_heads} key/value heads, {self.query_heads_per_head} query heads each"
        return f"{super().__repr__()[:-1]}, by={self.by!r}, {heads})"

    def _peak_text(self) -> str:
        *cell, score = self.peak()
        if math.isnan(score):
            return "no cell traced"
        text = f"{score:.3g} at layer {cell[0]}, head {cell[1]}"
        if self.by == "head_pos":
            text += f", pos {cell[2]} {short_text(self.tokens[cell[2]], 20)}"
        return text

    def to_dataframe(self) -> Any:
        """A long table: one row per ``(layer, head)`` or ``(layer, head, pos)`` cell."""
        import pandas as pd

        normalized = self.normalized()
        start, end = self.subject_range
        rows = []
        for index in (
            torch.cartesian_prod(*(torch.arange(n) for n in self.scores.shape))
            .reshape(-1, self.scores.ndim)
            .tolist()
        ):
            layer, head, *pos = index
            cell = tuple(index)
            row: dict[str, Any] = {
                "kind": self.kind,
                "layer": layer,
                "head": head,
                "query_heads": list(
                    range(head * self.query_heads_per_head, (head + 1) * self.query_heads_per_head)
                ),
            }
            if pos:
                row |= {
                    "pos": pos[0],
                    "token": self.tokens[pos[0]],
                    "is_subject": start <= pos[0] < end,
                }
            row |= {
                "score": float(self.scores[cell]),
                "indirect_effect": float(self.scores[cell] - self.corrupted_score),
                "normalized": float(normalized[cell]),
                "top1": self.vocab.get(int(self.top_ids[cell][0])),
                "top1_prob": float(self.top_probs[cell][0]),
            }
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any) -> Any:
        """A plotly heatmap, layer x head; see :func:`lenscope.plotting.plot_head_trace`."""
        from lenscope.plotting import plot_head_trace

        return plot_head_trace(self, **kwargs)
