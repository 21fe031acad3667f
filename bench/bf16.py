"""Benchmark: held-out quality and speed of MEMIT on SmolLM2 in bf16 vs fp32 (CPU), issues 9 and 11.

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/bf16.py [--n 20] [--configs fp32_backward,...]

The same first ``--n`` CounterFact records (batch editing, default layers, second moments over
wikitext-2 test computed before the timed edit, no fluency generation), MEMIT with backward and
forward targets. Configurations ``<precision>_<targets>``:
  * ``fp32``: the model in fp32 (kedit's default);
  * ``bf16``: the model loaded with ``load_model("smollm2-135m", dtype="bfloat16")`` (issue 9);
  * ``amp``: the model in fp32, only the anchor optimisation under bf16 autocast (``--bf16``,
    ``AnchorConfig.autocast_bf16``; issue 11: on CPUs with AMX/AVX512-BF16 matrix units bf16 products
    are several times faster, elsewhere slower). ``edit s/request`` is then compared with EasyEdit's
    recorded 9.9 s/request (issue 11).
Everything but the precision is equal. Resumable: each finished configuration is stored in --out at once
and skipped by later runs (``--redo`` recomputes). ``--table-only`` prints the table from the JSON.
Compare timings only within one --out file (one machine; its CPU flags are recorded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import CORPUS, DATA, RESULTS, machine, save_json  # bench/common.py (scripts run as bench/<name>.py)

OUT = RESULTS / "bf16.json"
CONFIGS = {f"{dt}_{tg}": (dt, tg) for dt in ("fp32", "bf16", "amp") for tg in ("backward", "forward")}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "amp": "float32"}  # amp: fp32 model, bf16-autocast anchors
EASYEDIT_S_PER_REQUEST = 9.9  # MEMIT edit phase per request, measured on this kind of machine (issue 11)
KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
        "neighborhood_kl")


def load(out: Path) -> dict:
    return json.loads(out.read_text()) if out.is_file() else {"runs": {}}


def save(out: Path, results: dict) -> None:
    save_json(out, results)  # atomic: a killed run never leaves a half-written file


def run(args: argparse.Namespace, results: dict) -> None:
    from kedit.arch import ArchitectureAdapter
    from kedit.editor import Editor, default_layers
    from kedit.eval import Evaluator, load_dataset
    from kedit.models import load_model
    from kedit.stats import StatsSpec, second_moments

    todo = [c for c in args.configs.split(",") if args.redo or c not in results["runs"]]
    data = load_dataset(f"counterfact:{DATA / 'counterfact_subset500.json'}", n=args.n)
    for dt in ("fp32", "bf16", "amp"):
        mine = [c for c in todo if CONFIGS[c][0] == dt]
        if not mine:
            continue
        t_load = time.perf_counter()
        model, tok = load_model("smollm2-135m", dtype=DTYPES[dt])
        load_s = time.perf_counter() - t_load
        t_stats = time.perf_counter()  # once per model, outside the timed edits (cached in kedit's home)
        layers = default_layers(ArchitectureAdapter.from_model(model).n_layers, True)
        stats = second_moments(model, tok, layers, StatsSpec(corpus=str(CORPUS)), progress=False)
        stats_s = time.perf_counter() - t_stats
        ev = Evaluator(model, tok, fluency=False, seed=0, progress=False)
        for name in mine:
            targets = CONFIGS[name][1]
            t0 = time.perf_counter()
            editor = Editor(model, tok, method="memit", targets=targets, layers=layers, stats=stats, seed=0,
                            verbose=True, anchor={"autocast_bf16": True} if dt == "amp" else {})
            rep = ev.run(data.cases, editor, mode="batch", extra_config={"command": " ".join(sys.argv)})
            wall = time.perf_counter() - t0
            edit_s = rep.timings["edit_s"]
            results["runs"][name] = {
                "dtype": DTYPES[dt], "anchor_autocast_bf16": dt == "amp", "targets": targets,
                "n_cases": len(rep.cases), "load_s": round(load_s, 2), "stats_s": round(stats_s, 2),
                "wall_s": round(wall, 2), "timings": rep.timings, "editor_timings": dict(editor.timings),
                "edit_s_per_request": edit_s / len(rep.cases),
                "speedup_vs_easyedit": EASYEDIT_S_PER_REQUEST / (edit_s / len(rep.cases)),
                "metrics": {k: rep.summary[k] for k in KEYS if k in rep.summary},  # each with its "pre" entry
                "editor": rep.config.get("editor"),
            }
            results["machine"] = machine()
            results["dataset"] = data.describe()
            save(args.out, results)
            print(f"[bench] {name}: {wall:.1f} s, edit {edit_s / len(rep.cases):.2f} s/request", file=sys.stderr,
                  flush=True)


def cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    return f"{entry['mean']:.3f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}]"


def table(results: dict) -> str:
    """Markdown: one column per configuration, plus the unedited model in each dtype (pre-edit values)."""
    runs = {c: results["runs"][c] for c in CONFIGS if c in results["runs"]}
    unedited = {}  # dtype -> the first run's metrics, whose "pre" entries are the unedited model's
    for r in runs.values():
        unedited.setdefault(r["dtype"], r["metrics"])
    heads = [f"unedited {dt} (n={next(iter(runs.values()))['n_cases']})" for dt in unedited]
    heads += [f"{c} (n={r['n_cases']})" for c, r in runs.items()]
    lines = ["| metric | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for k in KEYS:
        pre = [cell((m.get(k) or {}).get("pre")) for m in unedited.values()]
        lines.append(f"| {k} | " + " | ".join(pre + [cell(r["metrics"].get(k)) for r in runs.values()]) + " |")
    lines.append("| edit s (templates + anchors + solve) | " + " | ".join(
        ["-"] * len(unedited) + [f"{r['timings'].get('edit_s', 0):.0f}" for r in runs.values()]) + " |")
    lines.append("| edit s/request (EasyEdit: 9.9) | " + " | ".join(
        ["-"] * len(unedited) + [f"{r['timings'].get('edit_s', 0) / r['n_cases']:.2f}" for r in runs.values()]) + " |")
    lines.append("| wall s (edit + eval) | " + " | ".join(
        ["-"] * len(unedited) + [f"{r['wall_s']:.0f}" for r in runs.values()]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="CounterFact records (the first n)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    p.add_argument("--redo", action="store_true", help="recompute configurations already in the JSON")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--out", type=Path, default=OUT, help="results JSON (one machine per file)")
    args = p.parse_args()
    bad = set(args.configs.split(",")) - set(CONFIGS)
    if bad:
        p.error(f"unknown configs {sorted(bad)}; valid: {list(CONFIGS)}")
    results = load(args.out)
    for r in results["runs"].values():
        r.pop("pre", None)  # written by an earlier version of this script: always empty
    if not args.table_only:
        run(args, results)
    if not results["runs"]:
        print(f"no results in {args.out}", file=sys.stderr)
        return 1
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
