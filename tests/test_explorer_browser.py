"""The explorer's front end (lenscope/explorer.js) in a real headless Chromium, without Jupyter.

The page renders the widget with anywidget's model interface (``get``, ``set``,
``on``, ``save_changes``, ``send``) played by a small JavaScript object holding
the state of a real :class:`Explorer` after a run on the tiny model: what is drawn
is read from the DOM, and what a click sets or sends is recorded and fed back to
the kernel side, in a few seconds; tests/test_explorer_jupyterlab.py runs the
widget in a real JupyterLab.
"""

import json
from pathlib import Path

import pytest
from conftest import TINY_PROMPT
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)

import lenscope
from lenscope import explorer as explorer_module

pytestmark = pytest.mark.browser
pytest.importorskip("anywidget")


def _page(tmp_path, explorer) -> Path:
    path = tmp_path / "explorer.html"
    path.write_text(explorer_module.widget_page(explorer.get_state()))
    return path


def test_front_end_draws_the_run_and_sends_clicks(browser, tiny_model, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    explorer = lenscope.explore(tiny_model, prompt=TINY_PROMPT, samples=3)
    try:
        run = explorer.run(wait=True)
        browser.get(_page(tmp_path, explorer).as_uri())
        assert browser.execute_script("return window.ready === true")

        # Tokens as chips, the guessed subject marked.
        chips = browser.find_elements(By.CSS_SELECTOR, ".ls-chip")
        assert [c.get_attribute("textContent") for c in chips] == explorer.tokens
        marked = [
            int(c.get_attribute("data-pos"))
            for c in chips
            if "ls-subject" in c.get_attribute("class")
        ]
        assert marked == list(range(*explorer.subject))
        # One grid per kind; every cell's score is the result's.
        grids = browser.find_elements(By.CSS_SELECTOR, ".ls-grid")
        assert [g.get_attribute("data-kind") for g in grids] == list(run.results)
        for grid in grids:
            result = run.results[grid.get_attribute("data-kind")]
            cells = grid.find_elements(By.CSS_SELECTOR, ".ls-cell")
            assert len(cells) == result.scores.numel()
            for cell in cells[:: max(1, len(cells) // 7)]:
                layer, pos = (
                    int(cell.get_attribute("data-layer")),
                    int(cell.get_attribute("data-pos")),
                )
                assert float(cell.get_attribute("data-score")) == float(result.scores[layer, pos])

        # Click a cell: the front end sets the cell trait; the kernel answers with its top-k.
        target = browser.find_element(
            By.CSS_SELECTOR, '.ls-grid[data-kind="mlp_out"] .ls-cell[data-layer="2"][data-pos="3"]'
        )
        target.click()
        cell = browser.execute_script("return window.sets.filter(s => s[0] === 'cell').pop()[1]")
        assert cell == {"run": 0, "kind": "mlp_out", "layer": 2, "pos": 3}
        explorer.cell = cell
        explorer.wait()
        browser.execute_script("window.model.set('cell_info', arguments[0])", explorer.cell_info)
        shown = [li.text for li in browser.find_elements(By.CSS_SELECTOR, ".ls-top li")]
        top = run.results["mlp_out"].top_predictions(2, 3)
        assert [s.rsplit(" ", 1)[0] for s in shown] == [json.dumps(t) for t, _ in top]
        assert (
            len(browser.find_elements(By.CSS_SELECTOR, ".ls-lens tr"))
            == tiny_model.cfg.n_layers + 1
        )

        # Linked hover: the same cell is outlined in the other kinds' heatmaps, until the
        # pointer leaves.
        def linked():
            return [
                (
                    c.find_element(By.XPATH, "..").get_attribute("data-kind"),
                    c.get_attribute("data-layer"),
                    c.get_attribute("data-pos"),
                )
                for c in browser.find_elements(By.CSS_SELECTOR, ".ls-maps .ls-cell.ls-linked")
            ]

        hovered = browser.find_element(
            By.CSS_SELECTOR, '.ls-grid[data-kind="mlp_out"] .ls-cell[data-layer="1"][data-pos="4"]'
        )
        ActionChains(browser).move_to_element(hovered).perform()
        assert sorted(linked()) == [("attn_out", "1", "4"), ("resid_post", "1", "4")]
        ActionChains(browser).move_to_element(chips[0]).perform()
        assert linked() == []

        # An attention cell: the per-head breakdown is asked for, then drawn.
        explorer.cell = {"run": 0, "kind": "attn_out", "layer": 1, "pos": 4}
        explorer.wait()
        browser.execute_script("window.model.set('cell_info', arguments[0])", explorer.cell_info)
        browser.find_element(By.CSS_SELECTOR, ".ls-heads-button").click()
        asked = browser.execute_script("return window.sent.pop()")
        assert asked == {"action": "heads", "run": 0, "kind": "attn_out", "layer": 1, "pos": 4}
        explorer._on_front_end_message(None, asked)
        explorer.wait()
        browser.execute_script("window.model.set('cell_info', arguments[0])", explorer.cell_info)
        heads = browser.find_elements(By.CSS_SELECTOR, ".ls-heads .ls-head")
        expected = explorer.head_views[(0, "attn_out", 1, 4)].scores[1, :, 4].tolist()
        assert [float(h.get_attribute("data-score")) for h in heads] == expected

        # A kind still streaming: its exact cells so far, the others its estimate, faded,
        # none clickable.
        grid = run.results["mlp_out"].scores.clone()
        grid[:2] = float("nan")
        partial = explorer_module.partial_heatmap(
            "mlp_out",
            grid,
            index=1,
            tokens=explorer.tokens,
            subject=explorer.subject,
            estimate=[[0.5] * grid.shape[1]] * grid.shape[0],
        )
        browser.execute_script("window.model.set('heatmaps', [arguments[0]])", partial)
        pending = browser.find_elements(By.CSS_SELECTOR, ".ls-grid.ls-partial .ls-cell.ls-pending")
        assert {c.get_attribute("data-layer") for c in pending} == {"0", "1"}
        assert len(pending) == 2 * grid.shape[1]
        before = browser.execute_script("return window.sets.length")
        pending[0].click()
        browser.find_element(By.CSS_SELECTOR, '.ls-partial .ls-cell[data-layer="3"]').click()
        assert browser.execute_script("return window.sets.length") == before

        # Mark a subject: click a chip, shift-click another.
        chips[2].click()
        chips = browser.find_elements(By.CSS_SELECTOR, ".ls-chip")  # drawn again
        ActionChains(browser).key_down(Keys.SHIFT).click(chips[5]).key_up(Keys.SHIFT).perform()
        subject = browser.execute_script(
            "return window.sets.filter(s => s[0] === 'subject').pop()[1]"
        )
        assert subject == [2, 6]
        marked = browser.find_elements(By.CSS_SELECTOR, ".ls-chip.ls-subject")
        assert [int(c.get_attribute("data-pos")) for c in marked] == [2, 3, 4, 5]

        # Run, Cancel and Export are messages to the kernel.
        browser.find_element(By.CSS_SELECTOR, ".ls-run").click()
        assert browser.execute_script("return window.sent") == [{"action": "run"}]
        name = browser.find_element(By.CSS_SELECTOR, ".ls-export-name")
        name.clear()
        name.send_keys("eiffel")
        browser.find_element(By.CSS_SELECTOR, ".ls-export-png").click()
        browser.find_element(By.CSS_SELECTOR, ".ls-export-html").click()
        assert browser.execute_script("return window.sent.slice(1)") == [
            {"action": "export", "path": "eiffel.png"},
            {"action": "export", "path": "eiffel.html"},
        ]
        browser.execute_script("window.model.set('exported', 'eiffel.png')")
        assert browser.find_element(By.CSS_SELECTOR, ".ls-exported").text == "wrote eiffel.png"
    finally:
        explorer.close()
