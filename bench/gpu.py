"""Benchmark for one GPU: Llama-3-8B-shaped random model in bf16, every phase of a MEMIT edit timed and sized.

    python bench/gpu.py                            # on the GPU machine (H200): ~6-8 minutes
    python bench/gpu.py --device cpu --shape tiny  # the same code on a tiny model, for CI (seconds)

No files and no network are needed: the model is built directly on the device in bf16 from Llama-3-8B's
config (never fp32 on CPU), the tokenizer is a small BPE trained in memory (ids are a subset of the
model's 128256), requests are synthetic. Phases, each with seconds and the peak device memory
(``torch.cuda.max_memory_allocated``, reset per phase; peak RSS on CPU):
- build; plain bf16 forward up to the deepest edited layer vs kedit's statistics pass (tokens/s, ratio);
- anchor optimisation seconds per request at batch 1 / 32 / 256 (fixed steps, no early stop);
- MEMIT and AlphaEdit closed-form solves per layer with n keys, on the device (and MEMIT on CPU);
- end to end: Editor.apply on ``--e2e`` requests (layers 4-8, forward targets), extrapolated to 1,000
  and 2,000 requests (anchors and keys scale with n, solves do not);
- one edit with the upper layers dispatched to the CPU by accelerate (``device_map``).
Every phase is guarded: an error is recorded and the next phase runs; the JSON is rewritten after each
phase ($OUT/gpu.json when $OUT is set, else bench/results/gpu.json, or --out), so a timeout keeps results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # the repo's kedit, wherever the tree was copied
from kedit.io import write_json  # noqa: E402  (atomic: a killed run keeps the last saved phases)

# Llama-3-8B's published config; "tiny" keeps the family and the head layout at toy size
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
}
# per shape: stats tokens, anchor batch sizes, anchor steps, solve keys, e2e requests, dispatched requests
BUDGET = {"llama3-8b": dict(stats_tokens=65536, anchor_batches=(1, 32, 256), steps=5, solve_n=2000, e2e=200,
                            e2e_steps=25, dispatch_n=8, cpu_layers=4),
          "tiny": dict(stats_tokens=2048, anchor_batches=(1, 4), steps=2, solve_n=64, e2e=4, e2e_steps=3,
                       dispatch_n=2, cpu_layers=4)}
CORPUS = ("The capital of France is Paris. The mother tongue of Danielle Darrieux is French. Michael Jordan "
          "plays basketball. Toyota is a company from Japan. Berlin is the capital of Germany. The violin is a "
          "string instrument. Rivers flow into the sea. ") * 8
TEMPLATES = ["{}", "The first thing I noticed was. {}", "Therefore, the result is. {}",
             "Because of this, we. {}", "I have been there. {}", "You can see that. {}"]


def tiny_tokenizer():
    """A byte-level BPE trained in memory (no files), with an eos/pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    tok.padding_side = "right"
    return tok


def requests(n: int):
    """``n`` distinct synthetic requests (subjects made of letters the tokenizer knows)."""
    from kedit.requests import EditRequest

    letters = "abcdefghijklmnopqrstuvwxyz"
    subj = [f"{letters[i % 26].upper()}{letters[(i // 26) % 26]}{letters[(i // 676) % 26]}ton" for i in range(n)]
    return [EditRequest("The capital of {} is", s, ["Berlin", "Paris", "Tokyo", "Rome"][i % 4]) for i, s in
            enumerate(subj)]


