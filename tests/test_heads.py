"""Per-head sites: parity with TransformerLens ``patching.py`` and grouped-query key/value heads.

The per-head traces run on the one engine (both strategies) and are checked
against TransformerLens' own per-head patching functions (one forward pass
per cell on full logits) with a counterfactual-prompt corruption, and, on a
grouped-query model, against plain hooks that restore a key/value head.
"""

import math
import warnings

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model
from test_settings import SwapTokens

import lenscope
from lenscope import HeadTraceResult
from lenscope.sites import HeadSite, site
from lenscope.validation import AnswerWarning, InvalidInput

STRATEGIES = ["prefix", "full"]


def _trace(model, strategy, **options):
    tracer = lenscope.CausalTracer(model, progress=False, strategy=strategy)
    with warnings.catch_warnings():
        # A random tiny model need not lower the answer's score when corrupted.
        warnings.simplefilter("ignore", AnswerWarning)
        return tracer.trace(TINY_PROMPT, TINY_SUBJECT, **options)


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """The tiny model with attention weights scaled 4x: random attention is near-uniform,
    so restoring a query, key or pattern would barely move anything."""
    model = make_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "attn" in name and param.ndim >= 2:
                param *= 4
    return model


def _swap(model):
    replacement = model.to_tokens("big ben london", prepend_bos=False)[0].tolist()
    return SwapTokens(tuple(replacement))


# ------------------------------------------------------------------ TransformerLens patching.py

# (patching.py function, kind, by, how its axes map onto lenscope's)
PATCHING = [
    ("get_act_patch_attn_head_out_all_pos", "z", "head", None),
    ("get_act_patch_attn_head_out_by_pos", "z", "head_pos", "layer pos head -> layer head pos"),
    ("get_act_patch_attn_head_q_all_pos", "q", "head", None),
    ("get_act_patch_attn_head_q_by_pos", "q", "head_pos", "layer pos head -> layer head pos"),
    ("get_act_patch_attn_head_k_all_pos", "k", "head", None),
    ("get_act_patch_attn_head_v_by_pos", "v", "head_pos", "layer pos head -> layer head pos"),
    ("get_act_patch_attn_head_pattern_all_pos", "pattern", "head", None),
    ("get_act_patch_attn_head_pattern_by_pos", "pattern", "head_pos", None),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("function", "kind", "by", "axes"), PATCHING)
def test_per_head_traces_equal_transformer_lens_patching(
    sharp_model, strategy, function, kind, by, axes
):
    _check_patching_parity(sharp_model, strategy, function, kind, by, axes)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("function", "kind", "by", "axes"), PATCHING[4:6])
def test_grouped_query_traces_equal_transformer_lens_patching(
    tiny_gated_model, strategy, function, kind, by, axes
):
    """patching.py counts n_key_value_heads for k and v (the fix of its issue #980)."""
    _check_patching_parity(tiny_gated_model, strategy, function, kind, by, axes)


def _check_patching_parity(model, strategy, function, kind, by, axes):
    import einops
    from transformer_lens import patching

    corruption = _swap(model)
    # log_prob: a random tiny model's effects on probabilities are near the tolerance.
    result = _trace(model, strategy, kind=kind, by=by, corruption=corruption, metric="log_prob")
    clean_tokens = model.to_tokens(TINY_PROMPT)
    corrupted = corruption.bind(model, clean_tokens[0], result.subject_range).tokens
    _, clean_cache = model.run_with_cache(clean_tokens)

    def log_prob(logits):
        return torch.log_softmax(logits[0, -1].double(), -1)[result.answer_id]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens' tqdm and deprecation notes
        expected = (
            getattr(patching, function)(model, corrupted, clean_cache, log_prob).float().cpu()
        )
    if axes:
        expected = einops.rearrange(expected, axes)
    assert result.scores.shape == expected.shape
    # Log-probabilities up to ~5 in size: float32 rounding of differently batched forward
    # passes reaches 3.4e-6 of the value (1.8e-5) on TransformerLens 3.9 with transformers
    # 5.24; a wrong restoration is off by far more (the check below asks 1e-3 of movement).
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=1e-5)
    # Not vacuous: some head moves the answer's log-probability.
    assert (result.scores - result.corrupted_score).abs().max() > 1e-3


# ------------------------------------------------------------------ grouped-query key/value heads


