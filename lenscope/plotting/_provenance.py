"""What a figure says about the experiment behind it, read from the result's own record.

Every lenscope figure names its experiment: the model, the prompt and its
subject (or, for symmetric token replacement, the tokens that differ), the
answer and foil, the metric with its raw clean and corrupted values, the
direction of patching (Meng et al., 2022, arXiv 2202.05262, restore clean
activations into the corrupted run; noising patches corrupted activations
into the clean run, Zhang & Nanda, 2023, arXiv 2309.16042), the window and
the corruption as its own record (:meth:`lenscope.corruptions.Corruption.to_dict`:
noise std, samples and seed for noise, the counterfactual prompt for STR).
Compactly in the title, fully in the settings table
:func:`~lenscope.plotting.save_html` writes under the figure. Nothing is
computed here: these functions only format fields the results carry, and
never print a field that the result's corruption does not have (the
record's text is :func:`lenscope.results.corruption_text` and
:func:`~lenscope.results.corruption_rows`, which the results' own reprs
and the command line use too).
"""

from collections.abc import Sequence
from typing import Any

from lenscope.plotting._common import escape, shorten, visible
from lenscope.results import corruption_rows, corruption_text, is_counterfactual

DIRECTIONS = {
    "denoise": "restoring clean activations into the corrupted run",
    "noise": "patching corrupted activations into the clean run",
}
"""What each direction of a trace does, in the words of every figure title."""

_METRIC_NOTES = {
    "prob": "probability of the answer",
    "log_prob": "log-probability of the answer",
    "logit_diff": "logit of the answer minus logit of the foil",
    "normalized_logit_diff": "logit difference, normalised: 0 = corrupted run, 1 = clean run",
    "kl_div": "KL divergence from the clean run's next-token distribution",
}


def direction_phrase(direction: str) -> str:
    """``"restoring clean activations into the corrupted run"`` or the noising phrase."""
    return DIRECTIONS.get(direction, f"direction {direction}")


def corruption_record(result: Any) -> dict[str, Any]:
    """The corruption's record a result carries (:attr:`~lenscope.TraceResult.corruption`)."""
    return dict(result.corruption)


def metric_note(metric: str) -> str:
    """The metric's name and what it measures."""
    note = _METRIC_NOTES.get(metric)
    return f"{metric} ({note})" if note else metric


def window_text(window: int) -> str:
    """``"1 layer"`` or ``"10 layers around each cell's layer"``."""
    return "1 layer" if window == 1 else f"{window} layers around each cell's layer"


def layer_axis_title(window: int) -> str:
    """Layer-axis title: ``"layer"``, or the centre of a restored window, as the line plots say."""
    return "layer" if window == 1 else f"centre of restored window ({window} layers)"


def subject_text(result: Any) -> tuple[str, str]:
    """``(label, text)`` of the marked tokens: the subject, or the tokens STR changed."""
    start, end = result.subject_range
    label = "tokens that differ" if is_counterfactual(corruption_record(result)) else "subject"
    return label, f"{''.join(result.tokens[start:end])!r} (tokens {start}..{end - 1})"


def raw_scores_text(result: Any) -> str | None:
    """For a normalised metric, the raw clean and corrupted values it maps to 1 and 0."""
    if result.normalization is None:
        return None
    clean, corrupted = result.normalization
    raw = "logit difference" if "logit_diff" in result.metric else "raw metric"
    return f"{raw}: clean {clean:.4g}, corrupted {corrupted:.4g}"


def answer_tokens_text(result: Any) -> str | None:
    """For an answer of several tokens: its tokens, ids and per-token clean/corrupted log p."""
    split = getattr(result, "answer_split", None)
    if not split:
        return None
    tokens = " ".join(repr(t) for t in split["answer_tokens"])
    text = f"{tokens} (ids {', '.join(str(i) for i in split['answer_ids'])}; teacher-forced)"
    for name in ("clean", "corrupted"):
        values = split.get(f"{name}_log_probs")
        if values is not None:
            text += f"; {name} log p " + ", ".join(f"{float(v):.4g}" for v in values)
    return text


def score_text(result: Any, value: float) -> str:
    """A clean or corrupted score as the colour bar shows it: percent for probabilities."""
    if result.metric == "prob":
        return f"{value:.3g}" if value == 0 else f"{value * 100:.3g}%"
    return f"{value:.3g}"


def weights_short(weights: str | None) -> str | None:
    """A title's note on the weights: ``"Q4_K_M 4-bit weights, float32"`` (None if unknown).

    ``weights`` is :func:`lenscope.loading.weights_description`'s text.
    """
    if not weights:
        return None
    origin, _, dtype = weights.rpartition("; ")
    if " GGUF (" in origin:
        quantisation = origin.split(" GGUF (", 1)[0]
        bits = origin.split(" GGUF (", 1)[1].split("-bit", 1)[0]
        return f"{quantisation} {bits}-bit weights, {dtype}"
    return f"{dtype} weights" if not origin.startswith("GGUF file") else f"GGUF weights, {dtype}"


def model_label(result: Any) -> str:
    """The model's name and, where known, its weights' note, as plain text (a page title).

    ``result`` is any result that records ``model_name`` and ``weights``
    (traces, lens trajectories, attention patterns, dataset summaries).
    """
    note = weights_short(getattr(result, "weights", None))
    return result.model_name + ("" if note is None else f" ({note})")


