"""``kedit layers``: choose editing layers with LGA, brute force and causal tracing; test the choices.

The first ``--proxy`` records of the dataset (after ``--offset``) choose; the next ``--test`` records
(disjoint) are edited one at a time at each strategy's choice and scored; ``--transfer KIND:PATH``
scores the choices on a second dataset too. Writes DIR/layers.json and DIR/layers.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kedit.commands._common import add_model_args, load

STRATEGIES = ("lga", "brute", "causal", "verified")


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``"w_out/sum,mlp/cosine"`` or ``"all"`` -> [(theta, score), ...]; BadRequest naming an unknown one."""
    from kedit.errors import BadRequest
    from kedit.layers.lga import SCORES, THETAS

    if text == "all":
        return [(t, s) for t in THETAS for s in SCORES]
    out = []
    for part in text.split(","):
        theta, _, score = part.strip().partition("/")
        if theta not in THETAS or score not in SCORES:
            raise BadRequest(f"unknown LGA variant {part.strip()!r}: use THETA/SCORE with THETA in "
                             f"{', '.join(THETAS)} and SCORE in {', '.join(SCORES)}, or 'all'")
        out.append((theta, score))
    return out


def parse_candidates(text: str | None) -> tuple[int, ...] | None:
    """``"3-10"``, ``"1,4,7"`` or a mix (``"0-3,8"``) -> sorted layers; None -> every layer."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kedit.solvers import SOLVERS
    from kedit.targets import TARGETS

    add_model_args(p)
    p.add_argument("--method", default="rome", choices=sorted(SOLVERS))
    p.add_argument("--targets", default="forward", choices=sorted(TARGETS), help="target construction (windows)")
    p.add_argument("--window", type=int, default=None, help="layers edited together (default: 1 for rome, "
                   "else the editor's default width)")
    p.add_argument("--dataset", required=True, help="KIND:PATH with KIND in counterfact, easyedit, zsre, kedit")
    p.add_argument("--zsre-target", choices=["answers", "alt"], default=None, help="zsRE target convention")
    p.add_argument("--proxy", type=int, default=20, help="records that choose the layers")
    p.add_argument("--test", type=int, default=0, help="further records that test the choices (disjoint)")
    p.add_argument("--offset", type=int, default=0, help="first record index")
    p.add_argument("--transfer", default=None, help="second dataset KIND:PATH: its first --test records test too")
    p.add_argument("--test-all", action="store_true", help="brute-force the test set(s) over every candidate too: "
                   "sample-wise optimum and gaps (test x candidates edits)")
    p.add_argument("--strategy", default="lga", choices=[*STRATEGIES, "all"])
    p.add_argument("--candidates", default=None, help="candidate layers, e.g. 2-20 or 3,5,7 (default: all)")
    p.add_argument("--k", type=float, default=1.0, help="LGA Tukey fence multiplier")
    p.add_argument("--lga-variants", default="w_out/sum", help="LGA readings THETA/SCORE, comma-separated, or "
                   "'all' (THETA: w_out, mlp, block; SCORE: sum, cosine, normalised)")
    p.add_argument("--lga-model-answer", action="store_true", help="LGA: the model's greedy answer as the old "
                   "target (default: the dataset's; zsRE: old = answers[0], new = alt)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the proxy set for stability (0: off)")
    p.add_argument("--shortlist", type=int, default=4, help="verified: windows really edited")
    p.add_argument("--edits", type=int, default=None, help="verified: proxy requests edited per window "
                   "(default: min(6, --proxy))")
    p.add_argument("--samples", type=int, default=10, help="causal tracing noise samples per prompt")
    p.add_argument("--noise", type=float, default=3.0, help="causal tracing noise, in subject-embedding stds")
    p.add_argument("--corpus", default=None, help="statistics corpus (default: text sampled from the model)")
    p.add_argument("--tokens", type=int, default=None, help="statistics token budget")
    p.add_argument("--steps", type=int, default=None, help="anchor optimisation steps")
    p.add_argument("--lr", type=float, default=None, help="anchor optimisation learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the anchor optimisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: runs/layers-<method>-<time>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print layers.json on stdout")


def _test_block(ws: Any, chosen: dict[str, list[int]], complete: bool) -> dict[str, Any]:
    """Test-set scores at each strategy's window; ``complete`` (every window scored): optimum and gaps too."""
    mean = ws.score.nanmean(0)
    at = {name: mean[ws.windows.index(w)].item() for name, w in chosen.items() if w in ws.windows}
    out: dict[str, Any] = {"score_keys": list(ws.keys), "at_choice": at, "seconds": ws.seconds,
                           "failures": ws.failures, "per_window": {"windows": ws.windows, "mean": mean.tolist()}}
    if complete:
        best = ws.score.nan_to_num(float("-inf")).max(1).values.mean().item()
        out["sample_wise_optimum"] = best
        out["golden"] = {"layers": ws.windows[ws.best(mean, ws.tie.nanmean(0))], "score": mean.max().item()}
        out["gap"] = {name: best - s for name, s in at.items()}
    return out


