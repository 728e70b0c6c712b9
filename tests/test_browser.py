"""Exported trace heatmaps in a real headless Chromium: hover labels, linked hover, offline.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them). Without them the tests skip locally and fail in CI (``CI=true``).
Selenium is pointed at the system binaries so selenium-manager never
downloads a browser.
"""

import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROMPT, TINY_SUBJECT

import lenscope
from lenscope.plotting import plot_traces, save_html
from lenscope.plotting._common import NBSP, visible

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"

# Viewport pixel of a heatmap cell, from plotly's axis layout.
CELL_JS = """
const gd = document.querySelector('.js-plotly-plot');
const t = gd._fullData[arguments[0]];
const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')];
const ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
const box = gd.getBoundingClientRect();
return [box.left + xa._offset + xa.l2p(arguments[1]), box.top + ya._offset + ya.l2p(arguments[2])];
"""
# Text of every hover label, one line per SVG line.
HOVER_JS = """
return Array.from(document.querySelectorAll('g.hoverlayer g.hovertext')).map(g =>
  Array.from(g.querySelectorAll('text tspan.line')).map(t => t.textContent).join('\\n')
  || g.textContent);
"""
LINKED_JS = """
const gd = document.querySelector('.js-plotly-plot');
const mine = items => (items || []).filter(item => item.name === 'lenscope-linked-hover');
return [mine(gd.layout.shapes).map(s => [s.xref, s.x0, s.x1, s.y0, s.y1]),
        mine(gd.layout.annotations).map(a => [a.xref, a.text])];
"""


# Page width against the window, and each panel's plot area against the colour bar
# drawn right of the panel before it (its bar, tick labels and title, not its padding).
FIT_JS = """
const gd = document.querySelector('.js-plotly-plot');
const left = gd.getBoundingClientRect().left;
const axes = Object.keys(gd._fullLayout).filter(k => /^xaxis[0-9]*$/.test(k)).sort()
  .map(k => [left + gd._fullLayout[k]._offset, gd._fullLayout[k]._length]);
const bars = Array.from(gd.querySelectorAll('g.colorbar')).map(g =>
  Math.max(...Array.from(g.querySelectorAll('rect.cbfill, text'))
    .map(e => e.getBoundingClientRect().right)));
return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
        svg: gd.querySelector('svg.main-svg').getBoundingClientRect().width,
        axes: axes, bars: bars};
"""


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists() and shutil.which(path.name) is None:
            return f"{path} not found"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium, with a throw-away profile."""
    reason = _missing()
    if reason is not None:
        message = (
            f"browser tests need Chromium and chromedriver: {reason}; install with `{INSTALL}`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    profile = tempfile.mkdtemp(prefix="lenscope-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1800,1000",
    ):
        options.add_argument(arg)
    driver_path = CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def traces(tiny_model):
    """resid_post, mlp_out and attn_out traces of the Eiffel Tower prompt on the tiny model."""
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    return tracer.trace_kinds(
        TINY_PROMPT,
        subject=TINY_SUBJECT,
        kinds=("resid_post", "mlp_out", "attn_out"),
        samples=3,
        seed=0,
    )


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 20
    while not driver.execute_script(
        "const gd = document.querySelector('.js-plotly-plot');"
        "return !!(gd && gd._fullLayout && gd.calcdata);"
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"plotly never drew {path}")
        time.sleep(0.1)


def _hover(driver, curve: int, pos: int, layer: int) -> list[str]:
    """Move the real mouse pointer over one cell and return the hover labels' text."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = driver.execute_script(CELL_JS, curve, pos, layer)
    deadline = time.monotonic() + 10
    labels: list[str] = []
    for nudge in range(100):
        # Park the pointer elsewhere first, so every attempt is a fresh mouse move.
        action = ActionBuilder(driver)
        action.pointer_action.move_to_location(int(x) + nudge % 3, int(y) + nudge % 2)
        action.perform()
        time.sleep(0.15)
        labels = driver.execute_script(HOVER_JS)
        if labels or time.monotonic() > deadline:
            break
    return labels


