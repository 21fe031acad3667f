"""Benchmark driver of issue 11: the forward-replay claim, unconfounded (scaling, sequential, lam grid).

    flock /tmp/kedit-heavy.lock .venv/bin/python -u bench/protocol.py [--modes scaling,sequential,compare]
    .venv/bin/python bench/protocol.py --table-only          # tables, plots and README from the JSON rows

SmolLM2-135M, the editor's default layers (4-8), second moments over wikitext-2 (test split). Modes:
  * scaling: one batch edit per (size, solver, targets), evaluated after it, model restored in between.
    CounterFact in the MEND format (counterfact-edit.json, first N records, so the sets are nested) at
    10, 100, 1000; zsRE at 10, 100, 500 under both target conventions (answers[0] = ROME/MEMIT, alt =
    EasyEdit). memit, alphaedit, emmet x {backward, forward}, plus memit x {onelayer, blue}.
  * sequential: the 500 ROME-format CounterFact records in batches of 50, memit, alphaedit, prune, rect x
    {backward, forward}, solver state carried by one Editor. After every batch: the first batch's
    efficacy again (forgetting), the current batch's, model health (perplexity on wikitext-2 valid, first
    20k tokens; top-1 agreement and KL on kedit's unrelated prompts); after the last: all 500 evaluated.
    An atomic checkpoint after each batch (edited W_out, solver state, per-batch metrics; kept in kedit's
    cache, common.checkpoint_dir, not in the results) lets a killed run continue from the last finished batch.
  * compare: every solver x {backward, forward} at each lam of a grid on the first --compare-n records,
    plus a "tuned" row per (solver, construction) whose lam maximises S on a disjoint proxy set (the last
    --proxy-n records of the file, never in the reported slice).
Every row states its solver's lam, passed explicitly (the same for every construction; solvers without
a preservation weight say "-"). ``--lam tuned`` instead gives each (solver, construction) of scaling and
sequential the lam the compare mode tuned for it on the proxy set (compare runs first in one invocation):
those rows are extra (``*_tuned``), beside the fixed-lam ones, and redone if the tuned lam changes.
Anchors do not depend on the solver or lam: editors share one anchor
cache (common.anchor_dir), so each construction optimises once per request set and layer.
Finished rows are kept (delete a JSON to redo it); --minutes stops cleanly before the budget and a
second call continues. Every JSON records the machine, command, versions, data slice and hyperparameters.
Results: bench/results/protocol/{scaling,sequential,compare}/, tables *.md, plots *.png, README.md
(written by bench/protocol_outputs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from common import (  # bench/common.py
    CORPUS,
    DATA,
    RESULTS,
    Recording,
    anchor_dir,
    checkpoint_dir,
    machine,
    require_data,
    save_json,
)
from protocol_outputs import COLUMNS, EXTRA_TARGETS, fmt_lam, write_outputs

OUT = RESULTS / "protocol"
PATHS = {"counterfact": DATA / "counterfact_mend_format" / "counterfact-edit.json",  # 10,000 records, MEND format
         "sequential": DATA / "counterfact_subset500.json",                           # 500 records, ROME format
         "zsre": DATA / "zsre_mend_eval_portability_gpt4.json",
         "health": DATA / "wikitext-2-raw" / "wiki.valid.raw"}
SOLVERS = {"scaling": ("memit", "alphaedit", "emmet"), "sequential": ("memit", "alphaedit", "prune", "rect"),
           "compare": ("memit", "alphaedit", "emmet", "prune", "rect")}
ZSRE_CONVENTIONS = {"zsre-answers": "answers", "zsre-alt": "alt"}  # answers[0] = ROME/MEMIT, alt = EasyEdit
# default rates (SmolLM2-135M, 2 CPU cores) for the cost estimate until finished rows give measured ones
DEFAULT_LAM = 15000.0  # scaling and sequential rows (every solver with a lam), unless --lam says otherwise
DEFAULT_RATES = {"anchor_s_per_request": 1.0, "eval_s_per_record": 0.05, "solve_s_per_request_layer": 0.07,
                 "health_s": 20.0}


def kind_of(ds: str) -> str:
    return "zsre" if ds.startswith("zsre") else "counterfact"


# -- setup ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What a run edits and reads: model, tokenizer, statistics (StatsSpec or ``{layer: C}``) and data files."""

    model: Any
    tok: Any
    stats: Any
    paths: dict[str, Path]
    model_name: str = "smollm2-135m"


