"""Counterfactual prompts (STR), noising and the new metrics, against independent references.

References: TransformerLens ``patching.py`` (one forward pass per cell, full
logits) for symmetric token replacement in both directions, and plain loops
with hand-written hooks for Gaussian-noise noising and the KL metric.
"""

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model

from lenscope import CausalTracer, CounterfactualPrompt, GaussianNoise
from lenscope.noise import draw_noise
from lenscope.validation import InvalidInput

COUNTERFACTUAL = "The Space Needle is located in the city of"
PARITY_KINDS = {
    "resid_pre": "get_act_patch_resid_pre",
    "resid_mid": "get_act_patch_resid_mid",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
}


def _tl_patching(model, clean, counterfactual, answer, foil, kind, direction, layers=None):
    """TransformerLens patching.py: normalised logit difference, one forward per cell.

    With ``layers``, only those layers (every position) are patched, through
    patching.py's own ``index_df``; the result is ``[len(layers), pos]``.
    """
    import pandas as pd
    from transformer_lens import patching

    clean_tokens, cf_tokens = model.to_tokens(clean), model.to_tokens(counterfactual)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens)
        cf_logits, cf_cache = model.run_with_cache(cf_tokens)

    def logit_diff(logits):
        return logits[0, -1, answer] - logits[0, -1, foil]

    clean_ld, cf_ld = logit_diff(clean_logits), logit_diff(cf_logits)

    def metric(logits):
        return (logit_diff(logits) - cf_ld) / (clean_ld - cf_ld)

    patch = getattr(patching, PARITY_KINDS[kind])
    options = {}
    if layers is not None:
        n_pos = clean_tokens.shape[1]
        rows = [(layer, pos) for layer in layers for pos in range(n_pos)]
        options["index_df"] = pd.DataFrame(rows, columns=["layer", "pos"])
        options["index_axis_names"] = None  # patching.py takes one or the other
    with torch.no_grad():
        if direction == "denoise":
            out = patch(model, cf_tokens, clean_cache, metric, **options)
        else:
            out = patch(model, clean_tokens, cf_cache, metric, **options)
    return out if layers is None else out.reshape(len(layers), -1)


def _ids(model, *words):
    return [model.to_single_token(w) for w in words]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_str_matches_transformer_lens_patching(tiny_model, strategy, direction):
    model = tiny_model
    answer, foil = _ids(model, " paris", " seattle")
    tracer = CausalTracer(model, strategy=strategy, progress=False)
    results = tracer.trace_kinds(
        TINY_PROMPT,
        corruption=CounterfactualPrompt(COUNTERFACTUAL),
        kinds=tuple(PARITY_KINDS),
        windows=1,
        answer=answer,
        foil=foil,
        direction=direction,
    )
    for kind, result in results.items():
        expected = _tl_patching(model, TINY_PROMPT, COUNTERFACTUAL, answer, foil, kind, direction)
        # Float32 rounding (which depends on batch shapes and thread count) divided by
        # the tiny model's small clean-minus-corrupted logit difference: up to 1.1e-5 seen
        # with one torch thread; a wrong restoration is off by 1e-2 or more.
        torch.testing.assert_close(result.scores, expected.float(), atol=3e-5, rtol=0)
        assert result.metric == "normalized_logit_diff"
        assert result.direction == direction
        assert (result.clean_score, result.corrupted_score) == (1.0, 0.0)
        assert result.foil == " seattle" and result.foil_id == foil


def test_patch_is_a_trace_with_a_counterfactual_prompt(tiny_model):
    tracer = CausalTracer(model := tiny_model, progress=False)
    answer = model.to_single_token(" paris")
    result = tracer.patch(TINY_PROMPT, COUNTERFACTUAL, kind="mlp_out", answer=answer)
    # Default foil: the counterfactual prompt's clean top-1 token.
    with torch.no_grad():
        cf_top = int(model(model.to_tokens(COUNTERFACTUAL))[0, -1].argmax())
    assert result.foil_id == cf_top
    assert result.window == 1 and result.samples == 1
    assert result.noise_std is None and result.seed is None  # no noise, no "noise std 0"
    # The subject of a counterfactual is the span of tokens that differ.
    assert result.subject_range == (2, 4)
    assert result.corruption == {"name": "counterfactual_prompt", "counterfactual": COUNTERFACTUAL}
    # Positions before the first differing token cannot change anything.
    assert torch.all(result.scores[:, :2] == result.corrupted_score)
    again = type(result).from_dict(result.to_dict())
    assert again.direction == result.direction and again.normalization == result.normalization


