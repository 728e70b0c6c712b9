"""Sites, corruptions and TraceSettings: the plug-in shape of the one engine.

A corruption written here, outside the package, runs through the unchanged
engine and is checked against a plain loop (one forward pass per cell); the
scores of today's Gaussian-noise trace are pinned to the values lenscope
computed before the engine was reshaped.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope import compat
from lenscope.corruptions import (
    CorruptedInput,
    Corruption,
    GaussianNoise,
    corruption_from_dict,
)
from lenscope.noise import draw_noise
from lenscope.settings import TraceSettings
from lenscope.validation import InvalidInput, InvalidInputType

PINNED = Path(__file__).parent / "data" / "pinned_tiny_trace.json"


@pytest.fixture(scope="module")
def tracer(tiny_model):
    return lenscope.CausalTracer(tiny_model, progress=False)


# ------------------------------------------------------------------ pinned scores


def test_scores_are_those_of_the_engine_before_the_reshape(tiny_model):
    pinned = json.loads(PINNED.read_text())["by_tl_major"][str(compat.tl_version()[0])]
    tracer = lenscope.CausalTracer(tiny_model, progress=False, strategy="prefix")
    results = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, kinds=lenscope.KINDS, samples=3, seed=1)
    for kind, result in results.items():
        expected = torch.tensor(
            [[float("nan") if v is None else v for v in row] for row in pinned[kind]]
        )
        # Bit-identical on the machine that pinned them; float32 rounding elsewhere.
        torch.testing.assert_close(result.scores, expected, atol=1e-6, rtol=0, equal_nan=True)
    assert results["mlp_out"].clean_score == pytest.approx(pinned["clean"], abs=1e-6)
    assert results["mlp_out"].corrupted_score == pytest.approx(pinned["corrupted"], abs=1e-6)
    assert results["mlp_out"].noise_std == pytest.approx(pinned["noise_std"], rel=1e-6)


# ------------------------------------------------------------------ TraceSettings


def test_settings_object_and_keywords_trace_the_same(tracer):
    settings = TraceSettings(
        kinds=("mlp_out",), windows=3, corruption=GaussianNoise(samples=2, seed=5), top_k=3
    )
    by_object = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, settings)["mlp_out"]
    by_keywords = tracer.trace_kinds(
        TINY_PROMPT, TINY_SUBJECT, kinds=("mlp_out",), windows=3, samples=2, seed=5, top_k=3
    )["mlp_out"]
    assert torch.equal(by_object.scores, by_keywords.scores)
    # Keywords change single fields of a settings object.
    other = tracer.trace_kinds(TINY_PROMPT, TINY_SUBJECT, settings, seed=6)["mlp_out"]
    assert other.seed == 6 and not torch.equal(other.scores, by_object.scores)


def test_settings_round_trip_and_record(tracer, tiny_model):
    settings = tracer.settings(
        kinds=("resid_post", "attn_out"), samples=4, noise=0.5, seed=2, positions="subject"
    ).for_model(tiny_model)
    record = settings.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["corruption"] == "gaussian_noise"
    assert (record["samples"], record["noise_std"], record["seed"]) == (4, 0.5, 2)
    assert record["windows"] == {"resid_post": 1, "attn_out": 4}  # 10 clipped to 4 layers
    back = TraceSettings.from_dict(record)
    assert back.to_dict() == record
    # The record of a result is the corruption's own.
    result = tracer.trace(TINY_PROMPT, TINY_SUBJECT, samples=4, noise=0.5, seed=2)
    assert result.corruption == {
        "name": "gaussian_noise",
        "samples": 4,
        "noise_std": 0.5,
        "seed": 2,
    }


def test_noise_multiplier_is_resolved_once(tracer, tiny_model):
    settings = tracer.settings(noise_multiplier=2.0).for_model(tiny_model)
    assert settings.corruption.noise == pytest.approx(2.0 * tracer.sigma)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"kinds": ("mlp",)}, InvalidInput, r"kind must be one of .*got 'mlp'"),
        ({"kinds": ()}, InvalidInput, r"kinds must be distinct and non-empty"),
        ({"top_k": 0}, InvalidInput, r"top_k must be an integer in \[1, d_vocab\], got 0"),
        ({"positions": "middle"}, InvalidInput, r"positions must be 'all', 'subject', 'from_s"),
        (
            {"metric": "accuracy"},
            InvalidInput,
            r"metric must be one of \('prob', 'log_prob', 'logit_diff', 'normal",
        ),
        ({"samples": 0}, InvalidInput, r"samples must be an integer >= 1, got 0; ROME uses 10"),
        ({"noise": -1.0}, InvalidInput, r"noise must be a finite number >= 0, got -1.0; noise "),
        # Under --jaxtyping-packages the annotation refuses these first, with a TypeError.
        ({"seed": 1.5}, (InvalidInput, TypeError), r"(seed must be an integer, got 1.5)|seed"),
        (
            {"corruption": "noise"},
            TypeError,
            r"(corruption must be a lenscope Corruption, got str)|corruption",
        ),
        ({"kind": "mlp_out"}, InvalidInputType, r"unknown trace option\(s\) \['kind'\]"),
    ],
)
def test_bad_settings_name_the_rule(tracer, options, error, match):
    with pytest.raises(error, match=match):
        tracer.settings(**options)


def test_model_dependent_settings_are_checked_against_the_model(tracer, tiny_model):
    with pytest.raises(InvalidInput, match=r"window must be an integer from 1 to n_layers=4"):
        tracer.settings(windows=5).for_model(tiny_model)
    with pytest.raises(InvalidInput, match=r"layers must be distinct layer indices in \[0, 4\)"):
        tracer.settings(layers=[0, 9]).for_model(tiny_model)


def test_noise_options_refuse_another_corruption(tracer):
    with pytest.raises(InvalidInput, match=r"noise options \['samples'\] do not apply to the corr"):
        tracer.settings(corruption=ZeroSubject(), samples=3)


def test_a_custom_metric_cannot_be_rebuilt_from_its_record():
    record = TraceSettings(corruption=GaussianNoise(noise=1.0), metric=lambda lg, a: lg[:, a])
    with pytest.raises(InvalidInput, match=r"custom callable, which cannot be rebuilt"):
        TraceSettings.from_dict(record.to_dict())
    diff = TraceSettings(corruption=GaussianNoise(noise=1.0), metric=lenscope.metrics.logit_diff(7))
    assert TraceSettings.from_dict(diff.to_dict()).metric_name == "logit_diff(foil=7)"


# ------------------------------------------------------------------ corruptions


def test_gaussian_noise_binds_rome_noise(tiny_model):
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    bound = GaussianNoise(samples=3, noise=0.7, seed=4).bind(tiny_model, tokens, (1, 4))
    assert bound.first_changed == 1 and bound.samples == 3
    assert torch.equal(bound.tokens, tokens.repeat(3, 1))
    ((name, hook),) = bound.fwd_hooks
    assert name == "hook_embed"
    embed = torch.zeros(6, tokens.shape[0], tiny_model.cfg.d_model)  # two copies of 3 samples
    noised = hook(embed, None)
    expected = draw_noise(3, 3, tiny_model.cfg.d_model, 0.7, 4)
    assert torch.equal(noised[:3, 1:4], expected) and torch.equal(noised[3:, 1:4], expected)
    assert not noised[:, :1].any() and not noised[:, 4:].any()
    assert corruption_from_dict(bound.record).to_dict() == bound.record


def test_explicit_noise_cannot_be_regenerated():
    record = GaussianNoise(samples=1, noise_tensor=torch.ones(1, 2, 3)).to_dict()
    assert record["seed"] is None
    with pytest.raises(InvalidInput, match=r"noise cannot be regenerated; pass the same tensor"):
        corruption_from_dict(record)
    with pytest.raises(InvalidInput, match=r"must name one of \('gaussian_noise', 'uniform_noise'"):
        corruption_from_dict({"name": "laser"})


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroSubject(Corruption):
    """A corruption defined outside lenscope: the subject's embeddings set to zero."""

    name: ClassVar[str] = "zero_subject"

    def bind(self, model, tokens, subject_range) -> CorruptedInput:
        start, end = subject_range

        def zero(embed, hook):
            embed = embed.clone()
            embed[:, start:end] = 0
            return embed

        return CorruptedInput(
            tokens=tokens[None],
            fwd_hooks=(("hook_embed", zero),),
            first_changed=start,
            record={"name": self.name},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, data):
        return cls()


