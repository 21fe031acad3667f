"""The one generation loop: batched, KV-cached, greedy or seeded top-k (context templates, the
self-sampled corpus, fluency texts, the demo's probes all go through here).

- Batches are left padded; the attention mask hides the padding and ``position_ids`` count real
  tokens only, so a prompt continues the same in any batch as alone (up to float rounding).
- The KV cache is a ``transformers.DynamicCache`` made here and passed under the name the model's
  ``forward`` takes (``cache`` in transformers >= 5.x, ``past_key_values`` before), so no deprecated
  keyword is used. Rows that finish are dropped from the batch with the cache's public
  ``batch_select_indices``; a cache without it keeps them (masked) instead.
- Sampling is ``torch.multinomial`` over the top-k softmax with one private ``torch.Generator`` per row,
  seeded from ``(seed, row index)`` (row 0 with ``seed`` itself, so a one-row call draws exactly what
  kedit's earlier single-generator sampler drew: the context templates stay those of earlier releases):
  the global RNG is never touched, the same seed gives the same text, and a row's text does not depend
  on which other rows share its batch.
- A row stops at EOS (not included), at its token limit, or at the model's context length.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch

from kedit.arch import input_device
from kedit.tokens import pad_id, pad_left

KV_BUDGET_BYTES = 512 << 20  # default batch: rows whose full KV cache fits in this many bytes
MAX_BATCH = 256  # beyond this the GEMMs are already efficient and the cache only grows


def context_length(model) -> int | None:
    """The model's context length from its config (``max_position_embeddings``/``n_positions``), or None."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def row_seed(seed: int, index: int) -> int:
    """The seed of row ``index`` of a call seeded with ``seed``: ``seed`` for row 0, a hash for the others
    (so nearby seeds do not overlap)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"kedit-gen:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def _forward_params(model) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the keyword the model's ``forward`` takes (``cache`` or ``past_key_values``)."""
    return {"cache" if "cache" in _forward_params(model) else "past_key_values": cache}


def output_cache(out) -> Any:
    """The KV cache a forward returned, under its current name (``cache``) or the older ``past_key_values``;
    reading the old attribute on a new output logs a deprecation warning."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def new_cache(model):
    """An empty ``DynamicCache`` for ``model`` (given its config where this transformers accepts one)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before the config argument
        return DynamicCache()


