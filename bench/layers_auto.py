"""Benchmark: does ``--layers auto`` edit held-out records as well as the default layers? (issue 10, Done when)

    flock /tmp/kedit-heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/layers_auto.py

For each dataset x method, two ``kedit eval`` runs on the same held-out records: the default layers, and
``--layers auto`` (the verified selector on kedit's packaged demo facts, so the proxy set and the
evaluated records are disjoint by construction). ROME edits each record alone on the unedited model
(``--single``); MEMIT edits all records in one batch. Records: ``--n`` from ``--offset`` (default
200-249 of the 500 ROME-format CounterFact records, outside what bench/layers.py uses as proxy and test).

Per cell: the layers each run used, what the auto decision cost and how stable it was, every
selection metric (the harness's rank score is their per-record mean, as the layer search scores), S
for CounterFact, and the paired auto - default difference with a 95% bootstrap CI over records. The
verdict is "as good or better" when the CI's upper end is >= 0 (auto not measurably worse).

Resumable: each run's output directory is kept (bench/results/layers_auto/<cell>_<arm>/) and a run
whose summary.json exists is not repeated; the auto decision is cached by kedit ($KEDIT_HOME/layers).
Tiny check: --n 2 --methods rome --datasets counterfact --out /tmp/la (minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import CORPUS, DATA, RESULTS, machine, markdown_table, require_data, save_json, save_text  # bench/common.py

from kedit.eval.metrics import bootstrap_ci, harmonic_mean, score_keys

FILES = {"counterfact": ("counterfact", DATA / "counterfact_subset500.json", []),
         "zsre": ("zsre", DATA / "zsre_mend_eval_portability_gpt4.json", ["--zsre-target", "alt"])}
S_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def run_eval(args: argparse.Namespace, label: str, method: str, arm: str, out: Path) -> dict[str, Any]:
    """One ``kedit eval`` run (skipped when its summary exists); returns what it used and printed."""
    kind, path, extra = FILES[label]
    meta = out / "bench_run.json"
    if (out / "summary.json").is_file() and meta.is_file():
        return json.loads(meta.read_text())
    cmd = [sys.executable, "-m", "kedit", "eval", "--method", method, "--dataset", f"{kind}:{path}",
           "--n", str(args.n), "--offset", str(args.offset), "--corpus", str(CORPUS), "--tokens", str(args.tokens),
           "--out", str(out), "--no-plots", "--quiet", *extra, *(["--single"] if method == "rome" else [])]
    if arm == "auto":
        cmd += ["--layers", "auto"]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    print(f"[layers_auto] {label} {method} {arm}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"kedit eval failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    decision = [ln for ln in proc.stderr.splitlines() if "--layers auto:" in ln]
    rec = {"command": "kedit " + " ".join(cmd[3:]), "seconds": time.perf_counter() - t0,
           "auto_decision": decision[-1] if decision else None}
    save_json(meta, rec)
    return rec


def cases_of(out: Path) -> dict[int, dict[str, Any]]:
    with open(out / "cases.jsonl") as f:
        return {c["case_id"]: c for c in map(json.loads, f)}


def compare(kind: str, default: dict[int, dict], auto: dict[int, dict], seed: int = 0) -> dict[str, Any]:
    """Per metric: both means and the paired auto - default difference (95% bootstrap CI over records)."""
    ids = sorted(default.keys() & auto.keys())
    keys = score_keys(kind)

    def col(runs: dict[int, dict], k: str) -> np.ndarray:
        return np.array([runs[i]["post"].get(k, np.nan) for i in ids], dtype=float)

    out: dict[str, Any] = {"n": len(ids), "metrics": {}}
    for k in (*keys, "neighborhood_kl") if kind == "counterfact" else keys:
        a, d = col(auto, k), col(default, k)
        ok = ~(np.isnan(a) | np.isnan(d))
        lo, hi = bootstrap_ci(a[ok] - d[ok], seed=seed)
        out["metrics"][k] = {"default": float(d[ok].mean()), "auto": float(a[ok].mean()),
                             "diff": float((a[ok] - d[ok]).mean()), "ci": [lo, hi]}
    rank = {arm: np.nanmean(np.stack([col(r, k) for k in keys], 1), 1)  # [n]
            for arm, r in (("auto", auto), ("default", default))}
    lo, hi = bootstrap_ci(rank["auto"] - rank["default"], seed=seed)
    out["rank_score"] = {"default": float(rank["default"].mean()), "auto": float(rank["auto"].mean()),
                         "diff": float((rank["auto"] - rank["default"]).mean()), "ci": [lo, hi],
                         "convention": f"per-record mean of {', '.join(keys)} (the layer search's score)"}
    if kind == "counterfact":
        rows = np.stack([col(auto, k) for k in S_KEYS] + [col(default, k) for k in S_KEYS], 1)  # [n, 6]

        def s_diff(x: np.ndarray) -> float:
            return harmonic_mean(x[:, :3].mean(0)) - harmonic_mean(x[:, 3:].mean(0))

        lo, hi = bootstrap_ci(rows, stat=s_diff, seed=seed)
        out["S"] = {"default": harmonic_mean(rows[:, 3:].mean(0)), "auto": harmonic_mean(rows[:, :3].mean(0)),
                    "diff": s_diff(rows), "ci": [lo, hi], "convention": "harmonic mean of ES, PS, NS means"}
    out["verdict"] = "as good or better" if out["rank_score"]["ci"][1] >= 0 else "worse"
    return out


def diff_cell(entry: dict[str, Any]) -> str:
    return f"{entry['diff']:+.3f} [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--methods", nargs="+", default=["rome", "memit"], choices=["rome", "memit"])
    p.add_argument("--n", type=int, default=50, help="held-out records per cell")
    p.add_argument("--offset", type=int, default=200, help="first held-out record")
    p.add_argument("--tokens", type=int, default=100_000, help="second-moment token budget (wikitext-2 test)")
    p.add_argument("--steps", type=int, default=None, help="anchor optimisation steps (default: the editor's)")
    p.add_argument("--out", default=str(RESULTS / "layers_auto"))
    args = p.parse_args()
    require_data(CORPUS, *(FILES[d][1] for d in args.datasets))
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": vars(args), "machine": machine(), "cells": {}}
    rows = []
    for label in args.datasets:
        kind = FILES[label][0]
        for method in args.methods:
            runs, layers = {}, {}
            for arm in ("default", "auto"):
                out = root / f"{label}_{method}_{arm}"
                runs[arm] = run_eval(args, label, method, arm, out)
                layers[arm] = json.loads((out / "summary.json").read_text())["config"]["editor"]["layers"]
            cmp = compare(kind, cases_of(root / f"{label}_{method}_default"), cases_of(root / f"{label}_{method}_auto"))
            result["cells"][f"{label}|{method}"] = {"layers": layers, "runs": runs, **cmp}
            r, s = cmp["rank_score"], cmp.get("S")
            rows.append([label, method, str(layers["default"]), str(layers["auto"]), cmp["n"],
                         f"{r['default']:.3f} / {r['auto']:.3f}", diff_cell(r),
                         f"{s['default']:.3f} / {s['auto']:.3f} ({diff_cell(s)})" if s else "-",
                         f"{runs['auto']['seconds']:.0f} / {runs['default']['seconds']:.0f}", cmp["verdict"]])
    header = ["dataset", "method", "default layers", "auto layers", "n", "rank score default / auto",
              "auto - default [95% CI]", "S default / auto (diff [CI])", "seconds auto / default", "verdict"]
    result["table"] = markdown_table(header, rows)
    save_json(root / "layers_auto.json", result)
    save_text(root / "table.md", result["table"] + "\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
