"""The editing protocols behind ``Evaluator.run``: batch, sequential (B per step) and single.

Timings are wall-clock seconds per phase; the model is restored (every Edit undone, newest first)
and the editor's sequential state reset before returning, whatever happens in between.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase, filled_prompt
from kedit.eval.results import EditorLike, Report, Snapshot, case_metrics, entry, summarize
from kedit.models import model_fingerprint
from kedit.stats import tokenizer_identity

if TYPE_CHECKING:  # the Evaluator is passed in; importing kedit.eval.harness here would be a cycle
    from kedit.eval.harness import Evaluator

MODES = ("batch", "sequential", "single")

# The latest pre-edit snapshots, shared by every Evaluator of the process (kedit compare-style scripts run
# one eval per method on the same cases): keyed by everything they depend on; one entry bounds the memory
# (next-token distributions are [V] per prompt).
_PRE_CACHE: dict[tuple, list[Snapshot]] = {}


def _record(case: EvalCase) -> dict[str, Any]:
    r = case.request
    rec = {"index": case.index, "case_id": case.case_id, "kind": case.kind, "subject": r.subject,
           "prompt": filled_prompt(case), "target_new": r.target_new, "target_true": r.target_true}
    if len(case.requests) > 1:
        rec["edits"] = [{"prompt": e.prompt.format(e.subject), "target_new": e.target_new,
                         "target_true": e.target_true} for e in case.requests]
    if case.multihop is not None:
        rec["questions"], rec["new_answer"] = list(case.multihop.questions), case.multihop.new_answer
        rec["answer"] = case.multihop.answer
    if case.portability:
        rec["portability"] = [list(p) for p in case.portability]
    return rec


def _requests(cases: list[EvalCase], idx: list[int]) -> list:
    return [r for i in idx for r in cases[i].requests]


def _health_summary(ev: Evaluator, before, afters: list) -> dict[str, dict[str, Any]]:
    """Health summary entries: one post-edit state (CI over rows / prompts), or the mean over single edits."""
    h = ev.health
    pre = h.compare(before, before, ev.seed, ev.n_boot)
    if len(afters) == 1:
        post = h.compare(before, afters[0], ev.seed, ev.n_boot)
    else:  # single mode: one state per edit; the CI is over edits
        per = [h.compare(before, a, ev.seed, 1) for a in afters]
        post = {k: M.aggregate([p[k].mean for p in per], seed=ev.seed, n_boot=ev.n_boot) for k in pre}
    return {k: entry(k, post[k], pre[k]) for k in pre}


def run_protocol(ev: Evaluator, cases: list[EvalCase], editor: EditorLike | None, mode: str,
                 batch_size: int | None, eval_every_batch: bool, extra: dict[str, Any]) -> Report:
    """Pre-eval, edit(s), post-eval, restore; returns a Report (see Evaluator.run)."""
    n = len(cases)
    param = next(ev.model.parameters())
    model_info = {"name": getattr(ev.model, "kedit_name", type(ev.model).__name__),
                  "revision": getattr(ev.model, "kedit_revision", None), "fingerprint": model_fingerprint(ev.model),
                  "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device)}
    t_start, gen0 = time.perf_counter(), ev.generation_s
    # pre-edit scores depend only on the weights, the tokenizer, the cases and the scoring settings: reuse
    # them across editors and evaluators (same content fingerprint)
    key = (model_info["fingerprint"], tokenizer_identity(ev.tok), tuple(cases), ev.scorer.padding_side,
           ev.fluency, ev.fluency_prompts, ev.fluency_length, ev.seed, ev.multihop_tokens)
    cached = key in _PRE_CACHE
    pre = _PRE_CACHE[key] if cached else ev.measure(cases)
    _PRE_CACHE.clear()
    _PRE_CACHE[key] = pre
    timings = {"pre_eval_s": time.perf_counter() - t_start, "edit_s": 0.0, "post_eval_s": 0.0, "health_s": 0.0}
    idf = ev.idf(cases)
    post: list[Snapshot] = []
    batch_of: list[int | None] = [None] * n
    trajectory: list[dict[str, Any]] = []
    edits: list[Any] = []

    def timed(phase: str, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            timings[phase] += time.perf_counter() - t

    health_before = timed("health_s", ev.health.measure) if ev.health is not None else None
    health_after: list[Any] = []  # the states the health summary is taken from
    health_traj: list[dict[str, Any]] = []

    def health_point(after_batch: int, n_edited: int) -> Any:
        state = timed("health_s", ev.health.measure)
        vals = ev.health.compare(health_before, state, ev.seed, 1)
        health_traj.append({"after_batch": after_batch, "n_edited": n_edited,
                            **{k: a.mean for k, a in vals.items()}})
        return state

    if ev.health is not None:
        health_traj.append({"after_batch": 0, "n_edited": 0, **{k: a.mean for k, a in ev.health.compare(
            health_before, health_before, ev.seed, 1).items()}})
    multi = any(len(c.requests) > 1 for c in cases)

    if editor is None:
        mode, size, evaluated = "none", None, "unedited model (method none): post-edit values = pre-edit values"
        post = pre
        health_after = [health_before] if ev.health is not None else []
    elif mode == "single" and multi:
        size = 1
        evaluated = ("per case: each case's rewrites applied as one batch, evaluated, weights restored "
                     "before the next case")
        editor.reset()
        try:
            for i, c in enumerate(tqdm(cases, desc="per-case edits", file=sys.stderr, disable=not ev.progress)):
                edit = timed("edit_s", lambda c=c: editor.apply(list(c.requests)))
                try:
                    post.extend(timed("post_eval_s", lambda c=c: ev.measure([c])))
                    if ev.health is not None:
                        health_after.append(health_point(i + 1, len(c.requests)))
                finally:
                    edit.undo()
                    editor.reset()  # every case starts from the unedited weights and solver state
                batch_of[i] = i
        finally:
            editor.reset()
    elif mode == "single":
        size, evaluated = 1, "single: each record right after its own edit; weights restored before the next"
        editor.reset()
        # anchors of all records in one batch, then each record applied alone (Editor.apply_each)
        edits = editor.apply_each([c.request for c in cases])
        try:
            for i, c in enumerate(tqdm(cases, desc="single edits", file=sys.stderr, disable=not ev.progress)):
                edit = timed("edit_s", lambda: next(edits))
                try:
                    post.extend(timed("post_eval_s", lambda c=c: ev.measure([c])))
                    if ev.health is not None:
                        health_after.append(health_point(i + 1, 1))
                finally:
                    edit.undo()
                batch_of[i] = i
        finally:
            edits.close()
            editor.reset()
    else:
        size = n if mode == "batch" or batch_size is None else min(batch_size, n)
        batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        n_req = sum(len(c.requests) for c in cases)
        what = f"{n} records" if n_req == n else f"{n} records ({n_req} rewrites)"
        evaluated = (f"after all {len(batches)} batches of up to {size} (sequential, state carried)"
                     if mode == "sequential" else f"after one batch edit of all {what}")
        editor.reset()
        try:
            for b, idx in enumerate(tqdm(batches, desc="edit batches", file=sys.stderr,
                                         disable=not ev.progress or len(batches) == 1)):
                edits.append(timed("edit_s", lambda idx=idx: editor.apply(_requests(cases, idx))))
                for i in idx:
                    batch_of[i] = b
                if ev.health is not None:  # after every batch: the health trajectory over the number of edits
                    state = health_point(b + 1, len(_requests(cases, [i for bb in batches[:b + 1] for i in bb])))
                    if b == len(batches) - 1:
                        health_after = [state]
                if mode == "sequential" and eval_every_batch and b < len(batches) - 1:
                    done = [i for bb in batches[:b + 1] for i in bb]
                    snaps = timed("post_eval_s", lambda done=done: ev.measure([cases[i] for i in done]))
                    vals = [{"pre": case_metrics(cases[i], pre[i], pre[i], idf),
                             "post": case_metrics(cases[i], s, pre[i], idf)} for i, s in zip(done, snaps, strict=True)]
                    trajectory.append({"after_batch": b + 1, "n_edited": len(done),
                                       "summary": summarize(vals, ev.seed, ev.n_boot)})
            post = timed("post_eval_s", lambda: ev.measure(cases))
        finally:
            for e in reversed(edits):  # newest first restores the original weights exactly
                e.undo()
            editor.reset()
    records = []
    for i, c in enumerate(cases):
        rec = _record(c)
        rec["edit_batch"] = batch_of[i]
        rec["pre"] = case_metrics(c, pre[i], pre[i], idf)
        rec["post"] = case_metrics(c, post[i], pre[i], idf)
        if pre[i].texts:
            rec["texts_pre"], rec["texts_post"] = pre[i].texts, post[i].texts
        if pre[i].gens:  # greedy answers to MQuAKE questions / single-hop clozes, for the drill-down
            rec["answers_pre"] = {"/".join(map(str, t)): g for t, g in pre[i].gens.items()}
            rec["answers_post"] = {"/".join(map(str, t)): g for t, g in post[i].gens.items()}
        records.append(rec)
    summary = summarize(records, ev.seed, ev.n_boot)
    if ev.health is not None and health_after:
        summary.update(_health_summary(ev, health_before, health_after))
    if trajectory:
        trajectory.append({"after_batch": len(trajectory) + 1, "n_edited": n, "summary": summary})
    timings["total_s"] = time.perf_counter() - t_start
    timings["generation_s"] = ev.generation_s - gen0  # fluency sampling, included in the eval phases
    timings["pre_eval_cached"] = cached
    timings["pre_eval_records_per_s"] = None if cached or not timings["pre_eval_s"] else n / timings["pre_eval_s"]
    timings["post_eval_records_per_s"] = n / timings["post_eval_s"] if timings["post_eval_s"] else None
    timings["edit_records_per_s"] = n / timings["edit_s"] if timings["edit_s"] else None
    config = {"model": model_info, "editor": editor.config() if editor is not None else {"method": "none"},
              "protocol": {"mode": mode, "batch_size": size, "eval_every_batch": bool(trajectory),
                           "evaluated": evaluated, "n_cases": n},
              "evaluator": ev.describe(), **extra}
    return Report(summary, records, config, timings, evaluated, trajectory, health_traj)
