"""Tests of lens trajectories (lenscope.lens) and their plots (lenscope.plotting.lens).

Every statistic is checked against a plain float64 NumPy computation from the
hidden states ``model.run_with_cache`` captures, with the final norm and
unembedding written out by hand, so the lens is tested against the
documented decoding rather than against itself.
"""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model, tl4

from lenscope.corruptions import noise_hook as _noise_hook
from lenscope.hooks import EMBED_HOOK, decode_resid, hook_name
from lenscope.lens import (
    COMPONENTS,
    CellTrajectories,
    LensDecoder,
    LensTrajectory,
    LogitLens,
    lens_trace_cell,
    lens_trajectory,
)
from lenscope.noise import draw_noise
from lenscope.plotting._common import escape, natural_width, visible
from lenscope.plotting.lens import plot_lens
from lenscope.tracer import CausalTracer

STATS = ("entropy", "answer_prob", "answer_rank", "top1_prob", "kl_to_final")


# ----------------------------------------------------------------- references


def _np_head(model, hidden):
    """Logits of float64 hidden states ``[..., d_model]``: LayerNorm, then ``W_U``, in NumPy."""
    x = np.asarray(hidden, dtype=np.float64)
    x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + model.cfg.eps)
    x = x * model.ln_final.w.detach().double().numpy() + model.ln_final.b.detach().double().numpy()
    return x @ model.W_U.detach().double().numpy() + model.b_U.detach().double().numpy()


def _np_log_softmax(logits, copy_axis=None):
    """``log softmax``, optionally of the mean distribution over ``copy_axis``."""
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    if copy_axis is not None:
        logp = np.log(np.exp(logp).mean(copy_axis))
    return logp


def _np_stats(logp, final_logp, answer_id, k):
    """The lens statistics of ``logp [layer, pos, vocab]`` as plain NumPy."""
    p, p_final = np.exp(logp), np.exp(final_logp)
    order = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return {
        "entropy": -(p * logp).sum(-1),
        "answer_prob": p[..., answer_id],
        "answer_rank": 1 + (logp > logp[..., answer_id : answer_id + 1]).sum(-1),
        "top1_prob": p.max(-1),
        "kl_to_final": (p_final * (final_logp - logp)).sum(-1),
        "top_ids": order,
        "top_probs": np.take_along_axis(p, order, -1),
    }


def _hidden(model, tokens, component, fwd_hooks=()):
    """``[layer, batch, pos, d_model]`` of one component and the final residual (run_with_cache)."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    hidden = np.stack([cache[hook_name(component, j)].double().numpy() for j in range(n)])
    return hidden, cache[hook_name("resid_post", n - 1)].double().numpy()


def _assert_stats(traj, ref, atol=1e-5):
    for name in STATS:
        np.testing.assert_allclose(
            traj.statistic(name).double().numpy(), ref[name], atol=atol, rtol=1e-5, err_msg=name
        )
    np.testing.assert_allclose(traj.top_probs.double().numpy(), ref["top_probs"], atol=atol)
    # Ids may swap only where probabilities tie to float32 precision.
    same = traj.top_ids.numpy() == ref["top_ids"]
    assert same.mean() > 0.99


@pytest.fixture(scope="module")
def clean_traj(tiny_model):
    return lens_trajectory(tiny_model, TINY_PROMPT, subject=TINY_SUBJECT)


@pytest.fixture(scope="module")
def tracer(tiny_model):
    return CausalTracer(tiny_model, progress=False)


@pytest.fixture(scope="module")
def mlp_trace(tracer):
    return tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=4, seed=3)


@pytest.fixture(scope="module")
def resid_trace(tracer):
    return tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="resid_post", samples=4, seed=3)


# ------------------------------------------------------------- the logit lens


def test_last_resid_post_layer_is_the_models_own_output(tiny_model, clean_traj):
    tokens = tiny_model.to_tokens(TINY_PROMPT)
    with torch.inference_mode():
        logits, cache = tiny_model.run_with_cache(tokens)
        final = cache[hook_name("resid_post", tiny_model.cfg.n_layers - 1)]
        lens_logits = LogitLens(tiny_model).forward(final, tiny_model.cfg.n_layers - 1)
    torch.testing.assert_close(lens_logits, logits.float(), atol=1e-5, rtol=0)
    probs = torch.softmax(logits[0].double(), -1)
    top = probs.topk(clean_traj.top_k)
    torch.testing.assert_close(clean_traj.top_probs[-1].double(), top.values, atol=1e-6, rtol=0)
    assert torch.equal(clean_traj.top_ids[-1], top.indices)
    assert clean_traj.answer_id == int(probs[-1].argmax())
    assert clean_traj.answer_rank[-1, -1] == 1
    torch.testing.assert_close(
        clean_traj.kl_to_final[-1], torch.zeros(len(tokens[0])), atol=1e-6, rtol=0
    )


def test_logit_lens_decodes_each_position_like_decode_resid(tiny_model):
    hidden = torch.randn(3, 5, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = LogitLens(tiny_model).forward(hidden, 0)
        rows = decode_resid(tiny_model, hidden.reshape(15, -1)).reshape(3, 5, -1)
    assert out.shape == (3, 5, tiny_model.cfg.d_vocab) and out.dtype == torch.float32
    assert torch.equal(out, rows)
    assert isinstance(LogitLens(tiny_model), LensDecoder)


@pytest.mark.parametrize("component", COMPONENTS)
def test_statistics_match_numpy_for_every_component(tiny_model, component):
    """Each component's hook point goes as-is through the final LayerNorm and W_U."""
    answer = " paris"
    traj = lens_trajectory(tiny_model, TINY_PROMPT, component=component, answer=answer, top_k=7)
    answer_id = tiny_model.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    assert traj.answer_id == answer_id and traj.answer == answer
    tokens = tiny_model.to_tokens(TINY_PROMPT)
    hidden, final = _hidden(tiny_model, tokens, component)
    logp = _np_log_softmax(_np_head(tiny_model, hidden[:, 0]))
    final_logp = _np_log_softmax(_np_head(tiny_model, final[0]))
    _assert_stats(traj, _np_stats(logp, final_logp, answer_id, 7))
    assert traj.hook_names == tuple(f"blocks.{j}.hook_{component}" for j in range(4))


