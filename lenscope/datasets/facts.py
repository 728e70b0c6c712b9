"""Fact lists: ROME's known facts, reading fact files, and keeping the facts a model knows.

ROME (Meng et al., "Locating and Editing Factual Associations in GPT",
NeurIPS 2022, arXiv 2202.05262) traces "known facts": prompts whose subject
the model completes with the right attribute. :func:`known_facts` is ROME's
set (shipped with lenscope), :func:`load_facts` reads any list of records,
and :func:`filter_known` keeps what a given model predicts correctly,
with ROME's test (:func:`starts_attribute`).
"""

import dataclasses
import json
import math
import numbers
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenscope._data import known_records, long_answer_records
from lenscope.hooks import FINAL_RESID, capture_forward, decode_resid, preserved_model
from lenscope.metrics import softmax
from lenscope.tokens import answer_tokens, prompt_tokens, token_labels
from lenscope.validation import InvalidInput, InvalidInputType, optional_positive_int

if TYPE_CHECKING:
    from lenscope.tracer import CausalTracer

Facts = Sequence[Mapping[str, Any]] | str | os.PathLike[str] | Any
"""A list of dicts, a pandas DataFrame, or the path of a JSON / JSONL file."""


def known_facts() -> list[dict[str, Any]]:
    """The ROME known-facts set shipped with lenscope (1209 records).

    Each record has ``known_id``, ``subject``, ``attribute``, ``template``,
    ``prediction`` (GPT-2 XL's greedy continuation), ``prompt`` and
    ``relation_id``. The set is what GPT-2 XL knows; run :func:`filter_known`
    to keep what *your* model knows.

    Returns:
        A fresh list of fresh dicts (safe to modify).
    """
    return [dict(record) for record in known_records()]


def long_answer_facts() -> list[dict[str, Any]]:
    """Facts whose answers are names of several words (424 records, shipped with lenscope).

    ROME's known facts have one-word attributes (on Gemma-3-270m's vocabulary
    1 of 1,209 encodes to more than one token), so they cannot show what
    scoring a whole answer changes. These were written for lenscope from
    general knowledge: capitals ("The capital of Argentina is" -> "Buenos
    Aires"), the cities of landmarks, authors, painters, composers, founders,
    discoverers and inventors (``scripts/make_long_answers.py``). Records
    have ROME's fields (``known_id``, ``subject``, ``attribute``,
    ``template``, ``prompt``, ``relation_id``, the relation in words). Keep
    what your model knows with ``filter_known(..., by="attribute")`` and trace
    with ``trace_dataset(..., answers="attribute")``.

    Returns:
        A fresh list of fresh dicts (safe to modify).
    """
    return [dict(record) for record in long_answer_records()]


def load_facts(facts: Facts) -> list[Any]:
    """Turn any supported fact source into a list of dicts (other items passed through).

    Args:
        facts: A sequence of mappings, a pandas ``DataFrame`` (one fact per
            row; NaN cells count as missing), or the path of a ``.json`` file
            (a list of records) or ``.jsonl`` file (one record per line).

    Returns:
        One dict per fact, in order. Records are not validated here: a fact
        with missing fields, or an item that is not a mapping (passed through
        as it is), is reported by :func:`trace_dataset`, not refused.

    Raises:
        TypeError: ``facts`` is none of the supported sources.
        ValueError: a JSON/JSONL file cannot be parsed.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(facts, str | os.PathLike):
        return _read_fact_file(Path(facts))
    if hasattr(facts, "to_dict") and hasattr(facts, "columns"):  # a pandas DataFrame
        records = facts.to_dict(orient="records")
        return [{k: v for k, v in r.items() if not _is_missing(v)} for r in records]
    if isinstance(facts, Mapping) or not isinstance(facts, Iterable):
        raise InvalidInputType(
            f"facts must be a list of dicts, a pandas DataFrame, or a JSON/JSONL path, "
            f"got {type(facts).__name__}; pass e.g. lenscope.datasets.known_facts()"
        )
    return [dict(f) if isinstance(f, Mapping) else f for f in facts]


def _read_fact_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(
            f"fact file {str(path)!r} does not exist; pass the path of a .json or .jsonl file"
        )
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InvalidInput(
                    f"every line of a JSONL fact file must be one JSON record, but line "
                    f"{number} of {str(path)!r} is not valid JSON ({e.msg}); fix or remove it"
                ) from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(
            f"a .json fact file must hold a JSON list of records, but {str(path)!r} is not "
            f"valid JSON ({e.msg}); for one record per line name the file .jsonl"
        ) from e
    if not isinstance(data, list):
        raise InvalidInput(
            f"a .json fact file must hold a JSON list of records, got a "
            f"{type(data).__name__} in {str(path)!r}; wrap the records in [...]"
        )
    return data


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fact_id(fact: Any, index: int) -> int | str:
    """A fact's id: its ``known_id``, else its ``id``, else its index in the input."""
    if isinstance(fact, Mapping):
        for key in ("known_id", "id"):
            value = fact.get(key)
            if _is_missing(value) or isinstance(value, bool):
                continue
            if isinstance(value, numbers.Integral):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)  # a pandas column with NaN turns ints into floats
            return str(value)
    return index


