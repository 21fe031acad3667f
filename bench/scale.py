"""Benchmark: how each phase of an edit grows with model size (CPU), and which dominates at Llama-3-8B shape.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/scale.py [--only NAME] [--redo]

Random-init Llama-family models built from configs (no downloads; the SmolLM2 tokenizer from the embedded
model's cache, vocabulary 49152): the three sizes SmolLM2-135M, a 360M and a ~1B shape, plus three
SmolLM2 variants that change one of d, f, depth (so the fit can separate them). Each configuration runs in
its own subprocess (peak RSS is per configuration) and writes bench/results/scale/<name>-<dtype>.json;
existing files are skipped (resumable; --redo recomputes). Per phase (build, stats, anchors, keys, replay,
solve, apply) it records seconds and the peak RSS seen during the phase (sampled every 5 ms), through the
kedit API (kedit.stats.accumulate, Editor.apply with its internals timed by wrappers). Budgets are small
to fit ~15 CPU-minutes on a shared 2-core machine: figures are normalised (per 10k tokens, per request,
per layer). Then fits log(seconds) = a + x log d + y log f + z log depth per phase by least squares on the
fp32 runs and extrapolates a 1,000-request, 5-layer MEMIT edit to Llama-3-8B's shape.
Prints a table and writes bench/results/scale.json (machine described).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from common import machine, save_json  # bench/common.py (scripts run as bench/<name>.py)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
PARTS = HERE / "results" / "scale"
# (d, f, depth, heads, kv heads); head_dim 64 as SmolLM2/Llama
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "smol-depth15": (576, 1536, 15, 9, 3),
    "smol-f3072": (576, 3072, 30, 9, 3),
    "smol-d1152": (1152, 1536, 30, 18, 6),
    "llama-360m": (960, 2560, 32, 15, 5),
    "llama-1b": (2048, 8192, 16, 32, 8),
}
RUNS = [(s, "float32") for s in SHAPES] + [(s, "bfloat16") for s in ("smollm2-135m", "llama-360m", "llama-1b")]
TARGET = {"name": "llama3-8b", "d": 4096, "f": 14336, "depth": 32}
JOB = {"requests": 1000, "layers": 5, "steps": 25, "stats_tokens": 100_000}  # the extrapolated edit
SETTINGS = {"stats_tokens": 4096, "max_length": 256, "requests": 2, "steps": 3, "edited_layers": 2,
            "torch_threads": 1, "note": "budgets sized for ~15 CPU-minutes in total on a shared 2-core machine"}
TEMPLATES = ["{}", "The first thing I noticed was. {}", "Therefore, the result is. {}",
             "Because of this, we. {}", "I have been there. {}", "You can see that. {}"]  # 6, as kedit samples


class RssSampler:
    """Peak resident set size since the last ``reset``, sampled by a daemon thread every 5 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def reset(self) -> None:
        self.peak = self.rss()


class Phases:
    """Seconds, calls and peak RSS per phase name; ``measure`` nests (an outer phase keeps its own peak)."""

    def __init__(self) -> None:
        self.sampler = RssSampler()
        self.out: dict[str, dict] = {}

    @contextmanager
    def measure(self, name: str):
        outer_peak = self.sampler.peak
        self.sampler.reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            peak = max(self.sampler.peak, self.sampler.rss())
            e = self.out.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_rss_gb": 0.0})
            e["seconds"] += dt
            e["calls"] += 1
            e["peak_rss_gb"] = max(e["peak_rss_gb"], round(peak / 2**30, 3))
            self.sampler.peak = max(outer_peak, peak)


