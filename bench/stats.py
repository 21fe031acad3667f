"""Benchmark: one-pass multi-layer second moments vs per-layer passes vs a plain forward pass (METHODS §3).

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/stats.py [--tokens 40000] [--rounds 3] [--ablations]

Compares, on SmolLM2-135M and wikitext-2 (test split), over the same pre-tokenised rows (cache bypassed):
- one_pass:      kedit.stats.accumulate, all layers hooked in one pass that stops after the deepest;
- five_passes:   one pass per layer, each stopping at its layer (what ROME/MEMIT's layer_stats does);
- plain_forward: a no-grad forward through the same blocks with no hooks (blocks beyond truncated, no LM head).
Variants run interleaved batch by batch (the machine is shared): ratios are medians of per-batch ratios.
Prints and writes bench/results/stats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import CORPUS, RESULTS, machine, require_data, save_json  # bench/common.py (scripts run as bench/<name>.py)
from torch import nn

import kedit.stats as stats_mod
from kedit.arch import ArchitectureAdapter
from kedit.commands._common import layer_list
from kedit.corpus import batches, open_corpus, pack_rows
from kedit.models import load_model
from kedit.tokens import pad_id


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--layers", type=layer_list, default=[4, 5, 6, 7, 8])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=stats_mod.StatsSpec().batch_tokens)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ablations", action="store_true", help="also time one-pass variants on --ablation-tokens")
    p.add_argument("--ablation-tokens", type=int, default=16_384)
    p.add_argument("--out", type=Path, default=RESULTS / "stats.json")
    args = p.parse_args()
    require_data(CORPUS)

    model, tok = load_model("smollm2-135m")
    adapter = ArchitectureAdapter.from_model(model)
    layers, deepest, pid = args.layers, max(args.layers), pad_id(tok)
    t0 = time.perf_counter()
    rows = list(pack_rows(tok, open_corpus(CORPUS), args.max_length, args.tokens))
    tokenize_s = time.perf_counter() - t0
    n_tok = sum(map(len, rows))

    base, path = model.base_model, adapter.blocks_path.rsplit(".", 1)[-1]
    all_blocks = getattr(base, path)

    def one_pass(unit, bt=args.batch_tokens):
        return stats_mod.accumulate(adapter, layers, batches(unit, bt, pid), progress=False)[0]

    def five_passes(unit, bt=args.batch_tokens):
        return {la: stats_mod.accumulate(adapter, [la], batches(unit, bt, pid), progress=False)[0][la] for la in layers}

    @torch.inference_mode()
    def plain_forward(unit, bt=args.batch_tokens):
        setattr(base, path, nn.ModuleList(list(all_blocks)[: deepest + 1]))  # same depth, nothing hooked
        try:
            for ids, mask in batches(unit, bt, pid):
                base(input_ids=ids, attention_mask=None if mask.all() else mask, use_cache=False)
        finally:
            setattr(base, path, all_blocks)

    one_pass(rows[:4])  # warm-up: thread pools, kernels
    plain_forward(rows[:4])
    units = groups(rows, args.batch_tokens)  # one forward batch each
    times = interleaved({"one_pass": one_pass, "plain_forward": plain_forward, "five_passes": five_passes},
                        units, args.rounds)

    sums_one, sums_five = one_pass(rows[:8]), five_passes(rows[:8])  # correctness: both ways agree
    max_rel = max(((sums_one[la] - sums_five[la]).norm() / sums_five[la].norm()).item() for la in layers)

    tps = {k: round(n_tok * args.rounds / sum(v), 1) for k, v in times.items()}
    speedups = [f / o for o, f in zip(times["one_pass"], times["five_passes"], strict=True)]
    fractions = [p_ / o for o, p_ in zip(times["one_pass"], times["plain_forward"], strict=True)]
    speedup, vs_plain = statistics.median(speedups), statistics.median(fractions)
    ceiling = sum(la + 1 for la in layers) / (deepest + 1)  # blocks run by per-layer passes / by one pass
    result = {
        "benchmark": "second-moment statistics, one pass vs per-layer passes vs plain forward",
        "command": "flock /tmp/kedit-heavy.lock .venv/bin/python bench/stats.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "config": {"model": "smollm2-135m", "layers": layers, "tokens": n_tok, "max_length": args.max_length,
                   "batch_tokens": args.batch_tokens, "rounds": args.rounds, "corpus": "shared/data/wikitext-2-raw/"
                   "wiki.test.raw", "gram": f"fp32 products, {stats_mod.GRAM_BLOCKS} column blocks (upper triangle), "
                   "fp64 sums", "tokenize_seconds": round(tokenize_s, 3)},
        "tokens_per_s": tps,
        "speedup_one_vs_five": round(speedup, 3),
        "speedup_one_vs_five_from_totals": round(tps["one_pass"] / tps["five_passes"], 3),
        "speedup_ceiling_blocks": round(ceiling, 3),
        "one_pass_fraction_of_plain": round(vs_plain, 3),
        "one_pass_fraction_of_plain_from_totals": round(tps["one_pass"] / tps["plain_forward"], 3),
        "ratios_are": "medians over batches of per-batch time ratios (variants interleaved batch by batch)",
        "per_batch_range": {"speedup_one_vs_five": [round(min(speedups), 3), round(max(speedups), 3)],
                            "one_pass_fraction_of_plain": [round(min(fractions), 3), round(max(fractions), 3)]},
        "goals": {"speedup>=4": speedup >= 4, "fraction_of_plain>=0.8": vs_plain >= 0.8},
        "one_vs_five_max_rel_err": max_rel,
    }
    if args.ablations:
        result["ablations"] = ablations(rows, args, one_pass, plain_forward)
    result["machine"]["loadavg_end"] = os.getloadavg()
    save_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


def ablations(rows, args, one_pass, plain_forward) -> dict:
    """One-pass tokens/s with other gram kernels and batch sizes, on --ablation-tokens of the rows."""
    unit = groups(rows, args.ablation_tokens)[0]
    n_tok = sum(map(len, unit))
    real = stats_mod.add_gram

    def fp64_full(S, X):  # the plain way: fp64 products of the whole X^T X
        Xd = X.double()
        S += Xd.T @ Xd

    def fp32_full(S, X):  # fp32 products without the triangle trick (the anchors' kernel)
        S += X.T @ X

    def with_gram(gram, bt=args.batch_tokens):
        def run(u):
            stats_mod.add_gram = gram
            try:
                one_pass(u, bt)
            finally:
                stats_mod.add_gram = real
        return run

    variants = {"kedit (fp32 blocks, triangle)": with_gram(real), "fp32 full X^T X": with_gram(fp32_full),
                "fp64 full X^T X": with_gram(fp64_full),
                "no gram (forward + captures only)": with_gram(lambda S, X: None),
                "plain_forward": plain_forward}
    for bt in (2048, 4096, 8192, 16384):
        if bt != args.batch_tokens:
            variants[f"kedit, batch_tokens={bt}"] = with_gram(real, bt)
            variants[f"plain_forward, batch_tokens={bt}"] = lambda u, bt=bt: plain_forward(u, bt)
    times = interleaved(variants, [unit], args.rounds)
    out = {name: round(n_tok * len(t) / sum(t), 1) for name, t in times.items()}
    print("ablations (tokens/s):", json.dumps(out, indent=1), file=sys.stderr)
    return {"tokens": n_tok, "batch_tokens": args.batch_tokens, "tokens_per_s": out}


def groups(rows: list[list[int]], tokens: int) -> list[list[list[int]]]:
    """Consecutive rows in groups of about ``tokens`` tokens (the units that variants are timed on)."""
    out: list[list[list[int]]] = [[]]
    for row in rows:
        if out[-1] and sum(map(len, out[-1])) + len(row) > tokens:
            out.append([])
        out[-1].append(row)
    return out


def interleaved(variants: dict, units: list, rounds: int) -> dict[str, list[float]]:
    """Seconds of every variant on every unit; the order rotates per unit, so load drifts hit all alike."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for i, unit in enumerate(units):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(timed(lambda name=name, unit=unit: variants[name](unit)))
            done = ", ".join(f"{n}: {sum(map(len, unit)) / times[n][-1]:.0f}" for n in names)
            print(f"round {r + 1}/{rounds} unit {i + 1}/{len(units)} tok/s: {done}", file=sys.stderr)
    return times


if __name__ == "__main__":
    sys.exit(main())
