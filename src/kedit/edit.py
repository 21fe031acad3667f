"""Edit: exactly what an application changed, as an object that can be undone, saved and re-applied.

Per layer it keeps the weight delta (a low-rank factorisation where the solver gives one), plus the
requests and the run record. ``apply`` checks every target parameter (shape, finiteness and exact
digest of the base weights) before writing any; ``undo`` restores bit-identical weights from the
copies taken at apply time. Every path that writes weights rolls back on any exit, Ctrl-C included.

Ordering: the model's applied edits form a stack (``applied_edits(model)``). ``undo`` REFUSES
(EditOrderError, listing what to undo first) when a later edit touching one of its layers is still
applied: restoring its snapshot would silently erase the later edit. Refusing keeps undo a plain
bit-exact restore; edits on disjoint layers can be undone in any order.

A patch file is one ``.safetensors`` file whose metadata holds the JSON record. Format 2 adds a
sha256 content digest over the metadata JSON and every tensor (name, dtype, shape, bytes, in name
order), checked on load; format-1 patches still load, with a warning that they carry no digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kedit.arch import ArchitectureAdapter, WeightSnapshot
from kedit.errors import BadRequest, EditFailed, EditOrderError, KeditError, NotWritable, PatchError
from kedit.io import atomic_write
from kedit.models import tensor_digest
from kedit.requests import EditRequest, request_from_record
from kedit.solvers import Delta

FORMAT = "kedit-edit/2"
FORMAT_V1 = "kedit-edit/1"  # no content digest; still loads, with a warning
_TENSOR_NAME = re.compile(r"layer(0|[1-9][0-9]*)\.(U|V|dense|mask)")  # mask: RECT's packed bits

# The one owner of "which edits are applied to this model, in order": model -> [Edit, ...] (oldest first).
# Weak keys: a model that is garbage-collected takes its stack with it.
_STACKS: weakref.WeakKeyDictionary[torch.nn.Module, list[Edit]] = weakref.WeakKeyDictionary()


def applied_edits(model: torch.nn.Module) -> list[Edit]:
    """The edits currently applied to ``model``, oldest first (a copy)."""
    return list(_STACKS.get(model, ()))


def check_writable(path: str | Path) -> Path:
    """Raise NotWritable unless a file can be created at ``path`` (call before expensive work)."""
    path = Path(path)
    if path.is_dir():
        raise NotWritable(f"cannot write {path}: it is a directory")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # save() creates missing parents
        folder = folder.parent
    if not folder.is_dir():
        raise NotWritable(f"cannot write {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise NotWritable(f"cannot write {path}: permission denied in {folder}")
    return path


def content_digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata JSON text and each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(b"kedit-edit/2\0")
    h.update(meta_json.encode("utf-8") + b"\0")
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Edit:
    """A set of per-layer weight deltas with provenance; bound to a model while applied."""

    def __init__(self, requests: list[EditRequest], record: dict[str, Any]):
        self.requests = list(requests)
        self.record = record
        self.deltas: dict[int, Delta] = {}
        self.base_digests: dict[int, str] = {}
        self._adapter: ArchitectureAdapter | None = None
        # one W_out copy per edited layer, in the weight's own dtype (e.g. 2 bytes/entry in bf16): what
        # undo() needs to restore bit for bit, whatever rounding the write did
        self._originals: dict[int, WeightSnapshot] = {}
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
        """Add ``delta`` to W_out(layer), keeping the original for undo. Same arithmetic everywhere.

        The dense update is formed in fp64 and the adapter adds it in fp32 (fp64 weights: fp64), rounding
        once to the weight's dtype, into the tensor the forward pass uses (offloaded weights included).
        """
        self._originals[layer] = adapter.snapshot_w_out(layer)
        adapter.add_to_w_out(layer, delta.dense().to(torch.float64))

    def add_layer(self, adapter: ArchitectureAdapter, layer: int, delta: Delta) -> None:
        """Editor use: record and apply one layer's delta (the edit becomes bound to the model)."""
        if not delta.is_finite():
            raise EditFailed(f"the solver produced a non-finite (NaN/inf) update for layer {layer}")
        if self._adapter is None:
            self._bind(adapter)
        self.base_digests[layer] = tensor_digest(adapter.w_out_storage(layer))
        self.deltas[layer] = delta.cpu()
        self._write(adapter, layer, delta)

    def apply(self, model, force: bool = False) -> Edit:
        """Apply to ``model`` (all or nothing). Raises EditFailed if a weight differs from the base.

        Every layer's index, delta shape, finiteness and base digest is checked before any weight is
        written; an exception or Ctrl-C while writing restores every layer and is re-raised.

        Dtypes: a patch made on a bf16 model is refused on an fp32 (or fp16...) copy of it, because the
        base digests are exact bytes of the weights it was made on; the message names both dtypes.
        ``force=True`` applies it anyway: the stored (fp64) deltas are added to the weights in their
        own dtype, so the result is the edit up to that dtype's rounding.
        """
        if self.is_applied:
            raise KeditError("this edit is already applied; undo() it first")
        if not self.deltas:
            raise EditFailed("this edit holds no layer deltas")
        adapter = ArchitectureAdapter.from_model(model, probe=False)
        d, f = adapter.d_model, adapter.d_ff
        for layer, delta in self.deltas.items():  # check everything before writing anything
            if not isinstance(layer, int) or not 0 <= layer < adapter.n_layers:
                raise EditFailed(f"edit touches layer {layer} but the model has {adapter.n_layers} layers")
            if (delta.U is not None and (delta.V is None or delta.U.dim() != 2 or delta.V.dim() != 2
                                         or (delta.U.shape[0], delta.V.shape[0]) != (d, f)
                                         or delta.U.shape[1] != delta.V.shape[1])) or \
               (delta.dense_ is not None and tuple(delta.dense_.shape) != (d, f)) or \
               (delta.U is None and delta.dense_ is None):
                raise EditFailed(f"layer {layer}: delta shape does not match W_out [{d}, {f}]")
            if not delta.is_finite():
                raise EditFailed(f"layer {layer}: the delta holds non-finite values (NaN/inf); nothing was applied")
            if layer not in self.base_digests:
                raise EditFailed(f"layer {layer}: no base-weight digest recorded for this layer")
            if not force and tensor_digest(adapter.w_out_storage(layer)) != self.base_digests[layer]:
                raise EditFailed(f"layer {layer}: {self._mismatch(adapter, layer)}; pass force=True to apply anyway")
        self._bind(adapter)
        try:
            for layer in self.layers:
                self._write(adapter, layer, self.deltas[layer])
        except BaseException as e:  # Ctrl-C too: never leave some layers written
            self._restore()
            if not isinstance(e, Exception):
                raise
            raise EditFailed(f"applying the edit failed ({e}); all layers restored") from e
        return self

    def _mismatch(self, adapter: ArchitectureAdapter, layer: int) -> str:
        """Why the base digest of ``layer`` differs: another dtype (said plainly), else other weights."""
        made_on = self.record.get("dtype")
        now = str(adapter.w_out_storage(layer).dtype)
        if made_on and made_on != now:
            return (f"this edit was made on a {made_on} model but the model's W_out is {now}; base digests are "
                    f"exact bytes, so load the model with dtype={made_on.removeprefix('torch.')!r}")
        return ("the model's W_out differs from the weights this edit was made on "
                "(another model, or already edited)")

    def undo(self) -> None:
        """Restore every touched weight bit for bit (no-op if not applied), bf16/fp16 and offloaded ones too.

        Memory: while applied, an Edit holds one copy of W_out per edited layer in the weight's own dtype.

        Raises EditOrderError, changing nothing, if a later applied edit touches one of this edit's
        layers: undo those first (most recent first).
        """
        if self._adapter is None:
            return
        stack = _STACKS.get(self._adapter.model, [])
        mine = set(self._originals)
        later = stack[stack.index(self) + 1:] if self in stack else []
        blocking = [e for e in later if mine & set(e._originals)]
        if blocking:
            shared = sorted(mine & set().union(*(set(e._originals) for e in blocking)))
            listing = "; ".join(repr(e) for e in reversed(blocking))
            raise EditOrderError(
                f"cannot undo this edit: {len(blocking)} later edit(s) on layer(s) {shared} are still applied "
                f"and would be silently erased; undo them first, most recent first: {listing}"
            )
        self._restore()

    def _bind(self, adapter: ArchitectureAdapter) -> None:
        """Mark this edit applied to ``adapter``'s model: push it on the model's applied-edit stack."""
        self._adapter = adapter
        _STACKS.setdefault(adapter.model, []).append(self)

    def _restore(self) -> None:
        """Copy every snapshot back, pop this edit off the stack, run the undo callback.

        A Ctrl-C between layers finishes the (cheap) remaining copies before re-raising, so no
        layer is left edited while the edit reads as undone.
        """
        adapter = self._adapter
        if adapter is None:
            return
        done: set[int] = set()
        try:
            with torch.no_grad():
                for layer, original in self._originals.items():
                    adapter.restore_w_out(layer, original)
                    done.add(layer)
        except BaseException:
            with torch.no_grad():
                for layer, original in self._originals.items():
                    if layer not in done:
                        adapter.restore_w_out(layer, original)
            self._release()
            raise
        self._release()

    def _release(self) -> None:
        model = self._adapter.model if self._adapter is not None else None
        stack = _STACKS.get(model) if model is not None else None
        if stack is not None and self in stack:
            stack.remove(self)
        self._originals.clear()
        self._adapter = None
        if self._on_undo is not None:
            callback, self._on_undo = self._on_undo, None
            callback()

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
        """Write a ``.safetensors`` patch (tensors + JSON metadata + content digest) atomically.

        Returns the path; raises NotWritable naming it when the file cannot be created.
        """
        path = check_writable(path)
        tensors = {f"layer{layer}.{k}": v.contiguous() for layer, d in self.deltas.items()
                   for k, v in d.tensors().items()}
        meta = {"format": FORMAT, "record": self.record,
                "base_digests": {str(k): v for k, v in self.base_digests.items()},
                "requests": [r.to_dict() for r in self.requests]}
        # canonical text: the digest covers exactly the bytes stored in the file's metadata
        meta_json = json.dumps(json.loads(json.dumps(meta, default=str)), sort_keys=True)
        header = {"kedit": meta_json, "kedit_sha256": content_digest(meta_json, tensors)}
        try:
            return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        except OSError as e:
            raise NotWritable(f"cannot write {path} ({type(e).__name__}: {e.strerror or e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read a patch written by ``save``, verified; raises PatchError naming the file and the problem.

        Checks: readable safetensors, content digest (format 2), metadata fields and types, tensor
        names, per-layer delta parts, finiteness, and that the requests match the record.
        """
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch file {path} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for damaged headers
            raise PatchError(f"{path} is not a readable kedit patch ({type(e).__name__}: {e})") from None
        if "kedit" not in header:
            raise PatchError(f"{path} is not a kedit patch (no 'kedit' metadata)")
        try:
            meta = json.loads(header["kedit"])
        except ValueError as e:
            raise PatchError(f"{path}: patch metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise PatchError(f"{path}: patch metadata is a JSON {type(meta).__name__}, expected an object")
        fmt = meta.get("format")
        if fmt == FORMAT:
            if header.get("kedit_sha256") != content_digest(header["kedit"], tensors):
                raise PatchError(f"{path}: patch content does not match its digest (corrupted or modified)")
        elif fmt == FORMAT_V1:
            warnings.warn(f"{path} is a format-1 patch: it carries no content digest, so corruption cannot "
                          "be detected; re-save it to upgrade", stacklevel=2)
        else:
            raise PatchError(f"{path}: unknown patch format {fmt!r} (expected {FORMAT} or {FORMAT_V1})")
        return cls._from_parts(path, meta, tensors)

    @classmethod
    def _from_parts(cls, path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Edit:
        """Validate metadata and tensors field by field; one-line PatchError naming the field."""
        for name, kind in (("record", dict), ("base_digests", dict), ("requests", list)):
            if name not in meta:
                raise PatchError(f"{path}: patch metadata lacks the field {name!r}")
            if not isinstance(meta[name], kind):
                raise PatchError(f"{path}: patch field {name!r} must be a JSON "
                                 f"{'object' if kind is dict else 'list'}, got {type(meta[name]).__name__}")
        record, requests = meta["record"], meta["requests"]
        base: dict[int, str] = {}
        for k, v in meta["base_digests"].items():
            if not (isinstance(k, str) and k.isdigit() and str(int(k)) == k) or not isinstance(v, str):
                raise PatchError(f"{path}: patch field 'base_digests' has key {k!r}: layers must be "
                                 "non-negative integers mapped to digest strings")
            base[int(k)] = v
        if "n_requests" in record and record["n_requests"] != len(requests):
            raise PatchError(f"{path}: patch holds {len(requests)} requests but its record says "
                             f"{record['n_requests']!r} (requests do not match the record)")
        if not requests:
            raise PatchError(f"{path}: patch field 'requests' is empty")
        try:
            reqs = [request_from_record(r, f"{path} request {i}") for i, r in enumerate(requests)]
        except BadRequest as e:
            raise PatchError(f"patch {e}") from None
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _TENSOR_NAME.fullmatch(key)
            if m is None:
                raise PatchError(f"{path}: tensor name {key!r} is not 'layer<N>.U', 'layer<N>.V', 'layer<N>.mask' "
                                 "or 'layer<N>.dense'")
            if m.group(2) == "mask":
                if t.dtype != torch.uint8 or t.dim() != 1:
                    raise PatchError(f"{path}: tensor {key!r} must be a 1-D uint8 packed mask, got "
                                     f"{t.dtype} {tuple(t.shape)}")
            elif not t.is_floating_point() or t.dim() != 2:
                raise PatchError(f"{path}: tensor {key!r} must be a 2-D floating-point matrix, got "
                                 f"{t.dtype} {tuple(t.shape)}")
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        if not by_layer:
            raise PatchError(f"{path}: patch holds no delta tensors")
        if set(by_layer) != set(base):
            raise PatchError(f"{path}: tensors cover layers {sorted(by_layer)} but 'base_digests' names "
                             f"layers {sorted(base)}")
        deltas: dict[int, Delta] = {}
        for layer, parts in sorted(by_layer.items()):
            if set(parts) not in ({"dense"}, {"U", "V"}, {"U", "V", "mask"}):
                raise PatchError(f"{path}: layer {layer} has tensors {sorted(parts)}; expected 'dense' or 'U' and 'V' "
                                 "(and RECT's 'mask')")
            if "mask" in parts and parts["mask"].numel() != -(-parts["U"].shape[0] * parts["V"].shape[0] // 8):
                raise PatchError(f"{path}: layer {layer}: the packed mask has {parts['mask'].numel()} bytes, "
                                 f"expected ceil({parts['U'].shape[0]} x {parts['V'].shape[0]} / 8)")
            if "U" in parts and parts["U"].shape[1] != parts["V"].shape[1]:
                raise PatchError(f"{path}: layer {layer}: U {tuple(parts['U'].shape)} and V "
                                 f"{tuple(parts['V'].shape)} have different ranks")
            deltas[layer] = Delta.from_tensors(parts)
            if not deltas[layer].is_finite():
                raise PatchError(f"{path}: layer {layer}: the delta holds non-finite values (NaN/inf)")
        edit = cls(reqs, record)
        edit.deltas = deltas
        edit.base_digests = base
        return edit

    def __repr__(self) -> str:
        r = self.record
        return (f"Edit({len(self.requests)} requests, method={r.get('method')}, targets={r.get('targets')}, "
                f"layers={self.layers}, applied={self.is_applied})")

    def export(self, model, out_dir: str | Path, tokenizer=None, **kwargs: Any) -> Path:
        """Write ``model`` with this edit as a plain HF checkpoint in ``out_dir`` (kedit.export.export_edit)."""
        from kedit.export import export_edit

        return export_edit(self, model, out_dir, tokenizer, **kwargs)