@dataclass
class Ctx:
    """Per-invocation state: args, setup, shared anchor cache, loaded datasets, evaluators, the deadline."""

    args: argparse.Namespace
    setup: Setup
    out: Path
    anchor_cache: Any
    deadline: float
    rates: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple, Any] = field(default_factory=dict)
    evaluators: dict[str, Any] = field(default_factory=dict)
    health: Any = None
    stopped: bool = False
    anchor_identity: tuple | None = None  # what anchor cache keys of the unedited model share (missing_anchors)

    @cached_property
    def layers(self) -> list[int]:
        """The edited layers: --layers, else the editor's default (once per invocation: the adapter probes)."""
        from kedit.arch import ArchitectureAdapter
        from kedit.editor import default_layers

        return list(self.args.layers or default_layers(ArchitectureAdapter.from_model(self.setup.model).n_layers, True))

    def dataset(self, ds: str, n: int | None = None, offset: int = 0):
        """The loaded slice ``[offset, offset+n)`` of dataset ``ds`` (counterfact, zsre-*, sequential)."""
        from kedit.eval import load_dataset

        key = (ds, n, offset)
        if key not in self.data:
            path = self.setup.paths["zsre" if ds.startswith("zsre") else ds]
            spec = f"{'zsre' if ds.startswith('zsre') else 'counterfact'}:{path}"
            self.data[key] = load_dataset(spec, n=n, offset=offset, zsre_target=ZSRE_CONVENTIONS.get(ds))
        return self.data[key]

    def evaluator(self, ds: str):
        from kedit.eval import Evaluator

        if ds not in self.evaluators:  # one per dataset: its pre-edit pass is reused by consecutive runs
            self.evaluators[ds] = Evaluator(self.setup.model, self.setup.tok, seed=0, progress=not self.args.quiet)
        return self.evaluators[ds]

    def provenance(self) -> dict[str, Any]:
        return {"machine": self.info, "command": " ".join(sys.argv), "model": self.setup.model_name,
                "stats": "user-supplied matrices" if isinstance(self.setup.stats, dict) else str(self.setup.stats)}

    def time_left(self, need_s: float = 0.0) -> bool:
        """False (and a note, once) when a unit estimated at ``need_s`` would end after the deadline."""
        if time.time() + need_s <= self.deadline:
            return True
        if not self.stopped:
            print(f"[protocol] --minutes {self.args.minutes} would be exceeded; running only what still fits, "
                  "run again to continue", file=sys.stderr, flush=True)
        self.stopped = True
        return False


def lam_kwargs(solver: str, lam: float | None) -> dict[str, Any]:
    """Editor keyword arguments that set ``solver``'s preservation weight (its own, or its base's for
    PRUNE/RECT); {} for a solver without one (AlphaEdit) or ``lam=None``."""
    from kedit.solvers import SOLVERS, hparam_names

    cls = SOLVERS[solver]
    if lam is None:
        return {}
    if "lam" in hparam_names(cls):
        return {"lam": float(lam)}
    if "base" in hparam_names(cls):
        base = cls().base
        if "lam" in hparam_names(base):
            return {"base": {"name": base.name, "lam": float(lam)}}
    return {}


def has_lam(solver: str) -> bool:
    return bool(lam_kwargs(solver, 1.0))


def solver_lam(cfg: dict[str, Any]) -> float | None:
    """The lam an editor config used (``solver.lam`` or ``solver.base.lam``), None if the solver has none."""
    hp = cfg.get("solver", {})
    lam = hp.get("lam")
    if lam is None and isinstance(hp.get("base"), dict):
        lam = hp["base"].get("lam")
    return lam


def lam_for(ctx: Ctx, ds: str, solver: str, targets: str, missing_ok: bool = False
            ) -> tuple[float | None, str] | None:
    """(lam, name suffix) of a scaling or sequential unit under ``--lam``; None: no such unit (``--lam tuned``
    and a solver or construction the compare mode does not tune). Tuned lams come from compare's rows on
    the same dataset (sequential: CounterFact's); a missing one stops the run with the command that makes it
    (``missing_ok``: lam None, for an estimate made before this invocation's compare mode tunes it)."""
    if ctx.args.lam != "tuned":
        return ctx.args.lam, ""
    if not has_lam(solver) or targets not in ("backward", "forward"):
        return None
    cmp_ds = "counterfact" if ds == "sequential" else ds
    path = ctx.out / "compare" / cmp_ds / f"{solver}_{targets}_tuned.json"
    if not path.is_file():
        if missing_ok:
            return None, "_tuned"
        print(f"protocol.py: --lam tuned needs {path}: run --modes compare --datasets {cmp_ds} first",
              file=sys.stderr)
        raise SystemExit(2)
    return float(json.loads(path.read_text())["lam"]), "_tuned"


