"""Tests of lenscope.datasets: buckets, aggregation, checkpoints, bad facts, reports.

Everything runs on the tiny 4-layer model of ``conftest.py`` with facts
built from its word vocabulary (the model is random, so "known" is defined
by its own top-1 where a test needs known facts).
"""

import json
import math
import re
import warnings

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import lenscope
import lenscope.cli as cli
import lenscope.datasets as ds
from lenscope.tokens import find_subject, prompt_tokens, token_labels
from lenscope.tracer import CausalTracer
from lenscope.validation import AnswerWarning

SAMPLES = 2
KINDS = ("resid_post", "mlp_out", "attn_out")
FACTS = [
    {
        "known_id": 10,
        "prompt": "The Eiffel Tower is located in the city of",
        "subject": "The Eiffel Tower",
        "attribute": "Paris",
    },
    {
        "known_id": 11,
        "prompt": "Paris is the capital of",
        "subject": "Paris",
        "attribute": "France",
    },
    {
        "known_id": 12,
        "prompt": "In the city of Big Ben and",
        "subject": "Big Ben",
        "attribute": "London",
    },
    {
        "known_id": 13,
        "prompt": "The Space Needle is located in",
        "subject": "The Space Needle",
        "attribute": "Seattle",
    },
    {
        "known_id": 14,
        "prompt": "The capital of France is Paris",
        "subject": "Paris",
        "attribute": "France",
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tracer(tiny_model):
    return CausalTracer(tiny_model, progress=False)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The uninterrupted run that resume tests compare against."""
    return ds.trace_dataset(CausalTracer(tiny_model, progress=False), FACTS, samples=SAMPLES)


def counting(monkeypatch, tracer, *, fail_after=None):
    """Wrap the per-job trace function: count the facts it traces (a pack counts each of its
    facts), optionally raise Ctrl-C once ``fail_after`` facts are done."""
    calls = []
    original = ds.run._trace_job

    def wrapped(tracer_, fact_id, fact, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.extend(fact_id if isinstance(fact_id, tuple) else [fact_id])
        return original(tracer_, fact_id, fact, **kwargs)

    monkeypatch.setattr(ds.run, "_trace_job", wrapped)
    return calls


def assert_same_aggregates(a, b):
    assert [f.fact_id for f in a.facts] == [f.fact_id for f in b.facts]
    assert a.ate() == b.ate() and a.clean_mean() == b.clean_mean()
    for kind in a.kinds:
        for stat in ("aie", "aie_ci"):
            x, y = getattr(a, stat)(kind), getattr(b, stat)(kind)
            assert torch.equal(torch.nan_to_num(x, nan=-9), torch.nan_to_num(y, nan=-9))


# ------------------------------------------------------------------ buckets


@pytest.mark.parametrize(
    ("prompt", "subject", "labels", "expected"),
    [
        (
            "The Eiffel Tower is located in the city of",
            "The Eiffel Tower",
            ("<bos>", "The", " Eiffel", " Tower", " is", " located", " in", " the", " city", " of"),
            {
                "first_subject": (1,),
                "middle_subject": (2,),
                "last_subject": (3,),
                "first_subsequent": (4,),
                "further": (5, 6, 7, 8),
                "last": (9,),
            },
        ),
        (  # one-token subject: it is the last subject token, not the first
            "Paris is the capital of",
            "Paris",
            ("<bos>", "Paris", " is", " the", " capital", " of"),
            {
                "first_subject": (),
                "middle_subject": (),
                "last_subject": (1,),
                "first_subsequent": (2,),
                "further": (3, 4),
                "last": (5,),
            },
        ),
        (  # words before the subject belong to no bucket; one token after it is the last
            "In the city of Big Ben and",
            "Big Ben",
            ("<bos>", "In", " the", " city", " of", " Big", " Ben", " and"),
            {
                "first_subject": (5,),
                "middle_subject": (),
                "last_subject": (6,),
                "first_subsequent": (),
                "further": (),
                "last": (7,),
            },
        ),
        (  # subject at the very end: the last token takes precedence
            "The capital of France is Paris",
            "Paris",
            ("<bos>", "The", " capital", " of", " France", " is", " Paris"),
            {
                "first_subject": (),
                "middle_subject": (),
                "last_subject": (),
                "first_subsequent": (),
                "further": (),
                "last": (6,),
            },
        ),
        (
            "The Space Needle is located in",
            "The Space Needle",
            ("<bos>", "The", " Space", " Needle", " is", " located", " in"),
            {
                "first_subject": (1,),
                "middle_subject": (2,),
                "last_subject": (3,),
                "first_subsequent": (4,),
                "further": (5,),
                "last": (6,),
            },
        ),
    ],
)
def test_buckets_on_hand_checked_tokenisations(tiny_model, prompt, subject, labels, expected):
    tokens = prompt_tokens(tiny_model, prompt)
    assert token_labels(tiny_model, tokens) == labels
    subject_range = find_subject(tiny_model, tokens, subject)
    assert ds.token_buckets(subject_range, len(labels)) == expected


def test_buckets_are_disjoint_and_cover_subject_onwards():
    for n_pos in range(1, 9):
        for start in range(n_pos):
            for end in range(start + 1, n_pos + 1):
                buckets = ds.token_buckets((start, end), n_pos)
                assert tuple(buckets) == ds.BUCKETS
                positions = [p for ps in buckets.values() for p in ps]
                assert sorted(positions) == list(range(start, n_pos))
                assert buckets["last"] == (n_pos - 1,)
                middle = buckets["middle_subject"]
                assert middle == (() if end - start < 3 else tuple(range(start + 1, end - 1)))


def test_buckets_reject_a_range_outside_the_prompt():
    with pytest.raises(ValueError, match=r"must satisfy 0 <= start < end <= n_pos=5, got \(3, 7\)"):
        ds.token_buckets((3, 7), 5)


def test_bucket_effects_average_over_bucket_tokens():
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    effects = ds.bucket_effects(scores, 1.0, (1, 4))
    assert effects.shape == (len(ds.BUCKETS), 2)
    further = effects[ds.BUCKETS.index("further"), 1].item()
    assert further == pytest.approx((15 + 16 + 17 + 18) / 4 - 1)
    single = ds.bucket_effects(scores, 0.0, (1, 2))
    assert torch.isnan(single[ds.BUCKETS.index("middle_subject")]).all()
    assert torch.isnan(single[ds.BUCKETS.index("first_subject")]).all()


# ------------------------------------------------------------------ aggregation


def test_aggregates_match_a_plain_computation(reference):
    summary = reference
    assert summary.n_facts == len(FACTS) and summary.n_skipped == 0
    n = summary.n_facts
    clean = [f.clean_score for f in summary.facts]
    corrupted = [f.corrupted_score for f in summary.facts]
    total = [c - k for c, k in zip(clean, corrupted, strict=True)]
    assert summary.clean_mean()[0] == pytest.approx(sum(clean) / n, rel=1e-12)
    assert summary.corrupted_mean()[0] == pytest.approx(sum(corrupted) / n, rel=1e-12)
    ate_mean = sum(total) / n
    ate_std = math.sqrt(sum((t - ate_mean) ** 2 for t in total) / (n - 1))
    assert summary.ate()[0] == pytest.approx(ate_mean, rel=1e-12)
    assert summary.ate()[1] == pytest.approx(1.96 * ate_std / math.sqrt(n), rel=1e-9)
    for kind in KINDS:
        aie, ci, counts = summary.aie(kind), summary.aie_ci(kind), summary.bucket_counts(kind)
        for b, bucket in enumerate(ds.BUCKETS):
            for layer in range(summary.n_layers):
                values = []
                for fact in summary.facts:
                    positions = ds.token_buckets(fact.subject_range, len(fact.tokens))[bucket]
                    if positions:
                        cells = [
                            float(fact.scores[kind][layer, p]) - fact.corrupted_score
                            for p in positions
                        ]
                        values.append(sum(cells) / len(cells))
                assert int(counts[b]) == len(values)
                if not values:
                    assert math.isnan(aie[b, layer])
                    continue
                mean = sum(values) / len(values)
                assert float(aie[b, layer]) == pytest.approx(mean, rel=1e-9, abs=1e-12)
                if len(values) < 2:
                    assert math.isnan(ci[b, layer])
                else:
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                    assert float(ci[b, layer]) == pytest.approx(
                        1.96 * std / math.sqrt(len(values)), rel=1e-9, abs=1e-12
                    )


def test_paired_difference_and_subset_match_a_plain_computation(reference):
    summary = reference
    for kind, bucket, other, layer in (
        ("mlp_out", "last_subject", "first_subject", 1),
        ("attn_out", "last", "last_subject", 3),
        ("resid_post", "last", "further", 0),
    ):
        values = []
        for fact in summary.facts:
            positions = ds.token_buckets(fact.subject_range, len(fact.tokens))
            if positions[bucket] and positions[other]:
                mean = {
                    b: sum(float(fact.scores[kind][layer, p]) for p in positions[b])
                    / len(positions[b])
                    for b in (bucket, other)
                }
                values.append(mean[bucket] - mean[other])
        got_mean, got_half, got_n = summary.difference(kind, bucket, other, layer)
        assert got_n == len(values) >= 2
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert got_mean == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert got_half == pytest.approx(1.96 * std / math.sqrt(len(values)), rel=1e-9)
    with pytest.raises(ValueError, match=r"other must be one of .* got 'lastt'"):
        summary.difference("mlp_out", "last", "lastt", 0)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 4\), got 4"):
        summary.difference("mlp_out", "last", "last_subject", 4)
    part = summary.subset({14, 11, 99})
    assert [f.fact_id for f in part.facts] == [11, 14]
    assert part.ate()[0] == pytest.approx(
        sum(f.clean_score - f.corrupted_score for f in part.facts) / 2, rel=1e-12
    )
    assert summary.n_facts == len(FACTS)  # the original is unchanged


def test_per_fact_scores_equal_a_single_trace(tracer, reference):
    fact = FACTS[0]
    sigma_std = tracer.noise_multiplier * tracer.sigma
    single = tracer.trace_kinds(
        fact["prompt"],
        fact["subject"],
        kinds=KINDS,
        samples=SAMPLES,
        noise=sigma_std,
        progress=False,
    )
    traced = reference.facts[0]
    start = traced.subject_range[0]
    for kind in KINDS:
        assert torch.allclose(traced.scores[kind][:, start:], single[kind].scores[:, start:])
        assert torch.isnan(traced.scores[kind][:, :start]).all()  # not traced: no bucket
    assert traced.answer_id == single["mlp_out"].answer_id  # clean top-1
    assert traced.clean_score == pytest.approx(single["mlp_out"].clean_score)


def test_mean_ci_skips_nan_and_needs_two_values():
    values = torch.tensor([[1.0, math.nan], [3.0, 5.0], [math.nan, math.nan]])
    mean, half, n = ds.mean_ci(values)
    assert mean[0] == 2.0 and mean[1] == 5.0
    assert half[0].item() == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2))
    assert math.isnan(half[1]) and n.tolist() == [2, 1]


def test_table_and_dataframe(reference):
    table = reference.table()
    assert list(table["kind"]) == list(KINDS)
    assert list(table.columns) == [
        "kind",
        "n_facts",
        "n_skipped",
        "clean",
        "corrupted",
        "ate",
        "ate_ci",
        "best_aie",
        "best_aie_ci",
        "best_layer",
        "best_bucket",
    ]
    for row in table.itertuples():
        value, layer, bucket = row.best_aie, row.best_layer, row.best_bucket
        aie = reference.aie(row.kind)
        assert value == float(aie[ds.BUCKETS.index(bucket), layer])
        assert value == pytest.approx(float(torch.nan_to_num(aie, nan=-1).max()))
    long = reference.to_dataframe()
    assert len(long) == len(KINDS) * len(ds.BUCKETS) * reference.n_layers
    assert set(long.columns) == {"kind", "bucket", "layer", "aie", "ci", "n_facts"}
    value, layer, bucket = reference.best("mlp_out", bucket="last_subject")
    assert bucket == "last_subject"
    assert value == float(reference.aie("mlp_out")[ds.BUCKETS.index("last_subject")].max())


def test_summary_save_load_round_trips(reference, tmp_path):
    path = reference.save(tmp_path / "summary.json")
    loaded = ds.DatasetSummary.load(path)
    assert loaded.settings() == reference.settings()
    assert_same_aggregates(loaded, reference)
    for a, b in zip(loaded.facts, reference.facts, strict=True):
        assert a.tokens == b.tokens and a.subject_range == b.subject_range
        for kind in KINDS:
            assert torch.equal(torch.nan_to_num(a.scores[kind]), torch.nan_to_num(b.scores[kind]))
    with pytest.raises(ValueError, match="expected a dict saved by DatasetSummary.to_dict"):
        ds.DatasetSummary.from_dict({"format": "something else"})


def test_dataset_facts_give_no_answer_warning(tracer):
    # The tiny model's clean top-1 after FACTS[0] is the filler ' of', which a
    # single trace warns about; a dataset takes the top-1 by design (ROME).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",))
    assert summary.facts[0].answer == " of"
    assert [w for w in caught if issubclass(w.category, AnswerWarning)] == []
    with pytest.warns(AnswerWarning, match="this trace of ' of' measures nothing meaningful"):
        tracer.trace(FACTS[0]["prompt"], FACTS[0]["subject"], samples=SAMPLES, layers=[0])


def test_empty_and_single_fact_summaries(tracer):
    empty = ds.trace_dataset(tracer, [], samples=SAMPLES, kinds=("mlp_out",))
    assert empty.n_facts == 0 and all(math.isnan(v) for v in empty.ate())
    assert empty.effects("mlp_out").shape == (0, len(ds.BUCKETS), empty.n_layers)
    assert empty.table()["best_layer"].tolist() == [-1]
    assert isinstance(empty.plot(), go.Figure)
    one = ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",))
    assert math.isfinite(one.ate()[0]) and math.isnan(one.ate()[1])  # no CI from one fact
    assert torch.isnan(one.aie_ci("mlp_out")).all()


def test_summary_rejects_unknown_kind(reference):
    with pytest.raises(ValueError, match=r"kind must be one of the traced kinds .*got 'resid_pre'"):
        reference.aie("resid_pre")


# ------------------------------------------------------------------ checkpoints


def test_resume_after_interruption_is_identical_and_recomputes_nothing(
    tracer, reference, tmp_path, monkeypatch
):
    path = tmp_path / "run.jsonl"
    counting(monkeypatch, tracer, fail_after=2)
    with pytest.raises(lenscope.TraceInterrupted) as caught:  # a KeyboardInterrupt
        ds.trace_dataset(tracer, FACTS, samples=SAMPLES, checkpoint=path)
    # The facts finished before Ctrl-C come back in the exception, as the reference has them.
    partial = caught.value.results
    assert (caught.value.finished, caught.value.total) == (2, len(FACTS))
    assert partial.n_pending == len(FACTS) - 2
    assert [f.fact_id for f in partial.facts] == [f.fact_id for f in reference.facts[:2]]
    for got, expected in zip(partial.facts, reference.facts, strict=False):
        for kind in partial.kinds:
            assert torch.equal(
                got.scores[kind].nan_to_num(-9), expected.scores[kind].nan_to_num(-9)
            )
    assert str(caught.value) == (
        f"interrupted after 2 of {len(FACTS)} facts ({len(FACTS) - 2} not traced); the summary "
        "of the finished ones is in this exception's .results (except lenscope.TraceInterrupted "
        f"as e: summary = e.results) and in the checkpoint {str(path)!r} (rerun with it to resume)"
    )
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # header + the two facts finished before Ctrl-C
    assert all(json.loads(line) for line in lines)
    assert json.loads(lines[0])["samples"] == SAMPLES

    monkeypatch.undo()
    calls = counting(monkeypatch, tracer)
    resumed = ds.trace_dataset(tracer, FACTS, samples=SAMPLES, checkpoint=path)
    assert len(calls) == len(FACTS) - 2
    assert_same_aggregates(resumed, reference)

    monkeypatch.undo()
    calls = counting(monkeypatch, tracer, fail_after=0)  # any trace would raise
    again = ds.trace_dataset(tracer, FACTS, samples=SAMPLES, checkpoint=path)
    assert_same_aggregates(again, reference)
    assert len(path.read_text().splitlines()) == 1 + len(FACTS)


def test_torn_final_line_is_dropped_and_recomputed(tracer, reference, tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    ds.trace_dataset(tracer, FACTS[:3], samples=SAMPLES, checkpoint=path)
    text = path.read_text()
    last = text.splitlines()[-1]
    path.write_text(text[: len(text) - len(last) - 1] + last[: len(last) // 2])  # torn write
    calls = counting(monkeypatch, tracer)
    resumed = ds.trace_dataset(tracer, FACTS, samples=SAMPLES, checkpoint=path)
    assert len(calls) == 3  # the torn fact and the two never started
    assert_same_aggregates(resumed, reference)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]] == [
        10,
        11,
        12,
        13,
        14,
    ]


def test_checkpoint_with_other_settings_is_refused(tracer, tmp_path):
    path = tmp_path / "run.jsonl"
    ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",), checkpoint=path)
    before = path.read_text()
    with pytest.raises(
        ValueError,
        match=r"was written with different settings.*samples: "
        r"checkpoint 2, this call 3.*pass the same settings",
    ):
        ds.trace_dataset(tracer, FACTS[:1], samples=3, kinds=("mlp_out",), checkpoint=path)
    with pytest.raises(ValueError, match=r"kinds: checkpoint \['mlp_out'\], this call \['attn_ou"):
        ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("attn_out",), checkpoint=path)
    with pytest.raises(ValueError, match=r"noise_std: checkpoint"):
        ds.trace_dataset(
            tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",), noise=0.5, checkpoint=path
        )
    assert path.read_text() == before  # a refused checkpoint is left untouched


def test_checkpoint_refuses_changed_fact_and_foreign_file(tracer, tmp_path):
    path = tmp_path / "run.jsonl"
    ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",), checkpoint=path)
    changed = [{**FACTS[0], "prompt": "The Eiffel Tower is located in"}]
    with pytest.raises(
        ValueError,
        match=r"holds fact 10 with prompt .* but the facts give "
        r"'The Eiffel Tower is located in'.*unique id",
    ):
        ds.trace_dataset(tracer, changed, samples=SAMPLES, kinds=("mlp_out",), checkpoint=path)
    foreign = tmp_path / "other.jsonl"
    foreign.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match=r"must start with a lenscope dataset header"):
        ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, checkpoint=foreign)
    corrupt = tmp_path / "corrupt.jsonl"
    lines = path.read_text().splitlines()
    corrupt.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"is corrupt: line 2 is not valid JSON"):
        ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",), checkpoint=corrupt)


def test_merged_checkpoints_equal_one_run(tracer, reference, tmp_path, monkeypatch):
    """A trace split over checkpoints (parts, sittings) averages as one run over all facts."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ds.trace_dataset(tracer, FACTS[:2], samples=SAMPLES, checkpoint=first)
    bad = {"known_id": 99, "prompt": "Paris is", "subject": "Rome"}
    ds.trace_dataset(tracer, [*FACTS[2:], bad], samples=SAMPLES, checkpoint=second)
    calls = counting(monkeypatch, tracer, fail_after=0)  # merging traces nothing
    merged = ds.merge_checkpoints([second, first], FACTS)
    assert calls == []
    assert_same_aggregates(merged, reference)

    def timeless(summary):
        return [{**fact, "seconds": 0} for fact in summary.to_dict()["facts"]]

    assert timeless(merged) == timeless(reference)
    assert merged.settings() == reference.settings()
    assert merged.corruption == reference.corruption and merged.n_pending == 0
    everything = ds.merge_checkpoints([first, second])  # file order, skipped facts kept
    assert [f.fact_id for f in everything.facts] == [10, 11, 12, 13, 14]
    assert [s.fact_id for s in everything.skipped] == [99]
    partial = ds.merge_checkpoints([first], FACTS)
    assert partial.n_facts == 2 and partial.n_pending == 3


def test_merge_refuses_parts_of_different_traces(tracer, tmp_path):
    paths = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c", "d")]
    ds.trace_dataset(tracer, FACTS[:1], samples=SAMPLES, kinds=("mlp_out",), checkpoint=paths[0])
    ds.trace_dataset(tracer, FACTS[1:2], samples=3, kinds=("mlp_out",), checkpoint=paths[1])
    with pytest.raises(ValueError, match=r"other settings.*samples: checkpoint 2, this call 3"):
        ds.merge_checkpoints(paths[:2])
    ds.trace_dataset(
        tracer, FACTS[1:2], kinds=("mlp_out",), method="attribution", checkpoint=paths[2]
    )
    with pytest.raises(ValueError, match=r"other settings.*method"):
        ds.merge_checkpoints([paths[0], paths[2]])
    renamed = [{**FACTS[1], "known_id": FACTS[0]["known_id"]}]
    ds.trace_dataset(tracer, renamed, samples=SAMPLES, kinds=("mlp_out",), checkpoint=paths[3])
    with pytest.raises(ValueError, match=r"fact 10 is in two checkpoints with different prompts"):
        ds.merge_checkpoints([paths[0], paths[3]])
    with pytest.raises(ValueError, match=r"the checkpoints hold fact 10 as .*pass the facts"):
        ds.merge_checkpoints([paths[3]], FACTS[:1])
    with pytest.raises(ValueError, match=r"does not exist"):
        ds.merge_checkpoints([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match=r"non-empty list of checkpoint files"):
        ds.merge_checkpoints([])
    with pytest.raises(ValueError, match=r"non-empty list of checkpoint files"):
        ds.merge_checkpoints(paths[0])


def test_time_budget_leaves_facts_pending(tracer, tmp_path, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 10))
    monkeypatch.setattr(ds.run.time, "perf_counter", lambda: next(clock))
    summary = ds.trace_dataset(tracer, FACTS, samples=SAMPLES, kinds=("mlp_out",), max_seconds=25)
    assert summary.n_facts + summary.n_pending == len(FACTS)
    assert 0 < summary.n_facts < len(FACTS)


# ------------------------------------------------------------------ bad facts, sources


def test_bad_facts_are_skipped_with_reasons(tracer):
    facts = [
        FACTS[1],
        {"known_id": 1, "subject": "Paris"},
        {"known_id": 2, "prompt": "Paris is the capital of"},
        {"known_id": 3, "prompt": "Paris is the capital of", "subject": "Rome"},
        {"known_id": 4, "prompt": "Paris is the capital of", "subject": "  "},
        "Paris is the capital of",
        {"known_id": 11, "prompt": "Rome is the capital of", "subject": "Rome"},
        {"known_id": 6, "prompt": "Rome is the capital of", "subject": "Rome"},
    ]
    summary = ds.trace_dataset(tracer, facts, samples=SAMPLES, kinds=("mlp_out",))
    assert [f.fact_id for f in summary.facts] == [11, 6]
    reasons = {s.fact_id: s.reason for s in summary.skipped}
    assert summary.n_skipped == 6
    assert reasons[1] == "missing field 'prompt' (a fact needs 'prompt', 'subject')"
    assert reasons[2] == "missing field 'subject' (a fact needs 'prompt', 'subject')"
    assert reasons[3] == "subject 'Rome' does not occur in the prompt 'Paris is the capital of'"
    assert reasons[4] == "field 'subject' must be non-empty text, got '  '"
    assert reasons[5].startswith("a fact must be a dict with prompt, subject, got str")
    assert [s.reason for s in summary.skipped if s.fact_id == 11] == [
        "duplicate id 11 (each fact id must be unique)"
    ]
    assert set(summary.skipped_dataframe().columns) == {"fact_id", "reason"}


def test_skipped_facts_are_checkpointed_and_not_retried(tracer, tmp_path):
    path = tmp_path / "run.jsonl"
    facts = [FACTS[1], {"known_id": 3, "prompt": "Paris is the capital of", "subject": "Rome"}]
    ds.trace_dataset(tracer, facts, samples=SAMPLES, kinds=("mlp_out",), checkpoint=path)
    statuses = [json.loads(line).get("status") for line in path.read_text().splitlines()[1:]]
    assert statuses == ["done", "skipped"]
    fixed = [FACTS[1], {"known_id": 3, "prompt": "Rome is the capital of", "subject": "Rome"}]
    summary = ds.trace_dataset(tracer, fixed, samples=SAMPLES, kinds=("mlp_out",), checkpoint=path)
    assert [f.fact_id for f in summary.facts] == [11, 3]  # a fixed fact is traced after all
    assert summary.n_skipped == 0


def test_fact_sources_agree(tracer, tmp_path):
    facts = FACTS[:2]
    as_json = tmp_path / "facts.json"
    as_json.write_text(json.dumps(facts))
    as_jsonl = tmp_path / "facts.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    sources = [facts, pd.DataFrame(facts), as_json, str(as_jsonl)]
    for source in sources:
        assert ds.load_facts(source) == facts
    frame = pd.DataFrame(
        [
            {"prompt": "Paris is the capital of", "subject": "Paris"},
            {"prompt": "Rome is the capital of"},
        ]
    )
    summary = ds.trace_dataset(tracer, frame, samples=SAMPLES, kinds=("mlp_out",))
    assert [f.fact_id for f in summary.facts] == [0]  # ids fall back to the row index
    reason = "missing field 'subject' (a fact needs 'prompt', 'subject')"
    assert summary.skipped == (ds.SkippedFact(1, reason),)


def test_fact_source_errors(tmp_path):
    with pytest.raises(
        TypeError,
        match=r"facts must be a list of dicts, a pandas DataFrame, or a "
        r"JSON/JSONL path, got dict",
    ):
        ds.load_facts({"prompt": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"line 2 of .*bad.jsonl' is not valid JSON"):
        ds.load_facts(bad)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match=r"must hold a JSON list of records, got a dict"):
        ds.load_facts(not_list)
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a .json"):
        ds.load_facts(tmp_path / "missing.json")


def test_settings_are_checked(tracer):
    with pytest.raises(ValueError, match=r"samples must be an integer >= 1, got 0; ROME uses 10"):
        ds.trace_dataset(tracer, FACTS, samples=0)
    with pytest.raises(ValueError, match=r"max_seconds must be a positive number of seconds"):
        ds.trace_dataset(tracer, FACTS, max_seconds=-1)
    with pytest.raises(ValueError, match=r"kind must be one of"):
        ds.trace_dataset(tracer, FACTS, kinds=("mlp",))
    with pytest.raises(ValueError, match=r"limit must be a positive integer, got 0; pass e.g."):
        ds.filter_known(tracer, FACTS, limit=0)


# ------------------------------------------------------------------ known facts


def test_known_facts_ship_with_the_package():
    facts = ds.known_facts()
    assert len(facts) == 1209
    assert set(facts[0]) == {
        "known_id",
        "subject",
        "attribute",
        "template",
        "prediction",
        "prompt",
        "relation_id",
    }
    facts[0]["subject"] = "changed"
    assert ds.known_facts()[0]["subject"] == "Vinson Massif"  # fresh copies


def test_long_answer_facts_are_the_scripts_output_and_well_formed():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "make_long_answers.py"
    spec = importlib.util.spec_from_file_location("make_long_answers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    facts = ds.long_answer_facts()
    assert facts == module.records() and len(facts) == 424
    assert [f["known_id"] for f in facts] == list(range(len(facts)))
    assert all(f["prompt"] == f["template"].format(f["subject"]) for f in facts)
    assert len({(f["prompt"], f["attribute"]) for f in facts}) == len(facts)  # no duplicates
    facts[0]["subject"] = "changed"
    assert ds.long_answer_facts()[0]["subject"] == "Argentina"  # fresh copies


@pytest.mark.parametrize(
    ("prediction", "attribute", "known"),
    [
        (" Paris", "Paris", True),
        ("Par", "Paris", True),
        (" paris", "Paris", False),
        (" ", "Paris", False),
        (" the", "Paris", False),
        (" Paris", " Paris Hilton", True),
    ],
)
def test_starts_attribute(prediction, attribute, known):
    assert ds.starts_attribute(prediction, attribute) is known


def test_filter_known_keeps_facts_whose_top1_starts_the_attribute(tracer, tiny_model):
    facts = []
    for i, fact in enumerate(FACTS):
        tokens = prompt_tokens(tiny_model, fact["prompt"])
        top = token_labels(tiny_model, [int(tiny_model(tokens[None])[0, -1].argmax())])[0]
        facts.append({**fact, "attribute": top.strip() + "ish" if i % 2 == 0 else "zzz"})
    facts.append({"known_id": 99, "prompt": "Paris is the capital of"})
    known, rejected = ds.filter_known(tracer, facts, batch_size=2, return_rejected=True)
    assert [f["known_id"] for f in known] == [10, 12, 14]
    assert all(ds.starts_attribute(f["top1_token"], f["attribute"]) for f in known)
    assert all(0 < f["top1_prob"] <= 1 for f in known)
    assert [r.fact_id for r in rejected] == [11, 13, 99]
    assert "does not start the attribute 'zzz'" in rejected[0].reason
    assert rejected[2].reason == "missing field 'attribute' (a fact needs 'prompt', 'attribute')"
    assert [f["known_id"] for f in ds.filter_known(tracer, facts, limit=2)] == [10, 12]


# ------------------------------------------------------------------ plots, report, CLI


def test_plots_and_report(reference, tmp_path):
    from lenscope.plotting.dataset import plot_dataset, save_dataset_report

    heat = reference.plot()
    assert isinstance(heat, go.Figure)
    assert [t.type for t in heat.data] == ["heatmap"] * len(KINDS)
    assert len(heat.data[0].z) == len(ds.BUCKETS) and len(heat.data[0].z[0]) == reference.n_layers
    lines = plot_dataset(reference, style="lines", kinds="mlp_out")
    assert {t.type for t in lines.data} == {"scatter"}
    with pytest.raises(ValueError, match=r"style must be one of 'heatmap', 'lines'; got 'bars'"):
        reference.plot(style="bars")
    # Under --jaxtyping-packages the annotation refuses it first, also with a TypeError.
    with pytest.raises(TypeError, match=r"DatasetSummary"):
        plot_dataset([])
    page = save_dataset_report(reference, tmp_path / "r" / "report.html").read_text()
    assert "best_bucket" in page and "Skipped facts (0)" in page and "Plotly" in page
    # The figures fill the page's width, which the report's plotly config follows.
    assert heat.layout.autosize is True and heat.layout.width is None
    assert lines.layout.width is None and reference.plot(width=900).layout.width == 900
    assert page.count('"responsive": true') == 2


def test_cli_writes_a_report(tiny_model, tmp_path, monkeypatch, capsys):
    import argparse

    loaded = []

    def factory(name, **kwargs):
        loaded.append((name, kwargs))
        return tiny_model

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(f) for f in FACTS[:2]))
    parser = cli.add_dataset_arguments(argparse.ArgumentParser(), model_arguments=True)
    args = parser.parse_args(
        [
            "--model",
            "tiny",
            "--facts",
            str(facts),
            "--no-filter",
            "--limit",
            "1",
            "--samples",
            "2",
            "--kinds",
            "mlp_out",
            "--out",
            str(tmp_path / "report.html"),
            "--summary",
            str(tmp_path / "summary.json"),
            "--quiet",
        ]
    )
    assert cli.run_dataset(args, factory) == 0
    # bridge=None: the installed TransformerLens' default class
    assert loaded == [("tiny", {"bridge": None, "device": None, "dtype": None})]
    assert (tmp_path / "report.html").exists()
    assert ds.DatasetSummary.load(tmp_path / "summary.json").n_facts == 1
    assert "mlp_out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


TINY_PROMPT = "The Eiffel Tower is located in the city of"
TINY_SUBJECT = "The Eiffel Tower"
PAIRABLE = [
    {"prompt": TINY_PROMPT, "subject": TINY_SUBJECT, "attribute": "Paris", "relation_id": "P131"},
    {
        "prompt": "The Space Needle is located in the city of",
        "subject": "The Space Needle",
        "attribute": "Seattle",
        "relation_id": "P131",
    },
    {
        "prompt": "Big Ben is located in the city of",
        "subject": "Big Ben",
        "attribute": "London",
        "relation_id": "P131",
    },
    {
        "prompt": "The Colosseum is located in the city of",
        "subject": "The Colosseum",
        "attribute": "Rome",
        "relation_id": "P131",
    },
    {
        "prompt": "Paris is the capital of",
        "subject": "Paris",
        "attribute": "France",
        "relation_id": "P1376",
    },
]


def test_pair_counterfactuals_pairs_subjects_of_the_same_relation_and_length(tiny_model):
    from lenscope import pair_counterfactuals

    pairs = pair_counterfactuals(tiny_model, PAIRABLE)
    assert pairs.n_facts == 5 and len(pairs.facts) == 4
    by_subject = {f["subject"]: f for f in pairs.facts}
    assert by_subject[TINY_SUBJECT]["counterfactual"] == (
        "The Space Needle is located in the city of"
    )
    assert by_subject["Big Ben"]["counterfactual"] == "The Colosseum is located in the city of"
    assert by_subject["Big Ben"]["counterfactual_attribute"] == "Rome"
    (unpaired,) = pairs.unpaired
    assert unpaired.fact_id == 4 and "no fact of relation 'P1376'" in unpaired.reason
    assert "4 of 5 facts paired" in repr(pairs)


def test_trace_dataset_with_a_counterfactual_column_equals_patching_each_fact(tiny_model, tmp_path):
    from lenscope import CausalTracer, CounterfactualColumn, pair_counterfactuals
    from lenscope.corruptions import CounterfactualPrompt

    tracer = CausalTracer(tiny_model, progress=False)
    facts = pair_counterfactuals(tiny_model, PAIRABLE).facts[:2]
    facts.append({**PAIRABLE[4], "counterfactual": "Rome is the capital city of"})
    column = CounterfactualColumn()
    # A tiny random model may answer a counterfactual as it answers the fact (' of'):
    # the default metric, a logit difference against the counterfactual's answer,
    # then has no foil, and the fact is skipped with the reason.
    summary = ds.trace_dataset(tracer, facts, kinds=("mlp_out",), windows=1, corruption=column)
    assert summary.metric == "normalized_logit_diff"
    assert len(summary.facts) + len(summary.skipped) == 3
    for skipped in summary.skipped:
        assert "answer itself" in skipped.reason or "as many tokens" in skipped.reason
    summary = ds.trace_dataset(
        tracer,
        facts,
        kinds=("mlp_out",),
        windows=1,
        corruption=column,
        metric="prob",
        checkpoint=tmp_path / "str.jsonl",
    )
    assert summary.corruption == {
        "name": "counterfactual_column",
        "counterfactual_column": "counterfactual",
    }
    merged = ds.merge_checkpoints([tmp_path / "str.jsonl"], facts)
    assert merged.to_dict() == {**summary.to_dict(), "workers": []}
    (skipped,) = summary.skipped
    assert "as many tokens as the clean prompt" in skipped.reason
    for fact, traced in zip(facts, summary.facts, strict=False):
        alone = tracer.trace(
            fact["prompt"],
            fact["subject"],
            kind="mlp_out",
            window=1,
            corruption=CounterfactualPrompt(fact["counterfactual"]),
            positions="from_subject",
            top_k=1,
            metric="prob",
        )
        torch.testing.assert_close(traced.scores["mlp_out"], alone.scores, equal_nan=True)


# ------------------------------------------------------------------ whole attributes as answers


def _greedy(model, tokens, n):
    """Plain greedy generation: one full forward per new token (the reference)."""
    ids = list(tokens.tolist())
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(tokens) :]


