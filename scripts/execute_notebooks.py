"""Execute the notebooks in place so that they are committed with their outputs.

GitHub renders a notebook's saved outputs but not plotly's interactive output
(``application/vnd.plotly.v1+json``), so every figure is saved twice: the
interactive figure for Jupyter, and a static PNG beside it for GitHub and other
viewers. plotly's renderer ``plotly_mimetype+png`` writes both; the PNG comes
from kaleido, which drives the Debian ``chromium`` the browser tests use (no
browser download). The notebooks' own code does not change: plotly reads the
renderer from ``PLOTLY_RENDERER``, which this script sets for the kernel. CI
runs the notebooks without it (nbmake, outputs discarded), so it needs neither
kaleido nor the PNGs.

    pip install kaleido        # once
    python scripts/execute_notebooks.py                    # every notebook
    python scripts/execute_notebooks.py notebooks/01_quickstart.ipynb
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def execute(path: Path, timeout: int) -> float:
    """Run every cell of ``path`` in a fresh kernel from the notebook's folder; save it."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Execute the notebooks given (default: all of notebooks/)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype+png"
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        seconds = execute(path.resolve(), args.timeout)
        print(f"{path}: executed in {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
