"""Result objects (lenscope.results): short reprs, strict JSON, and damaged files."""

import dataclasses
import html
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope.datasets import DatasetSummary
from lenscope.datasets.facts import SkippedFact
from lenscope.lens import LensTrajectory, lens_trajectory
from lenscope.validation import InvalidInput


@pytest.fixture(scope="module")
def partial_trace(tiny_model):
    """A trace of layer 1 only: every other row of ``scores`` is NaN."""
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    return tracer.trace(TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", samples=2, layers=[1])


@pytest.fixture(scope="module")
def summary():
    return DatasetSummary(
        facts=(),
        skipped=(SkippedFact(fact_id=3, reason="no <subject> given"),),
        kinds=("mlp_out",),
        windows={"mlp_out": 2},
        n_layers=4,
        model_name="tiny <model>",
        corruption={"name": "gaussian_noise", "samples": 2, "noise_std": 0.5, "seed": 0},
        metric="prob",
        lenscope_version=lenscope.__version__,
    )


# ------------------------------------------------------------------- display


def test_trace_repr_is_one_short_line(partial_trace):
    r = partial_trace
    text = repr(r)
    assert len(text) < 400 and "\n" not in text
    assert text.startswith("TraceResult(model='tiny-")
    assert f"answer={r.answer!r}" in text and "kind='mlp_out'" in text
    layer, pos, score = r.peak()
    assert layer == 1  # the only traced row
    assert f"peak={score:.3g} at layer 1, pos {pos} {r.tokens[pos]!r}" in text
    assert f"clean={r.clean_score:.3g} corrupted={r.corrupted_score:.3g}" in text
    long = dataclasses.replace(r, prompt="word " * 200)
    assert len(repr(long)) < 400 and "…" in repr(long)


def test_trace_html_is_an_escaped_table(partial_trace):
    page = dataclasses.replace(partial_trace, prompt="a <b>bold</b> prompt")._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") >= 8
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert html.escape(repr(partial_trace.answer)) in page
    assert "blocks.0.hook_mlp_out ... blocks.3.hook_mlp_out" in page


def test_summary_repr_and_html(summary):
    text = repr(summary)
    assert text == (
        "DatasetSummary(model='tiny <model>', 0 facts, 1 skipped, kinds=('mlp_out',), "
        "corruption='gaussian noise (2 samples, std 0.5, seed 0)', metric='prob')"
    )
    page = summary._repr_html_()
    assert "<table" in page and "tiny &lt;model&gt;" in page and "<model>" not in page
    assert "best_aie" in page


# --------------------------------------------------------------- strict JSON


def test_save_writes_strict_json_with_nulls_and_round_trips(partial_trace, tmp_path):
    r = partial_trace
    assert r.scores.isnan().any() and not r.scores[1].isnan().all()
    path = r.save(tmp_path / "trace.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(text, parse_constant=refuse)
    assert data["scores"][0] == [None] * r.n_pos
    assert all(isinstance(v, float) and math.isfinite(v) for v in data["scores"][1])
    back = lenscope.TraceResult.load(path)
    assert torch.equal(back.scores.isnan(), r.scores.isnan())
    assert torch.equal(back.scores.nan_to_num(-7.0), r.scores.nan_to_num(-7.0))
    assert torch.equal(back.top_ids, r.top_ids)
    assert torch.equal(back.top_probs.isnan(), r.top_probs.isnan())
    assert torch.equal(back.top_probs.nan_to_num(-7.0), r.top_probs.nan_to_num(-7.0))
    assert back.clean_score == r.clean_score and back.corrupted_score == r.corrupted_score


# ------------------------------------------------------------- damaged files


def _damaged(tmp_path, partial_trace, case):
    path = tmp_path / f"{case}.json"
    if case == "truncated":
        text = partial_trace.save(path).read_text()
        path.write_text(text[: len(text) // 2])
    elif case == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "list":
        path.write_text("[1, 2, 3]")
    elif case == "null":
        path.write_text("null")
    elif case == "format_only":
        path.write_text(json.dumps({"format": "lenscope.TraceResult/1"}))
    elif case == "no_format":
        path.write_text(json.dumps({"scores": []}))
    elif case == "bad_field":
        path.write_text(json.dumps({**partial_trace.to_dict(), "scores": "high"}))
    elif case == "lens":
        path.write_text(json.dumps({"format": "lenscope.LensTrajectory/1"}))
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", r"is not valid JSON \(.*\); the file is damaged or truncated: save the"),
        ("garbage", r"is not valid JSON \(.*\); the file is damaged or truncated: save the"),
        ("list", r"got a JSON array; it was not written by lenscope: pass what TraceResult"),
        ("null", r"got a JSON null; it was not written by lenscope: pass what TraceResult"),
        (
            "format_only",
            r"a TraceResult record needs the fields \['scores', .*\] \.\.\., which this one "
            r"lacks; it is damaged or was not written by lenscope: save the result again",
        ),
        ("no_format", r"got a dict without a 'format' field; it is damaged or was not written"),
        (
            "bad_field",
            r"TraceResult\.save, but a field has the wrong type or shape \(TypeError: .*\); the "
            r"file is damaged: save the result again$",
        ),
        ("lens", r"got format 'lenscope.LensTrajectory/1'; load it with LensTrajectory.load$"),
    ],
)
def test_loading_a_damaged_trace_names_the_file_and_the_fix(tmp_path, partial_trace, case, match):
    path = _damaged(tmp_path, partial_trace, case)
    with pytest.raises(InvalidInput) as caught:
        lenscope.TraceResult.load(path)
    message = str(caught.value)
    assert message.startswith(f"{str(path)!r} must hold a TraceResult saved by TraceResult.save")
    assert re.search(match, message), message


def test_loading_a_missing_trace_names_the_file(tmp_path):
    rule = "' does not exist or is not a file; pass the path of a "
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match=f"'{re.escape(str(path))}{rule}TraceResult saved"):
        lenscope.TraceResult.load(path)
    # A directory is not a file either.
    with pytest.raises(FileNotFoundError, match=f"'{re.escape(str(tmp_path))}{rule}DatasetSummary"):
        DatasetSummary.load(tmp_path)


def test_loading_truncated_summary_and_trajectory(tmp_path, summary, tiny_model):
    trajectory = lens_trajectory(tiny_model, TINY_PROMPT, top_k=2)
    for result, cls in ((summary, DatasetSummary), (trajectory, LensTrajectory)):
        path = tmp_path / f"{cls.__name__}.json"
        text = result.save(path).read_text()
        path.write_text(text[: len(text) - 10])
        match = (
            rf"^'{re.escape(str(path))}' must hold a {cls.__name__} saved by "
            rf"{cls.__name__}\.save, but it is not valid JSON .*: save the result again$"
        )
        with pytest.raises(InvalidInput, match=match):
            cls.load(path)
        path.write_text("[]")
        with pytest.raises(InvalidInput, match=r"got a JSON array; it was not written by"):
            cls.load(path)


# ---------------------------------------------------------------- named axes

NOISE = {"name": "gaussian_noise", "samples": 3, "noise_std": 0.25, "seed": 4}
ABLATION = {"name": "zero_ablation", "site": "mlp_out", "layers": [1, 2], "statistic": "zero"}
AXIS_TOKENS = ("<bos>", "The", " Eiffel", " Tower", " is")


def _grid(axes, shape, *, corruption=NOISE, units=None, seed=0, k=5):
    """A synthetic TraceResult over ``axes``: random scores, one untraced cell, random top-k."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=gen)
    scores[(0,) * len(shape)] = math.nan
    return lenscope.TraceResult(
        scores=scores,
        clean_score=0.9,
        corrupted_score=0.1,
        tokens=AXIS_TOKENS,
        token_ids=torch.arange(len(AXIS_TOKENS)),
        subject_range=(1, 4),
        answer=" Paris",
        answer_id=9,
        kind="mlp_post",
        hook_names=tuple(f"blocks.{i}.mlp.hook_post" for i in range(shape[0])),
        window=1,
        model_name="tiny",
        metric="prob",
        top_ids=torch.randint(0, 4, (*shape, k), generator=gen),
        top_probs=torch.rand((*shape, k), generator=gen),
        clean_top_ids=torch.tensor([9] * k),
        clean_top_probs=torch.full((k,), 0.5),
        corrupted_top_ids=torch.tensor([0] * k),
        corrupted_top_probs=torch.full((k,), 0.5),
        vocab={0: " a", 1: " b", 2: " c", 3: " d", 9: " Paris"},
        corruption=dict(corruption),
        prompt="The Eiffel Tower is",
        axes=axes,
        units=units or {},
    )


def _plain_cells(scores):
    """Every traced cell as ``(*index, score)``, by a plain loop over the nested lists."""
    cells = []

    def walk(value, index):
        if isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*index, i))
        elif not math.isnan(value):
            cells.append((*index, value))

    walk(scores.tolist(), ())
    return cells


@pytest.mark.parametrize(
    ("axes", "shape"),
    [
        (("layer", "neuron"), (3, 7)),
        (("layer", "neuron", "pos"), (3, 4, 5)),
        (("layer", "expert", "neuron"), (2, 3, 4)),
    ],
)
def test_an_axis_lenscope_never_heard_of_is_a_plain_unit_index(axes, shape, tmp_path):
    r = _grid(axes, shape)
    cells = sorted(_plain_cells(r.scores), key=lambda c: -c[-1])
    assert r.peak() == cells[0]
    assert r.top_units(4) == cells[:4] and r.top_heads(4) == cells[:4]
    assert len(r.top_units(10_000)) == math.prod(shape) - 1  # the NaN cell never listed
    frame = r.to_dataframe()
    assert list(frame.columns[1 : 1 + len(axes)]) == list(axes)
    assert len(frame) == math.prod(shape)
    assert ("token" in frame.columns) == ("pos" in axes)
    for row in frame.sample(5, random_state=0).itertuples():
        index = tuple(getattr(row, a) for a in axes)
        assert row.score == float(r.scores[index]) or math.isnan(row.score)
        assert row.top1 == r.vocab[int(r.top_ids[index][0])]
        if "pos" in axes:
            assert row.token == AXIS_TOKENS[row.pos]
    *best, _ = r.peak()
    named = dict(zip(axes, best, strict=True))
    expected = [
        (r.vocab[int(i)], float(p))
        for i, p in zip(r.top_ids[tuple(best)], r.top_probs[tuple(best)], strict=True)
    ]
    assert r.top_predictions(*best) == r.top_predictions(**named) == expected
    assert r.window_layers(1) == (1, 2)
    assert f"axes={axes}" in repr(r) and f"{axes[1]} {best[1]}" in repr(r)
    assert all(a in r._repr_html_() for a in axes)
    back = lenscope.TraceResult.load(r.save(tmp_path / "r.json"))
    assert back.axes == axes and back.to_dict() == r.to_dict()
    assert torch.equal(back.scores.nan_to_num(-1.0), r.scores.nan_to_num(-1.0))


def test_an_unknown_axis_plots_as_a_layer_by_unit_grid():
    from lenscope.plotting._common import format_percent

    r = _grid(("layer", "neuron"), (3, 7))
    fig = r.plot()
    assert len(fig.data) == 1 and fig.layout.xaxis.title.text == "neuron"
    z = fig.data[0].z
    for layer in range(3):
        for neuron in range(7):
            value = float(r.scores[layer, neuron])
            assert (z[layer][neuron] is None) if math.isnan(value) else z[layer][neuron] == value
    cell = fig.data[0].customdata[2][5]  # layer 2, neuron 5
    assert (cell[0], cell[1]) == ("2", "5")
    lines = [text for text in cell[5:] if text]  # the top-k rows after the header
    expected = r.top_predictions(2, 5)
    assert len(lines) == len(expected)
    for line, (word, prob) in zip(lines, expected, strict=True):
        assert html.escape(word.strip()) in line and format_percent(prob) in line
    assert "One neuron of hook_post" in fig.layout.title.text
    assert "std 0.25" in fig.layout.title.text and "3 samples" in fig.layout.title.text
    with_pos = _grid(("layer", "neuron", "pos"), (3, 4, 5), k=3)  # k != n_pos
    fig = with_pos.plot(top_k=3)
    # One grid per position (pos 0 is traced too), a slider; the last position shown.
    assert len(fig.data) == 5 and fig.layout.sliders[0].active == 4 and fig.data[4].visible
    assert fig.data[2].z[1][3] == float(with_pos.scores[1, 3, 2])
    cell = fig.data[2].customdata[1][3]  # pos 2, layer 1, neuron 3
    assert list(cell[:2]) == ["1", "3"] and cell[2].startswith("2 ") and "Eiffel" in cell[2]
    lines = [text for text in cell[6:] if text]
    expected = with_pos.top_predictions(layer=1, neuron=3, pos=2)
    assert len(lines) == len(expected) == 3
    for line, (word, prob) in zip(lines, expected, strict=True):
        assert html.escape(word.strip()) in line and format_percent(prob) in line
    flat = _grid(("layer", "expert", "neuron"), (2, 3, 4))
    fig = flat.plot()
    assert fig.layout.xaxis.title.text == "expert, neuron"
    assert fig.data[0].z[1][2 * 4 + 3] == float(flat.scores[1, 2, 3])
    assert list(fig.data[0].customdata[1][2 * 4 + 3][:3]) == ["1", "2", "3"]


def test_plots_refuse_axes_they_do_not_draw():
    from lenscope.plotting import plot_head_trace, plot_trace, plot_unit_trace

    neurons = _grid(("layer", "neuron"), (3, 7))
    with pytest.raises(InvalidInput, match=r"plot_trace and plot_traces draw \(layer, pos\)"):
        plot_trace(neurons)
    with pytest.raises(InvalidInput, match=r"plot_head_trace draws traces with a head axis, got"):
        plot_head_trace(neurons)
    grid = _grid(("layer", "pos"), (3, 5))
    with pytest.raises(InvalidInput, match=r"got axes \('layer', 'pos'\); plot a \(layer, pos\)"):
        plot_unit_trace(grid)
    with pytest.raises(InvalidInput, match=r"pos picks the position of a trace with a pos axis"):
        plot_unit_trace(neurons, pos=1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"axes": ("neuron", "layer")}, r"axes must start with 'layer'"),
        ({"axes": ("layer", "neuron", "pos")}, r"scores must have one dimension per axis \(3\)"),
        ({"axes": ("layer", "layer")}, r"axes must not repeat a name"),
        ({"axes": ("layer", "pos")}, r"the pos axis should have the 5 token positions"),
        ({"units": {"head": {"query_heads_per_head": 2}}}, r"units describe axes \['head'\]"),
        ({"corruption": None}, r"corruption must be the corruption's record"),
    ],
)
def test_inconsistent_axes_are_refused_with_the_shapes(change, match):
    r = _grid(("layer", "neuron"), (3, 7))
    with pytest.raises(
        InvalidInput, match=r"inconsistent TraceResult with scores \(3, 7\) and axes"
    ):
        unchecked_replace(r, **change)
    with pytest.raises(InvalidInput, match=match):
        unchecked_replace(r, **change)


def unchecked_replace(result, **change):
    """``dataclasses.replace`` without the test run's runtime type checker on ``__init__``."""
    init = type(result).__init__
    while hasattr(init, "__wrapped__"):
        init = init.__wrapped__
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)} | change
    new = object.__new__(type(result))
    init(new, **fields)
    return new


