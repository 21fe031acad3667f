"""``layers="auto"``: LGA on a small proxy set, cached per model, method and window.

The default proxy set is kedit's packaged demo facts (10 requests with true targets). The cache
file lives under ``$KEDIT_HOME/layers`` and is keyed by a hash of everything that changes the
answer (model fingerprint, window, LGA settings, the proxy requests); it is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch

from kedit.io import write_json
from kedit.requests import EditRequest, read_requests


def default_proxy() -> list[EditRequest]:
    """The packaged demo facts (``kedit/data/demo_facts.jsonl``)."""
    with resources.as_file(resources.files("kedit") / "data" / "demo_facts.jsonl") as path:
        return read_requests(path)


def auto_layers(model: torch.nn.Module, tok: Any, method: str = "rome", window: int | None = None,
                proxy: Sequence[EditRequest] | None = None, k: float = 1.0, cache: bool = True) -> list[int]:
    """Layers chosen by LGA for ``method`` (one layer for ROME, else a window of the editor's default width).

    Returns the cached choice when one exists for the same model, settings and proxy set.
    """
    from kedit.arch import ArchitectureAdapter
    from kedit.editor import default_layers
    from kedit.layers.lga import LGA
    from kedit.models import kedit_home, model_fingerprint
    from kedit.solvers import SOLVERS

    adapter = ArchitectureAdapter.from_model(model)
    multi = getattr(SOLVERS.get(method), "multi_layer", True)
    window = window or (len(default_layers(adapter.n_layers, True)) if multi else 1)
    proxy = list(proxy) if proxy is not None else default_proxy()
    selector = LGA(k=k, window=window, predicted_true=True)
    spec = {"fingerprint": model_fingerprint(model), "selector": dataclasses.asdict(selector), "method": method,
            "proxy": [r.to_dict() for r in proxy]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = kedit_home() / "layers" / f"{digest}.json"
    if cache and path.is_file():
        try:
            return list(json.loads(path.read_text())["layers"])
        except (ValueError, KeyError, OSError):
            pass  # unreadable cache entry: recompute and overwrite
    choice = selector.select(model, adapter, tok, proxy)
    if cache:
        write_json(path, {"layers": choice.layers, "spec": spec, "choice": choice.to_dict()}, default=str)
    return choice.layers
