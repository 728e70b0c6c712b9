"""docs/answers/<model>.md and docs/answers.md agree with the runs committed in docs/answers/.

``scripts/answers_report.py`` writes each model's page and its two runs' ``DatasetSummary``
(the first-token run and the whole-attribute run of the same facts) under
``docs/answers/<model>/``, and docs/answers.md with the models side by side. These tests
recompute every number of the model pages from the per-fact records in plain Python
(lists and ``math``, not lenscope's aggregation), and find every number of the
side-by-side table on its model's page, so a page edited by hand, or page and data from
different runs, fail here.
"""

import gzip
import json
import statistics
from pathlib import Path

import pytest
from plain_stats import buckets, share_of_total, where
from plain_stats import mean_ci as _mean_ci
from plain_stats import pct as _pct

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = DOCS / "answers"
BUCKETS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
MODELS = {  # model: (its name on the pages, its quantisation, the least facts its page traces)
    "gemma-3-270m": ("Gemma-3-270m", "4-bit Q4_K_M GGUF", 100),
    "smollm2-135m": ("SmolLM2-135M-Instruct", "4-bit Q4_1 GGUF", 30),
}


def _load(model: str, run: str) -> dict:
    return json.loads(gzip.decompress((DATA / model / f"{run}.json.gz").read_bytes()))


def _ci(pair: tuple[float, float]) -> str:
    return f"{_pct(pair[0])} ± {_pct(pair[1])}"


def _effect(fact: dict, kind: str, bucket: str, layer: int) -> float | None:
    start, end = fact["subject_range"]
    positions = buckets((start, end), len(fact["tokens"]))[bucket]
    if not positions:
        return None
    row = fact["scores"][kind][layer]
    return sum(row[p] for p in positions) / len(positions) - fact["corrupted_score"]


@pytest.fixture(scope="module", params=tuple(MODELS))
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def page(model) -> str:
    return (DATA / f"{model}.md").read_text()


@pytest.fixture(scope="module")
def saved(model) -> dict:
    return {run: _load(model, run) for run in ("noise", "noise_attribute")}


def _compared(saved: dict) -> dict:
    """Both runs on the facts the pages compare: those whose first-token run scored the
    attribute's first token."""
    top, whole = saved["noise"]["facts"], saved["noise_attribute"]["facts"]
    keep = {a["fact_id"] for a, b in zip(top, whole) if a["answer_id"] == b["answer_ids"][0]}
    return {
        run: data | {"facts": [f for f in data["facts"] if f["fact_id"] in keep]}
        for run, data in saved.items()
    }


@pytest.fixture(scope="module")
def runs(saved) -> dict:
    return _compared(saved)


@pytest.fixture(scope="module")
def meta(model) -> dict:
    return json.loads((DATA / model / "meta.json").read_text())


def test_both_runs_hold_every_selected_fact(model, saved, runs, meta, page):
    top, whole = saved["noise"], saved["noise_attribute"]
    label, weights, least = MODELS[model]
    assert [f["fact_id"] for f in top["facts"]] == [f["fact_id"] for f in whole["facts"]]
    assert meta["model"] == model and meta["known_by"] == "attribute"
    # Every known fact with an answer of several tokens finished in both runs.
    assert len(top["facts"]) == meta["n_selected"]
    assert not top["skipped"] and not whole["skipped"]
    assert whole.get("answers") == "attribute" and "answers" not in top
    flat = " ".join(page.split())
    for a, b in zip(top["facts"], whole["facts"], strict=True):
        assert len(b["answer_ids"]) >= 2
        assert meta["answer_tokens"][str(b["fact_id"])] == len(b["answer_ids"])
        if a["answer_id"] != b["answer_ids"][0]:  # left out, and the page says why
            words = (
                f"fact {a['fact_id']} ({a['prompt']!r}: top-1 {a['answer']!r} at "
                f"{_pct(a['clean_score'])}, attribute {a['attribute']!r})"
            )
            assert words in flat
    compared = runs["noise_attribute"]["facts"]
    assert len(compared) >= least
    assert f"# Scoring the whole answer on {label}: {len(compared)} facts" in page
    assert f"{meta['n_known']} are known by the whole attribute" in page
    assert f"{meta['n_selected']} of them whose attribute is several tokens" in page
    assert f"{len(top['facts'])} finished in both runs." in flat
    left_out = len(top["facts"]) - len(compared)
    assert (f"{left_out} of them {'is' if left_out == 1 else 'are'} left out" in flat) == (
        left_out > 0
    )
    lengths = [len(f["answer_ids"]) for f in compared]
    counts = ", ".join(
        f"{lengths.count(k)} fact{'s' if lengths.count(k) != 1 else ''} of {k} tokens"
        for k in sorted(set(lengths))
    )
    assert f"The {len(compared)} facts compared (answer lengths: {counts})" in flat
    # The model is named with its weights' precision.
    assert f"- **Model.** {label}" in page and weights in page
    assert f"run in {meta['dtype']}" in page


