"""``kedit compare DIR1 DIR2 ...``: post-edit metrics of several eval runs side by side (+ PNGs, one HTML page).

Runs on different datasets (CounterFact, zsRE with portability, MQuAKE) and with health figures line up:
every metric any run has gets a row; a run without it shows "-".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Run directories, plot path, --json."""
    p.add_argument("runs", nargs="+", help="eval output directories (or summary.json files)")
    p.add_argument("--png", default=None, help="comparison plot path (default: DIR1/../compare.png)")
    p.add_argument("--html", default=None, help="one-page HTML report (default: compare.html beside the plot)")
    p.add_argument("--json", action="store_true", help="print the table as JSON (default: a text table)")


def _name(path: str, summary: dict) -> str:
    ed = summary.get("config", {}).get("editor", {})
    return f"{Path(path).name} ({ed.get('method', '?')}/{ed.get('targets', '-')})"


def run(args: argparse.Namespace) -> int:
    """Print post-edit means side by side (and eval throughput), write the comparison PNG."""
    from kedit.eval.html import compare_page
    from kedit.eval.report import ORDER, load_summary, metric_keys, plot_compare, plot_health
    from kedit.io import write_text

    runs = [(_name(r, s), s) for r, s in ((r, load_summary(r)) for r in args.runs)]  # errors name the file
    keys = []
    for _, s in runs:
        keys += [k for k in metric_keys(s) if k not in keys]
    keys.sort(key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))  # runs of different datasets
    table = {k: {name: s.get(k, {}).get("mean") for name, s in runs} for k in keys}
    rates = {name: s.get("timings", {}).get("post_eval_records_per_s") for name, s in runs}
    if args.json:
        print(json.dumps({"metrics": table, "post_eval_records_per_s": rates}, indent=1))
    else:
        names = [n for n, _ in runs]
        w = max(len(k) for k in keys + ["post-eval records/s"])
        print(" " * w + " | " + " | ".join(names))
        for k in keys:
            cells = ["-" if v is None else f"{v:.4f}" for v in table[k].values()]
            print(k.ljust(w) + " | " + " | ".join(c.rjust(len(n)) for c, n in zip(cells, names, strict=True)))
        cells = ["-" if v is None else f"{v:.2f}" for v in rates.values()]
        print("post-eval records/s".ljust(w) + " | " + " | ".join(c.rjust(len(n)) for c, n in zip(cells, names,
                                                                                               strict=True)))
    png = Path(args.png) if args.png else Path(args.runs[0]).resolve().parent / "compare.png"
    if not args.png:
        from kedit.commands._common import check_writable

        check_writable(png, "file", "compare.png")
    plot_compare(runs, png)
    pngs = [png]
    health = [(name, s["health_trajectory"]) for name, s in runs if len(s.get("health_trajectory") or []) > 1]
    if health:  # health over the number of edits, one line per run that has a trajectory
        pngs.append(png.with_name(png.stem + "_health.png"))
        plot_health(health, pngs[-1])
    html = Path(args.html) if args.html else png.with_name("compare.html")
    write_text(html, compare_page(runs, pngs, keys))
    if not args.json:
        print(f"wrote {', '.join(map(str, pngs))}, {html}")
    return 0