def _float64_stats(logits, final_logits):
    """Entropy and KL(final || layer) of float32 ``logits [layer, pos, vocab]``, all in float64."""
    logp = torch.log_softmax(logits.double(), -1)
    final_logp = torch.log_softmax(final_logits.double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    kl = (final_logp.exp() * (final_logp - logp)).sum(-1)
    return entropy, kl


def _assert_exact(traj, entropy, kl):
    """Entropy to 2e-5 nats; KL to 1e-5 or, for KLs of tens of nats, 2e-6 of its value.

    The log-probabilities are float32, so a KL of 100 nats carries ~1e-5 of
    their rounding (and a float32 near 100 is itself only resolved to 4e-6).
    Entropy: 4.7e-6 at most on Gemma-3-270m as a TransformerBridge, 1.7e-5 as
    TransformerLens 3.9's HookedTransformer (its float32 log-probabilities);
    KL of 96 nats: 2.4e-7 of its value on the Bridge, 1.2e-6 on the HookedTransformer.
    """
    torch.testing.assert_close(traj.entropy.double(), entropy, atol=2e-5, rtol=0)
    torch.testing.assert_close(traj.kl_to_final.double(), kl, atol=1e-5, rtol=2e-6)


def test_statistics_are_exact_on_a_large_vocabulary(tiny_tokenizer):
    """Sums over 2**17 tokens: a float32 reduction was off by ~1e-3 here (1e-2 on Gemma-3)."""
    model = make_tiny_model(tiny_tokenizer, n_layers=3, d_vocab=2**17, init_range=0.2)
    generator = torch.Generator().manual_seed(0)
    n_pos = len(model.to_tokens(TINY_PROMPT)[0])
    # Logits as spread as Gemma-3's (|logit| up to ~100), so that KLs reach tens of nats.
    logits = 8 * torch.randn(3, n_pos, 2**17, generator=generator)
    logits[..., :50] += 40 * torch.rand(3, n_pos, 50, generator=generator)

    class RandomLens:
        """A decoder returning fixed random logits: only the reduction is under test."""

        name = "random logits"

        def forward(self, hidden, layer):
            return logits[layer].expand(hidden.shape[0], -1, -1)

    traj = lens_trajectory(model, TINY_PROMPT, decoder=RandomLens(), layer_chunk=2)
    with torch.inference_mode():
        _, cache = model.run_with_cache(model.to_tokens(TINY_PROMPT))
        final_logits = decode_resid(model, cache[hook_name("resid_post", 2)][0])
    entropy, kl = _float64_stats(logits, final_logits)
    assert float(kl.max()) > 30  # large enough for the float32 reduction's error to show
    _assert_exact(traj, entropy, kl)


def test_resid_pre_is_resid_post_one_layer_down(tiny_model, clean_traj):
    pre = lens_trajectory(tiny_model, TINY_PROMPT, component="resid_pre")
    assert torch.equal(pre.top_ids[1:], clean_traj.top_ids[:-1])
    for name in (*STATS, "top_probs"):
        torch.testing.assert_close(
            getattr(pre, name)[1:], getattr(clean_traj, name)[:-1], atol=2e-6, rtol=1e-6, msg=name
        )


def test_block_outputs_are_not_the_residual_stream(tiny_model, clean_traj):
    mlp = lens_trajectory(tiny_model, TINY_PROMPT, component="mlp_out")
    assert not torch.allclose(mlp.entropy, clean_traj.entropy)
    # KL is always measured against the model's own output, whatever is decoded.
    assert mlp.answer_id == clean_traj.answer_id
    assert bool((mlp.kl_to_final > 0).all())


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 100])
def test_chunking_over_layers_changes_nothing(tiny_model, clean_traj, chunk):
    traj = lens_trajectory(tiny_model, TINY_PROMPT, subject=TINY_SUBJECT, layer_chunk=chunk)
    # Ranks and top-k ids agree exactly; values up to float32 rounding (a chunk
    # is one matrix product, whose kernel depends on its shape).
    assert torch.equal(traj.answer_rank, clean_traj.answer_rank)
    assert torch.equal(traj.top_ids, clean_traj.top_ids)
    for name in (*STATS, "top_probs"):
        torch.testing.assert_close(
            getattr(traj, name), getattr(clean_traj, name), atol=2e-6, rtol=1e-6, msg=name
        )