def test_the_vocabulary_count_is_the_tokenizers(model, meta, page):
    """How many of ROME's attributes are several tokens, recounted with the model's own
    tokenizer where it is on this machine (a loaded built-in model leaves it)."""
    from lenscope.datasets import known_facts
    from lenscope.loading import local_tokenizer

    words = (
        f"on this model's {meta['vocab_size']:,}-token vocabulary {meta['rome_multi_token']} of "
        f"{meta['rome_facts']:,} encode"
    )
    assert words in " ".join(page.split())
    tokenizer = local_tokenizer(model)
    if tokenizer is None:
        pytest.skip(f"{model}'s tokenizer is not on this machine")
    facts = known_facts()
    multi = sum(
        len(tokenizer(" " + f["attribute"], add_special_tokens=False)["input_ids"]) > 1
        for f in facts
    )
    assert (len(tokenizer), len(facts), multi) == (
        meta["vocab_size"],
        meta["rome_facts"],
        meta["rome_multi_token"],
    )


def test_total_effects_and_ratios_are_recomputed(runs, page):
    top, whole = runs["noise"]["facts"], runs["noise_attribute"]["facts"]
    for facts in (top, whole):
        clean = [f["clean_score"] for f in facts]
        corrupted = [f["corrupted_score"] for f in facts]
        ate = [c - k for c, k in zip(clean, corrupted, strict=True)]
        assert f"{_ci(_mean_ci(clean))} | {_ci(_mean_ci(corrupted))} | {_ci(_mean_ci(ate))}" in page
    for field in ("clean_score", "corrupted_score"):
        ratio = [b[field] / a[field] for a, b in zip(top, whole, strict=True)]
        assert _ci(_mean_ci(ratio)) in page


SITES = (
    ("resid_post", "last_subject", "hidden state, last subject token"),
    ("mlp_out", "last_subject", "MLP, last subject token"),
    ("attn_out", "last", "attention, last token"),
    ("resid_post", "last", "hidden state, last token"),
)