def _attribute_facts(model, n_tokens=3):
    """FACTS whose attribute is the tiny model's greedy continuation of ``n_tokens`` tokens."""
    tokenizer = model.tokenizer
    facts = []
    for fact in FACTS[:3]:
        generated = _greedy(model, prompt_tokens(model, fact["prompt"]), n_tokens)
        facts.append({**fact, "attribute": tokenizer.decode(generated).strip()})
    return facts


def test_filter_known_by_attribute_is_greedy_generation(tracer, tiny_model):
    facts = _attribute_facts(tiny_model)
    for fact in facts:  # the attribute round-trips through the tokenizer as the trace reads it
        assert len(lenscope.tokens.answer_tokens(tiny_model, " " + fact["attribute"])) == 3
    wrong_last = {**facts[1], "attribute": facts[1]["attribute"].rsplit(" ", 1)[0] + " zzz"}
    facts = [facts[0], wrong_last, facts[2], {"known_id": 99, "prompt": "x"}]
    known, rejected = ds.filter_known(
        tracer, facts, by="attribute", batch_size=2, return_rejected=True
    )
    assert [f["known_id"] for f in known] == [10, 12]
    for fact in known:  # the teacher-forced probability, recomputed with a plain forward
        prompt = prompt_tokens(tiny_model, fact["prompt"])
        answer = lenscope.tokens.answer_tokens(tiny_model, " " + fact["attribute"])
        ids = torch.cat([prompt, torch.tensor(answer)])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_model(ids[None])[0].double(), dim=-1)
        expected = sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(answer)).exp()
        assert fact["attribute_prob"] == pytest.approx(float(expected), rel=1e-5)
        assert fact["attribute_tokens"] == list(token_labels(tiny_model, answer))
    assert [r.fact_id for r in rejected] == [11, 99]
    assert re.search(r"but after \[.*\] the top-1 token is '.*', not '<unk>'$", rejected[0].reason)
    # The first-token test keeps the fact whose attribute goes wrong after its first token.
    assert [f["known_id"] for f in ds.filter_known(tracer, facts[:3])] == [10, 11, 12]
    with pytest.raises(ValueError, match=r"by must be one of .* got 'whole'; pass by='attribute'"):
        ds.filter_known(tracer, facts, by="whole")