def test_answer_rank_agrees_with_top_ids(clean_traj):
    for layer in range(clean_traj.n_layers):
        for pos in range(clean_traj.n_pos):
            ids = clean_traj.top_ids[layer, pos].tolist()
            rank = int(clean_traj.answer_rank[layer, pos])
            if clean_traj.answer_id in ids:
                assert rank == ids.index(clean_traj.answer_id) + 1
            else:
                assert rank > clean_traj.top_k


def test_statistics_are_finite_and_in_range(tiny_model, clean_traj):
    for name in STATS:
        assert torch.isfinite(clean_traj.statistic(name)).all(), name
    assert bool((clean_traj.entropy >= 0).all())
    assert bool((clean_traj.entropy <= math.log(tiny_model.cfg.d_vocab) + 1e-4).all())
    assert bool((clean_traj.kl_to_final >= -1e-6).all())
    assert bool(((clean_traj.top1_prob > 0) & (clean_traj.top1_prob <= 1)).all())
    assert torch.equal(clean_traj.top1_prob, clean_traj.top_probs[..., 0])
    assert bool((clean_traj.top_probs[..., :-1] >= clean_traj.top_probs[..., 1:]).all())


def test_a_pluggable_decoder_is_used_per_layer(tiny_model, clean_traj):
    class ScaledLens:
        """An affine translator (a per-layer scale) followed by the model's own head."""

        name = "scaled lens"

        def __init__(self):
            self.layers_seen = []
            self.lens = LogitLens(tiny_model)

        def forward(self, hidden, layer):
            self.layers_seen.append(layer)
            return self.lens.forward(hidden * (layer + 1), layer)

    identity = lens_trajectory(
        tiny_model, TINY_PROMPT, subject=TINY_SUBJECT, decoder=LogitLens(tiny_model)
    )
    assert torch.equal(identity.entropy, clean_traj.entropy)
    scaled = ScaledLens()
    traj = lens_trajectory(tiny_model, TINY_PROMPT, decoder=scaled, layer_chunk=3)
    assert sorted(scaled.layers_seen) == [0, 1, 2, 3]
    assert traj.decoder == "scaled lens" and clean_traj.decoder == "logit lens"
    # LayerNorm removes a positive scale, up to its epsilon.
    torch.testing.assert_close(traj.entropy, clean_traj.entropy, atol=1e-3, rtol=0)


def test_model_without_tokenizer_takes_token_ids(tiny_model_no_tokenizer):
    traj = lens_trajectory(tiny_model_no_tokenizer, torch.tensor([1, 5, 9, 2]), answer=7)
    assert traj.tokens == ("<id 1>", "<id 5>", "<id 9>", "<id 2>")
    assert traj.answer == "<id 7>" and traj.entropy.shape == (4, 4)


