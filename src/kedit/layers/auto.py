"""``layers="auto"``: the verified selector (default) or LGA / causal tracing on a small proxy set, cached.

The default proxy set is kedit's packaged demo facts (10 requests with true targets). A decision is
cached under ``$KEDIT_HOME/layers`` keyed by a hash of what changes the answer (model fingerprint,
method, targets, window, strategy settings, the proxy set's digest); it is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kedit.errors import BadRequest
from kedit.io import write_json
from kedit.layers.base import format_stability
from kedit.requests import EditRequest, read_requests

AUTO_STRATEGIES = ("verified", "lga", "causal")


def default_proxy() -> list[EditRequest]:
    """The packaged demo facts (``kedit/data/demo_facts.jsonl``)."""
    with resources.as_file(resources.files("kedit") / "data" / "demo_facts.jsonl") as path:
        return read_requests(path)


def proxy_digest(proxy: Sequence[EditRequest]) -> str:
    """Content digest of a proxy set (order matters: the verified selector edits the first ``m``)."""
    blob = json.dumps([r.to_dict() for r in proxy], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class AutoDecision:
    """What ``--layers auto`` chose, how, how stable, and where the decision is cached."""

    layers: list[int]
    strategy: str
    stability: dict[str, Any] | None
    path: Path | None
    cached: bool
    choice: dict[str, Any]

    def summary(self) -> str:
        """One line for the CLI."""
        where = f"{'cached at' if self.cached else 'saved to'} {self.path}" if self.path else "not cached"
        extra = ""
        cost = self.choice.get("details", {}).get("cost", {})
        if self.strategy == "verified" and cost.get("fraction_of_brute_force") is not None:
            extra = f", {cost['fraction_of_brute_force']:.2f}x the estimated brute-force time"
        return (f"--layers auto: layers {self.layers} by {self.strategy} ({format_stability(self.stability)}"
                f"{extra}); {where}")


def _selector(strategy: str, method: str, targets: str, window: int, stats: Any,
              editor_kwargs: dict[str, Any] | None) -> Any:
    from kedit.layers.lga import LGA
    from kedit.layers.trace import CausalTrace
    from kedit.layers.verified import Verified

    if strategy == "verified":
        return Verified(method=method, targets=targets, window=window, stats=stats,
                        editor_kwargs=dict(editor_kwargs or {}))
    if strategy == "lga":
        return LGA(window=window)
    if strategy == "causal":
        return CausalTrace(window=window)
    raise BadRequest(f"unknown --layers auto strategy {strategy!r}; choose one of {', '.join(AUTO_STRATEGIES)}")


def _editor_defaults(method: str) -> dict[str, Any]:
    """The defaults a decision was made under (solver hyperparameters, anchor settings, key weighting): part of
    the cache key, so a decision made before a default changed is not reused after it."""
    from kedit.editor import describe
    from kedit.optimize import AnchorConfig
    from kedit.solvers import make_solver
    from kedit.templates import DEFAULT_KEY_WEIGHTING

    return {"solver": describe(make_solver(method)), "anchor": describe(AnchorConfig()),
            "key_weighting": DEFAULT_KEY_WEIGHTING}


def resolve_auto(model: torch.nn.Module, tok: Any, method: str = "rome", targets: str = "forward",
                 window: int | None = None, proxy: Sequence[EditRequest] | None = None, strategy: str = "verified",
                 stats: Any = None, cache: bool = True, editor_kwargs: dict[str, Any] | None = None
                 ) -> AutoDecision:
    """Choose layers for ``method`` (one layer for single-layer methods, else a window of the editor's width).

    Returns the cached decision when one exists for the same model, method, targets, window, strategy
    and proxy set.
    """
    from kedit.arch import ArchitectureAdapter
    from kedit.editor import default_layers
    from kedit.models import kedit_home, model_fingerprint
    from kedit.solvers import SOLVERS

    adapter = ArchitectureAdapter.from_model(model)
    multi = getattr(SOLVERS.get(method), "multi_layer", True)
    window = window or (len(default_layers(adapter.n_layers, True)) if multi else 1)
    proxy = list(proxy) if proxy is not None else default_proxy()
    selector = _selector(strategy, method, targets, window, stats, editor_kwargs)
    # the stats themselves are not hashed (tensors): their spec is, below
    settings = {f.name: getattr(selector, f.name) for f in dataclasses.fields(selector)
                if f.name not in ("stats", "signal_proxy")}
    settings["default_edits"] = getattr(selector, "DEFAULT_EDITS", None)  # what edits=None stands for
    spec = {"fingerprint": model_fingerprint(model), "method": method, "targets": targets, "window": window,
            "strategy": strategy, "selector": settings, "stats": None if isinstance(stats, dict) else repr(stats),
            "proxy_digest": proxy_digest(proxy), "defaults": _editor_defaults(method)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = kedit_home() / "layers" / f"{digest}.json"
    if cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
            return AutoDecision(list(saved["layers"]), saved["strategy"], saved.get("stability"), path, True,
                                saved["choice"])
        except (ValueError, KeyError, OSError, TypeError):
            pass  # unreadable cache entry: recompute and overwrite
    choice = selector.select(model, adapter, tok, proxy)
    stability = choice.details.get("stability")
    out = choice.to_dict()
    if cache:
        write_json(path, {"layers": choice.layers, "strategy": strategy, "stability": stability, "spec": spec,
                          "choice": out}, default=str)
    return AutoDecision(choice.layers, strategy, stability, path if cache else None, False, out)


def auto_layers(model: torch.nn.Module, tok: Any, method: str = "rome", window: int | None = None,
                proxy: Sequence[EditRequest] | None = None, strategy: str = "verified", targets: str = "forward",
                stats: Any = None, cache: bool = True) -> list[int]:
    """The layers of :func:`resolve_auto`'s decision."""
    return resolve_auto(model, tok, method, targets, window, proxy, strategy, stats, cache).layers
