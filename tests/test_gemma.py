"""Causal tracing on the real offline model (Gemma-3-270m): slow, still run by CI."""

import pytest
import torch

import lenscope

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module")
def eiffel(gemma):
    tracer = lenscope.CausalTracer(gemma, progress=False)
    return tracer.trace_kinds(PROMPT, SUBJECT, samples=10)


def test_eiffel_tower_trace(eiffel):
    for r in eiffel.values():
        assert r.answer == " Paris"
        assert r.clean_score == pytest.approx(0.759, abs=0.01)
        assert r.corrupted_score < 0.1 * r.clean_score
        assert r.subject_range == (1, 4)
        assert torch.isfinite(r.scores).all()
    peaks = {kind: r.peak() for kind, r in eiffel.items()}
    print(
        "\npeak cells:",
        {k: (layer, eiffel[k].tokens[pos], round(s, 4)) for k, (layer, pos, s) in peaks.items()},
    )
    # ROME's picture: MLPs matter on the subject, attention at the last token.
    assert 1 <= peaks["mlp_out"][1] <= 3
    assert peaks["attn_out"][1] == 9
    # restoring the last layer's residual at the last token is the clean run
    assert eiffel["resid_post"].scores[-1, -1].item() == pytest.approx(
        eiffel["resid_post"].clean_score, abs=1e-5
    )


def test_sigma_is_measured_at_the_hook(gemma, eiffel):
    """Gemma scales embeddings by sqrt(d_model): sigma must include that factor."""
    sigma_w_e = (
        gemma.W_E.std().item() / gemma.cfg.d_model**0.5
    )  # HookedTransformer folds the scale into W_E
    r = eiffel["mlp_out"]
    assert r.noise_std == pytest.approx(3 * lenscope.CausalTracer(gemma).sigma, rel=1e-9)
    assert r.noise_std > 10 * 3 * sigma_w_e


def test_prefix_and_full_strategies_agree_on_gemma(gemma):
    """Gemma has grouped-query attention, QK norms and sliding-window layers: the key/value reuse must hold."""
    kwargs = dict(
        kinds=("resid_pre", "mlp_out", "attn_out"),
        windows=3,
        samples=2,
        layers=[0, 4, 9, 17],
        seed=1,
    )
    prefix = lenscope.CausalTracer(gemma, strategy="prefix", progress=False).trace_kinds(
        PROMPT, SUBJECT, **kwargs
    )
    full = lenscope.CausalTracer(gemma, strategy="full", progress=False).trace_kinds(
        PROMPT, SUBJECT, **kwargs
    )
    for kind in prefix:
        torch.testing.assert_close(
            prefix[kind].scores, full[kind].scores, atol=2e-5, rtol=0, equal_nan=True
        )


def test_hooked_transformer_and_bridge_agree(gemma, gemma_bridge):
    """Same weights, two TransformerLens model classes: scores agree to 1e-3 (float32, different op order)."""
    kwargs = dict(
        kinds=("resid_post", "mlp_out", "attn_out"), samples=2, layers=[0, 5, 11, 17], seed=2
    )
    hooked = lenscope.CausalTracer(gemma, progress=False).trace_kinds(PROMPT, SUBJECT, **kwargs)
    bridge = lenscope.CausalTracer(gemma_bridge, progress=False).trace_kinds(
        PROMPT, SUBJECT, **kwargs
    )
    for kind in hooked:
        assert bridge[kind].answer == " Paris"
        assert bridge[kind].noise_std == pytest.approx(hooked[kind].noise_std, rel=1e-4)
        assert bridge[kind].corrupted_score == pytest.approx(hooked[kind].corrupted_score, abs=1e-3)
        torch.testing.assert_close(
            bridge[kind].scores, hooked[kind].scores, atol=1e-3, rtol=0, equal_nan=True
        )
