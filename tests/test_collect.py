"""collect: activations of many prompts in batches equal each prompt's own run_with_cache."""

import pytest
import torch
from conftest import TINY_PROMPT

import lenscope
from lenscope.validation import InvalidInput, InvalidInputType

PROMPTS = [TINY_PROMPT, "The Colosseum is located in", "paris", "big ben is in the city of london"]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z", "blocks.2.attn.hook_pattern"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_collected_last_tokens_equal_each_prompts_cache(tiny_gated_model, batch_size):
    model = tiny_gated_model
    acts = lenscope.collect(model, PROMPTS, hooks=HOOKS, batch_size=batch_size, progress=False)
    assert len(acts) == 4 and list(acts) == HOOKS
    longest = int(acts.n_tokens.max())
    for i, prompt in enumerate(PROMPTS):
        _, cache = model.run_with_cache(model.to_tokens(prompt))
        n = int(acts.n_tokens[i])
        torch.testing.assert_close(acts["resid_post", 1][i], cache[HOOKS[0]][0, -1])
        torch.testing.assert_close(acts[HOOKS[1]][i], cache[HOOKS[1]][0, -1])
        pattern = acts["pattern", 2][i]  # [head, src], zero beyond the prompt
        assert pattern.shape == (4, longest)
        torch.testing.assert_close(pattern[:, :n], cache[HOOKS[2]][0, :, -1])
        assert not pattern[:, n:].any()
    assert acts.stack_activation("z").shape == (1, 4, 4, 8)
    assert acts.to_activation_cache(model)[HOOKS[0]].shape == (4, 32)


def test_collect_positions_and_filters(tiny_model):
    prompts = [TINY_PROMPT, "The Space Needle is located in the city of"]
    acts = lenscope.collect(
        tiny_model,
        prompts,
        hooks=lambda name: name.endswith("hook_resid_pre"),
        positions=[0, -1],
        progress=False,
    )
    assert len(acts.keys()) == 4 and acts["resid_pre", 3].shape == (2, 2, 32)
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(prompts[1]))
    torch.testing.assert_close(
        acts["resid_pre", 2][1], cache["blocks.2.hook_resid_pre"][0, [0, -1]]
    )
    named = lenscope.collect(
        tiny_model, prompts, hooks="blocks.2.hook_resid_pre", positions=[0, "last"], progress=False
    )
    torch.testing.assert_close(named["resid_pre", 2], acts["resid_pre", 2], atol=0, rtol=0)
    same = lenscope.collect(
        tiny_model, prompts, hooks="hook_embed", positions="all", progress=False
    )
    assert same["hook_embed"].shape == (2, 10, 32)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"prompts": "one prompt"}, InvalidInputType, r"prompts must be a non-empty list"),
        ({"hooks": []}, InvalidInput, r"hooks must name at least one hook point"),
        ({"hooks": ["blocks.9.hook_z"]}, InvalidInput, r"lacks the hook point\(s\)"),
        ({"positions": "all"}, InvalidInput, r"positions='all' needs prompts of one length"),
        ({"positions": [20]}, InvalidInput, r"positions \[20\] must lie inside every prompt"),
    ],
)
def test_bad_collect_options_name_the_rule(tiny_model, options, error, match):
    arguments = {"prompts": PROMPTS, "hooks": HOOKS[:1], **options}
    with pytest.raises(error, match=match):
        lenscope.collect(tiny_model, arguments.pop("prompts"), progress=False, **arguments)
    with pytest.raises(KeyError, match=r"was not collected"):
        lenscope.collect(tiny_model, PROMPTS, hooks=HOOKS[:1], progress=False)["mlp_out", 0]
