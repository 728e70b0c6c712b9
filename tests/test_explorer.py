"""lenscope.explore(): the explorer widget's kernel side (traits in, results out), no browser."""

import math
import re
import sys

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model
from records import assert_same_record

import lenscope
from lenscope import explorer as explorer_module
from lenscope.noise import draw_noise
from lenscope.validation import InvalidInput

pytest.importorskip("anywidget")

ROME_KINDS = ("resid_post", "mlp_out", "attn_out")


@pytest.fixture()
def make_explorer(tiny_model):
    made = []

    def make(model=tiny_model, **traits):
        traits.setdefault("prompt", TINY_PROMPT)
        traits.setdefault("samples", 3)
        tracer = lenscope.CausalTracer(model, progress=False, batch_size=traits.pop("batch", None))
        explorer = lenscope.explore(tracer, **traits)
        made.append(explorer)
        explorer.wait()
        return explorer

    yield make
    for explorer in made:
        explorer.close()


@pytest.fixture(scope="module")
def peaked_model(tiny_tokenizer):
    """A tiny model whose restored runs disagree on their top tokens from kind to kind."""
    return make_tiny_model(tiny_tokenizer, init_range=0.2)


def _same(a, b):
    assert_same_record(a.to_dict(), b.to_dict())  # to float rounding: tests/records.py


def test_tokens_subject_guess_and_answer_preview(make_explorer, tiny_model):
    explorer = make_explorer()
    ids = tiny_model.to_tokens(TINY_PROMPT)[0]
    assert explorer.tokens == [tiny_model.tokenizer.decode([i]) for i in ids.tolist()]
    # The CLI's guess, as a token range.
    guessed = lenscope.guess_subject(TINY_PROMPT)
    assert explorer.subject == list(lenscope.tokens.find_subject(tiny_model, ids, guessed))
    assert explorer.subject == [1, 4] and "guessed subject: 'The Eiffel Tower'" in (
        explorer.subject_note
    )
    # The answer's clean probability, against a plain forward pass.
    with torch.no_grad():
        probs = torch.softmax(tiny_model(ids[None])[0, -1].float(), -1)
    assert explorer.answer_info["top1"] is True
    assert explorer.answer_info["prob"] == pytest.approx(float(probs.max()), rel=1e-5)
    top = probs.topk(5).indices.tolist()
    spaced = top[1]  # a word among the top predictions, typed without its leading space
    word = tiny_model.tokenizer.decode([spaced]).strip()
    explorer.answer = word
    explorer.wait()
    assert explorer.answer_info["text"] == word
    assert f"{word!r} has p = " in explorer.answer_warning
    assert "tokens carry their leading space; pass answer=' " in explorer.answer_warning
    explorer.answer = " " + word
    explorer.wait()
    assert explorer.answer_info["prob"] == pytest.approx(float(probs[spaced]), rel=1e-5)
    assert "leading space" not in explorer.answer_warning


@pytest.mark.parametrize(
    ("traits", "options"),
    [
        ({}, {}),
        (
            {
                "kinds": ["resid_pre", "mlp_out"],
                "window": 2,
                "metric": "log_prob",
                "answer": " city",
            },
            {
                "kinds": ("resid_pre", "mlp_out"),
                "windows": 2,
                "metric": "log_prob",
                "answer": " city",
            },
        ),
    ],
)
def test_run_equals_trace_kinds(make_explorer, peaked_model, traits, options):
    explorer = make_explorer(peaked_model, subject=[1, 4], noise_multiplier=3.5, **traits)
    run = explorer.run(wait=True)
    assert explorer.status == "done" and explorer.error == ""
    tracer = lenscope.CausalTracer(peaked_model, progress=False)
    expected = tracer.trace_kinds(TINY_PROMPT, (1, 4), samples=3, noise_multiplier=3.5, **options)
    assert list(run.results) == list(expected) and run.complete
    for kind, result in expected.items():
        _same(run.results[kind], result)  # vocab included: the kinds' shared one
    assert explorer.results == [run]
    # What the front end draws is the result's grid.
    assert [m["kind"] for m in explorer.heatmaps] == list(expected)
    for drawn in explorer.heatmaps:
        grid = expected[drawn["kind"]].scores
        torch.testing.assert_close(torch.tensor(drawn["scores"]), grid, rtol=0, atol=1e-6)
        assert drawn["zmin"] == pytest.approx(float(grid.min()), abs=1e-6)
        assert drawn["zmax"] == pytest.approx(float(grid.max()), abs=1e-6)


