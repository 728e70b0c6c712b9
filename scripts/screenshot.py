"""Render the README's causal-trace figure: three hook-point kinds on the real offline model.

Loads Gemma-3-270m with :func:`lenscope.load_model` (no network), traces
ROME's Eiffel Tower prompt (Meng et al., 2022, arXiv 2202.05262) for
``resid_post``, ``mlp_out`` and ``attn_out`` with
:meth:`lenscope.CausalTracer.trace_kinds`, writes the interactive comparison
as a self-contained HTML file and screenshots it with headless Chromium
(Debian's ``chromium`` and ``chromium-driver``; selenium-manager is never
asked to download anything)::

    python scripts/screenshot.py                 # docs/trace_eiffel.{html,png}
    python scripts/screenshot.py --hover mlp_out # with the hover table of the peak MLP cell
    python scripts/screenshot.py --results /tmp/eiffel  # keep the traces for a re-run
    python scripts/screenshot.py --prompt "The Statue of Liberty is located in" \
        --subject "The Statue of Liberty" --answer " New York City" --hover mlp_out \
        --out docs/trace_statue                   # an answer of three tokens, teacher-forced
"""

import argparse
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KINDS = ("resid_post", "mlp_out", "attn_out")


def trace(
    model_name: str,
    prompt: str,
    subject: str,
    samples: int,
    seed: int,
    cache: Path | None = None,
    answer: str | None = None,
):
    """``{kind: TraceResult}`` of ``prompt`` on ``model_name``, reusing ``cache`` if it exists.

    Tracing Gemma-3-270m on a CPU takes tens of minutes, so the results are
    saved to ``cache/<kind>.json`` (when given) and read back on the next run.
    """
    import lenscope
    from lenscope.loading import load_model

    if cache is not None and all((cache / f"{kind}.json").exists() for kind in KINDS):
        results = {kind: lenscope.TraceResult.load(cache / f"{kind}.json") for kind in KINDS}
        settings = {(r.model_name, r.prompt, r.samples, r.seed) for r in results.values()}
        if (
            len(settings) == 1
            and next(iter(settings))[2:] == (samples, seed)
            and next(iter(settings))[1] == prompt
            and (answer is None or all(r.answer == answer for r in results.values()))
        ):
            print(f"reusing the traces saved in {cache}")
            return results
    model = load_model(model_name, device="cpu")
    tracer = lenscope.CausalTracer(model, progress=True)
    results = tracer.trace_kinds(
        prompt, subject=subject, kinds=KINDS, samples=samples, seed=seed, answer=answer
    )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for kind, result in results.items():
            result.save(cache / f"{kind}.json")
    return results


def chromium(width: int, height: int, scale: float):
    """A headless Chromium with a throw-away profile and a ``width`` x ``height`` window."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tempfile.mkdtemp(prefix='lenscope-chromium-')}",
        f"--window-size={width},{height}",
        f"--force-device-scale-factor={scale}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def hover_cell(driver, hover: tuple[int, int, int]) -> None:
    """Move the pointer onto cell ``(layer, pos)`` of trace ``hover[0]`` of the page's figure
    (twice, a pixel apart: plotly shows a hover on a move, not on a jump)."""
    import time

    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = driver.execute_script(
        """const gd = document.querySelector('.js-plotly-plot');
        const t = gd._fullData[arguments[0]];
        const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')];
        const ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
        const box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(arguments[1]),
                box.top + ya._offset + ya.l2p(arguments[2])];""",
        *hover,
    )
    for nudge in (0, 1):
        action = ActionBuilder(driver)
        action.pointer_action.move_to_location(int(x) + nudge, int(y))
        action.perform()
        time.sleep(0.5)


def screenshot(
    html: Path,
    png: Path,
    *,
    width: int,
    height: int,
    scale: float,
    hover: tuple[int, int, int] | None = None,
) -> Path:
    """Open ``html`` in headless Chromium and save the plot as ``png``.

    Args:
        html: A page written by :func:`lenscope.plotting.save_html`.
        png: Where to write the screenshot.
        width: Figure width in CSS pixels.
        height: Figure height in CSS pixels.
        scale: Device pixel ratio (2 gives a sharp image on high-DPI screens).
        hover: ``(panel, pos, layer)`` of a cell to hover before the shot.

    Returns:
        ``png``.
    """
    from selenium.webdriver.common.by import By

    driver = chromium(width + 40, height + 40, scale)
    try:
        # The window size of headless Chromium is not its viewport; fix the viewport itself.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": width + 40,
                "height": height + 40,
                "deviceScaleFactor": scale,
                "mobile": False,
            },
        )
        driver.get(html.resolve().as_uri())
        for _ in range(200):
            if driver.execute_script(
                "const gd = document.querySelector('.js-plotly-plot');"
                "return !!(gd && gd._fullLayout && gd.calcdata);"
            ):
                break
            time.sleep(0.1)
        driver.execute_script(
            "const s = document.createElement('style');"
            "s.textContent = '.modebar-container { display: none !important; }';"
            "document.head.appendChild(s);"
        )
        if hover is not None:
            hover_cell(driver, hover)
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.find_element(By.CSS_SELECTOR, ".js-plotly-plot").screenshot(str(png))
    finally:
        driver.quit()
    return png


def main() -> None:
    """Trace, export and screenshot; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer", default=None, help="default: the clean top-1 token")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/trace_eiffel"),
        help="output path without suffix; .html and .png are written",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder to save the traces in and reuse them from on a re-run",
    )
    parser.add_argument("--scale", type=float, default=2.0, help="device pixel ratio of the PNG")
    parser.add_argument("--width", type=int, default=1100, help="the figure's width in pixels")
    parser.add_argument(
        "--hover",
        choices=KINDS,
        default=None,
        help="hover the peak cell of this kind's panel before the screenshot",
    )
    args = parser.parse_args()

    from lenscope.plotting import plot_traces, save_html

    results = trace(
        args.model, args.prompt, args.subject, args.samples, args.seed, args.results, args.answer
    )
    for kind, result in results.items():
        layer, pos, score = result.peak()
        print(
            f"{kind:>10}: peak {score:.3f} at layer {layer}, token {result.tokens[pos]!r} "
            f"(clean {result.clean_score:.3f}, corrupted {result.corrupted_score:.3f})"
        )
    fig = plot_traces(results, width=args.width)
    html = save_html(fig, args.out.with_suffix(".html"))
    hover = None
    if args.hover is not None:
        layer, pos, _ = results[args.hover].peak()
        hover = (KINDS.index(args.hover), pos, layer)
    png = screenshot(
        html,
        args.out.with_suffix(".png"),
        width=fig.layout.width,
        height=fig.layout.height,
        scale=args.scale,
        hover=hover,
    )
    print(f"wrote {html} and {png}")


if __name__ == "__main__":
    main()