def done_with(path: Path, lam: float | None) -> bool:
    """A finished row (or sequential result) at this lam; a tuned row whose tuned lam has changed is not."""
    if not path.is_file():
        return False
    row = json.loads(path.read_text())
    return row.get("lam_policy") != "tuned" or row.get("lam") == lam


def make_editor(ctx: Ctx, solver: str, targets: str, lam: float | None):
    from kedit.editor import Editor

    return Editor(ctx.setup.model, ctx.setup.tok, method=solver, targets=targets, layers=ctx.args.layers,
                  stats=ctx.setup.stats, seed=0, diagnostics=True, verbose=not ctx.args.quiet,
                  anchor_cache=ctx.anchor_cache, **lam_kwargs(solver, lam))


def edit_seconds(record: dict[str, Any]) -> dict[str, Any]:
    """Anchor optimisation vs solve (keys + solve + apply + diagnostics) seconds of one edit record."""
    t = record["timings"]
    return {"anchors_s": t["optimize"], "solve_s": t["solve"], "stats_s": t["stats"], "total_s": t.get("total"),
            # anchors come from the per-request cache: how many were reused and how many optimised (all layers)
            "anchors_reused": sum(int(a.get("reused", 0)) for a in record.get("anchors", [])),
            "anchors_optimised": sum(int(a.get("optimised", 0)) for a in record.get("anchors", []))}


def slim_summary(summary: dict[str, Any], kind: str) -> dict[str, Any]:
    return {k: summary[k] for _, k in COLUMNS[kind] if k in summary}


def tuning_score(metrics: dict[str, Any], kind: str) -> float | None:
    """The score a lam is tuned on: S (CounterFact) or the harmonic mean of the zsRE search metrics."""
    from kedit.eval import metrics as M

    if kind == "counterfact":
        return (metrics.get("score") or {}).get("mean")
    vals = [(metrics.get(k) or {}).get("mean") for k in M.score_keys("zsre")]
    return None if any(v is None for v in vals) else M.harmonic_mean(vals)


def describe_data(data, n: int) -> dict[str, Any]:
    d = data.describe()
    return {**{k: v for k, v in d.items() if k not in ("indices", "skipped")}, "n": n,
            "indices": f"{d['indices'][0]}..{d['indices'][-1]}" if d["indices"] else ""}


# -- one batch edit, evaluated, restored -----------------------------------------------------------------
def batch_row(ctx: Ctx, ds: str, data, cases: list, solver: str, targets: str, lam: float | None,
              extra: dict[str, Any]) -> dict[str, Any]:
    """Edit ``cases`` in one batch, evaluate, undo (the harness restores the model); the row's JSON."""
    kind = kind_of(ds)
    rec = Recording(make_editor(ctx, solver, targets, lam))
    t0 = time.perf_counter()
    rep = ctx.evaluator(ds).run(cases, rec, mode="batch")
    record = rec.records[-1]
    cfg = rec.editor.config()
    return {**extra, "dataset": ds, "kind": kind, "n": len(cases), "solver": solver, "targets": targets,
            "lam": solver_lam(cfg), "metrics": slim_summary(rep.summary, kind), "evaluated": rep.evaluated,
            "diagnostics": record.get("diagnostics", []), "anchors": record.get("anchors", []),
            "seconds": {**edit_seconds(record), "edit_s": rep.timings["edit_s"],
                        "pre_eval_s": rep.timings["pre_eval_s"], "post_eval_s": rep.timings["post_eval_s"],
                        "wall_s": time.perf_counter() - t0},
            "data": describe_data(data, len(cases)),
            "editor": {k: v for k, v in cfg.items() if k != "templates"}, "templates": cfg["templates"],
            **ctx.provenance()}


def estimate_edit(ctx: Ctx, n: int, to_optimise: int) -> float:
    """Seconds one batch edit of ``n`` records plus its evaluation should take (ctx.rates), with ``to_optimise``
    (request, layer) anchors still to optimise."""
    r = ctx.rates
    anchor = to_optimise * r["anchor_s_per_request"]
    return anchor + len(ctx.layers) * n * r["solve_s_per_request_layer"] + 2 * n * r["eval_s_per_record"]