def _fact_problem(fact: Any, fields: Sequence[str]) -> str | None:
    """Why ``fact`` cannot be used (a missing or non-text field), or None."""
    if not isinstance(fact, Mapping):
        return f"a fact must be a dict with {', '.join(fields)}, got {type(fact).__name__}"
    missing = [f for f in fields if _is_missing(fact.get(f))]
    if missing:
        return (
            f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(a fact needs {', '.join(map(repr, fields))})"
        )
    for field in fields:
        value = fact[field]
        if not isinstance(value, str) or not value.strip():
            return f"field {field!r} must be non-empty text, got {value!r}"
    return None


def _prepared(facts: Facts) -> list[tuple[int | str, Any]]:
    """``(id, record)`` pairs; later duplicates of an id are kept for reporting."""
    return [(_fact_id(fact, index), fact) for index, fact in enumerate(load_facts(facts))]


def starts_attribute(prediction: str, attribute: str) -> bool:
    """ROME's "known" test: the predicted token, stripped, is a non-empty prefix of the attribute.

    The comparison is case-sensitive and ignores surrounding whitespace on
    both sides, so ``" Paris"`` starts ``"Paris"`` and ``" Par"`` does too
    (a sub-word start counts, as in ROME), while ``" the"`` or ``" "`` do not.

    Args:
        prediction: The decoded top-1 token.
        attribute: The fact's expected attribute, e.g. ``"Paris"``.

    Returns:
        Whether the prediction starts the attribute.
    """
    token = prediction.strip()
    return bool(token) and attribute.strip().startswith(token)


def attribute_answer(attribute: str) -> str:
    """A fact's attribute as answer text: ``"Paris"`` -> ``" Paris"`` (the prompt precedes it)."""
    return " " + attribute.strip()


KNOWN_BY = ("first_token", "attribute")
"""What :func:`filter_known` checks (``by=``)."""