def default_batch_size(model, tokens_per_row: int) -> int:
    """Rows per batch so the KV cache of ``tokens_per_row``-token rows stays within KV_BUDGET_BYTES."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not (layers and heads and hidden):
        return 32
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    elem = next(model.parameters()).element_size()
    per_row = 2 * layers * kv_heads * head_dim * elem * max(tokens_per_row, 1)
    return max(1, min(MAX_BATCH, KV_BUDGET_BYTES // per_row))


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 top_k: int = 1, seeds: Sequence[int] | None = None, eos_token_id: int | None = None,
                 pad_token_id: int = 0, batch_size: int | None = None, progress: bool = False,
                 desc: str = "generating") -> list[list[int]]:
    """New token ids after each prompt (EOS not included), at most ``max_new_tokens`` (per prompt if a list).

    ``top_k=1`` is greedy (argmax, like ``model.generate(do_sample=False)``), ``top_k>1`` samples the
    ``top_k`` most likely tokens, ``top_k=0`` the whole vocabulary. ``seeds`` (one per prompt) are
    required when sampling. ``batch_size`` None sizes batches by KV-cache memory.
    """
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n:
        raise ValueError(f"{len(limits)} token limits for {n} prompts")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_k != 1 and (seeds is None or len(seeds) != n):
        raise ValueError("sampling needs one seed per prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ctx = context_length(model)
    if ctx is not None:  # never past the context: positions beyond it would fail or extrapolate
        limits = [max(0, min(m, ctx - len(p))) for m, p in zip(limits, prompts, strict=True)]
    out: list[list[int]] = [[] for _ in range(n)]
    todo = [i for i in range(n) if limits[i] > 0]
    if not todo:
        return out
    if batch_size is None:
        batch_size = default_batch_size(model, max(len(prompts[i]) + limits[i] for i in todo))
    # similar total lengths share a batch: less padding, and rows tend to finish together
    todo.sort(key=lambda i: (len(prompts[i]) + limits[i], len(prompts[i])))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(limits[i] for i in todo), unit="tok", desc=desc, file=sys.stderr, leave=False)
    try:
        for s in range(0, len(todo), batch_size):
            rows = todo[s:s + batch_size]
            got = _generate_batch(model, [prompts[i] for i in rows], [limits[i] for i in rows], top_k,
                                  [seeds[i] for i in rows] if top_k != 1 else None, eos_token_id,
                                  pad_token_id, bar)
            for i, ids in zip(rows, got, strict=True):
                out[i] = ids
    finally:
        if bar is not None:
            bar.close()
    return out


def _generate_batch(model, prompts, limits, top_k, seeds, eos, pad, bar) -> list[list[int]]:
    device = input_device(model)  # the input embedding's device (dispatch-aware)
    b = len(prompts)
    ids, mask = (x.to(device) for x in pad_left([list(p) for p in prompts], pad))  # [b, T]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # [b, T]: real tokens count from 0 whatever the padding
    gens = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
    params = _forward_params(model)
    cache = new_cache(model)
    kw = cache_kwargs(model, cache)
    if "logits_to_keep" in params:  # only the last position's logits are needed
        kw["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kw["num_logits_to_keep"] = 1
    live = list(range(b))  # batch rows still in the batch (all of them if the cache cannot select)
    finished: set[int] = set()
    new: list[list[int]] = [[] for _ in range(b)]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw).logits[:, -1]
    can_select = hasattr(cache, "batch_select_indices")
    step = 0
    while True:
        nxt = _pick(logits.float(), top_k, [gens[r] for r in live] if gens is not None else None)  # [len(live)]
        step += 1
        keep, took = [], 0
        for j, (r, t) in enumerate(zip(live, nxt.tolist(), strict=True)):
            if r in finished:
                continue
            if eos is not None and t == eos:
                finished.add(r)
                took += limits[r] - len(new[r])  # the bar counts a stopped row's budget as done
                continue
            new[r].append(t)
            took += 1
            if step < limits[r]:
                keep.append(j)
            else:
                finished.add(r)
        if bar is not None:
            bar.update(took)
        if not keep:
            break
        if len(keep) < len(live) and can_select:
            sel = torch.tensor(keep)  # a CPU index works for the cache layers on any device
            try:
                cache.batch_select_indices(sel)
            except Exception:  # a cache that cannot select rows: finished rows stay, masked by `finished`
                can_select = False
            else:
                live, nxt = [live[j] for j in keep], nxt[sel.to(nxt.device)]
                mask, pos = mask[sel.to(device)], pos[sel.to(device)]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt[:, None].to(device), attention_mask=mask, position_ids=pos, use_cache=True,
                       **kw).logits[:, -1]
    return new


def _pick(logits: torch.Tensor, top_k: int, gens: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row from ``logits [b, V]``: argmax, or one multinomial draw per row with its generator."""
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits.float().cpu()  # the draw happens on CPU with the row's CPU generator
    vals, idx = logits.topk(top_k, dim=-1) if top_k else (logits, None)  # [b, k]
    probs = vals.softmax(-1)  # [b, k]
    choice = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g)[:, 0] for i, g in enumerate(gens)])  # [b]
    return idx.gather(1, choice[:, None])[:, 0] if idx is not None else choice


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int | Sequence[int], *, top_k: int = 1,
             seed: int = 0, batch_size: int | None = None, progress: bool = False,
             desc: str = "generating") -> list[str]:
    """Continuation text after each prompt (special tokens dropped); see generate_ids.

    Row ``i`` samples with ``row_seed(seed, i)``.
    """
    ids = [tok(p)["input_ids"] for p in prompts]
    new = generate_ids(model, ids, max_new_tokens, top_k=top_k, seeds=[row_seed(seed, i) for i in range(len(ids))],
                       eos_token_id=tok.eos_token_id, pad_token_id=pad_id(tok), batch_size=batch_size,
                       progress=progress, desc=desc)
    return [tok.decode(row, skip_special_tokens=True) for row in new]