def _unhover(driver) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(2, 2)
    action.perform()
    time.sleep(0.3)


def _line(label: str, name: str) -> str:
    """The hover-table line that starts with ``name``."""
    lines = [line for line in label.split("\n") if line.startswith(name)]
    assert lines, f"no {name!r} line in hover label {label!r}"
    return lines[0]


def test_hover_label_shows_token_layer_and_top1(browser, traces, tmp_path):
    result = traces["mlp_out"]
    layer, pos = 2, result.tokens.index(" Tower")
    path = save_html(result.plot(), tmp_path / "trace.html")
    _open(browser, path)

    (label,) = _hover(browser, 0, pos, layer)

    assert visible(" Tower") in _line(label, "token")
    assert _line(label, "pos").replace(NBSP, " ").split()[1] == str(pos)
    assert _line(label, "layer").replace(NBSP, " ").split()[1] == str(layer)
    # A probability shows in percent, the colour bar's unit.
    assert f"{float(result.scores[layer, pos]):.1%}" in _line(label, "score")
    top_token, top_prob = result.top_predictions(layer, pos)[0]
    first_row = label.split("\n")[label.split("\n").index("top-5 after restoring") + 1]
    assert first_row.replace(NBSP, " ").split()[0] == "1"
    assert visible(top_token) in first_row and f"{top_prob:.1%}" in first_row


def test_hover_splits_an_answer_of_several_tokens(browser, tiny_model, tmp_path):
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    result = tracer.trace(
        TINY_PROMPT, TINY_SUBJECT, kind="mlp_out", window=1, samples=2, answer=" paris france"
    )
    path = save_html(result.plot(), tmp_path / "split.html")
    _open(browser, path)

    (label,) = _hover(browser, 0, 3, 2)

    lines = label.split("\n")
    header = lines.index("each answer token: log p, own gap restored")
    rows = [line.replace(NBSP, " ").split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in rows] == [visible(" paris"), visible(" france")]
    split = result.answer_split["log_probs"][2, 3]
    assert [float(row[1]) for row in rows] == pytest.approx(split.tolist(), abs=5e-4)


def test_untraced_cell_is_blank_and_says_so(browser, traces, tmp_path):
    result = traces["resid_post"]
    scores = result.scores.clone()
    scores[1, 2] = math.nan
    path = save_html(dataclasses.replace(result, scores=scores).plot(), tmp_path / "nan.html")
    _open(browser, path)

    (label,) = _hover(browser, 0, 2, 1)

    assert "not traced" in _line(label, "score")
    assert "top-5" not in label
    assert (
        browser.execute_script(
            "return document.querySelector('.js-plotly-plot').calcdata[0][0].z[1][2]"
        )
        is None
    )


def test_linked_hover_outlines_the_cell_in_every_panel(browser, traces, tmp_path):
    path = save_html(plot_traces(traces), tmp_path / "three.html")
    _open(browser, path)
    layer, pos = 1, traces["mlp_out"].tokens.index(" Eiffel")

    (label,) = _hover(browser, 1, pos, layer)  # the MLP panel
    time.sleep(0.3)
    shapes, notes = browser.execute_script(LINKED_JS)

    assert visible(" Eiffel") in _line(label, "token")
    assert sorted(s[0] for s in shapes) == ["x", "x2", "x3"]
    assert all((s[1], s[2]) == (pos - 0.5, pos + 0.5) and s[3] < layer < s[4] for s in shapes)
    expected = {"x": traces["resid_post"], "x3": traces["attn_out"]}
    assert {n[0] for n in notes} == set(expected)
    # Each value as the hover and the colour bar show it: percent (issue 31: not 0.09492).
    assert {axis: text for axis, text in notes} == {
        axis: f"{float(result.scores[layer, pos]):.1%}" for axis, result in expected.items()
    }

    _unhover(browser)
    assert browser.execute_script(LINKED_JS) == [[], []]