def _plain_noising(model, tokens, subject_range, noise, kind, cells, answer):
    """Noising by hand: patch each sample's corrupted activation into a clean run."""
    start, end = subject_range

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += noise.to(embed.dtype)
        return embed

    samples = noise.shape[0]
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(model.cfg.n_layers)]
    noisy = tokens[None].repeat(samples, 1)
    with torch.no_grad():
        store = {}

        def keep(name):
            def hook(act, hook):
                store[name] = act.clone()

            return hook

        model.run_with_hooks(
            noisy, fwd_hooks=[("hook_embed", add_noise)] + [(n, keep(n)) for n in names]
        )
        out = {}
        for layer, pos in cells:
            name = names[layer]

            def put(act, hook, pos=pos, name=name):
                act[:, pos] = store[name][:, pos]  # in place, as patching.py does
                return act

            logits = model.run_with_hooks(tokens[None].repeat(samples, 1), fwd_hooks=[(name, put)])
            out[layer, pos] = float(torch.softmax(logits[:, -1].double(), -1)[:, answer].mean())
    return out


@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_gaussian_noising_matches_a_plain_loop(tiny_model, strategy):
    model = tiny_model
    tokens = model.to_tokens(TINY_PROMPT)[0]
    tracer = CausalTracer(model, strategy=strategy, progress=False)
    for kind in ("resid_pre", "mlp_out", "attn_out"):
        result = tracer.trace(
            TINY_PROMPT,
            TINY_SUBJECT,
            kind=kind,
            window=1,
            samples=3,
            noise=0.7,
            seed=4,
            direction="noise",
        )
        noise = draw_noise(3, 3, model.cfg.d_model, 0.7, 4)
        cells = [(layer, pos) for layer in range(model.cfg.n_layers) for pos in range(len(tokens))]
        expected = _plain_noising(model, tokens, (1, 4), noise, kind, cells, result.answer_id)
        got = {cell: float(result.scores[cell]) for cell in cells}
        for cell in cells:
            assert got[cell] == pytest.approx(expected[cell], abs=1e-5), (kind, cell)
        # Position 0 never sees the noise: patching it changes nothing (the clean score,
        # up to the rounding of a batch of copies against the single clean row).
        torch.testing.assert_close(
            result.scores[:, 0], torch.full((4,), result.clean_score), atol=1e-6, rtol=0
        )


def test_several_metrics_from_one_sweep_equal_separate_traces(tiny_model):
    tracer = CausalTracer(tiny_model, progress=False)
    common = dict(kind="attn_out", samples=2, noise=0.5, seed=1, foil=" rome")
    both = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, metrics=("prob", "log_prob", "kl_div", "logit_diff"), **common
    )
    assert list(both) == ["prob", "log_prob", "kl_div", "logit_diff"]
    for name, result in both.items():
        alone = tracer.trace(TINY_PROMPT, TINY_SUBJECT, metric=name, **common)
        torch.testing.assert_close(result.scores, alone.scores, atol=1e-6, rtol=0)
        assert result.metric == name and result.corrupted_score == alone.corrupted_score


def test_kl_metric_matches_torch(tiny_model):
    model = tiny_model
    tokens = model.to_tokens(TINY_PROMPT)[0]
    tracer = CausalTracer(model, strategy="full", progress=False)
    result = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, kind="resid_post", samples=2, noise=0.6, seed=2, metric="kl_div"
    )
    noise = draw_noise(2, 3, model.cfg.d_model, 0.6, 2)
    with torch.no_grad():
        clean = torch.log_softmax(model(tokens[None])[0, -1].double(), -1)

        def add_noise(embed, hook):
            embed = embed.clone()
            embed[:, 1:4] += noise
            return embed

        noisy = model.run_with_hooks(
            tokens[None].repeat(2, 1), fwd_hooks=[("hook_embed", add_noise)]
        )
        patched = torch.log_softmax(noisy[:, -1].double(), -1)
    expected = (clean.exp() * (clean - patched)).sum(-1).mean()
    assert result.clean_score == 0.0
    assert result.corrupted_score == pytest.approx(float(expected), rel=1e-2, abs=1e-6)


