"""Interactive plotly views of lenscope results.

Computation lives in the result objects (:mod:`lenscope.results`); this
package only draws them, and is the one place that imports plotly.
:func:`plot_trace` draws one causal trace as a ROME-style heatmap (Meng et
al., 2022, arXiv 2202.05262) with a hover table per cell,
:func:`plot_traces` compares hook-point kinds side by side,
:func:`plot_head_trace` draws a per-head trace as a ``layer x head`` grid
and :func:`plot_unit_trace` any trace whose cells are units of a layer
(heads, neurons, ...) as a ``layer x unit`` grid,
:func:`plot_attention` the clean and corrupted patterns of chosen heads,
:func:`plot_lens_comparison` draws a tuned lens's per-layer quality against
the logit lens, and
:func:`save_html` / :func:`save_image` export figures for use outside
Jupyter (offline HTML with linked hover; static images through kaleido),
and :func:`show` draws a figure in Jupyter with the same linked hover.
"""

from lenscope.plotting._common import LINKED_HOVER_JS, save_html, save_image
from lenscope.plotting.attention import plot_attention
from lenscope.plotting.dataset import plot_dataset, save_dataset_report
from lenscope.plotting.heads import plot_head_trace
from lenscope.plotting.lens import plot_lens
from lenscope.plotting.trace import plot_trace, plot_traces
from lenscope.plotting.tuned import plot_lens_comparison
from lenscope.plotting.units import plot_unit_trace
from lenscope.plotting.view import show

__all__ = [
    "LINKED_HOVER_JS",
    "plot_attention",
    "plot_dataset",
    "plot_head_trace",
    "plot_lens",
    "plot_lens_comparison",
    "plot_trace",
    "plot_traces",
    "plot_unit_trace",
    "save_dataset_report",
    "save_html",
    "save_image",
    "show",
]