def test_linked_hover_without_a_hover_field_writes_percent_as_the_colour_bar(
    browser, traces, tiny_model, tmp_path
):
    """A lens difference panel names no hover field: its label is its colour, in percent."""
    from lenscope.lens import lens_trace_cell

    clean, corrupted, restored = lens_trace_cell(tiny_model, traces["mlp_out"], 1, 3)
    fig = lenscope.plot_lens(clean, corrupted, restored, statistic="answer_prob", mode="difference")
    assert fig.layout.coloraxis.colorbar.tickformat.endswith("%")
    _open(browser, save_html(fig, tmp_path / "lens.html"))
    layer, pos = 2, 5
    _hover(browser, 0, pos, layer)  # corrupted − clean
    time.sleep(0.3)
    shapes, notes = browser.execute_script(LINKED_JS)
    assert sorted(s[0] for s in shapes) == ["x", "x2"]
    ((axis, text),) = notes
    value = float(restored.answer_prob[layer, pos] - clean.answer_prob[layer, pos])
    assert axis == "x2" and text.endswith("%") and text.startswith("+" if value > 0 else "-")
    assert float(text[:-1]) / 100 == pytest.approx(value, abs=5e-4)
    _unhover(browser)


def test_exported_page_loads_nothing_from_the_network(browser, traces, tmp_path):
    path = save_html(plot_traces(traces), tmp_path / "offline.html")
    _open(browser, path)
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
    )
    assert [r for r in resources if r.startswith(("http:", "https:"))] == []
    assert browser.execute_script("return typeof Plotly") == "object"


def test_subject_and_title_render(browser, traces, tmp_path):
    result = traces["mlp_out"]
    path = save_html(result.plot(), tmp_path / "title.html")
    _open(browser, path)
    ticks = browser.execute_script(
        "return Array.from(document.querySelectorAll('.xtick text')).map(t => t.textContent)"
    )
    start, end = result.subject_range
    assert [i for i, t in enumerate(ticks) if t.endswith("*")] == list(range(start, end))
    title = browser.execute_script("return document.querySelector('.gtitle').textContent")
    assert visible(result.answer) in title
    assert f"corrupted {result.corrupted_score * 100:.3g}%" in title  # percent, as its bar
    assert torch.isfinite(result.scores).all()


def test_three_panel_trace_fits_a_1024_pixel_window(browser, traces, tmp_path):
    path = save_html(plot_traces(traces), tmp_path / "narrow.html")
    size = browser.get_window_size()
    browser.set_window_size(1024, 768)
    try:
        _open(browser, path)
        fit = browser.execute_script(FIT_JS)
        assert fit["inner"] == 1024
        assert fit["scroll"] <= fit["inner"], f"the page scrolls sideways: {fit}"
        assert fit["svg"] <= fit["inner"]
        # Laid out for a 577-pixel output area: one panel per row, each as wide as the page.
        assert all(length > 600 for _, length in fit["axes"]), f"panels squeezed: {fit}"
        assert max(fit["bars"]) <= fit["inner"], fit

        browser.set_window_size(1600, 768)  # the figure follows the window
        deadline = time.monotonic() + 10
        while browser.execute_script(FIT_JS)["svg"] <= fit["svg"] + 400:
            assert time.monotonic() < deadline, "the figure did not widen with the window"
            time.sleep(0.1)
    finally:
        browser.set_window_size(size["width"], size["height"])


# -- layout at the widths people work at -------------------------------------------------

WIDTHS = (577, 800, 1024, 1600)
"""JupyterLab beside its file browser on a laptop, a narrow window, a laptop, a desktop."""

