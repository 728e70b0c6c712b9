"""Building blocks shared by lenscope's plotly views (causal traces, lens views).

Token labels that keep whitespace visible and duplicates distinct, monospace
hover tables assembled from ``customdata`` + ``hovertemplate`` (the way
tuned-lens builds its trajectory plots), per-kind colour scales after ROME's
figures (Meng et al., 2022, arXiv 2202.05262: residual stream purple, MLP
green, attention red), figure sizing (figures fill the width of the notebook
cell or page; their natural width grows with the token count and sizes static
images), and export: a self-contained offline HTML page that resizes with the
window (plotly.js embedded, plus a small script that highlights the hovered
cell in every panel, under the figure a table of the settings it was drawn
from, and a ``<title>``; plotly.js inline, in a sibling file or from a CDN)
and optional static images through kaleido. Colour scales follow one rule:
a quantity that can be negative (a logit difference, an effect) gets a
diverging scale with white at zero and a symmetric range, anything else a
sequential scale from 0. Like every ``lenscope.plotting`` module it may
import plotly; nothing outside this package does.
"""

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from lenscope.validation import InvalidInput, InvalidInputType

NBSP = "\u00a0"
"""Padding character of hover tables: SVG text collapses runs of plain spaces."""

HOVER_FONT = {"family": "DejaVu Sans Mono, Menlo, Consolas, monospace", "size": 12}
"""Monospace font of every hover label, so the table columns line up."""

NAN_COLOR = "#e6e6e6"
"""Plot background, seen through the gaps that NaN (untraced) cells leave."""

KIND_COLORSCALES = {
    "resid_pre": "Purples",
    "resid_mid": "Purples",
    "resid_post": "Purples",
    "mlp_out": "Greens",
    "attn_out": "Reds",
}
"""Sequential colour scale of each hook-point kind, after ROME's figures."""

KIND_DIVERGING = {
    "resid_pre": "PuOr",
    "resid_mid": "PuOr",
    "resid_post": "PuOr",
    "mlp_out": "PiYG",
    "attn_out": "RdBu_r",
}
"""Diverging scale of each kind: white at zero, the kind's colour above, another colour below.

Residual stream purple over orange, MLP green over magenta, attention red
over blue (plotly's ``PuOr``, ``PiYG``, ``RdBu_r``).
"""

DEFAULT_DIVERGING = "RdBu_r"
"""Diverging scale of kinds without their own: red above zero, blue below."""

KIND_COLORS = {
    "resid_pre": "#54278f",
    "resid_mid": "#54278f",
    "resid_post": "#54278f",
    "mlp_out": "#006d2c",
    "attn_out": "#a50f15",
}
"""Dark end of each kind's sequential scale, for scales made of two kinds."""

KIND_LABELS = {
    "resid_pre": "residual stream (pre)",
    "resid_mid": "residual stream (mid)",
    "resid_post": "residual stream",
    "mlp_out": "MLP output",
    "attn_out": "attention output",
}
"""Human-readable name of each hook-point kind, for titles."""

_WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
_ELLIPSIS = "\u2026"


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ``ValueError`` unless ``value`` is one of ``choices``.

    Args:
        name: Argument name, for the message.
        value: The value received.
        choices: The allowed values.

    Raises:
        ValueError: ``value`` is not in ``choices``.
    """
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise InvalidInput(f"{name} must be one of {allowed}; got {value!r}; pass one of those")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an ``int`` >= 1 (or None when ``allow_none``).

    Args:
        name: Argument name, for the message.
        value: The value received.
        allow_none: Whether ``None`` is accepted.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is smaller than 1.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputType(
            f"{name} must be a positive int; got {value!r} ({type(value).__name__}); "
            f"pass e.g. {name}=1"
        )
    if value < 1:
        raise InvalidInput(f"{name} must be >= 1; got {value}; pass a positive int")


def escape(text: str) -> str:
    """Escape ``&``, ``<`` and ``>`` so plotly shows ``text`` instead of parsing it as HTML.

    Args:
        text: Any text, e.g. a token such as ``"<bos>"``.

    Returns:
        The text with plotly's pseudo-HTML special characters escaped.
    """
    return html.escape(text, quote=False)


def visible(text: str) -> str:
    """Make whitespace visible: space ``␣``, newline ``↵``, tab ``⇥``, CR ``␍``.

    Args:
        text: A token's decoded text.

    Returns:
        The text with each whitespace character replaced by a visible symbol,
        and ``∅`` for the empty string.
    """
    if text == "":
        return "\u2205"
    return "".join(_WHITESPACE.get(ch, ch) for ch in text)


def shorten(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, ending in ``…`` when cut.

    Args:
        text: The text to shorten.
        max_chars: Maximum length of the result (at least 2).

    Returns:
        ``text`` itself, or its first ``max_chars - 1`` characters and ``…``.
    """
    if len(text) <= max_chars:
        return text
    return text[: max(1, max_chars - 1)] + _ELLIPSIS