@dataclasses.dataclass(frozen=True, eq=False)
class SwapTokens(Corruption):
    """A counterfactual prompt: other token ids at the subject's positions, no hooks."""

    replacement: tuple[int, ...] = ()
    name: ClassVar[str] = "swap_tokens"

    def bind(self, model, tokens, subject_range) -> CorruptedInput:
        start, end = subject_range
        corrupted = tokens.clone()
        corrupted[start:end] = torch.tensor(self.replacement, device=tokens.device)
        return CorruptedInput(
            tokens=corrupted[None], fwd_hooks=(), first_changed=start, record=self.to_dict()
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "replacement": list(self.replacement)}

    @classmethod
    def from_dict(cls, data):
        return cls(tuple(data["replacement"]))


def _plain_trace(model, corrupted_tokens, fwd_hooks, kind, answer):
    """One run_with_hooks per (layer, pos) cell on full logits: the obvious implementation."""
    clean_tokens = model.to_tokens(TINY_PROMPT)
    _, cache = model.run_with_cache(clean_tokens)
    n_layers, n_pos = model.cfg.n_layers, clean_tokens.shape[1]
    scores = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_{kind}"
        for pos in range(n_pos):

            def restore(act, hook, pos=pos, name=name):
                act = act.clone()
                act[:, pos] = cache[name][:, pos]
                return act

            logits = model.run_with_hooks(
                corrupted_tokens[None], fwd_hooks=[*fwd_hooks, (name, restore)]
            )
            scores[layer, pos] = torch.softmax(logits[0, -1].double(), -1)[answer].float()
    return scores


