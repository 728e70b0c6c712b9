"""The vectorised sweep against a plain reference loop, written independently here."""

import math

import pytest
import torch
from conftest import TINY_PROMPT

import lenscope

SAMPLES = 3


def _answer_prob(logits, answer):
    return torch.softmax(logits, dim=-1)[:, answer]


def reference_trace(
    model, tokens, subject_range, noise, kind, window, answer, cells, metric=_answer_prob
):
    """One run_with_hooks per cell, full logits, nothing shared: the obvious implementation.

    ``metric`` maps the last-position float logits of the copies to one number per copy.
    """
    n_layers = model.cfg.n_layers
    start, end = subject_range
    _, clean_cache = model.run_with_cache(tokens[None])
    batch = tokens[None].repeat(noise.shape[0], 1)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += noise
        return embed

    def restorer(name, pos):
        def hook(act, hook):
            act = act.clone()
            act[:, pos] = clean_cache[name][0, pos]
            return act

        return hook

    def score(extra_hooks):
        logits = model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise), *extra_hooks])
        return metric(logits[:, -1].float(), answer).mean().item()

    out = torch.full((n_layers, tokens.shape[0]), math.nan)
    for layer, pos in cells:
        lo = max(0, layer - window // 2)
        hi = min(n_layers, layer - window // 2 + window)
        names = [f"blocks.{j}.hook_{kind}" for j in range(lo, hi)]
        out[layer, pos] = score([(name, restorer(name, pos)) for name in names])
    return out, score([])


@pytest.fixture(scope="module")
def tokens_and_noise(tiny_model):
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(SAMPLES, 3, tiny_model.cfg.d_model, generator=generator) * 2.0
    return tokens, noise


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gated_model"])
@pytest.mark.parametrize("strategy", ["full", "prefix"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("kind", lenscope.KINDS)
def test_engine_matches_reference_loop(
    request, tokens_and_noise, kind, window, strategy, model_name
):
    """Every cell of every kind: GPT-2 layout and gated-MLP/grouped-query-attention layout."""
    model = request.getfixturevalue(model_name)
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(model, strategy=strategy, progress=False, batch_size=7)
    result = tracer.trace(
        tokens, (1, 4), kind=kind, window=window, noise_tensor=noise, samples=SAMPLES
    )
    cells = [(layer, pos) for layer in range(4) for pos in range(tokens.shape[0])]
    expected, corrupted = reference_trace(
        model, tokens, (1, 4), noise, kind, window, result.answer_id, cells
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert result.corrupted_score == pytest.approx(corrupted, abs=1e-6)


@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_layer_range_and_positions_subset(tiny_model, tokens_and_noise, strategy):
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_model, strategy=strategy, progress=False)
    result = tracer.trace(
        tokens,
        (1, 4),
        kind="mlp_out",
        window=3,
        noise_tensor=noise,
        samples=SAMPLES,
        layers=[1, 2],
        positions=[0, 3, 5, 9],
    )
    cells = [(layer, pos) for layer in (1, 2) for pos in (0, 3, 5, 9)]
    expected, _ = reference_trace(
        tiny_model, tokens, (1, 4), noise, "mlp_out", 3, result.answer_id, cells
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0, equal_nan=True)
    assert result.scores.isnan().sum() == 4 * 10 - 8
    assert (result.top_ids[0] == -1).all() and result.top_probs[0].isnan().all()


@pytest.mark.parametrize("kind", lenscope.KINDS)
@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 64, None])
def test_every_chunking_gives_the_same_scores(tiny_model, tokens_and_noise, batch_size, kind):
    """Chunking and the automatic batch size change speed, never the numbers."""
    tokens, noise = tokens_and_noise
    reference = lenscope.CausalTracer(tiny_model, strategy="full", progress=False, batch_size=1000)
    expected = reference.trace(
        tokens, (1, 4), kind=kind, window=3, noise_tensor=noise, samples=SAMPLES
    )
    for strategy in ("full", "prefix"):
        tracer = lenscope.CausalTracer(
            tiny_model, strategy=strategy, progress=False, batch_size=batch_size
        )
        got = tracer.trace(tokens, (1, 4), kind=kind, window=3, noise_tensor=noise, samples=SAMPLES)
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.top_probs, expected.top_probs, atol=1e-6, rtol=0)
        assert torch.equal(got.top_ids[..., 0], expected.top_ids[..., 0])


def test_prefix_strategy_on_model_with_learned_positions(tiny_model_no_tokenizer):
    """Absolute position embeddings: the prefix path must keep the positions of the suffix."""
    model = tiny_model_no_tokenizer
    tokens = torch.tensor([0, 5, 9, 11, 3, 7, 20, 8])
    noise = torch.randn(2, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    results = {
        strategy: lenscope.CausalTracer(model, strategy=strategy, progress=False).trace(
            tokens, (2, 4), kind="resid_pre", window=2, noise_tensor=noise, samples=2, answer=3
        )
        for strategy in ("full", "prefix")
    }
    torch.testing.assert_close(results["prefix"].scores, results["full"].scores, atol=1e-6, rtol=0)
    cells = [(layer, pos) for layer in range(4) for pos in range(8)]
    expected, _ = reference_trace(model, tokens, (2, 4), noise, "resid_pre", 2, 3, cells)
    torch.testing.assert_close(results["prefix"].scores, expected, atol=1e-5, rtol=0)


def test_auto_batch_size_is_bounded(tiny_model):
    from lenscope.engine import auto_batch_size

    rows = auto_batch_size(tiny_model, n_pos=10, samples=10)
    assert 10 <= rows <= 4096


def test_restore_windows_follow_rome():
    from lenscope.engine import restore_windows

    cells = torch.tensor([[0, 0], [5, 0], [17, 0]])
    windows = restore_windows(cells, 10, 18)
    # ROME: layers [l - w//2, l - w//2 + w) clipped to [0, n_layers)
    assert windows[0].nonzero().flatten().tolist() == list(range(0, 5))
    assert windows[1].nonzero().flatten().tolist() == list(range(0, 10))
    assert windows[2].nonzero().flatten().tolist() == list(range(12, 18))


@pytest.mark.parametrize("cells_per_chunk", [1, 3, 7])
def test_decoding_in_chunks_gives_the_same_scores(
    tiny_model, tokens_and_noise, monkeypatch, cells_per_chunk
):
    """Final residuals are decoded a chunk of whole cells at a time: any chunking agrees."""
    import lenscope.engine as engine

    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    options = dict(kind="resid_pre", window=1, noise_tensor=noise, samples=SAMPLES)
    expected = tracer.trace(tokens, (1, 4), **options)
    monkeypatch.setattr(
        engine, "_DECODE_BYTES", 4 * tiny_model.cfg.d_vocab * SAMPLES * cells_per_chunk
    )
    got = tracer.trace(tokens, (1, 4), **options)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.top_probs, expected.top_probs, atol=1e-6, rtol=0)


def _answer_logit_view(logits, answer):
    return logits[:, answer]  # a view of the logits the engine later overwrites


@pytest.mark.parametrize(
    ("metric", "reference_metric"),
    [
        ("log_prob", lambda logits, a: torch.log_softmax(logits, dim=-1)[:, a]),
        (_answer_logit_view, lambda logits, a: logits[:, a].clone()),
        (lenscope.metrics.logit_diff(5), lambda logits, a: logits[:, a] - logits[:, 5]),
    ],
)
@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_metrics_match_reference_loop(
    tiny_gated_model, tokens_and_noise, metric, reference_metric, strategy
):
    """The shared in-place softmax must not change what any metric sees."""
    tokens, noise = tokens_and_noise
    tracer = lenscope.CausalTracer(tiny_gated_model, strategy=strategy, progress=False)
    result = tracer.trace(
        tokens,
        (1, 4),
        kind="mlp_out",
        window=3,
        noise_tensor=noise,
        samples=SAMPLES,
        metric=metric,
    )
    cells = [(layer, pos) for layer in range(4) for pos in range(tokens.shape[0])]
    expected, corrupted = reference_trace(
        tiny_gated_model,
        tokens,
        (1, 4),
        noise,
        "mlp_out",
        3,
        result.answer_id,
        cells,
        metric=reference_metric,
    )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert result.corrupted_score == pytest.approx(corrupted, abs=1e-5)


def test_weights_are_stored_in_read_order_only_during_a_trace(tiny_gated_model, tokens_and_noise):
    """TransformerLens's per-call weight transposes become views; afterwards nothing changed."""
    import einops

    from lenscope.engine import matmul_friendly_weights
    from lenscope.hooks import is_bridge

    model = tiny_gated_model
    if is_bridge(model):
        pytest.skip(
            "HookedTransformer weight layout; matmul_friendly_weights leaves a bridge alone"
        )
    mlp, attn = model.blocks[0].mlp, model.blocks[0].attn
    before = [(p, p.data, p.data_ptr(), p.stride()) for p in model.parameters()]
    assert not mlp.W_gate.T.is_contiguous()
    with matmul_friendly_weights(model):
        assert mlp.W_gate.T.is_contiguous() and mlp.W_out.T.is_contiguous()
        for weight, pattern in [
            (attn.W_Q, "h m d -> (h d) m"),
            (attn._W_K, "h m d -> (h d) m"),
            (attn.W_O, "h d m -> m (h d)"),
        ]:
            assert einops.rearrange(weight, pattern).data_ptr() == weight.data_ptr()
        seen = [(p, p.data) for p in model.parameters()]
    for (param, data, ptr, stride), (param_in, data_in) in zip(before, seen, strict=True):
        assert param is param_in and torch.equal(data, data_in)
        assert param.data_ptr() == ptr and param.stride() == stride


def test_probabilities_are_accurate_on_a_wide_vocabulary():
    """The engine's in-place softmax and lenscope's metrics agree with float64 to 3e-7.

    Wide, peaked logits like a real model's over 262k tokens: torch's float32
    softmax kernel is off by several 1e-5 on CPU here, which once made a
    restored-to-clean cell differ from the clean score.
    """
    from lenscope.engine import _score_rows

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 262_144, generator=generator) * 6
    logits[:, 7] += 40
    expected = torch.softmax(logits.double(), dim=-1)
    for metric in (lenscope.metrics.prob, lenscope.metrics.log_prob):
        scores, top_ids, top_probs = _score_rows(logits.clone(), 2, 7, metric, 3)
        want = expected[:, 7] if metric is lenscope.metrics.prob else expected[:, 7].log()
        torch.testing.assert_close(scores.double(), want.reshape(2, 2).mean(1), atol=3e-7, rtol=0)
        torch.testing.assert_close(metric(logits, 7).double(), want, atol=3e-7, rtol=0)
    mean = expected.reshape(2, 2, -1).mean(1)
    torch.testing.assert_close(top_probs.double(), mean.topk(3).values, atol=1e-6, rtol=0)
    assert torch.equal(top_ids, mean.topk(3).indices)
