"""Per-request anchor cache: requests are optimised independently (METHODS §4), so each is stored alone.

An entry is one request's anchor row at one layer, keyed by the sha256 of everything it depends on:
the weights as they are now (fingerprint: sequential editing changes them), the tokenizer, the layer,
the request's prompt, subject and new target, the context templates and the anchor settings that change
the result (``AnchorConfig.result_fields``: chunking is left out, it only moves float rounding). A later
batch optimises only its missing requests and assembles the anchors in request order.

``AnchorStore`` keeps entries in a dict (pass the same dict to several editors, e.g. one per solver)
and, given a directory instead, also on disk: one safetensors file per entry named by its key, checked
(key and sha256) on read and written atomically, so that a long benchmark resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.errors import NotWritable, warn_cache_unwritable
from kedit.io import atomic_write
from kedit.optimize import AnchorConfig, Anchors
from kedit.requests import EditRequest

_TENSORS = ("z", "h", "delta")
_SCALARS = ("nll_start", "nll_end", "steps", "norm")


@dataclass(frozen=True)
class AnchorRow:
    """One request's anchor at one layer (a row of ``Anchors``)."""

    z: torch.Tensor      # [d] h + delta
    h: torch.Tensor      # [d]
    delta: torch.Tensor  # [d]
    nll_start: float
    nll_end: float
    steps: float
    norm: float          # the norm clamp and decay used (||h|| or ||mlp_out||)
    site: str
    extra: dict[str, Any] = field(default_factory=dict)  # of the run that optimised it (replay, world_size)


def anchor_key(fingerprint: str, tokenizer: str, layer: int, request: EditRequest, templates: list[str],
               cfg: AnchorConfig) -> str:
    """sha256 (hex) of what one request's anchor depends on."""
    spec = {"fingerprint": fingerprint, "tokenizer": tokenizer, "layer": layer, "prompt": request.prompt,
            "subject": request.subject, "target_new": request.target_new, "templates": list(templates),
            "anchor": cfg.result_fields()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def split_rows(a: Anchors) -> list[AnchorRow]:
    """The rows of ``a`` (CPU tensors), one per request."""
    norm = a.norm if a.norm is not None else a.h.norm(dim=-1)
    return [AnchorRow(a.z[i].cpu(), a.h[i].cpu(), a.delta[i].cpu(), float(a.nll_start[i]), float(a.nll_end[i]),
                      float(a.steps[i]), float(norm[i]), a.site, dict(a.extra)) for i in range(a.z.shape[0])]


def join_rows(layer: int, rows: list[AnchorRow], seconds: float = 0.0, flops: float = 0.0,
              extra: dict[str, Any] | None = None) -> Anchors:
    """``Anchors`` made of ``rows`` in their order."""
    vec = lambda name: torch.tensor([getattr(r, name) for r in rows])  # noqa: E731
    extra = extra if extra is not None else {"replay": all(r.extra.get("replay", False) for r in rows)}
    return Anchors(layer, torch.stack([r.z for r in rows]), torch.stack([r.h for r in rows]),
                   torch.stack([r.delta for r in rows]), vec("nll_start"), vec("nll_end"), vec("steps"),
                   seconds, flops, extra, norm=vec("norm"), site=rows[0].site)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class AnchorStore:
    """Anchor rows by key: in ``memory`` (a dict, possibly shared) and, with ``directory``, on disk too."""

    def __init__(self, backing: dict | str | os.PathLike):
        if isinstance(backing, dict):
            self.memory, self.directory = backing, None
        else:
            self.memory, self.directory = {}, Path(backing)
            if self.directory.exists() and not self.directory.is_dir():
                raise NotWritable(f"anchor cache {self.directory} is a file, not a directory")

    def path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"anchor-{key[:32]}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether a row is stored under ``key`` (not verified: ``get`` may still reject a damaged file)."""
        return key in self.memory or (self.directory is not None and self.path(key).exists())

    def get(self, key: str) -> AnchorRow | None:
        """The row stored under ``key``, or None; a damaged or foreign file is reported and ignored."""
        if key in self.memory:
            return self.memory[key]
        if self.directory is None or not self.path(key).exists():
            return None
        from safetensors import safe_open

        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["kedit_anchor"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            warnings.warn(f"anchor cache {path} is unreadable ({type(e).__name__}: {e}); recomputing it", stacklevel=2)
            return None
        if meta.get("key") != key or meta.get("sha256") != _checksum(tensors):
            warnings.warn(f"anchor cache {path} is corrupt or written for another key; recomputing it", stacklevel=2)
            return None
        row = AnchorRow(*(tensors[t] for t in _TENSORS), *(float(tensors[s]) for s in _SCALARS),
                        site=meta["site"], extra=meta["extra"])
        self.memory[key] = row
        return row

    def put(self, key: str, row: AnchorRow) -> None:
        """Store ``row`` under ``key`` (on disk as well when the store has a directory)."""
        self.memory[key] = row
        if self.directory is None:
            return
        from safetensors.torch import save_file

        tensors = {t: getattr(row, t).detach().float().contiguous() for t in _TENSORS}
        tensors.update({s: torch.tensor([float(getattr(row, s))]) for s in _SCALARS})
        meta = {"kedit_anchor": json.dumps({"key": key, "sha256": _checksum(tensors), "site": row.site,
                                            "extra": row.extra}, default=str)}
        path = self.path(key)
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as e:  # read-only directory: keep the work in memory
            warn_cache_unwritable("anchor", path, e)