def test_model_is_left_as_it_was_after_a_failing_decoder(tiny_model):
    class Broken:
        def forward(self, hidden, layer):
            raise RuntimeError("boom")

    tiny_model.train()
    with pytest.raises(RuntimeError, match="boom"):
        lens_trajectory(tiny_model, TINY_PROMPT, decoder=Broken())
    assert tiny_model.training
    tiny_model.eval()
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())


# ------------------------------------------------------------- result object


def test_save_load_round_trips_exactly(tmp_path, clean_traj, mlp_trace, tiny_model):
    restored = lens_trace_cell(tiny_model, mlp_trace, 1, 3).restored
    for traj in (clean_traj, restored):
        back = LensTrajectory.load(traj.save(tmp_path / "traj.json"))
        for field in traj.__dataclass_fields__:
            a, b = getattr(traj, field), getattr(back, field)
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), field
            else:
                assert a == b, field


def test_repr_is_one_short_line_and_html_a_table(clean_traj, mlp_trace, tiny_model):
    text = repr(clean_traj)
    assert len(text) < 400 and "\n" not in text
    assert text.startswith("LensTrajectory(label='clean', model='tiny-")
    assert f"answer={clean_traj.answer!r}: p=" in text and "component='resid_post'" in text
    first = int((clean_traj.answer_rank[:, -1] == 1).nonzero()[0])
    assert f"{float(clean_traj.answer_prob[-1, -1]):.3g} at the last layer" in text
    assert f"first top-1 at layer {first}" in text
    restored = lens_trace_cell(tiny_model, mlp_trace, 1, 3).restored
    page = restored.with_label("<restored>")._repr_html_()
    assert page.startswith("<table>") and "&lt;restored&gt;" in page and "<restored>" not in page
    assert "blocks.0.hook_mlp_out" in page and "at pos 3" in page
    assert len(repr(restored)) < 400


def test_to_dataframe_has_one_row_per_cell(clean_traj):
    frame = clean_traj.to_dataframe()
    assert len(frame) == clean_traj.n_layers * clean_traj.n_pos
    row = frame[(frame.layer == 2) & (frame.pos == 4)].iloc[0]
    assert row.token == clean_traj.tokens[4]
    assert row.entropy == pytest.approx(float(clean_traj.entropy[2, 4]))
    assert row.answer_rank == int(clean_traj.answer_rank[2, 4])
    assert row.top1 == clean_traj.vocab[int(clean_traj.top_ids[2, 4, 0])]
    assert row.hook_name == "blocks.2.hook_resid_post"


def test_statistic_aliases(clean_traj):
    assert clean_traj.statistic("kl") is clean_traj.kl_to_final
    assert clean_traj.statistic("rank") is clean_traj.answer_rank


def test_inconsistent_shapes_are_refused(clean_traj):
    import dataclasses

    with pytest.raises(ValueError, match=r"3 hook_names for 4 layers"):
        dataclasses.replace(clean_traj, hook_names=clean_traj.hook_names[:3])
    with pytest.raises(ValueError, match=r"subject_range \(3, 11\) outside 0..10"):
        dataclasses.replace(clean_traj, subject_range=(3, 11))
    with pytest.raises(ValueError, match=r"answer_id 5000 missing from vocab"):
        dataclasses.replace(clean_traj, answer_id=5000)
    # A shape mismatch between tensors; under --jaxtyping-packages the
    # annotation refuses it first, with a TypeError naming the same field.
    with pytest.raises((ValueError, TypeError), match=r"answer_prob"):
        dataclasses.replace(clean_traj, answer_prob=clean_traj.answer_prob[:3])
    with pytest.raises(ValueError, match="component must be one of"):
        dataclasses.replace(clean_traj, component="resid")
    with pytest.raises(ValueError, match="format"):
        LensTrajectory.from_dict({"format": "lenscope.TraceResult/1"})


# -------------------------------------------------------- a trace through the lens


def test_trace_cell_reproduces_the_trace(tracer, mlp_trace):
    """Same noise, same restoration: the lens's final layer is the trace's score."""
    for layer, pos in [(0, 2), (1, 3), (3, 9), (2, 0)]:
        cell = lens_trace_cell(tracer, mlp_trace, layer, pos)
        assert isinstance(cell, CellTrajectories)
        clean, corrupted, restored = cell
        assert restored.answer_id == mlp_trace.answer_id
        assert float(restored.answer_prob[-1, -1]) == pytest.approx(
            float(mlp_trace.scores[layer, pos]), abs=1e-6
        )
        assert torch.equal(restored.top_ids[-1, -1, :5], mlp_trace.top_ids[layer, pos])
    assert float(corrupted.answer_prob[-1, -1]) == pytest.approx(
        mlp_trace.corrupted_score, abs=1e-6
    )
    assert float(clean.answer_prob[-1, -1]) == pytest.approx(mlp_trace.clean_score, abs=1e-6)
    assert torch.equal(corrupted.top_ids[-1, -1, :5], mlp_trace.corrupted_top_ids)
    assert (clean.copies, corrupted.copies, restored.copies) == (1, 4, 4)
    # The last cell, layer 2, restores the window of 4 layers clipped to 0-3.
    assert restored.restored_hooks == tuple(f"blocks.{j}.hook_mlp_out" for j in range(4))
    assert restored.restored_pos == 0 and corrupted.seed == 3