def child(name: str, dtype_name: str, out: Path) -> None:
    """One configuration, in its own process: build, stats, one edit; writes ``out``."""
    torch.set_num_threads(SETTINGS["torch_threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    import kedit.edit
    import kedit.editor
    from kedit.arch import ArchitectureAdapter
    from kedit.editor import Editor, default_layers
    from kedit.models import ensure_embedded
    from kedit.requests import EditRequest
    from kedit.stats import accumulate

    ph = Phases()
    d, f, depth, heads, kv = SHAPES[name]
    dtype = getattr(torch, dtype_name)
    tok = AutoTokenizer.from_pretrained(ensure_embedded("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=f, num_hidden_layers=depth,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    with ph.measure("build"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    model.kedit_name, model.kedit_revision = f"random-{name}", "seed0"
    adapter = ArchitectureAdapter.from_model(model)
    layers = default_layers(depth, True)[: SETTINGS["edited_layers"]]
    g = torch.Generator().manual_seed(0)
    rows = SETTINGS["stats_tokens"] // SETTINGS["max_length"]
    ids = torch.randint(0, len(tok), (rows, SETTINGS["max_length"]), generator=g)
    batch_rows = 4096 // SETTINGS["max_length"]  # StatsSpec.batch_tokens
    batches = [(ids[i:i + batch_rows], torch.ones_like(ids[i:i + batch_rows])) for i in range(0, rows, batch_rows)]
    with ph.measure("stats"):
        sums, n_tok = accumulate(adapter, layers, batches, progress=False)
    C = {layer: s / n_tok + 1e-3 * torch.eye(f, dtype=torch.float64) for layer, s in sums.items()}

    def timed(phase, fn):
        def wrapper(*a, **k):
            with ph.measure(phase):
                return fn(*a, **k)
        return wrapper

    class TimedSolver:  # solvers are frozen dataclasses: wrap instead of patching the instance
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

        def solve(self, p):
            with ph.measure("solve"):
                return self._inner.solve(p)

    kedit.editor.optimize_anchors = timed("anchors", kedit.editor.optimize_anchors)
    kedit.edit.Edit._write = timed("apply", kedit.edit.Edit._write)
    editor = Editor(model, tok, layers=layers, stats=C, diagnostics=False,
                    anchor={"steps": SETTINGS["steps"], "early_stop": 0.0})
    editor._templates = list(TEMPLATES)  # sampling text from a random model is not what is measured
    editor.solver = TimedSolver(editor.solver)
    editor._read = timed("keys", editor._read)
    editor._replay = timed("replay", editor._replay)
    reqs = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
            EditRequest("{} plays", "Michael Jordan", "the violin", "basketball")][: SETTINGS["requests"]]
    with ph.measure("edit_total"):
        edit = editor.apply(reqs)
    edit.undo()
    n_req, n_layers = len(reqs), len(layers)
    per = {
        "build_s": ph.out["build"]["seconds"],
        "stats_s_per_10k_tokens": ph.out["stats"]["seconds"] * 10_000 / n_tok,
        "anchors_s_per_request": ph.out["anchors"]["seconds"] / n_req,
        "keys_s_per_layer_request": ph.out["keys"]["seconds"] / n_layers / n_req,
        "solve_s_per_layer": ph.out["solve"]["seconds"] / n_layers,
        "apply_s_per_layer": ph.out["apply"]["seconds"] / n_layers,
    }
    result = {"shape": name, "dtype": dtype_name, "d": d, "f": f, "depth": depth, "vocab": len(tok),
              "params": sum(p.numel() for p in model.parameters()), "layers": layers, "stats_tokens": n_tok,
              "phases": ph.out, "normalised": per, "settings": SETTINGS}
    save_json(out, result)


def fit(runs: list[dict], metric: str) -> dict:
    """Least squares of log(metric) on [1, log d, log f, log depth] over ``runs``; exponents and the 8B value."""
    X = np.array([[1.0, np.log(r["d"]), np.log(r["f"]), np.log(r["depth"])] for r in runs])
    y = np.log(np.array([max(r["normalised"][metric], 1e-6) for r in runs]))
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    at = float(np.exp(coef @ [1.0, np.log(TARGET["d"]), np.log(TARGET["f"]), np.log(TARGET["depth"])]))
    return {"exp_d": round(float(coef[1]), 2), "exp_f": round(float(coef[2]), 2),
            "exp_depth": round(float(coef[3]), 2), "rms_log_residual": round(float(np.sqrt(np.mean(resid ** 2))), 3),
            "at_" + TARGET["name"]: at}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--only", default=None, help="run only this shape name")
    p.add_argument("--redo", action="store_true", help="recompute configurations already saved")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(SETTINGS["torch_threads"]),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    for shape, dtype in RUNS:
        out = PARTS / f"{shape}-{dtype}.json"
        if (args.only and shape != args.only) or (out.is_file() and not args.redo):
            continue
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", shape, dtype, str(out)], env=env,
                           capture_output=True, text=True, timeout=args.timeout)
        status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        print(f"{shape:>14} {dtype:<9} {time.perf_counter() - t0:6.1f}s {status}", file=sys.stderr, flush=True)
    runs = [json.loads(q.read_text()) for q in sorted(PARTS.glob("*.json"))]
    if not runs:
        return 1
    fp32 = [r for r in runs if r["dtype"] == "float32"]
    metrics = list(fp32[0]["normalised"]) if fp32 else []
    fits = {m: fit(fp32, m) for m in metrics} if len(fp32) >= 4 else {}
    key = "at_" + TARGET["name"]
    job = {}
    if fits:  # seconds of each phase of the extrapolated job at the target shape
        job = {"stats": fits["stats_s_per_10k_tokens"][key] * JOB["stats_tokens"] / 10_000,
               "anchors": fits["anchors_s_per_request"][key] * JOB["requests"] * JOB["steps"] / SETTINGS["steps"],
               "keys": fits["keys_s_per_layer_request"][key] * JOB["layers"] * JOB["requests"],
               "solve": fits["solve_s_per_layer"][key] * JOB["layers"],
               "apply": fits["apply_s_per_layer"][key] * JOB["layers"]}
    bf16 = {}
    for r in runs:
        if r["dtype"] == "bfloat16":
            base = next((q for q in fp32 if q["shape"] == r["shape"]), None)
            if base:
                bf16[r["shape"]] = {m: round(r["normalised"][m] / max(base["normalised"][m], 1e-9), 2)
                                    for m in r["normalised"]}
    summary = {"machine": machine(), "settings": SETTINGS, "target": TARGET, "job": JOB, "runs": runs, "fits": fits,
               "extrapolated_job_seconds": job, "dominant_phase": max(job, key=job.get) if job else None,
               "bf16_over_fp32": bf16,
               "notes": ["1 torch thread per configuration; other jobs shared the 2 cores (see loadavg_start)",
                         "anchors are timed with 2 requests x 3 steps; kedit batches 32 requests, so per-request "
                         "anchor time at scale is an upper bound",
                         "vocabulary 49152 (SmolLM2 tokenizer) in every shape, also in the 8B extrapolation; "
                         "Llama-3's 128256 makes the anchors' logits ~2.6x larger",
                         "stats stop after the deepest edited layer (2 layers edited here, 5 in the job)"]}
    save_json(RESULTS, summary)
    cols = ["build_s", "stats_s_per_10k_tokens", "anchors_s_per_request", "keys_s_per_layer_request",
            "solve_s_per_layer", "apply_s_per_layer"]
    print(f"{'shape':<14}{'dtype':<10}{'params':>8} " + " ".join(f"{c[:14]:>14}" for c in cols) + "  peakRSS GB")
    for r in runs:
        peak = max(v["peak_rss_gb"] for v in r["phases"].values())
        print(f"{r['shape']:<14}{r['dtype']:<10}{r['params'] / 1e6:7.0f}M " +
              " ".join(f"{r['normalised'][c]:14.4f}" for c in cols) + f"  {peak:.2f}")
    for m, ft in fits.items():
        print(f"fit {m:<26} d^{ft['exp_d']:<5} f^{ft['exp_f']:<5} depth^{ft['exp_depth']:<5} "
              f"-> {ft[key]:.4g} at {TARGET['name']} (rms log resid {ft['rms_log_residual']})")
    if job:
        print("extrapolated job at " + TARGET["name"] + ": " + ", ".join(f"{k} {v:.0f}s" for k, v in job.items())
              + f"; dominant: {summary['dominant_phase']}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
