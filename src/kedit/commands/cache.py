"""``kedit cache list|clear``: what kedit keeps under KEDIT_HOME, how big it is, and removing it.

Kinds (one folder each under ``kedit_home()``): ``stats`` (second moments per model, layer, corpus),
``templates`` (context templates per model), ``corpus`` (text sampled from a model for statistics),
``layers`` (``--layers auto`` choices), ``models`` (embedded models converted to safetensors). Entries
whose name starts with ``.`` or ends in ``.tmp`` are leftovers of interrupted writes. ``clear`` never
asks (scripts, CI) and prints every path it removes; ``--dry-run`` only prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kedit.commands._common import nonneg_float

KINDS = ("stats", "templates", "corpus", "layers", "models")


@dataclass
class Entry:
    """One cache entry: a file (or a model directory) with its size, age and what it holds."""

    kind: str
    path: Path
    size: int      # bytes (a directory: all files below it)
    mtime: float   # seconds since the epoch (a directory: its newest file)
    what: str      # human-readable description from the entry's manifest or name

    @property
    def leftover(self) -> bool:
        return self.path.name.startswith(".") or self.path.name.endswith(".tmp")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "bytes": self.size, "modified": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.localtime(self.mtime)), "what": self.what, "leftover": self.leftover}


def _size_mtime(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), max((p.stat().st_mtime for p in files), default=path.stat().st_mtime)


def _describe(kind: str, path: Path) -> str:
    """What the entry is, read from its manifest where it has one; never raises (damaged entries say so)."""
    try:
        if kind == "stats":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["kedit_stats"])
            key = meta["key"]
            return (f"model {key['model']} layer {key['layer']} ({key['site']}), {key['tokens']:,} tokens, "
                    f"corpus {str(key['corpus'])[:12]}, {key['dtype']}")
        if kind in ("templates", "layers"):
            data = json.loads(path.read_text(encoding="utf-8"))
            spec = data.get("spec", {})
            if kind == "templates":
                n = len(data.get("templates", []))
                return f"model {spec.get('fingerprint')}: {n} templates, seed {spec.get('seed')}"
            return f"model {spec.get('fingerprint')} {spec.get('method')}: layers {data.get('layers')}"
        if kind == "corpus":  # <fingerprint>-s<seed>-n<tokens>.jsonl
            fp, _, rest = path.stem.partition("-s")
            seed, _, tokens = rest.partition("-n")
            return f"model {fp}: text sampled with seed {seed}, {int(tokens):,} tokens"
        if kind == "models":
            meta = json.loads((path / "kedit-manifest.json").read_text(encoding="utf-8"))
            return f"embedded model {path.name} converted from {meta.get('source')}"
    except Exception as e:  # a damaged entry is still listed (and removable)
        return f"unreadable ({type(e).__name__})"
    return ""


def scan(home: Path, kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    """Every cache entry under ``home`` of the given kinds, by kind then path."""
    out = []
    for kind in kinds:
        folder = home / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            size, mtime = _size_mtime(path)
            what = "leftover of an interrupted write" if path.name.startswith(".") or path.name.endswith(
                ".tmp") else _describe(kind, path)
            out.append(Entry(kind, path, size, mtime, what))
    return out


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(p))
    ls = sub.add_parser("list", help="show cache entries, their sizes and what each is",
                        formatter_class=p.formatter_class)
    clear = sub.add_parser("clear", help="remove cache entries (no questions; prints what it removes)",
                           formatter_class=p.formatter_class)
    for q in (ls, clear):
        q.add_argument("--kind", choices=[*KINDS, "all"], default="all", help="which cache")
        q.add_argument("--older-than", type=nonneg_float, default=None, metavar="DAYS",
                       help="only entries not modified for DAYS days (default: any age)")
        q.add_argument("--json", action="store_true", help="print JSON on stdout (default: a table)")
    clear.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")


def run(args: argparse.Namespace) -> int:
    from kedit.models import kedit_home

    home = kedit_home()
    kinds = KINDS if args.kind == "all" else (args.kind,)
    entries = scan(home, kinds)
    if args.older_than is not None:
        cutoff = time.time() - args.older_than * 86400
        entries = [e for e in entries if e.mtime < cutoff]
    total = sum(e.size for e in entries)
    if args.action == "list":
        if args.json:
            print(json.dumps({"home": str(home), "bytes": total, "entries": [e.to_dict() for e in entries]}, indent=1))
            return 0
        print(f"kedit caches under {home}")
        for kind in kinds:
            mine = [e for e in entries if e.kind == kind]
            if mine:
                print(f"\n{kind}: {len(mine)} entr{'y' if len(mine) == 1 else 'ies'}, "
                      f"{human(sum(e.size for e in mine))}")
            for e in mine:
                print(f"  {human(e.size):>10}  {e.to_dict()['modified']}  {e.path.name}  {e.what}")
        print(f"\ntotal {human(total)} in {len(entries)} entries")
        return 0
    removed = []
    for e in entries:
        if not args.dry_run:
            if e.path.is_dir():
                shutil.rmtree(e.path)
            else:
                e.path.unlink()
        removed.append(e)
        if not args.json:
            print(f"{'would remove' if args.dry_run else 'removed'} {e.kind}: {e.path} ({human(e.size)})")
    if args.json:
        print(json.dumps({"home": str(home), "dry_run": args.dry_run, "bytes": total,
                          "removed": [e.to_dict() for e in removed]}, indent=1))
    else:
        print(f"{'would free' if args.dry_run else 'freed'} {human(total)} in {len(removed)} entries")
    return 0
