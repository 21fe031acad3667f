"""Benchmark (issue 11, item 1): one before/after row per reference-faithful fix, same CounterFact records.

    flock /tmp/kedit-heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src \
        .venv/bin/python -u bench/reference_fixes.py [--n 100]

SmolLM2-135M, the first --n records of counterfact_subset500.json (ROME format), wikitext-2 (test)
statistics, default layers (MEMIT family 4-8, ROME 4), lam 15000 for every MEMIT-family row. Each
group changes one setting at a time, from kedit's pre-issue-11 behaviour to the reference default:
  * MEMIT x {backward, forward}, batch: flat -> grouped key weighting (same anchors), then the anchor
    loss details (KL at the subject's last token of "{} is a", stop on the total loss < 5e-2).
  * AlphaEdit x {backward, forward}, batch, reference anchors: null-space threshold relative 1e-2 ->
    absolute 2e-2 on the normalised second moment (null_dim per layer recorded).
  * ROME, one record at a time (restored in between): numerator z - h_bare -> r-ROME v* - W k* (same
    anchors), flat -> grouped keys (same anchors), then ROME's site (norms of the MLP output, clamp 4)
    with the reference anchor loss details.
  * Causal tracing on the first --trace records: the dataset's true answer vs the model's own prediction.
Anchors are shared through kedit's per-request on-disk cache (~/.cache/kedit/anchors, also used by
bench/protocol.py), so a killed run resumes; a row whose summary.json exists is kept. Writes
bench/results/protocol/fixes/<row>/ (harness outputs + records.json), fixes.json and fixes.md (also with --table-only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (  # bench/common.py
    CORPUS,
    DATA,
    RESULTS,
    Recording,
    anchor_dir,
    machine,
    metric_cell,
    require_data,
    save_json,
    save_text,
)

OUT = RESULTS / "protocol" / "fixes"
LAM = 15000.0
OLD_ANCHOR = {"kl_position": "last", "stop_on": "nll"}
# (row, group, fix, method, targets, mode, editor kwargs, anchor overrides, solver hparams)
ROWS: list[tuple[str, str, str, str, str, str, dict, dict, dict]] = []
for t in ("backward", "forward"):
    ROWS += [
        (f"memit_{t}_before", f"memit/{t}", "before (pre-issue-11 kedit)", "memit", t, "batch",
         {"key_weighting": "flat"}, OLD_ANCHOR, {"lam": LAM}),
        (f"memit_{t}_grouped", f"memit/{t}", "+ grouped key weighting (same anchors)", "memit", t, "batch",
         {"key_weighting": "grouped"}, OLD_ANCHOR, {"lam": LAM}),
        (f"memit_{t}_after", f"memit/{t}", "+ KL at subject, total-loss stop (= reference defaults)", "memit", t,
         "batch", {"key_weighting": "grouped"}, {}, {"lam": LAM}),
        (f"alphaedit_{t}_relative", f"alphaedit/{t}", "relative threshold 1e-2 (before)", "alphaedit", t, "batch",
         {}, {}, {"threshold": 1e-2, "relative": True}),
        (f"alphaedit_{t}_after", f"alphaedit/{t}", "absolute threshold 2e-2 (reference default)", "alphaedit", t,
         "batch", {}, {}, {}),
    ]
ROWS += [
    ("rome_before", "rome", "before (block site, clamp 4‖h‖, numerator z - h_bare, flat keys, old anchor loss)",
     "rome", "onelayer", "single", {"key_weighting": "flat"}, {**OLD_ANCHOR, "site": "block"}, {"numerator": "bare"}),
    ("rome_rrome", "rome", "+ r-ROME numerator v* - W k* (same anchors)", "rome", "onelayer", "single",
     {"key_weighting": "flat"}, {**OLD_ANCHOR, "site": "block"}, {}),
    ("rome_grouped", "rome", "+ grouped key weighting (same anchors)", "rome", "onelayer", "single",
     {"key_weighting": "grouped"}, {**OLD_ANCHOR, "site": "block"}, {}),
    ("rome_after", "rome", "+ MLP-output site/clamp, KL at subject, total-loss stop (= reference defaults)", "rome",
     "onelayer", "single", {"key_weighting": "grouped"}, {}, {}),
]
COLS = (("ES", "efficacy_score"), ("EA", "efficacy_acc"), ("PS", "paraphrase_score"), ("PA", "paraphrase_acc"),
        ("NS", "neighborhood_score"), ("S", "score"), ("KL", "neighborhood_kl"), ("top1", "top1_overlap"))


def run_rows(args: argparse.Namespace) -> None:
    require_data(CORPUS, DATA / "counterfact_subset500.json")
    from kedit.editor import Editor
    from kedit.eval import Evaluator, load_dataset
    from kedit.eval.report import write
    from kedit.models import load_model
    from kedit.stats import StatsSpec

    info = machine()
    model, tok = load_model("smollm2-135m")
    stats = StatsSpec(corpus=str(CORPUS))
    data = load_dataset(f"counterfact:{DATA / 'counterfact_subset500.json'}", n=args.n)
    ev = Evaluator(model, tok, fluency=False, seed=0, progress=True)
    cache = anchor_dir()
    t_run = time.perf_counter()
    for name, group, fix, method, targets, mode, kw, anchor, hp in ROWS:
        out = OUT / name
        if (out / "summary.json").is_file() or (args.only and name not in args.only.split(",")):
            continue
        if time.perf_counter() - t_run > 60 * args.minutes:
            print(f"[bench] --minutes {args.minutes} reached; run again to continue", file=sys.stderr)
            return
        print(f"[bench] {name}: {fix}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        editor = Recording(Editor(model, tok, method=method, targets=targets, stats=stats, seed=0, diagnostics=True,
                                  verbose=True, anchor=anchor or None, anchor_cache=cache, **kw, **hp))
        extra = {"dataset": {**data.describe(), "n": len(data.cases)}, "command": " ".join(sys.argv), "machine": info,
                 "row": {"name": name, "group": group, "fix": fix}}
        rep = ev.run(data.cases, editor, mode=mode, extra_config=extra)
        rep.timings["wall_s"] = time.perf_counter() - t0
        rep.timings["optimize_s"] = sum(r["timings"]["optimize"] for r in editor.records[:1])
        write(rep, out, html=False)
        save_json(out / "records.json", [{"anchors": r["anchors"], "diagnostics": r.get("diagnostics", []),
                                          "timings": r["timings"]} for r in editor.records[:3]])
        print(f"[bench] {name}: {rep.timings}", file=sys.stderr, flush=True)
    if "trace" not in args.skip:
        trace_rows(model, tok, args)


def trace_rows(model, tok, args: argparse.Namespace) -> None:
    """Causal tracing's chosen layer on the first --trace records, tracing the true answer vs the prediction."""
    path = OUT / "tracing.json"
    if path.is_file():
        return
    from kedit.eval import load_dataset
    from kedit.layers.trace import CausalTrace

    data = load_dataset(f"counterfact:{DATA / 'counterfact_subset500.json'}", n=args.trace)
    requests = [c.request for c in data.cases]
    res = {}
    for answer in ("dataset", "predicted"):
        choice = CausalTrace(answer=answer, seed=0).select(model, None, tok, requests)
        res[answer] = {"layers": choice.layers, "scores": choice.scores, "seconds": choice.seconds,
                       "stability": choice.details.get("stability"),
                       "answer_matches_dataset": choice.details.get("answer_matches_dataset")}
    save_json(path, {"n": len(requests), **res})