def token_labels(
    tokens: Sequence[str],
    *,
    marked: Iterable[int] = (),
    max_chars: int = 12,
    mark: str = "*",
) -> tuple[list[str], list[str]]:
    """Axis labels and hover texts for a row of tokens.

    Labels are meant for ``ticktext`` on a numeric axis whose ``tickvals`` are
    the positions, so two equal tokens stay two distinct columns (a
    categorical axis would merge them).

    Args:
        tokens: Decoded token strings, in order.
        marked: Positions to mark (the subject): their label gets ``mark``
            appended and is set in bold.
        max_chars: Longest label before it is shortened with an ellipsis.
        mark: Suffix of marked labels (ROME marks subject tokens with ``*``).

    Returns:
        ``(labels, full)``: short, escaped axis labels and the full, escaped,
        whitespace-visible text of each token for hover tables.
    """
    marked = set(marked)
    labels, full = [], []
    for pos, token in enumerate(tokens):
        shown = visible(token)
        label = escape(shorten(shown, max_chars))
        if pos in marked:
            label = f"<b>{label}{escape(mark)}</b>"
        labels.append(label)
        full.append(escape(shown))
    return labels, full


def pad(text: str, width: int, *, align: str = "left") -> str:
    """Pad ``text`` with non-breaking spaces to ``width`` characters.

    Args:
        text: Unescaped text (its length is what a monospace font shows).
        width: Target width in characters.
        align: ``"left"`` or ``"right"``.

    Returns:
        The escaped, padded text, ready for a hover label.
    """
    fill = NBSP * max(0, width - len(text))
    return escape(text) + fill if align == "left" else fill + escape(text)


def topk_lines(predictions: Sequence[tuple[str, float]], *, token_width: int = 14) -> list[str]:
    """Rows of a monospace top-k table: rank, visible token, probability in percent.

    Args:
        predictions: ``(token text, probability)`` pairs, best first.
        token_width: Column width for tokens; longer tokens are shortened.

    Returns:
        One escaped row per prediction, e.g. ``" 1 ␣Paris        43.2%"``.
    """
    rows = []
    for rank, (token, prob) in enumerate(predictions, start=1):
        shown = shorten(visible(token), token_width)
        rows.append(
            pad(str(rank), 2, align="right")
            + NBSP
            + pad(shown, token_width)
            + pad(format_percent(prob), 7, align="right")
        )
    return rows


def format_percent(value: float, *, signed: bool = False) -> str:
    """``0.4321`` -> ``"43.2%"``; NaN -> ``"n/a"``.

    Args:
        value: A fraction.
        signed: Whether to print a ``+`` for positive values.

    Returns:
        The value in percent with one decimal.
    """
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


def format_score(value: float) -> str:
    """Four significant digits, or ``"not traced"`` for NaN.

    Args:
        value: A metric value.

    Returns:
        The formatted value.
    """
    if math.isnan(value):
        return "not traced"
    return f"{value:.4g}"


def stride_keep_last(n: int, stride: int) -> list[int]:
    """Indices ``0, stride, 2*stride, ...`` of ``range(n)``, always ending with ``n - 1``.

    Args:
        n: Number of rows (layers).
        stride: Step between kept rows.

    Returns:
        The kept indices in increasing order (the last row is never dropped,
        so the output layer stays visible, as in tuned-lens).
    """
    kept = list(range(0, n, stride))
    if kept and kept[-1] != n - 1:
        kept.append(n - 1)
    return kept


