"""Outputs of bench/protocol.py from its JSON rows alone: tables, plots, protocol.json and the README skeleton.

Read by ``protocol.py --table-only`` and at the end of every run; nothing here loads a model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from common import markdown_table, save_json, save_text  # bench/common.py

EXTRA_TARGETS = ("onelayer", "blue")  # scaling only, memit only: the single-layer and two-anchor baselines
# (column label, summary key) per dataset kind; every key is a row of kedit.eval.metrics.METRICS
COLUMNS = {
    "counterfact": (("ES", "efficacy_score"), ("EA", "efficacy_acc"), ("PS", "paraphrase_score"),
                    ("PA", "paraphrase_acc"), ("NS", "neighborhood_score"), ("S", "score"),
                    ("KL", "neighborhood_kl"), ("top1", "top1_overlap"), ("top5", "top5_overlap"),
                    ("top10", "top10_overlap")),
    "zsre": (("eff acc", "efficacy_token_acc"), ("eff EM", "efficacy_exact_match"),
             ("gen acc", "generalization_token_acc"), ("gen EM", "generalization_exact_match"),
             ("spec agree", "specificity_agreement"), ("loc acc", "specificity_loc_acc"), ("KL", "neighborhood_kl"),
             ("top1", "top1_overlap"), ("top5", "top5_overlap"), ("top10", "top10_overlap")),
}
FAMILIES = {  # one plot per family vs batch size
    "counterfact": {"efficacy": ("efficacy_score", "efficacy_acc"), "generalization": ("paraphrase_score",
                    "paraphrase_acc"), "specificity": ("neighborhood_score", "neighborhood_kl", "top1_overlap",
                                                       "top5_overlap", "top10_overlap")},
    "zsre": {"efficacy": ("efficacy_token_acc", "efficacy_exact_match"),
             "generalization": ("generalization_token_acc", "generalization_exact_match"),
             "specificity": ("specificity_agreement", "neighborhood_kl", "top1_overlap", "top5_overlap",
                             "top10_overlap")},
}


def fmt_lam(lam: float | None) -> str:
    return "-" if lam is None else f"{lam:g}"


def tuned(row: dict[str, Any]) -> bool:
    """A row whose lam is the compare mode's tuned one (``--lam tuned``), not the protocol's fixed lam."""
    return row.get("lam_policy") == "tuned"


def lam_cell(row: dict[str, Any]) -> str:
    return f"tuned: {fmt_lam(row.get('lam'))}" if tuned(row) else fmt_lam(row.get("lam"))


def mean(entry: dict | None) -> float | None:
    return None if not entry else entry.get("mean")


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _diag_cells(row: dict[str, Any]) -> list[object]:
    diag = row.get("diagnostics") or []
    ratio = "->".join(f"{d['residual_ratio']:.2f}" for d in diag) or "-"
    norm = "/".join(f"{d['delta_norm']:.3g}" for d in diag) or "-"
    s = row["seconds"]
    anchors = "reused" if s.get("anchors_reused") and s["anchors_s"] < 1e-3 else s["anchors_s"]
    return [ratio, norm, anchors, s["solve_s"]]


def scaling_outputs(out: Path) -> tuple[list[str], dict[str, Any]]:
    lines, slim = [], {}
    for folder in sorted((out / "scaling").glob("*")):
        rows = sorted(_rows(folder), key=lambda r: (r["n"], r["solver"], r["targets"], tuned(r)))
        if not rows:
            continue
        ds, kind = folder.name, rows[0]["kind"]
        cols = COLUMNS[kind]
        header = ["n", "solver", "lam", "targets", *(c for c, _ in cols), "residual ratio per layer",
                  "‖Delta‖ per layer", "anchors s", "solve s"]
        body = [[r["n"], r["solver"], lam_cell(r), r["targets"], *(mean(r["metrics"].get(k)) for _, k in cols),
                 *_diag_cells(r)] for r in rows]
        pre = {k: (r["metrics"].get(k) or {}).get("pre") for r in rows[:1] for _, k in cols}
        d = rows[0]["data"]
        lines += [f"### {ds} ({d['spec']}; format {d.get('format', '-')}; {d.get('zsre_target', '')}".rstrip("; ")
                  + ")", "", f"First N records of the file (nested sets); unedited (n={rows[0]['n']}): "
                  + ", ".join(f"{c} {mean(pre.get(k)):.3f}" for c, k in cols if mean(pre.get(k)) is not None), "",
                  markdown_table(header, body), "", *(f"![{ds} {f}](scaling-{ds}-{f}.png)" for f in
                                                       (*FAMILIES[kind], "diagnostics")), ""]
        slim[ds] = [{k: r.get(k) for k in ("n", "solver", "lam", "lam_policy", "targets", "metrics", "diagnostics",
                                           "seconds")} for r in rows]
        plot_scaling(rows, kind, ds, out)
    return lines, slim


def plot_scaling(rows: list[dict], kind: str, ds: str, out: Path) -> None:
    """One PNG per metric family vs batch size (log x): backward | forward panels, one line per solver at the
    fixed lam; rows at a tuned lam as stars in the solver's colour."""
    import matplotlib.ticker

    from kedit.eval.report import _pyplot  # the project's headless pyplot setup

    plt = _pyplot()
    solvers = sorted({r["solver"] for r in rows})
    sizes = sorted({r["n"] for r in rows})
    diag = {"residual_ratio_last": lambda r: (r["diagnostics"] or [{}])[-1].get("residual_ratio"),
            "delta_norm_sum": lambda r: sum(d["delta_norm"] for d in r["diagnostics"]) or None,
            "anchors_s": lambda r: r["seconds"]["anchors_s"], "solve_s": lambda r: r["seconds"]["solve_s"]}
    families = {f: {k: (lambda r, k=k: mean(r["metrics"].get(k))) for k in keys} for f, keys in FAMILIES[kind].items()}
    families["diagnostics"] = diag
    for fam, getters in families.items():
        fig, axes = plt.subplots(len(getters), 2, figsize=(10, 2.6 * len(getters)), squeeze=False, sharex=True,
                                 sharey="row")  # backward and forward on one scale
        for col, targets in enumerate(("backward", "forward")):
            for i, (name, get) in enumerate(getters.items()):
                ax = axes[i][col]
                for solver in solvers:
                    color = SOLVER_STYLE.get(solver, ("tab:gray", "x"))[0]
                    for is_tuned in (False, True):
                        pts = sorted((r["n"], get(r)) for r in rows if r["solver"] == solver
                                     and r["targets"] == targets and tuned(r) == is_tuned)
                        pts = [(n, v) for n, v in pts if v is not None]
                        if pts and is_tuned:
                            ax.scatter(*zip(*pts, strict=True), marker="*", s=90, color=color, zorder=3,
                                       label=f"{solver}, tuned lam")
                        elif pts:
                            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=solver)
                for base in EXTRA_TARGETS:  # the baselines, dashed, in both panels
                    pts = sorted((r["n"], get(r)) for r in rows if r["targets"] == base)
                    pts = [(n, v) for n, v in pts if v is not None]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), ls="--", color="grey" if base == "onelayer" else "tab:green",
                                label=f"memit/{base}")
                ax.set_xscale("log")
                # ticks at the sizes run, no minor ticks: log-axis tick layout is most of a figure's cost
                ax.set_xticks(sizes, [str(n) for n in sizes])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_title(f"{targets}: {name}", fontsize=8)
                ax.tick_params(labelsize=7)
                if i == 0:
                    ax.legend(fontsize=6)
            axes[-1][col].set_xlabel("batch size")
        fig.suptitle(f"{ds}: {fam} vs batch size (SmolLM2-135M)", fontsize=9)
        fig.subplots_adjust(hspace=0.45, wspace=0.2, top=1 - 0.35 / len(getters), bottom=0.25 / len(getters) + 0.05)
        fig.savefig(out / f"scaling-{ds}-{fam}.png", dpi=110)
        plt.close(fig)


