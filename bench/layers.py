"""Benchmark: choosing the editing layer on SmolLM2-135M (issue 6) - LGA vs causal tracing vs brute force.

    flock /tmp/kedit-heavy.lock .venv/bin/python bench/layers.py [--proxy 20] [--test 100] [--minutes 50]

Per dataset (CounterFact subset, zsRE eval; ROME convention for zsRE: target = answers[0], LGA uses
the model's own answer as the "true" target): the first --proxy records choose a layer with every
strategy (brute force = every layer edited, scored and restored per request: golden layer and
sample-wise optima); the next --test records (disjoint) are then edited one at a time at each layer
chosen on that dataset and at the other dataset's golden layer (transfer), and scored with the harness's rank
score (mean of ES, PS, NS for CounterFact; efficacy / generalisation token accuracy and
specificity agreement for zsRE). Also times factored vs naive LGA on the same proxy set.

The work is split into steps saved to bench/results/layers.partial.json as they finish: a run stops
starting new steps after --minutes and the next run resumes (the heavy lock is shared). When all
steps are done it writes bench/results/layers.json, per-dataset figures, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import CORPUS, DATA, RESULTS, machine, require_data  # bench/common.py (scripts run as bench/<name>.py)

from kedit.arch import ArchitectureAdapter
from kedit.commands.layers import parse_candidates
from kedit.eval import load_dataset
from kedit.layers import LGA, BruteForce, CausalTrace
from kedit.layers.plot import plot_layers
from kedit.layers.search import score_windows
from kedit.models import load_model
from kedit.stats import StatsSpec, second_moments

DATASETS = {"counterfact": f"counterfact:{DATA / 'counterfact_subset500.json'}",
            "zsre": f"zsre:{DATA / 'zsre_mend_eval_portability_gpt4.json'}"}



def table(res: dict) -> str:
    """Markdown: per dataset and strategy, chosen layer, proxy gap, test scores, seconds."""
    kinds = list(res["choices"])
    rows = ["| proxy | strategy | layer | proxy score | gap to sample-wise opt. (proxy) | "
            + " | ".join(f"test {k}" for k in kinds) + " | seconds |", "|" + "---|" * (6 + len(kinds))]
    for src in kinds:
        brute = res["choices"][src].get("brute")
        by_start = dict(zip(brute["candidates"], brute["scores"], strict=True)) if brute else {}
        opt = brute["details"]["sample_wise_optimum"] if brute else None
        for name, ch in res["choices"][src].items():
            layer = ch["layers"][0]
            ps = by_start.get(layer)
            tests = [res["tests"].get(t, {}).get(str(layer)) for t in kinds]
            rows.append(f"| {src} | {name} | {layer} | {ps:.3f} | {opt - ps:.3f} | " if ps is not None else
                        f"| {src} | {name} | {layer} | - | - | ")
            rows[-1] += " | ".join("-" if t is None else f"{t:.3f}" for t in tests) + f" | {ch['seconds']:.1f} |"
    for t in kinds:
        if res["tests"].get(t, {}).get("_optimum") is not None:
            rows.append(f"\ntest {t}: sample-wise optimum over the scored layers {res['tests'][t]['_optimum']:.3f}")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--proxy", type=int, default=20)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--minutes", type=float, default=50.0, help="start no new step after this")
    p.add_argument("--samples", type=int, default=10, help="causal tracing noise samples")
    p.add_argument("--tokens", type=int, default=100_000, help="second-moment token budget (wikitext-2 test)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in anchor optimisation")
    p.add_argument("--steps", type=int, default=None, help="anchor optimisation steps (default: the editor's)")
    p.add_argument("--candidates", default=None, help="candidate layers, e.g. 8-12 (default: every layer)")
    p.add_argument("--brute-candidates", default=None,
                   help="layers brute force edits (default: --candidates); LGA and tracing still score every candidate")
    p.add_argument("--out", default=str(RESULTS / "layers.json"))
    args = p.parse_args()
    require_data(CORPUS, *(Path(s.split(":", 1)[1]) for s in DATASETS.values()))
    t_run = time.perf_counter()
    partial = Path(args.out).with_suffix(".partial.json")
    config = {k: v for k, v in vars(args).items() if k not in ("minutes", "out", "test")}
    res = json.loads(partial.read_text()) if partial.is_file() else {}
    if res.get("config") != config:
        res = {"config": config, "choices": {}, "tests": {}, "lga_timing": {}, "runs": []}
    if res.get("n_test") != args.test:  # the choices stay valid; test-set scores do not
        res["n_test"], res["tests"] = args.test, {}
    res["runs"].append({"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    anchor = {"autocast_bf16": True} if args.bf16 else {}
    if args.steps:
        anchor["steps"] = args.steps

    def save() -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(res, indent=1, default=str))

    def out_of_time() -> bool:
        return time.perf_counter() - t_run > 60 * args.minutes

    model, tok = load_model("smollm2-135m")
    adapter = ArchitectureAdapter.from_model(model)
    layers = list(parse_candidates(args.candidates) or range(adapter.n_layers))
    t0 = time.perf_counter()
    stats = second_moments(model, tok, layers, StatsSpec(corpus=str(CORPUS), tokens=args.tokens), adapter=adapter)
    print(f"second moments ({args.tokens} tokens, {len(layers)} layers): {time.perf_counter() - t0:.0f}s",
          file=sys.stderr)
    data = {k: load_dataset(spec, n=args.proxy + args.test, zsre_target="answers").cases
            for k, spec in DATASETS.items()}
    cands = tuple(layers)
    selectors = {"lga": LGA(predicted_true=True, layers=cands),
                 "causal": CausalTrace(samples=args.samples, layers=cands),
                 "brute": BruteForce(method="rome", layers=parse_candidates(args.brute_candidates) or cands,
                                     stats=stats, editor_kwargs={"anchor": anchor})}
    for kind, cases in data.items():
        for name, sel in selectors.items():
            done = res["choices"].setdefault(kind, {})
            if name in done or out_of_time():
                continue
            print(f"{kind}: {name} on {args.proxy} proxy records", file=sys.stderr, flush=True)
            done[name] = sel.select(model, adapter, tok, cases[:args.proxy]).to_dict()
            save()
        if "lga" in res["choices"].get(kind, {}) and kind not in res["lga_timing"] and not out_of_time():
            naive = LGA(predicted_true=True, naive=True, layers=cands).select(model, adapter, tok,
                                                                             data[kind][:args.proxy])
            fact = res["choices"][kind]["lga"]
            rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fact["scores"], naive.scores, strict=True))
            res["lga_timing"][kind] = {"factored_s": fact["seconds"], "naive_s": naive.seconds,
                                       "max_rel_diff": rel, "same_choice": naive.layers == fact["layers"]}
            save()
    complete = all(len(res["choices"].get(k, {})) == len(selectors) for k in data)
    # test set of each dataset: at its own strategies' choices (golden first) and at the other datasets'
    # golden layers (transfer); steps interleaved across datasets so that a time cut leaves both partial
    chosen: dict[str, list[int]] = {}
    for kind in data:
        if complete:
            own = [res["choices"][kind][s]["layers"][0] for s in ("brute", "lga", "causal")]
            other = [res["choices"][o]["brute"]["layers"][0] for o in data if o != kind]
            chosen[kind] = list(dict.fromkeys(own + other))
        else:
            chosen[kind] = []
    steps = [(kind, layer) for i in range(max(map(len, chosen.values()), default=0))
             for kind in data for layer in chosen[kind][i:i + 1]]
    for kind, layer in steps:
        per = res["tests"].setdefault(kind, {})
        if str(layer) in per or out_of_time():
            continue
        print(f"{kind}: test {args.test} records at layer {layer}", file=sys.stderr, flush=True)
        ws = score_windows(model, tok, data[kind][args.proxy:], [[layer]], "rome", stats=stats,
                           editor_kwargs={"anchor": anchor})
        per[str(layer)] = ws.score.nanmean().item()
        per.setdefault("_per_request", {})[str(layer)] = ws.score[:, 0].tolist()
        per.setdefault("_seconds", {})[str(layer)] = ws.seconds
        save()
    if not complete:
        print(f"partial: saved to {partial}; run again to continue", file=sys.stderr)
        return 3
    res["tests_complete"] = all(str(l) in res["tests"].get(k, {}) for k, l in steps)
    if not res["tests_complete"]:
        print("test sets not scored at every chosen layer (time limit): run again to complete", file=sys.stderr)
    for kind in data:  # sample-wise optimum over the layers scored on the test set (a lower bound)
        per = res["tests"].get(kind, {}).get("_per_request")
        if per:
            scored = torch.tensor(list(per.values())).nan_to_num(-1)  # [layers, requests]
            res["tests"][kind]["_optimum"] = scored.max(0).values.mean().item()
        plot_layers({"model": "smollm2-135m", "method": "rome", "window": 1, "strategies": res["choices"][kind]},
                    Path(args.out).parent / f"layers-{kind}.png")
    res["time_ratio_brute_over_lga"] = {k: res["choices"][k]["brute"]["seconds"] / res["choices"][k]["lga"]["seconds"]
                                        for k in data}
    res["table"] = table(res)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(res["table"])
    print(json.dumps({"brute/lga time": res["time_ratio_brute_over_lga"], "lga factored vs naive": res["lga_timing"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