# -- scaling ------------------------------------------------------------------------------------------------
def scaling_units(args: argparse.Namespace) -> list[tuple[str, int, str, str]]:
    """(dataset, size, solver, targets); sizes ascending, all solvers of one size together (shared anchors)."""
    units = []
    for ds in expand_datasets(args.datasets):
        sizes = args.zsre_sizes if ds.startswith("zsre") else args.sizes
        for size in sizes:
            for solver in solvers_for(args, "scaling"):
                units += [(ds, size, solver, t) for t in targets_for(args) if t in ("backward", "forward")]
            if "memit" in solvers_for(args, "scaling"):
                units += [(ds, size, "memit", t) for t in EXTRA_TARGETS if t in targets_for(args)]
    return units


def anchor_layers(ctx: Ctx, targets: str) -> list[int]:
    """Where a construction optimises anchors (backward and onelayer: the last layer; forward: the first;
    BLUE: both)."""
    from kedit.targets import make_targets

    return make_targets(targets).anchor_layers(ctx.layers)


def missing_anchors(ctx: Ctx, cases: Sequence[Any], targets: str) -> set[str]:
    """Keys of the (request, layer) anchors of a batch edit of the unedited model that the anchor cache does not
    hold yet: what the edit will optimise (anchors depend on neither solver nor lam; a cold cache lacks all)."""
    from kedit.anchor_cache import AnchorStore, anchor_key
    from kedit.models import model_fingerprint
    from kedit.stats import tokenizer_identity

    if ctx.anchor_identity is None:  # once per invocation: the model is unedited whenever this is asked
        editor = make_editor(ctx, "memit", targets, None)
        ctx.anchor_identity = (model_fingerprint(ctx.setup.model), tokenizer_identity(ctx.setup.tok),
                               editor.templates, editor.anchor_cfg)
    fp, tok_id, templates, cfg = ctx.anchor_identity
    store = AnchorStore(ctx.anchor_cache)
    keys = {anchor_key(fp, tok_id, layer, c.request, templates, cfg) for layer in anchor_layers(ctx, targets)
            for c in cases}
    return {k for k in keys if k not in store}


def scaling_plan(ctx: Ctx, missing_ok: bool = False) -> list[tuple[tuple[str, int, str, str], float | None,
                                                                  Path, bool]]:
    """(unit, lam, row path, finished) for every scaling unit under ``--lam``."""
    plan = []
    for ds, size, solver, targets in scaling_units(ctx.args):
        lam_suffix = lam_for(ctx, ds, solver, targets, missing_ok)
        if lam_suffix is not None:
            lam, suffix = lam_suffix
            path = ctx.out / "scaling" / ds / f"n{size}_{solver}_{targets}{suffix}.json"
            plan.append(((ds, size, solver, targets), lam, path, done_with(path, lam)))
    return plan


def run_scaling(ctx: Ctx) -> None:
    for (ds, size, solver, targets), lam, path, done in scaling_plan(ctx):
        if done:
            continue
        data = ctx.dataset(ds, n=size)
        if not ctx.time_left(estimate_edit(ctx, size, len(missing_anchors(ctx, data.cases, targets)))):
            continue  # a later unit (anchors already optimised) may still fit
        log(ctx, f"scaling {ds} n={size} {solver}/{targets} lam {fmt_lam(lam)}")
        row = batch_row(ctx, ds, data, data.cases, solver, targets, lam,
                        {"mode": "scaling", "nested": "first N records of the file (sets nested across sizes)",
                         **lam_policy(ctx)})
        save_json(path, row)


def lam_policy(ctx: Ctx) -> dict[str, str]:
    """What a row records about how its lam was chosen."""
    if ctx.args.lam == "tuned":
        return {"lam_policy": "tuned", "lam_source": "the compare mode's tuned lam for this solver and "
                "construction (chosen on its disjoint proxy records), transferred to this batch size / protocol"}
    return {"lam_policy": "fixed"}


# -- sequential ------------------------------------------------------------------------------------------------
def _means(summary: dict[str, Any], keys: Sequence[str]) -> dict[str, float | None]:
    return {k: (summary.get(k) or {}).get("mean") for k in keys}


