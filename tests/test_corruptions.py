"""The noises of ROME's causal_trace.py as corruptions: their statistics, records and errors."""

import math

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

from lenscope import (
    CausalTracer,
    GaussianNoise,
    MultivariateGaussianNoise,
    StudentTNoise,
    UniformNoise,
)
from lenscope.corruptions import corruption_from_dict
from lenscope.hooks import EMBED_HOOK
from lenscope.noise import embedding_moments
from lenscope.validation import InvalidInput

STD = 0.7


def _stats(x):
    x = x.double().flatten()
    mean, std = float(x.mean()), float(x.std())
    kurtosis = float(((x - mean) ** 4).mean() / x.var(unbiased=False) ** 2) - 3
    return mean, std, kurtosis, x.numel()


@pytest.mark.parametrize(
    ("noise", "excess_kurtosis"),
    [
        (GaussianNoise(noise=STD), 0.0),
        (UniformNoise(noise=STD), -1.2),
        (StudentTNoise(noise=STD, df=10), 1.0),  # 6 / (df - 4)
    ],
)
def test_each_noise_has_the_specified_mean_std_and_kurtosis(noise, excess_kurtosis):
    draws = noise.draw(400, 5, 256, STD, 11)
    mean, std, kurtosis, n = _stats(draws)
    assert abs(mean) < 5 * STD / math.sqrt(n)
    assert std == pytest.approx(STD, rel=0.01)
    assert kurtosis == pytest.approx(excess_kurtosis, abs=0.12)
    # Same seed, same draws; another seed, other draws.
    assert torch.equal(draws, noise.draw(400, 5, 256, STD, 11))
    assert not torch.equal(draws[:1], noise.draw(1, 5, 256, STD, 12))


def test_uniform_noise_is_bounded_by_its_half_width():
    draws = UniformNoise().draw(50, 3, 64, STD, 0)
    assert float(draws.abs().max()) <= math.sqrt(3) * STD


def _vocabulary_words(model):
    """Every word of the tiny vocabulary (the known-facts subjects are mostly <unk> to it)."""
    return tuple(model.tokenizer.decode([i]) for i in range(3, model.cfg.d_vocab))


def test_multivariate_noise_has_the_fitted_mean_and_covariance(tiny_model):
    words = _vocabulary_words(tiny_model)
    noise = MultivariateGaussianNoise(samples=4000, seed=5, reference_subjects=words)
    bound = noise.bind(tiny_model, tiny_model.to_tokens(TINY_PROMPT)[0], (1, 4))
    mean, cov, count = embedding_moments(tiny_model, words)
    assert count > tiny_model.cfg.d_model
    draws = _added_noise(tiny_model, bound).reshape(-1, tiny_model.cfg.d_model).double()
    scale = float(cov.diagonal().mean().sqrt())
    assert (draws.mean(0) - mean).abs().max() < 0.1 * scale
    assert (torch.cov(draws.T) - cov).abs().max() < 0.1 * scale**2
    # Moments are measured once per model.
    assert embedding_moments(tiny_model, words)[1] is cov


def _added_noise(model, bound):
    """What the bound corruption's hook adds to the subject's embeddings (rows: samples)."""
    ((name, hook),) = bound.fwd_hooks
    assert name == EMBED_HOOK
    embed = torch.randn(bound.samples, bound.tokens.shape[1], model.cfg.d_model)
    return (hook(embed, None) - embed)[:, 1:4]


def test_replace_puts_the_noise_in_place_of_the_embeddings(tiny_model):
    tokens = tiny_model.to_tokens(TINY_PROMPT)[0]
    added = GaussianNoise(samples=2, noise=STD, seed=1).bind(tiny_model, tokens, (1, 4))
    replaced = GaussianNoise(samples=2, noise=STD, seed=1, replace=True).bind(
        tiny_model, tokens, (1, 4)
    )
    embed = torch.randn(2, tokens.shape[0], tiny_model.cfg.d_model)
    noise = added.fwd_hooks[0][1](embed, None) - embed
    out = replaced.fwd_hooks[0][1](embed, None)
    torch.testing.assert_close(out[:, 1:4], noise[:, 1:4])
    assert torch.equal(out[:, 4:], embed[:, 4:]) and torch.equal(out[:, :1], embed[:, :1])
    assert replaced.record["replace"] is True and "replace" not in added.record


@pytest.mark.parametrize(
    "noise",
    [
        UniformNoise(samples=2, seed=3),
        StudentTNoise(samples=2, seed=3, df=4, replace=True),
        MultivariateGaussianNoise(samples=2, seed=3, ridge=1e-5),
    ],
)
def test_every_noise_traces_and_its_record_rebuilds_it(tiny_model, noise):
    tracer = CausalTracer(tiny_model, progress=False)
    result = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", corruption=noise)
    assert result.corruption["name"] == noise.name
    rebuilt = corruption_from_dict(result.corruption)
    again = tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", corruption=rebuilt)
    assert torch.equal(result.scores, again.scores)
    # The same draws as an explicit tensor give the same trace: one engine path.
    if not isinstance(noise, MultivariateGaussianNoise) and not noise.replace:
        resolved = noise.resolve(tiny_model)
        tensor = resolved.draw(2, 3, tiny_model.cfg.d_model, resolved.noise, 3)
        explicit = tracer.trace(
            TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, noise_tensor=tensor
        )
        torch.testing.assert_close(explicit.scores, result.scores, atol=1e-6, rtol=0)


def test_noise_bad_input_names_the_rule(tiny_model):
    with pytest.raises(InvalidInput, match=r"needs df > 2 degrees of freedom .*got df=2"):
        StudentTNoise(df=2)
    singular = MultivariateGaussianNoise(samples=1, reference_subjects=("paris",))
    with pytest.raises(
        InvalidInput, match=r"singular \(rank 0 of d_model=32, from 1 refer.*ridge="
    ):
        singular.bind(tiny_model, tiny_model.to_tokens(TINY_PROMPT)[0], (1, 4))
    regularised = MultivariateGaussianNoise(samples=1, reference_subjects=("paris",), ridge=0.1)
    regularised.bind(tiny_model, tiny_model.to_tokens(TINY_PROMPT)[0], (1, 4))
    with pytest.raises(InvalidInput, match=r"noise options \['noise'\] do not apply"):
        CausalTracer(tiny_model, progress=False).trace(
            TINY_PROMPT, TINY_SUBJECT, corruption=MultivariateGaussianNoise(), noise=0.5
        )
