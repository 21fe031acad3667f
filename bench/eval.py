"""Benchmark: the evaluation harness on SmolLM2 — CounterFact and zsRE, unedited vs MEMIT (backward / forward).

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/eval.py [--n-cf 200] [--n-zsre 200] [--fluency-prompts 1]

Batch editing (all records of a dataset in one MEMIT application), default layers, second moments
over wikitext-2 (test split). zsRE uses the ROME/MEMIT target convention (answers[0]). Within one
invocation pre-edit scores are computed once per dataset and shared by its runs (same weights, same
cases). ``--datasets`` / ``--runs`` select a part, so long runs can be spread over several
invocations (each under the lock); ``--table-only`` rebuilds the table from the result folders.
MEMIT runs already made by the former bench/compare_targets.py (same settings) are read from bench/results/compare/
when this script has not made them itself. Writes bench/results/eval_<dataset>_<run>/ (summary.json,
summary.md, cases.jsonl, plots), bench/results/eval_summary.json and bench/results/eval_table.md, and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import CORPUS, DATA, RESULTS, machine, metric_cell, require_data, save_json, save_text  # bench/common.py

RUNS = {"none": None, "memit_backward": ("memit", "backward"), "memit_forward": ("memit", "forward")}
CF_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_acc", "paraphrase_acc",
           "neighborhood_acc", "efficacy_magnitude", "neighborhood_kl", "top1_overlap", "top5_overlap", "fluency")
ZSRE_KEYS = ("efficacy_token_acc", "efficacy_exact_match", "generalization_token_acc", "generalization_exact_match",
             "specificity_agreement", "specificity_loc_acc", "neighborhood_kl", "top1_overlap")



def table(name: str, keys: tuple[str, ...], runs: dict[str, dict]) -> list[str]:
    lines = [f"### {name}", "", "| metric | " + " | ".join(f"{r} (n={s['n_cases']})" for r, s in runs.items()) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for k in keys:
        if any(k in s for s in runs.values()):
            lines.append(f"| {k} | " + " | ".join(metric_cell(s.get(k)) for s in runs.values()) + " |")
    for label, key in (("edit s", "edit_s"), ("post-eval s", "post_eval_s"),
                       ("post-eval records/s", "post_eval_records_per_s"), ("edit records/s", "edit_records_per_s")):
        vals = [s["timings"].get(key) for s in runs.values()]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    pre = [s["timings"]["pre_eval_records_per_s"] for s in runs.values() if s["timings"].get("pre_eval_records_per_s")]
    if pre:
        lines += ["", f"pre-edit evaluation: {min(pre):.2f}-{max(pre):.2f} records/s"]
    return lines + [""]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-cf", type=int, default=200)
    p.add_argument("--n-zsre", type=int, default=200)
    p.add_argument("--fluency-prompts", type=int, default=1, help="generation prompts per CounterFact record")
    p.add_argument("--runs", default=",".join(RUNS), help=f"subset of {list(RUNS)}")
    p.add_argument("--datasets", default="counterfact,zsre")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from bench/results/eval_*")
    args = p.parse_args()
    if not args.table_only:
        run_all(args)
    return write_table()


def run_all(args: argparse.Namespace) -> None:
    """Evaluate the selected (dataset, run) pairs; each writes bench/results/eval_<dataset>_<run>/."""
    require_data(CORPUS, DATA / "counterfact_subset500.json", DATA / "zsre_mend_eval_portability_gpt4.json")
    from kedit.editor import Editor
    from kedit.eval import Evaluator, load_dataset
    from kedit.eval.report import write
    from kedit.models import load_model
    from kedit.stats import StatsSpec

    info = machine()
    model, tok = load_model("smollm2-135m")
    specs = {"counterfact": (f"counterfact:{DATA / 'counterfact_subset500.json'}", args.n_cf, None, True),
             "zsre": (f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}", args.n_zsre, "answers", False)}
    for ds in args.datasets.split(","):
        spec, n, zsre_target, fluency = specs[ds]
        data = load_dataset(spec, n=n, zsre_target=zsre_target)
        ev = Evaluator(model, tok, fluency=fluency, fluency_prompts=args.fluency_prompts, seed=0, progress=True)
        for run in args.runs.split(","):
            t0 = time.perf_counter()
            editor = None
            if RUNS[run]:
                method, targets = RUNS[run]
                editor = Editor(model, tok, method=method, targets=targets, stats=StatsSpec(corpus=str(CORPUS)),
                                seed=0, verbose=True)
            extra = {"dataset": data.describe(), "command": " ".join(sys.argv), "machine": info}
            rep = ev.run(data.cases, editor, mode="batch", extra_config=extra)
            rep.timings["wall_s"] = time.perf_counter() - t0
            write(rep, RESULTS / f"eval_{ds}_{run}")
            print(f"[bench] {ds} {run}: {rep.timings}", file=sys.stderr, flush=True)


def write_table() -> int:
    """eval_table.md + eval_summary.json from every bench/results/eval_<dataset>_<run>/summary.json."""
    out: dict[str, dict] = {}
    for ds in ("counterfact", "zsre"):
        for run in RUNS:  # this script's own runs, else the same batch run made by the former bench/compare_targets.py
            for f in (RESULTS / f"eval_{ds}_{run}" / "summary.json", RESULTS / "compare" / f"{ds}_batch_{run}" /
                      "summary.json"):
                if f.is_file():
                    out.setdefault(ds, {})[run] = json.loads(f.read_text())
                    break
    if not out:
        print("no results under bench/results/eval_*", file=sys.stderr)
        return 1
    info = next(iter(next(iter(out.values())).values()))["config"]["machine"]
    lines = ["# kedit eval benchmark (SmolLM2-135M, CPU)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores (shared), torch threads {info['torch_threads']}.",
             "Cells: mean [95% bootstrap CI]; batch editing (one application per run); the `none` column is the "
             "unedited model (= pre-edit values). Commands are in each run's summary.json (config.command).", ""]
    for ds, keys in (("counterfact", CF_KEYS), ("zsre", ZSRE_KEYS)):
        if ds in out:
            lines += table(ds, keys, out[ds])
    save_text(RESULTS / "eval_table.md", "\n".join(lines))
    slim = {ds: {r: {k: v for k, v in s.items() if k != "trajectory"} for r, s in runs.items()}
            for ds, runs in out.items()}
    save_json(RESULTS / "eval_summary.json", slim)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