def test_trace_dataset_scores_the_whole_attribute(tracer, tiny_model, tmp_path):
    facts = _attribute_facts(tiny_model) + [
        {"known_id": 98, "prompt": "Paris is", "subject": "Paris"}
    ]
    path = tmp_path / "attribute.jsonl"
    summary = ds.trace_dataset(tracer, facts, samples=SAMPLES, answers="attribute", checkpoint=path)
    assert summary.answers == "attribute" and len(summary.facts) == 3
    assert summary.skipped[0].reason.startswith("missing field 'attribute'")
    for fact, trace in zip(facts, summary.facts, strict=False):
        answer = lenscope.tokens.answer_tokens(tiny_model, " " + fact["attribute"])
        assert trace.answer_ids == answer and trace.answer_id == answer[0]
        # The clean score is the whole attribute's probability (plain teacher forcing).
        prompt = prompt_tokens(tiny_model, fact["prompt"])
        ids = torch.cat([prompt, torch.tensor(answer)])
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_model(ids[None])[0].double(), dim=-1)
        expected = sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(answer)).exp()
        assert trace.clean_score == pytest.approx(float(expected), rel=1e-5)
        # Every cell as a one-prompt trace of that answer gives it.
        one = tracer.trace_kinds(
            fact["prompt"],
            fact["subject"],
            tracer.settings(
                samples=SAMPLES, answer=" " + fact["attribute"], positions="from_subject"
            ),
            progress=False,
        )
        for kind in KINDS:
            torch.testing.assert_close(trace.scores[kind], one[kind].scores, equal_nan=True)
    again = ds.DatasetSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again.answers == "attribute" and again.facts[0].answer_ids == summary.facts[0].answer_ids
    # A checkpoint never mixes the two kinds of answer, either way round.
    with pytest.raises(
        ValueError, match=r"scored answers='attribute', so its facts cannot be mixed"
    ):
        ds.trace_dataset(tracer, facts, samples=SAMPLES, checkpoint=path)
    top1 = tmp_path / "top1.jsonl"
    ds.trace_dataset(tracer, facts[:1], samples=SAMPLES, checkpoint=top1)
    with pytest.raises(ValueError, match=r"scored answers='top1'.* pass answers='top1' to resume"):
        ds.trace_dataset(tracer, facts[:1], samples=SAMPLES, checkpoint=top1, answers="attribute")
    with pytest.raises(ValueError, match=r"answers must be one of .* got 'all'; pass 'attribute'"):
        ds.trace_dataset(tracer, facts, answers="all")
    with pytest.raises(ValueError, match=r"packed into one batch only .* answers 'attribute'"):
        ds.trace_dataset(tracer, facts, answers="attribute", prompts_per_batch=2)


