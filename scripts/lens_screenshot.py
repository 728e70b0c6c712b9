"""Render the README's lens figure: the Eiffel Tower prediction trajectory on the offline model.

Loads Gemma-3-270m with :func:`lenscope.loading.load_model` (no network),
computes the logit-lens trajectory (nostalgebraist, 2020; drawn the way
tuned-lens draws them, Belrose et al., 2023, arXiv 2303.08112) of ROME's
Eiffel Tower prompt with :func:`lenscope.lens.lens_trajectory`, writes the
interactive plot as a self-contained HTML file, and screenshots it with
headless Chromium's ``--screenshot`` (Debian's ``chromium``)::

    python scripts/lens_screenshot.py                          # docs/lens_eiffel.{html,png}
    python scripts/lens_screenshot.py --statistic answer_prob  # another statistic
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
# Hides plotly's toolbar in the screenshot only; the HTML keeps it.
_HIDE_MODEBAR = "<style>.modebar-container { display: none !important; }</style>"


def screenshot(html: Path, png: Path, *, width: int, height: int, scale: float) -> Path:
    """Screenshot ``html`` (a page from ``save_html``) with headless Chromium.

    Args:
        html: The page.
        png: Where to write the screenshot.
        width: Window width in CSS pixels (the figure's width).
        height: Window height in CSS pixels (the figure's height).
        scale: Device pixel ratio (2 gives a sharp image on high-DPI screens).

    Returns:
        ``png``.
    """
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(
            f"headless Chromium is needed at {CHROMIUM} for the PNG, but it is missing; "
            "install it with `apt-get install chromium`, or use the HTML file alone"
        )
    page = Path(tempfile.mkdtemp(prefix="lenscope-shot-")) / "page.html"
    page.write_text(html.read_text().replace("</head>", _HIDE_MODEBAR + "</head>", 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={page.parent / 'profile'}",
            f"--force-device-scale-factor={scale}",
            "--virtual-time-budget=10000",
            f"--window-size={width},{height}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return png


def main() -> None:
    """Compute the trajectory, write the HTML and the PNG, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--component", default="resid_post")
    parser.add_argument("--statistic", default="entropy")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/lens_eiffel"),
        help="path without suffix; .html and .png are written",
    )
    parser.add_argument("--scale", type=float, default=2.0)
    args = parser.parse_args()

    from lenscope.lens import lens_trajectory
    from lenscope.loading import load_model
    from lenscope.plotting._common import save_html

    start = time.perf_counter()
    model = load_model(args.model, device="cpu")
    loaded = time.perf_counter()
    traj = lens_trajectory(model, PROMPT, component=args.component, subject=SUBJECT)
    done = time.perf_counter()
    print(
        f"model loaded in {loaded - start:.1f} s; trajectory "
        f"({traj.n_layers} layers x {traj.n_pos} tokens, d_vocab={model.cfg.d_vocab}) "
        f"in {done - loaded:.2f} s"
    )
    print(
        f"answer {traj.answer!r}: p={float(traj.answer_prob[-1, -1]):.3f}; final-layer "
        f"top-1 at the last position {traj.top_predictions(traj.n_layers - 1, -1)[0]}"
    )
    first = next(
        (layer for layer in range(traj.n_layers) if int(traj.answer_rank[layer, -1]) == 1), None
    )
    print(f"first layer whose top-1 at the last position is the answer: {first}")

    fig = traj.plot(statistic=args.statistic)
    html = save_html(fig, args.out.with_suffix(".html"))
    png = screenshot(
        html,
        args.out.with_suffix(".png"),
        width=int(fig.layout.width),
        height=int(fig.layout.height),
        scale=args.scale,
    )
    print(f"wrote {html} and {png}")


if __name__ == "__main__":
    main()
