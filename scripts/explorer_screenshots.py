"""Take the README's pictures of the notebook explorer on Gemma-3-270m (no network).

Runs ``lenscope.explore(model)`` on ROME's Eiffel Tower prompt (three kinds,
``--samples`` noise copies) and snapshots the widget's state twice: mid-run,
while a kind's exact cells stream in over its attribution estimate, and after
the run, with the peak ``attn_out`` cell clicked and its per-head breakdown
shown. Each snapshot is drawn by the widget's own front end
(:func:`lenscope.explorer.widget_page`) in headless Chromium (Debian's
``chromium`` and ``chromedriver``, through selenium) and the widget is
screenshot; the second with the pointer on an ``mlp_out`` cell, so that the
linked hover outlines the same cell in the other kinds::

    python scripts/explorer_screenshots.py   # docs/explorer_streaming.png, docs/explorer_cell.png
"""

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import lenscope
from lenscope.explorer import widget_page

PROMPT = "The Eiffel Tower is located in the city of"


def _driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument("--force-device-scale-factor=1.5")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=options)


def shoot(state: dict, png: Path, *, hover: tuple[str, int, int] | None = None) -> Path:
    """Draw ``state`` with the widget's front end and screenshot the widget into ``png``."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "explorer.html"
        page.write_text(widget_page(state))
        driver = _driver(1500, 1400)
        try:
            driver.get(page.as_uri())
            if hover is not None:
                kind, layer, pos = hover
                cell = driver.find_element(
                    By.CSS_SELECTOR,
                    f'.ls-grid[data-kind="{kind}"] .ls-cell[data-layer="{layer}"]'
                    f'[data-pos="{pos}"]',
                )
                ActionChains(driver).move_to_element(cell).perform()
            png.parent.mkdir(parents=True, exist_ok=True)
            driver.find_element(By.CSS_SELECTOR, ".lenscope-explorer").screenshot(str(png))
        finally:
            driver.quit()
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    model = lenscope.load_model("gemma-3-270m")
    explorer = lenscope.explore(model, prompt=PROMPT, samples=args.samples, lens=False)
    explorer.wait()
    streaming: list[dict] = []

    def snapshot(change: dict) -> None:
        # mlp_out half streamed: resid_post exact, mlp_out refining, attn_out estimated.
        maps = {m["kind"]: m for m in change["new"]}
        mlp = maps.get("mlp_out", {})
        if not streaming and mlp.get("partial") and mlp["done"] >= mlp["cells"] // 2:
            streaming.append(copy.deepcopy(explorer.get_state()))

    explorer.observe(snapshot, "heatmaps")
    run = explorer.run(wait=True)
    explorer.unobserve(snapshot, "heatmaps")
    shoot(streaming[0], args.out / "explorer_streaming.png")
    layer, pos, _ = run.results["attn_out"].peak()
    explorer.cell = {"run": 0, "kind": "attn_out", "layer": int(layer), "pos": int(pos)}
    explorer._show_heads(explorer.cell)  # what the per-head button asks for
    mlp_layer, mlp_pos, _ = run.results["mlp_out"].peak()
    shoot(
        explorer.get_state(),
        args.out / "explorer_cell.png",
        hover=("mlp_out", int(mlp_layer), int(mlp_pos)),
    )
    explorer.close()
    print(f"wrote {args.out / 'explorer_streaming.png'} and {args.out / 'explorer_cell.png'}")


if __name__ == "__main__":
    main()
