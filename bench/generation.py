"""Benchmark: kedit.generation vs the loops it replaced, tokens/s on SmolLM2-135M.

    PYTHONPATH=src .venv/bin/python bench/generation.py [--tokens 64] [--quick]

- sampling (the self-sampled statistics corpus: top-k 50, one prefix per row): the old
  ``kedit.sampling.sample`` (copied below from git history: 32 rows of one prefix per call, the KV
  cache passed back as ``past_key_values``, finished rows kept in the batch) vs ``generate_ids`` at
  several batch sizes (``auto`` = sized by KV-cache memory, what ``sampled_corpus`` uses).
- greedy (the demo's probes): the old ``kedit.probe.greedy`` (``model.generate``) vs ``generate``.
Each variant generates the same number of rows x new tokens; rows stopping at EOS count only the
tokens they produced. Prints a table and writes bench/results/generation.json.

On a shared machine run it with ``OMP_WAIT_POLICY=PASSIVE``: with more runnable threads than cores,
libgomp's spinning threads make every multi-threaded GEMM several times slower, whichever path runs.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from common import RESULTS, machine, markdown_table, save_json

from kedit.corpus import PREFIXES
from kedit.generation import default_batch_size, generate, generate_ids, row_seed
from kedit.models import load_model
from kedit.tokens import pad_id


@torch.no_grad()
def old_sample(model, tok, prefix: str, n: int, max_new_tokens: int, seed: int, top_k: int = 5) -> list[list[int]]:
    """kedit.sampling.sample before kedit.generation (git 237b08e), returning the new ids per row."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok(prefix)["input_ids"]] * n, device=device)  # [n, t]
    out = model(input_ids=ids, use_cache=True)
    past, new = out.past_key_values, []
    done = torch.zeros(n, dtype=torch.bool)
    eos = tok.eos_token_id
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float().cpu()  # [n, vocab]
        vals, idx = logits.topk(top_k, dim=-1)
        nxt = idx.gather(1, torch.multinomial(vals.softmax(-1), 1, generator=gen))[:, 0]
        done |= nxt == eos
        new.append(torch.where(done, torch.full_like(nxt, eos), nxt))
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None].to(device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    rows = torch.stack(new, 1).tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


@torch.no_grad()
def old_greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """kedit.probe.greedy before kedit.generation: transformers' generate with left padding."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tok))
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sampled row")
    p.add_argument("--rows", type=int, default=128, help="sampled rows per variant (the old path: 32 per call)")
    p.add_argument("--batch-sizes", default="32,64,128", help="new-path batch sizes besides 'auto'")
    p.add_argument("--out", default=str(RESULTS / "generation.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the old path's deprecated cache keyword
    info = machine()
    model, tok = load_model("smollm2-135m")
    eos, pad = tok.eos_token_id, pad_id(tok)
    prefixes = [tok(PREFIXES[r % len(PREFIXES)])["input_ids"] for r in range(args.rows)]
    seeds = [row_seed(0, r) for r in range(args.rows)]
    rows: list[dict] = []

    def record(task: str, path: str, batch, new_ids: list[list[int]], seconds: float) -> None:
        n = sum(map(len, new_ids))
        rows.append({"task": task, "path": path, "batch": batch, "rows": len(new_ids), "tokens": n,
                     "seconds": round(seconds, 2), "tok_per_s": round(n / seconds, 1)})
        print(f"{task:9} {path:4} batch {batch!s:>4}: {n:6d} tokens in {seconds:6.1f} s = {n / seconds:7.1f} tok/s",
              flush=True)

    # sampling: old path, 32 rows per call as sampled_corpus did (rows of one call share a prefix)
    def old_run():
        out = []
        for r in range(0, args.rows, 32):
            out += old_sample(model, tok, PREFIXES[(r // 32) % len(PREFIXES)], 32, args.tokens, seed=r, top_k=50)
        return out

    record("sampling", "old", 32, *timed(old_run))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    auto = min(default_batch_size(model, max(map(len, prefixes)) + args.tokens), args.rows)  # what runs
    for b in [*sizes, "auto"]:
        bs = auto if b == "auto" else b
        new, s = timed(lambda bs=bs: generate_ids(model, prefixes, args.tokens, top_k=50, seeds=seeds,
                                                  eos_token_id=eos, pad_token_id=pad, batch_size=bs))
        record("sampling", "new", f"auto={auto}" if b == "auto" else b, new, s)

    # greedy: the demo's probes (10 unrelated prompts, 5 tokens) and a larger batch
    from kedit.commands.demo import unrelated_prompts

    probes = unrelated_prompts()
    for prompts, n_new in ((probes, 5), (probes * 4, 32)):
        texts, s = timed(lambda prompts=prompts, n_new=n_new: old_greedy(model, tok, prompts, n_new))
        record("greedy", "old", len(prompts), [tok(t, add_special_tokens=False)["input_ids"] for t in texts], s)
        texts_new, s = timed(lambda prompts=prompts, n_new=n_new: generate(model, tok, prompts, n_new))
        record("greedy", "new", len(prompts), [tok(t, add_special_tokens=False)["input_ids"] for t in texts_new], s)
        rows[-1]["same_text_as_old"] = texts_new == texts

    old = rows[0]["tok_per_s"]
    best = max(r["tok_per_s"] for r in rows if r["task"] == "sampling" and r["path"] == "new")
    result = {"machine": info, "loadavg_end": os.getloadavg(),
              "settings": {"new_tokens_per_row": args.tokens, "rows": args.rows, "top_k": 50,
                           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
              "rows": rows, "sampling_speedup_best": round(best / old, 2)}
    save_json(args.out, result)
    print()
    print(markdown_table(["task", "path", "batch", "rows", "tokens", "seconds", "tok/s"],
                         [[r["task"], r["path"], r["batch"], r["rows"], r["tokens"], r["seconds"], r["tok_per_s"]]
                          for r in rows]))
    print(f"\nsampling: best new / old = {best / old:.1f}x; machine: {info['cpu']}, {info['cores']} cores, "
          f"torch threads {info['torch_threads']}, load {info['loadavg_start']} -> {result['loadavg_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
