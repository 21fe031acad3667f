"""``kedit stats``: compute (or find cached) second-moment statistics C_l of W_out inputs (METHODS §3)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kedit.stats import StatsInfo, StatsSpec


def parse_layers(text: str) -> list[int]:
    """``"4,5,8"`` or ``"4-8"`` (inclusive) or a mix -> sorted unique layer indices (ArgumentTypeError if malformed)."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            layers.update(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a layer index or a range like 4-8") from None
    if not layers:
        raise argparse.ArgumentTypeError("no layer given")
    return sorted(layers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = StatsSpec()
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default: %(default)s)")
    p.add_argument("--layers", required=True, type=parse_layers, help="layer indices, e.g. 4,5,6,7,8 or 4-8")
    p.add_argument("--corpus", default=None,
                   help="text file, directory of text files or .jsonl (default: text sampled from the model)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="token budget (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per row (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per forward pass (memory only)")
    p.add_argument("--text-field", default=d.text_field, help="JSONL text field (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the self-sampled corpus")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def run(args: argparse.Namespace) -> int:
    from kedit.models import load_model
    from kedit.stats import second_moments

    spec = StatsSpec(corpus=args.corpus, tokens=args.tokens, max_length=args.max_length,
                     batch_tokens=args.batch_tokens, text_field=args.text_field, seed=args.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    info: dict[int, StatsInfo] = {}
    try:
        second_moments(model, tok, args.layers, spec, progress=not args.json or sys.stderr.isatty(), info=info)
    except ValueError as e:  # e.g. a layer out of range: a user error, not a traceback
        print(f"kedit stats: error: {e}", file=sys.stderr)
        return 2
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
