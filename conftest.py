"""The documentation's code blocks as tests (pytest-codeblocks; see README "Tests and tooling").

``pytest`` collects every ``python`` and ``bash`` block of README.md and
docs/*.md (``--codeblocks`` in pyproject's addopts). Blocks run as a reader
would copy them, each in a fresh temporary directory, so the files they write
(``trace.html``, ``eiffel.json``) land there. Blocks that load the real model
share one copy of it: while a Python block runs, ``lenscope.load_model``
returns the model an earlier block loaded with the same arguments (lenscope
leaves a model as it found it after every call, so sharing is sound, and a
block that broke that promise would show up in the blocks after it).
"""

import functools
import os
import tempfile

import pytest


def _is_code_block(item: pytest.Item) -> bool:
    return type(item).__module__.startswith("pytest_codeblocks")


@functools.cache
def _shared_model(load, args, kwargs):
    return load(*args, **dict(kwargs))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Run a documentation code block in a temporary directory, with one model per arguments."""
    if not _is_code_block(item):
        return (yield)
    import lenscope

    load = lenscope.load_model

    @functools.wraps(load)
    def shared_load_model(*args, **kwargs):
        return _shared_model(load, args, tuple(sorted(kwargs.items())))

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lenscope-docs-") as tmp:
        os.chdir(tmp)
        lenscope.load_model = shared_load_model
        try:
            return (yield)
        finally:
            lenscope.load_model = load
            os.chdir(cwd)