def model_text(result: Any) -> str:
    """:func:`model_label`, escaped for a figure title."""
    return escape(model_label(result))


def model_rows(result: Any) -> list[tuple[str, str]]:
    """The settings-table rows of the model: its name, and its weights where known."""
    weights = getattr(result, "weights", None)
    return [("model", result.model_name), *([("weights", weights)] if weights else [])]


def trace_rows(result: Any) -> list[tuple[str, str]]:
    """Every setting of a trace result, as rows of the page's settings table."""
    record = corruption_record(result)
    label, subject = subject_text(result)
    rows = [
        *model_rows(result),
        ("prompt", "(token ids)" if result.prompt is None else repr(result.prompt)),
        ("tokens", str(result.n_pos)),
        (label, subject),
        ("answer", f"{result.answer!r} (id {result.answer_id})"),
    ]
    split = answer_tokens_text(result)
    if split is not None:
        rows[-1] = ("answer", repr(result.answer))
        rows.append(("answer tokens", split))
    if result.foil is not None:
        rows.append(("foil", f"{result.foil!r} (id {result.foil_id})"))
    rows += [
        ("metric", metric_note(result.metric)),
        (f"clean {result.metric}", f"{result.clean_score:.4g}"),
        (f"corrupted {result.metric}", f"{result.corrupted_score:.4g}"),
    ]
    raw = raw_scores_text(result)
    if raw is not None:
        rows.append(("raw values", raw))
    rows += [
        ("direction", f"{result.direction}: {direction_phrase(result.direction)}"),
        *corruption_rows(record),
        ("kind", f"{result.kind} ({result.hook_names[0]} ... {result.hook_names[-1]})"),
        ("window", window_text(result.window)),
    ]
    return rows


def trace_subtitle(result: Any) -> list[str]:
    """Escaped pieces of a trace's subtitle: prompt and marked tokens, answer and foil, scores."""
    record = corruption_record(result)
    label, _ = subject_text(result)
    start, end = result.subject_range
    marked = escape(visible("".join(result.tokens[start:end]).strip() or "∅"))
    prompt = "token ids" if result.prompt is None else escape(repr(shorten(result.prompt, 60)))
    answer = f"answer <b>{escape(visible(result.answer))}</b>"
    split = getattr(result, "answer_split", None)
    if split:
        answer += f" ({len(split['answer_ids'])} tokens, teacher-forced)"
    if result.foil is not None:
        answer += f" vs foil <b>{escape(visible(result.foil))}</b>"
    if result.normalization is not None:
        clean, corrupted = result.normalization
        raw = "logit difference" if "logit_diff" in result.metric else "raw metric"
        scores = (
            f"{raw} clean {clean:.3g} · corrupted {corrupted:.3g} "
            f"({escape(result.metric)}: 1 and 0)"
        )
    else:
        scores = (
            f"{escape(result.metric)} clean {score_text(result, result.clean_score)} · "
            f"corrupted {score_text(result, result.corrupted_score)}"
        )
    first = f"prompt {prompt} · {label} <i>{marked}</i> marked *"
    second = f"{answer} · {scores}"
    third = escape(corruption_text(record))
    counterfactual = record.get("counterfactual")
    if isinstance(counterfactual, str) and isinstance(result.prompt, str):
        if len(counterfactual) > _PROMPT_CHARS:
            # Cut where it differs from the prompt, not at its start (which the prompt shares).
            shown = excerpt_of_difference(result.prompt, counterfactual, _PROMPT_CHARS)
            third = escape(f"counterfactual prompt {shown!r}")
    return [first, second, third]


_PROMPT_CHARS = 60
"""Longest prompt text a title shows before it is shortened."""


def excerpt_of_difference(prompt: str, other: str, limit: int) -> str:
    """``other`` cut to ``limit`` characters around where it differs from ``prompt``.

    A counterfactual prompt shares most of its text with the prompt; cut at
    its end, a long one would hide the very words that differ.

    Args:
        prompt: The clean prompt.
        other: The counterfactual prompt.
        limit: Longest excerpt, ``…`` marks included.

    Returns:
        ``other`` itself if it fits, else a window of it that starts a few
        characters before the first difference, with ``…`` where text is left out.
    """
    if len(other) <= limit:
        return other
    same = 0
    for a, b in zip(prompt, other, strict=False):
        if a != b:
            break
        same += 1
    start = max(0, min(same - 12, len(other) - (limit - 1)))
    end = start + (limit - 1 if start > 0 else limit)  # room for a leading ellipsis
    if end < len(other):
        end -= 1  # the trailing ellipsis
    return ("…" if start > 0 else "") + other[start:end] + ("…" if end < len(other) else "")


def differing(results: Sequence[Any], fields: Sequence[str]) -> list[str]:
    """The ``fields`` whose values are not the same in every result."""
    out = []
    for field in fields:
        values = [_comparable(getattr(r, field, None)) for r in results]
        if any(v != values[0] for v in values[1:]):
            out.append(field)
    return out


def _comparable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, repr(v)) for k, v in value.items()))
    return value