def test_cli_answers_attribute_filters_and_scores_the_whole_attribute(tiny_model, tmp_path):
    import argparse

    facts = _attribute_facts(tiny_model, n_tokens=2)
    facts[1] = {**facts[1], "attribute": facts[1]["attribute"].split(" ")[0] + " zzz"}
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in facts))
    parser = cli.add_dataset_arguments(argparse.ArgumentParser(), model_arguments=True)
    common = ["--model", "tiny", "--facts", str(path), "--samples", "2", "--kinds", "mlp_out"]
    args = parser.parse_args(
        [*common, "--answers", "attribute", "--summary", str(tmp_path / "s.json"), "--quiet"]
        + ["--out", str(tmp_path / "r.html"), "--checkpoint", str(tmp_path / "c.jsonl")]
    )
    assert cli.run_dataset(args, lambda name, **kwargs: tiny_model) == 0
    summary = ds.DatasetSummary.load(tmp_path / "s.json")
    assert summary.answers == "attribute"
    assert [f.fact_id for f in summary.facts] == [10, 12]  # 11's second token is not greedy
    assert all(len(f.answer_ids) == 2 for f in summary.facts)
    args = parser.parse_args([*common, "--checkpoint", str(tmp_path / "c.jsonl"), "--quiet"])
    with pytest.raises(ValueError, match="answers"):  # the top-1 run refuses the checkpoint
        cli.run_dataset(args, lambda name, **kwargs: tiny_model)