def table() -> int:
    rows, lines = {}, ["# Reference-faithful fixes, before/after (issue 11, item 1)", ""]
    done = [(r, json.loads((OUT / r[0] / "summary.json").read_text()))
            for r in ROWS if (OUT / r[0] / "summary.json").is_file()]
    if not done:
        print(f"no rows under {OUT}", file=sys.stderr)
        return 1
    m = done[0][1]["config"]["machine"]
    lines += [f"SmolLM2-135M, first {done[0][1]['n_cases']} CounterFact records (counterfact_subset500.json), "
              f"wikitext-2 statistics, lam {LAM:g} for MEMIT. Machine: {m['cpu']}, {m['cores']} cores. Cells: mean "
              "[95% bootstrap CI]. Each row adds one change to the row above it (within its group).", "",
              "| group | change | " + " | ".join(c for c, _ in COLS) + " | anchor steps | anchor s | edit s | extra |",
              "|---" * (len(COLS) + 6) + "|"]
    for (name, group, fix, *_), s in done:
        rec = json.loads((OUT / name / "records.json").read_text())
        anchors = rec[0]["anchors"] if rec else []  # per anchor layer: steps over all its requests, cached or not
        steps = ", ".join(f"{a['steps_mean']:.1f}" for a in anchors) or "-"
        diag = rec[0].get("diagnostics", []) if rec else []
        nulls = [d["null_dim"] for d in diag if d.get("null_dim") is not None]
        extra = f"null_dim {nulls}" if nulls else ""
        lines.append(f"| {group} | {fix} | " + " | ".join(metric_cell(s.get(k)) for _, k in COLS)
                     + f" | {steps} | {s['timings'].get('optimize_s', 0):.0f} | {s['timings']['edit_s']:.0f}"
                     f" | {extra} |")
        rows[name] = {"group": group, "fix": fix, "metrics": {k: s.get(k) for _, k in COLS}, "timings": s["timings"],
                      "anchors": anchors, "null_dim": nulls}
    tr = OUT / "tracing.json"
    if tr.is_file():
        t = json.loads(tr.read_text())
        lines += ["", f"Causal tracing on the first {t['n']} records: traced token = dataset answer -> layer "
                  f"{t['dataset']['layers']}; = the model's own prediction (ROME) -> layer {t['predicted']['layers']}."]
        rows["tracing"] = t
    save_text(OUT / "fixes.md", "\n".join(lines) + "\n")
    save_json(OUT / "fixes.json", {"machine": m, "rows": rows})
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--trace", type=int, default=20, help="records for the tracing comparison")
    p.add_argument("--only", default="", help="comma-separated row names")
    p.add_argument("--skip", default="", help="'trace' to skip the tracing comparison")
    p.add_argument("--minutes", type=float, default=600)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if not args.table_only:
        run_rows(args)
    return table()


if __name__ == "__main__":
    sys.exit(main())
