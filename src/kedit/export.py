"""Export an edited model as a standard Hugging Face checkpoint (sharded safetensors + config + tokenizer).

``export_edit`` applies a patch (all or nothing, as ``Edit.apply``), writes the model with
``save_pretrained(max_shard_size=...)``, writes the patch's record beside it as ``kedit-edit.json``
and undoes the patch. The result loads with plain ``AutoModelForCausalLM.from_pretrained(dir)``.

Rules kept here:
- the destination is checked *before* anything is loaded or applied (``check_destination``): an
  existing non-empty directory is refused unless ``overwrite``; an unwritable parent is refused;
- writes go to a temporary directory beside the destination, which is renamed into place only when
  complete, so a killed export never leaves a directory that loads as a valid checkpoint;
- GGUF-loaded models carry a ``quantization_config`` (and an ``hf_quantizer``) that makes
  ``save_pretrained`` refuse them although their weights are already dequantised; ``saveable`` hides
  both for the duration of the write and ``clean_config`` gives the plain config (also what
  ``models._convert_gguf`` needs);
- tied weights stay tied: ``save_pretrained`` writes a tied tensor once and the config keeps
  ``tie_word_embeddings``; kedit edits only W_out, never an embedding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kedit.errors import ExportError, KeditError
from kedit.io import share_dir

RECORD_FILE = "kedit-edit.json"
DEFAULT_SHARD = "2GB"
_QUANT_KEYS = ("quantization_config",)  # what GGUF loading adds to a config; save_pretrained refuses it


def clean_config(config):
    """A fresh config of the same model type without GGUF/quantisation entries (for ``save_pretrained``)."""
    from transformers import AutoConfig

    d = config.to_dict()
    for k in _QUANT_KEYS:
        d.pop(k, None)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


@contextmanager
def saveable(model) -> Iterator[Any]:
    """Within the block ``model.save_pretrained`` writes a plain checkpoint even for a GGUF-loaded model.

    A GGUF load dequantises every tensor but leaves ``hf_quantizer`` and ``config.quantization_config``
    set, which make ``save_pretrained`` refuse; both are removed here and restored on exit, so the
    in-memory model is unchanged afterwards. Models without them pass through untouched.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    saved = {k: getattr(model.config, k) for k in _QUANT_KEYS if hasattr(model.config, k)}
    if quantizer is not None and getattr(quantizer, "quantization_config", None) is not None:
        method = getattr(quantizer.quantization_config, "quant_method", None)
        if str(getattr(method, "value", method)).lower() != "gguf":
            # bitsandbytes/GPTQ weights are not plain tensors: writing them as safetensors would be wrong
            raise ExportError(f"cannot export a model quantised with {method}; load it unquantised (--dtype)")
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        for k in saved:
            delattr(model.config, k)
        yield model
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        for k, v in saved.items():
            setattr(model.config, k, v)


def check_destination(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a destination that cannot receive an export, before any model is loaded; returns it absolute.

    Raises ExportError when ``out_dir`` is a file, a non-empty directory (unless ``overwrite``), or
    when its parent cannot be created or written (probed by creating and removing a temp directory).
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"export destination {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"export destination {out} exists and is not empty (pass --overwrite to replace it)")
    parent = out.parent
    existing = parent
    while not existing.exists():  # the nearest ancestor that exists decides whether parents can be made
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"export destination {out}: {existing} is not a directory")
    if existing == parent:
        try:  # a real probe: os.access says yes to root on a read-only mount's neighbours and to ACL quirks
            probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
            os.rmdir(probe)
        except OSError as e:
            raise ExportError(f"export destination {out}: cannot write in {parent} ({e.strerror})") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"export destination {out}: cannot create directories in {existing}")
    return out


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors (tied ones once): roughly the checkpoint's size on disk."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen and t.device.type != "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _check_space(model, out: Path) -> None:
    existing = out
    while not existing.exists():
        existing = existing.parent
    need, free = model_bytes(model), shutil.disk_usage(existing).free
    if need > free:
        raise ExportError(f"export destination {out}: needs ~{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def write_checkpoint(model, out_dir: str | Path, tokenizer=None, *, max_shard_size: str | int = DEFAULT_SHARD,
                     overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (+ tokenizer, + ``extra`` JSON files by name) to ``out_dir`` atomically; returns it.

    Sharded safetensors via ``save_pretrained``; a temp directory beside ``out_dir`` is renamed into
    place when complete (an overwritten directory is removed only after that). Raises ExportError.
    """
    out = check_destination(out_dir, overwrite)
    _check_space(model, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        with saveable(model):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=1, default=str))
        if out.is_dir() and any(out.iterdir()):
            # keep the old export until the new one is in place: a failure here leaves one of the two whole
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        share_dir(tmp, old or out)  # not mkdtemp's owner-only 0o700 (nor safetensors' 0o600): exports are shared
        os.replace(tmp, out)  # an empty existing directory is replaced by rename(2) itself
    except OSError as e:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise ExportError(f"writing the export to {out} failed ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def export_edit(edit, model, out_dir: str | Path, tokenizer=None, *, max_shard_size: str | int = DEFAULT_SHARD,
                overwrite: bool = False, force: bool = False) -> Path:
    """Write ``model`` with ``edit`` applied to ``out_dir`` as a plain HF checkpoint; returns the directory.

    If ``edit`` is not applied it is applied (all or nothing; ``force`` as in ``Edit.apply``) and undone
    afterwards, so ``model`` ends as it started; if it is already applied to ``model`` it stays applied.
    The destination is checked first. Raises ExportError, EditFailed.
    """
    out = check_destination(out_dir, overwrite)
    applied_here = not edit.is_applied
    if not applied_here and getattr(edit._adapter, "model", model) is not model:
        raise KeditError("this edit is applied to another model; undo() it there first")
    if applied_here:
        edit.apply(model, force=force)
    try:
        return write_checkpoint(model, out, tokenizer, max_shard_size=max_shard_size, overwrite=overwrite,
                                extra={RECORD_FILE: edit.to_record(model)})
    finally:
        if applied_here:
            edit.undo()
