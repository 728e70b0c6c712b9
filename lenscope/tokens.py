"""Prompts, token labels, and where the subject sits among the tokens.

The prompt is tokenised the way the model does by default
(``model.to_tokens``: TransformerLens prepends BOS when the model's
``cfg.default_prepend_bos`` says so, as it does for Gemma and GPT-2). The
subject's token range is found on the decoded text, so it works for any
tokenizer, including SentencePiece ones whose pieces carry their own spaces.
"""

import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from lenscope.validation import InvalidInput, InvalidInputType


def _tokenizer(model: torch.nn.Module):
    return getattr(model, "tokenizer", None)


def prompt_tokens(
    model: torch.nn.Module, prompt: str | Tensor | Sequence[int]
) -> Int[Tensor, " pos"]:
    """The prompt's token ids, 1-D, on the model's device.

    Args:
        model: HookedTransformer or TransformerBridge.
        prompt: Text (tokenised with the model's default BOS handling), or token ids.

    Returns:
        Token ids ``[pos]``.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidInput("prompt must be non-empty text or token ids, got ''; pass a prompt")
        if _tokenizer(model) is None:
            raise InvalidInput(
                f"model {type(model).__name__} has no tokenizer, so the prompt must be token "
                f"ids, got text {prompt!r}; pass a 1-D LongTensor and subject=(start, end)"
            )
        tokens = model.to_tokens(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1 or tokens.dtype not in (torch.int32, torch.int64):
            raise InvalidInputType(
                "prompt must be text or a 1-D tensor of token ids, got a tensor of shape "
                f"{tuple(tokens.shape)} and dtype {tokens.dtype}; "
                "pass e.g. model.to_tokens(text)[0]"
            )
        if tokens.numel() == 0:
            raise InvalidInput("prompt must contain at least one token, got 0; pass a prompt")
        if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
            raise InvalidInput(
                f"token ids must lie in [0, {model.cfg.d_vocab}), got ids from "
                f"{int(tokens.min())} to {int(tokens.max())}; tokenise with the model's tokenizer"
            )
    if tokens.shape[0] > model.cfg.n_ctx:
        raise InvalidInput(
            f"prompt must fit the model's context of {model.cfg.n_ctx} tokens, got "
            f"{tokens.shape[0]}; shorten the prompt"
        )
    return tokens.long().to(model.cfg.device)


def token_labels(model: torch.nn.Module, ids: Sequence[int] | Tensor) -> tuple[str, ...]:
    """The text of each token id (``"<id 5>"`` when the model has no tokenizer)."""
    ids = [int(i) for i in ids]
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return tuple(f"<id {i}>" for i in ids)
    return tuple(tokenizer.decode([i]) for i in ids)


def find_subject(
    model: torch.nn.Module, tokens: Int[Tensor, " pos"], subject: str | tuple[int, int]
) -> tuple[int, int]:
    """Token range ``(start, end)`` (end exclusive) of the subject in the prompt.

    Args:
        model: Supplies the tokenizer.
        tokens: The prompt's token ids.
        subject: The subject's text (its first occurrence is used), or an
            explicit token range.

    Returns:
        ``(start, end)`` covering every token that overlaps the subject's text.
    """
    n_pos = tokens.shape[0]
    if isinstance(subject, tuple | list):
        if (
            len(subject) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in subject)
            or not 0 <= subject[0] < subject[1] <= n_pos
        ):
            raise InvalidInput(
                f"subject range must be (start, end) token positions with "
                f"0 <= start < end <= {n_pos}, got {tuple(subject)}; pass e.g. (1, 4)"
            )
        return int(subject[0]), int(subject[1])
    if not isinstance(subject, str):
        raise InvalidInputType(
            f"subject must be text or a (start, end) token range, got {type(subject).__name__}"
        )
    tokenizer = _tokenizer(model)
    labels = list(token_labels(model, tokens))
    if not subject.strip():
        raise InvalidInput(
            f"subject must be non-empty text, got {subject!r}; pass e.g. 'The Eiffel Tower'"
        )
    if tokenizer is None:
        raise InvalidInput(
            f"model has no tokenizer, so the subject must be a token range, got {subject!r}; "
            "pass subject=(start, end)"
        )
    ids = tokens.tolist()
    # Character end of each token in the decoded prompt, from decoding prefixes:
    # robust to tokenizers whose pieces do not concatenate to the text.
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    text = tokenizer.decode(ids)
    char_start = text.find(subject)
    if char_start < 0:
        char_start = text.find(subject.strip())
        subject = subject.strip()
    if char_start < 0:
        raise InvalidInput(
            f"subject {subject!r} must occur in the prompt, but the prompt tokenised as "
            f"{labels}; check spelling and case, or pass subject=(start, end) token positions"
        )
    char_end = char_start + len(subject)
    starts = [0, *ends[:-1]]
    overlapping = [i for i in range(n_pos) if starts[i] < char_end and ends[i] > char_start]
    return overlapping[0], overlapping[-1] + 1


def answer_token(model: torch.nn.Module, answer: str | int) -> int:
    """The single token id of an answer given as text or id."""
    if isinstance(answer, bool) or not isinstance(answer, str | int):
        raise InvalidInputType(f"answer must be text or a token id, got {type(answer).__name__}")
    if isinstance(answer, int):
        if not 0 <= answer < model.cfg.d_vocab:
            raise InvalidInput(
                f"answer token id must lie in [0, {model.cfg.d_vocab}), got {answer}"
            )
        return answer
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        raise InvalidInput(
            f"model has no tokenizer, so the answer must be a token id, got {answer!r}"
        )
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InvalidInput(
            f"answer must be a single token, but {answer!r} tokenises as "
            f"{list(token_labels(model, ids))}; pass one token (mind the leading space, "
            f"e.g. ' Paris') or its id"
        )
    return int(ids[0])


def answer_tokens(model: torch.nn.Module, answer: "str | int | Sequence[int]") -> tuple[int, ...]:
    """The token ids of an answer of any length: text (every token it encodes to), an id, or ids.

    Args:
        model: Supplies the tokenizer and the vocabulary size.
        answer: Text such as ``" New York City"``, one token id, or a
            non-empty sequence of token ids.

    Returns:
        The answer's ids, in order (one for a single-token answer).
    """
    if isinstance(answer, str | int) and not isinstance(answer, bool):
        if isinstance(answer, int):
            return (answer_token(model, answer),)
        tokenizer = _tokenizer(model)
        if tokenizer is None:
            raise InvalidInput(
                f"model has no tokenizer, so the answer must be token ids, got {answer!r}"
            )
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInput(
                f"answer must encode to at least one token, got {answer!r}; pass e.g. ' Paris'"
            )
        return tuple(int(i) for i in ids)
    if isinstance(answer, Sequence | Tensor) and len(answer) > 0:
        return tuple(answer_token(model, int(i)) for i in _int_ids(answer))
    raise InvalidInputType(
        f"answer must be text, a token id or a non-empty sequence of token ids, got {answer!r}"
    )


@dataclasses.dataclass(frozen=True, init=False)
class AnswerSet:
    """Several acceptable answers, scored together: the log of their summed probability.

    ``AnswerSet([" Paris", " paris"])`` scores ``log(p(" Paris") + p(" paris"))``
    in every cell; each member is text (every token it encodes to), a token
    id, or token ids, and a member of several tokens is teacher-forced as an
    answer of several tokens is. A plain list stays what it was (the token
    ids of one answer), so a set of answers is always spelled ``AnswerSet``.

    Attributes:
        members: The members as given (text, an id, or a tuple of ids), in order.
    """

    members: tuple[str | int | tuple[int, ...], ...]

    def __init__(self, members: Sequence[Any]) -> None:
        """Check and keep the members (at least one; text, a token id, or token ids)."""
        if isinstance(members, str | int | AnswerSet) or not isinstance(members, Sequence):
            raise InvalidInputType(
                f"AnswerSet takes a list of answers, got {members!r}; pass e.g. "
                "AnswerSet([' Paris', ' paris'])"
            )
        kept: list[str | int | tuple[int, ...]] = []
        for member in members:
            if isinstance(member, str) or (
                isinstance(member, int) and not isinstance(member, bool)
            ):
                kept.append(member)
            elif isinstance(member, Sequence | Tensor) and len(member) > 0:
                kept.append(tuple(_int_ids(member)))
            else:
                raise InvalidInputType(
                    f"each answer of an AnswerSet must be text, a token id or a non-empty "
                    f"sequence of token ids, got {member!r}; pass e.g. "
                    "AnswerSet([' Paris', ' paris'])"
                )
        if not kept:
            raise InvalidInput(
                "an AnswerSet needs at least one answer, got none; pass e.g. "
                "AnswerSet([' Paris', ' paris'])"
            )
        object.__setattr__(self, "members", tuple(kept))

    def to_json(self) -> dict[str, list[Any]]:
        """``{"any_of": [...]}``: how settings and results record the set."""
        return {"any_of": [list(m) if isinstance(m, tuple) else m for m in self.members]}

    @classmethod
    def from_json(cls, data: Any) -> "AnswerSet":
        """Inverse of :meth:`to_json`."""
        return cls(data["any_of"])


def answer_set_tokens(model: torch.nn.Module, answers: AnswerSet) -> tuple[tuple[int, ...], ...]:
    """Each member's token ids, checked: distinct, and none the beginning of another.

    A member that begins another (``" New"`` and ``" New York"``) would count
    the longer one's probability twice, since every continuation of ``" New"``
    is part of ``p(" New")``.

    Raises:
        InvalidInput: Two members with the same tokens, or one beginning another.
    """
    ids = [answer_tokens(model, member) for member in answers.members]
    for i, first in enumerate(ids):
        for j, second in enumerate(ids):
            if i != j and second[: len(first)] == first:
                what = "are the same tokens" if first == second else "begins the other"
                raise InvalidInput(
                    f"the answers of an AnswerSet must be distinct token sequences, none the "
                    f"beginning of another (its probability would count twice), but "
                    f"{answers.members[i]!r} ({list(first)}) {what} "
                    f"{answers.members[j]!r} ({list(second)}); drop one of them"
                )
    return tuple(ids)


def _int_ids(ids: "Sequence[int] | Tensor") -> list[int]:
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidInputType(
            f"an answer given as token ids must hold integers only, got {values!r}"
        )
    return values


def single_token_id(model: torch.nn.Module, text: str) -> int | None:
    """The id of ``text`` if the model's tokenizer encodes it as exactly one token, else None."""
    tokenizer = _tokenizer(model)
    if tokenizer is None or not text:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


