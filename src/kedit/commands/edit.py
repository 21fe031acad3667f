"""``kedit edit``: edit facts, show before/after, optionally save the patch."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kedit import distributed
from kedit.commands._common import (
    add_editor_args,
    add_model_args,
    load,
    make_editor,
    print_diagnostics,
    print_table,
    snapshot,
    verbose,
)
from kedit.errors import BadRequest
from kedit.probe import did_not_take
from kedit.requests import EditRequest, read_requests


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_editor_args(p)
    g = p.add_argument_group("facts")
    g.add_argument("--prompt", help="prompt with '{}' for the subject, or containing the subject once")
    g.add_argument("--subject", help="the subject the fact is about (must occur in the prompt)")
    g.add_argument("--target", help="the new object")
    g.add_argument("--true", dest="true_target", help="the current object (optional; shown before/after)")
    g.add_argument("--requests", help="JSON/JSONL file of requests (CounterFact or kedit shape) instead of "
                   "--prompt/--subject/--target")
    p.add_argument("--save", help="write the edit to this .safetensors patch (checked writable before editing)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (default: a table)")


def requests_from_args(args: argparse.Namespace) -> list[EditRequest]:
    if args.requests:
        if args.prompt or args.subject or args.target:
            raise BadRequest("give either --requests FILE or --prompt/--subject/--target, not both")
        return read_requests(args.requests)
    missing = [n for n in ("prompt", "subject", "target") if not getattr(args, n)]
    if missing:
        raise BadRequest(f"missing --{', --'.join(missing)} (or give --requests FILE)")
    return [EditRequest(args.prompt, args.subject, args.target, args.true_target)]


def run(args: argparse.Namespace) -> int:
    requests = requests_from_args(args)
    model, tok = load(args)
    editor = make_editor(args, model, tok, verbose=verbose(args))
    if verbose(args):
        print(f"[kedit] method={args.method} targets={args.targets} layers={editor.layers} "
              f"anchor={editor.anchor_cfg}", file=sys.stderr)
    before = snapshot(model, tok, requests)
    t0 = time.perf_counter()
    edit = editor.apply(requests)
    seconds = time.perf_counter() - t0
    after = snapshot(model, tok, requests)
    for i in did_not_take([b["p_new"] for b in before], [a["p_new"] for a in after]):
        r = requests[i]
        print(f"kedit edit: warning: the edit did not take for {r.filled!r} -> {r.target_new!r} (P(new) "
              f"{before[i]['p_new']:.3g} -> {after[i]['p_new']:.3g}); try more --steps, other --layers or a "
              "lower --lam", file=sys.stderr)
    if args.save and distributed.is_main():  # under torchrun every rank holds the same edit: rank 0 saves it
        path = edit.save(args.save)
        if verbose(args):
            print(f"[kedit] saved patch to {path}", file=sys.stderr)
    if args.json:
        rec = edit.record  # the run's settings as the record holds them: every hyperparameter, not only the flags
        out = {"method": args.method, "targets": args.targets, "layers": editor.layers,
               "edit_layers": rec["edit_layers"], "solver": rec["solver"], "anchor": rec["anchor"],
               "key_weighting": rec["key_weighting"], "stats": rec["stats"], "seed": rec["seed"],
               "seconds": round(seconds, 3), "timings": edit.record["timings"],
               "requests": [{**r.to_dict(), "before": b, "after": a} for r, b, a in zip(requests, before, after)]}
        if "diagnostics" in edit.record:
            out["diagnostics"] = edit.record["diagnostics"]
        print(json.dumps(out, indent=1))
    else:
        print_table(requests, before, after)
        if args.diagnostics:
            print_diagnostics(edit.record)
        if verbose(args):
            print(f"\n[kedit] edited {len(requests)} fact(s) in {seconds:.1f} s", file=sys.stderr)
    return 0
