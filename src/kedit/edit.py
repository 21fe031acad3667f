"""Edit: exactly what an application changed, as an object that can be undone, saved and re-applied.

Per layer it keeps the weight delta (a low-rank factorisation where the solver gives one), plus the
requests and the run record. ``apply`` checks every target parameter (shape and exact digest of
the base weights) before writing any; ``undo`` restores bit-identical weights from the copies taken
at apply time. A patch file is one ``.safetensors`` file whose metadata holds the JSON record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kedit.arch import ArchitectureAdapter
from kedit.errors import EditFailed, KeditError
from kedit.io import atomic_write
from kedit.models import tensor_digest
from kedit.requests import EditRequest, request_from_record
from kedit.solvers import Delta

FORMAT = "kedit-edit/1"


class Edit:
    """A set of per-layer weight deltas with provenance; bound to a model while applied."""

    def __init__(self, requests: list[EditRequest], record: dict[str, Any]):
        self.requests = list(requests)
        self.record = record
        self.deltas: dict[int, Delta] = {}
        self.base_digests: dict[int, str] = {}
        self._adapter: ArchitectureAdapter | None = None
        self._originals: dict[int, torch.Tensor] = {}
        self._on_undo: Callable[[], None] | None = None
        # in memory only (not saved): what the editor solved, for diagnostics and tests
        self.problems: dict[int, Any] = {}
        self.targets: Any = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.deltas)

    @property
    def is_applied(self) -> bool:
        return self._adapter is not None

    # -- writing weights -------------------------------------------------------------------------
    def _write(self, adapter: ArchitectureAdapter, layer: int, delta: Delta) -> None:
        """Add ``delta`` to W_out(layer), keeping the original for undo. Same arithmetic everywhere."""
        w = adapter.w_out(layer)
        self._originals[layer] = w.detach().clone()
        adapter.add_to_w_out(layer, delta.dense().to(torch.float64).to(w.dtype))

    def add_layer(self, adapter: ArchitectureAdapter, layer: int, delta: Delta) -> None:
        """Editor use: record and apply one layer's delta (the edit becomes bound to the model)."""
        if not delta.is_finite():
            raise EditFailed(f"the solver produced a non-finite (NaN/inf) update for layer {layer}")
        self._adapter = adapter
        self.base_digests[layer] = tensor_digest(adapter.w_out(layer))
        self.deltas[layer] = Delta(**{k: v.detach().cpu() for k, v in
                                      {"U": delta.U, "V": delta.V, "dense_": delta.dense_}.items() if v is not None})
        self._write(adapter, layer, delta)

    def apply(self, model, force: bool = False) -> Edit:
        """Apply to ``model`` (all or nothing). Raises EditFailed if a weight differs from the base."""
        if self.is_applied:
            raise KeditError("this edit is already applied; undo() it first")
        adapter = ArchitectureAdapter.from_model(model, probe=False)
        for layer, delta in self.deltas.items():  # check everything before writing anything
            if layer >= adapter.n_layers:
                raise EditFailed(f"edit touches layer {layer} but the model has {adapter.n_layers} layers")
            if (delta.U is not None and (delta.U.shape[0], delta.V.shape[0]) != (adapter.d_model, adapter.d_ff)) or \
               (delta.dense_ is not None and tuple(delta.dense_.shape) != (adapter.d_model, adapter.d_ff)):
                raise EditFailed(f"layer {layer}: delta shape does not match W_out [{adapter.d_model}, {adapter.d_ff}]")
            if not force and tensor_digest(adapter.w_out(layer)) != self.base_digests[layer]:
                raise EditFailed(
                    f"layer {layer}: the model's W_out differs from the weights this edit was made on "
                    "(another model, or already edited); pass force=True to apply anyway"
                )
        try:
            self._adapter = adapter
            for layer in self.layers:
                self._write(adapter, layer, self.deltas[layer])
        except Exception as e:
            self.undo()
            raise EditFailed(f"applying the edit failed ({e}); all layers restored") from e
        return self

    def undo(self) -> None:
        """Restore every touched weight bit for bit (no-op if not applied)."""
        if self._adapter is None:
            return
        with torch.no_grad():
            for layer, original in self._originals.items():
                self._adapter.w_out(layer).copy_(original)
        self._originals.clear()
        self._adapter = None
        if self._on_undo is not None:
            self._on_undo()
            self._on_undo = None

    @contextmanager
    def applied(self, model) -> Iterator[Edit]:
        """``with edit.applied(model): ...`` applies on entry and undoes on exit."""
        self.apply(model)
        try:
            yield self
        finally:
            self.undo()

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` patch (tensors + JSON metadata) atomically; returns the path."""
        path = Path(path)
        tensors = {f"layer{layer}.{k}": v.contiguous() for layer, d in self.deltas.items()
                   for k, v in d.tensors().items()}
        meta = {"format": FORMAT, "record": self.record, "base_digests": self.base_digests,
                "requests": [r.to_dict() for r in self.requests]}
        meta_json = {"kedit": json.dumps(meta, default=str)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta_json))

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read a patch written by ``save``; raises KeditError naming the file if it is not one."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["kedit"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for damaged headers
            raise KeditError(f"{path} is not a readable kedit patch ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise KeditError(f"{path}: unknown patch format {meta.get('format')!r} (expected {FORMAT})")
        edit = cls([request_from_record(r, f"{path} request {i}") for i, r in enumerate(meta["requests"])],
                   meta["record"])
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            layer, part = key.split(".", 1)
            by_layer.setdefault(int(layer[len("layer"):]), {})[part] = t
        edit.deltas = {layer: Delta.from_tensors(parts) for layer, parts in by_layer.items()}
        edit.base_digests = {int(k): v for k, v in meta["base_digests"].items()}
        return edit

    def __repr__(self) -> str:
        r = self.record
        return (f"Edit({len(self.requests)} requests, method={r.get('method')}, targets={r.get('targets')}, "
                f"layers={self.layers}, applied={self.is_applied})")
