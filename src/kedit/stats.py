"""Second-moment statistics ``C_l = E[k k^T]`` of W_out inputs (METHODS §3), one pass for all layers, cached.

Rules the anchors get wrong, kept here: every requested layer is hooked in **one** forward pass per
batch that stops after the deepest layer; padding is excluded; products are fp32 per block of
columns and summed in fp64 (error ~1e-7 relative); the budget counts tokens, not articles; the cache
key holds everything that changes the result, and a cache file is checked before it is trusted.

Placement and memory: each layer's sum accumulates on that layer's device (fp64; fp32 where the device
has no fp64), so the extra memory is one ``[f, f]`` accumulator per layer plus one token batch of keys.
Cache: one safetensors file per layer under ``kedit_home()/stats``, ``C`` in float64 on CPU, with its key
and sha256 in the metadata, written to a temp file and renamed (never half-written).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kedit import distributed
from kedit.arch import ArchitectureAdapter
from kedit.corpus import batches, open_corpus, pack_rows, sampled_corpus
from kedit.errors import StatsCacheError, warn_cache_unwritable
from kedit.hooks import Trace
from kedit.io import atomic_write

STATS_VERSION = 1
SITE = "w_out.input"  # k = the input of the MLP output projection (ARCHITECTURE §2.1), never an activation
GRAM_BLOCKS = 4  # column blocks: only the upper block triangle of X^T X is computed (10/16 of the products)
GRAM_ROWS = 8192  # rows per fp32 product: bounds its rounding error (~1e-7 relative at this size)


@dataclass(frozen=True)
class StatsSpec:
    """What to compute statistics over. ``corpus=None`` samples text from the model itself (seeded)."""

    corpus: str | None = None  # text file, directory of text files or .jsonl
    tokens: int = 100_000  # token budget (non-pad tokens, BOS included)
    max_length: int = 256  # tokens per row (capped at the model's context length)
    # rows * padded width per forward pass; bounds memory, never changes the result. 4096 rather than 8192:
    # on CPU, SmolLM2's [tokens, d_ff] fp32 activations then stay under glibc's 32 MiB mmap threshold and
    # are reused instead of page-faulted afresh (8192: ~10x the faults, ~15% slower; bench/stats.py)
    batch_tokens: int = 4096
    text_field: str = "text"  # JSONL field holding the text
    seed: int = 0  # only for the self-sampled corpus

    def __post_init__(self) -> None:
        for name, low in (("tokens", 1), ("max_length", 2), ("batch_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"StatsSpec.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class StatsKey:
    """Everything that changes ``C_l``; its hash names the cache file."""

    model: str  # model_fingerprint (config + weights)
    revision: str | None
    layer: int
    site: str
    corpus: str  # content hash of the corpus
    tokenizer: str
    tokens: int
    max_length: int
    dtype: str
    version: int = STATS_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StatsInfo:
    """Where one layer's statistics live and how they were obtained."""

    path: Path
    cached: bool  # True: loaded from the cache; False: computed now
    tokens: int  # tokens the statistics average over
    seconds: float  # load time, or the time of the (shared) pass that computed them