def panel_size(n_cols: int, n_rows: int) -> tuple[int, int]:
    """Pixel size of one heatmap panel's plotting area, growing with its cells.

    Args:
        n_cols: Number of token columns.
        n_rows: Number of layer rows shown.

    Returns:
        ``(width, height)`` of the plotting area in pixels: 34 px per token
        (clamped to 200..1400) and 24 px per layer (clamped to 160..900).
    """
    width = min(1400, max(200, 34 * n_cols))
    height = min(900, max(160, 24 * n_rows))
    return width, height


def figure_size(
    n_cols: int, n_rows: int, *, panels: int = 1, label_chars: int = 8
) -> tuple[int, int]:
    """Default ``(width, height)`` of a figure of ``panels`` side-by-side heatmaps.

    Args:
        n_cols: Token columns per panel.
        n_rows: Layer rows per panel.
        panels: Number of panels in one row.
        label_chars: Length of the longest token label, to leave room for the
            rotated tick labels below the plot.

    Returns:
        Width and height in pixels, margins and colour bars included.
    """
    width, height = panel_size(n_cols, n_rows)
    per_panel = width + 110  # colour bar and its tick labels
    total_width = 80 + panels * per_panel
    total_height = height + 110 + 7 * min(label_chars, 16)
    return int(total_width), int(total_height)


FIT_WIDTH = 960
"""Figure width in pixels down to which the pixel gaps between panels are kept in full.

Figures have no fixed width: they fill the notebook cell or page. The gaps
between side-by-side panels hold a colour bar or tick labels and need a set
number of pixels, but plotly spaces subplots by fractions of the width, so
the fractions are computed for a figure this wide (a 1,024-pixel window, or a
notebook on a laptop screen). Wider figures get wider gaps; narrower ones
squeeze the gaps as well as the panels.
"""


def fit_width(width: int | None, natural_width: int) -> dict[str, Any]:
    """Layout entries that make a figure as wide as its container unless ``width`` fixes it.

    With ``autosize`` and no ``width`` plotly draws the figure as wide as the
    notebook output area or the page (resizing with the window in a page
    written by :func:`save_html`). The natural width is kept in the layout's
    ``meta`` so that :func:`save_image` gives static images that size.

    Args:
        width: The caller's fixed width in pixels, or ``None`` to fit.
        natural_width: The width the figure's panels need at their natural
            size, in pixels.

    Returns:
        ``autosize``, ``width`` and ``meta`` entries for ``fig.update_layout``.
    """
    return {
        "autosize": True,
        "width": width,
        "meta": {"lenscope_width": int(width or natural_width)},
    }


def natural_width(fig: go.Figure) -> int | None:
    """The width recorded by :func:`fit_width`, or ``None`` for another figure.

    Args:
        fig: A plotly figure.

    Returns:
        The figure's natural (or fixed) width in pixels, if lenscope made it.
    """
    meta = fig.layout.meta
    if isinstance(meta, dict) and isinstance(meta.get("lenscope_width"), int):
        return meta["lenscope_width"]
    return None


def figure_margins(label_chars: int = 8) -> dict[str, int]:
    """Layout margins matching :func:`figure_size`.

    Args:
        label_chars: Length of the longest token label.

    Returns:
        A ``layout.margin`` dict.
    """
    return {"l": 70, "r": 30, "t": 80, "b": 40 + 7 * min(label_chars, 16)}


