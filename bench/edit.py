"""Benchmark: batched anchor optimisation vs the one-by-one compute_z loop, FLOP/s vs peak, end-to-end MEMIT.

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/edit.py [--n 64] [--baseline-n 8] [--bf16-n 8]

On SmolLM2-135M with the first ``--n`` CounterFact records of ../shared/data/counterfact_subset500.json:
1. anchors at the last MEMIT layer (a) with kedit.optimize.optimize_anchors, batched (``--batch-size`` requests per
   chunk; taken from the end-to-end MEMIT backward run, which optimises exactly these) and (b) with a
   re-implementation of ROME/MEMIT's ``compute_z``: one request at a time, a full forward through every layer with
   a hook adding delta at the anchor layer, logits over the vocabulary at every position, ``torch.optim.Adam``;
   same templates, token ids, loss, steps, early stop and clamp. (b) runs on the first ``--baseline-n`` requests
   (and, with MEMIT's second LM head, on ``--baseline-memit-n``); its time per request is extrapolated. The
   anchors of (a) and (b) are compared.
2. achieved FLOP/s of (a) and of a bf16-autocast run against this machine's measured matmul peak, with the FLOPs
   counted pass by pass (checked against torch's FlopCounterMode), and torch.profiler breakdowns of both loops.
3. end-to-end MEMIT (layers 4-8) with backward, forward and onelayer targets on all requests in one batch:
   ``edit.record["timings"]`` and efficacy (fraction of requests with P(new) > P(true) after the edit).
``--anchor-speed`` (issue 11) instead times only the anchors, in one process, on the same requests at the last
layer: the old settings (KL at the KL prompt's end, stop on the NLL, chunks in request order) against the reference
defaults (KL at the subject's last token as a one-column band, stop on the total loss, chunks sorted by suffix
length) and larger chunks; seconds/request, steps, nll_end, padding, and a torch.profiler breakdown of a few steps;
writes bench/results/anchor_speed.json.
Every timed phase records its CPU utilisation (the 2 cores are shared; < 0.9 means someone else ran).
Prints a table and writes bench/results/edit.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from common import (  # bench/common.py (scripts run as bench/<name>.py)
    CORPUS,
    DATA,
    RESULTS,
    machine,
    require_data,
    save_json,
)
from torch.utils.flop_counter import FlopCounterMode

from kedit.arch import ArchitectureAdapter
from kedit.batch import TokenBatch
from kedit.editor import Editor
from kedit.models import load_model
from kedit.optimize import AnchorConfig, AnchorProblem, Anchors, anchor_layout, optimize_anchors
from kedit.probe import target_probs
from kedit.requests import EditRequest, request_from_record
from kedit.stats import StatsInfo, StatsSpec, second_moments
from kedit.tokens import pad_id

COUNTERFACT = DATA / "counterfact_subset500.json"


# -- machine -------------------------------------------------------------------------------------------

def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    """Best-of-3 GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype``."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n * reps / best / 1e9


def matmul_peak() -> dict[str, Any]:
    """Measured matmul GFLOP/s for fp32 and bf16 on a square and on model-shaped products."""
    shapes = {"2048x2048x2048": (2048, 2048, 2048), "8192x576x1536 (MLP up)": (8192, 576, 1536),
              "8192x1536x576 (MLP down)": (8192, 1536, 576), "1024x576x49152 (LM head)": (1024, 576, 49152)}
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        res = {s: round(matmul_gflops(*mkn, dtype, reps=4 if dtype == torch.float32 else 1), 1)
               for s, mkn in shapes.items()}
        out[name] = {"shapes": res, "peak_gflops": max(res.values())}
    return out


# -- data ---------------------------------------------------------------------------------------------
def load_requests(n: int) -> list[EditRequest]:
    """The first ``n`` CounterFact records as EditRequests."""
    records = json.loads(COUNTERFACT.read_text())[:n]
    return [request_from_record(r, f"{COUNTERFACT.name} record {i}") for i, r in enumerate(records)]


