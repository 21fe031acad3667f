"""Benchmark: evaluation beyond the edited sentence on SmolLM2 — MQuAKE multi-hop and zsRE portability.

    .venv/bin/python bench/multihop.py [--n-mquake 50] [--n-portability 100] [--runs ...] [--table-only]

Each run is one ``kedit eval`` command (run in-process through kedit.cli.main, so the command in
summary.json is what a user would type): unedited, MEMIT backward and MEMIT forward with the same
``--lam 15000``, batch editing (all rewrites of all cases in one MEMIT application) and per case
(``*_single``: each case's rewrites as one batch, weights restored in between; anchors reused from the
batch run through ``--anchor-cache``), default layers, statistics over wikitext-2 (test split),
``--health`` on every batch run. The MQuAKE MEMIT-forward run is the
issue's "done when" command (plus ``--corpus`` and ``--lam``). Portability uses zsRE's EasyEdit target
convention (``--zsre-target alt``): the portability questions are written around ``alt``. Writes
bench/results/mquake_<run>/ and bench/results/portability_<run>/ (summary.json, summary.md, cases.jsonl,
plots, report.html), bench/results/multihop_table.md and bench/results/multihop_summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (  # bench/common.py (scripts run as bench/<name>.py)
    CORPUS,
    DATA,
    RESULTS,
    anchor_dir,
    machine,
    save_json,
    save_text,
)

LAM = "15000"
RUNS = {"none": ["--method", "none"],
        "memit_backward": ["--method", "memit", "--targets", "backward", "--lam", LAM],
        "memit_forward": ["--method", "memit", "--targets", "forward", "--lam", LAM],
        # per case (MQuAKE: each case's rewrites as one batch, restored before the next case); the anchors
        # come from the batch run's cache, so run the batch run first
        "memit_backward_single": ["--method", "memit", "--targets", "backward", "--lam", LAM, "--single"],
        "memit_forward_single": ["--method", "memit", "--targets", "forward", "--lam", LAM, "--single"]}
MQUAKE_KEYS = ("edit_wise_score", "edit_wise_acc", "multihop_acc", "multihop_old_acc", "multihop_score",
               "hopwise_acc", "health_perplexity", "health_top1_agreement", "health_kl")
PORT_KEYS = ("efficacy_token_acc", "generalization_token_acc", "specificity_agreement", "portability_token_acc",
             "portability_exact_match", "health_perplexity", "health_top1_agreement", "health_kl")


def command(dataset: str, run: str, n: int) -> list[str]:
    """The `kedit eval` arguments of one (dataset, run)."""
    spec = {"mquake": ["--dataset", f"mquake:{DATA / 'mquake_cf3k_akew_subset354.json'}"],
            "portability": ["--dataset", f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}",
                            "--zsre-target", "alt"]}[dataset]
    # health after every single edit would cost one health measurement per case: batch runs only
    health = [] if "--single" in RUNS[run] else ["--health"]
    cache = [] if run == "none" else ["--anchor-cache", str(anchor_dir())]
    return ["eval", *spec, *RUNS[run], "--n", str(n), *health, *cache, "--corpus", str(CORPUS),
            "--out", str(RESULTS / f"{dataset}_{run}")]



def run_all(args: argparse.Namespace) -> None:
    from kedit.cli import main

    info = machine()
    for ds, n in (("mquake", args.n_mquake), ("portability", args.n_portability)):
        if ds not in args.datasets.split(","):
            continue
        for run in args.runs.split(","):
            argv = command(ds, run, n)
            print("[bench] kedit " + " ".join(argv), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            if main(argv) != 0:
                raise SystemExit(f"kedit eval failed for {ds} {run}")
            out = RESULTS / f"{ds}_{run}" / "summary.json"
            s = json.loads(out.read_text())
            s["timings"]["wall_s"] = time.perf_counter() - t0
            s["config"]["machine"] = info
            s["config"]["kedit_command"] = "kedit " + " ".join(argv)  # config.command is this script's argv
            save_json(out, s)


def cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def table(name: str, keys: tuple[str, ...], runs: dict[str, dict]) -> list[str]:
    lines = [f"### {name}", "", "| metric | " + " | ".join(f"{r} (n={s['n_cases']})" for r, s in runs.items()) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for k in keys:
        if any(k in s for s in runs.values()):
            lines.append(f"| {k} | " + " | ".join(cell(s.get(k)) for s in runs.values()) + " |")
    for label, key in (("edit s", "edit_s"), ("post-eval s", "post_eval_s"), ("health s", "health_s"),
                       ("wall s", "wall_s")):
        vals = [s["timings"].get(key) for s in runs.values()]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    lines += ["", "Evaluated: " + "; ".join(f"{r}: {s['evaluated']}" for r, s in runs.items()), "", "Commands:", ""]
    return lines + [f"- `{s['config']['kedit_command']}`" for s in runs.values()] + [""]


def write_table() -> int:
    out: dict[str, dict] = {}
    for ds in ("mquake", "portability"):
        for run in RUNS:
            f = RESULTS / f"{ds}_{run}" / "summary.json"
            if f.is_file():
                s = json.loads(f.read_text())
                s["config"].setdefault("kedit_command", "kedit " + " ".join(command(ds, run, s["n_cases"])))
                out.setdefault(ds, {})[run] = s
    if not out:
        print("no results under bench/results/{mquake,portability}_*", file=sys.stderr)
        return 1
    info = next((s["config"].get("machine") for runs in out.values() for s in runs.values()
                 if s["config"].get("machine")), None) or {}
    lines = ["# kedit eval beyond the edited sentence (SmolLM2-135M, CPU)", "",
             f"Machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores (shared with other jobs), "
             f"torch threads {info.get('torch_threads', '?')}.",
             f"Cells: mean [95% bootstrap CI]; batch editing (`*_single`: per case); MEMIT lam {LAM} for both targets; "
             "`none` = unedited "
             "(= pre-edit values). Commands: config.command in each run's summary.json.", ""]
    for ds, keys in (("mquake", MQUAKE_KEYS), ("portability", PORT_KEYS)):
        if ds in out:
            lines += table(ds, keys, out[ds])
            cav = next(iter(out[ds].values())).get("caveats", [])
            lines += [f"- caveat: {c}" for c in cav] + ([""] if cav else [])
    save_text(RESULTS / "multihop_table.md", "\n".join(lines))
    slim = {ds: {r: {k: v for k, v in s.items() if k not in ("trajectory",)} for r, s in runs.items()}
            for ds, runs in out.items()}
    save_json(RESULTS / "multihop_summary.json", slim)
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-mquake", type=int, default=50)
    p.add_argument("--n-portability", type=int, default=100)
    p.add_argument("--runs", default=",".join(RUNS), help=f"subset of {list(RUNS)}")
    p.add_argument("--datasets", default="mquake,portability")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the result folders")
    args = p.parse_args()
    if not args.table_only:
        run_all(args)
    return write_table()


if __name__ == "__main__":
    sys.exit(main())
