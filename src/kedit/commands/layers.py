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

from kedit.commands._common import (
    add_anchor_args,
    add_model_args,
    add_seed_arg,
    add_solver_args,
    add_stats_args,
    anchor_overrides,
    check_writable,
    layer_list,
    load,
    nonneg_int,
    positive_float,
    positive_int,
    solver_hparams,
    verbose,
)

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
    """``"3-10"``, ``"1,4,7"`` or a mix (``"0-3,8"``) -> sorted layers (the one layer grammar); None -> every layer."""
    return tuple(layer_list(text)) if text else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_solver_args(p, method="rome", targets_help="target construction (windows)")
    g = p.add_argument_group("search")
    g.add_argument("--window", type=positive_int, default=None, help="layers edited together (default: 1 for rome, "
                   "else the editor's default width)")
    g.add_argument("--strategy", default="lga", choices=[*STRATEGIES, "all"], help="how to choose")
    g.add_argument("--candidates", type=layer_list, default=None,
                   help="candidate layers, e.g. 2-20, 3,5,7 or 2-6,9 (default: all)")
    g.add_argument("--k", type=positive_float, default=1.0, help="LGA Tukey fence multiplier")
    g.add_argument("--samples", type=positive_int, default=10, help="causal tracing noise samples per prompt")
    g.add_argument("--noise", type=positive_float, default=3.0, help="causal tracing noise, in subject-embedding stds")
    g.add_argument("--trace-answer", choices=["predicted", "dataset"], default="predicted",
                   help="causal tracing: trace the clean model's greedy prediction (ROME) or the dataset's "
                   "target_true (default: predicted)")
    g.add_argument("--lga-variants", default="w_out/sum", help="LGA readings THETA/SCORE, comma-separated, or "
                   "'all' (THETA: w_out, mlp, block; SCORE: sum, cosine, normalised) (default: w_out/sum)")
    g.add_argument("--lga-model-answer", action="store_true", help="LGA: the model's greedy answer as the old "
                   "target (default: the dataset's; zsRE: old = answers[0], new = alt)")
    g.add_argument("--bootstrap", type=nonneg_int, default=200,
                   help="resamples of the proxy set for the stability reports (0: off) (default: 200)")
    g.add_argument("--shortlist", type=positive_int, default=4, help="verified: windows really edited (default: 4)")
    g.add_argument("--edits", type=positive_int, default=None,
                   help="verified: proxy requests edited per window (default: min(5, --proxy))")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="KIND:PATH with KIND in counterfact, easyedit, zsre, kedit")
    g.add_argument("--zsre-target", choices=["answers", "alt"], default=None,
                   help="zsRE target convention (default: none; required for zsre)")
    g.add_argument("--proxy", type=positive_int, default=20, help="records that choose the layers")
    g.add_argument("--test", type=nonneg_int, default=0, help="further records that test the choices (disjoint)")
    g.add_argument("--offset", type=nonneg_int, default=0, help="first record index")
    g.add_argument("--transfer", default=None,
                   help="second dataset KIND:PATH: its first --test records test too (default: none)")
    g.add_argument("--test-all", action="store_true", help="brute-force the test set(s) over every candidate too: "
                   "sample-wise optimum and gaps (test x candidates edits) (default: off)")
    add_stats_args(p)
    add_anchor_args(p)
    add_seed_arg(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/layers-<method>-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip layers.png (default: write it)")
    p.add_argument("--json", action="store_true", help="print layers.json on stdout (default: a summary)")


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
    out = Path(args.out or f"runs/layers-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(out, "dir", "--out")  # before the work, also for the default directory
    data = load_dataset(args.dataset, n=args.proxy + args.test, offset=args.offset, zsre_target=args.zsre_target)
    proxy, test = data.cases[:args.proxy], data.cases[args.proxy:]
    model, tok = load(args)  # also checks --candidates against the model's depth
    adapter = ArchitectureAdapter.from_model(model)
    multi = args.method != "rome"
    window = args.window or (len(default_layers(adapter.n_layers, True)) if multi else 1)
    cands = candidate_layers(adapter, tuple(args.candidates) if args.candidates else None, window)
    show = verbose(args)
    log = (lambda m: print(f"[kedit] {m}", file=sys.stderr, flush=True)) if show else (lambda m: None)
    anchor = anchor_overrides(args)
    editor_kwargs: dict[str, Any] = {"anchor": anchor, **solver_hparams(args)}
    if args.anchor_cache:  # brute force and the verified selector reuse anchors across runs
        editor_kwargs["anchor_cache"] = args.anchor_cache
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
        stats = second_moments(model, tok, cands, stats_spec(args), adapter=adapter,
                               progress=show and sys.stderr.isatty())
    selectors = {
        **lgas,
        "brute": BruteForce(method=args.method, targets=args.targets, window=window, layers=tuple(cands),
                            seed=args.seed, stats=stats, editor_kwargs=editor_kwargs, progress=show,
                            bootstrap=args.bootstrap),
        "causal": CausalTrace(noise=args.noise, samples=args.samples, seed=args.seed, window=window,
                              layers=tuple(cands), bootstrap=args.bootstrap, answer=args.trace_answer),
        "verified": Verified(method=args.method, targets=args.targets, window=window, layers=tuple(cands),
                             shortlist=args.shortlist, edits=args.edits, k=args.k, bootstrap=args.bootstrap,
                             seed=args.seed, stats=stats, editor_kwargs=editor_kwargs,
                             signal_proxy=tuple(lga_proxy)),
    }
    result: dict[str, Any] = {
        "model": args.model, "fingerprint": model_fingerprint(model), "architecture": adapter.describe(),
        "method": args.method, "targets": args.targets, "window": window, "candidates": cands,
        "dataset": data.describe(), "proxy": [c.case_id for c in proxy], "test_ids": [c.case_id for c in test],
        "anchor": anchor, "solver_hparams": solver_hparams(args), "seed": args.seed, "command": " ".join(sys.argv),
        "strategies": {}, "lga_convention": convention, "bootstrap": args.bootstrap,
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
                           editor_kwargs=editor_kwargs, progress=show)
        result[key] = _test_block(ws, chosen, complete=args.test_all)
    result["seconds"] = time.perf_counter() - t_start
    from kedit import distributed
    from kedit.io import write_json

    if not distributed.is_main():  # under torchrun every rank holds the same result: rank 0 writes and prints it
        return 0
    write_json(out / "layers.json", result, indent=1, default=str)
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
            extra += f"  traced: {c['details']['answer']} answer" if name == "causal" else ""
            print(f"{name:>7}: layers {c['layers']}  ({c['seconds']:.1f}s, "
                  f"{format_stability(c['details'].get('stability'))}){extra}")
        print(f"wrote {out}/layers.json" + ("" if args.no_plots else ", layers.png"))
    return 0
