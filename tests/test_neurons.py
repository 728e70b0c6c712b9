"""Per-neuron sites (``mlp_post``: ``blocks.L.mlp.hook_post``), exact and by attribution.

The engine's neuron sweep (both strategies, both directions, windows 1 and 2,
``by="neuron"`` and ``by="neuron_pos"``) is checked against a plain loop of
one TransformerLens forward pass per cell whose hook sets one neuron to its
source value; neuron attribution patching against a plain
``torch.autograd.grad`` of the metric with respect to ``hook_post``. Both
run on the installed TransformerLens' default model class (a
``TransformerBridge`` on 4.x, a ``HookedTransformer`` on 3.9: run this file
in both virtual environments).
"""

import warnings

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model

from lenscope import engine, metrics
from lenscope.noise import draw_noise
from lenscope.settings import TraceSettings, resolve_prompt
from lenscope.sites import NeuronSite, site
from lenscope.validation import InvalidInput

STRATEGIES = ("prefix", "full")
SAMPLES, NOISE, SEED = 2, 0.5, 3
# Positions a by="neuron" cell restores (the subject's last token and the
# prompt's last), and the positions a by="neuron_pos" sweep traces.
POSITIONS = [3, -1]
POSITIONS_RESOLVED = [3, 9]  # in the 10-token tiny prompt
# Every fifth neuron is checked against the plain loop (the engine sweeps them all).
STRIDE = 5


@pytest.fixture(scope="module")
def peaked_models(tiny_tokenizer):
    """The tiny plain and gated models with weights of std 0.2: at the default 0.02 a
    random model's neurons move the answer's probability by about 1e-6, below the
    tolerance, so a wrong restoration could pass."""
    return {
        "plain": make_tiny_model(tiny_tokenizer, init_range=0.2),
        "gated": make_tiny_model(tiny_tokenizer, gated=True, seed=3, init_range=0.2),
    }


def _settings(**options):
    defaults = {"samples": SAMPLES, "noise": NOISE, "seed": SEED, "metric": "prob"}
    return TraceSettings.from_options(kinds=("mlp_post",), **{**defaults, **options})


def engine_trace(
    model,
    strategy,
    *,
    by,
    direction="denoise",
    window=1,
    positions=POSITIONS,
    prompt=TINY_PROMPT,
    subject=TINY_SUBJECT,
    neurons=None,
    **options,
):
    """The engine's neuron sweep as CausalTracer._trace runs it: ``[layer, neuron(, pos)]``.

    ``neurons`` restricts the cells to those neurons (default: all).
    """
    settings = _settings(by=by, direction=direction, windows=window, positions=positions, **options)
    resolved = resolve_prompt(model, prompt, subject, settings)
    tokens, span = resolved.tokens, resolved.subject_range
    settings = settings.for_model(model)
    n_layer = model.cfg.n_layers
    pos_list = settings.position_list(tokens.shape[0], span)
    where = settings.sites[0].for_model(model).at_positions(pos_list)
    cells = where.cells(model, list(settings.layers), pos_list)
    if neurons is not None:
        cells = cells[torch.isin(cells[:, 1], torch.tensor(neurons))]
    noising = direction == "noise"
    with torch.inference_mode():
        corrupted = settings.corruption.bind(model, tokens, span)
        engine.check_memory(model, corrupted, [where], strategy)
        names = where.hook_names(n_layer)
        clean = engine.clean_run(model, tokens, names)
        answer = int(clean.logits.argmax()) if resolved.answer_id is None else resolved.answer_id
        state = engine.corrupted_run(
            model,
            corrupted,
            keep_prefix_state=strategy == "prefix" and not noising,
            capture=names if noising else (),
        )
        if noising:
            base = corrupted.clean_copies(tokens)
            base_state = engine.corrupted_run(model, base, keep_prefix_state=strategy == "prefix")
            source = state.activations
        else:
            base, base_state = corrupted, state
            source = {name: act[None] for name, act in clean.activations.items()}
        out = engine.sweep(
            model,
            site=where,
            window=settings.windows["mlp_post"],
            cells=cells,
            source=source,
            base=base,
            base_state=base_state,
            answer_id=answer,
            metrics=[metrics.prob],
            top_k=1,
            strategy=strategy,
            batch_size=None,
            progress=False,
        )
    return out.scores[0], answer, span, pos_list


