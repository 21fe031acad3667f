"""``kedit plan``: peak memory of each phase of an edit, from the config alone (nothing is loaded)."""

from __future__ import annotations

import argparse
import json

from kedit.commands._common import add_layers_arg
from kedit.plan import DTYPES, GIB, SHAPES, SOLVE_FF, load_config, model_shape, plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local HF model directory, config.json path or embedded name")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a published model shape")
    p.add_argument("--method", default="memit", choices=sorted(SOLVE_FF), help="editing method (default: memit)")
    add_layers_arg(p, allow_auto=False)
    p.add_argument("--requests", type=int, default=1, help="requests edited in one batch (default: 1)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default: float32)")
    p.add_argument("--tokens", type=int, default=None, help="statistics token budget (streamed: recorded only, "
                   "memory does not grow with it)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens per statistics forward pass "
                   "(StatsSpec.batch_tokens)")
    p.add_argument("--memory", type=float, default=None, help="GiB available: say whether the plan fits")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (default: a table)")


def run(args: argparse.Namespace) -> int:
    source = args.shape or args.model
    result = plan(model_shape(load_config(source), name=source), args.method, args.layers,
                  args.requests, args.dtype, batch_tokens=args.batch_tokens)
    result.assumptions["stats_tokens"] = args.tokens
    fits = None if args.memory is None else result.peak <= args.memory * GIB
    if args.json:
        print(json.dumps({**result.to_dict(), "fits": fits}, indent=1))
    else:
        print(result.table())
        if fits is not None:
            print(f"{'fits' if fits else 'does NOT fit'} in {args.memory:g} GiB")
    return 0