LINK_HOVER_FUNCTION = r"""
function (gd, Plotly) {
  /* lenscope linked hover: when a cell of one heatmap panel is hovered, the
     same (token, layer) cell is outlined in every panel, with its value
     written beside it, while the hovered panel shows its full hover table.
     Plotly has no cross-subplot hover link (and Fx.hover draws one label
     per call across subplots), so this listens to plotly_hover and adds
     layout shapes and annotations through Plotly.relayout. Offline: it only
     uses the plotly.js already in the page. A sibling panel's value is the
     text of its own hover's score field (trace meta lenscope_linked_field,
     an index into customdata), so it reads in the hover's unit; without
     one, the colour's value, in percent where the colour bar shows percent. */
  if (!gd || !gd.on || !Plotly) { return; }
  var TAG = 'lenscope-linked-hover';
  function own(items) {
    return (items || []).filter(function (item) { return item.name !== TAG; });
  }
  function bounds(values, k) {
    /* Edges of row k of a heatmap: half way to its neighbours. */
    var n = values.length;
    var below = k > 0 ? values[k] - values[k - 1] : (n > 1 ? values[1] - values[0] : 1);
    var above = k < n - 1 ? values[k + 1] - values[k] : (n > 1 ? values[n - 1] - values[n - 2] : 1);
    return [values[k] - below / 2, values[k] + above / 2];
  }
  function label(i, t, row, col) {
    var input = gd.data[i] || {}, meta = input.meta || {};
    var field = meta.lenscope_linked_field, cells = input.customdata;
    if (field !== undefined && cells && cells[row] && cells[row][col]) {
      return String(cells[row][col][field]);
    }
    var z = t.z[row][col];
    if (z === null || z === undefined || isNaN(z)) { return 'not traced'; }
    /* No hover field named: the colour's value, in percent where its colour bar is. */
    var bar = t.coloraxis ? (gd._fullLayout[t.coloraxis] || {}).colorbar : t.colorbar;
    var format = (bar && bar.tickformat) || '', type = format.slice(-1);
    if (type === '%' || type === 'p') {
      return (format.charAt(0) === '+' && z > 0 ? '+' : '') + (100 * z).toFixed(1) + '%';
    }
    return Number(z).toPrecision(4);
  }
  var current = null;
  gd.on('plotly_hover', function (event) {
    var point = event && event.points && event.points[0];
    if (!point || !point.data || point.data.type !== 'heatmap') { return; }
    var key = point.x + ',' + point.y;
    if (key === current) { return; }
    current = key;
    var shapes = own(gd.layout.shapes), notes = own(gd.layout.annotations), panels = 0;
    gd._fullData.forEach(function (t, i) {
      if (t.type !== 'heatmap') { return; }
      var col = Array.prototype.indexOf.call(t.x, point.x);
      var row = Array.prototype.indexOf.call(t.y, point.y);
      if (col < 0 || row < 0) { return; }
      panels += 1;
      var ys = bounds(Array.prototype.slice.call(t.y), row);
      shapes.push({name: TAG, type: 'rect', xref: t.xaxis, yref: t.yaxis,
                   x0: point.x - 0.5, x1: point.x + 0.5, y0: ys[0], y1: ys[1],
                   line: {color: '#000000', width: 2.5}, layer: 'above'});
      if (i !== point.curveNumber) {
        notes.push({name: TAG, xref: t.xaxis, yref: t.yaxis, x: point.x + 0.5, y: point.y,
                    xanchor: 'left', showarrow: false, bgcolor: 'rgba(255,255,255,0.9)',
                    bordercolor: '#000000', borderwidth: 1,
                    font: {family: 'DejaVu Sans Mono, Menlo, Consolas, monospace', size: 11},
                    text: label(i, t, row, col)});
      }
    });
    if (panels > 1) { Plotly.relayout(gd, {shapes: shapes, annotations: notes}); }
  });
  gd.on('plotly_unhover', function () {
    current = null;
    var shapes = gd.layout.shapes || [], notes = gd.layout.annotations || [];
    if (own(shapes).length !== shapes.length || own(notes).length !== notes.length) {
      Plotly.relayout(gd, {shapes: own(shapes), annotations: own(notes)});
    }
  });
}
"""
"""The linked-hover JavaScript: a function of a plotly div and ``Plotly``.

:data:`LINKED_HOVER_JS` (saved pages) and :func:`~lenscope.plotting.show`
(Jupyter) both call it, so the two link hover the same way.
"""

LINKED_FIELD = "lenscope_linked_field"
"""Key of a heatmap trace's ``meta``: the ``customdata`` field linked hover writes beside a cell."""

LINKED_HOVER_JS = (
    "(" + LINK_HOVER_FUNCTION.strip() + ")(document.getElementById('{plot_id}'), window.Plotly);"
)
"""Post-script of :func:`save_html` that links hover across heatmap panels.

Hovering a cell outlines the same ``(token, layer)`` cell in every panel of
a :func:`~lenscope.plotting.plot_traces` figure and writes the sibling
panels' values beside it (their hover's score text). In JupyterLab, whose
output area runs no scripts, :func:`~lenscope.plotting.show` draws the
figure in a small widget that runs the same code.
"""