def filter_known(
    tracer: "CausalTracer",
    facts: Facts,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    return_rejected: bool = False,
    by: str = "first_token",
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list["SkippedFact"]]:
    """Keep the facts the model knows: its top-1 next token starts the attribute (ROME's filter).

    One clean forward pass per fact, batched over inputs of equal token
    length (no padding, so no position or BOS subtleties); only the
    positions the test reads are decoded, never the full
    ``[batch, pos, d_vocab]`` logits.

    ``by="first_token"`` (default) is ROME's test (:func:`starts_attribute`).
    ``by="attribute"`` asks for the whole attribute: the prompt is followed by
    the attribute's tokens (:func:`attribute_answer`, tokenised as
    ``trace_dataset(answers="attribute")`` scores them) and each of them must
    be the model's top-1 given the ones before it, which is exactly "greedy
    generation produces the attribute's tokens".

    Args:
        tracer: The tracer whose model is checked.
        facts: Facts with ``prompt`` and ``attribute`` (see :func:`load_facts`).
        limit: Stop once this many known facts are found (input order kept).
        batch_size: Prompts per forward pass.
        progress: Show a progress bar; default the tracer's setting.
        return_rejected: Also return the facts left out, with the reason.
        by: ``"first_token"`` or ``"attribute"`` (above).

    Returns:
        Copies of the known facts, each with ``top1_token`` and ``top1_prob``
        (the first next token) added, and with ``by="attribute"`` also
        ``attribute_tokens`` (its token labels) and ``attribute_prob`` (its
        teacher-forced probability); with ``return_rejected``, the pair
        ``(known, rejected)``.

    Raises:
        ValueError: ``limit`` or ``batch_size`` is not a positive integer, or
            ``by`` is not one of :data:`KNOWN_BY`.
    """
    optional_positive_int("limit", limit, "pass e.g. limit=100")
    optional_positive_int("batch_size", batch_size, "pass e.g. batch_size=64")
    if by not in KNOWN_BY:
        raise InvalidInput(
            f"by must be one of {KNOWN_BY}, got {by!r}; pass by='attribute' to ask for the "
            "whole attribute, or leave it out for ROME's first-token test"
        )
    model = tracer.model
    show = tracer.progress if progress is None else progress
    pairs = _prepared(facts)
    known: list[tuple[int, dict[str, Any]]] = []
    rejected: list[tuple[int, SkippedFact]] = []
    # Larger chunks give larger equal-length groups: a forward pass costs about
    # the same for 1 or 64 short prompts (reading the weights dominates).
    # With a small limit, check a few facts at a time so as not to overshoot.
    chunk_size = 256 if limit is None else min(256, max(32, 4 * limit))
    bar = tqdm(total=len(pairs), desc="filter known", unit="fact", disable=not show)
    with bar, preserved_model(model), torch.inference_mode():
        for chunk_start in range(0, len(pairs), chunk_size):
            by_length: dict[tuple[int, int], list[tuple[int, dict[str, Any], Tensor]]] = {}
            for order in range(chunk_start, min(chunk_start + chunk_size, len(pairs))):
                fact_id, fact = pairs[order]
                problem = _fact_problem(fact, ("prompt", "attribute"))
                tokens = None
                if problem is None:
                    try:
                        tokens = prompt_tokens(model, fact["prompt"])
                        n_prompt = int(tokens.shape[0])
                        if by == "attribute":
                            answer = answer_tokens(model, attribute_answer(fact["attribute"]))
                            tokens = torch.cat([tokens, torch.tensor(answer, dtype=tokens.dtype)])
                    except (ValueError, TypeError) as e:
                        problem = str(e)
                if problem is not None:
                    rejected.append((order, SkippedFact(fact_id, problem)))
                    continue
                key = (int(tokens.shape[0]), n_prompt)
                by_length.setdefault(key, []).append((order, fact, tokens))
            for (n_tokens, n_prompt), group in by_length.items():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    ids = torch.stack([tokens for _, _, tokens in batch])
                    # The next-token logits after the prompt and after each
                    # attribute token but the last: [batch, answer, vocab].
                    resid = capture_forward(model, ids, [])[FINAL_RESID][
                        :, n_prompt - 1 : max(n_tokens - 1, n_prompt)
                    ]
                    logits = decode_resid(model, resid.reshape(-1, resid.shape[-1]))
                    rows = logits.view(len(batch), -1, logits.shape[-1])
                    for (order, fact, tokens), row in zip(batch, rows, strict=True):
                        verdict = _known_verdict(model, fact, tokens[n_prompt:], row, by)
                        if isinstance(verdict, str):
                            rejected.append((order, SkippedFact(pairs[order][0], verdict)))
                        else:
                            known.append((order, {**fact, **verdict}))
            bar.update(min(chunk_start + chunk_size, len(pairs)) - chunk_start)
            if limit is not None and len(known) >= limit:
                break
    known.sort(key=lambda item: item[0])
    rejected.sort(key=lambda item: item[0])
    kept = [fact for _, fact in known]
    if limit is not None and len(kept) > limit:
        last_order = known[limit - 1][0]
        kept = kept[:limit]
        rejected = [item for item in rejected if item[0] < last_order]
    if return_rejected:
        return kept, [skip for _, skip in rejected]
    return kept


def _known_verdict(
    model: torch.nn.Module,
    fact: Mapping[str, Any],
    answer: Tensor,
    logits: Tensor,
    by: str,
) -> dict[str, Any] | str:
    """The fields a known fact gets, or why it is not known.

    ``answer`` holds the attribute's tokens (none with ``by="first_token"``)
    and ``logits`` the next-token logits after the prompt and after each of
    them but the last (``[max(1, len(answer)), vocab]``).
    """
    top_prob, top_id = softmax(logits[0]).max(dim=-1)
    first = token_labels(model, [int(top_id)])[0]
    fields: dict[str, Any] = {"top1_token": first, "top1_prob": float(top_prob)}
    if by == "first_token":
        if starts_attribute(first, fact["attribute"]):
            return fields
        attribute = fact["attribute"]
        return f"not known: top-1 token {first!r} does not start the attribute {attribute!r}"
    wanted = answer.tolist()
    labels = list(token_labels(model, wanted))
    log_probs = torch.log_softmax(logits, dim=-1)
    for i, (got, want) in enumerate(zip(log_probs.argmax(dim=-1).tolist(), wanted, strict=True)):
        if got != want:
            return (
                f"not known: the attribute {fact['attribute']!r} is {labels}, but after "
                f"{labels[:i]} the top-1 token is {token_labels(model, [got])[0]!r}, not "
                f"{labels[i]!r}"
            )
    sequence_log_prob = log_probs.gather(-1, answer[:, None].long()).sum()
    return fields | {"attribute_tokens": labels, "attribute_prob": float(sequence_log_prob.exp())}