# Every text box (titles, tick labels, panel titles, colour bars as a whole) and every
# panel's plot area, in viewport pixels; the toolbar's box; the page's widths.
BOXES_JS = """
const gd = document.querySelector('.js-plotly-plot');
const boxes = [];
function box(kind, rects, text) {
  rects = rects.filter(r => r.width > 0 && r.height > 0);
  if (!rects.length) { return; }
  boxes.push({kind: kind, text: (text || '').slice(0, 40),
    l: Math.min(...rects.map(r => r.left)), r: Math.max(...rects.map(r => r.right)),
    t: Math.min(...rects.map(r => r.top)), b: Math.max(...rects.map(r => r.bottom))});
}
const one = (kind, sel) => gd.querySelectorAll(sel).forEach(e =>
  box(kind, [e.getBoundingClientRect()], e.textContent));
one('title', '.gtitle');
one('annotation', '.annotation-text');
one('xtick', '.xtick text');
one('ytick', '.ytick text');
one('axis title', '.g-xtitle text, .g-ytitle text');
gd.querySelectorAll('g.colorbar').forEach(g => box('colorbar',
  Array.from(g.querySelectorAll('rect.cbfill, text')).map(e => e.getBoundingClientRect()),
  'colour bar'));
const left = gd.getBoundingClientRect().left, top = gd.getBoundingClientRect().top;
gd._fullData.forEach(t => {
  const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')];
  const ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
  boxes.push({kind: 'panel', text: t.name, l: left + xa._offset, r: left + xa._offset + xa._length,
              t: top + ya._offset, b: top + ya._offset + ya._length});
});
const bar = gd.querySelector('.modebar');
const mb = bar ? bar.getBoundingClientRect() : null;
const cbticks = Array.from(gd.querySelectorAll('g.colorbar')).map(g =>
  Array.from(g.querySelectorAll('text')).filter(e => !e.closest('.cbtitle'))
    .map(e => e.textContent));
return {boxes: boxes, cbticks: cbticks,
        inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
        width: gd._fullLayout.width,
        modebar: mb && mb.width ? {l: mb.left, r: mb.right, t: mb.top, b: mb.bottom} : null};
"""


def _overlap(a: dict, b: dict) -> float:
    """Area two boxes share, in square pixels (edges that touch share none)."""
    w = min(a["r"], b["r"]) - max(a["l"], b["l"])
    h = min(a["b"], b["b"]) - max(a["t"], b["t"])
    return max(0.0, w) * max(0.0, h)


def _collisions(page: dict) -> list[str]:
    """Text boxes that overlap each other or a panel; anything past the page's right edge."""
    boxes, problems = page["boxes"], []
    for i, a in enumerate(boxes):
        if a["r"] > page["inner"] + 0.5:
            problems.append(f"{a['kind']} {a['text']!r} ends at {a['r']:.0f} > {page['inner']}")
        for b in boxes[i + 1 :]:
            if a["kind"] == b["kind"] == "panel":
                continue
            if _overlap(a, b) > 2.0:  # anti-aliasing slack: two pixels
                problems.append(f"{a['kind']} {a['text']!r} overlaps {b['kind']} {b['text']!r}")
    if page["modebar"] is not None:
        for a in boxes:
            if a["kind"] in ("title", "annotation", "colorbar") and _overlap(a, page["modebar"]):
                problems.append(f"the toolbar covers {a['kind']} {a['text']!r}")
    for ticks in page["cbticks"]:
        if len(set(ticks)) != len(ticks):
            problems.append(f"a colour bar repeats tick labels: {ticks}")
    if page["scroll"] > page["inner"]:
        problems.append(f"the page scrolls sideways: {page['scroll']} > {page['inner']}")
    return problems


def _resize(driver, width: int) -> dict:
    """Resize the window to ``width`` and return the page's boxes once plotly has followed."""
    driver.set_window_size(width, 900)
    deadline = time.monotonic() + 10
    last = None
    while True:
        page = driver.execute_script(BOXES_JS)
        settled = last is not None and page["width"] == last["width"]
        if settled and page["inner"] == width and page["width"] < width:
            return page
        assert time.monotonic() < deadline, f"plotly never followed the window to {width}px"
        last = page
        time.sleep(0.25)


