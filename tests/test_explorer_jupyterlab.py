"""The explorer in a real JupyterLab, driven through headless Chromium (issue 32).

The test starts JupyterLab (from PyPI, in the ``test`` extra) on a free port
with a throw-away root folder, writes a notebook that creates the explorer on
the tiny model, runs it from the browser, and then works the widget as a user
does: types a prompt, marks the subject by clicking its tokens, presses Run,
reads the heatmaps from the DOM (against a trace made here, on the same seeded
model), clicks a cell and reads its top-k, runs again with more noise and
compares the two runs. The times to the first heatmap and to the full trace are
printed (``-s``); screenshots go to ``$LENSCOPE_SCREENSHOTS`` when it is set.
"""

import json
import os
import time
from pathlib import Path

import pytest
from conftest import TINY_PROMPT, make_tiny_model
from lab_helpers import SETUP, open_and_run, running_lab, wait
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)

import lenscope

pytestmark = pytest.mark.browser
pytest.importorskip("anywidget")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port serving explorer.ipynb; yields its URL."""
    source = SETUP + "explorer = lenscope.explore(model, samples=3)\nexplorer"
    with running_lab(tmp_path_factory.mktemp("lab"), {"explorer.ipynb": source}) as url:
        yield url


def _wait(driver, script, what, timeout=120.0, *args):
    return wait(driver, script, what, timeout, *args, shown=".lenscope-explorer")


def _click(driver, css, index=0):
    """Click the ``index``-th element matching ``css``, found again if the widget redrew it."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:
            driver.find_elements("css selector", css)[index].click()
            return
        except StaleElementReferenceException:
            time.sleep(0.2)
    raise AssertionError(f"{css} [{index}] kept being redrawn")


