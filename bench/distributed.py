"""Benchmark: data-parallel statistics and anchors on torch.distributed, 1 vs N processes (issue 14).

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/distributed.py [--nprocs 1,2] [--tokens 40000] [--requests 32]

For each N the script launches ``torchrun --standalone --nproc-per-node N bench/distributed.py --worker``
(one thread per process on CPU) and times, on SmolLM2-135M, barrier to barrier on rank 0:
- statistics: kedit.stats.second_moments over --tokens tokens of wikitext-2 (test split), layers 4-8,
  written to a fresh cache directory (the user's cache is bypassed, never touched);
- anchors: the Editor's anchor optimisation (MEMIT, forward replay: anchor layer 4) for --requests
  CounterFact records (requests split across ranks, anchors gathered in request order).
Speedup = T(1) / T(N), efficiency = speedup / N. It also checks that N processes reproduce the
one-process statistics (max relative difference) and anchors. The machine is shared with other jobs:
the load average is recorded before and after. Writes bench/results/distributed.json.

GPU node (nccl; one process per GPU): ``--device cuda --threads 0 --nprocs 1,8``; across nodes run the
worker line printed in the JSON under each node's torchrun with --nnodes/--node-rank/--rdzv-endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CORPUS, DATA, RESULTS, save_json  # bench/common.py (scripts run as bench/<name>.py)

COUNTERFACT = DATA / "counterfact_subset500.json"
OUT = RESULTS / "distributed.json"
LAYERS = [4, 5, 6, 7, 8]


def worker(args: argparse.Namespace) -> int:
    """One torchrun rank: time statistics and anchors between barriers; rank 0 saves times and outputs."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import kedit.stats as stats_mod
    from kedit import distributed
    from kedit.editor import Editor, _Prepared
    from kedit.eval import load_dataset
    from kedit.models import load_model

    scratch = Path(args.scratch)
    model, tok = load_model("smollm2-135m", device=args.device)
    distributed.active(args.device)
    # a fresh statistics cache per launch: every run computes, and the user's cache is left alone
    stats_mod.cache_path = lambda key: scratch / "stats" / f"L{key.layer:03d}-{key.digest()}.safetensors"
    spec = stats_mod.StatsSpec(corpus=str(CORPUS), tokens=args.tokens)
    requests = [c.request for c in load_dataset(f"counterfact:{COUNTERFACT}", n=args.requests).cases]
    editor = Editor(model, tok, method="memit", targets="forward", layers=LAYERS, stats={}, seed=0)
    prep = _Prepared(tok, requests, editor.templates, editor.anchor_cfg.batch_size)  # templates sampled now

    distributed.barrier("start")
    t0 = time.perf_counter()
    C = stats_mod.second_moments(model, tok, LAYERS, spec, progress=False)
    distributed.barrier("statistics")
    t1 = time.perf_counter()
    anchors = editor._session(prep, {}).optimize(LAYERS[0])  # the Editor's own (distributed) anchor step
    distributed.barrier("anchors")
    t2 = time.perf_counter()
    if distributed.is_main():
        torch.save({"C": C, "z": anchors.z.cpu(), "stats_s": t1 - t0, "anchors_s": t2 - t1,
                    "world": distributed.describe(), "threads": torch.get_num_threads(),
                    "replay": anchors.extra.get("replay")}, scratch / "out.pt")
    distributed.close()
    return 0


def launch(n: int, args: argparse.Namespace, scratch: Path) -> tuple[dict, list[str]]:
    """Run the worker under torchrun with ``n`` processes; rank 0's results and the launch line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(Path(__file__).resolve()), "--worker", "--scratch", str(scratch), "--device", args.device,
           "--threads", str(args.threads), "--tokens", str(args.tokens), "--requests", str(args.requests)]
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"[bench] {n} process(es): {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)
    return torch.load(scratch / "out.pt", weights_only=False), ["torchrun"] + cmd[3:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nprocs", default="1,2", help="process counts to compare; the first is the baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine  # bench/common.py

    info = machine()
    load_before = os.getloadavg()
    counts = [int(x) for x in args.nprocs.split(",")]
    runs, outputs = {}, {}
    t_all = time.perf_counter()
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="kedit-dist-") as tmp:
            out, line = launch(n, args, Path(tmp))
        outputs[n] = out
        runs[str(n)] = {"launch": " ".join(line), "stats_s": round(out["stats_s"], 2),
                        "anchors_s": round(out["anchors_s"], 2), "threads_per_process": out["threads"],
                        "backend": out["world"]["backend"], "anchor_replay": out["replay"]}
    base = counts[0]
    for n in counts[1:]:
        r, b = runs[str(n)], runs[str(base)]
        for part in ("stats", "anchors"):
            speedup = b[f"{part}_s"] / r[f"{part}_s"]
            r[f"{part}_speedup"] = round(speedup, 3)
            r[f"{part}_efficiency"] = round(speedup * base / n, 3)
        C0, C1 = outputs[base]["C"], outputs[n]["C"]
        r["stats_max_rel_diff_vs_baseline"] = max(((C1[la] - C0[la]).abs().max() / C0[la].abs().max()).item()
                                                  for la in C0)
        z0, z1 = outputs[base]["z"], outputs[n]["z"]
        r["anchors_max_rel_diff_vs_baseline"] = ((z1 - z0).norm(dim=-1) / z0.norm(dim=-1)).max().item()
    info["loadavg_end"] = os.getloadavg()
    result = {
        "benchmark": "data-parallel statistics and anchors, 1 vs N torchrun processes",
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": info,
        "loadavg_before": load_before, "loadavg_after": info["loadavg_end"],
        "note": "the machine's 2 cores are shared with other jobs (see the load averages): with load above "
                "the core count, N processes compete with them and the speedups understate a quiet machine",
        "config": {"model": "smollm2-135m", "layers": LAYERS, "tokens": args.tokens, "requests": args.requests,
                   "corpus": "shared/data/wikitext-2-raw/wiki.test.raw", "anchors": "memit/forward, anchor layer 4, "
                   "default AnchorConfig (25 steps, batch 32)", "device": args.device,
                   "timing": "rank 0, barrier to barrier; model loading and template sampling excluded"},
        "runs": runs,
        "gpu": {
            "measured": torch.cuda.is_available() and args.device == "cuda",
            "single_gpu_baseline": "python bench/distributed.py --device cuda --threads 0 --nprocs 1",
            "one_node_8_gpus": "python bench/distributed.py --device cuda --threads 0 --nprocs 1,8",
            "multi_node_worker": "torchrun --nnodes 2 --node-rank <0|1> --nproc-per-node 8 --rdzv-backend c10d "
                                 "--rdzv-endpoint <host0>:29500 bench/distributed.py --worker --scratch <shared dir> "
                                 "--device cuda --threads 0",
            "note": "no GPU was lent to this session: the H200 single-GPU baseline is still to be measured",
        },
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    save_json(args.out, result)
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