@pytest.mark.parametrize(("kind", "bucket", "label"), SITES)
def test_every_site_row_and_its_finding_are_recomputed(runs, page, kind, bucket, label):
    top, whole = runs["noise"], runs["noise_attribute"]
    n_layers = top["n_layers"]
    cells, peaks, influences = [], [], []
    for run in (top, whole):
        effects = [
            [_effect(f, kind, bucket, layer) for layer in range(n_layers)] for f in run["facts"]
        ]
        peak, words = where(effects, n_layers)
        peaks.append((peak, words))
        aie = _mean_ci([row[peak] for row in effects if row[peak] is not None])
        ratio, half, _ = share_of_total(
            [
                (row[peak], f["clean_score"] - f["corrupted_score"])
                for row, f in zip(effects, run["facts"], strict=True)
                if row[peak] is not None
            ]
        )
        cells.append(f"{words} | {_ci(aie)} ({_pct(ratio)} ± {_pct(half)} of the ATE)")
    # The paired differences at the first-token run's peak: raw AIE, and share of ATE by the
    # delta method (each fact's influence on the whole run's share minus the first's).
    layer = peaks[0][0]
    pairs = [
        (_effect(a, kind, bucket, layer), _effect(b, kind, bucket, layer), a, b)
        for a, b in zip(top["facts"], whole["facts"], strict=True)
        if _effect(a, kind, bucket, layer) is not None
    ]
    raw = _mean_ci([e2 - e1 for e1, e2, _, _ in pairs])
    shares = []
    for i, run_facts in ((0, [p[2] for p in pairs]), (1, [p[3] for p in pairs])):
        ratio, _, influence = share_of_total(
            [(p[i], f["clean_score"] - f["corrupted_score"]) for p, f in zip(pairs, run_facts)]
        )
        shares.append(ratio)
        influences.append(influence)
    spread = _mean_ci([w - f for f, w in zip(*influences, strict=True)])[1]
    difference = (shares[1] - shares[0], spread)
    assert f"| {label} | {cells[0]} | {cells[1]} | {_ci(raw)}; {_ci(difference)} |" in page
    # The finding's words follow from the same numbers.
    mean, half = difference
    if mean + half < 0:
        change = f"smaller by {_pct(-mean)} ± {_pct(half)} (points)"
    elif mean - half > 0:
        change = f"larger by {_ci(difference)} (points)"
    else:
        change = f"the same within its CI ({_ci(difference)}, points)"
    assert f"- {label}: the whole attribute " in page
    bullet = page.split(f"- {label}: the whole attribute ")[1].split("\n- ")[0]
    if peaks[1][0] == peaks[0][0]:
        assert bullet.startswith(f"peaks at the same layer ({layer});")
    else:
        assert f"peaks at layer {peaks[1][0]}" in bullet
    assert f"its share of the ATE at the first-token peak is {change}." in bullet


def test_per_fact_correlations_are_recomputed(runs, page):
    names = {"resid_post": "hidden state", "mlp_out": "MLP", "attn_out": "attention"}
    for kind, name in names.items():
        values = []
        for a, b in zip(runs["noise"]["facts"], runs["noise_attribute"]["facts"], strict=True):
            pairs = [
                (x, y)
                for row_a, row_b in zip(a["scores"][kind], b["scores"][kind], strict=True)
                for x, y in zip(row_a, row_b, strict=True)
                if x is not None and y is not None
            ]
            values.append(statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs]))
        row = (
            f"| {name} | {statistics.fmean(values):.3f} | {statistics.median(values):.3f} | "
            f"{sum(v < 0.9 for v in values)} |"
        )
        assert row in page


def test_the_pages_are_redrawn_from_the_committed_data(tmp_path):
    import shutil
    import subprocess
    import sys

    docs = tmp_path / "docs"
    for model in MODELS:
        shutil.copytree(DATA / model, docs / "answers" / model)
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    subprocess.run(
        [sys.executable, str(scripts / "answers_report.py"), "--from-docs", "--docs", str(docs)],
        check=True,
        capture_output=True,
        cwd=scripts,
    )
    for page in ("answers.md", *(f"answers/{model}.md" for model in MODELS)):
        assert (docs / page).read_text() == (DOCS / page).read_text(), page


NUMBER = r"-?\d+\.\d+%(?: ± \d+\.\d+%)?|\b\d+\.\d{3}\b"