def test_str_bad_input_names_the_rule(tiny_model):
    tracer = CausalTracer(tiny_model, progress=False)
    with pytest.raises(InvalidInput, match=r"as many tokens as the clean prompt .*Colosseum"):
        tracer.patch(TINY_PROMPT, "The Colosseum is located in the city of")
    with pytest.raises(InvalidInput, match="must differ from the clean prompt"):
        tracer.patch(TINY_PROMPT, TINY_PROMPT)
    with pytest.raises(InvalidInput, match="foil must differ from the answer"):
        tracer.patch(TINY_PROMPT, COUNTERFACTUAL, answer=" paris", foil=" paris")
    with pytest.raises(InvalidInput, match=r"direction must be one of \('denoise', 'noise'\)"):
        tracer.patch(TINY_PROMPT, COUNTERFACTUAL, direction="backwards")
    with pytest.raises(InvalidInput, match="needs the subject it corrupts"):
        tracer.trace(TINY_PROMPT)
    with pytest.raises(InvalidInput, match="has none; pass foil="):
        tracer.trace(TINY_PROMPT, TINY_SUBJECT, metric="logit_diff", samples=1)
    with pytest.raises(InvalidInput, match="metric must be one of"):
        tracer.trace(TINY_PROMPT, TINY_SUBJECT, metric="accuracy")


def test_normalised_metric_refuses_an_unmoved_logit_difference(tiny_model):
    tracer = CausalTracer(tiny_model, progress=False)
    with pytest.raises(InvalidInput, match="divides by the clean minus the corrupted logit"):
        # Noise of std 0 changes nothing.
        tracer.trace(
            TINY_PROMPT,
            TINY_SUBJECT,
            metric="normalized_logit_diff",
            foil=" rome",
            noise=0.0,
            samples=1,
        )


def test_default_gaussian_trace_is_unchanged_by_the_new_options(tiny_model):
    """Explicit defaults (denoise, prob, GaussianNoise) give exactly the plain call's scores."""
    tracer = CausalTracer(tiny_model, progress=False)
    plain = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, seed=3)
    explicit = tracer.trace(
        TINY_PROMPT,
        TINY_SUBJECT,
        kind="mlp_out",
        corruption=GaussianNoise(samples=2, seed=3),
        direction="denoise",
        metric="prob",
    )
    assert torch.equal(plain.scores, explicit.scores)


@pytest.mark.parametrize("bridge", [False, True])
def test_str_parity_on_both_model_classes_with_grouped_query_attention(tiny_tokenizer, bridge):
    from conftest import tl4

    if not bridge and tl4():
        pytest.skip("TransformerLens 4 has no HookedTransformer")
    model = make_tiny_model(tiny_tokenizer, gated=True, seed=3, bridge=bridge)
    answer, foil = _ids(model, " paris", " seattle")
    result = CausalTracer(model, progress=False).patch(
        TINY_PROMPT, COUNTERFACTUAL, kind="resid_pre", answer=answer, foil=foil
    )
    expected = _tl_patching(
        model, TINY_PROMPT, COUNTERFACTUAL, answer, foil, "resid_pre", "denoise"
    )
    torch.testing.assert_close(result.scores, expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "resid_post"])
def test_restoring_a_residual_kind_everywhere_gives_the_clean_output(tiny_model, kind):
    """Guards the in-place restore: on a TransformerBridge (TransformerLens 4.3) a tensor
    returned at hook_resid_mid reaches the second norm but not the residual stream."""
    from lenscope.sites import site

    model = tiny_model
    clean, other = model.to_tokens(TINY_PROMPT), model.to_tokens(COUNTERFACTUAL)
    name = f"blocks.{model.cfg.n_layers - 1}.hook_{kind}"
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        everywhere = torch.ones(1, clean.shape[1], dtype=torch.bool)
        hook = site(kind).restore_hook(cache[name], everywhere)
        patched = model.run_with_hooks(other, fwd_hooks=[(name, hook)])
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
