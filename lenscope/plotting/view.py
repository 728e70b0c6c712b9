"""A lenscope figure in Jupyter with linked hover: a small anywidget view.

JupyterLab draws a plotly figure through its mimetype renderer, which runs
no page scripts, so the linked hover of a saved page
(:data:`~lenscope.plotting.LINKED_HOVER_JS`) cannot run there and each
panel of a :func:`~lenscope.plotting.plot_traces` comparison hovers alone.
:func:`show` wraps the figure in an anywidget (https://anywidget.dev:
JupyterLab, Notebook 7, VS Code) whose front end draws it with plotly.js and
calls the same linked-hover function as the saved page. plotly.js comes from
the kernel's plotly package, sent once per page as a widget message, so the
view works offline. The figure is drawn as built (its layout is made for
its width by :mod:`lenscope.plotting._layout`) and follows the output
area's width.
"""

import json
from typing import Any

import plotly.graph_objects as go

from lenscope.plotting._common import LINK_HOVER_FUNCTION, PAGE_CONFIG
from lenscope.validation import InvalidInputType

VIEW_INSTALL_HINT = 'pip install "lenscope[explore]"'
"""How to install anywidget, which :func:`show` needs."""

_ESM = """
const link = __LINK__;
const CONFIG = __CONFIG__;

function loadPlotly(model) {
  /* plotly.js once per page: from the page if it has it, else from the kernel. */
  if (window.Plotly) { return Promise.resolve(window.Plotly); }
  if (!window.__lenscopePlotly) {
    window.__lenscopePlotly = new Promise((resolve, reject) => {
      const receive = (msg, buffers) => {
        if (!msg || msg.type !== 'plotly-js') { return; }
        model.off('msg:custom', receive);
        /* plotly.js is a UMD bundle: hide an AMD loader so it sets window.Plotly. */
        const amd = window.define;
        window.define = undefined;
        try {
          const script = document.createElement('script');
          script.textContent = new TextDecoder().decode(buffers[0]);
          document.head.appendChild(script);
        } finally {
          window.define = amd;
        }
        if (window.Plotly) {
          resolve(window.Plotly);
        } else {
          reject(new Error('plotly.js did not load'));
        }
      };
      model.on('msg:custom', receive);
      model.send({type: 'plotly-js'});
    });
    window.__lenscopePlotly.catch(() => { window.__lenscopePlotly = null; });
  }
  return window.__lenscopePlotly;
}

async function render({ model, el }) {
  const div = document.createElement('div');
  div.className = 'lenscope-figure';
  el.appendChild(div);
  let Plotly;
  try {
    Plotly = await loadPlotly(model);
  } catch (error) {
    div.textContent = 'lenscope.show: ' + error.message;
    return;
  }
  const draw = () => {
    const spec = JSON.parse(model.get('figure'));
    return Plotly.react(div, spec.data, spec.layout || {}, CONFIG);
  };
  await draw();
  link(div, Plotly);
  model.on('change:figure', draw);
  /* JupyterLab resizes its panels without a window resize event. */
  const observer = new ResizeObserver(() => {
    if (div.offsetWidth && div._fullLayout) { Plotly.Plots.resize(div); }
  });
  observer.observe(el);
  return () => {
    observer.disconnect();
    model.off('change:figure', draw);
    Plotly.purge(div);
  };
}

export default { render };
"""


def view_esm() -> str:
    """The view's front end (an ES module): plotly.js loading, drawing and linked hover."""
    return _ESM.replace("__LINK__", LINK_HOVER_FUNCTION.strip()).replace(
        "__CONFIG__", json.dumps(PAGE_CONFIG)
    )


def show(fig: go.Figure) -> Any:
    """``fig`` as a Jupyter widget whose heatmap panels hover together.

    Hovering a cell of one panel outlines the same ``(token, layer)`` cell
    in every panel and writes their values beside it, as in a page written
    by :func:`~lenscope.plotting.save_html`. Make it the last expression of
    a cell. Needs anywidget (``pip install "lenscope[explore]"``); works
    offline (plotly.js comes from the installed plotly package).

    Args:
        fig: A plotly figure, e.g. from :func:`~lenscope.plotting.plot_traces`.

    Returns:
        A :class:`FigureView` widget; its ``figure`` trait is the figure as
        plotly JSON (set it to redraw).

    Raises:
        TypeError: ``fig`` is not a plotly figure.
        ImportError: anywidget is not installed.
    """
    if not isinstance(fig, go.Figure):
        raise InvalidInputType(
            f"show expects a plotly Figure; got {type(fig).__name__}; "
            "pass the figure returned by plot_trace, plot_traces or a result's .plot()"
        )
    return figure_view_class()(figure=fig.to_json())


_CLASS: list[type] = []


def figure_view_class() -> type:
    """The :class:`FigureView` class (defined on first use, when anywidget is imported)."""
    if not _CLASS:
        _CLASS.append(_define_view())
    return _CLASS[0]


def __getattr__(name: str) -> Any:
    if name == "FigureView":
        return figure_view_class()
    raise AttributeError(f"module 'lenscope.plotting.view' has no attribute {name!r}")


def _define_view() -> type:
    try:
        import anywidget
    except ImportError as e:
        raise ImportError(
            f"lenscope.show() needs anywidget, which is not installed: {VIEW_INSTALL_HINT} "
            "(or pip install anywidget); fig.show() and save_html work without it"
        ) from e
    import traitlets

    class FigureView(anywidget.AnyWidget):
        """A plotly figure whose heatmap panels hover together; build it with :func:`show`."""

        _esm = view_esm()
        figure = traitlets.Unicode("{}").tag(sync=True)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.on_msg(self._reply)

        def _reply(self, _widget: Any, content: Any, _buffers: Any) -> None:
            """Send plotly.js when the front end asks (a page that has none yet)."""
            if isinstance(content, dict) and content.get("type") == "plotly-js":
                from plotly.offline import get_plotlyjs

                self.send({"type": "plotly-js"}, buffers=[get_plotlyjs().encode("utf-8")])

    return FigureView