def plain_neuron_trace(
    model,
    *,
    by,
    direction,
    window,
    answer,
    span,
    pos_list,
    neurons,
    prompt=TINY_PROMPT,
    layers=None,
    std=NOISE,
    samples=SAMPLES,
):
    """One forward pass per cell: a plain hook on ``blocks.L.mlp.hook_post`` sets one neuron.

    Denoising puts the clean value into the noised copies; noising puts each
    noised copy's value into the clean run. Window ``w`` restores layers
    ``[l - w // 2, l - w // 2 + w)`` clipped to the model (ROME's).
    """
    tokens = model.to_tokens(prompt)
    n_layers = model.cfg.n_layers
    start, end = span
    draws = draw_noise(samples, end - start, model.cfg.d_model, std, SEED)
    batch = tokens.repeat(samples, 1)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += draws.to(embed.dtype)
        return embed

    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    noisy_acts = {}
    if direction == "noise":

        def keep(act, hook):
            noisy_acts[hook.name] = act.detach().clone()

        model.run_with_hooks(
            batch, fwd_hooks=[("hook_embed", add_noise), *((n, keep) for n in names)]
        )
    base_hooks = [] if direction == "noise" else [("hook_embed", add_noise)]
    groups = [pos_list] if by == "neuron" else [[p] for p in pos_list]
    out = {}
    for layer in range(n_layers) if layers is None else layers:
        lo, hi = max(0, layer - window // 2), min(n_layers, layer - window // 2 + window)
        for neuron in neurons:
            for where in groups:

                def restore(act, hook, neuron=neuron, where=where):
                    act = act.clone()
                    if direction == "noise":
                        value = noisy_acts[hook.name][:, where, neuron]
                    else:
                        value = clean_cache[hook.name][0, where, neuron]
                    act[:, where, neuron] = value
                    return act

                hooks = base_hooks + [(names[x], restore) for x in range(lo, hi)]
                logits = model.run_with_hooks(batch, fwd_hooks=hooks)
                prob = torch.softmax(logits[:, -1].double(), -1)[:, answer].mean()
                key = (layer, neuron) if by == "neuron" else (layer, neuron, where[0])
                out[key] = float(prob)
    return out


@pytest.mark.parametrize("by", ["neuron", "neuron_pos"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("which", ["plain", "gated"])
def test_neuron_traces_equal_a_plain_hook_per_cell(
    peaked_models, one_thread, which, window, direction, by
):
    model = peaked_models[which]
    grids = {}
    for strategy in STRATEGIES:
        grids[strategy], answer, span, pos_list = engine_trace(
            model, strategy, by=by, direction=direction, window=window
        )
    d_mlp = model.cfg.d_mlp
    shape = (model.cfg.n_layers, d_mlp) + (() if by == "neuron" else (10,))
    assert grids["prefix"].shape == shape
    neurons = list(range(0, d_mlp, STRIDE))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens' deprecation notes
        expected = plain_neuron_trace(
            model,
            by=by,
            direction=direction,
            window=window,
            answer=answer,
            span=span,
            pos_list=pos_list,
            neurons=neurons,
        )
    keys = list(expected)
    want = torch.tensor([expected[k] for k in keys], dtype=torch.float64)
    for strategy, grid in grids.items():
        got = torch.stack([grid[k] for k in keys]).double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=strategy)
    # Not vacuous: some neuron moves the answer's probability.
    assert (want - want.median()).abs().max() > 1e-3
    if by == "neuron_pos":  # positions not traced stay NaN
        untraced = [p for p in range(10) if p not in pos_list]
        assert grids["full"][:, :, untraced].isnan().all()


# ------------------------------------------------------------------ the site


def test_the_neuron_site_knows_its_hook_shape_and_positions(tiny_gated_model):
    model = tiny_gated_model
    where = site("mlp_post").for_model(model)
    assert isinstance(where, NeuronSite) and where.by == "neuron"
    assert where.hook_name(2) == "blocks.2.mlp.hook_post"
    assert where.index_axes == ("layer", "neuron")
    assert where.width(model, 10) == model.cfg.d_mlp
    assert where.unit_shape(model, 10) == (model.cfg.d_mlp,)
    placed = where.at_positions([7, 3])
    assert placed.positions == (3, 7)
    units = torch.tensor([[5], [1]])
    mask = placed.cell_mask(units, 10)
    assert mask.shape == (2, 10, model.cfg.d_mlp)
    assert mask.sum().item() == 4 and mask[0, 3, 5] and mask[0, 7, 5] and mask[1, 3, 1]
    assert placed.first_position(units).tolist() == [3, 3]
    assert placed.touched_positions(units, 10).equal(mask.any(-1))
    by_pos = site("mlp_post", by="neuron_pos").for_model(model)
    assert by_pos.at_positions([3]) is by_pos
    assert by_pos.index_axes == ("layer", "neuron", "pos")
    units = torch.tensor([[5, 2], [1, 8]])
    assert by_pos.first_position(units).tolist() == [2, 8]
    assert by_pos.cell_mask(units, 10).nonzero().tolist() == [[0, 2, 5], [1, 8, 1]]


def test_the_hook_is_the_post_activation_after_the_gate(tiny_gated_model, tiny_model):
    """``hook_post`` is what W_out reads: act(gate) * up (gated) or act(pre) (plain)."""
    for model in (tiny_model, tiny_gated_model):
        tokens = model.to_tokens(TINY_PROMPT)
        block = model.blocks[1].mlp
        outputs = []
        handle = block.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens)
        finally:
            handle.remove()
        post = cache["blocks.1.mlp.hook_post"][0]
        assert post.shape == (tokens.shape[1], model.cfg.d_mlp)
        bias = 0.0 if block.b_out is None else block.b_out
        out = post @ block.W_out + bias
        torch.testing.assert_close(out, outputs[0][0], atol=1e-5, rtol=1e-5)


def test_settings_accept_the_neuron_kind_and_refuse_bad_options():
    settings = TraceSettings.from_options(
        kinds=("mlp_post", "resid_post"), by="neuron_pos", noise=0.5
    )
    assert [s.index_axes for s in settings.sites] == [("layer", "neuron", "pos"), ("layer", "pos")]
    assert TraceSettings.from_dict(settings.to_dict()).sites == settings.sites
    with pytest.raises(InvalidInput, match=r"by must be one of \('neuron', 'neuron_pos'\).*'head'"):
        TraceSettings(kinds=("mlp_post",), by="head")
    with pytest.raises(InvalidInput, match=r"by='neuron' applies to the per-head kinds"):
        TraceSettings(kinds=("mlp_out",), by="neuron")


def test_memory_plans_count_the_neurons_width(tiny_model):
    where = site("mlp_post").for_model(tiny_model)
    cfg = tiny_model.cfg
    residual = engine.memory_estimate(tiny_model, 10, [site("mlp_out")], "full")
    neurons = engine.memory_estimate(tiny_model, 10, [where], "full")
    assert residual.fixed == engine.memory_estimate(tiny_model, 10, cfg.n_layers, "full").fixed
    assert neurons.fixed == 4 * 10 * cfg.n_layers * cfg.d_mlp
    wider = engine.row_bytes(tiny_model, 10, width=cfg.d_mlp) - engine.row_bytes(tiny_model, 10)
    assert wider == 4 * 10 * (cfg.d_mlp - cfg.d_model)


# ------------------------------------------------------------------ attribution


def plain_neuron_atp(model, *, by, answer, span, pos_list):
    """AtP from a plain hooked forward: ``torch.autograd.grad`` of the summed probability
    with respect to a zero added at every ``hook_post``, times ``clean - corrupted``."""
    tokens = model.to_tokens(TINY_PROMPT)
    n_layers = model.cfg.n_layers
    start, end = span
    draws = draw_noise(SAMPLES, end - start, model.cfg.d_model, NOISE, SEED)
    batch = tokens.repeat(SAMPLES, 1)
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    zeros, seen = {}, {}

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += draws.to(embed.dtype)
        return embed

    def tap(act, hook):
        seen[hook.name] = act.detach().clone()
        zeros[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + zeros[hook.name]

    with torch.enable_grad():
        logits = model.run_with_hooks(
            batch, fwd_hooks=[("hook_embed", add_noise), *((n, tap) for n in names)]
        )
        total = torch.softmax(logits[:, -1].float(), -1)[:, answer].sum()
        grads = torch.autograd.grad(total, [zeros[n] for n in names])
    rows = []
    for name, grad in zip(names, grads, strict=True):
        product = grad * (clean_cache[name] - seen[name])  # [sample, pos, neuron]
        if by == "neuron":
            rows.append(product[:, pos_list].sum(dim=1).mean(dim=0))
        else:
            rows.append(product.mean(dim=0).T)  # [neuron, pos]
    return torch.stack(rows)


@pytest.mark.parametrize("by", ["neuron", "neuron_pos"])
@pytest.mark.parametrize("which", ["plain", "gated"])
def test_neuron_attribution_equals_plain_autograd(peaked_models, one_thread, which, by):
    import lenscope

    model = peaked_models[which]
    tracer = lenscope.CausalTracer(model, progress=False)
    (grid,) = tracer.attribute(
        TINY_PROMPT, TINY_SUBJECT, _settings(by=by, positions=POSITIONS)
    ).values()
    assert grid.axes == (("layer", "neuron") if by == "neuron" else ("layer", "neuron", "pos"))
    with torch.no_grad():
        answer = int(model(model.to_tokens(TINY_PROMPT))[0, -1].argmax())
    assert grid.answer_id == answer
    span = resolve_prompt(model, TINY_PROMPT, TINY_SUBJECT, _settings()).subject_range
    expected = plain_neuron_atp(model, by=by, answer=answer, span=span, pos_list=POSITIONS_RESOLVED)
    got = grid.scores - grid.corrupted_score
    if by == "neuron_pos":
        untraced = [p for p in range(expected.shape[-1]) if p not in POSITIONS_RESOLVED]
        assert got[..., untraced].isnan().all()
        got, expected = got[..., POSITIONS_RESOLVED], expected[..., POSITIONS_RESOLVED]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    assert expected.abs().max() > 1e-3  # not vacuous


def test_neuron_traces_and_estimates_are_results_with_named_axes(peaked_models, tmp_path):
    import lenscope

    tracer = lenscope.CausalTracer(peaked_models["plain"], progress=False)
    exact = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_post", positions=[3], samples=2)
    estimate = tracer.attribute(
        TINY_PROMPT, TINY_SUBJECT, kinds=("mlp_post",), positions=[3], samples=2
    )["mlp_post"]
    d_mlp = peaked_models["plain"].cfg.d_mlp
    for result in (exact, estimate):
        assert result.axes == ("layer", "neuron") and result.scores.shape == (4, d_mlp)
    layer, neuron, value = exact.top_units(1)[0]
    assert exact.scores[layer, neuron] == value
    loaded = lenscope.TraceResult.load(exact.save(tmp_path / "n.json"))
    torch.testing.assert_close(loaded.scores, exact.scores, atol=0, rtol=0)
    assert loaded.axes == exact.axes and exact.plot() is not None


def test_a_trace_of_chosen_neurons_equals_the_full_trace_there(peaked_models):
    """site('mlp_post').only_neurons(...) traces those neurons of every traced layer: the same
    values as the trace of every neuron, NaN at the others; neurons outside d_mlp are refused
    with the rule, the value and the fix."""
    import lenscope
    from lenscope.sites import site

    tracer = lenscope.CausalTracer(peaked_models["gated"], progress=False)
    options = dict(positions=[3], samples=2, layers=[1, 3])
    full = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_post", **options)
    chosen = [40, 7, 61]
    some = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, kind=site("mlp_post").only_neurons(chosen), **options
    )
    traced = torch.isfinite(some.scores)
    assert traced.nonzero().tolist() == [[x, n] for x in (1, 3) for n in sorted(chosen)]
    torch.testing.assert_close(some.scores[traced], full.scores[traced], atol=1e-7, rtol=0)
    d_mlp = peaked_models["gated"].cfg.d_mlp
    with pytest.raises(InvalidInput, match=rf"neurons must be in \[0, d_mlp\) = \[0, {d_mlp}\)"):
        tracer.trace(
            TINY_PROMPT, TINY_SUBJECT, kind=site("mlp_post").only_neurons([d_mlp]), **options
        )


# ------------------------------------------------------------------ Gemma-3-270m


@pytest.mark.slow
@pytest.mark.parametrize("by", ["neuron", "neuron_pos"])
def test_gemma_neurons_equal_a_plain_hook_per_cell(gemma, by):
    """A few layers and neurons of the real model, ROME's noise (3 sigma), 10 copies."""
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    layers, neurons = [0, 8, 17], [0, 311, 1500]
    positions = [3, -1]
    got, answer, span, pos_list = engine_trace(
        gemma,
        "prefix",
        by=by,
        prompt=prompt,
        subject=subject,
        positions=positions,
        layers=layers,
        neurons=neurons,
        answer=" Paris",
        samples=10,
        noise=None,
        seed=SEED,
    )
    settings = _settings(samples=10, noise=None, seed=SEED).for_model(gemma)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = plain_neuron_trace(
            gemma,
            by=by,
            direction="denoise",
            window=1,
            answer=answer,
            span=span,
            pos_list=pos_list,
            neurons=neurons,
            prompt=prompt,
            layers=layers,
            std=settings.corruption.noise,
            samples=10,
        )
    keys = list(expected)
    want = torch.tensor([expected[k] for k in keys], dtype=torch.float64)
    got = torch.stack([got[k] for k in keys]).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dataset_traces_refuse_neurons(tiny_model):
    import lenscope

    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    facts = [{"prompt": TINY_PROMPT, "subject": TINY_SUBJECT}]
    with pytest.raises(InvalidInput, match=r"kind 'mlp_post' gives \('layer', 'neuron'\) grids"):
        lenscope.trace_dataset(tracer, facts, kinds=("mlp_post",))
