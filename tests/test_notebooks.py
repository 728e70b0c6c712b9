"""The environment the notebooks run in: progress bars are widgets, without warnings.

lenscope's progress bars use ``tqdm.auto``, which in a Jupyter kernel draws an
ipywidgets bar; without ipywidgets it prints ``TqdmWarning: IProgress not
found`` above every bar. The extras that install Jupyter therefore install
ipywidgets too.
"""

import os
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _needs_ipywidgets() -> None:
    """Skip locally without ipywidgets; in CI (``CI=true``) its absence is a failure."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        message = 'ipywidgets is not installed; pip install -e ".[test]" (or ".[notebook]")'
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {
        r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()
        for r in requirements
    }


@pytest.mark.parametrize("extra", ["test", "notebook"])
def test_extras_that_run_notebooks_install_ipywidgets(extra):
    names = _names(_extras()[extra])
    assert {"ipykernel", "ipywidgets"} <= names


def test_tqdm_finds_the_notebook_progress_widget():
    _needs_ipywidgets()
    from tqdm.notebook import IProgress

    # tqdm.auto warns "IProgress not found" exactly when this is None.
    assert IProgress is not None


def test_progress_bar_in_a_kernel_is_a_widget_without_warning():
    _needs_ipywidgets()
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='trace'):\n    pass"
        )
    ]
    # The kernel is this Python (ipykernel's own kernel spec), with this environment.
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    streams = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "IProgress not found" not in streams
    assert "TqdmWarning" not in streams
    widgets = [
        o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, f"no progress widget among the outputs: {outputs}"


def test_notebooks_are_committed_with_their_figures_also_as_png():
    """GitHub shows saved outputs but not plotly's: every saved figure has a static PNG beside
    it (``python scripts/execute_notebooks.py`` executes and saves them)."""
    import json

    for path in sorted((PYPROJECT.parent / "notebooks").glob("*.ipynb")):
        outputs = [o for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])]
        figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        assert figures, f"{path.name} is committed without its figures' outputs"
        assert all("image/png" in o["data"] for o in figures), (
            f"{path.name}: a figure lacks its PNG"
        )
