"""Figure layout from the width a figure will be seen at: panel grids, titles, token ticks, folds.

Plotly positions subplots, colour bars and gaps in fractions of the plotting
area, and a figure has no width until a browser draws it. lenscope therefore
lays every figure out for one width in pixels, its *layout width*: the
caller's ``width=`` (the figure is then drawn exactly that wide), or
:data:`LAYOUT_WIDTH` (the figure then fills its notebook cell or page). A
layout made for width ``W`` stays correct at every container wider than
``W``: the pixel-sized parts (margins, colour bars, tick and title text) keep
their size while the fractional ones (panels, the gaps that hold colour bars)
only grow, so nothing that did not collide at ``W`` can collide wider. That
is why the default is the narrowest width people work at (JupyterLab beside
its file browser on a 1,024-pixel laptop: a 577-pixel output area) and not a
guess of the usual one. It works the same in a saved page and in JupyterLab,
whose output area runs no scripts (a JavaScript relayout would only work in
saved pages). Pass ``width=`` the width of your output area to get panels
side by side on a wide screen.

At its layout width a figure: puts panels side by side while each gets
:data:`MIN_PANEL` pixels and every token column :data:`MIN_COLUMN` pixels,
else wraps them into rows (one per row at the narrowest); keeps a pixel gap
right of each panel for its colour bar; wraps its title into lines that fit
below the plotly toolbar's band; shows token labels level when they fit,
else vertical, thinned to every k-th column (the subject and the last token
always labelled); and folds a prompt too long for its columns (see
:func:`fold_columns`). This module holds no plotly code beyond numbers for
``layout`` entries; it computes nothing about models.
"""

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

LAYOUT_WIDTH = 540
"""Width in pixels that figures without ``width=`` are laid out for.

A 577-pixel JupyterLab output area, less the page's margins and a scrollbar.
"""

MIN_PANEL = 160
"""Narrowest plotting area of one heatmap panel, in pixels."""

MIN_COLUMN = 14
"""Narrowest token column before panels wrap into rows or the prompt folds."""

LABEL_PITCH = 16
"""Pixels between two vertical tick labels (12-pixel text and a gap)."""

CHAR_PX = 7.0
"""Width of one character of 12-pixel DejaVu Sans, an upper bound for tick labels."""

BAR_GAP = 110
"""Pixels right of a panel for its colour bar: offset, bar, tick labels, rotated title."""

TOOLBAR_BAND = 44
"""Pixels at the top kept free of text for plotly's toolbar (it shows on hover)."""