def sequential_outputs(out: Path) -> tuple[list[str], dict[str, Any]]:
    runs = {}
    for d in sorted((out / "sequential").glob("*_*")):
        if (d / "result.json").is_file():
            runs[d.name] = json.loads((d / "result.json").read_text())
        elif (d / "progress.json").is_file():  # unfinished: the curve so far
            runs[d.name] = {"batches": json.loads((d / "progress.json").read_text()), "metrics": {}, "unfinished": True}
    if not runs:
        return [], {}
    cols = COLUMNS["counterfact"]
    header = ["solver", "targets", "lam", "batches", *(c for c, _ in cols), "first-batch ES after last",
              "perplexity", "health top1"]
    body = []
    for name, r in runs.items():
        solver, targets = name.split("_")[:2]
        last = r["batches"][-1] if r["batches"] else {}
        health = last.get("health", {})
        n_batches = f"{len(r['batches'])} (unfinished)" if r.get("unfinished") else len(r["batches"])
        lam = lam_cell(r) if "lam" in r else ("tuned" if name.endswith("_tuned") else "?")  # unfinished: no lam
        body.append([solver, targets, lam, n_batches,
                     *(mean(r["metrics"].get(k)) for _, k in cols),
                     last.get("first_batch", {}).get("efficacy_score"),
                     health.get("health_perplexity"), health.get("health_top1_agreement")])
    plot_sequential(runs, out)
    first = next((r for r in runs.values() if not r.get("unfinished")), {})  # unfinished runs lack n
    lines = [f"### CounterFact (ROME format), {first.get('n', '?')} records in batches of "
             f"{first.get('batch_size', '?')}, state carried", "", markdown_table(header, body), "",
             *prune_restraint_lines(runs),
             "![forgetting](sequential-forgetting.png)", "", "![health](sequential-health.png)", ""]
    return lines, {k: {"metrics": v["metrics"], "batches": v["batches"]} for k, v in runs.items()}