def test_shared_vocab_is_the_joint_traces(peaked_model):
    # Kinds traced one at a time know only their own tokens; a run merges them as trace_kinds does.
    tracer = lenscope.CausalTracer(peaked_model, progress=False)
    joint = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, samples=3)
    alone = {
        k: tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, samples=3, kinds=(k,))[k] for k in joint
    }
    assert any(alone[k].vocab != joint[k].vocab for k in joint)  # the case this is about
    merged = explorer_module.shared_vocab(alone)
    for kind, result in joint.items():
        _same(merged[kind], result)


def test_counterfactual_run_equals_patch(make_explorer, tiny_model):
    counterfactual = "The Space Needle is located in the city of"
    explorer = make_explorer(
        corruption="counterfactual",
        counterfactual=counterfactual,
        kinds=["resid_pre"],
        direction="noise",
        metric="prob",
    )
    run = explorer.run(wait=True)
    assert explorer.error == ""
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    expected = tracer.patch(
        TINY_PROMPT, counterfactual, kind="resid_pre", direction="noise", metric="prob"
    )
    _same(run.results["resid_pre"], expected)
    assert run.settings["counterfactual"] == counterfactual


def test_partial_results_arrive_in_order(make_explorer, tiny_model):
    explorer = make_explorer()
    seen, progress, statuses = [], [], []
    explorer.observe(lambda c: seen.append(c["new"]), "heatmaps")
    explorer.observe(lambda c: progress.append(c["new"]), "progress")
    explorer.observe(lambda c: statuses.append(c["new"]), "status")
    run = explorer.run(wait=True)
    # First every kind's attribution estimate; then, kind by kind, its exact cells as its
    # batches finish (over the estimate), then its exact sweep's result.
    steps = [[(m["kind"], _state_of(m)) for m in maps] for maps in seen]
    steps = [step for i, step in enumerate(steps) if not i or step != steps[i - 1]]
    r, m, a = ROME_KINDS
    e, p, x = "estimate", "partial", "exact"
    assert steps == [
        [(r, e), (m, e), (a, e)],
        [(r, p), (m, e), (a, e)],
        [(r, x), (m, e), (a, e)],
        [(r, x), (m, p), (a, e)],
        [(r, x), (m, x), (a, e)],
        [(r, x), (m, x), (a, p)],
        [(r, x), (m, x), (a, x)],
    ]
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    estimates = tracer.attribute(TINY_PROMPT, TINY_SUBJECT, samples=3)
    for drawn in seen[0]:
        assert torch.equal(torch.tensor(drawn["scores"]), estimates[drawn["kind"]].scores)
    for drawn in seen[-1]:
        assert torch.equal(torch.tensor(drawn["scores"]), run.results[drawn["kind"]].scores)
    partial = [d for maps in seen for d in maps if d.get("partial")]
    counts = {}
    for drawn in partial:  # exact cells so far, the estimate kept for the others
        exact = torch.tensor(
            [[math.nan if v is None else v for v in row] for row in drawn["scores"]]
        )
        done = torch.isfinite(exact)
        assert torch.equal(exact[done], run.results[drawn["kind"]].scores[done])
        assert drawn["estimate_scores"] == seen[0][ROME_KINDS.index(drawn["kind"])]["scores"]
        assert drawn["done"] == int(done.sum()) and f"exact: {drawn['done']} of" in drawn["title"]
        counts.setdefault(drawn["kind"], []).append(drawn["done"])
    assert all(len(c) >= 2 and c == sorted(c) for c in counts.values()), counts
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len(progress) > 6  # the meters' steps inside each kind, not only the kinds
    assert statuses == ["running", "done"]

    explorer.preview = False
    seen.clear()
    explorer.run(wait=True)
    steps = [[(m["kind"], m.get("estimate", False)) for m in maps] for maps in seen]
    assert steps == [
        [],
        [(r, False)],
        [(r, False), (m, False)],
        [(r, False), (m, False), (a, False)],
    ]


def _state_of(drawn):
    return "estimate" if drawn.get("estimate") else "partial" if drawn.get("partial") else "exact"


def _state(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    hooks = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points)
    torch_hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    return (
        hooks,
        torch_hooks,
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.data_ptr(), p.stride()) for p in model.parameters()],
    )