@dataclasses.dataclass(frozen=True)
class SkippedFact:
    """A fact that was not traced, and why.

    Attributes:
        fact_id: The fact's ``known_id`` / ``id``, or its index in the input.
        reason: What was wrong with it, e.g. a missing field.
    """

    fact_id: int | str
    reason: str


@dataclasses.dataclass(frozen=True)
class CounterfactualPairs:
    """Facts paired with a counterfactual prompt (see :func:`pair_counterfactuals`).

    Attributes:
        facts: Copies of the paired facts, each with ``counterfactual`` (the
            prompt with the partner's subject), ``counterfactual_subject``,
            ``counterfactual_attribute`` and ``counterfactual_id``.
        unpaired: The facts that found no partner, with the reason.
        n_facts: Facts given.
    """

    facts: list[dict[str, Any]]
    unpaired: list[SkippedFact]
    n_facts: int

    def __repr__(self) -> str:
        """How many facts found a partner."""
        return (
            f"CounterfactualPairs({len(self.facts)} of {self.n_facts} facts paired, "
            f"{len(self.unpaired)} without a partner)"
        )


def pair_counterfactuals(
    model: torch.nn.Module, facts: Facts, *, seed: int = 0
) -> CounterfactualPairs:
    """Pair each fact with another fact of the same relation for symmetric token replacement.

    The counterfactual of a fact is its own prompt with its subject replaced
    by the partner's subject ("The Colosseum is located in the city of" for
    "The Eiffel Tower ..."), so the template is the same; the partner must
    have the same ``relation_id``, another attribute (so that the answers
    differ), and a subject that makes the counterfactual tokenise to exactly
    as many tokens as the prompt (Zhang & Nanda, 2023, arXiv 2309.16042).
    Among the candidates one is chosen at random with ``seed``.

    Args:
        model: Supplies the tokenizer.
        facts: Facts with ``prompt``, ``subject``, ``attribute`` and
            ``relation_id`` (ROME's known facts have them).
        seed: Seed of the choice among candidates.

    Returns:
        A :class:`CounterfactualPairs`: the paired facts and the rest with a reason.
    """
    pairs = _prepared(facts)
    rng = random.Random(seed)
    usable = []
    unpaired = []
    for fact_id, fact in pairs:
        problem = _fact_problem(fact, ("prompt", "subject", "attribute", "relation_id"))
        if problem is None and fact["subject"] not in fact["prompt"]:
            problem = f"subject {fact['subject']!r} does not occur in its prompt"
        if problem is None:
            usable.append((fact_id, fact, len(model.to_tokens(fact["prompt"])[0])))
        else:
            unpaired.append(SkippedFact(fact_id, problem))
    by_relation: dict[str, list[tuple[Any, dict[str, Any], int]]] = {}
    for entry in usable:
        by_relation.setdefault(entry[1]["relation_id"], []).append(entry)
    paired = []
    for fact_id, fact, n_tokens in usable:
        candidates = [
            other
            for other in by_relation[fact["relation_id"]]
            if other[1]["attribute"] != fact["attribute"] and other[1]["subject"] != fact["subject"]
        ]
        rng.shuffle(candidates)
        for other_id, other, _ in candidates:
            prompt = fact["prompt"].replace(fact["subject"], other["subject"], 1)
            if len(model.to_tokens(prompt)[0]) == n_tokens:
                paired.append(
                    {
                        **fact,
                        "counterfactual": prompt,
                        "counterfactual_subject": other["subject"],
                        "counterfactual_attribute": other["attribute"],
                        "counterfactual_id": other_id,
                    }
                )
                break
        else:
            unpaired.append(
                SkippedFact(
                    fact_id,
                    f"no fact of relation {fact['relation_id']!r} with another attribute has a "
                    "subject of the same token length",
                )
            )
    return CounterfactualPairs(paired, unpaired, len(pairs))
