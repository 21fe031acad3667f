"""``kedit stats``: compute (or find cached) second-moment statistics C_l of W_out inputs (METHODS §3)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kedit.commands._common import add_layers_arg, add_model_args, add_seed_arg, add_stats_args, load, stats_spec
from kedit.stats import StatsInfo


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_layers_arg(p, required=True, allow_auto=False, help="layers whose statistics to compute: 4-8, 4,5,6 or 4-6,9")
    add_stats_args(p)
    add_seed_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (default: one line per layer)")


def run(args: argparse.Namespace) -> int:
    from kedit.stats import second_moments

    spec = stats_spec(args)
    t0 = time.perf_counter()
    model, tok = load(args)  # also checks --layers against the model's depth
    load_s = time.perf_counter() - t0
    info: dict[int, StatsInfo] = {}
    second_moments(model, tok, args.layers, spec, progress=not args.quiet and sys.stderr.isatty(), info=info)
    rows = [{"layer": la, "path": str(i.path), "cached": i.cached, "tokens": i.tokens, "seconds": round(i.seconds, 3)}
            for la, i in sorted(info.items())]
    if args.json:
        print(json.dumps({"model": args.model, "spec": vars(spec), "load_seconds": round(load_s, 3),
                          "total_seconds": round(time.perf_counter() - t0, 3), "layers": rows}, indent=1))
        return 0
    for r in rows:
        how = "cache hit" if r["cached"] else f"computed, {r['tokens'] / max(r['seconds'], 1e-9):,.0f} tok/s"
        print(f"layer {r['layer']:>3}: {r['path']}  ({how}; {r['tokens']:,} tokens, {r['seconds']:.2f} s)")
    print(f"total {time.perf_counter() - t0:.1f} s (model load {load_s:.1f} s)")
    return 0
