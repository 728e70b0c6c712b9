"""lenscope.show: the Jupyter widget that links hover across heatmap panels (issue 31).

Its drawing and hover are checked in a real JupyterLab by
``tests/test_view_jupyterlab.py``; these check the Python side.
"""

import json

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

import lenscope
from lenscope.plotting import LINKED_HOVER_JS, show
from lenscope.plotting._common import LINK_HOVER_FUNCTION
from lenscope.plotting.view import view_esm

pytest.importorskip("anywidget")


def _figure() -> go.Figure:
    fig = go.Figure()
    for i in range(2):
        fig.add_trace(go.Heatmap(z=[[i, 0.5], [0.25, 1.0]], x=[0, 1], y=[0, 1]))
    return fig


def test_show_carries_the_figure_as_plotly_json():
    fig = _figure()
    view = show(fig)
    assert lenscope.show is show
    drawn = json.loads(view.figure)
    assert [t["z"] for t in drawn["data"]] == [[[0, 0.5], [0.25, 1.0]], [[1, 0.5], [0.25, 1.0]]]
    assert go.Figure(drawn) == fig


def test_show_runs_the_saved_pages_linked_hover():
    """One linked-hover function for saved pages and the widget, so they cannot drift apart."""
    function = LINK_HOVER_FUNCTION.strip()
    assert function.startswith("function (gd, Plotly)")
    assert f"const link = {function};" in view_esm()
    assert LINKED_HOVER_JS.startswith(f"({function})(document.getElementById('{{plot_id}}')")


def test_show_sends_plotly_js_when_the_page_asks(monkeypatch):
    """plotly.js comes from the kernel's plotly package (offline), only when asked."""
    view = show(_figure())
    sent = []
    monkeypatch.setattr(view, "send", lambda content, buffers=None: sent.append((content, buffers)))
    view._reply(view, {"type": "something else"}, [])
    assert sent == []
    view._reply(view, {"type": "plotly-js"}, [])
    ((content, buffers),) = sent
    assert content == {"type": "plotly-js"}
    assert bytes(buffers[0]).decode("utf-8") == get_plotlyjs()


def test_show_refuses_what_is_not_a_figure():
    from test_plotting import unchecked  # lenscope's own check, not the test run's type checker

    with pytest.raises(TypeError, match=r"show expects a plotly Figure; got dict; pass the figure"):
        unchecked(show)({"data": []})


def test_show_without_anywidget_says_how_to_install(monkeypatch):
    import sys

    from lenscope.plotting import view

    monkeypatch.setitem(sys.modules, "anywidget", None)  # import anywidget raises ImportError
    monkeypatch.setattr(view, "_CLASS", [])
    with pytest.raises(
        ImportError,
        match=r'lenscope.show\(\) needs anywidget, which is not installed: pip install "lenscope\[',
    ):
        show(_figure())