TITLE_PX = {17: 10.0, 12: 7.0}
"""Width of one character at the title's two font sizes (bold 17 px, subtitle 12 px)."""


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where ``n`` panels go at one layout width: rows, columns and pixel sizes.

    Attributes:
        width: The layout width in pixels.
        rows: Rows of panels.
        cols: Panels per row.
        panel_w: Plotting-area width of one panel.
        panel_h: Plotting-area height of one panel.
        hgap: Pixels between two panels of a row (the left one's colour bar).
        vgap: Pixels between two rows (tick labels of the upper, title of the lower).
        margin: ``layout.margin``.
    """

    width: int
    rows: int
    cols: int
    panel_w: float
    panel_h: int
    hgap: int
    vgap: int
    margin: dict[str, int]

    @property
    def height(self) -> int:
        """Figure height: margins, panels and the gaps between rows."""
        inner = self.rows * self.panel_h + (self.rows - 1) * self.vgap
        return int(self.margin["t"] + inner + self.margin["b"])

    def spacing(self) -> dict[str, float]:
        """``horizontal_spacing`` and ``vertical_spacing`` for ``make_subplots``."""
        inner_w = self.cols * self.panel_w + (self.cols - 1) * self.hgap
        inner_h = self.rows * self.panel_h + (self.rows - 1) * self.vgap
        return {
            "horizontal_spacing": self.hgap / inner_w if self.cols > 1 else 0.0,
            "vertical_spacing": self.vgap / inner_h if self.rows > 1 else 0.0,
        }

    def specs(self, n_panels: int) -> list[list[dict[str, object] | None]]:
        """``make_subplots`` specs: a cell for each of ``n_panels``, none for the empty rest."""
        return [
            [{} if r * self.cols + c < n_panels else None for c in range(self.cols)]
            for r in range(self.rows)
        ]

    def position(self, index: int) -> tuple[int, int]:
        """1-based ``(row, col)`` of panel ``index``, left to right, top to bottom."""
        return index // self.cols + 1, index % self.cols + 1


def layout_width(width: int | None) -> int:
    """The width to lay out for: the caller's, else :data:`LAYOUT_WIDTH`."""
    return int(width) if width is not None else LAYOUT_WIDTH


def plan_grid(
    n_panels: int,
    n_columns: int,
    n_layers: int,
    *,
    width: int,
    tick_px: int,
    panel_title_px: int = 22,
    left: int = 70,
    bar_gap: int = BAR_GAP,
    row_px: int = 24,
) -> Grid:
    """Rows and columns of ``n_panels`` heatmaps at ``width`` pixels (see the module docstring).

    Args:
        n_panels: Number of panels.
        n_columns: Token columns per panel (after folding).
        n_layers: Layer rows per panel.
        width: Layout width in pixels.
        tick_px: Height of the token tick labels under a panel.
        panel_title_px: Height of a panel title (0 for a single panel).
        left: Left margin (layer tick labels and axis title).
        bar_gap: Pixels right of each panel for its colour bar.
        row_px: Pixels per layer row.

    Returns:
        The grid.
    """
    need = max(MIN_PANEL, MIN_COLUMN * n_columns)
    cols = n_panels
    while cols > 1 and (width - left - cols * bar_gap) / cols < need:
        cols -= 1
    rows = math.ceil(n_panels / cols)
    panel_w = max(40.0, (width - left - cols * bar_gap) / cols)
    panel_h = min(600, max(160, row_px * n_layers))
    title_px = panel_title_px if n_panels > 1 else 0
    margin = {"l": left, "r": bar_gap, "t": title_px, "b": tick_px + 30}
    return Grid(
        width=width,
        rows=rows,
        cols=cols,
        panel_w=panel_w,
        panel_h=panel_h,
        hgap=bar_gap,
        vgap=tick_px + 30 + title_px,
        margin=margin,
    )


_TAG = re.compile(r"(<[^>]+>|&[#\w]+;|\s+)")


def wrap_markup(line: str, max_chars: int) -> list[str]:
    """Break one line of plotly markup at spaces so that no piece shows over ``max_chars``.

    Tags count as nothing and entities (``&amp;``) as one character; a word
    longer than the limit gets a line of its own. Plotly carries ``<b>``
    and ``<span style>`` across the ``<br>`` this is joined with.
    """
    pieces = [p for p in _TAG.split(line) if p]
    lines: list[str] = []
    current, count = "", 0
    for piece in pieces:
        if piece.startswith("<") and piece.endswith(">"):
            current += piece
            continue
        if piece.isspace():
            if count >= max_chars:
                lines.append(current)
                current, count = "", 0
            elif count:
                current += " "
                count += 1
            continue
        size = 1 if piece.startswith("&") else len(piece)
        if count and count + size > max_chars:
            lines.append(current.rstrip())
            current, count = "", 0
        current += piece
        count += size
    lines.append(current)
    return [line for line in lines if line.strip()] or [line]


def wrap_axis_title(text: str, length_px: float | int) -> tuple[str, int]:
    """An axis title broken into lines no longer than ``length_px``, and its line count."""
    lines = wrap_markup(text, max(8, int(length_px / CHAR_PX)))
    return "<br>".join(lines), len(lines)


def toolbar_title(text: str, fig_height: int) -> dict[str, object]:
    """``layout.title`` of a wrapped title: left-aligned, below the band the toolbar shows in."""
    return {
        "text": text,
        "x": 0,
        "xanchor": "left",
        "xref": "container",
        "pad": {"l": 12},
        "y": 1 - TOOLBAR_BAND / fig_height,
        "yanchor": "top",
        "yref": "container",
    }


def wrap_title(text: str, width: int) -> tuple[str, int]:
    """A title in lenscope's form (bold first line, 12-pixel subtitle lines) wrapped to ``width``.

    Returns:
        The wrapped text and its height in pixels.
    """
    parts = re.split(r"<br\s*/?>", text)
    out, height = [], 0
    for index, part in enumerate(parts):
        size = 17 if index == 0 else 12
        limit = max(12, int((width - 24) / TITLE_PX[size]))
        pieces = wrap_markup(part, limit)
        out.extend(pieces)
        # Plotly spaces every line of a title by the title's own (17-pixel) font.
        height += len(pieces) * 24
    return "<br>".join(out), height


@dataclasses.dataclass(frozen=True)
class Ticks:
    """Token tick labels of one axis: which columns are labelled, at which angle.

    Attributes:
        tickvals: Labelled columns.
        ticktext: Their labels.
        angle: 0 (level) or -90 (vertical).
        height: Pixels the labels take under the axis.
    """

    tickvals: list[int]
    ticktext: list[str]
    angle: int
    height: int


def _shown_length(label: str) -> int:
    text = re.sub(r"<[^>]+>", "", label)
    return len(re.sub(r"&[#\w]+;", "x", text))


def token_ticks(labels: Sequence[str], column_px: float | int, always: Sequence[int] = ()) -> Ticks:
    """Labels that fit ``column_px`` pixels per column: level, else vertical and thinned.

    Level when every label fits its column; otherwise vertical, and when
    columns are narrower than :data:`LABEL_PITCH` only every k-th column is
    labelled, plus the columns in ``always`` (the subject, the last token),
    whose neighbours within k give way.

    Args:
        labels: One label per column (plotly markup).
        column_px: Pixels per column at the layout width.
        always: Columns that keep their label.

    Returns:
        The ticks.
    """
    n = len(labels)
    longest = max((_shown_length(label) for label in labels), default=1)
    if longest * CHAR_PX + 6 <= column_px:
        return Ticks(list(range(n)), list(labels), 0, 20)
    stride = max(1, math.ceil(LABEL_PITCH / max(column_px, 1e-9)))
    forced = sorted({c for c in always if 0 <= c < n})
    kept = set(forced)
    for column in range(0, n, stride):
        if all(abs(column - f) >= stride for f in forced):
            kept.add(column)
    vals = sorted(kept)
    return Ticks(vals, [labels[c] for c in vals], -90, int(longest * CHAR_PX) + 8)


def fold_columns(
    n_pos: int, budget: int, importance: np.ndarray, keep: Sequence[int]
) -> list[list[int]]:
    """Token columns of a prompt too long for ``budget`` columns: kept positions and folded runs.

    A long prompt (30 to 200 tokens) in a few hundred pixels cannot give every
    token a readable column, and a scrollable axis hides the tokens that
    matter behind a scroll. So the positions that carry an effect keep their
    own column and each run of the others between them is folded into one
    labelled column (``⋯7``), which shows, per layer, the folded cell
    furthest from the panel's typical value: a strong cell cannot hide in a
    fold. The positions in ``keep`` (the subject, the last token) always get
    their own column; the others are taken by falling ``importance`` while
    the columns (kept positions plus folds) fit ``budget``.

    Args:
        n_pos: Number of token positions.
        budget: Most columns that fit.
        importance: ``[pos]`` how far each position's cells reach from the
            typical value (higher: keep first).
        keep: Positions that always get their own column.

    Returns:
        The columns in order, each a list of positions (one for a kept
        position, several for a fold); every position appears once.
    """
    if n_pos <= budget:
        return [[p] for p in range(n_pos)]
    kept = {p for p in keep if 0 <= p < n_pos}

    def count(chosen: set[int]) -> int:
        runs = sum(1 for p in range(n_pos) if p not in chosen and (p == 0 or p - 1 in chosen))
        return len(chosen) + runs

    order = np.argsort(-np.nan_to_num(importance, nan=-np.inf), kind="stable")
    for p in order.tolist():
        if p in kept:
            continue
        if count(kept | {p}) > budget:
            continue
        kept.add(p)
    columns: list[list[int]] = []
    for p in range(n_pos):
        if p in kept or not columns or columns[-1][0] in kept:
            columns.append([p])
        else:
            columns[-1].append(p)
    return columns


def importance(grids: Sequence[np.ndarray]) -> np.ndarray:
    """``[pos]`` largest distance of a position's cells from its panel's median, per panel max.

    Each panel's distances are divided by that panel's largest, so a weak
    panel's peak counts as much as a strong one's.
    """
    total = None
    for grid in grids:
        values = np.asarray(grid, dtype=float)
        finite = values[np.isfinite(values)]
        centre = float(np.median(finite)) if finite.size else 0.0
        distance = np.abs(np.nan_to_num(values - centre, nan=0.0))
        top = float(distance.max()) if distance.size else 0.0
        per_pos = distance.max(axis=0) / top if top > 0 else distance.max(axis=0)
        total = per_pos if total is None else np.maximum(total, per_pos)
    return total if total is not None else np.zeros(0)


def fold_representatives(grid: np.ndarray, columns: Sequence[Sequence[int]]) -> np.ndarray:
    """``[row, column]`` position shown in each column: itself, or a fold's furthest cell.

    Args:
        grid: ``[row, pos]`` values (NaN: not traced).
        columns: From :func:`fold_columns`.

    Returns:
        Integer positions, one per row and column.
    """
    values = np.asarray(grid, dtype=float)
    finite = values[np.isfinite(values)]
    centre = float(np.median(finite)) if finite.size else 0.0
    distance = np.nan_to_num(np.abs(values - centre), nan=-1.0)
    out = np.empty((values.shape[0], len(columns)), dtype=int)
    for c, positions in enumerate(columns):
        block = distance[:, positions]
        out[:, c] = np.asarray(positions)[block.argmax(axis=1)]
    return out