@pytest.mark.parametrize("strategy", ["prefix", "full"])
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "mlp_out"])
def test_corruptions_defined_outside_plug_into_the_engine(tiny_model, strategy, kind):
    tracer = lenscope.CausalTracer(tiny_model, progress=False, strategy=strategy)
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    replacement = tuple(tiny_model.to_tokens("big ben london", prepend_bos=False)[0].tolist())
    for corruption in (ZeroSubject(), SwapTokens(replacement)):
        result = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind=kind, window=1, corruption=corruption)
        bound = corruption.bind(tiny_model, tokens, result.subject_range)
        with torch.inference_mode():
            expected = _plain_trace(
                tiny_model, bound.tokens[0], list(bound.fwd_hooks), kind, result.answer_id
            )
        torch.testing.assert_close(result.scores, expected, atol=2e-6, rtol=0)
        assert result.corruption == corruption.to_dict()
        assert (result.samples, result.seed) == (1, None)


# ------------------------------------------------------------------ sites


@dataclasses.dataclass(frozen=True)
class HeadOutputs(lenscope.Site):
    """A site defined outside lenscope: one attention head's output (``hook_z``) at one token."""

    n_heads: int = 0
    unit_axes: ClassVar[tuple[str, ...]] = ("pos", "head")

    def hook_name(self, layer):
        return f"blocks.{layer}.attn.hook_z"

    def unit_shape(self, model, n_pos):
        return (n_pos, self.n_heads)

    def cell_mask(self, units, n_pos):
        mask = torch.zeros(len(units), n_pos, self.n_heads, dtype=torch.bool)
        mask[torch.arange(len(units)), units[:, 0], units[:, 1]] = True
        return mask

    def restore_hook(self, clean, restore):
        def hook(act, hook):
            return torch.where(restore[..., None], clean.to(act.dtype), act)

        return hook


