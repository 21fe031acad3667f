"""``kedit eval``: evaluate an editing method (or the unedited model) on CounterFact / zsRE / MQuAKE / kedit data.

Writes DIR/summary.json, DIR/cases.jsonl, DIR/summary.md, PNG plots and DIR/report.html (one
self-contained page); ``--json`` prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kedit.commands._common import add_editor_args, add_model_args, load, make_editor


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Model and editor options shared with `kedit edit`, plus dataset, protocol and output options."""
    add_model_args(p)
    add_editor_args(p)  # the same editor options as `kedit edit`, plus --method none
    method = next(a for a in p._actions if a.dest == "method")
    method.choices, method.help = ["none", *method.choices], "solver, or 'none' for the unedited model"
    p.add_argument("--dataset", required=True,
                   help="KIND:PATH with KIND in counterfact, easyedit, zsre (portability when present), mquake, kedit")
    p.add_argument("--n", type=int, default=None, help="number of records (default: all)")
    p.add_argument("--offset", type=int, default=0, help="first record index (default: 0)")
    p.add_argument("--sample-seed", type=int, default=None, help="sample --n records with this seed instead")
    p.add_argument("--zsre-target", choices=["answers", "alt"], default=None,
                   help="zsRE target: answers[0] (ROME/MEMIT) or alt (EasyEdit); required for zsre")
    p.add_argument("--allow-skips", action="store_true", help="skip malformed records (counted and reported)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true", help="apply batches of --batch-size one after another")
    mode.add_argument("--single", action="store_true", help="one request at a time, restored in between")
    p.add_argument("--batch-size", type=int, default=None, help="edit batch size for --sequential")
    p.add_argument("--eval-every-batch", action="store_true", help="with --sequential: evaluate after each batch")
    p.add_argument("--fluency", action="store_true", help="generate from generation prompts (slow) for fluency")
    p.add_argument("--fluency-prompts", type=int, default=None, help="generation prompts per record (default: all)")
    p.add_argument("--references", default=None,
                   help="JSON {case_id: [texts]} of reference texts for consistency (needs --fluency)")
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per scoring forward pass")
    p.add_argument("--multihop-tokens", type=int, default=16,
                   help="MQuAKE: greedy answer budget in new tokens (0: teacher-forced metrics only)")
    p.add_argument("--health", action="store_true", help="model health before/after (and after every batch with "
                   "--sequential): perplexity on a fixed corpus slice, unrelated-prompt top-1 agreement and KL")
    p.add_argument("--health-corpus", default=None,
                   help="health perplexity text (file, directory, JSONL; default: the statistics corpus)")
    p.add_argument("--health-tokens", type=int, default=4096, help="tokens of the health perplexity slice")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<method>-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout")


def _with_references(cases, path: str):
    import dataclasses

    refs = json.loads(Path(path).read_text())
    return [dataclasses.replace(c, references=tuple(refs.get(str(c.case_id), c.references))) for c in cases]


def _health(args: argparse.Namespace, model, tok, progress: bool):
    """The Health probe: --health-corpus, else the statistics corpus (--corpus, else text sampled from the model)."""
    from kedit.commands._common import stats_spec
    from kedit.corpus import open_corpus, sampled_corpus
    from kedit.eval.health import Health

    spec = stats_spec(args)
    source = args.health_corpus or spec.corpus
    # the self-sampled corpus is the one the statistics use (same budget and seed: one cached file)
    corpus = open_corpus(source) if source else sampled_corpus(model, tok, spec.tokens, spec.seed, progress=progress)
    return Health(model, tok, corpus, tokens=args.health_tokens)


def run(args: argparse.Namespace) -> int:
    """Load data and model, run the protocol, write DIR; returns the exit status (2 on usage errors)."""
    from kedit.eval import Evaluator, load_dataset
    from kedit.eval.report import markdown, summary_dict, write

    if args.eval_every_batch and not args.sequential:
        print("kedit eval: error: --eval-every-batch needs --sequential", file=sys.stderr)
        return 2
    if (args.health_corpus or args.health_tokens != 4096) and not args.health:
        print("kedit eval: error: --health-corpus / --health-tokens need --health", file=sys.stderr)
        return 2
    if args.health_tokens < 2 or args.multihop_tokens < 0:
        print("kedit eval: error: --health-tokens must be >= 2 and --multihop-tokens >= 0", file=sys.stderr)
        return 2
    if args.sequential and not args.batch_size:
        print("kedit eval: error: --sequential needs --batch-size B", file=sys.stderr)
        return 2
    data = load_dataset(args.dataset, n=args.n, offset=args.offset, sample_seed=args.sample_seed,
                        zsre_target=args.zsre_target, allow_skips=args.allow_skips)
    cases = _with_references(data.cases, args.references) if args.references else data.cases
    if data.skipped:
        print(f"[kedit] skipped {len(data.skipped)} malformed records (see summary.json)", file=sys.stderr)
    t0 = time.perf_counter()
    model, tok = load(args)
    load_s = time.perf_counter() - t0
    editor = None if args.method == "none" else make_editor(args, model, tok, verbose=not args.json)
    progress = sys.stderr.isatty() and not args.json
    health = _health(args, model, tok, progress) if args.health else None
    ev = Evaluator(model, tok, max_tokens=args.max_tokens, fluency=args.fluency, fluency_prompts=args.fluency_prompts,
                   seed=args.seed, progress=progress, multihop_tokens=args.multihop_tokens, health=health)
    mode = "single" if args.single else "sequential" if args.sequential else "batch"
    report = ev.run(cases, editor, mode=mode, batch_size=args.batch_size, eval_every_batch=args.eval_every_batch,
                    extra_config={"dataset": data.describe(), "command": " ".join(sys.argv),
                                  "model_load_s": load_s})
    out = Path(args.out or f"runs/eval-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    write(report, out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary_dict(report), indent=1, default=str))
    else:
        print(markdown(summary_dict(report)).split("\n```json")[0])
        print(f"wrote {out}/summary.json, cases.jsonl, summary.md" + ("" if args.no_plots else ", *.png")
              + ", report.html")
    return 0