# -- (b) the one-by-one loop: ROME/MEMIT compute_z, re-implemented ---------------------------------------
def compute_z_one(model, adapter: ArchitectureAdapter, p: AnchorProblem, layer: int, cfg: AnchorConfig,
                  pad: int, double_head: bool = True) -> dict[str, Any]:
    """Anchor of one request the way ROME/MEMIT's ``compute_z`` finds it (full passes, full logits, optim.Adam).

    As memit/compute_z.py: the whole model runs every step with a hook adding delta at the anchor layer's output
    (subject's last token of every prompt), logits are computed over the vocabulary at every position, and (with
    ``double_head``, as MEMIT does) the target NLL is computed from a second ``ln_f(h_last) @ W_U`` over every
    position of the rewrite prompts. The loss is kedit's (METHODS §4), so the anchors must agree: mean over
    templates of the mean target-token NLL, ``kl_factor * KL(p_delta || p_0)`` of ``"{subject} is a"`` read where
    ``cfg.kl_position`` says (MEMIT: the subject's last token), ``weight_decay * ||delta|| / ||h||^2``; it stops
    when the ``cfg.stop_on`` loss is below ``early_stop`` (MEMIT: total loss < 0.05) and clamps ``||delta||``
    after each Adam step.
    """
    assert p.n == 1
    tf = p.rewrite
    n_rw = tf.input_ids.shape[0]
    width = max(tf.input_ids.shape[1], p.kl_ids.shape[1])
    ids = torch.full((n_rw + 1, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:n_rw, : tf.input_ids.shape[1]], mask[:n_rw, : tf.input_ids.shape[1]] = tf.input_ids, tf.attention_mask
    ids[n_rw:, : p.kl_ids.shape[1]], mask[n_rw:, : p.kl_ids.shape[1]] = p.kl_ids, p.kl_mask
    lookup = torch.cat([p.rewrite_decisive, p.kl_decisive])  # subject's last token, every prompt
    rows = torch.arange(n_rw + 1)
    targets = torch.full((n_rw, width), -100, dtype=torch.long)  # MEMIT's rewriting_targets
    targets[tf.rows, tf.positions] = tf.labels
    n_target = int((targets[0] != -100).sum())
    kl_row = n_rw
    kl_pos = int(p.kl_decisive[0] if cfg.kl_position == "subject" else p.kl_last[0])

    delta = torch.zeros(adapter.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    state: dict[str, torch.Tensor] = {}

    def edit_output(_m: Any, _args: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        if "target_init" not in state:
            state["target_init"] = h[0, lookup[0]].detach().clone()
        h = h.index_put((rows, lookup), delta.expand(len(rows), -1).to(h.dtype), accumulate=True)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def keep_last(_m: Any, _args: Any, out: Any) -> None:
        state["full_repr"] = out[0] if isinstance(out, tuple) else out

    handles = [adapter.blocks[layer].register_forward_hook(edit_output),
               adapter.blocks[-1].register_forward_hook(keep_last)]
    nll_start = nll_end = float("nan")
    steps = 0
    try:
        for it in range(cfg.steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, W, V], every position
            kl_logp = torch.log_softmax(logits[kl_row, kl_pos][None].float(), -1)
            if "kl_init" not in state:
                state["kl_init"] = kl_logp.detach().clone()
            rw_logits = adapter.unembed(state.pop("full_repr")[:n_rw]) if double_head else logits[:n_rw]
            log_probs = torch.log_softmax(rw_logits.float(), dim=2)
            lp = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0)[..., None])[..., 0]
            nll_each = -(lp * (targets != -100).float()).sum(1) / n_target
            nll = nll_each.mean()
            kl = (kl_logp.exp() * (kl_logp - state["kl_init"])).sum()
            wd = delta.norm() / state["target_init"].norm() ** 2
            loss = nll + cfg.kl_factor * kl + cfg.weight_decay * wd
            nll_end = nll.item()
            if it == 0:
                nll_start = nll_end
            if (loss.item() if cfg.stop_on == "total" else nll_end) < cfg.early_stop or it == cfg.steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            max_norm = cfg.clamp_norm_factor * state["target_init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        for h in handles:
            h.remove()
    h0 = state["target_init"]
    return {"z": (h0 + delta).detach(), "nll_start": nll_start, "nll_end": nll_end, "steps": steps}


def one_by_one(model, adapter: ArchitectureAdapter, prep: TokenBatch, layer: int, cfg: AnchorConfig, pad: int,
               count: int, double_head: bool) -> dict[str, Any]:
    """compute_z for the first ``count`` requests (``prep`` built with chunk 1); seconds per request."""
    out = []
    with Meter() as meter:
        for p in prep.chunks[:count]:
            out.append(compute_z_one(model, adapter, p, layer, cfg, pad, double_head))
    return {"z": torch.stack([o["z"] for o in out]), "steps": [o["steps"] for o in out],
            "nll_start": [o["nll_start"] for o in out], "nll_end": [o["nll_end"] for o in out],
            "seconds": meter.wall, "seconds_per_request": meter.wall / count, "cpu_utilisation": meter.utilisation}


class Meter:
    """Wall time and CPU utilisation of this process (CPU seconds / (wall * torch threads)) over a block: values
    well below 1 mean other processes took the cores (the machine is shared)."""

    def __enter__(self) -> Meter:
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t
        self.utilisation = (time.process_time() - self._c) / (self.wall * torch.get_num_threads())


# -- analyses of the batched run -------------------------------------------------------------------------
def token_stats(prep: TokenBatch, pad: int) -> dict[str, Any]:
    """Tokens per evaluation (all chunks, every request present): right-padded full rows (what a replay of every
    position above the anchor computes), optimize.py's left-aligned suffix columns ``B * (W - P)``, and the
    minimum: the real tokens at or after each row's decisive token (the only ones that depend on delta)."""
    full = real = suffix_cols = needed = setup = 0
    per_request: list[tuple[int, int]] = []  # (longest suffix, rows) per request
    for c in prep.chunks:
        lay = anchor_layout(c, pad)
        rows, width = lay.ids.shape
        rw_len, kl_len = c.rewrite.attention_mask.sum(1), c.kl_mask.sum(1)
        full += rows * max(c.rewrite.input_ids.shape[1], c.kl_ids.shape[1])
        real += int(rw_len.sum() + kl_len.sum())
        suffix_cols += rows * (width - lay.P)
        needed += int((rw_len - c.rewrite_decisive).sum() + (kl_len - c.kl_decisive).sum())
        setup += rows * width
        sfx = torch.cat([c.rewrite.attention_mask.sum(1) - c.rewrite_decisive, kl_len - c.kl_decisive])
        req = torch.cat([c.rewrite_request, torch.arange(c.n)])
        per_request += [(int(sfx[req == i].max()), int((req == i).sum())) for i in range(c.n)]
    per_request.sort()
    size = prep.chunks[0].n
    sorted_cols = sum(max(x[0] for x in per_request[lo: lo + size]) * sum(x[1] for x in per_request[lo: lo + size])
                      for lo in range(0, len(per_request), size))
    return {"right_padded_full_rows": full, "real_tokens": real, "suffix_columns_computed": suffix_cols,
            "suffix_tokens_needed": needed, "suffix_padding_fraction": 1 - needed / suffix_cols,
            "full_over_suffix_columns": full / suffix_cols, "left_aligned_setup_columns": setup,
            "suffix_columns_if_chunks_sorted_by_suffix_length": sorted_cols}


def shrink_schedule(steps: list[int], batch_size: int, max_steps: int) -> dict[str, Any]:
    """Request-evaluations optimize.py computes (frozen requests stay until <= 60% are active) vs those needed."""
    computed = needed = 0
    for lo in range(0, len(steps), batch_size):
        chunk = steps[lo: lo + batch_size]
        present = len(chunk)
        for it in range(max_steps):
            active = sum(s >= it for s in chunk)
            if active == 0:
                break
            if active <= 0.6 * present:
                present = active
            computed += present
        needed += sum(s + 1 for s in chunk)
    return {"request_evaluations_computed": computed, "request_evaluations_needed": needed,
            "efficiency": needed / computed}


def compare(za: torch.Tensor, zb: torch.Tensor) -> dict[str, float]:
    """Relative differences of two anchor sets ``[n, d]``."""
    row = (za - zb).norm(dim=-1) / zb.norm(dim=-1)
    return {"max_rel_norm_diff": row.max().item(), "mean_rel_norm_diff": row.mean().item(),
            "max_abs_diff_over_max_abs": ((za - zb).abs().max() / zb.abs().max()).item()}


def run_flops(adapter: ArchitectureAdapter, prep: TokenBatch, layer: int, cfg: AnchorConfig, pad: int,
              steps: list[int]) -> dict[str, float]:
    """Matmul FLOPs of an optimize_anchors run (suffix replay) whose requests took ``steps`` Adam steps, replaying
    its schedule (frozen requests stay in the batch until <= 60% are active).

    ``optimize_py``: its own estimate (4 FLOPs per weight and suffix token per evaluation, setup not counted);
    ``corrected``: every pass counted once: the setup (the full left-aligned batch through every block with the LM
    head at every column; the suffix again through every block on the prefix cache; the replay check with the LM
    head at the target columns), each evaluation's forward (blocks above ``layer`` on the suffix columns + LM head
    at the scored columns), and an input-gradient backward of the same size after every evaluation but the last.
    ``setup``: the setup part of ``corrected``."""
    p_all = sum(p.numel() for b in adapter.blocks for p in b.parameters())
    p_above = sum(p.numel() for b in adapter.blocks[layer + 1:] for p in b.parameters())
    head = adapter.d_model * adapter.lm_head.weight.shape[0]
    est = corr = setup = 0.0
    lo = 0
    for c in prep.chunks:
        s = steps[lo: lo + c.n]
        lo += c.n
        lay = anchor_layout(c, pad)
        n_rows, width = lay.ids.shape
        cols = width - lay.P
        rows = torch.bincount(lay.row_req, minlength=c.n)  # rewrite rows + the KL row, per request
        scored = torch.bincount(lay.row_req[lay.tok_row], minlength=c.n) + 1  # target tokens + the KL read-out
        first = 2 * n_rows * width * (p_all + head) + 2 * n_rows * cols * p_all
        check = 2 * n_rows * cols * p_above + 2 * len(lay.tok_row) * head
        setup += first + check
        corr += first + check
        present = list(range(c.n))
        for it in range(cfg.steps):
            active = [i for i in range(c.n) if s[i] >= it]
            if len(active) <= 0.6 * len(present):
                present = active
            fwd = 2 * int(rows[present].sum()) * cols * p_above + 2 * int(scored[present].sum()) * head
            est += 2 * fwd
            corr += fwd
            if not any(x > it for x in s) or it == cfg.steps - 1:
                break
            corr += fwd
    return {"optimize_py": est, "corrected": corr, "setup": setup}


def counted(fn) -> tuple[Any, float]:
    """``(fn(), matmul FLOPs torch's FlopCounterMode counted)``."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, float(counter.get_total_flops())


def flop_check(model, adapter: ArchitectureAdapter, tok, reqs: list[EditRequest], templates: list[str], layer: int,
               pad: int, steps: int = 4) -> dict[str, Any]:
    """optimize.py's FLOP estimate and a corrected formula vs FlopCounterMode, and the FLOPs per request of the
    one-by-one loop, all with ``steps`` evaluations and no early stop."""
    cfg = AnchorConfig(steps=steps, early_stop=0.0, kl_position="last")  # run_flops counts the one-band layout
    prep = TokenBatch(tok, reqs, templates, len(reqs))
    a, n_batched = counted(lambda: optimize_anchors(model, adapter, prep.chunks, layer, cfg, pad))
    prep1 = TokenBatch(tok, reqs[:1], templates, 1)
    _, n_one = counted(lambda: compute_z_one(model, adapter, prep1.chunks[0], layer, cfg, pad))
    _, n_one_single = counted(lambda: compute_z_one(model, adapter, prep1.chunks[0], layer, cfg, pad, False))
    corrected = run_flops(adapter, prep, layer, cfg, pad, a.steps.int().tolist())["corrected"]
    return {"requests": len(reqs), "evaluations": steps, "optimize_py_estimate_gflop": a.flops / 1e9,
            "corrected_formula_gflop": corrected / 1e9, "flopcounter_gflop": n_batched / 1e9,
            "estimate_over_counted": a.flops / n_batched, "corrected_over_counted": corrected / n_batched,
            "batched_gflop_per_request": n_batched / len(reqs) / 1e9,
            "one_by_one_gflop_per_request": n_one / 1e9,
            "one_by_one_single_head_gflop_per_request": n_one_single / 1e9,
            "note": "FlopCounterMode counts aten.mm (linear layers, LM head); CPU SDPA attention is not counted "
                    "(<1% at these lengths). Per-request numbers depend on padding: the one-by-one figure is for "
                    "request 0 alone, the batched one for these requests padded together."}


def profile_run(fn, d_ff: int | None = None) -> dict[str, Any]:
    """torch.profiler over ``fn()``: self CPU time per op, grouped into categories (LM-head matmuls apart)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    groups = {
        "matmul (mm/addmm/bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkl_linear"),
        "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
        "log_softmax / softmax": ("aten::_log_softmax", "aten::_softmax"),
        "index / gather / index_put": ("aten::index", "aten::index_put", "aten::_index_put", "aten::gather",
                                       "aten::index_add", "aten::scatter", "aten::index_select",
                                       "aten::embedding"),
        "copy / cat / clone": ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone"),
    }
    totals: dict[str, float] = defaultdict(float)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events:
        cat = next((g for g, names in groups.items() if e.key.startswith(names)), "elementwise / other")
        if cat.startswith("matmul") and "49152" in str(e.input_shapes):
            cat = "matmul: LM head (vocab 49152)"
        elif cat.startswith("matmul") and d_ff is not None and str(d_ff) in str(e.input_shapes):
            cat = "matmul: MLP"
        elif cat.startswith("matmul"):
            cat = "matmul: blocks" if d_ff is None else "matmul: attention projections"
        totals[cat] += e.self_cpu_time_total
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_op[e.key][0] += e.self_cpu_time_total
        by_op[e.key][1] += e.count
    top = [{"op": k, "self_s": round(v[0] / 1e6, 3), "calls": v[1], "share": round(v[0] / total, 3)}
           for k, v in sorted(by_op.items(), key=lambda x: -x[1][0])[:12]]
    return {"wall_s": wall, "self_cpu_s": total / 1e6,
            "by_category": {k: {"s": round(v / 1e6, 3), "share": round(v / total, 3)}
                            for k, v in sorted(totals.items(), key=lambda x: -x[1])},
            "top_ops": top}


# -- end to end -------------------------------------------------------------------------------------------
def run_edit(model, tok, reqs: list[EditRequest], targets: str, layers: list[int], spec: StatsSpec,
             cfg: AnchorConfig, p_before: tuple[list[float], list[float]]) -> tuple[dict[str, Any], Anchors]:
    """One MEMIT edit of all requests in one batch: timings, efficacy; undone afterwards."""
    prompts = [r.filled for r in reqs]
    editor = Editor(model, tok, method="memit", targets=targets, layers=layers, stats=spec, anchor=cfg)
    with Meter() as meter:
        edit = editor.apply(reqs)
    p_new = target_probs(model, tok, prompts, [r.target_new for r in reqs])
    p_true = target_probs(model, tok, prompts, [r.target_true or "" for r in reqs])
    edit.undo()
    n = len(reqs)
    return {"edit_layers": edit.record["edit_layers"], "wall_s": meter.wall, "cpu_utilisation": meter.utilisation,
            "timings": {k: round(v, 3) for k, v in edit.record["timings"].items()},
            "anchors": edit.record["anchors"],
            "efficacy": sum(a > b for a, b in zip(p_new, p_true)) / n,
            "efficacy_before": sum(a > b for a, b in zip(*p_before)) / n,
            "mean_p_new": sum(p_new) / n, "mean_p_new_before": sum(p_before[0]) / n}, edit.targets.anchors[0]


# -- main -------------------------------------------------------------------------------------------------
ANCHOR_SPEED_RUNS = {  # name -> AnchorConfig overrides (on the editor's defaults for a multi-layer method)
    "old": {"kl_position": "last", "stop_on": "nll", "chunk_order": "request", "batch_size": 32},
    "new": {"batch_size": 32},
    "new_chunk64": {"batch_size": 64},
    "reference_maths_request_order": {"chunk_order": "request", "batch_size": 32},
    "new_chunk128": {"batch_size": 128},
}


def suffix_padding(prep: TokenBatch, pad: int, kl_position: str) -> dict[str, float]:
    """Replayed suffix cells per evaluation (all rows present) and the share of them that is padding."""
    from kedit.optimize import anchor_bands

    cells = real = 0
    for c in prep.chunks:
        for lay in anchor_bands(c, pad, kl_position):
            suf = lay.mask[:, lay.P:]
            cells += suf.numel()
            real += int(suf.sum())
    return {"suffix_cells": cells, "padding_share": round(1 - real / cells, 3)}


def anchor_speed(args: argparse.Namespace) -> int:
    """Old vs reference anchor settings, same process, same requests (issue 11)."""
    t_start = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    layer = layers[-1]
    cmd = "flock /tmp/kedit-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python bench/edit.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {"command": cmd, "machine": machine(), "layer": layer, "n": args.n, "runs": {}}
    model, tok = load_model("smollm2-135m")
    reqs = load_requests(args.n)
    editor = Editor(model, tok, "memit", layers=layers, stats={})
    templates, pad = editor.templates, pad_id(tok)
    result["templates"] = len(templates)
    names = args.runs.split(",") if args.runs else list(ANCHOR_SPEED_RUNS)
    anchors: dict[str, Anchors] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile_steps:  # first: a short, always-finished look at where a step's time goes
        cfg = dataclasses.replace(editor.anchor_cfg, steps=args.profile_steps, early_stop=0.0)
        prep = TokenBatch(tok, reqs, templates, cfg.batch_size, cfg.chunk_order)
        result["profile_new_first_chunk"] = {"steps": args.profile_steps, **profile_run(
            lambda: optimize_anchors(model, editor.adapter, prep.chunks[:1], layer, cfg, pad), editor.adapter.d_ff)}
        print(f"profile: {result['profile_new_first_chunk']['by_category']}", flush=True)
    for name in names:
        cfg = dataclasses.replace(editor.anchor_cfg, steps=args.steps, **ANCHOR_SPEED_RUNS[name])
        prep = TokenBatch(tok, reqs, templates, cfg.batch_size, cfg.chunk_order)
        cpu0, t0 = time.process_time(), time.perf_counter()
        a = optimize_anchors(model, editor.adapter, prep.chunks, layer, cfg, pad)
        wall = time.perf_counter() - t0
        anchors[name] = a
        result["runs"][name] = {
            "config": dataclasses.asdict(cfg), "seconds": round(wall, 2),
            "seconds_per_request": round(wall / len(reqs), 3), "cpu_utilisation": round(
                (time.process_time() - cpu0) / wall / max(1, torch.get_num_threads()), 2),
            "steps_mean": a.steps.float().mean().item(), "nll_start_mean": a.nll_start.mean().item(),
            "nll_end_mean": a.nll_end.mean().item(), "gflops": round(a.flops / 1e9, 1), "replay": a.extra["replay"],
            "setup_seconds": round(a.extra["setup_seconds"], 2),
            "loadavg_after": os.getloadavg(), **suffix_padding(prep, pad, cfg.kl_position)}
        print(f"{name:32s} {wall / len(reqs):6.2f} s/request  steps {a.steps.float().mean():5.2f}  "
              f"nll_end {a.nll_end.mean():.3f}  load {os.getloadavg()[0]:.1f}", flush=True)
        _anchor_speed_summary(result, anchors, t_start, args.out)  # after every run: a partial run still reports
    return 0


def _anchor_speed_summary(result: dict[str, Any], anchors: dict[str, Anchors], t_start: float, out: Path) -> None:
    if "old" in anchors and "new" in anchors:
        o, n = result["runs"]["old"], result["runs"]["new"]
        result["speedup_new_vs_old"] = round(o["seconds"] / n["seconds"], 2)
        best = min((r for r in result["runs"].values()), key=lambda r: r["seconds"])
        result["speedup_best_vs_old"] = round(o["seconds"] / best["seconds"], 2)
    if "new" in anchors:  # same maths, other chunking: rounding-level differences only
        ref = anchors["new"].z
        result["max_rel_dz_vs_new"] = {k: ((a.z - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
                                       for k, a in anchors.items() if k != "old"}
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result["machine"]["loadavg_end"] = os.getloadavg()
    save_json(out, result)
    print(f"wrote {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="CounterFact requests")
    ap.add_argument("--layers", default="4,5,6,7,8", help="MEMIT layers; the comparison uses the last as anchor")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--baseline-n", type=int, default=8, help="requests timed in the one-by-one loop")
    ap.add_argument("--baseline-memit-n", type=int, default=4,
                    help="requests timed in the one-by-one loop with MEMIT's second LM head (0: skip)")
    ap.add_argument("--bf16-n", type=int, default=8, help="requests in the bf16-autocast run (0: skip)")
    ap.add_argument("--flop-check-n", type=int, default=2, help="requests in the FlopCounterMode run (0: skip)")
    ap.add_argument("--profile-steps", type=int, default=3, help="evaluations profiled (0: skip)")
    ap.add_argument("--stats-tokens", type=int, default=40_000)
    ap.add_argument("--steps", type=int, default=AnchorConfig().steps, help="anchor optimisation steps")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/edit.json (anchor_speed.json)")
    ap.add_argument("--anchor-speed", action="store_true", help="only old vs reference anchor settings (issue 11)")
    ap.add_argument("--runs", default="", help=f"--anchor-speed runs, comma-separated (default: all of "
                    f"{','.join(ANCHOR_SPEED_RUNS)})")
    args = ap.parse_args()
    if args.anchor_speed:
        args.out = args.out or RESULTS / "anchor_speed.json"
        return anchor_speed(args)
    args.out = args.out or RESULTS / "edit.json"
    require_data(COUNTERFACT, CORPUS)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    layer = layers[-1]

    result: dict[str, Any] = {"command": "flock /tmp/kedit-heavy.lock .venv/bin/python bench/edit.py "
                              + " ".join(sys.argv[1:]), "machine": machine()}
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)", flush=True)
    peak_start = matmul_peak()

    model, tok = load_model("smollm2-135m")
    adapter = ArchitectureAdapter.from_model(model)
    pad = pad_id(tok)
    reqs = load_requests(args.n)
    templates = Editor(model, tok).templates
    # lr 0.5 (< 2e9 params), MEMIT clamp 0.75; run_flops counts the one-band layout (KL rows at full width)
    cfg = AnchorConfig(batch_size=args.batch_size, steps=args.steps, kl_position="last")
    prep = TokenBatch(tok, reqs, templates, cfg.batch_size)
    result["setup"] = {"model": "smollm2-135m", "n_layers": adapter.n_layers, "requests": len(reqs),
                       "data": "first records of shared/data/counterfact_subset500.json",
                       "templates": templates, "anchor_layer": layer, "anchor_config": dataclasses.asdict(cfg),
                       "tokens_per_evaluation": token_stats(prep, pad)}

    # statistics (cached after their first computation) and probabilities before editing
    spec = StatsSpec(corpus=str(CORPUS), tokens=args.stats_tokens)
    info: dict[int, StatsInfo] = {}
    t0 = time.perf_counter()
    second_moments(model, tok, layers, spec, progress=False, info=info)
    stats_now = time.perf_counter() - t0
    prompts = [r.filled for r in reqs]
    p_before = (target_probs(model, tok, prompts, [r.target_new for r in reqs]),
                target_probs(model, tok, prompts, [r.target_true or "" for r in reqs]))

    # 3 + 1a. MEMIT backward: its anchors (layer L, every request, batched) are the batched measurement
    runs: dict[str, Any] = {}
    runs["backward"], a = run_edit(model, tok, reqs, "backward", layers, spec, cfg, p_before)
    n, steps_a = a.z.shape[0], a.steps.int().tolist()
    print(f"batched fp32 (MEMIT backward's anchors): {a.seconds:.1f} s for {n} requests "
          f"({a.seconds / n:.2f} s/request), steps mean {a.steps.float().mean():.1f}, replay {a.extra['replay']}",
          flush=True)

    # 1b. one by one: compute_z with one LM head over every position, and as MEMIT with two
    prep1 = TokenBatch(tok, reqs[: max(args.baseline_n, args.baseline_memit_n)], templates, 1)
    b = one_by_one(model, adapter, prep1, layer, cfg, pad, args.baseline_n, double_head=False)
    agree = compare(a.z[: args.baseline_n], b["z"])
    speedup = b["seconds_per_request"] / (a.seconds / n)
    print(f"one-by-one (compute_z): {b['seconds']:.1f} s for {args.baseline_n} requests "
          f"({b['seconds_per_request']:.2f} s/request); speedup {speedup:.2f}x; "
          f"anchors max rel diff {agree['max_rel_norm_diff']:.2e}", flush=True)
    bo: dict[str, Any] = {
        "layer": layer,
        "batched": {"requests": n, "batch_size": cfg.batch_size, "seconds": a.seconds,
                    "seconds_per_request": a.seconds / n, "cpu_utilisation": runs["backward"]["cpu_utilisation"],
                    "steps_mean": a.steps.float().mean().item(), "nll_start_mean": a.nll_start.mean().item(),
                    "nll_end_mean": a.nll_end.mean().item(), "replay": a.extra["replay"],
                    "source": "edit.targets.anchors[0] of the end-to-end MEMIT backward run (optimize_anchors over "
                              "the Editor's chunks)",
                    "shrink_schedule": shrink_schedule(steps_a, cfg.batch_size, cfg.steps)},
        "one_by_one": {**{k: v for k, v in b.items() if k != "z"}, "requests_timed": args.baseline_n,
                       "extrapolated_seconds_all": b["seconds_per_request"] * n,
                       "note": f"compute_z re-implementation, one LM head over every position, timed on the first "
                               f"{args.baseline_n} requests; the total is extrapolated per request"},
        "speedup_per_request": speedup,
        "agreement": {**agree, "steps_batched": steps_a[: args.baseline_n], "steps_one_by_one": b["steps"],
                      "nll_end_batched": a.nll_end[: args.baseline_n].tolist()},
    }
    if args.baseline_memit_n:
        bm = one_by_one(model, adapter, prep1, layer, cfg, pad, args.baseline_memit_n, double_head=True)
        bo["one_by_one_memit"] = {
            **{k: v for k, v in bm.items() if k != "z"}, "requests_timed": args.baseline_memit_n,
            "speedup_per_request": bm["seconds_per_request"] / (a.seconds / n),
            "agreement": compare(a.z[: args.baseline_memit_n], bm["z"]),
            "note": "as memit/compute_z.py: the NLL comes from a second ln_f(h_last) @ W_U over every position"}
        print(f"one-by-one as MEMIT (two LM heads): {bm['seconds_per_request']:.2f} s/request", flush=True)
    result["batched_vs_one_by_one"] = bo

    # 3. MEMIT forward and onelayer
    for name in ("forward", "onelayer"):
        runs[name], _ = run_edit(model, tok, reqs, name, layers, spec, cfg, p_before)
        print(f"MEMIT {name}: {runs[name]['timings']['total']:.1f} s", flush=True)
    result["end_to_end"] = {
        "layers": layers,
        "stats": {"corpus": "wikitext-2-raw/wiki.test.raw", "tokens": args.stats_tokens, "seconds_now": stats_now,
                  "cached": all(i.cached for i in info.values()),
                  "seconds_when_computed": max(i.seconds for i in info.values()),
                  "note": "timings['stats'] of the runs are loads of these (cached) matrices"},
        "runs": runs}

    # 2. FLOP/s: fp32 (the batched run), bf16 autocast, the FLOP estimate checked, profiles
    peak_end = matmul_peak()
    peak = {k: {"start": peak_start[k], "end": peak_end[k],
                "peak_gflops": max(peak_start[k]["peak_gflops"], peak_end[k]["peak_gflops"])} for k in peak_start}
    result["matmul_peak"] = peak
    g32 = a.flops / a.seconds / 1e9
    rf = run_flops(adapter, prep, layer, cfg, pad, steps_a)
    gc = rf["corrected"] / a.seconds / 1e9
    result["flops"] = {"fp32": {
        "gflop_optimize_py": a.flops / 1e9, "gflop_optimize_py_replayed": rf["optimize_py"] / 1e9,
        "gflop_corrected": rf["corrected"] / 1e9, "gflop_setup": rf["setup"] / 1e9, "seconds": a.seconds,
        "gflops_per_s_optimize_py_estimate": g32, "gflops_per_s_corrected": gc,
        "fraction_of_fp32_peak_optimize_py_estimate": g32 / peak["fp32"]["peak_gflops"],
        "fraction_of_fp32_peak": gc / peak["fp32"]["peak_gflops"]}}
    if args.bf16_n:
        cfg16 = dataclasses.replace(cfg, autocast_bf16=True)
        prep16 = TokenBatch(tok, reqs[: args.bf16_n], templates, cfg16.batch_size)
        with Meter() as m16:
            a16 = optimize_anchors(model, adapter, prep16.chunks, layer, cfg16, pad)
        with Meter() as m32:
            a32 = optimize_anchors(model, adapter, prep16.chunks, layer, cfg, pad)
        f16 = run_flops(adapter, prep16, layer, cfg16, pad, a16.steps.int().tolist())["corrected"]
        f32 = run_flops(adapter, prep16, layer, cfg, pad, a32.steps.int().tolist())["corrected"]
        g16, g32s = f16 / a16.seconds / 1e9, f32 / a32.seconds / 1e9
        result["flops"]["bf16_autocast"] = {
            "requests": args.bf16_n, "seconds": a16.seconds, "fp32_seconds_same_requests": a32.seconds,
            "gflops_per_s_corrected": g16, "fp32_gflops_per_s_corrected_same_requests": g32s,
            "fraction_of_bf16_peak": g16 / peak["bf16"]["peak_gflops"],
            "fraction_of_fp32_peak": g16 / peak["fp32"]["peak_gflops"],
            "cpu_utilisation": m16.utilisation, "fp32_cpu_utilisation": m32.utilisation,
            "steps_mean": a16.steps.float().mean().item(), "fp32_steps_mean": a32.steps.float().mean().item(),
            "anchors_vs_fp32": compare(a16.z, a32.z), "replay": a16.extra["replay"]}
        print(f"bf16 autocast: {a16.seconds:.1f} s for {args.bf16_n} requests vs fp32 {a32.seconds:.1f} s", flush=True)
    if args.flop_check_n:
        fc = flop_check(model, adapter, tok, reqs[: args.flop_check_n], templates, layer, pad)
        result["flops"]["estimate_check"] = fc
        print(f"FLOP estimate / counted {fc['estimate_over_counted']:.3f}, corrected / counted "
              f"{fc['corrected_over_counted']:.3f}", flush=True)
    if args.profile_steps:
        cfgp = dataclasses.replace(cfg, steps=args.profile_steps, early_stop=0.0)
        one = prep1.chunks[0]
        result["profile"] = {
            "evaluations": args.profile_steps,
            "batched_one_chunk": {"requests": prep.chunks[0].n, **profile_run(
                lambda: optimize_anchors(model, adapter, prep.chunks[:1], layer, cfgp, pad))},
            "one_by_one_request0": profile_run(lambda: compute_z_one(model, adapter, one, layer, cfgp, pad, False)),
            "one_by_one_memit_request0": profile_run(
                lambda: compute_z_one(model, adapter, one, layer, cfgp, pad, True)),
        }
        for name in ("batched_one_chunk", "one_by_one_request0", "one_by_one_memit_request0"):
            pr = result["profile"][name]
            print(f"  profile {name}: wall {pr['wall_s']:.2f} s; " + ", ".join(
                f"{cat} {100 * v['share']:.0f}%" for cat, v in pr["by_category"].items()), flush=True)

    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - t_start
    save_json(args.out, result)
    print_table(result)
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")
    return 0


def print_table(r: dict[str, Any]) -> None:
    """Readable summary of a result dict."""
    bo, fl, pk = r["batched_vs_one_by_one"], r["flops"], r["matmul_peak"]
    print(f"\n== anchors at layer {bo['layer']}, {bo['batched']['requests']} CounterFact requests, SmolLM2-135M ==")
    print(f"{'variant':34s} {'s/request':>10s} {'steps':>6s}")
    print(f"{'batched fp32 (optimize_anchors)':34s} {bo['batched']['seconds_per_request']:10.2f} "
          f"{bo['batched']['steps_mean']:6.1f}")
    for key, label in (("one_by_one", "one-by-one (compute_z)"), ("one_by_one_memit", "as MEMIT (2 LM heads)")):
        if key in bo:
            o = bo[key]
            print(f"{label + ', ' + str(o['requests_timed']) + ' timed':34s} "
                  f"{o['seconds_per_request']:10.2f} {sum(o['steps']) / len(o['steps']):6.1f}")
    print(f"speedup {bo['speedup_per_request']:.2f}x vs one LM head"
          + (f", {bo['one_by_one_memit']['speedup_per_request']:.2f}x vs MEMIT" if "one_by_one_memit" in bo else "")
          + f"; anchors max rel diff {bo['agreement']['max_rel_norm_diff']:.1e}")
    print(f"matmul peak fp32 {pk['fp32']['peak_gflops']:.0f}, bf16 {pk['bf16']['peak_gflops']:.0f} GFLOP/s")
    f32 = fl["fp32"]
    print(f"fp32 optimisation: {f32['gflops_per_s_corrected']:.0f} GFLOP/s ({f32['fraction_of_fp32_peak']:.2f} of "
          f"peak; optimize.py's estimate gives {f32['gflops_per_s_optimize_py_estimate']:.0f})")
    if "bf16_autocast" in fl:
        f = fl["bf16_autocast"]
        print(f"bf16 autocast ({f['requests']} requests): {f['gflops_per_s_corrected']:.0f} GFLOP/s, "
              f"{f['fraction_of_bf16_peak']:.2f} of bf16 peak; {f['seconds']:.1f} s vs fp32 "
              f"{f['fp32_seconds_same_requests']:.1f} s")
    if "end_to_end" in r:
        print(f"\n== MEMIT end to end, {bo['batched']['requests']} requests, layers {r['end_to_end']['layers']} ==")
        print(f"{'targets':10s} {'total':>7s} {'optimize':>9s} {'solve':>7s} {'stats':>7s} {'efficacy':>9s}")
        for name, run in r["end_to_end"]["runs"].items():
            t = run["timings"]
            print(f"{name:10s} {t['total']:7.1f} {t['optimize']:9.1f} {t['solve']:7.1f} {t['stats']:7.2f} "
                  f"{run['efficacy']:9.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