def symmetric_range(grids: Iterable[Any]) -> tuple[float, float]:
    """``(-m, m)`` with ``m`` the largest absolute finite value (a tiny span if there is none).

    Args:
        grids: Numpy arrays of values (NaN for untraced cells).

    Returns:
        The ``(zmin, zmax)`` of a diverging scale centred at zero.
    """
    import numpy as np

    span = 0.0
    for grid in grids:
        values = np.asarray(grid, dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size:
            span = max(span, float(np.abs(finite).max()))
    span = span if span > 0 else 1e-6
    return -span, span


def two_colour_scale(low_kind: str, high_kind: str) -> list[list[Any]]:
    """A diverging scale from ``low_kind``'s colour through white to ``high_kind``'s.

    Args:
        low_kind: The kind whose colour marks negative values.
        high_kind: The kind whose colour marks positive values.

    Returns:
        A plotly colour scale.
    """
    low = KIND_COLORS.get(low_kind, "#2166ac")
    high = KIND_COLORS.get(high_kind, "#b2182b")
    return [[0.0, low], [0.5, "#ffffff"], [1.0, high]]


PAGE_KEY = "lenscope_page"
"""Key in a figure's ``layout.meta`` under which lenscope keeps its page title and settings."""


def set_page_info(
    fig: go.Figure,
    title: str,
    columns: Sequence[str],
    rows: Sequence[tuple[str, Sequence[str]]],
) -> None:
    """Record the page title and settings table that :func:`save_html` writes for ``fig``.

    Args:
        fig: The figure (its ``layout.meta`` keeps :func:`fit_width`'s entries).
        title: Plain-text page title.
        columns: Column heads of the settings table (one per panel; one empty
            head for a single panel).
        rows: ``(setting, values)`` with one value per column.
    """
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    fig.layout.meta = {
        **meta,
        PAGE_KEY: {
            "title": title,
            "columns": list(columns),
            "rows": [[name, [str(v) for v in values]] for name, values in rows],
        },
    }


def page_info(fig: go.Figure) -> dict[str, Any] | None:
    """The page title and settings :func:`set_page_info` recorded, or ``None``."""
    meta = fig.layout.meta
    if isinstance(meta, dict) and isinstance(meta.get(PAGE_KEY), dict):
        return meta[PAGE_KEY]
    return None


def settings_table(info: dict[str, Any]) -> str:
    """The settings recorded by :func:`set_page_info` as an HTML table, every text escaped.

    A value that every column shares spans the columns, so a difference
    between panels stands out.
    """
    columns = info["columns"]
    head = ""
    if len(columns) > 1:
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = []
    for name, values in info["rows"]:
        if len(set(values)) == 1:
            cells = f'<td colspan="{len(values)}">{html.escape(values[0])}</td>'
        else:
            cells = "".join(f"<td>{html.escape(v)}</td>" for v in values)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f'<table class="lenscope-settings">{head}{"".join(body)}</table>'


PLOTLY_JS = ("inline", "file", "cdn")
"""Where a page written by :func:`save_html` gets plotly.js: embedded, a sibling file, a CDN."""


def plotly_js_file() -> str:
    """Name of the sibling plotly.js file that ``plotly_js="file"`` writes (versioned)."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


def plotly_js_source(plotly_js: str, folder: Path) -> Any:
    """The ``include_plotlyjs`` argument for ``plotly_js``, writing the sibling file if asked.

    Args:
        plotly_js: ``"inline"``, ``"file"`` or ``"cdn"``.
        folder: The page's folder (where ``"file"`` puts plotly.js).

    Returns:
        ``True`` (embed), ``"cdn"``, or the sibling file's name.
    """
    check_choice("plotly_js", plotly_js, PLOTLY_JS)
    if plotly_js == "inline":
        return True
    if plotly_js == "cdn":
        return "cdn"
    from plotly.offline import get_plotlyjs

    name = plotly_js_file()
    target = folder / name
    source = get_plotlyjs()
    if not target.is_file() or target.stat().st_size != len(source.encode("utf-8")):
        target.write_text(source, encoding="utf-8")
    return name


PAGE_STYLE = (
    "body{font-family:'DejaVu Sans',Arial,sans-serif;margin:16px;}"
    "table{border-collapse:collapse;font-size:13px;}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;"
    "overflow-wrap:anywhere;}"
    "table{max-width:100%;}"
)
"""CSS of lenscope's HTML pages (settings and summary tables)."""


def html_page(title: str, body: str) -> str:
    """A complete HTML page with ``title`` (escaped here) and ``body`` (HTML, used as is)."""
    return (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


PAGE_CONFIG = {"displaylogo": False, "responsive": True}
"""plotly.js config of exported pages: no plotly logo; the figure follows the window's width."""


def save_html(
    fig: go.Figure,
    path: str | Path,
    *,
    linked_hover: bool = True,
    plotly_js: str = "inline",
) -> Path:
    """Write ``fig`` as an HTML page: the figure, then the settings it was drawn from.

    By default the page is self-contained and works offline: plotly.js is
    embedded (about 4.7 MB of the file; no MathJax). ``plotly_js="file"``
    writes plotly.js once as a sibling file (``plotly-<version>.min.js``,
    shared by every page in the folder) and links it; ``"cdn"`` links
    plotly's CDN (the page then needs a network). The page's ``<title>`` and
    the table under the figure come from the figure's provenance, which
    every lenscope plotting function records (the model, prompt, corruption,
    direction, metric, window, ...). A figure without a fixed ``width``
    (lenscope's default) spans the page and follows the window's width.
    With ``linked_hover`` a small script (:data:`LINKED_HOVER_JS`) outlines
    the hovered cell in every panel of a
    :func:`~lenscope.plotting.plot_traces` comparison.

    Args:
        fig: The figure, e.g. from :func:`~lenscope.plotting.plot_trace`.
        path: Where to write; parent folders are created.
        linked_hover: Whether to add the linked-hover script (a no-op on
            figures with a single heatmap).
        plotly_js: ``"inline"`` (default, offline), ``"file"`` (a sibling
            file) or ``"cdn"``.

    Returns:
        The path written.

    Raises:
        TypeError: ``fig`` is not a plotly figure.
        ValueError: ``plotly_js`` is not one of the three.
    """
    if not isinstance(fig, go.Figure):
        raise InvalidInputType(
            f"save_html expects a plotly Figure; got {type(fig).__name__}; "
            "pass the figure returned by plot_trace or plot_traces"
        )
    check_choice("plotly_js", plotly_js, PLOTLY_JS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = fig.to_html(
        include_plotlyjs=plotly_js_source(plotly_js, path.parent),
        include_mathjax=False,
        full_html=False,
        post_script=[LINKED_HOVER_JS] if linked_hover else None,
        config=PAGE_CONFIG,
        default_width="100%",
    )
    info = page_info(fig)
    title = info["title"] if info else _plain_title(fig)
    table = f"<h2>Settings</h2>\n{settings_table(info)}" if info else ""
    path.write_text(html_page(title, f"{figure}\n{table}"), encoding="utf-8")
    return path


def _plain_title(fig: go.Figure) -> str:
    """The figure's title without its markup, for the page ``<title>`` of a foreign figure."""
    import re

    text = fig.layout.title.text or "lenscope figure"
    text = re.sub(r"<br\s*/?>", " · ", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def save_image(fig: go.Figure, path: str | Path, **kwargs: Any) -> Path:
    """Write ``fig`` as a static image (PNG, SVG, PDF, ...) through kaleido.

    A lenscope figure fits its container's width on screen; as an image it
    gets its natural width (it grows with the tokens) unless ``width`` is
    passed.

    Args:
        fig: The figure.
        path: Where to write; the suffix picks the format.
        **kwargs: Passed on to ``fig.write_image`` (``scale``, ``width``, ...).

    Returns:
        The path written.

    Raises:
        ImportError: kaleido is not installed.
        TypeError: ``fig`` is not a plotly figure.
    """
    if not isinstance(fig, go.Figure):
        raise InvalidInputType(
            f"save_image expects a plotly Figure; got {type(fig).__name__}; "
            "pass the figure returned by plot_trace or plot_traces"
        )
    try:
        import kaleido  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "static image export needs the optional package kaleido, which is not "
            "installed; install it with `pip install kaleido` (it also needs a "
            "Chrome/Chromium), or use save_html for an interactive offline file"
        ) from e
    if "width" not in kwargs and fig.layout.width is None and natural_width(fig) is not None:
        kwargs["width"] = natural_width(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_image(path, **kwargs)
    return path
