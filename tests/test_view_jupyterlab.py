"""``lenscope.show`` in a real JupyterLab, driven through headless Chromium (issue 31).

A notebook draws a three-kind trace of the tiny model with
:func:`lenscope.show`; the test opens it in JupyterLab in a 1024-pixel window
with the file browser open (the issue's laptop), moves the mouse over one
cell of the MLP panel and reads, from the DOM, the outline drawn in every
panel and the values written beside the other two; then checks that no two
text boxes of the figure overlap and nothing passes the output area's right
edge. plotly.js comes from the kernel, so the page loads nothing from the
network. Screenshots go to ``$LENSCOPE_SCREENSHOTS`` when it is set.
"""

import os
import time
from pathlib import Path

import pytest
from conftest import TINY_PROMPT, TINY_SUBJECT
from lab_helpers import SETUP, open_and_run, running_lab, wait
from test_browser import (  # noqa: F401  (browser and traces are fixtures)
    BOXES_JS,
    LINKED_JS,
    _collisions,
    _hover,
    _line,
    _unhover,
    browser,
    traces,
)

from lenscope.plotting._common import visible

pytestmark = pytest.mark.browser
pytest.importorskip("anywidget")

NOTEBOOK = (
    SETUP
    + f"""traces = lenscope.CausalTracer(model, progress=False).trace_kinds(
    {TINY_PROMPT!r},
    subject={TINY_SUBJECT!r},
    kinds=("resid_post", "mlp_out", "attn_out"),
    samples=3,
    seed=0,
)
lenscope.show(lenscope.plot_traces(traces))
"""
)
"""The same traces as ``test_browser.traces``, drawn with lenscope.show."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with running_lab(tmp_path_factory.mktemp("lab"), {"show.ipynb": NOTEBOOK}) as url:
        yield url


def test_show_links_hover_across_panels_in_jupyterlab(browser, lab, traces):  # noqa: F811
    size = browser.get_window_size()
    browser.set_window_size(1024, 1300)
    try:
        started = time.monotonic()
        open_and_run(browser, lab, "show.ipynb")
        browser.execute_script("window.jupyterapp.commands.execute('filebrowser:activate')")
        wait(
            browser,
            "const gd = document.querySelector('.jp-OutputArea .lenscope-figure');"
            "return !!(gd && gd._fullLayout && gd.calcdata &&"
            " gd.querySelectorAll('g.colorbar').length === 3)",
            "the figure",
            180,
        )
        drawn = time.monotonic() - started
        browser.execute_script(
            "document.querySelector('.lenscope-figure').scrollIntoView({block: 'start'})"
        )  # the whole figure fits the window
        time.sleep(0.5)  # the file browser's opening resizes the output area
        area = browser.execute_script(
            "const o = document.querySelector('.jp-OutputArea-output');"
            "const r = o.getBoundingClientRect();"
            "return [r.left, r.right, o.scrollWidth - o.clientWidth]"
        )
        print(f"\nJupyterLab: figure drawn {drawn:.1f} s after opening; output area {area[:2]}")
        _shot(browser, "show_jupyterlab")

        # The figure fits its output area, beside the file browser.
        page = browser.execute_script(BOXES_JS)
        assert area[2] <= 0, "the output area scrolls sideways"
        assert page["width"] <= area[1] - area[0] + 0.5
        # "Past the right edge" is past the output area's, not the window's.
        assert _collisions({**page, "inner": area[1], "scroll": area[1]}) == []

        # A hover on the MLP panel outlines the cell in all three panels.
        layer, pos = 1, traces["mlp_out"].tokens.index(" Eiffel")
        (label,) = _hover(browser, 1, pos, layer)
        assert visible(" Eiffel") in _line(label, "token")
        wait(
            browser,
            "return (document.querySelector('.js-plotly-plot').layout.shapes || [])"
            ".filter(s => s.name === 'lenscope-linked-hover').length === 3",
            "the outlines",
            10,
        )
        shapes, notes = browser.execute_script(LINKED_JS)
        assert sorted(s[0] for s in shapes) == ["x", "x2", "x3"]
        assert all((s[1], s[2]) == (pos - 0.5, pos + 0.5) and s[3] < layer < s[4] for s in shapes)
        # The other panels' values, in percent as their colour bars (probability).
        expected = {"x": traces["resid_post"], "x3": traces["attn_out"]}
        assert {axis: text for axis, text in notes} == {
            axis: f"{float(result.scores[layer, pos]):.1%}" for axis, result in expected.items()
        }
        _shot(browser, "show_jupyterlab_hover")
        _unhover(browser)
        assert browser.execute_script(LINKED_JS) == [[], []]

        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(r => r.name)"
        )
        assert [r for r in resources if not r.startswith(lab)] == []
    finally:
        browser.set_window_size(size["width"], size["height"])


def _shot(driver, name):
    folder = os.environ.get("LENSCOPE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))