def test_corrupted_statistics_are_those_of_the_mean_distribution(tiny_model, mlp_trace):
    corrupted = lens_trace_cell(tiny_model, mlp_trace, 0, 0, component="attn_out").corrupted
    start, end = mlp_trace.subject_range
    noise = draw_noise(4, end - start, tiny_model.cfg.d_model, mlp_trace.noise_std, 3)
    tokens = mlp_trace.token_ids.repeat(4, 1)
    hook = (EMBED_HOOK, _noise_hook(noise, (start, end)))
    hidden, final = _hidden(tiny_model, tokens, "attn_out", [hook])
    logp = _np_log_softmax(_np_head(tiny_model, hidden), copy_axis=1)
    final_logp = _np_log_softmax(_np_head(tiny_model, final), copy_axis=0)
    _assert_stats(corrupted, _np_stats(logp, final_logp, mlp_trace.answer_id, 10))


def test_restoring_a_resid_post_cell_splices_clean_into_corrupted(tiny_model, resid_trace):
    layer, pos = 2, 5
    clean, corrupted, restored = lens_trace_cell(tiny_model, resid_trace, layer, pos)
    for name in (*STATS, "top_ids", "top_probs"):
        got, noisy, good = (getattr(t, name) for t in (restored, corrupted, clean))
        # Nothing changes before the restored position (causal attention).
        torch.testing.assert_close(got[:, :pos], noisy[:, :pos], atol=1e-6, rtol=0)
        if name == "kl_to_final":
            # KL is to the run's own final output, which the restoration changes.
            assert not torch.allclose(got[:layer, pos:], noisy[:layer, pos:])
            continue
        # Nothing changes below the restored layer.
        torch.testing.assert_close(got[:layer], noisy[:layer], atol=1e-6, rtol=0)
        # The restored cell holds the clean hidden state, so the lens reads the clean guess.
        torch.testing.assert_close(got[layer, pos], good[layer, pos], atol=1e-5, rtol=0)


def test_restoring_the_final_residual_gives_the_clean_output(tiny_model, resid_trace):
    clean, _, restored = lens_trace_cell(tiny_model, resid_trace, 3, 9)
    for name in STATS:
        assert float(restored.statistic(name)[-1, -1]) == pytest.approx(
            float(clean.statistic(name)[-1, -1]), abs=1e-5
        ), name


def test_restoring_before_the_subject_changes_nothing(tiny_model, mlp_trace):
    """Position 0 (BOS) precedes the noised subject, so its clean and corrupted states agree."""
    _, corrupted, restored = lens_trace_cell(tiny_model, mlp_trace, 2, 0, component="mlp_out")
    for name in (*STATS, "top_probs"):
        torch.testing.assert_close(
            getattr(restored, name), getattr(corrupted, name), atol=1e-6, rtol=0, msg=name
        )


def test_trace_cell_errors(tiny_model, mlp_trace):
    import dataclasses

    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 4\).*got 4"):
        lens_trace_cell(tiny_model, mlp_trace, 4, 0)
    with pytest.raises(ValueError, match=r"pos must be an integer in \[0, 10\).*got -1"):
        lens_trace_cell(tiny_model, mlp_trace, 0, -1)
    # Under --jaxtyping-packages the annotation refuses it first, also with a TypeError.
    with pytest.raises(TypeError, match=r"(result must be a TraceResult, got dict)|TraceResult"):
        lens_trace_cell(tiny_model, {}, 0, 0)
    seedless = dataclasses.replace(mlp_trace, corruption={**mlp_trace.corruption, "seed": None})
    with pytest.raises(ValueError, match="noise cannot be regenerated; pass the same tensor"):
        lens_trace_cell(tiny_model, seedless, 0, 0)
    with pytest.raises(ValueError, match=r"noise_tensor must have shape .* = \(4, 3, 32\), got"):
        lens_trace_cell(tiny_model, seedless, 0, 0, noise_tensor=torch.zeros(4, 2, 32))
    deeper = make_tiny_model(tiny_model.tokenizer, n_layers=2)
    with pytest.raises(ValueError, match="it has 4 layers, the model .* has 2"):
        lens_trace_cell(deeper, mlp_trace, 0, 0)


