"""Prompts, subjects and answer tokens (lenscope.tokens)."""

import re

import pytest
from conftest import TINY_SUBJECT

import lenscope
from lenscope.tokens import guess_subject, is_filler_token, single_token_id
from lenscope.validation import InvalidInput


def test_guess_subject_takes_the_longest_capitalised_span():
    assert guess_subject("The Eiffel Tower is located in the city of") == "The Eiffel Tower"


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_guess_subject_says_an_empty_prompt_is_empty(prompt):
    expected = (
        f"prompt must be non-empty text, got {re.escape(repr(prompt))}; pass a prompt such as"
    )
    with pytest.raises(InvalidInput, match=expected):
        guess_subject(prompt)


def test_guess_subject_without_capitalised_words():
    match = r"could not guess a subject in 'all lower case': .*; pass the subject explicitly"
    with pytest.raises(InvalidInput, match=match):
        guess_subject("all lower case")


def test_empty_prompt_with_a_subject_says_the_prompt_is_empty(tiny_model):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    with pytest.raises(InvalidInput, match=r"prompt must be non-empty text or token ids, got ''"):
        tracer.trace("", TINY_SUBJECT, samples=1)


def test_filler_tokens(tiny_model):
    tokenizer = tiny_model.tokenizer

    def token(text):
        return single_token_id(tiny_model, text)

    for text in (" the", "the", " The", " a", " of", " and", " is"):
        assert is_filler_token(tiny_model, token(text)), text
    assert is_filler_token(tiny_model, tokenizer.bos_token_id)
    for text in (" paris", "Paris", " tower", " city"):
        assert not is_filler_token(tiny_model, token(text)), text
    assert token(" paris rome") is None and token("") is None
