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
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_PROMPT, make_tiny_model
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)

import lenscope

pytestmark = pytest.mark.browser
pytest.importorskip("anywidget")

REPO = Path(__file__).resolve().parents[1]
TOKEN = "lenscope-test"

SETUP = f"""import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import tempfile
import lenscope
from conftest import make_tiny_model, make_tiny_tokenizer

model = make_tiny_model(make_tiny_tokenizer(tempfile.mkdtemp()))
explorer = lenscope.explore(model, samples=3)
explorer"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port; yields its URL."""
    if (
        shutil.which("jupyter-lab") is None
        and not (Path(sys.executable).parent / "jupyter-lab").exists()
    ):
        message = 'JupyterLab is not installed; pip install -e ".[test]"'
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("lab")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                log.close()
                raise AssertionError(
                    f"JupyterLab did not start: {(root / 'server.log').read_text()}"
                )
            time.sleep(0.5)
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "setup",
                "metadata": {},
                "outputs": [],
                "source": SETUP,
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (root / "explorer.ipynb").write_text(json.dumps(notebook))
    try:
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _wait(driver, script, what, timeout=120.0, *args):
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            shown = driver.execute_script(
                "const w = document.querySelector('.lenscope-explorer');"
                "return w ? w.innerText : document.body.innerText.slice(0, 2000)"
            )
            raise AssertionError(f"timed out waiting for {what}; the page shows: {shown}")
        time.sleep(0.1)


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
    browser.get(f"{lab}/lab/tree/explorer.ipynb?token={TOKEN}")
    _wait(
        browser,
        "return !!(window.jupyterapp && document.querySelector('.jp-Notebook'))",
        "JupyterLab",
    )
    # Run the cell once the kernel is up.
    _wait(
        browser,
        "const w = window.jupyterapp.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected')",
        "the kernel",
    )
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
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
