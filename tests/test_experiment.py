"""The prepared-trace stage, and a site and a corruption defined here, outside lenscope.

``lenscope.experiment.prepare`` is the one stage every method starts from,
so a :class:`~lenscope.sites.Site` and a :class:`~lenscope.corruptions.Corruption`
written by a user (below: the MLP's pre-activation ``blocks.L.mlp.hook_pre``,
which lenscope has no kind for, and the subject's embeddings replaced by
their mean) run through the exact trace, attribution, datasets with a
checkpoint, save/load and plot without touching the package. References are
plain TransformerLens hooks, one forward per cell, and ``torch.autograd``.
"""

import dataclasses
import math
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model

import lenscope
from lenscope import CausalTracer, experiment
from lenscope.corruptions import CorruptedInput, Corruption, register_corruption
from lenscope.metrics import MetricContext, bind_metric
from lenscope.settings import TraceSettings
from lenscope.sites import Site, register_site, site_from_dict, site_to_dict
from lenscope.validation import InvalidInput

pytestmark = pytest.mark.usefixtures("one_thread")


@register_site
@dataclasses.dataclass(frozen=True)
class MlpPre(Site):
    """A user's site: the MLP's pre-activation (``d_mlp`` wide), restored token by token."""

    name: str = "mlp_pre"

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.mlp.hook_pre"

    def default_window(self, n_layer: int) -> int:
        return 1


@register_corruption
@dataclasses.dataclass(frozen=True)
class MeanSubject(Corruption):
    """A user's corruption: each subject embedding replaced by the subject's mean embedding."""

    name: ClassVar[str] = "mean_subject"

    def bind(self, model: Any, tokens: Any, subject_range: tuple[int, int]) -> CorruptedInput:
        start, end = subject_range

        def hook(embed: torch.Tensor, hook: Any) -> torch.Tensor:
            embed[:, start:end] = embed[:, start:end].mean(dim=1, keepdim=True)
            return embed

        return CorruptedInput(
            tokens=tokens[None],
            fwd_hooks=(("hook_embed", hook),),
            first_changed=start,
            record=self.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, data: Any) -> "MeanSubject":
        return cls()


def _embed_hook(noise: torch.Tensor | None, subject: tuple[int, int]) -> Any:
    start, end = subject

    def hook(embed: torch.Tensor, hook: Any) -> torch.Tensor:
        if noise is None:  # MeanSubject, by hand
            embed[:, start:end] = embed[:, start:end].mean(dim=1, keepdim=True)
        else:
            embed[:, start:end] = embed[:, start:end] + noise.to(embed.dtype)
        return embed

    return hook


def _plain_cells(model, hook_of, embed_hook, rows, answer, layers, positions, window):
    """One run_with_hooks per (layer, pos) cell: the cell's window of layers restored at pos."""
    tokens = model.to_tokens(TINY_PROMPT)
    _, cache = model.run_with_cache(tokens)
    n_layer = model.cfg.n_layers
    out = torch.full((n_layer, tokens.shape[1]), math.nan, dtype=torch.float64)
    for layer in layers:
        # ROME's window, clipped (not shifted) at the ends.
        lo, hi = max(0, layer - window // 2), min(n_layer, layer - (-window // 2))
        for pos in positions:

            def restore(act, hook, pos=pos):
                act[:, pos] = cache[hook.name][:, pos].to(act.dtype)
                return act

            hooks = [("hook_embed", embed_hook)]
            hooks += [(hook_of(j), restore) for j in range(lo, hi)]
            logits = model.run_with_hooks(tokens.repeat(rows, 1), fwd_hooks=hooks)
            out[layer, pos] = torch.softmax(logits[:, -1].double(), -1)[:, answer].mean()
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "gated"])
def peaked(request, tiny_tokenizer):
    """A tiny model with peaked outputs (weights' std 0.3), so that cells differ."""
    return make_tiny_model(tiny_tokenizer, gated=request.param, init_range=0.3)


