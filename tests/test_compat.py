"""TransformerLens versions: what lenscope accepts, and the errors for what it does not."""

from importlib import metadata

import pytest
import torch
from conftest import tl4

import lenscope
from lenscope import compat


@pytest.fixture
def fake_version(monkeypatch):
    def install(text):
        real = metadata.version

        def version(name):
            if name == "transformer-lens":
                if text is None:
                    raise metadata.PackageNotFoundError(name)
                return text
            return real(name)

        monkeypatch.setattr(compat.metadata, "version", version)
        compat.tl_version.cache_clear()

    yield install
    compat.tl_version.cache_clear()


@pytest.mark.parametrize(
    ("text", "expected"), [("3.9.0", (3, 9)), ("4.3.0", (4, 3)), ("4.10.1+local", (4, 10))]
)
def test_supported_versions_parse(fake_version, text, expected):
    fake_version(text)
    assert compat.tl_version() == expected
    assert compat.has_hooked_transformer() == (expected < (4, 0))


@pytest.mark.parametrize("text", ["3.8.2", "2.16.0", "5.0.0"])
def test_unsupported_version_names_itself_and_the_fix(fake_version, text):
    fake_version(text)
    with pytest.raises(
        ImportError,
        match=rf"supports TransformerLens >=3.9,<5, but {text} is "
        r"installed; run pip install \"transformer-lens>=4,<5\"",
    ):
        compat.tl_version()


def test_missing_transformer_lens(fake_version):
    fake_version(None)
    with pytest.raises(ImportError, match="it is not installed; run pip install"):
        compat.tl_version()


def test_installed_version_matches_the_default_class():
    from transformer_lens.model_bridge import TransformerBridge

    assert compat.bridge_class() is TransformerBridge
    if tl4():
        with pytest.raises(
            ImportError,
            match=r"HookedTransformer was removed in TransformerLens "
            r"4\.0 \(installed: 4\.\d+.*transformer-lens>=3\.9,<4",
        ):
            compat.hooked_transformer_class()
        with pytest.raises(ImportError, match="HookedTransformer was removed"):
            lenscope.load_model("gemma-3-270m", bridge=False)
    else:
        from transformer_lens import HookedTransformer

        assert compat.hooked_transformer_class() is HookedTransformer


def test_a_model_of_neither_class_names_the_installed_version():
    version = metadata.version("transformer-lens")
    with pytest.raises(
        TypeError,
        match=rf"got Linear; with the installed TransformerLens "
        rf"{version}, load one with lenscope\.load_model",
    ):
        lenscope.CausalTracer(torch.nn.Linear(2, 2))