def second_moments(model, tok, layers: Iterable[int], spec: StatsSpec = StatsSpec(),
                   adapter: ArchitectureAdapter | None = None, progress: bool = True,
                   info: dict[int, StatsInfo] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: C_l}`` with ``C_l = E[k k^T]`` over every non-pad corpus token: float64 ``[d_ff, d_ff]``, CPU.

    Cached layers are loaded (verified); the missing ones are computed in one pass and cached.
    ``info`` (if given) receives a StatsInfo per layer. Raises ValueError for an out-of-range layer.
    """
    from kedit.models import model_fingerprint, model_info
    from kedit.tokens import pad_id

    adapter = adapter or ArchitectureAdapter.from_model(model)
    layers = sorted({adapter.check_layer(layer) for layer in layers})
    if not layers:
        raise ValueError("second_moments needs at least one layer")
    corpus = (open_corpus(spec.corpus, spec.text_field) if spec.corpus is not None
              else sampled_corpus(model, tok, spec.tokens, spec.seed, progress=progress))
    max_length = effective_max_length(model, spec.max_length)
    fingerprint, tok_id = model_fingerprint(model), tokenizer_identity(tok)
    dtype = str(adapter.w_out_storage(layers[0]).dtype)
    keys = {layer: StatsKey(fingerprint, model_info(model).revision, layer, SITE, corpus.identity, tok_id,
                            spec.tokens, max_length, dtype) for layer in layers}
    info = {} if info is None else info
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        path = cache_path(keys[layer])
        if not path.exists():
            continue
        t0 = time.perf_counter()
        try:
            out[layer], meta = load_stats(path, keys[layer])
        except StatsCacheError as e:  # never silently used: say so, then recompute and overwrite
            warnings.warn(f"{e}; recomputing it", stacklevel=2)
            continue
        info[layer] = StatsInfo(path, True, int(meta.get("tokens_used", 0)), time.perf_counter() - t0)

    missing = [layer for layer in layers if layer not in out]
    parallel = distributed.active(next(model.parameters()).device)
    if parallel:  # every rank must run the same pass: same model, same corpus, the union of missing layers
        distributed.check_same_model(model, fingerprint)
        distributed.check_same("statistics corpus (content hash)", corpus.identity)
        missing = sorted({la for part in distributed.all_gather_object(missing) for la in part})
    if missing:
        t0 = time.perf_counter()
        rows = pack_rows(tok, corpus, max_length, spec.tokens)
        stream = batches(rows, spec.batch_tokens, pad_id(tok))
        if parallel:  # whole batches round-robin: each rank's fp32 products are bitwise the single-process ones
            r, size, _ = distributed.world()
            stream = (b for i, b in enumerate(stream) if i % size == r)
        sums, n = accumulate(adapter, missing, stream, spec.tokens, progress)
        if parallel:  # one fp64 reduction; sums equal the single-process ones up to summation order
            for layer in missing:
                distributed.all_reduce_sum(sums[layer])
            n = int(distributed.all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=sums[missing[0]].device)))
        seconds = time.perf_counter() - t0
        if n < spec.tokens:
            warnings.warn(f"corpus {corpus.path} holds only {n:,} tokens, fewer than the budget {spec.tokens:,}",
                          stacklevel=2)
        main = distributed.is_main() or not parallel
        for layer in missing:
            out[layer] = (sums[layer] / n).cpu()  # [f, f]
            path = cache_path(keys[layer])
            if main:  # one writer; world size is not part of the key: the entry is the single-process one
                try:
                    save_stats(path, keys[layer], out[layer], {"tokens_used": n, "seconds": seconds,
                                                               "corpus_path": str(corpus.path)})
                except OSError as e:  # read-only KEDIT_HOME: keep the finished work in memory
                    warn_cache_unwritable("statistics", path, e)
            info[layer] = StatsInfo(path, False, n, seconds)
        if parallel:
            distributed.barrier("statistics cache write")
            if not main:  # read rank 0's entry (shared disk); a node with its own disk keeps and caches its copy
                for layer in missing:
                    path = cache_path(keys[layer])
                    if path.exists():
                        out[layer], _ = load_stats(path, keys[layer])
                    elif distributed.world()[2] == 0:
                        save_stats(path, keys[layer], out[layer], {"tokens_used": n, "seconds": seconds,
                                                                   "corpus_path": str(corpus.path)})
    return {layer: out[layer] for layer in layers}


@torch.inference_mode()
def accumulate(adapter: ArchitectureAdapter, layers: list[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               total: int | None = None, progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """Sums ``S_l = sum_t k_t k_t^T`` (``[f, f]`` on layer l's device) over non-pad tokens, and the count.

    One forward pass per batch ``(input_ids [B, T], attention_mask [B, T])`` hooks every layer in
    ``layers`` and stops after the deepest one. Inputs go to the embedding's device; each layer's sum
    stays on its W_out's device, fp64 (fp32 on devices without fp64). Extra memory beyond the forward
    pass: one ``[f, f]`` accumulator per layer plus one batch of keys ``[batch_tokens, f]`` per layer
    (the captured inputs, upcast to fp32 in GRAM_ROWS-row blocks when the model is half precision).
    """
    from tqdm import tqdm

    from kedit.solvers import work_dtype

    model = adapter.model
    device = adapter.input_device
    f = adapter.d_ff
    sums = {}
    for layer in layers:
        dev = adapter.layer_device(layer)
        sums[layer] = torch.zeros(f, f, dtype=work_dtype(dev), device=dev)
    n = 0
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"stats layers {','.join(map(str, layers))}",
               file=sys.stderr, disable=not progress, leave=False)
    was_training = model.training
    model.eval()  # dropout would make the statistics random
    try:
        with Trace(adapter) as tr:
            for layer in layers:
                tr.capture_key(layer)
            tr.stop_after(max(layers))
            for ids, mask in batches:
                full = bool(mask.all())  # no padding: skip the mask (faster attention) and the gather (no copy)
                keep = None if full else mask.bool()
                tr.run(input_ids=ids.to(device), attention_mask=None if full else mask.to(device))
                for layer in layers:
                    k = tr.keys.pop(layer).to(sums[layer].device)  # [B, T, f] (a no-op: keys appear there)
                    add_gram(sums[layer], k.reshape(-1, f) if keep is None else k[keep.to(k.device)])
                m = int(mask.sum())
                n += m
                bar.update(m)
    finally:
        model.train(was_training)
        bar.close()
    for layer in layers:  # only the upper triangle was accumulated; mirror it
        s = sums[layer]
        sums[layer] = s.triu() + s.triu(1).T
    return sums, n


def add_gram(S: torch.Tensor, X: torch.Tensor) -> None:
    """In place: upper block triangle of ``S [f, f]`` (fp64) ``+= X^T X`` for ``X [m, f]``.

    Products run in fp32 on blocks of at most GRAM_ROWS rows, each added into the fp64 sums; a
    half-precision ``X`` is upcast block by block, so the extra memory is one fp32 block.
    """
    f = X.shape[1]
    b = -(-f // GRAM_BLOCKS)
    for r in range(0, X.shape[0], GRAM_ROWS):
        Xr = X[r:r + GRAM_ROWS]
        if Xr.dtype not in (torch.float32, torch.float64):
            Xr = Xr.float()  # half-precision products would lose ~3 digits
        if Xr.is_cuda and Xr.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            Xr = Xr.double()  # TF32 keeps 10 mantissa bits: far from the 1e-6 target
        for s in range(0, f, b):  # block row s: X_s^T [X_s .. X_last]; blocks left of the diagonal are skipped
            S[s:s + b, s:] += Xr[:, s:s + b].T @ Xr[:, s:]


# -- cache -------------------------------------------------------------------------------------------
def cache_path(key: StatsKey) -> Path:
    """``kedit_home()/stats/L<layer>-<key digest>.safetensors``."""
    from kedit.models import kedit_home

    return kedit_home() / "stats" / f"L{key.layer:03d}-{key.digest()}.safetensors"


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save_stats(path: Path, key: StatsKey, C: torch.Tensor, meta: dict) -> None:
    """Write ``C`` with its key and checksum in the file's metadata; temp file + rename, so never half-written."""
    from safetensors.torch import save_file

    C = C.detach().to("cpu", torch.float64).contiguous()
    header = {"key": asdict(key), "sha256": _checksum(C), **meta}
    meta_json = {"kedit_stats": json.dumps(header, default=str)}
    atomic_write(path, lambda tmp: save_file({"C": C}, str(tmp), metadata=meta_json))


def load_stats(path: Path, key: StatsKey | None = None) -> tuple[torch.Tensor, dict]:
    """``(C, metadata)`` from a cache file, verified: readable, checksum intact, key equal to ``key``.

    Raises StatsCacheError naming ``path`` otherwise (truncated, corrupt or written for another key).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["kedit_stats"])
            C = f.get_tensor("C")
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise StatsCacheError(f"statistics cache {path} is unreadable ({type(e).__name__}: {e})") from None
    if meta.get("sha256") != _checksum(C):
        raise StatsCacheError(f"statistics cache {path} is corrupt (checksum mismatch)")
    if key is not None and meta.get("key") != asdict(key):
        raise StatsCacheError(f"statistics cache {path} was written for another key: {meta.get('key')}")
    return C, meta


# -- identities --------------------------------------------------------------------------------------
def tokenizer_identity(tok) -> str:
    """Hash of the tokenizer's vocabulary, merges and pre/post-processing (its call-time padding state excluded)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tok.get_vocab().items()), "class": type(tok).__name__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def effective_max_length(model, max_length: int) -> int:
    """``max_length`` capped at the model's context length (rows beyond it would fail or extrapolate)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length