@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_a_users_site_traces_exactly_as_plain_hooks(peaked, strategy):
    model = peaked
    tracer = CausalTracer(model, strategy=strategy, progress=False)
    noise = torch.randn(2, 3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    result = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, kind=MlpPre(), window=2, noise_tensor=noise * 0.5
    )
    assert result.kind == "mlp_pre"
    assert result.hook_names[1] == "blocks.1.mlp.hook_pre"
    subject = result.subject_range
    expected = _plain_cells(
        model,
        MlpPre().hook_name,
        _embed_hook(noise * 0.5, subject),
        2,
        result.answer_id,
        range(model.cfg.n_layers),
        range(result.n_pos),
        2,
    )
    torch.testing.assert_close(result.scores.double(), expected.double(), atol=1e-5, rtol=0)
    assert (expected.max() - expected.min()).item() > 5e-3  # the cells differ


def test_a_users_corruption_and_site_run_through_attribution_against_autograd(tiny_model):
    model = tiny_model
    tracer = CausalTracer(model, progress=False)
    (estimate,) = tracer.attribute(
        TINY_PROMPT, TINY_SUBJECT, kinds=(MlpPre(),), windows=1, corruption=MeanSubject()
    ).values()
    assert estimate.kind == "mlp_pre" and estimate.corruption == {"name": "mean_subject"}
    # Autograd by hand: the corrupted run's answer probability, differentiated
    # with respect to every layer's hook_pre; AtP = p_corrupted + grad . (clean - corrupted).
    tokens = model.to_tokens(TINY_PROMPT)
    _, clean_cache = model.run_with_cache(tokens)
    answer = int(model(tokens)[0, -1].argmax())
    names = [MlpPre().hook_name(j) for j in range(model.cfg.n_layers)]
    acts = {}

    def keep(act, hook):
        act.retain_grad() if act.requires_grad else None
        acts[hook.name] = act
        return act

    with torch.enable_grad():  # the parameters keep their flags: other tests share the model
        embed_leaf = {}

        def leaf(embed, hook):
            embed_leaf["x"] = embed.detach().clone().requires_grad_(True)
            return _embed_hook(None, estimate.subject_range)(embed_leaf["x"] + 0, hook)

        hooks = [("hook_embed", leaf)] + [(n, keep) for n in names]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        p_corrupted = torch.softmax(logits[0, -1].float(), -1)[answer]
        grads = torch.autograd.grad(p_corrupted, [acts[n] for n in names])
    for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
        delta = clean_cache[name][0] - acts[name][0].detach()
        expected = p_corrupted.item() + (grad[0] * delta).sum(-1)
        torch.testing.assert_close(estimate.scores[layer], expected, atol=1e-5, rtol=0)


def test_a_users_site_and_corruption_run_through_datasets_save_load_and_plot(tiny_model, tmp_path):
    tracer = CausalTracer(tiny_model, progress=False)
    facts = [
        {"known_id": 1, "prompt": TINY_PROMPT, "subject": TINY_SUBJECT},
        {
            "known_id": 2,
            "prompt": "The Space Needle is located in the city of",
            "subject": "The Space Needle",
        },
    ]
    options = dict(kinds=(MlpPre(), "mlp_out"), windows=1, corruption=MeanSubject())
    path = tmp_path / "run.jsonl"
    summary = lenscope.trace_dataset(tracer, facts, checkpoint=path, progress=False, **options)
    assert summary.kinds == ("mlp_pre", "mlp_out") and summary.n_facts == 2
    # Each fact's grid is the one-prompt trace's (datasets are callers of the same stage).
    alone = tracer.trace_kinds(facts[1]["prompt"], facts[1]["subject"], **options)
    start = alone["mlp_pre"].subject_range[0]
    by_id = {f.fact_id: f for f in summary.facts}
    torch.testing.assert_close(
        by_id[2].scores["mlp_pre"][:, start:], alone["mlp_pre"].scores[:, start:], atol=0, rtol=0
    )
    # The checkpoint's header names the site by its record; resuming reads it back.
    again = lenscope.trace_dataset(tracer, facts, checkpoint=path, progress=False, **options)
    assert again.n_facts == 2
    result = alone["mlp_pre"]
    loaded = type(result).load(result.save(tmp_path / "r.json"))
    torch.testing.assert_close(loaded.scores, result.scores, atol=0, rtol=0, equal_nan=True)
    assert loaded.corruption == {"name": "mean_subject"} and loaded.kind == "mlp_pre"
    assert result.plot() is not None