def test_trace_cell_with_an_explicit_noise_tensor(tiny_model, mlp_trace):
    import dataclasses

    start, end = mlp_trace.subject_range
    noise = draw_noise(4, end - start, tiny_model.cfg.d_model, mlp_trace.noise_std, 3)
    seedless = dataclasses.replace(mlp_trace, corruption={**mlp_trace.corruption, "seed": None})
    by_tensor = lens_trace_cell(tiny_model, seedless, 1, 3, noise_tensor=noise).restored
    by_seed = lens_trace_cell(tiny_model, mlp_trace, 1, 3).restored
    assert torch.equal(by_tensor.answer_prob, by_seed.answer_prob)


# ------------------------------------------------------------------ input errors


def test_lens_trajectory_errors(tiny_model):
    with pytest.raises(ValueError, match="component must be one of .* got 'resid'; pass e.g."):
        lens_trajectory(tiny_model, TINY_PROMPT, component="resid")
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, d_vocab=\d+\], got 0"):
        lens_trajectory(tiny_model, TINY_PROMPT, top_k=0)
    with pytest.raises(ValueError, match="layer_chunk must be a positive integer .* got 0"):
        lens_trajectory(tiny_model, TINY_PROMPT, layer_chunk=0)
    with pytest.raises(TypeError, match=r"decoder(.|\n)*str"):
        lens_trajectory(tiny_model, TINY_PROMPT, decoder="tuned")

    class Narrow:
        def forward(self, hidden, layer):
            return torch.zeros(*hidden.shape[:2], 5)

    with pytest.raises(ValueError, match=r"must return logits of shape .* got \(1, 10, 5\)"):
        lens_trajectory(tiny_model, TINY_PROMPT, decoder=Narrow())
    with pytest.raises(ValueError, match="statistic must be one of"):
        lens_trajectory(tiny_model, TINY_PROMPT).statistic("perplexity")


# ------------------------------------------------------------------ plotting


def test_hover_tables_hold_the_right_tokens(clean_traj):
    # Laid out 1200 px wide: columns hold the cell text's six characters.
    fig = clean_traj.plot(statistic="entropy", width=1200)
    (heatmap,) = fig.data
    assert list(heatmap.y) == [0, 1, 2, 3]  # layer 0 first, drawn at the bottom
    custom = np.asarray(heatmap.customdata)
    k = clean_traj.top_k
    assert custom.shape == (4, 10, 9 + k)
    for layer in range(4):
        for pos in range(10):
            cell = custom[layer, pos]
            assert cell[0] == escape(visible(clean_traj.tokens[pos]))
            assert cell[2] == f"{layer} · blocks.{layer}.hook_resid_post"
            for row, (token, prob) in zip(
                cell[9:], clean_traj.top_predictions(layer, pos), strict=True
            ):
                assert escape(visible(token)) in row and f"{prob:.1%}" in row
            assert heatmap.text[layer][pos].startswith(
                escape(visible(clean_traj.vocab[int(clean_traj.top_ids[layer, pos, 0])]))[:5]
            )
    assert "%{customdata[9]}" in heatmap.hovertemplate
    assert "<b>%{customdata[3]}</b>" in heatmap.hovertemplate  # the plotted statistic
    assert fig.layout.hoverlabel.font.family.startswith("DejaVu Sans Mono")
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[1].endswith("*</b>") and ticks[0] == escape("<bos>")


@pytest.mark.parametrize("statistic", [*STATS, "kl"])
def test_plot_colours_by_the_statistic(clean_traj, statistic):
    fig = plot_lens(clean_traj, statistic=statistic, cell_text=False)
    z = np.array(fig.data[0].z, dtype=float)
    expected = clean_traj.statistic(statistic).double().numpy()
    if statistic == "answer_rank":
        expected = np.log10(expected)
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    assert fig.data[0].text is None
    assert fig.data[0].coloraxis == "coloraxis"


def test_side_by_side_shares_one_colour_scale(tiny_model, mlp_trace):
    cell = lens_trace_cell(tiny_model, mlp_trace, 1, 3)
    fig = plot_lens(cell, statistic="answer_prob")
    assert len(fig.data) == 3 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.0)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["clean", "corrupted"] and titles[2].startswith("restored mlp_out")
    # The restored cell (window layers 0-2 at position 3) is outlined.
    (box,) = [s for s in fig.layout.shapes if s.xref == "x3"]
    assert (box.x0, box.x1, box.y0, box.y1) == (2.5, 3.5, -0.5, 2.5)