def run(args: argparse.Namespace) -> int:
    from kedit.arch import ArchitectureAdapter
    from kedit.commands._common import stats_spec
    from kedit.editor import default_layers
    from kedit.eval import load_dataset
    from kedit.layers import LGA, BruteForce, CausalTrace, Verified, candidate_layers, window_starts
    from kedit.layers.base import format_stability
    from kedit.layers.search import score_windows
    from kedit.models import model_fingerprint
    from kedit.stats import second_moments

    t_start = time.perf_counter()
    data = load_dataset(args.dataset, n=args.proxy + args.test, offset=args.offset, zsre_target=args.zsre_target)
    proxy, test = data.cases[:args.proxy], data.cases[args.proxy:]
    model, tok = load(args)
    adapter = ArchitectureAdapter.from_model(model)
    multi = args.method != "rome"
    window = args.window or (len(default_layers(adapter.n_layers, True)) if multi else 1)
    cands = candidate_layers(adapter, parse_candidates(args.candidates), window)
    log = (lambda m: None) if args.json else (lambda m: print(f"[kedit] {m}", file=sys.stderr, flush=True))
    anchor: dict[str, Any] = {k: v for k, v in {"steps": args.steps, "lr": args.lr}.items() if v is not None}
    if args.bf16:
        anchor["autocast_bf16"] = True
    variants = parse_variants(args.lga_variants)
    lga_proxy, convention = [c.request for c in proxy], "dataset target_true (old) and target_new (new)"
    if args.lga_model_answer:
        convention = "the model's greedy answer (old) and target_new (new)"
    elif proxy and proxy[0].kind == "zsre":
        # LGA compares the gradients of the old and the new answer: on zsRE those are the dataset's
        # answer and `alt`, whatever convention the edits use (issue 10)
        alt = load_dataset(args.dataset, n=args.proxy, offset=args.offset, zsre_target="alt")
        lga_proxy, convention = [c.request for c in alt.cases], "zsRE: old = answers[0], new = alt"
    lgas = {sel.label: sel for sel in (LGA(k=args.k, window=window, layers=tuple(cands), theta=t, score=sc,
                                           predicted_true=args.lga_model_answer, bootstrap=args.bootstrap,
                                           seed=args.seed) for t, sc in variants)}
    groups = {"lga": tuple(lgas), "brute": ("brute",), "causal": ("causal",), "verified": ("verified",)}
    names = tuple(n for g in (STRATEGIES if args.strategy == "all" else (args.strategy,)) for n in groups[g])
    needs_edits = "brute" in names or "verified" in names or args.test or args.transfer
    stats = None
    if needs_edits:
        log(f"second moments of layers {cands[0]}..{cands[-1]}")
        stats = second_moments(model, tok, cands, stats_spec(args), adapter=adapter, progress=not args.json)
    selectors = {
        **lgas,
        "brute": BruteForce(method=args.method, targets=args.targets, window=window, layers=tuple(cands),
                            seed=args.seed, stats=stats, editor_kwargs={"anchor": anchor}, bootstrap=args.bootstrap),
        "causal": CausalTrace(noise=args.noise, samples=args.samples, seed=args.seed, window=window,
                              layers=tuple(cands), bootstrap=args.bootstrap),
        "verified": Verified(method=args.method, targets=args.targets, window=window, layers=tuple(cands),
                             shortlist=args.shortlist, edits=args.edits, k=args.k, bootstrap=args.bootstrap,
                             seed=args.seed, stats=stats, editor_kwargs={"anchor": anchor},
                             signal_proxy=tuple(lga_proxy)),
    }
    result: dict[str, Any] = {
        "model": args.model, "fingerprint": model_fingerprint(model), "architecture": adapter.describe(),
        "method": args.method, "targets": args.targets, "window": window, "candidates": cands,
        "dataset": data.describe(), "proxy": [c.case_id for c in proxy], "test_ids": [c.case_id for c in test],
        "anchor": anchor, "seed": args.seed, "command": " ".join(sys.argv), "strategies": {},
        "lga_convention": convention, "bootstrap": args.bootstrap,
    }
    for name in names:
        log(f"{name} on {len(proxy)} proxy records")
        choice = selectors[name].select(model, adapter, tok, lga_proxy if name in lgas else proxy)
        result["strategies"][name] = choice.to_dict()
        stab = format_stability(choice.details.get("stability"))
        log(f"  -> layers {choice.layers} in {choice.seconds:.1f}s, {stab}")
    chosen = {n: c["layers"] for n, c in result["strategies"].items()}
    if "brute" in result["strategies"]:  # proxy-set gap of every strategy to the sample-wise optimum
        b = result["strategies"]["brute"]
        by_start = dict(zip(b["candidates"], b["scores"], strict=True))
        result["proxy_gap"] = {n: b["details"]["sample_wise_optimum"] - by_start[w[0]] for n, w in chosen.items()}
    test_sets = [("test", test)]
    if args.transfer and args.test:
        tdata = load_dataset(args.transfer, n=args.test, zsre_target=args.zsre_target)
        result["transfer_dataset"] = tdata.describe()
        test_sets.append(("transfer", tdata.cases))
    all_windows = [cands[j:j + window] for j in window_starts(cands, window)]
    for key, cases in test_sets:
        if not cases or not chosen:
            continue
        windows = all_windows if args.test_all else [list(w) for w in dict.fromkeys(map(tuple, chosen.values()))]
        log(f"{key}: {len(cases)} records x {len(windows)} windows")
        ws = score_windows(model, tok, cases, windows, args.method, args.targets, stats=stats, seed=args.seed,
                           editor_kwargs={"anchor": anchor})
        result[key] = _test_block(ws, chosen, complete=args.test_all)
    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out or f"runs/layers-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps(result, indent=1, default=str))
    if not args.no_plots:
        from kedit.layers.plot import plot_layers

        plot_layers(result, out / "layers.png")
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        for name, c in result["strategies"].items():
            test_s = result.get("test", {}).get("at_choice", {}).get(name)
            extra = f"  test score {test_s:.3f}" if test_s is not None else ""
            frac = c["details"].get("cost", {}).get("fraction_of_brute_force") if name == "verified" else None
            extra += f"  ~{frac:.2f}x the estimated brute-force time" if frac is not None else ""
            print(f"{name:>7}: layers {c['layers']}  ({c['seconds']:.1f}s, "
                  f"{format_stability(c['details'].get('stability'))}){extra}")
        print(f"wrote {out}/layers.json" + ("" if args.no_plots else ", layers.png"))
    return 0
