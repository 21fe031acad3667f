"""Benchmark: layer selection a user can trust on SmolLM2-135M (issue 10) - every strategy vs brute force.

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/layers.py [--proxy 30] [--test 50] [--minutes 50]

Cells = datasets x methods: CounterFact, zsRE in both target conventions (``zsre-answers``: edit towards
answers[0], ROME/MEMIT; ``zsre-alt``: towards ``alt``, EasyEdit) x ROME (single layer) and MEMIT (window
of --window layers). LGA always compares the dataset's old answer with the new one (zsRE: answers[0]
vs alt, issue 10). Per cell the first --proxy records choose with: brute force over every window
start (the ground truth), every LGA variant (theta x score), causal tracing and the verified selector;
the next --test records (disjoint) are edited one at a time at every window chosen in this cell and
at the golden windows of the other datasets for the same method (transfer), and scored with the
harness's rank score. Table: chosen start, bootstrap stability, proxy score (brute force's score at
that start), test score, gap to the golden window's test score, seconds, brute-force time / strategy
time, transfer. One figure per cell: brute force's curve with the test scores and the edit-based choices above,
and one small panel per LGA reading against brute force below. <out stem>-fences.md: each LGA reading's start with
and without the Tukey fences, from the saved scores (no edits).

Full run (issue 10): repeat until it exits 0 (each call works --minutes, then resumes):
    flock /tmp/kedit-heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/layers.py --minutes 50
Estimate on the 2-core box (issue-6 brute force: ~4.8 s per ROME edit): brute force ~900 ROME edits and ~780
MEMIT window edits per dataset (3 datasets), tests ~300 edits per cell (6 cells): roughly 14-16 hours.
Tiny end-to-end check (minutes): --proxy 3 --test 3 --candidates 4-6 --steps 2 --tokens 2000 --samples 2
--bootstrap 20 --window 2 --shortlist 2 --edits 2 --brute-chunk 2 --datasets counterfact zsre-alt --out /tmp/ls/ls.json

Resumable: every step is saved to <out>.partial.json as it finishes (brute force in steps of --brute-chunk
windows, joined once all are in); a run starts no new step after --minutes and the next run (same settings, any
session: commit the partial file) resumes; --datasets/--methods pick the cells to work on and keep the other
cells' steps (a partial file saved with other settings is refused, never overwritten). Order: per cell, brute
force, the cheap selectors, then the test edits at the starts chosen so far; last, the transfer starts. Every
run draws the figures <out stem>-<dataset>-<method>.png of the cells whose choices are all in and prints their
table; when all steps are done it also writes <out>.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import CORPUS, DATA, RESULTS, machine, markdown_table, require_data, save_json, save_text  # bench/common.py

from kedit.arch import ArchitectureAdapter
from kedit.commands.layers import parse_candidates, parse_variants
from kedit.eval import load_dataset
from kedit.layers import LGA, BruteForce, CausalTrace, Verified, best_window, window_starts
from kedit.layers.search import WindowScores, as_cases, score_windows
from kedit.models import load_model
from kedit.stats import StatsSpec, second_moments

FILES = {"counterfact": ("counterfact", DATA / "counterfact_subset500.json", None),
         "zsre-answers": ("zsre", DATA / "zsre_mend_eval_portability_gpt4.json", "answers"),
         "zsre-alt": ("zsre", DATA / "zsre_mend_eval_portability_gpt4.json", "alt")}


def lga_convention(label: str) -> str:
    """The old/new answers LGA compares on dataset ``label``."""
    return "old = answers[0], new = alt" if FILES[label][0] == "zsre" else "dataset true/new"


def load_cells(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per dataset label: proxy cases, LGA requests (old = dataset answer) and test cases."""
    out = {}
    for label in args.datasets:
        kind, path, conv = FILES[label]
        cases = load_dataset(f"{kind}:{path}", n=args.proxy + args.test, zsre_target=conv).cases
        lga = cases[:args.proxy]
        if kind == "zsre":  # LGA: old = answers[0], new = alt, whatever the edits' convention
            lga = load_dataset(f"{kind}:{path}", n=args.proxy, zsre_target="alt").cases
        out[label] = {"proxy": cases[:args.proxy], "test": cases[args.proxy:], "lga": [c.request for c in lga]}
    return out