@pytest.mark.parametrize("preview", [False, True])  # True: estimates, then a streamed sweep
def test_cancel_mid_sweep_leaves_the_model_and_keeps_finished_kinds(
    tiny_tokenizer, make_explorer, preview
):
    model = make_tiny_model(tiny_tokenizer)
    calls = []
    model.blocks[0].hook_resid_pre.add_hook(lambda act, hook: calls.append(1), is_permanent=True)
    # Mixed modes that change no number (dropout stays off): the LayerNorms in training mode.
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.train()
    model.blocks[2].requires_grad_(False)
    with torch.no_grad():  # a TransformerBridge adds its own torch hooks on its first forward
        model(model.to_tokens(TINY_PROMPT))
    before = _state(model)
    assert any(before[2]) and not all(before[2]) and any(before[3]) and not all(before[3])
    explorer = make_explorer(model, batch=2, preview=preview)
    cancelled_at = []

    def cancel_inside_second_kind(change):
        # Called from the worker thread by the meter's watch, in mid-sweep.
        if not cancelled_at and 0.45 < change["new"] < 0.6:
            cancelled_at.append(change["new"])
            explorer.cancel()

    explorer.observe(cancel_inside_second_kind, "progress")
    run = explorer.run(wait=True)
    assert cancelled_at, "the run never reached the middle of its second kind"
    assert explorer.status == "cancelled" and explorer.error == ""
    assert list(run.results) == ["resid_post"] and not run.complete
    assert explorer.results == [run] and explorer.history[-1]["complete"] is False
    assert explorer.progress < 2 / 3  # stopped inside mlp_out's sweep
    after = _state(model)
    assert after[0] == before[0] == 1, "hooks left attached or the user's hook removed"
    assert after[1] == before[1]
    assert after[2] == before[2], "a module's training mode changed"
    assert after[3] == before[3], "a requires_grad flag changed"
    for name, tensor in before[4].items():
        assert torch.equal(tensor, after[4][name]), name
    assert after[5] == before[5]
    # The kept kind is the trace of that kind, and the explorer runs again.
    tracer = lenscope.CausalTracer(model, progress=False, batch_size=2)  # the explorer's
    expected = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, samples=3)["resid_post"]
    _same(run.results["resid_post"], expected)
    explorer.unobserve_all("progress")
    explorer.kinds = ["attn_out"]
    again = explorer.run(wait=True)
    assert again.complete and len(explorer.results) == 2
    model.reset_hooks(including_permanent=True)


