"""Attention patterns of chosen heads: equal to TransformerLens' cache, clean and noised."""

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope.attention import AttentionPatterns, attention_patterns
from lenscope.corruptions import GaussianNoise
from lenscope.noise import draw_noise
from lenscope.validation import InvalidInput


def test_patterns_equal_run_with_cache_clean_and_noised(tiny_gated_model):
    model = tiny_gated_model
    noise = GaussianNoise(samples=3, noise=0.7, seed=2)
    got = attention_patterns(
        model, TINY_PROMPT, layer=-2, heads=[3, 1], subject=TINY_SUBJECT, corruption=noise
    )
    assert got.layer == 2 and got.heads == (1, 3) and got.hook_name.endswith("hook_pattern")
    tokens = model.to_tokens(TINY_PROMPT)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(got.clean, cache["blocks.2.attn.hook_pattern"][0, [1, 3]])
    start, end = got.subject_range
    draws = draw_noise(3, end - start, model.cfg.d_model, 0.7, 2)

    def add_noise(embed, hook):
        embed = embed.clone()
        embed[:, start:end] += draws
        return embed

    with model.hooks(fwd_hooks=[("hook_embed", add_noise)]):
        _, noised = model.run_with_cache(tokens.repeat(3, 1))
    expected = noised["blocks.2.attn.hook_pattern"][:, [1, 3]].mean(0)
    torch.testing.assert_close(got.corrupted, expected)
    assert not torch.allclose(got.corrupted, got.clean)
    assert got.corruption == {"name": "gaussian_noise", "samples": 3, "noise_std": 0.7, "seed": 2}


def test_patterns_round_trip_and_plot(tiny_model, tmp_path):
    clean_only = attention_patterns(tiny_model, TINY_PROMPT, layer=0, heads=2)
    assert clean_only.corrupted is None and clean_only.clean.shape == (1, 10, 10)
    torch.testing.assert_close(clean_only.clean.sum(-1), torch.ones(1, 10))
    back = AttentionPatterns.load(clean_only.save(tmp_path / "p.json"))
    assert back.corrupted is None and torch.equal(back.clean, clean_only.clean)
    both = attention_patterns(tiny_model, TINY_PROMPT, layer=1, subject=TINY_SUBJECT)
    back = AttentionPatterns.load(both.save(tmp_path / "q.json"))
    assert torch.equal(back.corrupted, both.corrupted) and back.heads == (0, 1, 2, 3)
    fig = lenscope.plot_attention(
        tiny_model, TINY_PROMPT, layer=1, heads=[0, 2], subject=TINY_SUBJECT
    )
    assert len(fig.data) == 4  # 2 heads x (clean, corrupted)
    assert "→" in fig.data[1].customdata[5][2] and "corrupted" in fig.data[1].customdata[5][2]
    assert len(both.plot().data) == 8 and len(clean_only.plot().data) == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"layer": 4}, r"layer must be an integer in \[0, 4\) \(or count back\), got 4"),
        ({"layer": 0, "heads": [5]}, r"heads must be distinct head indices in \[0, 4\)"),
        (
            {"layer": 0, "corruption": GaussianNoise()},
            r"a corruption needs the subject it corrupts, got subject=None",
        ),
    ],
)
def test_bad_pattern_options_name_the_rule(tiny_model, options, match):
    with pytest.raises(InvalidInput, match=match):
        attention_patterns(tiny_model, TINY_PROMPT, **options)


def test_attention_figure_names_prompt_subject_and_corruption(tiny_model, tmp_path):
    import re

    from lenscope.plotting import plot_attention, save_html

    corruption = GaussianNoise(samples=3, seed=5)
    fig = plot_attention(
        tiny_model, TINY_PROMPT, layer=1, heads=[0], subject=TINY_SUBJECT, corruption=corruption
    )
    title = fig.layout.title.text.replace("<br>", " ")
    assert "The Eiffel Tower is located in the city of" in title
    assert "subject <i>The␣Eiffel␣Tower</i>" in title
    assert "gaussian noise (3 samples, std" in title and "seed 5" in title
    page = save_html(fig, tmp_path / "a.html").read_text(encoding="utf-8")
    table = re.search(r'<table class="lenscope-settings">(.*?)</table>', page, re.S).group(1)
    for name, value in [("samples", "3"), ("seed", "5"), ("heads", "0"), ("corruption", "gauss")]:
        assert re.search(rf"<th>{name}</th><td[^>]*>{value}", table), name
    clean_only = plot_attention(tiny_model, TINY_PROMPT, layer=1, heads=[0])
    assert "corrupted" not in clean_only.layout.title.text