def selectors(args: argparse.Namespace, method: str, window: int, cands: tuple[int, ...], stats: Any,
              anchor: dict[str, Any], lga_reqs: list[Any]) -> dict[str, Any]:
    sels: dict[str, Any] = {"brute": BruteForce(method=method, window=window, layers=cands, stats=stats,
                                                editor_kwargs={"anchor": anchor}, bootstrap=args.bootstrap)}
    for theta, score in parse_variants(args.variants):
        lga = LGA(window=window, layers=cands, theta=theta, score=score, bootstrap=args.bootstrap)
        sels[lga.label] = lga
    sels["causal"] = CausalTrace(samples=args.samples, window=window, layers=cands, bootstrap=args.bootstrap)
    sels["verified"] = Verified(method=method, window=window, layers=cands, shortlist=args.shortlist, edits=args.edits,
                                bootstrap=args.bootstrap, stats=stats, editor_kwargs={"anchor": anchor},
                                signal_proxy=tuple(lga_reqs))
    return sels


def stability(ch: dict[str, Any]) -> float | None:
    """A choice's bootstrap stability (the fraction of resamples choosing the same start), if it has one."""
    return (ch["details"].get("stability") or {}).get("fraction")


Cell = tuple[str, str, str, dict[str, Any], dict[str, Any], dict[int, float]]


def brute_cells(res: dict[str, Any]) -> Iterator[Cell]:
    """The cells brute force has chosen in: (cell, dataset label, method, choices, brute's choice, brute force's
    proxy score per start)."""
    for cell, choices in res["choices"].items():
        brute = choices.get("brute")
        if brute:
            label, method = cell.split("|")
            yield cell, label, method, choices, brute, dict(zip(brute["candidates"], brute["scores"], strict=True))


def rows_of(res: dict[str, Any]) -> list[list[object]]:
    """Table rows: one per (dataset, method, strategy)."""
    rows = []
    for cell, label, method, choices, brute, by_start in brute_cells(res):
        tests = res["tests"].get(cell, {})
        golden = brute["layers"][0]
        t_gold = tests.get(str(golden), {}).get("mean")
        for name, ch in choices.items():
            start = ch["layers"][0]
            stab = stability(ch)
            t = tests.get(str(start), {}).get("mean")
            transfer = []
            for other in res["choices"]:
                o_label, o_method = other.split("|")
                if o_method == method and o_label != label and o_label.split("-")[0] != label.split("-")[0]:
                    t_other = res["tests"].get(other, {}).get(str(start), {}).get("mean")
                    transfer.append(f"{o_label}: {t_other:.3f}" if t_other is not None else f"{o_label}: -")
            rows.append([label, method, name, start, stab, by_start.get(start), t,
                         None if t is None or t_gold is None else t_gold - t, ch["seconds"],
                         brute["seconds"] / ch["seconds"] if ch["seconds"] > 0 else None, "; ".join(transfer) or "-"])
    return rows


def fence_rows(res: dict[str, Any]) -> list[list[object]]:
    """The Tukey fences' effect, from the saved scores (no edits): per cell and LGA reading, the start it
    chose (fenced, as specified) and the start the same scores give without fences, each with brute force's
    proxy score there, and the golden start's."""
    rows = []
    for _, label, method, choices, brute, by_start in brute_cells(res):
        gold = by_start[brute["layers"][0]]
        for name, ch in choices.items():
            if not name.startswith("lga"):
                continue
            fenced = ch["layers"][0]
            free = best_window(ch["candidates"], ch["scores"], ch["details"]["window"])[0][0]
            rows.append([label, method, name, fenced, by_start.get(fenced), free, by_start.get(free), gold])
    return rows


FENCE_HEADER = ["dataset", "method", "LGA reading", "start (Tukey k=1)", "its proxy score", "start (no fences)",
                "its proxy score", "golden proxy score"]


HEADER = ["dataset", "method", "strategy", "start", "stability", "proxy score", "test score", "gap to golden (test)",
          "seconds", "brute time / time", "transfer (test score there)"]


