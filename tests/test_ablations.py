"""Zero, mean and resample ablations at a site, as corruptions of a causal trace.

Every check compares lenscope with a plain TransformerLens implementation
written here: ``run_with_hooks`` with hand-written hooks that index the
activation directly, and one forward pass per restored cell. The tiny models
are built with larger initial weights (``init_range=0.3``) than the shared
fixtures, so that an ablation moves the prediction by far more than the
tolerance; each test checks that it does, so that it could fail.
"""

import dataclasses
import json
import math
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT, make_tiny_model

import lenscope
import lenscope.datasets as ds
from lenscope import corruptions
from lenscope.corruptions import (
    CorruptedInput,
    Corruption,
    MeanAblation,
    ResampleAblation,
    ZeroAblation,
    corruption_from_dict,
)
from lenscope.settings import TraceSettings
from lenscope.validation import InvalidInput, InvalidInputType

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SOURCES = (
    "The Space Needle is located in the city of",
    "The Big Ben is located in the city of",
)
MEAN_PROMPTS = (
    "The Colosseum is located in the city of rome",
    "big ben and the space needle",
    "Paris is the capital of France",
)
# Where each site is ablated: layers, heads (for z); all after layer 0, so that the
# prefix strategy has cells entering before, at and after the ablated layer.
SITES = {
    "resid_post": {"layers": [1]},
    "mlp_out": {"layers": [1, 2]},
    "z": {"layers": [1, 2], "heads": [1, 3]},
}


def ablation(kind: str, site: str) -> Corruption:
    """One ablation of each kind, each with other positions."""
    where = SITES[site]
    if kind == "zero":
        return ZeroAblation(site, **where)
    if kind == "mean":
        return MeanAblation(site, positions=[2, -1], prompts=MEAN_PROMPTS, **where)
    return ResampleAblation(site, positions="all", source=SOURCES, **where)


@pytest.fixture(scope="module", params=["plain", "gated"])
def model(request, tiny_tokenizer):
    if request.param == "plain":
        return make_tiny_model(tiny_tokenizer, init_range=0.3)
    return make_tiny_model(tiny_tokenizer, gated=True, seed=3, init_range=0.3)


# ------------------------------------------------------------------ the plain reference


def act_name(site: str, layer: int) -> str:
    return f"blocks.{layer}.attn.hook_{site}" if site == "z" else f"blocks.{layer}.hook_{site}"


def plain_mean(model, prompts, name):
    """Mean over every token after BOS of each prompt, one unpadded forward pass each."""
    rows = []
    for prompt in prompts:
        _, cache = model.run_with_cache(model.to_tokens(prompt))
        rows.append(cache[name][0, 1:].double())
    return torch.cat(rows).mean(0)


def plain_hooks(model, corruption, tokens, subject):
    """Hand-written hooks doing what ``corruption`` should, and the samples they need."""
    n_pos = tokens.shape[0]
    if corruption.positions == "subject":
        positions = list(range(*subject))
    elif corruption.positions == "all":
        positions = list(range(n_pos))
    else:
        positions = [p % n_pos for p in corruption.positions]
    samples = 1
    sources = None
    if isinstance(corruption, ResampleAblation):
        samples = len(corruption.source)
        sources = model.run_with_cache(torch.stack([model.to_tokens(s)[0] for s in SOURCES]))[1]
    hooks = []
    for layer in corruption.layers:
        name = act_name(corruption.site, layer)
        mean = (
            plain_mean(model, corruption.prompts, name)
            if corruption.name == "mean_ablation"
            else None
        )

        def hook(act, hook, name=name, mean=mean):
            for pos in positions:
                for head in corruption.heads or [None]:
                    where = (slice(None), pos) if head is None else (slice(None), pos, head)
                    if mean is not None:
                        act[where] = mean[where[2:]].to(act.dtype)
                    elif sources is not None:
                        act[where] = sources[name][where]
                    else:
                        act[where] = 0
            return act

        hooks.append((name, hook))
    return hooks, samples


def test_corrupted_run_equals_a_hand_written_hook(model):
    tokens = model.to_tokens(TINY_PROMPT)[0]
    subject = lenscope.tokens.find_subject(model, tokens, TINY_SUBJECT)
    with torch.inference_mode():
        clean = model(tokens[None])
        for site in SITES:
            for kind in ("zero", "mean", "resample"):
                corruption = ablation(kind, site)
                bound = corruption.bind(model, tokens, subject)
                hooks, samples = plain_hooks(model, corruption, tokens, subject)
                assert bound.samples == samples and bound.tokens.shape == (samples, len(tokens))
                first = {"zero": subject[0], "mean": 2, "resample": 0}[kind]
                assert bound.first_changed == first
                got = model.run_with_hooks(bound.tokens, fwd_hooks=list(bound.fwd_hooks))
                expected = model.run_with_hooks(tokens.repeat(samples, 1), fwd_hooks=hooks)
                torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
                # The ablation changes the prediction, by far more than the tolerance.
                assert (got[:, -1] - clean[:, -1]).abs().max() > 1e-2, (site, kind)