@torch.no_grad()
def test_cell_click_gives_the_restored_top_k_and_lens(make_explorer, tiny_model):
    explorer = make_explorer(kinds=["resid_post"], samples=4)
    run = explorer.run(wait=True)
    result = run.results["resid_post"]
    layer, pos = 1, 2
    explorer.cell = {"run": 0, "kind": "resid_post", "layer": layer, "pos": pos}
    explorer.wait()
    info = explorer.cell_info

    # An independent forward pass: the noised subject, the clean resid_post put back at the cell.
    tokens = tiny_model.to_tokens(TINY_PROMPT)
    clean = {}
    tiny_model.run_with_hooks(
        tokens,
        fwd_hooks=[
            (f"blocks.{layer}.hook_resid_post", lambda a, hook: clean.setdefault("x", a.clone()))
        ],
    )
    start, end = result.subject_range
    noise = draw_noise(4, end - start, tiny_model.cfg.d_model, result.noise_std, result.seed)

    def add_noise(act, hook):
        act = act.clone()
        act[:, start:end] += noise.to(act.dtype)
        return act

    def restore(act, hook):
        act = act.clone()
        act[:, pos] = clean["x"][0, pos]
        return act

    logits = tiny_model.run_with_hooks(
        tokens.repeat(4, 1),
        fwd_hooks=[("hook_embed", add_noise), (f"blocks.{layer}.hook_resid_post", restore)],
    )
    probs = torch.softmax(logits[:, -1].float(), -1).mean(0)
    top = probs.topk(len(info["top"]))
    assert [t for t, _ in info["top"]] == [tiny_model.tokenizer.decode([i]) for i in top.indices]
    assert [p for _, p in info["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert info["score"] == pytest.approx(float(probs[result.answer_id]), abs=1e-6)
    # The lens: the restored run's last layer at the last position is the trace's score.
    assert info["lens"]["restored"]["answer_prob"][-1] == pytest.approx(info["score"], abs=1e-5)
    assert (0, "resid_post", layer, pos) in explorer.cell_views
    explorer.lens = False  # the top-k alone
    explorer.cell = {"run": 0, "kind": "resid_post", "layer": 2, "pos": 1}
    explorer.wait()
    assert explorer.cell_info["lens"] is None and explorer.cell_info["top"]
    assert (0, "resid_post", 2, 1) not in explorer.cell_views
    explorer.cell = {"run": 0, "kind": "attn_out", "layer": 0, "pos": 0}
    assert (
        "kind 'attn_out' is not among the run's finished kinds ['resid_post']"
        in (explorer.cell_info["error"])
    )


@torch.no_grad()
def test_per_head_breakdown_of_an_attention_cell(make_explorer, tiny_model):
    explorer = make_explorer(kinds=["attn_out", "mlp_out"], window=2, preview=False)
    run = explorer.run(wait=True)
    cell = run.results["attn_out"]
    layer, pos = 2, 5
    explorer.cell = {"run": 0, "kind": "attn_out", "layer": layer, "pos": pos}
    explorer._on_front_end_message(None, {**explorer.cell, "action": "heads"})  # the button
    explorer.wait()
    shown = explorer.cell_info["heads"]
    assert explorer.cell_info["heads_note"] == ""
    assert (0, "attn_out", layer, pos) in explorer.head_views

    # Independent: the noised subject, one head's clean hook_z put back at pos in the
    # cell's window (layers 1 and 2 for layer 2, window 2), p(answer) averaged over copies.
    tokens = tiny_model.to_tokens(TINY_PROMPT)
    window = range(max(0, layer - 1), min(tiny_model.cfg.n_layers, layer + 1))
    _, cache = tiny_model.run_with_cache(tokens)
    start, end = cell.subject_range
    noise = draw_noise(3, end - start, tiny_model.cfg.d_model, cell.noise_std, cell.seed)

    def add_noise(act, hook):
        act = act.clone()
        act[:, start:end] += noise.to(act.dtype)
        return act

    expected = []
    for head in range(tiny_model.cfg.n_heads):

        def restore(act, hook, head=head):
            act = act.clone()
            act[:, pos, head] = cache[hook.name][0, pos, head]
            return act

        logits = tiny_model.run_with_hooks(
            tokens.repeat(3, 1),
            fwd_hooks=[("hook_embed", add_noise)]
            + [(f"blocks.{i}.attn.hook_z", restore) for i in window],
        )
        probs = torch.softmax(logits[:, -1].float(), -1)[:, cell.answer_id]
        expected.append(float(probs.mean()))
    assert shown == pytest.approx(expected, abs=1e-6)
    assert len(set(shown)) > 1  # the heads differ: a breakdown, not one number repeated

    with pytest.raises(InvalidInput, match="per-head breakdown is of an attention cell"):
        explorer.heads(layer, pos, kind="mlp_out")
    with pytest.raises(InvalidInput, match=r"the cell must lie in the attn_out grid"):
        explorer.heads(7, pos)


@pytest.mark.parametrize(
    ("traits", "message"),
    [
        (
            {"subject": [5, 40]},
            r"subject range must be \(start, end\) token positions with 0 <= start < end <= 10, got \(5, 40\)",
        ),
        ({"prompt": ""}, "prompt must be non-empty text or token ids, got ''; pass a prompt"),
        ({"metric": "bogus"}, "metric must be one of .* got 'bogus'"),
        (
            {"corruption": "ablation"},
            "corruption must be one of \\('noise', 'counterfactual'\\), got 'ablation'",
        ),
        ({"kinds": []}, "kinds must name at least one kind, got none"),
        ({"kinds": ["resid_post", "nonsense"]}, "kind must be one of .* got 'nonsense'; pass e.g."),
        # Found in the worker thread, by the trace itself.
        (
            {"corruption": "counterfactual", "counterfactual": "The Space Needle is in"},
            "a counterfactual prompt must tokenise to as many tokens as the clean prompt .*got 6 "
            "tokens",
        ),
    ],
)
def test_bad_input_sets_the_error_trait(make_explorer, traits, message):
    explorer = make_explorer()
    explorer.set_trait("subject", traits.pop("subject", explorer.subject))
    for name, value in traits.items():
        setattr(explorer, name, value)
    explorer.wait()
    statuses = []
    explorer.observe(lambda c: statuses.append(c["new"]), "status")
    assert explorer.run(wait=True) is None
    assert explorer.status == "error"
    assert re.search(message, explorer.error), explorer.error
    if "counterfactual" in traits:  # found by the trace, in the worker thread
        assert statuses == ["running", "error"]
    assert explorer.results == [] and not explorer._running


def test_history_compare_and_export(make_explorer, tmp_path):
    explorer = make_explorer(kinds=["resid_post", "mlp_out"], preview=False)
    first = explorer.run(wait=True)
    explorer.noise_multiplier = 5.0
    second = explorer.run(wait=True)
    assert [h["run"] for h in explorer.history] == [0, 1]
    fig = explorer.compare(0, 1, mode="difference")
    drawn = {m["kind"]: m for m in explorer.comparison["heatmaps"]}
    for kind in ("resid_post", "mlp_out"):
        diff = first.results[kind].scores - second.results[kind].scores
        assert torch.equal(torch.tensor(drawn[kind]["scores"]), diff)
    assert len(fig.data) >= 2
    explorer.compare(0, 1)
    assert len(explorer.comparison["heatmaps"]) == 4
    with pytest.raises(
        ValueError, match=r"j must be the index of a run in explorer.results \(0 to 1\), got 2"
    ):
        explorer.compare(0, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        explorer.compare(0, 1, mode="overlay")
    path = explorer.save_json(tmp_path / "runs.json")
    loaded = explorer_module.load_runs(path)
    assert [r.to_dict() for r in loaded] == [first.to_dict(), second.to_dict()]
    one = first.save(tmp_path / "run.json")
    assert lenscope.ExplorerRun.load(one).to_dict() == first.to_dict()
    page = explorer.save_html(tmp_path / "run.html", plotly_js="cdn")
    assert "resid_post" in page.read_text()


def test_export_writes_the_current_view(make_explorer, tmp_path, monkeypatch):
    import types

    import plotly.graph_objects as go

    from lenscope.plotting import plot_traces

    with pytest.raises(InvalidInput, match="no run has finished yet; press Run"):
        make_explorer().export(tmp_path / "nothing.png")
    explorer = make_explorer(kinds=["resid_post"], preview=False, samples=2)
    first = explorer.run(wait=True)
    explorer.noise_multiplier = 5.0
    second = explorer.run(wait=True)
    images = []
    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))
    monkeypatch.setattr(go.Figure, "write_image", lambda fig, path, **kw: images.append(fig))

    # Before a comparison the view is the last run's kinds ...
    written = explorer.export(tmp_path / "run.png")
    assert written == tmp_path / "run.png" and explorer.exported == str(written)
    assert images[-1].to_json() == plot_traces(second.results).to_json()
    # ... then the comparison shown (the figure plot_traces draws of the two runs).
    explorer.compare(0, 1, mode="difference")
    explorer._on_front_end_message(None, {"action": "export", "path": str(tmp_path / "d.png")})
    explorer.wait()
    expected = plot_traces({"run 0": first.results, "run 1": second.results}, mode="difference")
    assert images[-1].to_json() == expected.to_json()
    assert explorer.exported == str(tmp_path / "d.png") and explorer.error == ""
    page = explorer.export(tmp_path / "d.html", plotly_js="cdn").read_text()
    assert "run 0 minus run 1" in page and "Settings" in page  # the difference's page
    explorer._on_front_end_message(None, {"action": "export", "path": "view.txt"})
    explorer.wait()
    assert explorer.exported == ""
    assert explorer.error.startswith(
        "export path must end in one of ('.html', '.png', '.svg', '.pdf'), got 'view.txt'"
    )


def test_front_end_messages_run_and_cancel(make_explorer):
    explorer = make_explorer(kinds=["resid_post"])
    explorer._on_front_end_message(explorer, {"action": "run"})
    explorer.wait()
    assert explorer.status == "done" and len(explorer.results) == 1


def test_missing_anywidget_names_the_extra(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "anywidget", None)
    monkeypatch.setattr(explorer_module, "_CLASS", [])
    with pytest.raises(
        ImportError,
        match=r'needs anywidget, which is not installed: pip install "lenscope\[explore\]"',
    ):
        lenscope.explore(tiny_model)
