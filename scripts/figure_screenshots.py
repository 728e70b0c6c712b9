"""Render the README's 577-pixel figure screenshots (issue 31) on the real offline model.

Three figures of Gemma-3-270m (4-bit weights; :func:`lenscope.load_model`, no
network), each written by :func:`lenscope.save_html` and shot in Debian's
headless Chromium (through ``scripts/screenshot.py``'s driver; selenium-manager
never downloads anything) in a window 577 pixels wide, the output area of
JupyterLab beside its file browser on a 1,024-pixel laptop:

* ``docs/fig_trace_577.png``: ROME's three kinds of "The Statue of Liberty is
  located in" (Gaussian noise, 10 samples, seed 0, the whole answer " New York
  City"), with the pointer on the MLP panel's peak cell, so the linked hover
  outlines that cell in all three panels and writes their values in percent;
* ``docs/fig_str_577.png``: ``tracer.patch`` (STR) of the Eiffel Tower against
  the Colosseum, ``resid_pre``: normalised logit difference against " Rome";
* ``docs/fig_60_tokens_577.png``: the same patch behind a 50-token preamble of
  other landmarks, a 60-token prompt, folded to fit.

Traces are saved in ``--results`` and reused on a re-run::

    python scripts/figure_screenshots.py --results /tmp/figs   # ~10 minutes on a CPU
"""

import argparse
import time
from pathlib import Path

from screenshot import chromium, hover_cell, trace

WIDTH = 577
"""The window's width in CSS pixels."""

STATUE = ("The Statue of Liberty is located in", "The Statue of Liberty", " New York City")
PROMPT = "The Eiffel Tower is located in the city of"
COUNTERFACTUAL = "The Colosseum is located in the city of"
PREAMBLE = (
    "Big Ben is located in the city of London, the Space Needle is located in the city of "
    "Seattle, the Golden Gate Bridge is located in San Francisco, and the Brandenburg Gate "
    "is located in the city of Berlin. Of all the landmarks in Europe, "
)
"""Put before both STR prompts to make a 60-token prompt (Gemma's tokenizer, BOS included)."""


def patched(model, prompt: str, counterfactual: str, cache: Path | None, name: str):
    """``tracer.patch`` of ``prompt`` against ``counterfactual``, reused from ``cache``."""
    import lenscope

    path = None if cache is None else cache / f"{name}.json"
    if path is not None and path.exists():
        result = lenscope.TraceResult.load(path)
        if result.prompt == prompt:
            return result
    tracer = lenscope.CausalTracer(model(), progress=True)
    result = tracer.patch(prompt, counterfactual, kind="resid_pre", foil=" Rome")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
    return result


def shot(fig, out: Path, *, hover: tuple[int, int, int] | None = None) -> Path:
    """Save ``fig`` as ``out``'s HTML page and its plot, at :data:`WIDTH` pixels, as PNG.

    Args:
        fig: A lenscope figure (laid out for 577 pixels by default).
        out: Output path without suffix.
        hover: ``(panel, column, layer)`` under the pointer for the shot.

    Returns:
        The PNG's path.
    """
    from selenium.webdriver.common.by import By

    from lenscope.plotting import save_html

    html = save_html(fig, out.with_suffix(".html"), plotly_js="file")
    height = int(fig.layout.height) + 60
    driver = chromium(WIDTH, height, 2.0)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": height, "deviceScaleFactor": 2.0, "mobile": False},
        )
        driver.get(html.resolve().as_uri())
        for _ in range(200):
            if driver.execute_script(
                "const gd = document.querySelector('.js-plotly-plot');"
                "return !!(gd && gd._fullLayout && gd.calcdata);"
            ):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # plotly follows the viewport's width
        if hover is not None:
            hover_cell(driver, hover)
        png = out.with_suffix(".png")
        driver.find_element(By.CSS_SELECTOR, ".js-plotly-plot").screenshot(str(png))
    finally:
        driver.quit()
    return png


def main() -> None:
    """Trace (or reuse), export and screenshot; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="folder to keep traces in")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the PNGs")
    parser.add_argument("--html", type=Path, default=None, help="folder of the HTML pages")
    args = parser.parse_args()

    import lenscope
    from lenscope.plotting import plot_trace, plot_traces

    loaded = []

    def model():
        if not loaded:
            loaded.append(lenscope.load_model("gemma-3-270m", device="cpu"))
        return loaded[0]

    pages = args.html or Path(args.results or args.out) / "html"
    prompt, subject, answer = STATUE
    statue = trace(
        "gemma-3-270m",
        prompt,
        subject,
        10,
        0,
        None if args.results is None else args.results / "statue",
        answer,
    )
    layer, pos, _ = statue["mlp_out"].peak()
    fig = plot_traces(statue)
    png = shot(fig, pages / "fig_trace_577", hover=(1, pos, layer))
    png.replace(args.out / "fig_trace_577.png")

    str_ = patched(model, PROMPT, COUNTERFACTUAL, args.results, "str_eiffel")
    png = shot(plot_trace(str_), pages / "fig_str_577")
    png.replace(args.out / "fig_str_577.png")

    long = patched(
        model, PREAMBLE + PROMPT, PREAMBLE + COUNTERFACTUAL, args.results, "str_eiffel_60"
    )
    print(f"long prompt: {long.n_pos} tokens")
    png = shot(plot_trace(long), pages / "fig_60_tokens_577")
    png.replace(args.out / "fig_60_tokens_577.png")
    print(f"wrote {args.out}/fig_{{trace,str,60_tokens}}_577.png; pages in {pages}")


if __name__ == "__main__":
    main()