def _plain_head_trace(model, kind, by, hook, noise_draws, span, answer):
    """One run_with_hooks per cell restoring key/value head ``h`` at ``hook`` (all positions or one).

    ``hook`` is ``hook_k``/``hook_v``, or ``hook_rot_k`` (keys after the rotary
    embedding): restoring those of a key/value head is the same intervention.
    """
    tokens = model.to_tokens(TINY_PROMPT)
    _, cache = model.run_with_cache(tokens)
    cfg = model.cfg
    n_layers, n_pos, n_kv = cfg.n_layers, tokens.shape[1], cfg.n_key_value_heads
    start, end = span
    noisy = tokens.repeat(len(noise_draws), 1)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += noise_draws.to(embed.dtype)
        return embed

    shape = (n_layers, n_kv) if by == "head" else (n_layers, n_kv, n_pos)
    scores = torch.zeros(shape)
    for cell in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
        layer, head, *pos = cell
        name = f"blocks.{layer}.attn.{hook}"
        where = slice(None) if not pos else pos[0]

        def restore(act, hook, name=name, where=where, head=head):
            act = act.clone()
            assert act.shape[2] == n_kv  # the key/value heads, not the query heads
            act[:, where, head] = cache[name][0, where, head]
            return act

        logits = model.run_with_hooks(noisy, fwd_hooks=[("hook_embed", add_noise), (name, restore)])
        scores[tuple(cell)] = torch.log_softmax(logits[:, -1].double(), -1)[:, answer].mean()
    return scores


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("kind", "hook"), [("k", "hook_k"), ("k", "hook_rot_k"), ("v", "hook_v")])
@pytest.mark.parametrize("by", ["head", "head_pos"])
def test_grouped_query_key_value_heads_equal_plain_hooks(
    tiny_gated_model, strategy, kind, hook, by
):
    from lenscope.noise import draw_noise

    model, cfg = tiny_gated_model, tiny_gated_model.cfg
    assert cfg.n_key_value_heads < cfg.n_heads
    result = _trace(
        model, strategy, kind=kind, by=by, samples=2, noise=0.5, seed=3, metric="log_prob"
    )
    assert result.n_heads == cfg.n_key_value_heads
    assert result.query_heads_per_head == cfg.n_heads // cfg.n_key_value_heads
    start, end = result.subject_range
    draws = draw_noise(2, end - start, cfg.d_model, 0.5, 3)
    with torch.no_grad():
        expected = _plain_head_trace(
            model, kind, by, hook, draws, result.subject_range, result.answer_id
        )
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    assert (result.scores - result.corrupted_score).abs().max() > 1e-3


# ------------------------------------------------------------------ the site and the result


def test_head_sites_know_the_heads_of_each_activation(tiny_gated_model):
    cfg = tiny_gated_model.cfg
    z = site("z").for_model(tiny_gated_model)
    k = site("k", "head_pos").for_model(tiny_gated_model)
    assert isinstance(z, HeadSite) and (z.n_heads, z.group) == (cfg.n_heads, 1)
    assert (k.n_heads, k.group) == (2, 2) and k.index_axes == ("layer", "head", "pos")
    assert k.hook_name(3) == "blocks.3.attn.hook_k" and k.feeds_attention
    assert not z.feeds_attention and z.index_axes == ("layer", "head")
    mask = k.cell_mask(torch.tensor([[1, 4], [0, 0]]), 6)
    assert mask.shape == (2, 6, 2) and mask.sum() == 2 and mask[0, 4, 1] and mask[1, 0, 0]
    assert z.for_model(tiny_gated_model).cell_mask(torch.tensor([[3]]), 5)[0, :, 3].all()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kinds": ("z",), "by": "pos"}, r"by must be one of \('head', 'head_pos'\) for the per-h"),
        ({"kinds": ("mlp_out",), "by": "head"}, r"by='head' applies to the per-head kinds"),
        ({"kinds": ("heads",)}, r"kind must be one of .* or a per-head kind .*got 'heads'"),
        ({"kinds": ("z",), "positions": "subject"}, r"positions apply to by='head_pos'"),
    ],
)
def test_bad_head_options_name_the_rule(options, match):
    with pytest.raises(InvalidInput, match=match):
        lenscope.TraceSettings(**options)


def test_residual_and_head_kinds_trace_together(tiny_model):
    results = _trace(tiny_model, "prefix", kind="z", by="head_pos", positions="from_subject")
    assert torch.isnan(results.scores[:, :, 0]).all()  # BOS is before the subject
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnswerWarning)
        both = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, kinds=("mlp_out", "z"), seed=1)
    assert type(both["mlp_out"]) is lenscope.TraceResult
    assert isinstance(both["z"], HeadTraceResult) and both["z"].scores.shape == (4, 4)
    assert both["z"].hook_names[0] == "blocks.0.attn.hook_z"