def test_mean_is_the_plain_mean_and_is_measured_once(model, monkeypatch):
    names = [act_name("mlp_out", 1), act_name("z", 2)]
    corruptions._MEANS_CACHE.pop(model, None)
    calls = []
    original = corruptions.capture_forward

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(corruptions, "capture_forward", counted)
    with torch.inference_mode():
        means = corruptions.site_means(model, MEAN_PROMPTS, names)
        again = corruptions.site_means(model, MEAN_PROMPTS, names)
        for name in names:
            expected = plain_mean(model, MEAN_PROMPTS, name).float()
            torch.testing.assert_close(means[name], expected, atol=TOL, rtol=0)
    assert again is means and len(calls) == 1  # one padded batch, then the cache
    assert calls[0][0] == len(MEAN_PROMPTS)


def plain_trace(model, corruption, kind, window, direction, answer):
    """Every (layer, pos) cell, one run_with_hooks each, full logits; samples averaged."""
    tokens = model.to_tokens(TINY_PROMPT)[0]
    subject = lenscope.tokens.find_subject(model, tokens, TINY_SUBJECT)
    ablate, samples = plain_hooks(model, corruption, tokens, subject)
    n_layers, n_pos = model.cfg.n_layers, len(tokens)
    names = [act_name(kind, layer) for layer in range(n_layers)]
    _, clean = model.run_with_cache(tokens[None])
    corrupted = {}

    def keeper(name):
        def keep(act, hook):
            corrupted[name] = act.clone()

        return keep

    model.run_with_hooks(
        tokens.repeat(samples, 1), fwd_hooks=[*ablate, *((n, keeper(n)) for n in names)]
    )
    noising = direction == "noise"
    scores = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        low = max(0, layer - window // 2)
        restored = range(low, min(n_layers, layer - window // 2 + window))
        for pos in range(n_pos):
            hooks = [] if noising else list(ablate)
            for at in restored:
                name = names[at]
                value = corrupted[name][:, pos] if noising else clean[name][:, pos]

                def put(act, hook, pos=pos, value=value):
                    act[:, pos] = value
                    return act

                hooks.append((name, put))
            logits = model.run_with_hooks(tokens.repeat(samples, 1), fwd_hooks=hooks)
            probs = torch.softmax(logits[:, -1].double(), -1)[:, answer]
            scores[layer, pos] = probs.mean().float()
    return scores


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_trace_equals_one_forward_pass_per_cell(model, site, kind):
    corruption = ablation(kind, site)
    kinds, windows = ("resid_pre", "resid_post", "mlp_out"), {"mlp_out": 3}
    for direction in ("denoise", "noise"):
        by_strategy = {}
        for strategy in ("prefix", "full"):
            tracer = lenscope.CausalTracer(model, progress=False, strategy=strategy)
            by_strategy[strategy] = tracer.trace_kinds(
                TINY_PROMPT,
                TINY_SUBJECT,
                kinds=kinds,
                windows=windows,
                corruption=corruption,
                direction=direction,
            )
        first = by_strategy["prefix"]["mlp_out"]
        assert first.metric == "prob" and first.corruption == corruption.to_dict()
        with torch.inference_mode():
            for restored in kinds:
                window = windows.get(restored, 1)
                expected = plain_trace(
                    model, corruption, restored, window, direction, first.answer_id
                )
                for strategy, results in by_strategy.items():
                    got = results[restored].scores
                    torch.testing.assert_close(
                        got, expected, atol=TOL, rtol=0, msg=f"{strategy} {direction} {restored}"
                    )
                # Restoring moves the score, by far more than the tolerance.
                assert (expected - first.corrupted_score).abs().max() > 20 * TOL, restored


def test_attribution_patching_runs_with_an_ablation(model):
    """AtP's gradient run carries backward hooks, where writing in place is forbidden: the
    ablation hook returns its value there. The estimate follows the exact trace."""
    tracer = lenscope.CausalTracer(model, progress=False)
    corruption = ZeroAblation("mlp_out", layers=[1, 2])
    options = {"kinds": ("mlp_out",), "windows": 1, "corruption": corruption}
    estimate = tracer.attribute(TINY_PROMPT, TINY_SUBJECT, **options)["mlp_out"].scores
    exact = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, **options)["mlp_out"].scores
    traced = ~exact.isnan()
    assert torch.isfinite(estimate[traced]).all()
    pair = torch.stack([estimate[traced], exact[traced]])
    assert float(torch.corrcoef(pair)[0, 1]) > 0.8


def test_an_ablation_needs_nothing_at_hook_embed(tiny_model, monkeypatch):
    """No sigma is measured and no embedding caveat is consulted; no hook sits at hook_embed."""

    def refuse(*args, **kwargs):
        raise AssertionError("an ablation must not need hook_embed")

    for name in ("embedding_sigma", "embedding_moments", "embed_hook_caveat"):
        monkeypatch.setattr(corruptions, name, refuse)
    monkeypatch.setattr(lenscope.noise, "embedding_sigma", refuse)
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    for kind in ("zero", "mean", "resample"):
        corruption = ablation(kind, "mlp_out")
        bound = corruption.bind(tiny_model, tokens, (1, 4))
        assert "hook_embed" not in dict(bound.fwd_hooks)
        settings = TraceSettings(kinds=("resid_post",), corruption=corruption)
        tracer = lenscope.CausalTracer(tiny_model, progress=False)
        result = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, settings)["resid_post"]
        assert torch.isfinite(result.scores).all()


# ------------------------------------------------------------------ records


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_record_round_trips(kind):
    corruption = ablation(kind, "z")
    record = corruption.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert corruption_from_dict(record).to_dict() == record
    assert record["site"] == "z" and record["ablated_layers"] == [1, 2]
    assert record["heads"] == [1, 3]
    if kind == "mean":
        assert record["mean_prompt_count"] == 3 and len(record["mean_prompts_sha256"]) == 16
        assert record["ablated_positions"] == [2, -1]
    if kind == "resample":
        assert record["resample_sources"] == list(SOURCES) and record["samples"] == 2
    # In a trace's settings record, beside the trace's own layers and positions.
    settings = TraceSettings(kinds=("mlp_out",), corruption=corruption, layers=[0])
    back = TraceSettings.from_dict(settings.to_dict())
    assert back.corruption.to_dict() == record and back.layers == (0,)


def test_a_mean_record_with_edited_prompts_is_refused():
    record = ablation("mean", "mlp_out").to_dict()
    record["mean_prompts"] = record["mean_prompts"][:2]
    with pytest.raises(InvalidInput, match=r"mean_prompts do not match its mean_prompts_sha256"):
        corruption_from_dict(record)


def test_saved_result_keeps_the_ablation(tiny_model, tmp_path):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    corruption = ablation("resample", "mlp_out")
    result = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", corruption=corruption)
    assert result.samples == 2 and result.noise_std is None and result.seed is None
    loaded = lenscope.TraceResult.load(result.save(tmp_path / "r.json"))
    assert loaded.corruption == corruption.to_dict()
    assert corruption_from_dict(loaded.corruption).to_dict() == corruption.to_dict()
    torch.testing.assert_close(loaded.scores, result.scores, equal_nan=True, atol=0, rtol=0)


FACTS = [
    {"known_id": 1, "prompt": TINY_PROMPT, "subject": TINY_SUBJECT},
    {"known_id": 2, "prompt": SOURCES[0], "subject": "The Space Needle"},
    {"known_id": 3, "prompt": "Paris is the capital of", "subject": "Paris"},
]


def test_dataset_checkpoint_header_and_packed_prompts(tiny_model, tmp_path, monkeypatch):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    corruption = ablation("mean", "mlp_out")
    corruptions._MEANS_CACHE.pop(tiny_model, None)
    computed = []
    original_capture = corruptions.capture_forward

    def counted(*args, **kwargs):
        computed.append(1)
        return original_capture(*args, **kwargs)

    monkeypatch.setattr(corruptions, "capture_forward", counted)
    path = tmp_path / "run.jsonl"
    options = {"kinds": ("mlp_out",), "corruption": corruption}
    one = ds.trace_dataset(tracer, FACTS, checkpoint=path, **options)
    assert len(computed) == 1  # the mean, once for the whole dataset
    header = json.loads(path.read_text().splitlines()[0])
    assert header["corruption"] == "mean_ablation"
    assert TraceSettings.from_dict(header).corruption.to_dict() == corruption.to_dict()
    # Resuming with the same settings is accepted and recomputes nothing.
    again = ds.trace_dataset(tracer, FACTS, checkpoint=path, **options)
    assert [f.fact_id for f in again.facts] == [f.fact_id for f in one.facts]
    # Two facts of one length traced in one sweep equal each alone.
    packed = ds.trace_dataset(tracer, FACTS, prompts_per_batch=2, **options)
    for alone, together in zip(one.facts, packed.facts, strict=True):
        for kind in alone.scores:
            torch.testing.assert_close(
                together.scores[kind], alone.scores[kind], atol=TOL, rtol=0, equal_nan=True
            )


def test_packed_resample_equals_each_prompt_alone(tiny_model):
    tracer = lenscope.CausalTracer(tiny_model, progress=False, strategy="prefix")
    corruption = ablation("resample", "resid_post")
    one = ds.trace_dataset(tracer, FACTS[:2], kinds=("resid_pre",), corruption=corruption)
    packed = ds.trace_dataset(
        tracer, FACTS[:2], kinds=("resid_pre",), corruption=corruption, prompts_per_batch=2
    )
    for alone, together in zip(one.facts, packed.facts, strict=True):
        torch.testing.assert_close(
            together.scores["resid_pre"],
            alone.scores["resid_pre"],
            atol=TOL,
            rtol=0,
            equal_nan=True,
        )


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: ZeroAblation("mlp"),
            InvalidInput,
            r"site must be one of \('resid_pre', .*got 'mlp'; pass e.g. site='mlp_out'",
        ),
        (lambda: ZeroAblation("pattern"), InvalidInput, r"site must be one of .*got 'pattern'"),
        (
            lambda: ZeroAblation("mlp_out", heads=[0]),
            InvalidInput,
            r"heads apply to the per-head sites .*got heads=\[0\] for site 'mlp_out'",
        ),
        (
            lambda: ZeroAblation("mlp_out", layers="2"),
            # Under --jaxtyping-packages the annotation refuses it first, with a TypeError.
            (InvalidInputType, TypeError),
            r"(layers must be an integer or a list of them, got '2')|layers",
        ),
        (
            lambda: ZeroAblation("mlp_out", positions="middle"),
            InvalidInput,
            r"positions must be 'subject', 'all' or a list of token positions, got 'middle'",
        ),
        (
            lambda: MeanAblation("mlp_out", prompts=[]),
            InvalidInput,
            r"MeanAblation averages the site over prompts, got prompts=\[\]; pass at least one, e",
        ),
        (
            lambda: MeanAblation("mlp_out"),
            InvalidInput,
            r"MeanAblation averages the site over prompts, got prompts=\(\)",
        ),
        (
            lambda: MeanAblation("mlp_out", prompts=["a", ""]),
            InvalidInput,
            r"each of prompts must be non-empty text or token ids, got ''",
        ),
        (
            lambda: ResampleAblation("mlp_out"),
            InvalidInput,
            r"ResampleAblation takes the activations of source prompts, got source=\(\); pass at",
        ),
    ],
)
def test_bad_settings_name_the_rule(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_settings_against_the_model_are_refused_before_any_forward_pass(tiny_model):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)

    def trace(corruption):
        return tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", corruption=corruption)

    with pytest.raises(
        InvalidInput, match=r"layers must be distinct layer indices in \[0, 4\), got \(7,\)"
    ):
        trace(ZeroAblation("mlp_out", layers=7))
    with pytest.raises(
        InvalidInput, match=r"heads must be distinct z head indices in \[0, 4\), got \(5,\)"
    ):
        trace(ZeroAblation("z", heads=[5]))
    with pytest.raises(
        InvalidInput, match=r"positions must be distinct token positions in \[0, 10\)"
    ):
        trace(ZeroAblation("mlp_out", positions=[12]))
    short = (
        r"a resample source must tokenise to as many tokens as the traced prompt \(its "
        r"activations replace the prompt's position by position\), got 6 tokens .* for 10 "
        r"tokens .*; pass a source of the same length"
    )
    with pytest.raises(InvalidInput, match=short):
        trace(ResampleAblation("mlp_out", source="The Colosseum is in rome"))


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroMlpNoSuffix(Corruption):
    """A corruption hooked inside the blocks that does not say how a stair applies it."""

    name: ClassVar[str] = "zero_mlp_no_suffix"

    def bind(self, model, tokens, subject_range) -> CorruptedInput:
        def zero(act, hook):
            act[:, subject_range[0] : subject_range[1]] = 0
            return act

        return CorruptedInput(
            tokens=tokens[None],
            fwd_hooks=(("blocks.1.hook_mlp_out", zero),),
            first_changed=subject_range[0],
            record={"name": self.name},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, data):
        return cls()


def test_prefix_strategy_refuses_a_corruption_inside_the_blocks_without_suffix_hooks(tiny_model):
    full = lenscope.CausalTracer(tiny_model, progress=False, strategy="full")
    result = full.trace(TINY_PROMPT, TINY_SUBJECT, kind="resid_pre", corruption=ZeroMlpNoSuffix())
    assert not math.isnan(float(result.scores[0, -1]))
    prefix = lenscope.CausalTracer(tiny_model, progress=False, strategy="prefix")
    with pytest.raises(
        InvalidInput,
        match=r"a corruption hooked inside the blocks \(\['blocks.1.hook_mlp_out'\]\) must say how its hooks apply there.*give it suffix_hooks=lambda pos: \.\.\., or trace with strategy='full'",
    ):
        prefix.trace(TINY_PROMPT, TINY_SUBJECT, kind="resid_pre", corruption=ZeroMlpNoSuffix())
