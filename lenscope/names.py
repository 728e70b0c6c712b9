"""The names a user types, written once: kinds, metrics, position sets.

Torch-free (the command line parses with it before torch loads); the
modules that give the names meaning (:mod:`lenscope.hooks`,
:mod:`lenscope.sites`, :mod:`lenscope.metrics`, :mod:`lenscope.settings`)
import them from here, and tests check that each name has its meaning
(every metric name a binder in :data:`lenscope.metrics.BINDERS`).
"""

KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
"""Residual-width hook-point types, ``blocks.L.hook_<kind>`` (TransformerLens ``get_act_name``)."""

DEFAULT_KINDS: tuple[str, ...] = ("resid_post", "mlp_out", "attn_out")
"""The hook-point types of ROME's Figure 1."""

HEAD_KINDS: tuple[str, ...] = ("z", "q", "k", "v", "pattern")
"""Per-head activations (``blocks.L.attn.hook_<kind>``), named as ``get_act_name`` names them."""

HEAD_BY: tuple[str, ...] = ("head", "head_pos")
"""How a per-head kind is traced: a head at every position, or a head at one position."""

NEURON_KINDS: tuple[str, ...] = ("mlp_post",)
"""Per-neuron activations: ``mlp_post`` is ``blocks.L.mlp.hook_post`` (``get_act_name("post")``)."""

NEURON_BY: tuple[str, ...] = ("neuron", "neuron_pos")
"""How a per-neuron kind is traced: a neuron at every traced position, or at one position."""

METRIC_NAMES: tuple[str, ...] = (
    "prob",
    "log_prob",
    "logit_diff",
    "normalized_logit_diff",
    "normalized_prob",
    "kl_div",
)
"""Every metric a trace can name."""

FOIL_METRICS: tuple[str, ...] = ("logit_diff", "normalized_logit_diff")
"""Metrics that compare the answer with a foil token."""
