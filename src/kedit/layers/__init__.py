"""Layer selection (METHODS §7): which block's W_out to edit, chosen from data instead of by hand.

A selector is a frozen dataclass of settings with ``name`` and
``select(model, adapter, tok, proxy) -> LayerChoice``; it never leaves the model changed
(weights, ``requires_grad`` flags and train/eval mode are as they were). Shared helpers live in
kedit.layers.base, which the selector modules import (never this package, so there is no import cycle).
"""

from kedit.layers.base import (
    LayerChoice,
    LayerSelector,
    best_window,
    bootstrap_stability,
    candidate_layers,
    check_proxy,
    tukey_fences,
    window_starts,
)
from kedit.layers.lga import LGA
from kedit.layers.search import BruteForce
from kedit.layers.trace import CausalTrace
from kedit.layers.verified import Verified

SELECTORS: dict[str, type] = {"lga": LGA, "brute": BruteForce, "causal": CausalTrace, "verified": Verified}

__all__ = ["SELECTORS", "LGA", "BruteForce", "CausalTrace", "Verified", "LayerChoice", "LayerSelector",
           "best_window", "bootstrap_stability", "candidate_layers", "check_proxy", "tukey_fences", "window_starts"]
