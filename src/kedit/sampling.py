"""Deterministic batched sampling from a model (context templates, the self-sampled default corpus).

Seeded with a private ``torch.Generator``: the global RNG is never touched, and the same model,
prefix and seed always give the same text on the same machine.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, tok, prefix: str, n: int, max_new_tokens: int, seed: int, top_k: int = 5) -> list[str]:
    """``n`` continuations of ``prefix`` (top-k sampling, KV cache); text stops at EOS.

    Never runs past the model's context length (``max_new_tokens`` is cut to what fits).
    """
    from kedit.arch import input_device
    from kedit.stats import effective_max_length

    device = input_device(model)  # the embedding's device (dispatch-aware)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok(prefix)["input_ids"]] * n, device=device)  # [n, t]
    max_new_tokens = min(max_new_tokens, effective_max_length(model, ids.shape[1] + max_new_tokens) - ids.shape[1])
    out = model(input_ids=ids, use_cache=True)
    past, new = out.past_key_values, []
    done = torch.zeros(n, dtype=torch.bool)
    eos = tok.eos_token_id
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float().cpu()  # [n, vocab]
        if top_k:
            vals, idx = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(vals.softmax(-1), 1, generator=gen)  # [n, 1]
            nxt = idx.gather(1, choice)[:, 0]
        else:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        if eos is not None:
            done |= nxt == eos
        new.append(torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt))
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None].to(device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    gen_ids = torch.stack(new, 1).tolist() if new else [[] for _ in range(n)]
    texts = []
    for row in gen_ids:
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(prefix + tok.decode(row, skip_special_tokens=True))
    return texts
