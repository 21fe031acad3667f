"""Benchmark: every multi-layer solver with backward spreading vs forward replay, plus onelayer and BLUE (issue 5).

    flock /tmp/kedit-heavy.lock .venv/bin/python -u bench/compare_targets.py [--n 200] [--seq-size 10]
    torchrun --nproc-per-node N bench/compare_targets.py ...   # runs split across N processes (kedit.distributed)

SmolLM2-135M, default layers (4-8), second moments over wikitext-2 (test split). Per dataset
(CounterFact subset; zsRE with the ROME/MEMIT target convention answers[0]):
  * batch: all --n records in one application, for every solver x {backward, forward}, and
    memit x {onelayer, blue}. Anchors depend on the weights, requests, layer and anchor settings but not
    on the solver, so the editors share an anchor cache: one optimisation at the first layer (forward,
    BLUE) and one at the last (backward, onelayer, BLUE) serve every solver.
  * sequential (CounterFact only): --seq-batches batches of --seq-size records, state (C_cache,
    AlphaEdit projector) carried, evaluated after the last batch, for --seq-solvers x {backward, forward}.
    Anchors of later batches depend on the solver's earlier edits: nothing is shared there.
Every multi-layer edit records diagnostics (per edited layer: remaining residual ratio at the last
layer, cos(own change, induced last-layer change), update norm). Writes bench/results/compare/
<dataset>_<mode>_<solver>_<targets>/ (the harness's summary.json, summary.md, cases.jsonl, plots, plus
diagnostics.json), bench/results/compare/compare.json, table.md and diagnostics-<dataset>.png.
A run whose summary.json exists is kept (delete it to redo); --table-only rebuilds the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import CORPUS, DATA, RESULTS, machine, metric_cell, require_data  # bench/common.py

from kedit import distributed

OUT = RESULTS / "compare"
SOLVERS = ("memit", "alphaedit", "emmet", "prune", "rect")
COLUMNS = {  # (column label, summary key)
    "counterfact": (("ES", "efficacy_score"), ("EA", "efficacy_acc"), ("PS", "paraphrase_score"),
                    ("PA", "paraphrase_acc"), ("NS", "neighborhood_score"), ("S", "score"), ("KL", "neighborhood_kl"),
                    ("top1", "top1_overlap"), ("fluency", "fluency")),
    "zsre": (("eff acc", "efficacy_token_acc"), ("eff EM", "efficacy_exact_match"),
             ("gen acc", "generalization_token_acc"), ("gen EM", "generalization_exact_match"),
             ("spec agree", "specificity_agreement"), ("KL", "neighborhood_kl"), ("top1", "top1_overlap")),
}


class Recording:
    """An Editor that keeps every applied edit's record (for the diagnostics); otherwise the Editor."""

    def __init__(self, editor):
        self.editor, self.records = editor, []

    def apply(self, requests):
        edit = self.editor.apply(requests)
        self.records.append(edit.record)
        return edit

    def __getattr__(self, name):
        return getattr(self.editor, name)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(dataset, mode, solver, targets): each dataset's batch runs together, each solver's pair in a row."""
    runs = []
    for ds in args.datasets.split(",") if "batch" in args.modes else []:
        runs += [(ds, "batch", s, t) for s in args.solvers.split(",") for t in ("backward", "forward")]
        runs += [(ds, "batch", "memit", t) for t in ("onelayer", "blue")]
    if "counterfact" in args.datasets.split(",") and args.seq_size and "sequential" in args.modes:
        runs += [("counterfact", "sequential", s, t) for s in args.seq_solvers.split(",")
                 for t in ("backward", "forward")]
    return runs


def run_all(args: argparse.Namespace) -> None:
    require_data(CORPUS, DATA / "counterfact_subset500.json", DATA / "zsre_mend_eval_portability_gpt4.json")
    from kedit.editor import Editor
    from kedit.eval import Evaluator, load_dataset
    from kedit.eval.report import write
    from kedit.models import load_model
    from kedit.stats import StatsSpec

    t_run = time.perf_counter()
    info = machine()
    model, tok = load_model("smollm2-135m")
    stats = StatsSpec(corpus=str(CORPUS))
    specs = {"counterfact": (f"counterfact:{DATA / 'counterfact_subset500.json'}", None),
             "zsre": (f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}", "answers")}
    loaded: dict[tuple[str, bool], tuple] = {}
    caches: dict[str, dict] = {}
    todo = [r for r in plan(args) if not (OUT / "_".join(r) / "summary.json").is_file()]
    device = next(model.parameters()).device
    if distributed.active(device):  # torchrun: statistics once over all ranks, then each rank a share of the runs
        from kedit.arch import ArchitectureAdapter
        from kedit.editor import default_layers
        from kedit.stats import second_moments

        second_moments(model, tok, default_layers(ArchitectureAdapter.from_model(model).n_layers, True), stats)
    # contiguous shares keep each dataset's solvers together, so they still share their anchors
    for _, (ds, mode, solver, targets) in distributed.distribute(todo, device):
        out = OUT / f"{ds}_{mode}_{solver}_{targets}"
        if time.perf_counter() - t_run > 60 * args.minutes:
            print(f"[bench] --minutes {args.minutes} reached; run again to continue", file=sys.stderr)
            return
        fluency = ds == "counterfact" and args.fluency_prompts > 0 and solver in args.fluency_solvers.split(",")
        if (ds, fluency) not in loaded:  # one evaluator (and pre-edit pass) per dataset and fluency setting
            spec, zsre_target = specs[ds]
            data = load_dataset(spec, n=max(args.n, args.seq_batches * args.seq_size), zsre_target=zsre_target)
            loaded[ds, fluency] = (data, Evaluator(model, tok, fluency=fluency, fluency_prompts=args.fluency_prompts
                                                   or None, seed=0, progress=True))
        data, ev = loaded[ds, fluency]
        cases = data.cases[:args.n] if mode == "batch" else data.cases[:args.seq_batches * args.seq_size]
        print(f"[bench] {ds} {mode} {solver}/{targets} on {len(cases)} records", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        editor = Recording(Editor(model, tok, method=solver, targets=targets, stats=stats, seed=0, diagnostics=True,
                                  verbose=True, anchor_cache=caches.setdefault(ds, {}) if mode == "batch" else None))
        extra = {"dataset": {**data.describe(), "n": len(cases)}, "command": " ".join(sys.argv), "machine": info}
        with distributed.serial():  # a run is one rank's alone
            rep = ev.run(cases, editor, mode=mode, batch_size=args.seq_size if mode == "sequential" else None,
                         extra_config=extra)
        rep.timings["wall_s"] = time.perf_counter() - t0
        rep.timings["optimize_s"] = sum(r["timings"]["optimize"] for r in editor.records)
        rep.timings["anchors_reused"] = any(a.get("reused") for r in editor.records for a in r["anchors"])
        write(rep, out)
        (out / "diagnostics.json").write_text(json.dumps(
            [{"batch": b, "anchors": r["anchors"], "diagnostics": r.get("diagnostics", []), "timings": r["timings"]}
             for b, r in enumerate(editor.records)], indent=1))
        print(f"[bench] {ds} {mode} {solver}/{targets}: {rep.timings}", file=sys.stderr, flush=True)


def collect() -> dict[str, dict]:
    runs = {}
    for d in sorted(OUT.glob("*_*_*_*")):
        if (d / "summary.json").is_file():
            runs[d.name] = {"summary": json.loads((d / "summary.json").read_text()),
                            "diagnostics": json.loads((d / "diagnostics.json").read_text())}
    return runs


def cell(entry: dict | None) -> str:
    return metric_cell(entry, ci=False)


def write_outputs() -> int:
    """table.md, compare.json and the diagnostics plots from every run folder under bench/results/compare/."""
    runs = collect()
    if not runs:
        print(f"no runs under {OUT}", file=sys.stderr)
        return 1
    info = next(iter(runs.values()))["summary"]["config"]["machine"]
    lines = ["# Target constructions x solvers on SmolLM2-135M (CPU)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}. "
             "Layers 4-8; cells are means (95% bootstrap CIs in each run's summary.md). `edit s` is the wall time "
             "of the editing phase; in batch mode the anchors are optimised once per dataset and layer and "
             "reused by the later solvers (`optimize s` = 0 for those), so compare `edit s` within a column "
             "of the same anchors only. Residual ratio: remaining `||z_L - h_L|| / ||z_L - h_L(before)||` "
             "after the first and the last edited layer.", ""]
    slim = {}
    for ds, cols in COLUMNS.items():
        for mode in ("batch", "sequential"):
            sel = {k: v for k, v in runs.items() if k.startswith(f"{ds}_{mode}_")}
            if not sel:
                continue
            n = next(iter(sel.values()))["summary"]["n_cases"]
            proto = next(iter(sel.values()))["summary"]["config"]["protocol"]
            lines += [f"## {ds}, {mode} (n={n}; {proto['evaluated']})", "",
                      "| solver | targets | " + " | ".join(c for c, _ in cols)
                      + " | residual ratio first -> last | edit s | optimize s |",
                      "|---" * (len(cols) + 5) + "|"]
            pre = [next((r["summary"][k].get("pre") for r in sel.values() if k in r["summary"]), None) for _, k in cols]
            lines.append("| unedited | - | " + " | ".join(cell(p) for p in pre) + " | - | - | - |")
            for name, r in sel.items():
                _, _, solver, targets = name.split("_")
                s, diag = r["summary"], r["diagnostics"][-1]["diagnostics"]
                hp = s["config"]["editor"]["solver"]
                lam = hp.get("lam", (hp.get("base") or {}).get("lam") if isinstance(hp.get("base"), dict) else None)
                solver += f" (lam {lam:g})" if lam else ""
                ratio = f"{diag[0]['residual_ratio']:.3f} -> {diag[-1]['residual_ratio']:.3f}" if diag else "-"
                lines.append(f"| {solver} | {targets} | " + " | ".join(cell(s.get(k)) for _, k in cols)
                             + f" | {ratio} | {s['timings']['edit_s']:.0f} | {s['timings']['optimize_s']:.0f} |")
                slim[name] = {"metrics": {k: s.get(k) for _, k in cols}, "timings": s["timings"],
                              "diagnostics": r["diagnostics"][-1]["diagnostics"]}
            lines.append("")
        plot_diagnostics({k: v for k, v in slim.items() if k.startswith(f"{ds}_batch_")}, OUT / f"diagnostics-{ds}.png")
    (OUT / "table.md").write_text("\n".join(lines))
    (OUT / "compare.json").write_text(json.dumps({"machine": info, "runs": slim}, indent=1, default=str))
    print("\n".join(lines))
    return 0


def plot_diagnostics(runs: dict[str, dict], path: Path) -> None:
    """Residual ratio, cos(own, induced) and update norm per edited layer; colour = targets, marker = solver."""
    if not runs:
        return
    import matplotlib.ticker

    from kedit.eval.report import _pyplot  # the project's headless pyplot setup

    plt = _pyplot()

    colours = {"backward": "tab:blue", "forward": "tab:red", "onelayer": "tab:grey", "blue": "tab:green"}
    markers = dict(zip(SOLVERS, "osD^v", strict=True))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("residual_ratio", "remaining residual ratio at the last layer"),
              ("cos_own_induced", "cos(own change, induced last-layer change)"), ("delta_norm", "||Delta_l||_F"))
    for name, r in runs.items():
        _, _, solver, targets = name.split("_")
        diag = r["diagnostics"]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot([d["layer"] for d in diag], [d[key] for d in diag], color=colours.get(targets, "black"),
                    marker=markers.get(solver, "x"), lw=1.2, alpha=0.8, label=f"{solver}/{targets}")
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set(title=title, xlabel="edited layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if key == "delta_norm":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{path.stem}: diagnostics after a batch edit (colour = target construction, marker = solver)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="records per dataset in batch mode")
    p.add_argument("--datasets", default="counterfact,zsre")
    p.add_argument("--modes", default="batch,sequential")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--seq-batches", type=int, default=4)
    p.add_argument("--seq-size", type=int, default=10, help="records per sequential batch (0: no sequential runs)")
    p.add_argument("--seq-solvers", default="memit,alphaedit")
    p.add_argument("--fluency-prompts", type=int, default=1, help="CounterFact generation prompts per record (0: off)")
    p.add_argument("--fluency-solvers", default=",".join(SOLVERS), help="solvers whose runs generate for fluency")
    p.add_argument("--minutes", type=float, default=120.0, help="start no new run after this")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    OUT = args.out
    if not args.table_only:
        run_all(args)
        # under torchrun rank 0 tabulates once every rank is done; shares of the grid may end hours apart
        distributed.barrier("compare runs", seconds=7 * 24 * 3600)
    return write_outputs() if distributed.is_main() else 0


if __name__ == "__main__":
    sys.exit(main())