def test_cells_are_checked_by_axis_name():
    r = _grid(("layer", "neuron"), (3, 7))
    with pytest.raises(InvalidInput, match=r"neuron must be an integer in \[0, 7\) .*neuron=7"):
        r.top_predictions(0, 7)
    with pytest.raises(InvalidInput, match=r"needs a coordinate on every axis .* for \['neuron'\]"):
        r.top_predictions(0)
    with pytest.raises(InvalidInput, match=r"one coordinate per axis \('layer', 'neuron'\)"):
        r.top_predictions(0, 1, head=2)
    with pytest.raises(InvalidInput, match=r"n must be a positive integer, got 0"):
        r.top_units(0)
    with pytest.raises(InvalidInput, match=r"axis must be one of this result's axes"):
        r.n_heads  # noqa: B018
    assert r.top_predictions(-1, -1) == r.top_predictions(layer=2, neuron=6, pos=None)


# ------------------------------------------------- provenance: the record


@pytest.mark.parametrize(
    ("record", "shown", "absent"),
    [
        (NOISE, ["noise std", "0.25", "samples", "seed", "4"], []),
        (
            {"name": "counterfactual_prompt", "counterfactual": "The Big Ben is"},
            ["counterfactual prompt", "'The Big Ben is'"],
            ["noise std", "samples", "seed"],
        ),
        (
            ABLATION,
            ["zero_ablation", "site", "'mlp_out'", "layers", "[1, 2]", "statistic"],
            ["noise std", "samples"],
        ),
    ],
)
def test_results_describe_their_corruption_from_its_record(record, shown, absent):
    from lenscope.cli import format_table
    from lenscope.plotting._provenance import trace_rows

    r = _grid(("layer", "pos"), (3, 5), corruption=record)
    assert r.corruption == record
    assert r.samples == record.get("samples", 1)
    assert r.noise_std == record.get("noise_std") and r.seed == record.get("seed")
    page = r._repr_html_()
    table = dict(trace_rows(r))
    text = format_table({"mlp_post": r})
    for word in shown:
        assert html.escape(word) in page and any(word in f"{k} {v}" for k, v in table.items())
    for word in absent:
        assert f">{word}<" not in page and word not in table and word not in text
    title = r.plot().layout.title.text
    assert ("noise" in record["name"]) == ("std 0.25" in title)


