"""Several facts per forward pass: packed traces equal one-at-a-time traces.

``trace_dataset(prompts_per_batch=K)`` binds each fact as a single trace
does, packs facts of one token length (:func:`lenscope.corruptions.pack_inputs`)
and runs every kind as one engine sweep over all of them. The reference is
:meth:`CausalTracer.trace_kinds` on each fact alone (itself checked against
plain loops in test_engine), for every kind and window, both strategies,
mixed prompt lengths, and both model classes.
"""

import json

import pytest
import torch
from conftest import make_tiny_bridge

import lenscope.datasets as ds
from lenscope import engine
from lenscope.corruptions import GaussianNoise, pack_inputs
from lenscope.tokens import find_subject, prompt_tokens
from lenscope.tracer import CausalTracer
from lenscope.validation import InvalidInput

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = 3
# Token lengths (BOS included) 9, 9, 9, 7, 7, 10: packs of three and two facts
# and a fact alone; subjects start at different positions.
FACTS = [
    {
        "known_id": 1,
        "prompt": "The Space Needle is located in the city",
        "subject": "The Space Needle",
    },
    {"known_id": 2, "prompt": "In the city of Big Ben and the", "subject": "Big Ben"},
    {"known_id": 3, "prompt": "Paris is the capital of the country and", "subject": "Paris"},
    {"known_id": 4, "prompt": "The capital of France is Paris", "subject": "France"},
    {"known_id": 5, "prompt": "The Space Needle is located in", "subject": "Space Needle"},
    {
        "known_id": 6,
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "The Eiffel Tower",
    },
]
KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")


def _one_at_a_time(tracer, facts, windows):
    """Each fact traced alone with trace_kinds, NaN before its subject (as datasets record it)."""
    out = []
    for fact in facts:
        results = tracer.trace_kinds(
            fact["prompt"],
            fact["subject"],
            kinds=KINDS,
            windows=windows,
            samples=SAMPLES,
            noise=tracer.noise_multiplier * tracer.sigma,
            progress=False,
        )
        start = results[KINDS[0]].subject_range[0]
        grids = {}
        for kind, result in results.items():
            grid = result.scores.clone()
            grid[:, :start] = float("nan")
            grids[kind] = grid
        out.append((results[KINDS[0]], grids))
    return out


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_packed_dataset_equals_one_fact_at_a_time(tiny_model, strategy, window):
    tracer = CausalTracer(tiny_model, strategy=strategy, progress=False)
    packed = ds.trace_dataset(
        tracer, FACTS, kinds=KINDS, windows=window, samples=SAMPLES, prompts_per_batch=4
    )
    assert packed.n_facts == len(FACTS)
    for traced, (single, grids) in zip(
        packed.facts, _one_at_a_time(tracer, FACTS, window), strict=True
    ):
        assert traced.answer_id == single.answer_id
        assert traced.clean_score == pytest.approx(single.clean_score, abs=1e-6)
        assert traced.corrupted_score == pytest.approx(single.corrupted_score, abs=1e-6)
        for kind in KINDS:
            torch.testing.assert_close(
                traced.scores[kind], grids[kind], atol=1e-5, rtol=0, equal_nan=True
            )


def test_packed_dataset_equals_one_at_a_time_on_bridges_and_gqa(tiny_tokenizer, tiny_gated_model):
    for model in (make_tiny_bridge(tiny_tokenizer), tiny_gated_model):
        tracer = CausalTracer(model, progress=False)
        packed = ds.trace_dataset(
            tracer, FACTS[:3], kinds=KINDS, windows=2, samples=SAMPLES, prompts_per_batch=3
        )
        for traced, (single, grids) in zip(
            packed.facts, _one_at_a_time(tracer, FACTS[:3], 2), strict=True
        ):
            assert traced.answer_id == single.answer_id
            for kind in KINDS:
                torch.testing.assert_close(
                    traced.scores[kind], grids[kind], atol=1e-5, rtol=0, equal_nan=True
                )


def test_facts_of_one_length_share_forward_passes(tiny_model, monkeypatch):
    """Three 9-token facts: one sweep per kind over all three, not three."""
    tracer = CausalTracer(tiny_model, progress=False)
    calls = []
    original = engine.sweep
    monkeypatch.setattr(
        engine, "sweep", lambda *a, **k: calls.append(k["base"].prompts) or original(*a, **k)
    )
    ds.trace_dataset(tracer, FACTS[:3], kinds=("mlp_out",), samples=SAMPLES, prompts_per_batch=8)
    assert calls == [3]
    calls.clear()
    ds.trace_dataset(tracer, FACTS[:3], kinds=("mlp_out",), samples=SAMPLES, prompts_per_batch=2)
    assert sorted(calls) == [1, 2]


def test_a_bad_fact_in_a_pack_is_skipped_and_the_rest_traced(tiny_model):
    tracer = CausalTracer(tiny_model, progress=False)
    facts = [dict(FACTS[0]), {**FACTS[1], "subject": "Tower"}, dict(FACTS[2])]
    for size in (2, 3):  # with 2, the first pack is left with one fact to trace
        summary = ds.trace_dataset(
            tracer, facts, kinds=("resid_post",), samples=SAMPLES, prompts_per_batch=size
        )
        assert [f.fact_id for f in summary.facts] == [1, 3]
        assert [s.fact_id for s in summary.skipped] == [2]
        assert "does not occur" in summary.skipped[0].reason


