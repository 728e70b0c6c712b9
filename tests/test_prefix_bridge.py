"""The prefix strategy on a TransformerBridge: same numbers as "full", and the model left as it was."""

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
import lenscope._bridge_prefix as bridge_prefix
import lenscope.engine as engine
from lenscope.corruptions import GaussianNoise
from lenscope.sites import Site

SAMPLES = 2
BRIDGES = ["tiny_bridge", "tiny_gated_bridge"]


@pytest.fixture(scope="module")
def noise(tiny_bridge):
    generator = torch.Generator().manual_seed(4)
    return torch.randn(SAMPLES, 4, tiny_bridge.cfg.d_model, generator=generator) * 2.0


@pytest.mark.parametrize("model_name", BRIDGES)
def test_auto_picks_prefix_on_a_bridge(request, model_name):
    model = request.getfixturevalue(model_name)
    assert lenscope.CausalTracer(model).strategy == "prefix"


@pytest.mark.parametrize("model_name", BRIDGES)
@pytest.mark.parametrize("batch_size", [1, 3, None])
@pytest.mark.parametrize(("kind", "window"), [("mlp_out", 3), ("resid_post", 1)])
def test_prefix_equals_full_on_a_bridge(request, noise, model_name, batch_size, kind, window):
    """Every chunking of the staircase; the subject starts at position 0, so pos 0 is traced too."""
    model = request.getfixturevalue(model_name)
    tokens = model.to_tokens(TINY_PROMPT)[0]
    options = dict(kind=kind, window=window, noise_tensor=noise, samples=SAMPLES)
    full = lenscope.CausalTracer(model, strategy="full", progress=False, batch_size=1000)
    expected = full.trace(tokens, (0, 4), **options)
    tracer = lenscope.CausalTracer(model, strategy="prefix", progress=False, batch_size=batch_size)
    got = tracer.trace(tokens, (0, 4), **options)
    assert not expected.scores.isnan().any()
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.top_probs, expected.top_probs, atol=1e-6, rtol=0)
    assert got.corrupted_score == expected.corrupted_score


def _state(model):
    """Everything a trace could leave behind on the model."""
    modules = dict(model.named_modules())
    return {
        # A bridge lists a HookPoint under its alias too (hook_resid_pre = hook_in): count each once.
        "hook_points": sum(
            len(hp.fwd_hooks) + len(hp.bwd_hooks)
            for hp in {id(hp): hp for hp in model.hook_dict.values()}.values()
        ),
        "torch_hooks": {
            name: (
                len(module._forward_pre_hooks),
                len(module._forward_hooks),
                len(module._backward_hooks),
            )
            for name, module in modules.items()
        },
        "attributes": {name: sorted(vars(module)) for name, module in modules.items()},
        "stray": [
            getattr(module, attr, None)
            for module in modules.values()
            for attr in (
                "_start_residual",
                "_start_at_layer_idx",
                "_stop_at_layer_idx",
                "_captured_pre_ln_residual",
                "_last_hf_cache",
            )
        ],
        "training": [module.training for module in modules.values()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "weights": [(p.data_ptr(), p.stride(), p.clone()) for p in model.parameters()],
    }


def _assert_same_state(before, after):
    for key in ("hook_points", "torch_hooks", "attributes", "training", "requires_grad"):
        assert after[key] == before[key], key
    assert all(value is None for value in after["stray"]), "stray start/stop/cache state"
    for (ptr, stride, weight), (ptr_after, stride_after, weight_after) in zip(
        before["weights"], after["weights"], strict=True
    ):
        assert (ptr, stride) == (ptr_after, stride_after) and torch.equal(weight, weight_after)


def _fail_at(call, exception):
    """A replacement ``update`` for a cache stand-in that raises on its ``call``-th use."""
    calls = {"n": 0}

    def make(original):
        def update(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise exception("interrupted")
            return original(self, *args, **kwargs)

        return update

    return make


@pytest.mark.parametrize("model_name", BRIDGES)
@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["none", "corrupted run", "probe", "stair"])
def test_prefix_on_a_bridge_leaves_the_model_as_it_was(
    request, monkeypatch, model_name, exception, where
):
    """No hook, attribute, flag or cache left, whether the trace ends or is interrupted.

    ``where`` is the forward pass the exception is raised inside: the corrupted
    run (recording keys and values), the one-row probe of a stair (with the
    blocks skipped; a RuntimeError there makes the probe retry with the real
    blocks, which raises again), or a stair's block calls (with the restoring
    hooks attached).
    """
    if where == "none" and exception is KeyboardInterrupt:
        pytest.skip("nothing is raised")
    model = request.getfixturevalue(model_name)
    model(model.to_tokens(TINY_PROMPT))  # TransformerLens wires its own hooks on first use
    user_calls = []
    model.blocks[1].hook_resid_pre.add_hook(lambda act, hook: user_calls.append(1))
    model.train()
    model.blocks[1].requires_grad_(False)
    try:
        before = _state(model)
        if where == "corrupted run":
            make = _fail_at(1, exception)
            monkeypatch.setattr(
                bridge_prefix._Recorder, "update", make(bridge_prefix._Recorder.update)
            )
        elif where == "probe":

            class FailingCache(bridge_prefix.DynamicCache):
                def get_seq_length(self, *args, **kwargs):
                    raise exception("interrupted")

            monkeypatch.setattr(bridge_prefix, "DynamicCache", FailingCache)
        elif where == "stair":
            original = Site.restore_hook
            calls = {"n": 0}

            def flaky(site, clean, restore):
                restore_fn = original(site, clean, restore)

                def maybe_fail(act, hook):
                    calls["n"] += 1
                    if calls["n"] == 3:
                        raise exception("interrupted")
                    return restore_fn(act, hook)

                return maybe_fail

            monkeypatch.setattr(Site, "restore_hook", flaky)
        tracer = lenscope.CausalTracer(model, progress=False, strategy="prefix", batch_size=2)
        if where == "none":
            tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=SAMPLES)
        else:
            with pytest.raises(exception, match="interrupted"):
                tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=SAMPLES)
        _assert_same_state(before, _state(model))
        assert user_calls, "the user's own hook stopped firing"
    finally:
        model.reset_hooks(including_permanent=True)
        model.blocks[1].requires_grad_(True)
        model.eval()