def test_lens_figure_fits_its_container(tiny_model, mlp_trace):
    clean, corrupted, restored = lens_trace_cell(tiny_model, mlp_trace, 1, 3)
    fig = plot_lens(clean, corrupted, restored, statistic="answer_prob")
    assert fig.layout.autosize is True and fig.layout.width is None
    assert natural_width(fig) > natural_width(plot_lens(clean, statistic="answer_prob"))
    assert plot_lens(clean, width=700).layout.width == 700


def test_difference_mode_subtracts_the_first(tiny_model, mlp_trace):
    clean, corrupted, restored = lens_trace_cell(tiny_model, mlp_trace, 1, 3)
    fig = plot_lens(clean, corrupted, restored, statistic="kl", mode="difference")
    assert len(fig.data) == 2
    for trace, traj in zip(fig.data, (corrupted, restored), strict=True):
        np.testing.assert_allclose(
            np.array(trace.z, dtype=float),
            (traj.kl_to_final - clean.kl_to_final).double().numpy(),
            atol=1e-6,
        )
        assert "(vs " in np.asarray(trace.customdata)[0, 0, 3]
    assert fig.layout.coloraxis.cmid == 0
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax


def test_layer_stride_and_order(clean_traj):
    fig = plot_lens(clean_traj, layer_stride=2, layer_order="top_down")
    assert list(fig.data[0].y) == [0, 2, 3]
    assert fig.layout.yaxis.autorange == "reversed"


def test_plot_errors(clean_traj, tiny_model):
    with pytest.raises(ValueError, match="needs at least one LensTrajectory; got none"):
        plot_lens()
    # Under --jaxtyping-packages the annotation refuses it first, also with a TypeError.
    with pytest.raises(TypeError, match=r"(got str at index 1)|parameter 'trajectories'"):
        plot_lens(clean_traj, "corrupted")
    with pytest.raises(ValueError, match="mode='difference' needs at least two .* got 1"):
        plot_lens(clean_traj, mode="difference")
    with pytest.raises(ValueError, match="mode must be one of"):
        plot_lens(clean_traj, mode="overlay")
    with pytest.raises(ValueError, match=r"top_k must be an int from 0 to the 10 .* got 11"):
        plot_lens(clean_traj, top_k=11)
    with pytest.raises(ValueError, match="statistic must be one of"):
        plot_lens(clean_traj, statistic="loss")
    shallow = lens_trajectory(make_tiny_model(tiny_model.tokenizer, n_layers=2), TINY_PROMPT)
    with pytest.raises(ValueError, match=r"4 layers \(trajectory 0\) vs 2 \(trajectory 1\)"):
        plot_lens(clean_traj, shallow)


# ------------------------------------------------------- the real offline model


@pytest.fixture(scope="module", params=[False, True], ids=["default", "Bridge"])
def gemma_either(request):
    """The real offline model, as each TransformerLens class installed (shared session fixtures)."""
    if request.param and tl4():
        pytest.skip("on TransformerLens 4 the default class is the TransformerBridge")
    return request.getfixturevalue("gemma_bridge" if request.param else "gemma")


@pytest.mark.slow
def test_gemma_lens_ends_in_the_models_own_prediction(gemma_either):
    gemma = gemma_either
    prompt = "The Eiffel Tower is located in the city of"
    traj = lens_trajectory(gemma, prompt, subject="The Eiffel Tower", top_k=5)
    assert traj.entropy.shape == (18, len(traj.tokens)) and traj.answer == " Paris"
    with torch.inference_mode():
        logits = gemma(gemma.to_tokens(prompt))[0].float()
    # Float64 reference: torch's float32 CPU softmax is itself off by up to ~4e-5
    # relative (see lenscope.metrics), more than the tolerance below.
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(5)
    assert torch.equal(traj.top_ids[-1], top.indices)
    torch.testing.assert_close(traj.top_probs[-1], top.values.float(), atol=1e-5, rtol=0)
    assert float(traj.kl_to_final[-1].abs().max()) < 1e-4
    assert int(traj.answer_rank[-1, -1]) == 1
    for name in STATS:
        assert torch.isfinite(traj.statistic(name)).all(), name