def prune_restraint_lines(runs: dict[str, dict]) -> list[str]:
    """Per PRUNE run: the accumulated edit's top singular value after the last batch vs PRUNE's bound, per layer."""
    lines = []
    for name, r in runs.items():
        diag = [e for e in (r["batches"][-1].get("diagnostics", []) if r["batches"] else []) if "prune_bound" in e]
        if diag:
            cells = ", ".join(f"{e['layer']}: {e['prune_sigma_max']:.1f} / {e['prune_bound']:.1f}"
                              + (f" ({e['prune_restrained']} restrained)" if e["prune_restrained"] else "")
                              for e in diag)
            lines += [f"{name.replace('_', ' ')}: accumulated edit's sigma_max / bound sigma_max(W_out) after the "
                      f"last batch, per layer: {cells}.", ""]
    return lines


SEQ_TITLES = {"efficacy_score": "efficacy (ES)", "efficacy_acc": "efficacy accuracy (EA)",
              "health_perplexity": "wikitext perplexity (lower is better)",
              "health_top1_agreement": "unrelated prompts: top-1 agreement", "health_kl": "unrelated prompts: KL"}
SOLVER_STYLE = {"memit": ("tab:blue", "o"), "alphaedit": ("tab:orange", "s"), "prune": ("tab:green", "^"),
                "rect": ("tab:red", "v"), "emmet": ("tab:purple", "D")}


def plot_sequential(runs: dict[str, dict], out: Path) -> None:
    """One colour and marker per solver, solid forward / dashed backward (equal runs stay visible as markers);
    runs at a tuned lam: stars, thicker."""
    from kedit.eval.report import _pyplot

    plt = _pyplot()
    panels = {"forgetting": (("first_batch", "efficacy_score"), ("first_batch", "efficacy_acc"),
                             ("current_batch", "efficacy_score")),
              "health": (("health", "health_perplexity"), ("health", "health_top1_agreement"), ("health", "health_kl"))}
    for fig_name, keys in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8))
        for ax, (group, key) in zip(axes, keys, strict=True):
            for name, r in runs.items():
                pts = [(b["n_edited"], b.get(group, {}).get(key)) for b in r["batches"]]
                pts = [(n, v) for n, v in pts if v is not None]
                if pts:
                    solver, targets = name.split("_")[:2]
                    color, marker = SOLVER_STYLE.get(solver, ("tab:gray", "x"))
                    is_tuned = name.endswith("_tuned")
                    ax.plot(*zip(*pts, strict=True), color=color, marker="*" if is_tuned else marker,
                            markersize=7 if is_tuned else 4, alpha=0.85, lw=2.2 if is_tuned else 1.5,
                            ls="-" if targets == "forward" else "--",
                            label=f"{solver} {targets}" + (f" (tuned lam {fmt_lam(r.get('lam'))})" if is_tuned else ""))
            where = {"first_batch": "first batch: ", "current_batch": "latest batch: ", "health": ""}[group]
            ax.set_title(where + SEQ_TITLES.get(key, key), fontsize=9)
            ax.set_xlabel("edits applied")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
        fig.suptitle(f"Sequential editing on SmolLM2-135M ({fig_name}); solid = forward replay, dashed = backward",
                     fontsize=10)
        fig.subplots_adjust(wspace=0.25, bottom=0.25, top=0.85)
        fig.savefig(out / f"sequential-{fig_name}.png", dpi=110)
        plt.close(fig)