def _shot(driver, name):
    folder = os.environ.get("LENSCOPE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        widget = driver.find_element("css selector", ".lenscope-explorer")
        widget.screenshot(str(Path(folder) / f"{name}.png"))


def test_explorer_in_jupyterlab(browser, lab, tiny_tokenizer):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(1800, 1400)
    open_and_run(browser, lab, "explorer.ipynb")
    _wait(
        browser,
        "return !!document.querySelector('.lenscope-explorer .ls-prompt')",
        "the widget",
        180,
    )

    # Type the prompt; the tokens come back as chips with the guessed subject marked.
    prompt = browser.find_element(By.CSS_SELECTOR, ".lenscope-explorer .ls-prompt")
    prompt.send_keys(TINY_PROMPT + Keys.ENTER)
    _wait(browser, "return document.querySelectorAll('.ls-chip').length === 10", "the token chips")
    _wait(
        browser, "return document.querySelectorAll('.ls-chip.ls-subject').length === 3", "the guess"
    )
    # Mark the subject " Eiffel Tower" (tokens 2 and 3) by clicking its tokens.
    _click(browser, ".ls-chip", 2)
    _wait(
        browser, "return document.querySelectorAll('.ls-chip.ls-subject').length === 1", "one chip"
    )
    chip = browser.find_elements(By.CSS_SELECTOR, ".ls-chip")[3]
    ActionChains(browser).key_down(Keys.SHIFT).click(chip).key_up(Keys.SHIFT).perform()
    _wait(
        browser,
        "return document.querySelectorAll('.ls-chip.ls-subject').length === 2",
        "the subject",
    )

    # Run: the heatmaps fill in, kind by kind.
    started = time.monotonic()
    _click(browser, ".ls-run")
    _wait(browser, "return document.querySelectorAll('.ls-maps .ls-grid').length >= 1", "a heatmap")
    first = time.monotonic() - started  # the attribution estimates
    # (A kind streaming its exact cells over its estimate is an .ls-partial grid.)
    _wait(
        browser,
        "return document.querySelectorAll('.ls-body .ls-grid:not(.ls-estimate)').length >= 1",
        "exact cells",
    )
    first_cells = time.monotonic() - started
    finished = ".ls-body .ls-grid:not(.ls-estimate):not(.ls-partial)"
    _wait(browser, f"return document.querySelectorAll('{finished}').length >= 1", "an exact kind")
    first_exact = time.monotonic() - started
    _wait(
        browser,
        f"return document.querySelectorAll('{finished}').length === 3 && "
        "document.querySelector('.ls-status').dataset.status === 'done'",
        "the full trace",
    )
    full = time.monotonic() - started
    print(
        f"\nJupyterLab, tiny model: first heatmap (estimates) {first:.2f} s, first exact cells "
        f"{first_cells:.2f} s, first exact kind {first_exact:.2f} s, full trace {full:.2f} s"
    )
    _shot(browser, "explorer_run")

    # The DOM holds the trace of the same settings, made here on the same seeded model.
    model = make_tiny_model(tiny_tokenizer)
    expected = lenscope.CausalTracer(model, progress=False).trace_kinds(
        TINY_PROMPT, (2, 4), samples=3
    )
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll('.ls-body .ls-grid')).map(g => [g.dataset.kind,"
        " Array.from(g.querySelectorAll('.ls-cell')).map(c => [+c.dataset.layer, +c.dataset.pos, c.dataset.score])])"
    )
    assert [kind for kind, _ in drawn] == list(expected)
    for kind, cells in drawn:
        scores = expected[kind].scores
        assert len(cells) == scores.numel()
        for layer, pos, score in cells:
            assert float(score) == pytest.approx(float(scores[layer, pos]), rel=1e-6, abs=1e-9)

    # Click a cell: its top-k (the restored run's) and the lens table appear.
    _click(browser, '.ls-body .ls-grid[data-kind="mlp_out"] .ls-cell[data-layer="1"][data-pos="3"]')
    _wait(
        browser,
        "return document.querySelectorAll('.ls-cell-info .ls-top li').length > 0",
        "the top-k",
    )
    # (The panel is drawn again when the lens view arrives: read it in one script.)
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('.ls-top li')).map(li => li.textContent)"
    )
    shown = [text.rsplit(" ", 1)[0] for text in shown]
    assert shown == [json.dumps(t) for t, _ in expected["mlp_out"].top_predictions(1, 3)]
    _wait(
        browser,
        "return document.querySelectorAll('.ls-cell-info .ls-lens tr').length === 5",
        "the lens",
    )
    _shot(browser, "explorer_cell")

    # A second run with more noise, then the two compared as a difference.
    noise = browser.find_element(By.CSS_SELECTOR, ".ls-noise")
    noise.clear()
    noise.send_keys("6" + Keys.ENTER)
    _click(browser, ".ls-run")
    _wait(
        browser,
        "return document.querySelectorAll('.ls-run-entry').length === 2",
        "the second run",
        180,
    )
    _click(browser, ".ls-run-entry input", 0)
    _click(browser, ".ls-run-entry input", 1)
    _click(browser, ".ls-compare-mode option[value='difference']")
    _click(browser, ".ls-compare")
    _wait(
        browser,
        "return document.querySelectorAll('.ls-comparison .ls-grid').length === 3",
        "the comparison",
    )
    title = browser.find_element(By.CSS_SELECTOR, ".ls-comparison .ls-title").text
    assert title == "runs 0 and 1: difference"
    entries = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".ls-run-entry")]
    assert "noise 3σ × 3" in entries[0] and "noise 6σ × 3" in entries[1]
    # The difference is run 0 minus run 1, cell by cell (not all zero: the noise differs).
    second = lenscope.CausalTracer(model, progress=False).trace_kinds(
        TINY_PROMPT, (2, 4), samples=3, noise_multiplier=6.0
    )
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll('.ls-comparison .ls-grid')).map(g => [g.dataset.kind,"
        " Array.from(g.querySelectorAll('.ls-cell')).map(c => [+c.dataset.layer, +c.dataset.pos, c.dataset.score])])"
    )
    for kind, cells in drawn:
        diff = expected[kind].scores - second[kind].scores
        assert diff.abs().max() > 0
        for layer, pos, score in cells:
            assert float(score) == pytest.approx(float(diff[layer, pos]), rel=1e-6, abs=1e-9)
    _shot(browser, "explorer_compare")
