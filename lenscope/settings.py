"""``TraceSettings``: every choice of a causal trace, validated once, serialised once.

A trace (Meng et al., 2022, arXiv 2202.05262) is fixed by where it restores
(the sites, ``kinds``, and their layer ``windows``), how the corrupted run is
made (a :class:`~lenscope.corruptions.Corruption`), what is measured (the
patching ``metric`` of the ``answer`` token, and the ``top_k`` predictions
kept per cell) and which cells are traced (``layers``, ``positions``). One
frozen object holds them: :meth:`TraceSettings.from_options` builds it from
the keyword arguments of :meth:`lenscope.CausalTracer.trace_kinds` and
:func:`lenscope.trace_dataset` alike, :meth:`TraceSettings.for_model` checks
what depends on the model and fixes it (layer counts, the noise std in
sigmas), and :meth:`TraceSettings.to_dict` is the settings record of results
and dataset checkpoints.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lenscope.corruptions import (
    Corruption,
    GaussianNoise,
    check_corruption,
    corruption_from_dict,
)
from lenscope.hooks import n_layers
from lenscope.metrics import PatchingMetric, metric_from_name, resolve_metric
from lenscope.names import DEFAULT_KINDS, FOIL_METRICS
from lenscope.sites import (
    BY_KINDS,
    HEAD_KINDS,
    NEURON_KINDS,
    Site,
    site,
    site_from_dict,
    site_to_dict,
)
from lenscope.tokens import AnswerSet
from lenscope.validation import (
    LAST,
    InvalidInput,
    InvalidInputType,
    distinct_indices,
    is_int,
)

POSITION_NAMES = ("all", "subject", "from_subject", LAST)
"""Named position sets; a list of positions may also hold negative ones (``-1``: the last
token, as Python counts) and ``"last"``."""

DIRECTIONS = ("denoise", "noise")
"""``denoise``: clean activations patched into the corrupted run (causal tracing; does
restoring this cell suffice?). ``noise``: corrupted activations patched into the clean
run (is this cell necessary?). Heimersheim & Nanda (2024, arXiv 2404.15255)."""

NOISE_OPTIONS = ("samples", "noise", "noise_multiplier", "noise_tensor", "seed")
"""Keyword shortcuts for the fields of a :class:`~lenscope.corruptions.GaussianNoise`."""


@dataclasses.dataclass(frozen=True, eq=False)
class TraceSettings:
    """The settings of one causal trace (several kinds on the same corrupted run).

    Attributes:
        kinds: Hook-point types to trace: site names, e.g. ``("mlp_out",)``, or
            :class:`~lenscope.sites.Site` objects (a user's own site works end to
            end); held as names, the objects kept in :attr:`custom_sites`.
        windows: Layers restored around each cell: one int for every kind, a
            ``{kind: int}`` mapping, or None for ROME's (1 for ``resid_*``, 10
            clipped to the depth for ``mlp_out``/``attn_out``).
        corruption: How the corrupted run is made (default: ROME's Gaussian noise).
        metric: A name of :data:`lenscope.metrics.METRIC_NAMES` (``"prob"``,
            ``"log_prob"``, ``"logit_diff"``, ``"normalized_logit_diff"``,
            ``"kl_div"``), a callable ``(logits, answer) -> [batch]``, or a
            sequence of them (one result per metric from the same forward
            passes); None = the corruption's default (``"prob"`` for noise,
            ROME; ``"normalized_logit_diff"`` for a counterfactual prompt).
        answer: The answer: text, a token id, or token ids; None = the clean
            run's top-1 token. Text that encodes to several tokens (or several
            ids) is an answer of several tokens, scored by teacher forcing
            (the exact trace; other methods take one token). Several
            acceptable answers: a :class:`~lenscope.tokens.AnswerSet`, scored
            as the log of their summed (teacher-forced) probability.
        foil: The competing answer of the logit-difference metrics (the same
            forms); None = the counterfactual prompt's clean top-1 token (when
            there is one).
        direction: ``"denoise"`` (restore clean activations into the corrupted
            run: causal tracing) or ``"noise"`` (patch corrupted activations
            into the clean run); see :data:`DIRECTIONS`.
        top_k: Predictions of each restored run kept for inspection.
        layers: Layers to trace (an int n means ``range(n)``); None = all.
        positions: ``"all"``, ``"subject"``, ``"from_subject"`` (the subject's
            first token to the last token), ``"last"`` (the last token) or a
            list of token positions; negative ones count from the end as
            Python does (``[-1]`` is the last token, as ``"last"`` is). Each
            trace resolves them against its prompt's length.
        by: How per-head kinds (``"z"``, ``"q"``, ``"k"``, ``"v"``,
            ``"pattern"``) are traced: ``"head"`` (a head at every position,
            cells ``(layer, head)``; the default) or ``"head_pos"`` (cells
            ``(layer, head, pos)``). None for the residual-width kinds.
        custom_sites: The kinds given as :class:`~lenscope.sites.Site`
            objects (a user's own subclass, or a built-in site configured by
            hand), kept by name: ``kinds`` holds every kind's name, and
            :attr:`sites` gives these objects for their names and the
            registry's site (:func:`lenscope.sites.site`) for the others.
    """

    kinds: str | Site | Sequence[str | Site] = DEFAULT_KINDS
    windows: int | Mapping[str, int] | None = None
    corruption: Corruption = dataclasses.field(default_factory=GaussianNoise)
    metric: str | PatchingMetric | Sequence[str | PatchingMetric] | None = None
    answer: str | int | Sequence[int] | AnswerSet | None = None
    foil: str | int | Sequence[int] | None = None
    direction: str = "denoise"
    top_k: int = 5
    layers: int | Iterable[int] | None = None
    positions: str | Sequence[int | str] | torch.Tensor = "all"
    by: str | None = None
    custom_sites: tuple[Site, ...] = ()

    def __post_init__(self) -> None:
        """Check everything that does not need the model."""
        given = (self.kinds,) if isinstance(self.kinds, str | Site) else tuple(self.kinds)
        # Sites given as objects are kept by name (through dataclasses.replace
        # too); other names come from the registry.
        objects = {s.name: s for s in self.custom_sites}
        objects.update({v.name: v for v in given if isinstance(v, Site)})
        for value in given:
            if not (isinstance(value, str) and value in objects):
                site(value)  # a known name or a Site, else a clear error
        names = tuple(value if isinstance(value, str) else value.name for value in given)
        if not names or len(set(names)) != len(names):
            raise InvalidInput(f"kinds must be distinct and non-empty, got {names}")
        object.__setattr__(self, "kinds", names)
        object.__setattr__(self, "custom_sites", tuple(objects[n] for n in names if n in objects))
        sites = self.sites
        if self.by is not None and not any(
            n not in objects and getattr(s, "by", None) is not None
            for n, s in zip(names, sites, strict=True)
        ):
            raise InvalidInput(
                f"by={self.by!r} applies to the per-head kinds {HEAD_KINDS} and the per-neuron "
                f"kinds {NEURON_KINDS}, got kinds {names}; leave by unset, or pass e.g. kind='z'"
            )
        every = [s.name for s in sites if not s.takes_positions]
        if every and not (isinstance(self.positions, str) and self.positions == "all"):
            raise InvalidInput(
                f"positions apply to by='head_pos': by='head' restores the heads of "
                f"{every} at every position, got positions={self.positions!r}; pass "
                "by='head_pos' to trace single positions"
            )
        check_corruption(self.corruption)
        if (
            self.metric is not None
            and not isinstance(self.metric, str)
            and not callable(self.metric)
        ):
            object.__setattr__(self, "metric", tuple(self.metric))
            if not self.metric:
                raise InvalidInput(
                    "metric must name at least one metric, got an empty sequence; "
                    "pass e.g. metric=('prob', 'logit_diff')"
                )
        names = [resolve_metric(m)[0] for m in self.metric_specs]
        if len(set(names)) != len(names):
            raise InvalidInput(f"metrics must be distinct, got {names}")
        if self.direction not in DIRECTIONS:
            raise InvalidInput(
                f"direction must be one of {DIRECTIONS}, got {self.direction!r}; 'denoise' "
                "restores clean activations into the corrupted run (causal tracing), 'noise' "
                "patches corrupted activations into the clean run"
            )
        for which in ("answer", "foil"):
            object.__setattr__(self, which, check_answer(which, getattr(self, which)))
        if self.foil is not None and self.foil == self.answer:
            raise InvalidInput(
                f"the foil must differ from the answer, got {self.foil!r} for both; pass the "
                "competing answer as foil (e.g. answer=' Paris', foil=' Rome')"
            )
        if not is_int(self.top_k) or self.top_k < 1:
            raise InvalidInput(
                f"top_k must be an integer in [1, d_vocab], got {self.top_k!r}; pass e.g. 5"
            )
        if isinstance(self.positions, str):
            if self.positions not in POSITION_NAMES:
                raise InvalidInput(
                    f"positions must be 'all', 'subject', 'from_subject', 'last' or a list of "
                    f"token positions, got {self.positions!r}; pass e.g. positions=[-1]"
                )
        elif not isinstance(self.positions, Sequence | torch.Tensor | range):
            raise InvalidInputType(
                f"positions must be 'all', 'subject', 'from_subject', 'last' or a list of "
                f"token positions, got {type(self.positions).__name__}; pass e.g. positions=[-1]"
            )
        if isinstance(self.layers, Iterable) and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def from_options(cls, base: "TraceSettings | None" = None, **options: Any) -> "TraceSettings":
        """Settings from keyword options, on top of ``base`` (default: ROME's settings).

        Accepts every field of this class and, as shortcuts for a
        :class:`~lenscope.corruptions.GaussianNoise`, ``samples``, ``noise``,
        ``noise_multiplier``, ``noise_tensor`` (``[samples, n_subject_tokens,
        d_model]``: it sets ``samples``) and ``seed``. None leaves a
        field as it is in ``base`` (except ``answer``, ``layers`` and
        ``windows``, where None is a value).
        """
        base = cls() if base is None else base
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields - set(NOISE_OPTIONS) - {"metrics"})
        if unknown:
            raise InvalidInputType(
                f"unknown trace option(s) {unknown}; the options are "
                f"{sorted(fields | set(NOISE_OPTIONS))}"
            )
        if "metrics" in options:
            if options.get("metric") is not None:
                raise InvalidInput(
                    "pass metric=... or metrics=..., not both; metrics=('prob', 'kl_div') "
                    "gives one result per metric"
                )
            options["metric"] = options.pop("metrics")
        noise = {k: options.pop(k) for k in NOISE_OPTIONS if k in options}
        noise = {k: v for k, v in noise.items() if v is not None}
        corruption = options.pop("corruption", None) or base.corruption
        if noise:
            own = {f.name for f in dataclasses.fields(corruption)}  # type: ignore[arg-type]
            if not set(noise) <= own:
                raise InvalidInput(
                    f"the noise options {sorted(set(noise) - own)} do not apply to the "
                    f"corruption {type(corruption).__name__}; set its own fields on it"
                )
            if "noise" in noise:  # an absolute std replaces a resolved one
                corruption = dataclasses.replace(corruption, noise_tensor=None)
            if "noise_tensor" in noise and "samples" not in noise:
                noise["samples"] = None  # the tensor's first dimension, not the base's
            corruption = dataclasses.replace(corruption, **noise)
        changes = {k: v for k, v in options.items() if v is not None or k in _NONE_IS_VALUE}
        return dataclasses.replace(base, corruption=corruption, **changes)

    @property
    def sites(self) -> tuple[Site, ...]:
        """Each kind's :class:`~lenscope.sites.Site`: as given, or the registry's for a name."""
        objects = {s.name: s for s in self.custom_sites}
        return tuple(
            objects[k] if k in objects else site(k, self.by if k in BY_KINDS else None)
            for k in self.kinds
        )

    @property
    def metric_specs(self) -> tuple[str | PatchingMetric, ...]:
        """The metrics, as given (the corruption's default when ``metric`` is None)."""
        if self.metric is None:
            return (self.corruption.default_metric,)
        if isinstance(self.metric, str) or callable(self.metric):
            return (self.metric,)
        return tuple(self.metric)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Each metric's name (``"prob"``, ``"logit_diff(foil=5)"``, a callable's ``__name__``)."""
        return tuple(resolve_metric(m)[0] for m in self.metric_specs)

    @property
    def metric_name(self) -> str:
        """The first metric's name."""
        return self.metric_names[0]

    @property
    def needs_foil(self) -> bool:
        """Whether a metric compares the answer with a foil."""
        return any(name in FOIL_METRICS for name in self.metric_names)

    def for_model(self, model: torch.nn.Module) -> "TraceSettings":
        """Check the settings against ``model`` and fix what depends on it.

        Returns:
            A copy with ``windows`` a ``{kind: int}`` dict, ``layers`` a
            sorted tuple, and the corruption resolved (e.g. the noise std
            measured in embedding sigmas).
        """
        n_layer = n_layers(model)
        d_vocab = int(model.cfg.d_vocab)
        if self.top_k > d_vocab:
            raise InvalidInput(
                f"top_k must be an integer in [1, d_vocab], got {self.top_k!r}; pass e.g. 5"
            )
        return dataclasses.replace(
            self,
            windows=self.window_per_kind(n_layer),
            layers=tuple(self.layer_list(n_layer)),
            corruption=self.corruption.resolve(model),
        )

    def window_per_kind(self, n_layer: int) -> dict[str, int]:
        """``{kind: window}`` with ROME's defaults filled in, checked against the depth."""
        out = {}
        for kind, where in zip(self.kinds, self.sites, strict=True):
            windows = self.windows
            window = windows.get(kind) if isinstance(windows, Mapping) else windows
            if window is None:
                window = where.default_window(n_layer)
            if not is_int(window) or not 1 <= window <= n_layer:
                raise InvalidInput(
                    f"window must be an integer from 1 to n_layers={n_layer}, got {window!r} "
                    f"for kind {kind!r}; ROME uses 1 for resid and 10 for mlp_out/attn_out"
                )
            out[kind] = int(window)
        return out

    def layer_list(self, n_layer: int) -> list[int]:
        """The layers to trace, sorted."""
        if self.layers is None:
            return list(range(n_layer))
        chosen = list(range(self.layers)) if is_int(self.layers) else list(self.layers)
        return distinct_indices(
            "layers",
            "layer indices",
            chosen,
            n_layer,
            f"pass e.g. range(0, {n_layer})",
            original=self.layers,
        )

    def position_list(self, n_pos: int, subject_range: tuple[int, int]) -> list[int]:
        """The token positions to trace, sorted, resolved (``-1``, ``"last"``: ``n_pos - 1``)."""
        if isinstance(self.positions, str) and self.positions != LAST:
            start, end = subject_range
            return {
                "all": list(range(n_pos)),
                "subject": list(range(start, end)),
                "from_subject": list(range(start, n_pos)),
            }[self.positions]
        if isinstance(self.positions, str):
            values: list[Any] = [self.positions]
        elif isinstance(self.positions, torch.Tensor):
            values = self.positions.tolist()
        else:
            values = list(self.positions)
        return distinct_indices(
            "positions",
            "token positions",
            values,
            n_pos,
            "pass positions of the prompt's tokens, or 'all'",
            original=self.positions,
            count_back=True,
        )

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready record (call :meth:`for_model` first to fix windows and the noise std).

        The corruption's record is merged in: its name under ``"corruption"``,
        its parameters (``samples``, ``noise_std``, ``seed`` for Gaussian
        noise) beside the other settings, so that a difference reads as one
        named setting.
        """
        layers = self.layers
        names = self.metric_names
        out: dict[str, Any] = {
            "kinds": list(self.kinds),
            "windows": dict(self.windows) if isinstance(self.windows, Mapping) else self.windows,
            "metric": names[0] if len(names) == 1 else list(names),
            "answer": list(self.answer)
            if isinstance(self.answer, tuple)
            else self.answer.to_json()
            if isinstance(self.answer, AnswerSet)
            else self.answer,
            "top_k": self.top_k,
            "layers": None if layers is None else (layers if is_int(layers) else list(layers)),
            "positions": self.positions
            if isinstance(self.positions, str)
            else [p if isinstance(p, str) else int(p) for p in self.positions],
        }
        if self.by is not None:
            out["by"] = self.by
        if self.custom_sites:
            out["sites"] = {where.name: site_to_dict(where) for where in self.custom_sites}
        # Recorded only when set, so that the records of earlier versions still match.
        if self.foil is not None:
            out["foil"] = list(self.foil) if isinstance(self.foil, tuple) else self.foil
        if self.direction != "denoise":
            out["direction"] = self.direction
        record = self.corruption.to_dict()
        clash = sorted(set(record) & set(out))
        if clash:
            raise RuntimeError(
                f"{type(self.corruption).__name__}.to_dict() uses the setting names {clash}; "
                "a corruption's parameters need names of their own"
            )
        return {
            **out,
            "corruption": record["name"],
            **{k: v for k, v in record.items() if k != "name"},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TraceSettings":
        """Inverse of :meth:`to_dict` (a callable metric must be a known name or ``logit_diff``)."""
        if not isinstance(data, Mapping) or "kinds" not in data or "corruption" not in data:
            raise InvalidInput(
                f"expected a dict written by TraceSettings.to_dict (with 'kinds' and "
                f"'corruption'), got {str(data)[:80]!r}"
            )
        own = {f.name for f in dataclasses.fields(cls)}
        record = {k: v for k, v in data.items() if k not in own and k != "format"}
        return cls(
            kinds=tuple(data["kinds"]),
            custom_sites=tuple(site_from_dict(d) for d in (data.get("sites") or {}).values()),
            windows=data.get("windows"),
            corruption=corruption_from_dict({**record, "name": data["corruption"]}),
            metric=_metric_from_record(data.get("metric", "prob")),
            answer=AnswerSet.from_json(data["answer"])
            if isinstance(data.get("answer"), Mapping)
            else data.get("answer"),
            foil=data.get("foil"),
            direction=data.get("direction", "denoise"),
            top_k=data.get("top_k", 5),
            layers=data.get("layers"),
            positions=data.get("positions", "all"),
            by=data.get("by"),
        )


def check_answer(which: str, value: Any) -> Any:
    """An answer or foil as settings keep it (token ids as a tuple), checked.

    Args:
        which: ``"answer"`` or ``"foil"`` (only an answer may be an :class:`AnswerSet`).
        value: Text, a token id, token ids, an answer set, or None.

    Raises:
        InvalidInputType: Anything else, e.g. a list of texts (several answers
            are an :class:`AnswerSet`) or a Python set.
    """
    if which == "answer" and isinstance(value, AnswerSet):
        return value
    if isinstance(value, Sequence | torch.Tensor) and not isinstance(value, str):
        if which == "answer" and any(isinstance(i, str) for i in value):
            raise InvalidInputType(
                f"answer given as a list must hold the token ids of one answer, got "
                f"{value!r}; pass several acceptable answers as "
                f"lenscope.AnswerSet({list(value)!r})"
            )
        # Token ids of an answer of several tokens (scored by teacher forcing).
        ids = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        if not ids or not all(is_int(i) for i in ids):
            raise InvalidInputType(
                f"{which} given as token ids must be a non-empty sequence of "
                f"integers, got {value!r}; pass e.g. {which}=[1234, 5678]"
            )
        return tuple(int(i) for i in ids)
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        hint = (
            "; pass several acceptable answers as lenscope.AnswerSet([...])"
            if which == "answer" and isinstance(value, set | frozenset)
            else ""
        )
        raise InvalidInputType(
            f"{which} must be text, a token id or a sequence of token ids, "
            f"got {type(value).__name__}{hint}"
        )
    return value


def _metric_from_record(value: str | list[str]) -> Any:
    if isinstance(value, str):
        return metric_from_name(value)
    return tuple(metric_from_name(name) for name in value)


_NONE_IS_VALUE = ("answer", "foil", "layers", "windows")


@dataclasses.dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt resolved against a model for one trace.

    Attributes:
        tokens: The prompt's token ids.
        subject_range: The subject's ``(start, end)`` token range (a
            counterfactual prompt's: the tokens that differ).
        answer_id: The answer token, or None for the clean top-1 (or for an
            answer of several tokens).
        foil_id: The foil token, or None (a counterfactual's top-1, or none;
            or a foil of several tokens).
        answer_ids: The answer's tokens, however many (None: the clean top-1;
            for an answer set, its first member's).
        foil_ids: The foil's tokens (None: none named).
        answer_set: Each member's tokens, for an :class:`~lenscope.tokens.AnswerSet`.
    """

    tokens: Any
    subject_range: tuple[int, int]
    answer_id: int | None
    foil_id: int | None
    answer_ids: tuple[int, ...] | None = None
    foil_ids: tuple[int, ...] | None = None
    answer_set: tuple[tuple[int, ...], ...] | None = None


def resolve_prompt(
    model: torch.nn.Module,
    prompt: Any,
    subject: str | tuple[int, int] | None,
    settings: TraceSettings,
    *,
    sequences: bool = False,
) -> ResolvedPrompt:
    """Tokens, subject range, answer and foil of a trace, checked (one place for every method).

    Args:
        model: The model.
        prompt: Text, or 1-D token ids.
        subject: The subject's text or token range; None for a corruption
            that knows what it changes (a counterfactual prompt).
        settings: The trace's settings (their corruption, answer and foil).
        sequences: Whether the method scores answers and foils of several
            tokens (teacher forcing); if not, such an answer is refused.

    Raises:
        InvalidInput: No subject for a corruption that needs one, a foil
            equal to the answer, or (``sequences=False``) an answer of several tokens.
    """
    from lenscope.tokens import (
        answer_set_tokens,
        answer_token,
        answer_tokens,
        find_subject,
        prompt_tokens,
    )

    tokens = prompt_tokens(model, prompt)
    corruption = settings.corruption
    if subject is None:
        subject_range = corruption.changed_range(model, tokens)
        if subject_range is None:
            raise InvalidInput(
                f"a trace with {type(corruption).__name__} needs the subject it corrupts, "
                "got subject=None; pass e.g. subject='The Eiffel Tower', or a "
                "counterfactual prompt (tracer.patch) to compare two prompts"
            )
    else:
        subject_range = find_subject(model, tokens, subject)
    if not sequences:
        if isinstance(settings.answer, AnswerSet):
            raise InvalidInput(
                f"an AnswerSet is scored by the exact trace (tracer.trace, tracer.patch) "
                f"and by attribution, got {settings.answer!r} here; pass one answer"
            )
        answer_id = None if settings.answer is None else answer_token(model, settings.answer)
        foil_id = None if settings.foil is None else answer_token(model, settings.foil)
        if foil_id is not None and foil_id == answer_id:
            raise InvalidInput(
                f"the foil must differ from the answer, got token {foil_id} for both "
                f"({settings.answer!r}, {settings.foil!r}); pass the competing answer as foil"
            )
        return ResolvedPrompt(
            tokens,
            subject_range,
            answer_id,
            foil_id,
            None if answer_id is None else (answer_id,),
            None if foil_id is None else (foil_id,),
        )
    answer_set = None
    if isinstance(settings.answer, AnswerSet):
        answer_set = answer_set_tokens(model, settings.answer)
        answer_ids: tuple[int, ...] | None = answer_set[0]
    else:
        answer_ids = None if settings.answer is None else answer_tokens(model, settings.answer)
    foil_ids = None if settings.foil is None else answer_tokens(model, settings.foil)
    if foil_ids is not None and (foil_ids == answer_ids or foil_ids in (answer_set or ())):
        raise InvalidInput(
            f"the foil must differ from the answer, got tokens {list(foil_ids)} for both "
            f"({settings.answer!r}, {settings.foil!r}); pass the competing answer as foil"
        )

    def single(ids: tuple[int, ...] | None) -> int | None:
        return ids[0] if ids is not None and len(ids) == 1 else None

    return ResolvedPrompt(
        tokens,
        subject_range,
        None if answer_set else single(answer_ids),
        single(foil_ids),
        answer_ids,
        foil_ids,
        answer_set,
    )