@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_a_site_with_another_index_space_runs_on_the_engine(tiny_model, strategy):
    from lenscope import engine, metrics

    model, cfg = tiny_model, tiny_model.cfg
    site = HeadOutputs("z", n_heads=cfg.n_heads)
    tokens = model.to_tokens(TINY_PROMPT)[0]
    noise = GaussianNoise(samples=2, noise=0.5, seed=0)
    corrupted = noise.bind(model, tokens, (1, 4))
    layers, positions = [0, 2, 3], [0, 2, 3, 9]
    cells = torch.cartesian_prod(
        torch.tensor(layers), torch.tensor(positions), torch.arange(cfg.n_heads)
    )
    with torch.inference_mode():
        clean = engine.clean_run(model, tokens, site.hook_names(cfg.n_layers))
        answer = int(clean.logits.argmax())
        state = engine.corrupted_run(model, corrupted, keep_prefix_state=strategy == "prefix")
        out = engine.sweep(
            model,
            site=site,
            window=1,
            cells=cells,
            source={name: act[None] for name, act in clean.activations.items()},
            base=corrupted,
            base_state=state,
            answer_id=answer,
            metrics=[metrics.prob],
            top_k=2,
            strategy=strategy,
            batch_size=None,
            progress=False,
        )
    assert out.scores[0].shape == (cfg.n_layers, len(tokens), cfg.n_heads)
    # The plain way: one forward pass per (layer, pos, head), full logits.
    _, cache = model.run_with_cache(tokens[None])
    noisy = tokens[None].repeat(2, 1)
    draws = draw_noise(2, 3, cfg.d_model, 0.5, 0)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, 1:4] += draws
        return embed

    with torch.inference_mode():
        for layer, pos, head in cells.tolist():
            name = f"blocks.{layer}.attn.hook_z"

            def put_back(z, hook, pos=pos, head=head, name=name):
                z = z.clone()
                z[:, pos, head] = cache[name][0, pos, head]
                return z

            logits = model.run_with_hooks(
                noisy, fwd_hooks=[("hook_embed", add_noise), (name, put_back)]
            )
            expected = torch.softmax(logits[:, -1].double(), -1)[:, answer].mean()
            assert float(out.scores[0, layer, pos, head]) == pytest.approx(
                float(expected), abs=2e-6
            )
    assert torch.isnan(out.scores[0, 1]).all()  # layer 1 was not traced


def test_noise_tensor_sets_samples(tracer, tiny_model):
    """``noise_tensor=[samples, n_subject_tokens, d_model]`` alone is enough; a different
    explicit ``samples`` is refused, naming both."""
    noise = torch.randn(3, 3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    assert GaussianNoise(noise_tensor=noise).samples == 3 and GaussianNoise().samples == 10
    assert tracer.settings(noise_tensor=noise).corruption.samples == 3
    options = {"kind": "mlp_out", "layers": [1], "noise_tensor": noise}
    implied = tracer.trace(TINY_PROMPT, TINY_SUBJECT, **options)
    explicit = tracer.trace(TINY_PROMPT, TINY_SUBJECT, samples=3, **options)
    assert implied.samples == 3
    torch.testing.assert_close(implied.scores, explicit.scores, equal_nan=True, atol=0, rtol=0)
    conflict = (
        r"samples=10 conflicts with noise_tensor, which holds 3 samples \(shape \(3, 3, 32\) = "
        r"\[samples, n_subject_tokens, d_model\]\); leave samples out \(noise_tensor sets it\), "
        r"or pass a noise_tensor of 10 samples"
    )
    with pytest.raises(InvalidInput, match=conflict):
        tracer.trace(TINY_PROMPT, TINY_SUBJECT, samples=10, **options)
    with pytest.raises(InvalidInput, match=conflict):
        GaussianNoise(samples=10, noise_tensor=noise)
    with pytest.raises(InvalidInput, match=r"samples=2 conflicts with noise_tensor, which holds 3"):
        tracer.settings(tracer.settings(noise_tensor=noise), samples=2)
    # Under --jaxtyping-packages the annotation refuses it first, with a TypeError.
    wrong_rank = r"(noise_tensor must have shape \[samples, n_subject_tokens, d_model\])|noise_t"
    with pytest.raises((InvalidInput, TypeError), match=wrong_rank):
        tracer.settings(noise_tensor=noise[0])


def test_positions_counted_from_the_end_are_recorded_as_given():
    """A dataset header keeps ``[-1]`` (each prompt resolves it); a result records the cells."""
    settings = TraceSettings(positions=[0, -2, "last"], corruption=GaussianNoise(noise=0.5))
    record = settings.to_dict()
    assert record["positions"] == [0, -2, "last"]
    assert TraceSettings.from_dict(record).position_list(6, (1, 3)) == [0, 4, 5]
    assert TraceSettings(positions="last").position_list(6, (1, 3)) == [5]