# ----------------------------------------------------------- old file formats

OLD = Path(__file__).parent / "data" / "old_results"
"""Files written by lenscope at 1aa87ff (tests/data/old_results/write_old.py), before named axes."""


@pytest.mark.parametrize(
    ("name", "axes"),
    [
        ("trace.json", ("layer", "pos")),
        ("str_trace.json", ("layer", "pos")),
        ("head_trace.json", ("layer", "head")),
        ("head_pos_trace.json", ("layer", "head", "pos")),
        ("attribution.json", ("layer", "pos")),
    ],
)
def test_old_trace_files_load_with_their_noise_in_the_record(name, axes, tmp_path):
    from lenscope.attribution import AttributionResult

    old = json.loads((OLD / name).read_text())
    cls = AttributionResult if name == "attribution.json" else lenscope.HeadTraceResult
    r = cls.load(OLD / name)
    assert type(r) is cls and r.axes == axes
    expected = torch.tensor(
        json.loads(json.dumps(old["scores"]).replace("null", "NaN")), dtype=torch.float32
    )
    assert torch.equal(r.scores.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    assert r.corruption == old["corruption"]
    assert (r.samples, r.seed) == (old["samples"], old["seed"])
    assert r.noise_std == (
        old["noise_std"] if old["corruption"]["name"] == "gaussian_noise" else None
    )
    if "by" in old:
        assert r.by == old["by"]
        assert r.units == {"head": {"query_heads_per_head": old["query_heads_per_head"]}}
        assert r.query_heads_per_head == old["query_heads_per_head"]
    new = r.to_dict()
    assert new["format"] == "lenscope.TraceResult/2" and new["axes"] == list(axes)
    assert not {"samples", "noise_std", "seed", "by", "query_heads_per_head"} & set(new)
    same = {
        k
        for k in old
        if k not in ("format", "samples", "noise_std", "seed", "by", "query_heads_per_head")
    }
    assert {k: new[k] for k in same} == {k: old[k] for k in same}
    assert cls.load(r.save(tmp_path / name)).to_dict() == new
    r.plot(top_k=2)


def test_an_old_trace_without_a_record_was_gaussian_noise(tmp_path):
    old = json.loads((OLD / "trace.json").read_text())
    del old["corruption"]
    path = tmp_path / "older.json"
    path.write_text(json.dumps(old))
    r = lenscope.TraceResult.load(path)
    assert r.corruption == {
        "name": "gaussian_noise",
        "samples": old["samples"],
        "noise_std": old["noise_std"],
        "seed": old["seed"],
    }


def test_old_summary_and_trajectories_load(tmp_path):
    old = json.loads((OLD / "dataset.json").read_text())
    summary = DatasetSummary.load(OLD / "dataset.json")
    assert summary.corruption == old["corruption"] and summary.samples == old["samples"]
    assert (summary.noise_std, summary.seed) == (old["noise_std"], old["seed"])
    assert summary.to_dict()["format"] == "lenscope.DatasetSummary/2"
    assert not {"samples", "noise_std", "seed"} & set(summary.to_dict())
    assert DatasetSummary.load(summary.save(tmp_path / "d.json")).to_dict() == summary.to_dict()
    corrupted = LensTrajectory.load(OLD / "lens_corrupted.json")
    old = json.loads((OLD / "lens_corrupted.json").read_text())
    assert corrupted.corruption == {
        "name": "gaussian_noise",
        "samples": old["copies"],
        "noise_std": old["noise_std"],
        "seed": old["seed"],
    }
    assert (corrupted.noise_std, corrupted.seed) == (old["noise_std"], old["seed"])
    clean = LensTrajectory.load(OLD / "lens_clean.json")
    assert clean.corruption is None and clean.noise_std is None and clean.seed is None
    back = LensTrajectory.load(corrupted.save(tmp_path / "l.json"))
    assert back.to_dict() == corrupted.to_dict()
    assert "noise std" in corrupted._repr_html_() and "noise std" not in clean._repr_html_()