def test_kind_is_the_name_and_component_the_older_one(tiny_model):
    by_kind = lens_trajectory(tiny_model, TINY_PROMPT, kind="mlp_out")
    by_component = lens_trajectory(tiny_model, TINY_PROMPT, component="mlp_out")
    assert by_kind.kind == by_kind.component == "mlp_out"
    assert torch.equal(by_kind.entropy, by_component.entropy)
    with pytest.raises(ValueError, match=r"kind and component name the same thing"):
        lens_trajectory(tiny_model, TINY_PROMPT, kind="mlp_out", component="attn_out")


@pytest.mark.slow
def test_gemma_statistics_are_exact_to_float64(gemma):
    """Entropy and KL over Gemma-3's 262,144 tokens: float32 sums were off by 5.7e-3 / 8.6e-3."""
    prompt = "Angela Merkel is the chancellor of"
    traj = lens_trajectory(gemma, prompt, top_k=5)
    n = gemma.cfg.n_layers
    with torch.inference_mode():
        _, cache = gemma.run_with_cache(gemma.to_tokens(prompt))
        logits = torch.stack(
            [decode_resid(gemma, cache[hook_name("resid_post", j)][0]) for j in range(n)]
        )
    entropy, kl = _float64_stats(logits.float(), logits[-1].float())
    _assert_exact(traj, entropy, kl)


# ------------------------------------------------- answers of several tokens


@pytest.mark.parametrize("component", ["resid_post", "mlp_out"])
def test_an_answer_of_several_tokens_through_the_lens(tiny_model, component, tmp_path):
    """The grids track the first token (as a one-token trajectory of it does); the whole
    answer's teacher-forced log-probability per layer is the plain float64 reference's:
    each layer decoded at the last prompt position and the answer's positions."""
    answer = " paris france italy"
    ids = tiny_model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    traj = lens_trajectory(tiny_model, TINY_PROMPT, component=component, answer=answer)
    first = lens_trajectory(tiny_model, TINY_PROMPT, component=component, answer=ids[0])
    assert traj.answer == answer and traj.answer_id == ids[0] and traj.answer_ids == tuple(ids)
    for name in STATS:  # inputs of other lengths: equal to float32 rounding (1.4e-6 seen)
        torch.testing.assert_close(
            traj.statistic(name), first.statistic(name), atol=1e-5, rtol=1e-5
        )
    assert first.answer_ids == () and first.answer_log_prob == ()

    prompt = tiny_model.to_tokens(TINY_PROMPT)
    n = prompt.shape[1]
    hidden, final = _hidden(tiny_model, torch.cat([prompt, torch.tensor([ids[:-1]])], 1), component)
    logp = _np_log_softmax(_np_head(tiny_model, hidden[:, 0, n - 1 :]))  # [layer, k, vocab]
    expected = logp[:, np.arange(3), ids].sum(-1)
    np.testing.assert_allclose(np.array(traj.answer_log_prob), expected, atol=1e-5, rtol=0)
    if component == "resid_post":  # the last layer is the model's own teacher-forced score
        own = _np_log_softmax(_np_head(tiny_model, final[0, n - 1 :]))[np.arange(3), ids].sum()
        assert traj.answer_log_prob[-1] == pytest.approx(own, abs=1e-5)
    back = LensTrajectory.load(traj.save(tmp_path / "t.json"))
    assert back.answer_ids == traj.answer_ids and back.answer_log_prob == traj.answer_log_prob


def test_a_tuned_decoder_scores_the_answer_positions_with_its_layer(tiny_model):
    """A per-layer translator decodes every answer position of a layer with that layer's."""

    class ScaledLens:
        name = "scaled lens"

        def __init__(self):
            self.lens = LogitLens(tiny_model)

        def forward(self, hidden, layer):
            return self.lens.forward(hidden * (layer + 1) + layer, layer)

    answer = " paris france"
    ids = tiny_model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    traj = lens_trajectory(tiny_model, TINY_PROMPT, answer=answer, decoder=ScaledLens())
    prompt = tiny_model.to_tokens(TINY_PROMPT)
    n = prompt.shape[1]
    hidden, _ = _hidden(tiny_model, torch.cat([prompt, torch.tensor([ids[:-1]])], 1), "resid_post")
    layers = np.arange(hidden.shape[0])[:, None, None]
    moved = hidden[:, 0, n - 1 :] * (layers + 1) + layers
    expected = _np_log_softmax(_np_head(tiny_model, moved))[:, np.arange(2), ids].sum(-1)
    np.testing.assert_allclose(np.array(traj.answer_log_prob), expected, atol=1e-5, rtol=0)