def compare_outputs(out: Path) -> tuple[list[str], dict[str, Any]]:
    lines, slim = [], {}
    for folder in sorted((out / "compare").glob("*")):
        rows = [r for r in _rows(folder) if r.get("mode") == "compare"]
        if not rows:
            continue
        tuned = [r for r in _rows(folder) if r.get("mode") == "compare-tuned"]
        cols = COLUMNS[rows[0]["kind"]]
        by = {(r["solver"], r["targets"], r["lam"]): r for r in rows}
        body = []
        for r in sorted(rows, key=lambda r: (r["solver"], r["targets"], r["lam"] or 0)):
            body.append([r["solver"], r["targets"], fmt_lam(r["lam"]), *(mean(r["metrics"].get(k)) for _, k in cols),
                         *_diag_cells(r)[:2]])
        for t in tuned:
            r = by.get((t["solver"], t["targets"], t["lam"]))
            if r is not None:
                body.append([t["solver"], t["targets"], f"tuned: {fmt_lam(t['lam'])}",
                             *(mean(r["metrics"].get(k)) for _, k in cols), *_diag_cells(r)[:2]])
        header = ["solver", "targets", "lam", *(c for c, _ in cols), "residual ratio per layer", "‖Delta‖ per layer"]
        d = rows[0]["data"]
        proxy = tuned[0]["tuned_on"] if tuned else None
        lines += [f"### {folder.name} (n={rows[0]['n']}, records {d['indices']})", "",
                  (f"Tuned rows: lam maximising {tuned[0]['score']} on records {proxy['indices']} (disjoint)."
                   if proxy else "No tuned rows yet."), "", markdown_table(header, body), ""]
        slim[folder.name] = {"rows": [{k: r[k] for k in ("solver", "targets", "lam", "metrics", "diagnostics")}
                                      for r in rows], "tuned": tuned}
    return lines, slim


PAPER = """Paper directions, **a different model** (Llama3-8B-Instruct, 2,000 Multi-CounterFact edits in one
batch; METHODS.md §6): efficacy success/accuracy, generalisation success/accuracy:

| solver | backward (MEMIT spreading) | forward replay |
|---|---|---|
| MEMIT | 97.4 / 94.3 / 78.7 / 48.0 | 99.9 / 99.8 / 93.0 / 61.0 |
| AlphaEdit | 95.2 / 89.0 / 76.3 / 44.4 | 99.8 / 99.2 / 92.2 / 59.1 |

Remaining residual after each of layers 4-8 (same model): backward 0.96, 0.91, 0.83, 0.69, 0.36;
forward 0.37, 0.15, 0.08, 0.05, 0.03. Compare directions, not values: SmolLM2-135M is 60x smaller."""


def write_outputs(out: Path) -> int:
    """Tables, plots, protocol.json and the README skeleton from every JSON row under ``out``."""
    sc, sc_slim = scaling_outputs(out)
    sq, sq_slim = sequential_outputs(out)
    cp, cp_slim = compare_outputs(out)
    if not (sc or sq or cp):
        print(f"no results under {out}", file=sys.stderr)
        return 1
    for name, part in (("scaling", sc), ("sequential", sq), ("compare", cp)):
        if part:
            save_text(out / f"{name}.md", "\n".join(part))
    info = _any_machine(out)
    # the answer is written by a person from the tables (answer.md beside them); regenerating keeps it
    answer_file = out / "answer.md"
    answer = (answer_file.read_text().strip() if answer_file.is_file() else
              "_Not written yet: put the per-solver answer (does forward beat backward, by how much, at which "
              "batch sizes, inside or outside the CIs?) in answer.md beside this file._")
    save_json(out / "protocol.json", {"machine": info, "scaling": sc_slim, "sequential": sq_slim, "compare": cp_slim})
    readme = [
        "# Issue 11: the forward-replay claim, unconfounded (SmolLM2-135M)", "",
        "**Question.** Does forward replay (anchor at the first edited layer, later targets from one forward "
        "pass) beat MEMIT's backward spreading for each solver, at equal lam, as batches grow and as edits "
        "accumulate, once the confounds (lam, anchors, data slice, traced token) are removed?", "",
        "**Protocol.** `bench/protocol.py` (its docstring has the details). Same anchors for every solver of a "
        "construction (shared anchor cache); lam passed explicitly and stated in every row; CounterFact in "
        "the MEND format for batch sizes above 500 (first N records, nested); zsRE under both target "
        "conventions; sequential editing on the 500 ROME-format records in batches of 50 with model health "
        "after every batch; a lam grid plus a lam tuned on a disjoint proxy set. "
        + (f"Machine: {info.get('cpu')}, {info.get('cores')} cores, torch {info.get('torch')}, "
           f"{info.get('torch_threads')} threads, load average at start {info.get('loadavg_start')}." if info else ""),
        "", "## Answer per solver", "", answer, "",
        "## Scaling (one batch edit per size)", "", *(sc or ["Not run yet."]), "",
        "## Sequential editing (state carried across batches)", "", *(sq or ["Not run yet."]), "",
        "## lam grid and tuned lam", "", *(cp or ["Not run yet."]), "",
        "## For reference: the paper", "", PAPER, ""]
    save_text(out / "README.md", "\n".join(readme))
    print("\n".join(readme))
    return 0


def _any_machine(out: Path) -> dict[str, Any]:
    for p in sorted(out.rglob("*.json")):
        if p.name not in ("protocol.json", "progress.json"):
            try:
                m = json.loads(p.read_text()).get("machine")
            except (ValueError, AttributeError):
                continue
            if m:
                return m
    return {}