def test_unsupported_bridge_falls_back_to_full(tiny_bridge, monkeypatch):
    monkeypatch.setattr(tiny_bridge.cfg, "positional_embedding_type", "alibi")
    with pytest.warns(UserWarning, match=r"prefix strategy cannot run on this GPT2LMHeadModel"):
        assert lenscope.CausalTracer(tiny_bridge).strategy == "full"
    with pytest.raises(
        ValueError,
        match=r"strategy='prefix' cannot run on this GPT2LMHeadModel \(TransformerBridge\): "
        r"ALiBi position biases "
        r"are not supported; pass strategy='full' or 'auto'",
    ):
        lenscope.CausalTracer(tiny_bridge, strategy="prefix")


def test_native_attention_is_reported(tiny_bridge, monkeypatch):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    attn = tiny_bridge.blocks[0].attn
    monkeypatch.setattr(type(attn), "forward", AttentionBridge.forward)
    assert bridge_prefix.bridge_unsupported(tiny_bridge) == (
        f"blocks.0.attn ({type(attn).__name__}) runs Hugging Face's own attention, "
        "which lenscope cannot hand the corrupted keys and values"
    )


def test_attention_that_ignores_the_cache_is_an_error(tiny_gated_bridge, monkeypatch):
    """Never silently wrong: a block that did not read the corrupted keys stops the trace."""
    monkeypatch.setattr(bridge_prefix, "_CACHE_KEYWORD", "unread_keyword")
    tracer = lenscope.CausalTracer(tiny_gated_bridge, strategy="prefix", progress=False)
    with pytest.raises(
        RuntimeError,
        match=r"blocks.0.attn never read the key/value cache lenscope passes it as "
        r"unread_keyword=.*pass strategy='full'",
    ):
        tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=SAMPLES)


@pytest.mark.parametrize("model_name", BRIDGES)
def test_probe_skips_the_blocks(request, noise, model_name):
    """The probe learns every block's arguments without running a block (and without fallback)."""
    from lenscope._bridge_prefix import BridgePrefixRunner

    model = request.getfixturevalue(model_name)
    tokens = model.to_tokens(TINY_PROMPT)[0]
    with torch.inference_mode():
        bound = GaussianNoise(samples=noise.shape[0], noise_tensor=noise).bind(
            model, tokens, (1, 5)
        )
        corrupted = engine.corrupted_run(model, bound, keep_prefix_state=True)
        fired = []
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: fired.append(1))]):
            runner = BridgePrefixRunner(model)
            captured = runner._capture_block_inputs(
                torch.zeros(1, 6, model.cfg.d_model),
                bridge_prefix.DynamicCache(),
                [(k[:1, ..., :4, :], v[:1, ..., :4, :]) for k, v in corrupted.kv_cache.keys_values],
                skip_blocks=True,
            )
    assert sorted(captured) == list(range(model.cfg.n_layers))
    assert not fired
    assert all("forward" not in vars(block) for block in model.blocks)
