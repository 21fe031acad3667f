"""``kedit export``: apply a saved patch and write the edited model as a plain HF checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from kedit.commands._common import add_model_args, load
from kedit.edit import Edit
from kedit.export import DEFAULT_SHARD, check_destination, export_edit


def add_export_args(p: argparse.ArgumentParser) -> None:
    """``--max-shard-size`` and ``--overwrite`` (shared with ``kedit apply --export``)."""
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD, help="largest safetensors shard, e.g. 2GB, 500MB "
                   f"(default {DEFAULT_SHARD})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output directory (default: refuse)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("patch", help="a .safetensors patch written by `kedit edit --save`")
    p.add_argument("--out", required=True, help="output directory (created; loads with from_pretrained)")
    p.add_argument("--force", action="store_true", help="apply even if the base weights differ (default: refuse)")
    add_export_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (default: a summary line)")


def run(args: argparse.Namespace) -> int:
    check_destination(args.out, args.overwrite)  # before the (possibly long) load
    edit = Edit.load(args.patch)
    model, tok = load(args)
    out = export_edit(edit, model, args.out, tok, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      force=args.force)
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        print(json.dumps({"patch": args.patch, "out": str(out), "layers": edit.layers, "files": files}, indent=1))
    else:
        print(f"exported {edit!r} applied to {args.model} -> {out} ({len(files)} files)", file=sys.stderr)
        print(out)
    return 0