def _evaluate(ev, cases: list, pre: list, idx: Sequence[int]) -> dict[str, Any]:
    """Summary of the cases ``idx`` on the model as it is now, against their pre-edit snapshots."""
    from kedit.eval.results import case_metrics, summarize

    snaps = ev.measure([cases[i] for i in idx])
    recs = [{"pre": case_metrics(cases[i], pre[i], pre[i], None), "post": case_metrics(cases[i], s, pre[i], None)}
            for i, s in zip(idx, snaps, strict=True)]
    return summarize(recs, ev.seed, ev.n_boot)


def sequential_units(ctx: Ctx, missing_ok: bool = False) -> list[tuple[str, str, float | None, Path]]:
    """(solver, targets, lam, result folder) of every sequential run under ``--lam``."""
    args, units = ctx.args, []
    if "counterfact" not in expand_datasets(args.datasets):
        return []
    for s in solvers_for(args, "sequential"):
        for t in targets_for(args):
            lam_suffix = lam_for(ctx, "sequential", s, t, missing_ok) if t in ("backward", "forward") else None
            if lam_suffix is not None:
                units.append((s, t, lam_suffix[0], ctx.out / "sequential" / f"{s}_{t}{lam_suffix[1]}"))
    return units


def run_sequential(ctx: Ctx) -> None:
    import torch

    from kedit.io import atomic_write

    args = ctx.args
    units = sequential_units(ctx)
    if not units:
        return
    data = ctx.dataset("sequential", n=args.seq_n)
    cases = data.cases
    batches = [list(range(s, min(s + args.seq_batch, len(cases)))) for s in range(0, len(cases), args.seq_batch)]
    ev, pre, health_before, base_fp = ctx.evaluator("sequential"), None, None, None
    keys = [k for _, k in COLUMNS["counterfact"]]
    for solver, targets, lam, d in units:
        if done_with(d / "result.json", lam):
            continue
        per_batch = (estimate_edit(ctx, args.seq_batch, args.seq_batch * len(anchor_layers(ctx, targets)))
                     + ctx.rates["health_s"])  # an edited model: anchors are never cached
        if not ctx.time_left(per_batch):
            return
        from kedit.models import model_fingerprint

        if pre is None:  # the unedited model's snapshots and health, once per invocation
            base_fp = model_fingerprint(ctx.setup.model)
            pre = ev.measure(cases)
            health_before = ctx.health.measure()
        editor = make_editor(ctx, solver, targets, lam)
        ad = editor.adapter
        originals = {l: ad.w_out_storage(l).detach().clone() for l in editor.layers}
        # a tuned run's lam in the name: a checkpoint made under another tuned lam is never resumed
        tag = f"{d.name}_lam{fmt_lam(lam)}" if d.name.endswith("_tuned") else d.name
        ckpt_path = checkpoint_dir(ctx.out) / f"sequential_{tag}.pt"
        ckpt = {"batches": [], "w_out": {}, "state": None}
        editor.templates  # noqa: B018 (sampled now, from the unedited weights, as in an uninterrupted run)
        if ckpt_path.is_file():  # resume: the edited weights and the solver state after the last finished batch
            # our own file (written below), holding dicts of tensors and numbers only
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            with torch.no_grad():
                for l, w in ckpt["w_out"].items():
                    ad.w_out_storage(l).copy_(w.to(ad.w_out_storage(l).device))
            editor.state = ckpt["state"]
            log(ctx, f"sequential {solver}/{targets}: resuming after batch {len(ckpt['batches'])}")
        edits = []
        try:
            for b in range(len(ckpt["batches"]), len(batches)):
                if edits and not ctx.time_left(per_batch):
                    return  # the checkpoint of batch b holds everything; the next call continues there
                log(ctx, f"sequential {solver}/{targets} batch {b + 1}/{len(batches)}")
                t0 = time.perf_counter()
                edit = editor.apply([cases[i].request for i in batches[b]])
                edits.append(edit)
                t_edit = time.perf_counter() - t0
                first = _evaluate(ev, cases, pre, batches[0])
                current = _evaluate(ev, cases, pre, batches[b])
                health = ctx.health.compare(health_before, ctx.health.measure(), 0, 1)
                ckpt["batches"].append({
                    "after_batch": b + 1, "n_edited": batches[b][-1] + 1,
                    "first_batch": _means(first, keys), "current_batch": _means(current, keys),
                    "health": {k: a.mean for k, a in health.items()}, "diagnostics": edit.record.get("diagnostics", []),
                    "seconds": {**edit_seconds(edit.record), "edit_s": t_edit,
                                "eval_and_health_s": time.perf_counter() - t0 - t_edit}})
                ckpt["w_out"] = {l: ad.w_out_storage(l).detach().cpu().clone() for l in editor.layers}
                ckpt["state"] = editor.state
                atomic_write(ckpt_path, lambda tmp, c=ckpt: torch.save(c, tmp))
                save_json(d / "progress.json", ckpt["batches"])  # a readable mirror of the checkpoint
            final = _evaluate(ev, cases, pre, range(len(cases)))
            cfg = editor.config()
            save_json(d / "result.json", {
                "mode": "sequential", "dataset": "counterfact", "kind": "counterfact", "solver": solver,
                "targets": targets, "lam": solver_lam(cfg), **lam_policy(ctx), "n": len(cases),
                "batch_size": args.seq_batch,
                "evaluated": f"all {len(cases)} records after the last of {len(batches)} batches (state carried); "
                             "first/current batch and health after every batch",
                "metrics": slim_summary(final, "counterfact"), "batches": ckpt["batches"],
                "data": describe_data(data, len(cases)), "health": ctx.health.describe(),
                "editor": {k: v for k, v in cfg.items() if k != "templates"}, **ctx.provenance()})
            ckpt_path.unlink(missing_ok=True)  # result.json holds everything now
        finally:  # newest first, then the originals (a resumed run's earlier batches were written raw)
            for e in reversed(edits):
                e.undo()
            with torch.no_grad():
                for l, w in originals.items():
                    ad.w_out_storage(l).copy_(w)
            editor.reset()
            if model_fingerprint(ctx.setup.model) != base_fp:
                raise RuntimeError("sequential run did not restore the model")  # invariant, never user input