def plot_cell(cell: str, choices: dict[str, Any], tests: dict[str, Any], window: int, path: Path) -> None:
    """One figure per cell, over window starts. Top: brute force's proxy score (the ground truth), the
    test-set scores at the scored starts, and the windows tracing and the verified selector chose. Below,
    small multiples, one per LGA reading (theta x score): its curve (per-layer scores summed over the window,
    as LGA ranks windows; min-max normalised over the windows inside its Tukey fences, the fenced-out ones
    crossed at the edge) against brute force's (min-max normalised); its choice circled, and in the title its
    bootstrap stability, test score and rank correlation with brute force over the windows it chooses among."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    def curve(ch: dict[str, Any], summed: bool) -> tuple[list[int], list[float]]:
        pairs = sorted(zip(ch["candidates"], ch["scores"], strict=True))
        if summed and window > 1:  # per-layer scores -> window sums
            by = dict(pairs)
            pairs = [(s, sum(by[s + i] for i in range(window))) for s, _ in pairs
                     if all(s + i in by for i in range(window))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def norm(y: list[float]) -> list[float]:
        lo, hi = min(y), max(y)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in y]

    def label(name: str, ch: dict[str, Any]) -> str:
        stab = stability(ch)
        return f"{name} -> {ch['layers'][0]}" + (f" (stability {stab:.2f})" if stab is not None else "")

    lgas = [ch for n, ch in choices.items() if n.startswith("lga")]
    cols = 3
    rows = -(-len(lgas) // cols)
    fig = plt.figure(figsize=(11, 3.6 + 2.3 * rows))
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.6] + [1] * rows)
    top = fig.add_subplot(grid[0, :])
    brute = choices.get("brute")
    bx, by = curve(brute, False) if brute else ([], [])
    if brute:
        top.plot(bx, by, color="black", lw=2, marker="o", ms=3, label=label("brute force, proxy", brute))
        at = dict(zip(bx, by, strict=True))
        for name, mark, color in (("verified", "*", "tab:red"), ("causal", "D", "tab:blue")):
            if name in choices and choices[name]["layers"][0] in at:
                c = choices[name]["layers"][0]
                top.scatter([c], [at[c]], s=140 if mark == "*" else 60, marker=mark, color=color, zorder=4,
                            label=label(name, choices[name]))
    scored = sorted((int(k), v["mean"]) for k, v in tests.items() if k.isdigit())
    if scored:
        top.plot([k for k, _ in scored], [v for _, v in scored], ls=":", marker="s", color="grey",
                 label="test set, at the chosen starts")
    top.set_ylabel("rank score (mean of the\nharness metrics per record)")
    top.set_xlabel("layer (window start)")
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    ranks = {s: r for r, s in enumerate(sorted(bx, key=lambda s: by[bx.index(s)]))}  # brute force's ranking
    for i, ch in enumerate(lgas):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols], sharex=top)
        x, y = curve(ch, True)
        keep = dict(zip(ch["candidates"], ch["details"].get("kept") or [True] * len(ch["candidates"]), strict=True))
        inside = [all(keep.get(s + k, False) for k in range(window)) for s in x]  # windows LGA may choose
        if not any(inside):  # every window fenced out: LGA winsorised, show the raw range
            inside = [True] * len(x)
        lo = min(v for v, k in zip(y, inside, strict=True) if k)
        hi = max(v for v, k in zip(y, inside, strict=True) if k)
        ny = [min(max((v - lo) / (hi - lo) if hi > lo else 0.5, -0.1), 1.1) for v in y]  # outliers at the edge
        if bx:
            ax.plot(bx, norm(by), color="black", lw=1, alpha=0.35, label="brute force")
        line, = ax.plot(x, ny, lw=1.2, color=f"C{i % 10}", label="LGA")
        ax.scatter([s for s, k in zip(x, inside, strict=True) if k], [v for v, k in zip(ny, inside, strict=True) if k],
                   s=6, color=line.get_color())
        out = [(s, v) for s, v, k in zip(x, ny, inside, strict=True) if not k]
        if out:
            ax.scatter(*zip(*out, strict=True), marker="x", s=18, color="grey", label="outside Tukey fences")
        c = ch["layers"][0]
        if c in x:
            ax.scatter([c], [ny[x.index(c)]], s=70, facecolor="none", edgecolor=line.get_color(), lw=2, zorder=3)
        title = f"{ch['details']['variant']} -> {c}"
        if (stab := stability(ch)) is not None:
            title += f", stab {stab:.2f}"
        if str(c) in tests:
            title += f", test {tests[str(c)]['mean']:.3f}"
        common = [s for s, k in zip(x, inside, strict=True) if k and s in ranks]
        if len(common) > 2:  # Spearman over the windows it chooses among: its ranking vs brute force's
            mine = {s: r for r, s in enumerate(sorted(common, key=lambda s: y[x.index(s)]))}
            theirs = {s: r for r, s in enumerate(sorted(common, key=lambda s: ranks[s]))}
            rho = np.corrcoef([mine[s] for s in common], [theirs[s] for s in common])[0, 1]
            title += f"\nrank corr. with brute force {rho:+.2f} (inside fences)"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("normalised inside fences", fontsize=7)
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"SmolLM2-135M, {cell.replace('|', ', ')}: layer selection (circles: each LGA reading's choice)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--methods", nargs="+", default=["rome", "memit"], choices=["rome", "memit"])
    p.add_argument("--window", type=int, default=5, help="MEMIT window width")
    p.add_argument("--proxy", type=int, default=30)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--variants", default="all", help="LGA variants THETA/SCORE,... or all")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--shortlist", type=int, default=4)
    p.add_argument("--edits", type=int, default=None, help="verified: proxy requests edited per window")
    p.add_argument("--samples", type=int, default=10, help="causal tracing noise samples")
    p.add_argument("--tokens", type=int, default=100_000, help="second-moment token budget (wikitext-2 test)")
    p.add_argument("--steps", type=int, default=None, help="anchor optimisation steps (default: the editor's)")
    p.add_argument("--candidates", default=None, help="candidate layers, e.g. 4-12 (default: every layer)")
    p.add_argument("--brute-chunk", type=int, default=3, help="brute-force windows per saved step")
    p.add_argument("--minutes", type=float, default=50.0, help="start no new step after this")
    p.add_argument("--out", default=str(RESULTS / "layer_selection.json"))
    args = p.parse_args()
    require_data(CORPUS, *(f[1] for f in FILES.values()))
    t_run = time.perf_counter()
    out = Path(args.out)
    partial = out.with_suffix(".partial.json")
    # the settings every saved step depends on; the cells to run (--datasets, --methods) and the run's budget
    # are not among them, so a run over some cells keeps the others' steps
    not_settings = ("minutes", "out", "brute_chunk", "datasets", "methods")
    config = {k: v for k, v in vars(args).items() if k not in not_settings}
    res = json.loads(partial.read_text()) if partial.is_file() else {}
    if res:
        saved = {k: v for k, v in res["config"].items() if k not in not_settings}
        if saved != config:  # never discard hours of saved steps: the user moves the file or picks another --out
            diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (saved) vs {config.get(k)}"
                             for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k))
            print(f"layers.py: {partial} was saved with other settings ({diff}); rerun with those settings, or "
                  f"give another --out", file=sys.stderr)
            return 2
    else:
        res = {"choices": {}, "tests": {}, "runs": []}
    res["config"] = config
    res.setdefault("brute_parts", {})
    res["runs"].append({"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    anchor = {"steps": args.steps} if args.steps else {}

    def save() -> None:
        save_json(partial, res)  # atomic: a kill never corrupts hours of steps

    def out_of_time() -> bool:
        return time.perf_counter() - t_run > 60 * args.minutes

    model, tok = load_model("smollm2-135m")
    adapter = ArchitectureAdapter.from_model(model)
    cands = tuple(parse_candidates(args.candidates) or range(adapter.n_layers))
    stats = second_moments(model, tok, list(cands), StatsSpec(corpus=str(CORPUS), tokens=args.tokens),
                           adapter=adapter, progress=False)
    data = load_cells(args)
    windows = {"rome": 1, "memit": args.window}

    def brute_in_chunks(sel: BruteForce, cell: str, proxy: list[Any]) -> None:
        """Brute force --brute-chunk windows at a time, each chunk saved (resumes across runs and machines);
        the choice once every chunk is in. Its seconds: the chunks' wall times, the pre-edit measurement
        counted once; the machine of every chunk is kept."""
        parts = res["brute_parts"].setdefault(cell, {})  # first window's index -> that chunk's scores
        all_windows = sel.windows(adapter)
        cases = as_cases(proxy)
        scored = {tuple(w) for x in parts.values() for w in x["windows"]}  # pieces of any earlier --brute-chunk
        chunks: list[list[list[int]]] = []  # contiguous runs of unscored windows, cut every --brute-chunk
        for i, w in enumerate(all_windows):
            if tuple(w) in scored:
                continue
            if chunks and len(chunks[-1]) < args.brute_chunk and chunks[-1][-1] == all_windows[i - 1]:
                chunks[-1].append(w)
            else:
                chunks.append([w])
        for chunk in chunks:
            if out_of_time():
                return
            print(f"{cell}: brute force at {chunk} on {len(cases)} proxy records", file=sys.stderr, flush=True)
            t = time.perf_counter()
            ws = sel.scores(model, tok, cases, chunk)
            parts[str(all_windows.index(chunk[0]))] = {**ws.to_dict(), "wall": time.perf_counter() - t,
                                                        "cpu": machine()["cpu"]}
            save()
        ordered = [parts[k] for k in sorted(parts, key=int)]
        ws = WindowScores.join([WindowScores.from_dict(x) for x in ordered])
        wall = sum(x["wall"] for x in ordered) - sum(x["seconds"]["pre"] for x in ordered[1:])
        choice = sel.choose(ws, cases, wall).to_dict()
        choice["details"]["chunks"] = [{"windows": x["windows"], "wall": x["wall"], "cpu": x["cpu"]} for x in ordered]
        res["choices"][cell]["brute"] = choice
        save()

    def test_cell(method: str, label: str, d: dict[str, Any]) -> None:
        """Edit the cell's test records at every start chosen so far for ``method`` (this cell's first, then the
        other datasets' choices: transfer); starts already scored are skipped."""
        w = windows[method]
        cell = f"{label}|{method}"
        mine = res["choices"].get(cell, {})  # first the cell's own column: golden and verified, then the rest
        own = [mine[n]["layers"][0] for n in sorted(mine, key=lambda n: (n != "brute", n != "verified"))]
        starts = own + [ch["layers"][0] for c, chs in res["choices"].items() if c.endswith(f"|{method}")
                        for ch in chs.values()]
        per = res["tests"].setdefault(cell, {})
        for s in dict.fromkeys(starts):
            if str(s) in per or out_of_time() or s not in [cands[j] for j in window_starts(list(cands), w)]:
                continue
            print(f"{cell}: test {len(d['test'])} records at start {s}", file=sys.stderr, flush=True)
            ws = score_windows(model, tok, d["test"], [list(range(s, s + w))], method, stats=stats,
                               editor_kwargs={"anchor": anchor})
            per[str(s)] = {"mean": ws.score.nanmean().item(), "per_request": ws.score[:, 0].tolist(),
                           "seconds": ws.seconds, "failures": ws.failures}
            save()

    # 1. per cell: brute force first (the ground truth), then the cheap ones, then the cell's test edits at
    # every start chosen so far (a finished cell has its test column before the next cell's hour of brute force)
    n_sel = len(selectors(args, "rome", 1, cands, stats, anchor, []))
    for method in args.methods:
        w = windows[method]
        for label, d in data.items():
            cell = f"{label}|{method}"
            done = res["choices"].setdefault(cell, {})
            for name, sel in selectors(args, method, w, cands, stats, anchor, d["lga"]).items():
                if name in done or out_of_time():
                    continue
                if name == "brute":  # ~an hour per cell: run and saved in chunks of windows, then joined
                    brute_in_chunks(sel, cell, d["proxy"])
                    continue
                print(f"{cell}: {name} on {len(d['proxy'])} proxy records", file=sys.stderr, flush=True)
                reqs = d["lga"] if name.startswith("lga") else d["proxy"]
                done[name] = sel.select(model, adapter, tok, reqs).to_dict()
                save()
            if len(done) == n_sel:
                test_cell(method, label, d)
    # 2. transfer: the other datasets' choices, known once every cell has chosen
    for method in args.methods:
        for label, d in data.items():
            test_cell(method, label, d)
    finished = [c for c in res["choices"] if len(res["choices"][c]) == n_sel]
    for cell in finished:  # figures of every finished cell, also while others are still running
        label, method = cell.split("|")
        plot_cell(cell, res["choices"][cell], res["tests"].get(cell, {}), windows[method],
                  out.with_name(f"{out.stem}-{label}-{method}.png"))
    wanted = [f"{label}|{method}" for method in args.methods for label in data]
    done_res = {**res, "choices": {c: res["choices"][c] for c in finished}}
    if finished:  # the fences' effect, derived from the saved scores of every finished cell
        fences = markdown_table(FENCE_HEADER, fence_rows(done_res))
        save_text(out.with_name(f"{out.stem}-fences.md"), fences + "\n")
    if not set(wanted) <= set(finished) or out_of_time():
        if finished:
            print(markdown_table(HEADER, rows_of(done_res)))
            print(fences)
        print(f"partial ({len(set(wanted) & set(finished))} of {len(wanted)} cells chosen; the table above: every "
              f"finished cell): saved to {partial}; run again to continue", file=sys.stderr)
        return 3
    res = {**done_res, "table": markdown_table(HEADER, rows_of(done_res)), "fences": fences}
    labels = dict.fromkeys(c.split("|")[0] for c in finished)
    res["lga_conventions"] = {label: lga_convention(label) for label in labels}
    save_json(out, {k: v for k, v in res.items() if k != "brute_parts"})  # parts: in choices
    print(res["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