FILLER_WORDS: frozenset[str] = frozenset(
    {"the", "a", "an", "of", "to", "in", "on", "at", "for", "and", "or", "is", "was", "that"}
)
"""Function words that are a likely next token after almost any prompt.

A trace whose answer is one of them (with or without a leading space, in
any case) follows the grammar of the prompt, not the fact: "Angela Merkel
is a citizen of" continues with ``' the'`` about as often as with
``' Germany'``. Kept short on purpose: only words that carry no fact.
"""


def is_filler_token(model: torch.nn.Module, token_id: int) -> bool:
    """Whether a token carries no content: a special token, whitespace, punctuation or a filler.

    Args:
        model: Supplies the tokenizer.
        token_id: The token.

    Returns:
        True for the tokenizer's special tokens (BOS, EOS, padding), tokens
        that are whitespace or punctuation only, and :data:`FILLER_WORDS`.
    """
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return False
    if token_id in set(getattr(tokenizer, "all_special_ids", ())):
        return True
    word = token_labels(model, [token_id])[0].strip()
    punctuation = all(unicodedata.category(c).startswith("P") for c in word)
    return punctuation or word.lower() in FILLER_WORDS


_CAPITALISED_SPAN = re.compile(
    r"[A-Z][\w'\-\.]*(?:\s+(?:of|the|de|du|von|van|der|[A-Z][\w'\-\.]*))*"
)


def guess_subject(prompt: str) -> str:
    """Guess the subject of a factual prompt: its longest capitalised span.

    Leading articles join the span ("The Eiffel Tower"); a capitalised first
    word alone (a sentence start such as "In") loses to any longer span.

    Args:
        prompt: The prompt text.

    Returns:
        The guessed subject text.
    """
    if not isinstance(prompt, str):
        raise InvalidInputType(
            f"prompt must be text to guess its subject, got {type(prompt).__name__}; "
            "pass the subject explicitly"
        )
    if not prompt.strip():
        raise InvalidInput(
            f"prompt must be non-empty text, got {prompt!r}; pass a prompt such as "
            "'The Eiffel Tower is located in the city of'"
        )
    spans = [m.group(0).strip() for m in _CAPITALISED_SPAN.finditer(prompt)]
    spans = [re.sub(r"\s+(?:of|the|de|du|von|van|der)$", "", s) for s in spans]
    if not spans:
        raise InvalidInput(
            f"could not guess a subject in {prompt!r}: the guess is the longest span of "
            "capitalised words, and it has none; pass the subject explicitly"
        )
    return max(spans, key=lambda s: (len(s.split()), len(s)))
