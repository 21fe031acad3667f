"""Arguments and printing shared by the editing subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kedit.probe import greedy, target_probs
from kedit.requests import EditRequest


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, HF directory, .gguf file or cached hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")


def add_editor_args(p: argparse.ArgumentParser) -> None:
    from kedit.solvers import SOLVERS
    from kedit.targets import TARGETS

    p.add_argument("--method", default="memit", choices=sorted(SOLVERS))
    p.add_argument("--targets", default="forward", choices=sorted(TARGETS))
    p.add_argument("--layers", default=None, help="comma-separated layers, e.g. 4,5,6,7,8, or 'auto' (verified "
                   "selection on the packaged facts, cached per model, method and targets); default: from depth")
    p.add_argument("--corpus", default=None, help="statistics corpus: text file, directory, JSONL (default: "
                   "text sampled from the model)")
    p.add_argument("--tokens", type=int, default=None, help="statistics token budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lam", type=float, default=None, help="solver weight of the preserved statistics")
    p.add_argument("--steps", type=int, default=None, help="anchor optimisation steps")
    p.add_argument("--lr", type=float, default=None, help="anchor optimisation learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the anchor optimisation")
    p.add_argument("--diagnostics", action="store_true", help="print per-layer diagnostics (always recorded)")


def load(args: argparse.Namespace):
    from kedit.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def stats_spec(args: argparse.Namespace):
    from kedit.stats import StatsSpec

    kw: dict[str, Any] = {}
    if args.corpus:
        kw["corpus"] = args.corpus
    if args.tokens:
        kw["tokens"] = args.tokens
    return StatsSpec(**kw, seed=args.seed)


def make_editor(args: argparse.Namespace, model, tok, verbose: bool = True):
    from kedit.editor import Editor

    anchor = {k: v for k, v in {"steps": args.steps, "lr": args.lr}.items() if v is not None}
    if args.bf16:
        anchor["autocast_bf16"] = True
    if args.layers == "auto":
        from kedit.layers.auto import resolve_auto

        decision = resolve_auto(model, tok, args.method, args.targets, stats=stats_spec(args),
                                editor_kwargs={"anchor": anchor})
        print(f"[kedit] {decision.summary()}", file=sys.stderr, flush=True)
        layers = decision.layers
    else:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    hp = {"lam": args.lam} if args.lam is not None and args.method in ("memit", "emmet") else {}
    return Editor(model, tok, method=args.method, targets=args.targets, layers=layers, stats=stats_spec(args),
                  anchor=anchor, seed=args.seed, verbose=verbose, **hp)


def snapshot(model, tok, requests: list[EditRequest], max_new_tokens: int = 10) -> list[dict[str, Any]]:
    """Per request: P(new), P(true) and the greedy continuation of the filled prompt."""
    prompts = [r.filled for r in requests]
    p_new = target_probs(model, tok, prompts, [r.target_new for r in requests])
    trues = [r.target_true for r in requests]
    p_true = target_probs(model, tok, [p for p, t in zip(prompts, trues, strict=True) if t],
                          [t for t in trues if t]) if any(trues) else []
    it = iter(p_true)
    gens = greedy(model, tok, prompts, max_new_tokens)
    return [{"p_new": pn, "p_true": next(it) if t else None, "generation": g}
            for pn, t, g in zip(p_new, trues, gens, strict=True)]


def print_table(requests: list[EditRequest], before: list[dict], after: list[dict], out=sys.stdout) -> None:
    """Human-readable before/after per request."""
    fmt = lambda x: "  -  " if x is None else f"{x:.3f}"  # noqa: E731
    for r, b, a in zip(requests, before, after, strict=True):
        was = f" (was {r.target_true!r})" if r.target_true else ""
        print(f"\n{r.filled!r}  ->  {r.target_new!r}{was}", file=out)
        print(f"  before  p_new={fmt(b['p_new'])} p_true={fmt(b['p_true'])}  {b['generation']!r}", file=out)
        print(f"  after   p_new={fmt(a['p_new'])} p_true={fmt(a['p_true'])}  {a['generation']!r}", file=out)


def print_diagnostics(record: dict[str, Any], out=sys.stderr) -> None:
    for d in record.get("diagnostics", []):
        print(f"  layer {d['layer']:>3}: remaining residual {d['residual_ratio']:.3f}  "
              f"cos(own, induced) {d['cos_own_induced']:.3f}  |delta| {d['delta_norm']:.3f}", file=out)
