"""The data files shipped with lenscope, read once.

``data/known_1000.json`` is the known-facts set of ROME (Meng et al., 2022,
arXiv 2202.05262; 1209 records, what GPT-2 XL knows), used for the noise
scale (:mod:`lenscope.noise`) and for dataset tracing
(:mod:`lenscope.datasets.facts`). ``data/long_answers.json`` holds facts
whose answers are names of several words, written for lenscope
(``scripts/make_long_answers.py``). This module has no lenscope imports.
"""

import functools
import json
from importlib import resources
from typing import Any


@functools.cache
def known_records() -> tuple[dict[str, Any], ...]:
    """The ROME known-facts records, parsed once (do not modify them: copy first)."""
    text = resources.files("lenscope").joinpath("data/known_1000.json").read_text()
    return tuple(json.loads(text))


@functools.cache
def long_answer_records() -> tuple[dict[str, Any], ...]:
    """The facts of ``data/long_answers.json``, parsed once (copy before modifying)."""
    text = resources.files("lenscope").joinpath("data/long_answers.json").read_text()
    return tuple(json.loads(text))