def test_the_side_by_side_table_is_on_each_models_page():
    """docs/answers.md's table: a column per model, and each of its numbers where the model's
    page (recomputed above) states it."""
    import re

    overview = (DOCS / "answers.md").read_text()
    table = [line for line in overview.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")][1:]
    assert header == [label for label, _, _ in MODELS.values()]
    for model, (label, weights, _) in MODELS.items():
        assert f"- [{label}](answers/{model}.md): " in overview
        assert weights in overview.split(f"- [{label}]")[1].split("\n")[0]
    rows = {}
    for line in table[2:]:
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(MODELS), line
        rows[name] = dict(zip(MODELS, cells, strict=True))
    assert len(rows) == 13
    for model in MODELS:
        raw = (DATA / f"{model}.md").read_text()
        page = " ".join(raw.split())
        meta = json.loads((DATA / model / "meta.json").read_text())
        saved = {run: _load(model, run) for run in ("noise", "noise_attribute")}
        facts = _compared(saved)["noise_attribute"]["facts"]
        cell = {name: cells[model] for name, cells in rows.items()}
        assert cell["facts known by the whole attribute (of 424)"] == str(meta["n_known"])
        traced = len(saved["noise"]["facts"])
        assert cell["of them with answers of several tokens, traced"] == str(traced)
        compared = "compared (the top-1 run's answer is the attribute's first token)"
        assert cell[compared] == str(len(facts))
        lengths = [len(f["answer_ids"]) for f in facts]
        assert cell["answer length (tokens)"] == f"{min(lengths)} to {max(lengths)}"
        for name, value in cell.items():
            numbers = re.findall(NUMBER, value)
            if name.startswith("share difference, "):
                # The first-token peak's layer, and the share difference at it, of the site's
                # row on the model's page.
                site = name.removeprefix("share difference, ")
                layer, difference = value.removeprefix("layer ").split(": ")
                site_row = raw.split(f"| {site} | ")[1].split("\n")[0]
                assert site_row.startswith(f"layer {layer} of ")
                assert site_row.endswith(f"; {difference} |")
            elif name.startswith("per-fact Pearson"):
                means = value.split(" / ")
                for kind, mean in zip(("hidden state", "MLP", "attention"), means, strict=True):
                    assert f"| {kind} | {mean} | " in raw
            else:
                for number in numbers:
                    assert number in page, (model, name, number)
    # The words under the table follow from its share differences.
    differences = {
        name.removeprefix("share difference, "): [
            tuple(float(x.rstrip("%")) for x in cell.split(": ")[1].split(" ± "))
            for cell in cells.values()
        ]
        for name, cells in rows.items()
        if name.startswith("share difference, ")
    }
    assert len(differences) == 4
    smaller = [site for site, values in differences.items() if all(m + h < 0 for m, h in values)]
    assert f"smaller on every model at {len(smaller)} of the 4 sites:" in overview
    assert [
        line[2:] for line in overview.splitlines() if line.startswith("- ") and "](" not in line
    ] == smaller
    subject = max(
        -m for site, values in differences.items() if "subject" in site for m, _ in values
    )
    last = min(
        -m for site, values in differences.items() if "subject" not in site for m, _ in values
    )
    assert subject < last
    words = (
        f"at most {subject:.1f} points at the last subject token, at least {last:.1f} at the last"
    )
    assert words in " ".join(overview.split())


def test_the_readme_quotes_the_pages():
    """Every number of the README's paragraph on docs/answers.md is one a model's page
    states (the pages' own numbers are recomputed above)."""
    import re

    readme = (DOCS.parent / "README.md").read_text()
    paragraph = readme.split("**What changes when the whole answer is scored**")[1].split("\n\n")[0]
    pages = {model: (DATA / f"{model}.md").read_text() for model in MODELS}
    quoted = re.findall(r"\d+\.\d+% ± \d+\.\d+%", paragraph)
    assert len(quoted) >= 6
    for value in quoted:
        assert any(value in page for page in pages.values()), value
    for model, (label, _, _) in MODELS.items():
        n_facts = int(re.search(rf"(\d+) facts\s+that\s+{re.escape(label)}", paragraph)[1])
        assert f"# Scoring the whole answer on {label}: {n_facts} facts" in pages[model]