def test_settings_keep_site_objects_by_name_and_read_them_back():
    settings = TraceSettings(kinds=(MlpPre(), "mlp_out"), corruption=MeanSubject())
    assert settings.kinds == ("mlp_pre", "mlp_out")
    assert isinstance(settings.sites[0], MlpPre)
    # A site of one's own under a built-in name stays one's own (it silently
    # became the built-in blocks.L.hook_mlp_out when settings held names only).
    (own,) = TraceSettings(kinds=(MlpPre(name="mlp_out"),)).sites
    assert isinstance(own, MlpPre) and own.hook_name(2) == "blocks.2.mlp.hook_pre"
    changed = dataclasses.replace(settings, windows=2)  # kept through replace
    assert isinstance(changed.sites[0], MlpPre)
    back = TraceSettings.from_dict(settings.to_dict())
    assert [type(s) for s in back.sites] == [MlpPre, type(settings.sites[1])]
    assert site_from_dict(site_to_dict(MlpPre())) == MlpPre()
    with pytest.raises(InvalidInput, match=r"site type 'Nope' is not registered.*register_site"):
        site_from_dict({"type": "Nope", "name": "x"})


def test_prepare_resolves_once_and_measure_binds_metrics_to_their_context(tiny_model):
    settings = TraceSettings.from_options(
        kinds=("resid_post",), metrics=("prob", "kl_div"), samples=2
    )
    prepared = experiment.prepare(tiny_model, TINY_PROMPT, TINY_SUBJECT, settings)
    assert prepared.subject_range == (1, 4) and prepared.positions == tuple(range(10))
    assert prepared.names == tuple(f"blocks.{j}.hook_resid_post" for j in range(4))
    with torch.inference_mode():
        clean = prepared.clean_run()
        corrupted = prepared.bind()
        logits = tiny_model(corrupted.tokens)[:, -1]
    measure = prepared.measure(clean.logits, logits)
    assert measure.answer_id == int(clean.logits.argmax())
    baselines = measure.baselines(clean.logits, logits, 3)
    assert baselines.clean_scores[1] == pytest.approx(0.0, abs=1e-6)  # KL of clean to itself
    expected = torch.softmax(logits.double(), -1)[:, measure.answer_id].mean().item()
    assert baselines.corrupted_scores[0] == pytest.approx(expected, abs=1e-6)


def test_a_metric_that_needs_the_foil_says_so():
    context = MetricContext(answer_id=3, foil_id=None, clean_logits=torch.zeros(8))
    with pytest.raises(InvalidInput, match=r"compares the answer with a foil token.*foil="):
        bind_metric("logit_diff", context)
    bound = bind_metric("logit_diff", dataclasses.replace(context, foil_id=5))
    logits = torch.arange(8.0)[None]
    assert bound.fn(logits, 3).item() == -2.0 and bound.reads is None


def test_a_new_metric_that_needs_the_trace_context_is_one_binder(peaked):
    # normalized_prob is one entry of metrics.BINDERS: the fraction of the
    # answer's probability each cell restores, from the same forward passes as prob.
    tracer = CausalTracer(peaked, progress=False)
    out = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, kind="resid_post", samples=2, metrics=("prob", "normalized_prob")
    )
    prob, normalized = out["prob"], out["normalized_prob"]
    clean, corrupted = prob.clean_score, prob.corrupted_score
    assert abs(clean - corrupted) > 1e-3
    torch.testing.assert_close(
        normalized.scores, (prob.scores - corrupted) / (clean - corrupted), atol=1e-6, rtol=0
    )
    assert (normalized.clean_score, normalized.corrupted_score) == (1.0, 0.0)
    assert normalized.normalization == pytest.approx((clean, corrupted))