# ------------------------------------------------------------------ plateaus and shares of the ATE


def _summary_from(effects, totals):
    """A DatasetSummary whose per-fact last-subject MLP effects and totals are given (lists)."""
    n_layers = len(effects[0])
    facts = []
    for i, (row, total) in enumerate(zip(effects, totals, strict=True)):
        # tokens: BOS, subject (1 token), one more, last; the subject is the last_subject bucket
        scores = torch.full((n_layers, 4), 0.0)
        scores[:, 1] = torch.tensor(row, dtype=torch.float32) + 0.125
        facts.append(
            ds.FactTrace(
                fact_id=i,
                prompt="p",
                subject="s",
                tokens=("<bos>", " s", " x", " y"),
                subject_range=(1, 2),
                answer=" a",
                answer_id=0,
                clean_score=0.125 + total,
                corrupted_score=0.125,
                scores={"mlp_out": scores},
            )
        )
    return ds.DatasetSummary(
        facts=tuple(facts),
        skipped=(),
        kinds=("mlp_out",),
        windows={"mlp_out": 1},
        n_layers=n_layers,
        model_name="m",
        corruption={"name": "gaussian_noise"},
        metric="prob",
        lenscope_version="0",
    )


def test_plateau_compares_every_layer_with_the_peak_paired_over_facts():
    # Layer 2 peaks; layer 1 is within noise of it, layer 3 clearly lower, layer 0 lower.
    effects = [
        [0.00, 0.30, 0.33, 0.10],
        [0.02, 0.36, 0.34, 0.12],
        [0.01, 0.25, 0.30, 0.08],
        [0.00, 0.33, 0.31, 0.11],
    ]
    summary = _summary_from(effects, [0.5, 0.6, 0.4, 0.5])
    found = summary.plateau("mlp_out", "last_subject")
    column = list(zip(*effects, strict=True))
    means = [sum(c) / len(c) for c in column]
    assert found.layer == max(range(4), key=means.__getitem__) == 2
    for other in (0, 1, 3):
        diffs = [a - b for a, b in zip(column[2], column[other], strict=True)]
        mean = sum(diffs) / 4
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
        assert found.differences[other][0] == pytest.approx(mean, abs=1e-6)
        assert found.differences[other][1] == pytest.approx(1.96 * std / 2, abs=1e-6)
    # 2 - 1 = (0.03, -0.02, 0.05, -0.02): its CI contains zero; 2 - 3 and 2 - 0 do not.
    assert found.layers == (1, 2) and found.is_plateau and found.tied == (1,)
    assert found.describe() == "a plateau over layers 1-2 (peak 2)"
    # A layer tied with the peak but not next to it is named apart from the run.
    gap = [[0.30, 0.10, 0.27, 0.0], [0.36, 0.12, 0.37, 0.0], [0.25, 0.08, 0.22, 0.0]]
    gap = _summary_from([*gap, [0.33, 0.11, 0.34, 0.0]], [0.5, 0.6, 0.4, 0.5])
    found = gap.plateau("mlp_out", "last_subject")
    assert (found.layer, found.layers, found.tied) == (0, (0,), (2,))
    assert found.describe() == "layer 0 (layer 2 within the CI)"
    assert summary.plateau("mlp_out", "last_subject", layer=3).layers == (3,)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 4\), got 7"):
        summary.plateau("mlp_out", "last_subject", layer=7)


def test_share_of_ate_is_the_ratio_of_means_with_a_delta_method_ci():
    effects = [[0.1, 0.2], [0.3, 0.1], [0.2, 0.25], [0.15, 0.05], [0.4, 0.3]]
    totals = [0.5, 0.8, 0.45, 0.3, 0.9]
    summary = _summary_from(effects, totals)
    share, half, n = summary.share_of_ate("mlp_out", "last_subject", 0)
    e = [row[0] for row in effects]
    ratio = (sum(e) / 5) / (sum(totals) / 5)
    residual = [x - ratio * t for x, t in zip(e, totals, strict=True)]
    mean = sum(residual) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in residual) / 4)
    assert n == 5
    assert share == pytest.approx(ratio, rel=1e-6)
    assert half == pytest.approx(1.96 * std / (math.sqrt(5) * sum(totals) / 5), rel=1e-5)
