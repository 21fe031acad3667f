"""Shared by the benchmark scripts: data locations, the machine description and table cells.

Scripts run as ``bench/<name>.py`` (this folder is on ``sys.path``) and import ``from common import ...``.
Real data lives beside the repository in ``../shared/data`` and is never copied into it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
CORPUS = DATA / "wikitext-2-raw" / "wiki.test.raw"  # the statistics corpus of every benchmark


def save_json(path: Path, obj: Any, **kw: Any) -> Path:
    """Write a result atomically (kedit.io): indented, non-JSON values as strings; a killed run leaves the old file."""
    from kedit.io import write_json

    return write_json(path, obj, **({"indent": 1, "default": str} | kw))


def save_text(path: Path, text: str) -> Path:
    """Write a table or page atomically (kedit.io)."""
    from kedit.io import write_text

    return write_text(path, text)


def anchor_dir() -> Path:
    """The per-request anchor cache every benchmark shares (kedit's verified directory cache, content-keyed):
    runs resume without re-optimising and reuse each other's anchors (protocol, reference fixes, multihop)."""
    from kedit.models import kedit_home

    return kedit_home() / "anchors"


def checkpoint_dir(out: Path) -> Path:
    """Where a benchmark writing to ``out`` keeps its resume checkpoints: in kedit's cache, not the results
    (weights and solver state, ~100 MB per unit), one folder per results folder (named relative to the checkout
    when inside it, so a fresh clone at another path resumes); a finished unit deletes its own."""
    import hashlib

    from kedit.models import kedit_home

    out = out.resolve()
    name = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    return kedit_home() / "bench-checkpoints" / hashlib.sha256(name.encode()).hexdigest()[:16]


def require_data(*paths: Path) -> None:
    """Exit with a one-line 'skipped' note (status 0) if any of ``paths`` is absent: benchmarks need ../shared/data."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        print(f"{Path(sys.argv[0]).name}: skipped, data absent: {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(0)


def machine() -> dict:
    """CPU model, cores, bf16 matrix units, library versions, torch threads, BLAS, load average at the start."""
    cpu, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other", "loadavg_start": os.getloadavg(),
            # bf16 matrix units: with them bf16 products are several times faster than fp32 here, without slower
            "bf16_units": [f for f in ("amx_bf16", "avx512_bf16") if f in flags]}


def metric_cell(entry: dict | None, ci: bool = True) -> str:
    """A summary metric ``{"mean", "ci_low", "ci_high"}`` as ``0.123 [0.10, 0.15]`` (or ``0.123``); ``-`` if absent."""
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]" if ci else f"{entry['mean']:.3f}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are printed with 3 significant decimals, None as ``-``."""
    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


class Recording:
    """An Editor that keeps every applied edit's record (diagnostics, anchor/solve seconds); otherwise the Editor."""

    def __init__(self, editor):
        self.editor, self.records = editor, []

    def apply(self, requests):
        edit = self.editor.apply(requests)
        self.records.append(edit.record)
        return edit

    def apply_each(self, requests, skip_failures=False):
        for edit in self.editor.apply_each(requests, skip_failures=skip_failures):
            if edit is not None:
                self.records.append(edit.record)
            yield edit

    def __getattr__(self, name):
        return getattr(self.editor, name)