def test_packed_checkpoint_resumes_one_fact_at_a_time(tiny_model, tmp_path):
    tracer = CausalTracer(tiny_model, progress=False)
    path = tmp_path / "run.jsonl"
    first = ds.trace_dataset(
        tracer, FACTS[:4], kinds=("mlp_out",), samples=SAMPLES, checkpoint=path, prompts_per_batch=4
    )
    assert first.workers[0].n_facts == 4
    again = ds.trace_dataset(
        tracer, FACTS, kinds=("mlp_out",), samples=SAMPLES, checkpoint=path, prompts_per_batch=1
    )
    assert [f.fact_id for f in again.facts] == [f["known_id"] for f in FACTS]
    assert again.workers[0].n_facts == 2  # only the two facts not in the checkpoint


def test_prompts_per_batch_is_checked(tiny_model):
    tracer = CausalTracer(tiny_model, progress=False)
    with pytest.raises(InvalidInput, match=r"prompts_per_batch must be an integer >= 1, got 0"):
        ds.trace_dataset(tracer, FACTS, samples=SAMPLES, prompts_per_batch=0)
    with pytest.raises(
        InvalidInput, match=r"scoring prob or log_prob.*'logit_diff'.*prompts_per_batch=1"
    ):
        ds.trace_dataset(tracer, FACTS, samples=SAMPLES, metric="logit_diff", prompts_per_batch=2)


def test_pack_inputs_keeps_each_prompts_rows_and_hooks(tiny_model):
    """The packed hook gives each prompt's rows exactly what its own hook gives, in any copies."""
    corruption = GaussianNoise(samples=2, noise=0.5, seed=1)
    bound = []
    for fact in FACTS[:3]:
        tokens = prompt_tokens(tiny_model, fact["prompt"])
        bound.append(
            corruption.bind(tiny_model, tokens, find_subject(tiny_model, tokens, fact["subject"]))
        )
    packed = pack_inputs(bound)
    assert (packed.prompts, packed.samples, packed.rows) == (3, 2, 6)
    assert packed.first_changed == min(b.first_changed for b in bound)
    ((name, hook),) = packed.fwd_hooks
    embed = torch.randn(2 * 6, 8, tiny_model.cfg.d_model)
    out = hook(embed.clone(), None).reshape(2, 3, 2, 8, -1)
    for k, b in enumerate(bound):
        alone = dict(b.fwd_hooks)[name](
            embed.reshape(2, 3, 2, 8, -1)[:, k].reshape(4, 8, -1).clone(), None
        )
        torch.testing.assert_close(out[:, k].reshape(4, 8, -1), alone, atol=0, rtol=0)
    with pytest.raises(InvalidInput, match=r"equal token length"):
        tokens = prompt_tokens(tiny_model, FACTS[3]["prompt"])
        pack_inputs([bound[0], corruption.bind(tiny_model, tokens, (1, 2))])


def test_cli_prompts_per_batch_reaches_trace_dataset(tiny_model, tmp_path, monkeypatch):
    import argparse

    import lenscope.cli as cli

    seen = []
    original = ds.run._trace_job

    def recording(tracer, fact_id, fact, **kwargs):
        seen.append(fact_id)
        return original(tracer, fact_id, fact, **kwargs)

    monkeypatch.setattr(ds.run, "_trace_job", recording)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(f) for f in FACTS[:3]))
    parser = cli.add_dataset_arguments(argparse.ArgumentParser(), model_arguments=True)
    common = ["--model", "tiny", "--facts", str(facts), "--no-filter", "--samples", "2"]
    common += ["--kinds", "mlp_out", "--out", str(tmp_path / "r.html"), "--quiet"]
    for flag, expected in (
        (["--prompts-per-batch", "3"], [(1, 2, 3)]),
        (["--prompts-per-batch", "1"], [1, 2, 3]),
    ):
        seen.clear()
        args = parser.parse_args([*common, *flag])
        assert cli.run_dataset(args, lambda name, **kw: tiny_model) == 0
        assert seen == expected
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--prompts-per-batch", "0"])


def test_packing_is_the_default_on_cuda_only(tiny_model, monkeypatch):
    """A CPU trace is bound by arithmetic (packing measured no faster); a GPU's by launches."""
    tracer = CausalTracer(tiny_model, progress=False)
    settings = ds.run.dataset_settings(tracer, samples=SAMPLES)
    assert ds.run._pack_size(tracer, settings, None, "exact") == 1
    assert ds.run._pack_size(tracer, settings, 5, "exact") == 5
    monkeypatch.setattr(tiny_model.cfg, "device", "cuda:0")  # only read here, never used
    assert ds.run._pack_size(tracer, settings, None, "exact") == ds.run.PROMPTS_PER_BATCH
    assert ds.run._pack_size(tracer, settings, None, "attribution") == 1