def test_head_results_round_trip_and_tabulate(tiny_model, tmp_path):
    result = _trace(tiny_model, "prefix", kind="pattern", by="head_pos", samples=2, top_k=3)
    back = HeadTraceResult.load(result.save(tmp_path / "heads.json"))
    for field in ("scores", "top_ids", "top_probs"):
        torch.testing.assert_close(
            getattr(back, field), getattr(result, field), rtol=0, atol=0, equal_nan=True
        )
    assert (back.by, back.kind, back.to_dict()) == ("head_pos", "pattern", result.to_dict())
    assert back.axes == ("layer", "head", "pos") and HeadTraceResult is lenscope.TraceResult
    frame = result.to_dataframe()
    assert len(frame) == 4 * 4 * result.n_pos
    assert {"layer", "head", "pos", "token", "score", "normalized", "top1"} <= set(frame.columns)
    layer, head, pos, score = result.peak()
    assert score == pytest.approx(float(frame.score.max()))
    assert (
        result.top_predictions(layer, head, pos)[0][0]
        == result.vocab[int(result.top_ids[layer, head, pos, 0])]
    )
    assert result.top_heads(3)[0] == result.peak()
    assert repr(result).startswith("TraceResult(")
    assert "axes=('layer', 'head', 'pos') (4×4×10)" in repr(result)
    with pytest.raises(InvalidInput, match=r"needs a coordinate on every axis .* for \['pos'\]"):
        result.top_predictions(0, 0)
    with pytest.raises(InvalidInput, match=r"head must be an integer in \[0, 4\)"):
        result.top_predictions(0, 7, 1)
    by_head = _trace(tiny_model, "prefix", kind="z")
    assert not math.isnan(by_head.peak()[-1]) and len(by_head.to_dataframe()) == 16


def test_head_trace_plots_layer_by_head(tiny_gated_model):
    result = _trace(tiny_gated_model, "prefix", kind="k", by="head_pos", samples=2)
    fig = result.plot()
    # One heatmap per traced position (all of them), the last one shown first.
    assert len(fig.data) == result.n_pos and fig.data[-1].visible and not fig.data[0].visible
    assert fig.layout.sliders[0].active == result.n_pos - 1
    assert fig.layout.xaxis.title.text == "key/value head"
    assert "query heads 2–3" in fig.data[-1].customdata[0][1][1]
    assert len(result.plot(pos=3).data) == result.n_pos
    last = _trace(tiny_gated_model, "prefix", kind="z", by="head_pos", positions=[9])
    fig = last.plot()
    assert len(fig.data) == 1 and not fig.layout.sliders and "position 9" in fig.layout.title.text
    with pytest.raises(InvalidInput, match=r"pos picks the position of a trace with a pos axis"):
        _trace(tiny_gated_model, "prefix", kind="z").plot(pos=1)
    with pytest.raises(InvalidInput, match=r"top_k must be <= the 5 predictions"):
        result.plot(top_k=9)


@pytest.mark.parametrize("kind", ["z", "k"])
def test_windows_over_layers_and_strategies_agree(tiny_gated_model, kind):
    options = {"kind": kind, "by": "head", "window": 3, "samples": 2, "metric": "log_prob"}
    prefix = _trace(tiny_gated_model, "prefix", **options)
    full = _trace(tiny_gated_model, "full", **options)
    torch.testing.assert_close(prefix.scores, full.scores, atol=1e-5, rtol=0)
    assert prefix.window == 3 and "query_heads_per_head=2" in repr(prefix) or kind == "z"


def test_dataset_traces_refuse_per_head_kinds(tiny_model):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    facts = [{"prompt": TINY_PROMPT, "subject": TINY_SUBJECT}]
    with pytest.raises(
        InvalidInput, match=r"kind 'z' gives \('layer', 'head'\) grids; trace it one"
    ):
        lenscope.trace_dataset(tracer, facts, kinds=("z",))


def test_the_documented_last_token_head_trace_runs(tiny_model):
    """docs/heads.md and the README's heads section: ``by="head_pos", positions=[-1]``.

    The last token counted back (``-1``), named (``"last"``) and given as its
    index (9 of 10 tokens) are one trace: the same cells and the same scores,
    the resolved position the only one traced.
    """
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    prompt = TINY_PROMPT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnswerWarning)
        # docs/heads.md, as written there (samples=2 to keep it short).
        last = tracer.trace(
            prompt, subject="The Eiffel Tower", kind="z", by="head_pos", positions=[-1], samples=2
        )
        named = tracer.trace(
            prompt, subject="The Eiffel Tower", kind="z", by="head_pos", positions="last", samples=2
        )
        index = tracer.trace(
            prompt, subject="The Eiffel Tower", kind="z", by="head_pos", positions=[9], samples=2
        )
    n_pos = len(index.tokens)
    assert n_pos == 10
    traced = [p for p in range(n_pos) if not torch.isnan(index.scores[..., p]).all()]
    assert traced == [n_pos - 1]
    for result in (last, named):
        torch.testing.assert_close(result.scores, index.scores, equal_nan=True, atol=0, rtol=0)
    fig = last.plot()
    assert len(fig.data) == 1 and "position 9" in fig.layout.title.text