class Bench:
    """Runs phases with timing and peak memory; writes the JSON after each one."""

    def __init__(self, device: str, out: Path, budget_s: float):
        self.device, self.out, self.budget_s = torch.device(device), out, budget_s
        self.t_start = time.perf_counter()
        self.result: dict = {"phases": {}, "errors": {}}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated() / 2**30, 3)
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # process peak (KiB -> GiB)

    def phase(self, name: str, fn) -> None:
        left = self.budget_s - (time.perf_counter() - self.t_start)
        if left < 0:
            self.result["errors"][name] = "skipped: time budget spent"
            self.save()
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
            self.sync()
            self.result["phases"][name] = {"seconds": round(time.perf_counter() - t0, 3),
                                           "peak_memory_gb": self.peak_gb(), **extra}
        except Exception as e:  # keep going: one failed phase must not cost the whole (scarce) GPU run
            self.result["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"[gpu] {name}: {self.result['phases'].get(name) or self.result['errors'].get(name)}", flush=True)
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        write_json(self.out, self.result, indent=1, default=str)


def describe_device(device: torch.device) -> dict:
    import transformers

    out = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later phases are skipped past it")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: error: CUDA is not available (use --device cpu --shape tiny to test)", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else
                       HERE / "results" / "gpu.json")
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from kedit.arch import ArchitectureAdapter
    from kedit.batch import TokenBatch
    from kedit.editor import Editor, default_layers
    from kedit.hooks import Trace
    from kedit.optimize import AnchorConfig, optimize_anchors
    from kedit.solvers import LayerProblem, make_solver
    from kedit.stats import StatsSpec, accumulate

    hf_logging.set_verbosity_error()
    bench = Bench(args.device, out, args.budget)
    dev, B = bench.device, BUDGET[args.shape]
    cfg = LlamaConfig(**SHAPES[args.shape])
    bench.result.update(machine=describe_device(dev), shape=args.shape, config=SHAPES[args.shape], budget=B,
                        goals={"2000_requests_s": 600, "peak_gpu_gb_2000": 40, "stats_vs_forward": 0.5})
    tok = tiny_tokenizer()
    layers = default_layers(cfg.num_hidden_layers, True)
    bench.result["layers"] = layers
    s: dict = {}

    def build():
        torch.manual_seed(0)
        with dev:  # weights are created on the device, in bf16: no fp32 host copy of 8B parameters
            s["model"] = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
        s["model"].kedit_name, s["model"].kedit_revision = f"random-{args.shape}", "seed0"
        s["adapter"] = ArchitectureAdapter.from_model(s["model"])
        return {"params_b": round(sum(p.numel() for p in s["model"].parameters()) / 1e9, 3)}

    bench.phase("build", build)
    if "model" not in s:
        return 1
    model, adapter = s["model"], s["adapter"]
    bt = StatsSpec().batch_tokens
    g = torch.Generator().manual_seed(0)
    width = 256
    rows = B["stats_tokens"] // width
    ids = torch.randint(0, cfg.vocab_size, (rows, width), generator=g)
    step = bt // width

    def batches():
        return [(ids[i:i + step], torch.ones_like(ids[i:i + step])) for i in range(0, rows, step)]

    @torch.inference_mode()
    def plain_forward():
        t0 = time.perf_counter()
        with Trace(adapter) as tr:  # the same truncation as the statistics pass, nothing captured
            tr.stop_after(max(layers))
            for x, _ in batches():
                tr.run(input_ids=x.to(dev))
        bench.sync()
        s["fwd_tps"] = rows * width / (time.perf_counter() - t0)
        return {"tokens_per_s": round(s["fwd_tps"])}

    def stats():
        t0 = time.perf_counter()
        sums, n = accumulate(adapter, layers, batches(), progress=False)
        bench.sync()
        tps = n / (time.perf_counter() - t0)
        f = adapter.d_ff
        s["C"] = {la: (sm / n).cpu() + 1e-3 * torch.eye(f, dtype=torch.float64) for la, sm in sums.items()}
        return {"tokens_per_s": round(tps), "vs_plain_forward": round(tps / s["fwd_tps"], 3) if "fwd_tps" in s
                else None, "accumulator_device": str(next(iter(sums.values())).device)}

    bench.phase("plain_forward_warmup", lambda: (plain_forward(), None)[1])
    bench.phase("plain_forward", plain_forward)
    bench.phase("stats", stats)

    pad = tok.pad_token_id
    for b in B["anchor_batches"]:
        def anchors(b=b):
            prep = TokenBatch(tok, requests(b), TEMPLATES, b)
            cfg_a = AnchorConfig(steps=B["steps"], early_stop=0.0, batch_size=b)
            t0 = time.perf_counter()
            optimize_anchors(model, adapter, prep.chunks, layers[0], cfg_a, pad)
            bench.sync()
            dt = time.perf_counter() - t0
            return {"requests": b, "steps": B["steps"], "s_per_request": round(dt / b, 4),
                    "s_per_request_25_steps": round(dt / b * 25 / B["steps"], 4)}
        bench.phase(f"anchors_batch{b}", anchors)

    d, f, n = adapter.d_model, adapter.d_ff, B["solve_n"]

    def solve(method: str, where: torch.device):
        def run():
            gen = torch.Generator().manual_seed(1)
            C = s["C"][layers[0]] if "C" in s else torch.eye(f, dtype=torch.float64)
            prob = LayerProblem(layers[0], K=torch.randn(f, n, generator=gen, dtype=torch.float64).to(where),
                                R=torch.randn(d, n, generator=gen, dtype=torch.float64).to(where), C=C.to(where),
                                W=adapter.w_out_weight(layers[0]).detach().to(where))
            solver = make_solver(method)
            t0 = time.perf_counter()
            delta = solver.solve(prob)
            bench.sync()
            first = time.perf_counter() - t0
            out = {"n": n, "f": f, "s_per_layer": round(first, 3), "delta_device": str(delta.U.device
                   if delta.U is not None else delta.dense_.device)}
            if method == "alphaedit":  # the projector is cached per layer: a second solve is the steady state
                t0 = time.perf_counter()
                solver.solve(prob)
                bench.sync()
                out["s_per_layer_cached_projector"] = round(time.perf_counter() - t0, 3)
            return out
        return run

    bench.phase("solve_memit", solve("memit", dev))
    bench.phase("solve_alphaedit", solve("alphaedit", dev))
    if dev.type == "cuda":
        bench.phase("solve_memit_cpu", solve("memit", torch.device("cpu")))

    def e2e():
        reqs = requests(B["e2e"])
        editor = Editor(model, tok, layers=layers, stats=s.get("C") or {la: torch.eye(f, dtype=torch.float64)
                                                                        for la in layers},
                        anchor={"steps": B["e2e_steps"], "early_stop": 0.0}, diagnostics=False)
        editor._templates = list(TEMPLATES)  # no sampling from a random model
        t0 = time.perf_counter()
        edit = editor.apply(reqs)
        bench.sync()
        total = time.perf_counter() - t0
        tm = edit.record["timings"]
        edit.undo()
        # solves (per layer, n-independent up to the K K^T product) are counted once, the rest scales with n
        fixed = len(layers) * bench.result["phases"].get("solve_memit", {}).get("s_per_layer", 0.0)
        scale = lambda m: round(fixed + (total - fixed) * m / len(reqs), 1)  # noqa: E731
        return {"requests": len(reqs), "steps": B["e2e_steps"], "seconds": round(total, 2),
                "timings": {k: round(v, 2) for k, v in tm.items()}, "s_per_request": round(total / len(reqs), 4),
                "extrapolated_1000_s": scale(1000), "extrapolated_2000_s": scale(2000)}

    bench.phase("edit_end_to_end", e2e)

    def dispatched():
        from accelerate import dispatch_model

        L = cfg.num_hidden_layers
        cut = L - B["cpu_layers"]
        main_dev = 0 if dev.type == "cuda" else "cpu"
        dmap = {"model.embed_tokens": main_dev, "model.rotary_emb": main_dev, "model.norm": main_dev,
                "lm_head": main_dev, **{f"model.layers.{i}": (main_dev if i < cut else "cpu") for i in range(L)}}
        m = dispatch_model(model, device_map=dmap)
        editor = Editor(m, tok, layers=layers, stats=s.get("C") or {la: torch.eye(f, dtype=torch.float64)
                                                                    for la in layers},
                        anchor={"steps": B["e2e_steps"], "early_stop": 0.0}, diagnostics=False)
        editor._templates = list(TEMPLATES)
        probe = tok(["The capital of Aaaton is"], return_tensors="pt")["input_ids"].to(dev)
        with torch.no_grad():
            before = m(input_ids=probe).logits.float()
        edit = editor.apply(requests(B["dispatch_n"]))
        with torch.no_grad():
            after = m(input_ids=probe).logits.float()
        edit.undo()
        with torch.no_grad():
            undone = m(input_ids=probe).logits.float()
        return {"cpu_layers": list(range(cut, L)), "requests": B["dispatch_n"],
                "timings": {k: round(v, 2) for k, v in edit.record["timings"].items()},
                "logits_changed": bool((after - before).abs().max() > 0),
                "undo_restores_logits": bool(torch.equal(undone, before))}

    bench.phase("device_map_gpu_cpu", dispatched)
    print(json.dumps({k: v for k, v in bench.result.items() if k in ("phases", "errors")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
