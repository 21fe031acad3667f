"""``kedit apply``: apply a saved patch to a freshly loaded model and show its effect."""

from __future__ import annotations

import argparse
import json

from kedit.commands._common import add_model_args, load, print_table, snapshot
from kedit.commands.export import add_export_args
from kedit.edit import Edit
from kedit.export import check_destination, export_edit


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("patch", help="a .safetensors patch written by `kedit edit --save`")
    p.add_argument("--force", action="store_true", help="apply even if the base weights differ (default: refuse)")
    p.add_argument("--export", metavar="DIR", default=None, help="also write the edited model to DIR as a "
                   "plain HF checkpoint, as `kedit export` does (default: no export)")
    add_export_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (default: a table)")


def run(args: argparse.Namespace) -> int:
    if args.export:
        check_destination(args.export, args.overwrite)  # refuse before loading anything
    edit = Edit.load(args.patch)
    model, tok = load(args)
    before = snapshot(model, tok, edit.requests)
    edit.apply(model, force=args.force)
    after = snapshot(model, tok, edit.requests)
    if args.export:
        export_edit(edit, model, args.export, tok, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"patch": args.patch, "layers": edit.layers, "method": edit.record.get("method"),
                          "requests": [{**r.to_dict(), "before": b, "after": a}
                                       for r, b, a in zip(edit.requests, before, after)]}, indent=1))
    else:
        print(f"applied {edit!r}")
        print_table(edit.requests, before, after)
    return 0
