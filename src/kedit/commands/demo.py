"""``kedit demo``: the README's first command. Edits a handful of counterfactual facts in the embedded
default model with MEMIT, first with backward spreading and then with forward replay, shows
before/after continuations and probabilities and an unrelated prompt that did not change, undoes,
and shows that the original answer is back.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

from kedit.commands._common import add_model_args, load, print_table, snapshot
from kedit.probe import greedy, starts_with_target
from kedit.requests import read_requests


def demo_requests(n: int):
    path = resources.files("kedit") / "data" / "demo_facts.jsonl"
    return read_requests(str(path))[:n]


def unrelated_prompts() -> list[str]:
    path = resources.files("kedit") / "data" / "unrelated_prompts.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--facts", type=int, default=5, help="how many demo facts to edit (1-10)")
    p.add_argument("--corpus", default=None, help="statistics corpus (default: text sampled from the model)")
    p.add_argument("--tokens", type=int, default=12_000,
                   help="statistics token budget (small by default so the demo stays quick on a laptop CPU)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: from depth)")


def run(args: argparse.Namespace) -> int:
    from kedit.editor import Editor
    from kedit.stats import StatsSpec

    t_all = time.perf_counter()
    requests = demo_requests(args.facts)
    model, tok = load(args)
    unrelated = unrelated_prompts()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    spec = StatsSpec(corpus=args.corpus, tokens=args.tokens)
    print(f"kedit demo: {len(requests)} counterfactual edits on {args.model}\n")
    before = snapshot(model, tok, requests)
    unrelated_before = greedy(model, tok, unrelated, 5)
    stats = None
    # both runs use MEMIT's one default lam (15000): the comparison changes only the target construction
    landed: dict[str, int] = {}
    for targets in ("backward", "forward"):
        editor = Editor(model, tok, method="memit", targets=targets, layers=layers, stats=stats or spec,
                        verbose=True)
        t0 = time.perf_counter()
        edit = editor.apply(requests)
        seconds = time.perf_counter() - t0
        stats = {layer: editor.second_moment(layer) for layer in editor.layers}  # reuse for the next run
        after = snapshot(model, tok, requests)
        unrelated_after = greedy(model, tok, unrelated, 5)
        ok = sum(starts_with_target(a["generation"], r.target_new) for r, a in zip(requests, after))
        landed[targets] = ok
        print(f"\n=== MEMIT (lam {editor.solver.lam:g}), {targets} targets, layers {editor.layers}: {seconds:.1f} s "
              f"({edit.record['timings']['stats']:.1f} s statistics) ===")
        print_table(requests, before, after)
        kept = sum(a == b for a, b in zip(unrelated_before, unrelated_after))
        print(f"\n{ok}/{len(requests)} edited prompts now continue with the new target; "
              f"{kept}/{len(unrelated)} unrelated prompts keep their first 5 greedy tokens, e.g.")
        print(f"  {unrelated[0]!r} -> {unrelated_after[0]!r} (before: {unrelated_before[0]!r})")
        edit.undo()
        restored = greedy(model, tok, [requests[0].filled])[0]
        print(f"undo: {requests[0].filled!r} -> {restored!r} (original: {before[0]['generation']!r})")
    print(f"\nsame solver, same lam: forward replay landed {landed['forward']}/{len(requests)} edits, backward "
          f"spreading {landed['backward']}/{len(requests)} (the only difference is how the layers' targets are built)")
    print(f"demo finished in {time.perf_counter() - t_all:.0f} s")
    return 0