LONG_WORDS = (
    "The Colosseum is located in the city of Rome and the Space Needle is located in "
    "the city of Seattle and Big Ben is located in the city of London and the capital "
    "of France is Paris and the capital of Italy is Rome and a city is Rome and"
)


@pytest.fixture(scope="module")
def long_traces(tiny_tokenizer):
    """Three kinds of a 60-token prompt, on a tiny model with room for it."""
    from conftest import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, n_ctx=96)
    prompt = f"{LONG_WORDS} {TINY_PROMPT}"
    n_tokens = len(model.to_str_tokens(prompt))
    assert n_tokens == 60, n_tokens
    tracer = lenscope.CausalTracer(model, progress=False)
    return tracer.trace_kinds(
        prompt,
        subject=TINY_SUBJECT,
        kinds=("resid_post", "mlp_out", "attn_out"),
        samples=2,
        seed=0,
    )


@pytest.fixture(scope="module")
def summary(tiny_model):
    """A dataset trace of two facts: ROME's Figure 2 for MLP and attention."""
    from lenscope.datasets import trace_dataset

    facts = [
        {"prompt": TINY_PROMPT, "subject": TINY_SUBJECT},
        {"prompt": "Big Ben is located in the city of", "subject": "Big Ben"},
    ]
    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    return trace_dataset(tracer, facts, samples=2, kinds=("mlp_out", "attn_out"))


@pytest.fixture(scope="module")
def layout_pages(traces, long_traces, summary, tiny_model, tmp_path_factory):
    """The figures whose layout is checked, saved as pages sharing one plotly.js file."""
    from lenscope.lens import lens_trace_cell
    from lenscope.plotting import plot_attention, plot_dataset

    tracer = lenscope.CausalTracer(tiny_model, progress=False)
    noising = tracer.patch(
        TINY_PROMPT,
        "The Space Needle is located in the city of",
        kind="mlp_out",
        answer=" paris france",
        direction="noise",
    )

    folder = tmp_path_factory.mktemp("layout")
    figures = {
        "attention": plot_attention(
            tiny_model, TINY_PROMPT, layer=1, heads=[0, 1], subject=TINY_SUBJECT
        ),
        "three kinds": plot_traces(traces),
        "60 tokens": plot_traces(long_traces),
        "difference": plot_traces(
            [traces["mlp_out"], traces["attn_out"]], mode="difference", allow_mismatch=True
        ),
        "mismatched panels": plot_traces([traces["mlp_out"], noising], allow_mismatch=True),
        "heads at one position": tracer.trace(
            TINY_PROMPT, TINY_SUBJECT, kind="z", by="head_pos", samples=2
        ).plot(),
        "neurons, noising": tracer.trace(
            TINY_PROMPT,
            TINY_SUBJECT,
            kind="mlp_post",
            by="neuron",
            samples=2,
            direction="noise",
            layers=[2, 3],
        ).plot(),
        "lens: clean, corrupted, restored": lenscope.plot_lens(
            *lens_trace_cell(tiny_model, traces["mlp_out"], 1, 3), statistic="answer_prob"
        ),
        "dataset heatmap": plot_dataset(summary),
    }
    return {
        name: save_html(fig, folder / f"{i}.html", plotly_js="file")
        for i, (name, fig) in enumerate(figures.items())
    }


def test_figures_fit_577_to_1600_pixels_without_collisions(browser, layout_pages):
    size = browser.get_window_size()
    failures = {}
    try:
        for name, path in layout_pages.items():
            browser.set_window_size(WIDTHS[0], 900)
            _open(browser, path)
            for width in WIDTHS:
                problems = _collisions(_resize(browser, width))
                if problems:
                    failures[f"{name} at {width}px"] = problems[:6]
    finally:
        browser.set_window_size(size["width"], size["height"])
    assert not failures, "\n".join(f"{name}: {problems}" for name, problems in failures.items())