# -- compare: lam grid and tuned lam ---------------------------------------------------------------------------
def compare_units(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    return [(ds, s, t) for ds in expand_datasets(args.datasets) for s in solvers_for(args, "compare")
            for t in targets_for(args) if t in ("backward", "forward")]


def run_compare(ctx: Ctx) -> None:
    args = ctx.args
    for ds, solver, targets in compare_units(args):
        kind, base = kind_of(ds), ctx.out / "compare" / ds
        grid = args.lam_grid if has_lam(solver) else [None]
        report = ctx.dataset(ds, n=args.compare_n)
        for lam in grid:  # the reported slice at every lam of the grid
            path = base / f"{solver}_{targets}_lam{fmt_lam(lam)}.json"
            if path.is_file():
                continue
            if not ctx.time_left(estimate_edit(ctx, args.compare_n, len(missing_anchors(ctx, report.cases, targets)))):
                return
            log(ctx, f"compare {ds} {solver}/{targets} lam {fmt_lam(lam)}")
            save_json(path, batch_row(ctx, ds, report, report.cases, solver, targets, lam, {"mode": "compare"}))
        if not has_lam(solver):
            continue
        tuned_path = base / f"{solver}_{targets}_tuned.json"
        if tuned_path.is_file() and set(json.loads(tuned_path.read_text())["proxy_scores"]) == {
                fmt_lam(lam) for lam in args.tune_grid}:
            continue  # tuned over this grid (another grid re-tunes, reusing the proxy rows it shares)
        total = report.n_records
        if total < args.compare_n + args.proxy_n:
            raise SystemExit(f"protocol.py: {ds} has {total} records: too few for --compare-n {args.compare_n} "
                             f"plus a disjoint proxy set of --proxy-n {args.proxy_n}")
        proxy = ctx.dataset(ds, n=args.proxy_n, offset=total - args.proxy_n)  # the file's last records
        assert not set(proxy.indices) & set(report.indices)  # disjoint by construction
        scores = {}
        for lam in args.tune_grid:
            path = base / "proxy" / f"{solver}_{targets}_lam{fmt_lam(lam)}.json"
            if not path.is_file():
                if not ctx.time_left(estimate_edit(ctx, args.proxy_n, len(missing_anchors(ctx, proxy.cases, targets)))):
                    return
                log(ctx, f"compare {ds} {solver}/{targets} proxy lam {fmt_lam(lam)}")
                save_json(path, batch_row(ctx, ds, proxy, proxy.cases, solver, targets, lam,
                                           {"mode": "compare-proxy"}))
            scores[lam] = tuning_score(json.loads(path.read_text())["metrics"], kind)
        valid = {lam: s for lam, s in scores.items() if s is not None}
        best = max(valid, key=lambda lam: (valid[lam], -lam)) if valid else DEFAULT_LAM  # ties: the smaller lam
        row_path = base / f"{solver}_{targets}_lam{fmt_lam(best)}.json"
        if not row_path.is_file():  # a tuned lam outside the reported grid: one more reported-slice run
            if not ctx.time_left(estimate_edit(ctx, args.compare_n, len(missing_anchors(ctx, report.cases, targets)))):
                return
            save_json(row_path, batch_row(ctx, ds, report, report.cases, solver, targets, best, {"mode": "compare"}))
        save_json(tuned_path, {"mode": "compare-tuned", "dataset": ds, "solver": solver, "targets": targets,
                                "lam": best, "tuned_on": describe_data(proxy, args.proxy_n),
                                "score": "S (harmonic mean of ES, PS, NS)" if kind == "counterfact" else
                                "harmonic mean of zsRE efficacy/generalisation token acc and specificity agreement",
                                "proxy_scores": {fmt_lam(k): v for k, v in scores.items()},
                                "row": row_path.name, **ctx.provenance()})


# -- outputs -------------------------------------------------------------------------------------------------
# -- plan, estimate, main -------------------------------------------------------------------------------------
def expand_datasets(text: str) -> list[str]:
    out = []
    for ds in text.split(","):
        out += list(ZSRE_CONVENTIONS) if ds == "zsre" else [ds]
    return out


def solvers_for(args: argparse.Namespace, mode: str) -> list[str]:
    return [s for s in SOLVERS[mode] if s in args.solvers] if args.solvers else list(SOLVERS[mode])


def targets_for(args: argparse.Namespace) -> list[str]:
    return list(args.targets)


def measured_rates(out: Path) -> tuple[dict[str, float], str]:
    """Rates from finished rows (medians), else DEFAULT_RATES; and where they came from."""
    import statistics

    anchor, evals, solve = [], [], []
    for p in out.glob("*/*/*.json"):
        try:
            r = json.loads(p.read_text())
        except ValueError:
            continue
        if not isinstance(r, dict):  # progress.json mirrors are lists
            continue
        s, n = r.get("seconds"), r.get("n")
        if not s or not n:
            continue
        if s.get("anchors_optimised") and s.get("anchors_s"):
            anchor.append(s["anchors_s"] / s["anchors_optimised"])
        evals.append((s["pre_eval_s"] + s["post_eval_s"]) / (2 * n))
        solve.append(s["solve_s"] / (n * max(1, len(r.get("diagnostics") or [1]))))
    if not evals:
        return dict(DEFAULT_RATES), "default guesses for SmolLM2-135M on 2 CPU cores"
    rates = dict(DEFAULT_RATES)
    rates.update(eval_s_per_record=statistics.median(evals), solve_s_per_request_layer=statistics.median(solve))
    if anchor:
        rates["anchor_s_per_request"] = statistics.median(anchor)
    return rates, f"measured on {len(evals)} finished rows"


def estimate(ctx: Ctx) -> dict[str, Any]:
    """Seconds of the work still to do, per mode (from ctx.rates and the anchor cache), printed before anything
    runs. Anchors a unit optimises count once: later units of this call find them in the cache."""
    a, est, seen = ctx.args, {}, set()

    def edit_s(cases: Sequence[Any], targets: str) -> float:
        keys = missing_anchors(ctx, cases, targets) - seen
        seen.update(keys)
        return estimate_edit(ctx, len(cases), len(keys))

    if "compare" in a.modes:
        n, total = 0, 0.0
        for ds, solver, targets in compare_units(a):
            base = ctx.out / "compare" / ds
            report = ctx.dataset(ds, n=a.compare_n)
            proxy = ctx.dataset(ds, n=a.proxy_n, offset=max(0, report.n_records - a.proxy_n))
            for lam in a.lam_grid if has_lam(solver) else [None]:
                if not (base / f"{solver}_{targets}_lam{fmt_lam(lam)}.json").is_file():
                    n, total = n + 1, total + edit_s(report.cases, targets)
            for lam in a.tune_grid if has_lam(solver) else []:
                if not (base / "proxy" / f"{solver}_{targets}_lam{fmt_lam(lam)}.json").is_file():
                    n, total = n + 1, total + edit_s(proxy.cases, targets)
        est["compare"] = (n, total)
    if "scaling" in a.modes:
        n, total = 0, 0.0
        for (ds, size, _, targets), _, _, done in scaling_plan(ctx, missing_ok="compare" in a.modes):
            if not done:
                n, total = n + 1, total + edit_s(ctx.dataset(ds, n=size).cases, targets)
        est["scaling"] = (n, total)
    if "sequential" in a.modes:
        units = sequential_units(ctx, missing_ok="compare" in a.modes)
        todo = [u for u in units if not done_with(u[3] / "result.json", u[2])]
        batches = -(-a.seq_n // a.seq_batch)
        rate = ctx.rates["eval_s_per_record"]
        per = batches * (estimate_edit(ctx, a.seq_batch, a.seq_batch) + ctx.rates["health_s"]
                         + 2 * a.seq_batch * rate) + 2 * a.seq_n * rate
        est["sequential"] = (len(todo), len(todo) * per)
    return est


def log(ctx: Ctx, msg: str) -> None:
    if not ctx.args.quiet:
        print(f"[protocol] {msg}", file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def lam_arg(text: str) -> float | str:
    return text if text == "tuned" else float(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="scaling,sequential,compare", type=lambda s: s.split(","))
    p.add_argument("--datasets", default="counterfact,zsre", help="counterfact, zsre (= zsre-answers,zsre-alt)")
    p.add_argument("--sizes", type=ints, default=[10, 100, 1000], help="CounterFact batch sizes (scaling)")
    p.add_argument("--zsre-sizes", type=ints, default=[10, 100, 500], help="zsRE batch sizes (scaling)")
    p.add_argument("--solvers", type=lambda s: s.split(","), default=None, help="restrict every mode's solvers")
    p.add_argument("--targets", type=lambda s: s.split(","), default=["backward", "forward", *EXTRA_TARGETS])
    p.add_argument("--layers", type=ints, default=None, help="edited layers (default: the editor's, 4-8)")
    p.add_argument("--lam", type=lam_arg, default=DEFAULT_LAM,
                   help="lam of scaling and sequential rows, every solver; 'tuned': each one's tuned lam (compare)")
    p.add_argument("--seq-n", type=int, default=500)
    p.add_argument("--seq-batch", type=int, default=50)
    p.add_argument("--health-tokens", type=int, default=20000)
    p.add_argument("--lam-grid", type=floats, default=[5000.0, 15000.0])
    p.add_argument("--tune-grid", type=floats, default=[100.0, 300.0, 1000.0, 5000.0, 15000.0, 50000.0])
    p.add_argument("--compare-n", type=int, default=200, help="reported records of the lam comparison")
    p.add_argument("--proxy-n", type=int, default=50, help="proxy records that tune lam (the file's last ones)")
    p.add_argument("--minutes", type=float, default=600.0, help="start no unit that would end after this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def default_setup(args: argparse.Namespace) -> Setup:
    require_data(CORPUS, *PATHS.values())
    from kedit.models import load_model
    from kedit.stats import StatsSpec

    model, tok = load_model("smollm2-135m")
    return Setup(model, tok, StatsSpec(corpus=str(CORPUS)), dict(PATHS))


def main(argv: Sequence[str] | None = None, setup: Setup | None = None) -> int:
    """Run the asked modes (skipping finished work), then write the outputs; ``setup`` replaces SmolLM2."""
    args = parser().parse_args(argv)
    out = args.out
    if args.table_only:
        return write_outputs(out)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = setup or default_setup(args)
    rates, source = measured_rates(out)
    ctx = Ctx(args, setup, out, anchor_dir(), time.time() + 60 * args.minutes, rates, machine())
    est = estimate(ctx)
    print("[protocol] cost estimate (" + source + "): " + "; ".join(
        f"{mode} {n} runs ~{s / 60:.1f} min" for mode, (n, s) in est.items())
        + f"; total ~{sum(s for _, s in est.values()) / 60:.1f} min", file=sys.stderr, flush=True)
    if "sequential" in args.modes:
        from kedit.corpus import open_corpus
        from kedit.eval.health import Health

        ctx.health = Health(setup.model, setup.tok, open_corpus(setup.paths["health"]), tokens=args.health_tokens)
    before = _result_stamps(out)
    for mode, fn in (("compare", run_compare), ("scaling", run_scaling), ("sequential", run_sequential)):
        if mode in args.modes and not ctx.stopped:
            fn(ctx)
    if _result_stamps(out) != before or not (out / "README.md").is_file():  # nothing new: outputs stand
        write_outputs(out)
    return 0


def _result_stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "protocol.json"} if out.is_dir() else {}


if __name__ == "__main__":
    sys.exit(main())
