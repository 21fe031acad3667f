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

from kedit.commands._common import (
    add_editor_args,
    add_model_args,
    check_writable,
    load,
    make_editor,
    nonneg_int,
    positive_int,
    verbose,
)
from kedit.errors import UsageError

HEALTH_TOKENS = 4096  # default health perplexity slice: 16 rows of 256 tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Model and editor options shared with `kedit edit`, plus dataset, protocol and output options."""
    add_model_args(p)
    add_editor_args(p, allow_none=True)  # the same editor options as `kedit edit`, plus --method none
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True,
                   help="KIND:PATH with KIND in counterfact (ROME or MEND format, detected), easyedit, zsre "
                   "(portability when present), mquake, kedit")
    g.add_argument("--n", type=positive_int, default=None, help="number of records (default: all)")
    g.add_argument("--offset", type=nonneg_int, default=0, help="first record index")
    g.add_argument("--sample-seed", type=nonneg_int, default=None,
                   help="sample --n records with this seed instead (default: the first --n)")
    g.add_argument("--zsre-target", choices=["answers", "alt"], default=None,
                   help="zsRE target: answers[0] (ROME/MEMIT) or alt (EasyEdit); required for zsre (default: none)")
    g.add_argument("--allow-skips", action="store_true",
                   help="skip malformed records (counted and reported) (default: refuse the dataset)")
    g = p.add_argument_group("protocol")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true",
                      help="apply batches of --batch-size one after another (default: one batch of all records)")
    mode.add_argument("--single", action="store_true", help="one request at a time, restored in between")
    g.add_argument("--batch-size", type=positive_int, default=None, help="edit batch size for --sequential")
    g.add_argument("--eval-every-batch", action="store_true", help="with --sequential: evaluate after each batch")
    g.add_argument("--fluency", action="store_true", help="generate from generation prompts (slow) for fluency")
    g.add_argument("--fluency-prompts", type=positive_int, default=None,
                   help="generation prompts per record (default: all)")
    g.add_argument("--references", default=None,
                   help="JSON {case_id: [texts]} of reference texts for consistency (needs --fluency)")
    g.add_argument("--max-tokens", type=positive_int, default=4096, help="padded tokens per scoring forward pass")
    g.add_argument("--multihop-tokens", type=nonneg_int, default=16,
                   help="MQuAKE: greedy answer budget in new tokens; 0: teacher-forced metrics only")
    g = p.add_argument_group("model health")
    g.add_argument("--health", action="store_true", help="model health before/after (and after every batch with "
                   "--sequential): perplexity on a fixed corpus slice, unrelated-prompt top-1 agreement and KL")
    g.add_argument("--health-corpus", default=None,
                   help="health perplexity text: file, directory or JSONL (default: the statistics corpus)")
    g.add_argument("--health-tokens", type=positive_int, default=None,
                   help="tokens of the health perplexity slice (default: 4096)")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<method>-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip PNG plots (default: write them)")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout (default: a markdown table)")


def _with_references(cases, path: str):
    import dataclasses

    refs = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(refs, dict):
        raise UsageError(f"--references {path}: expected a JSON object {{case_id: [texts]}}")
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
    return Health(model, tok, corpus, tokens=args.health_tokens or HEALTH_TOKENS)


def run(args: argparse.Namespace) -> int:
    """Load data and model, run the protocol, write DIR; returns the exit status."""
    from kedit.eval import Evaluator, load_dataset
    from kedit.eval.report import markdown, summary_dict, write

    if args.eval_every_batch and not args.sequential:
        raise UsageError("--eval-every-batch needs --sequential")
    if (args.health_corpus or args.health_tokens) and not args.health:
        raise UsageError("--health-corpus / --health-tokens need --health")
    if args.sequential and not args.batch_size:
        raise UsageError("--sequential needs --batch-size B")
    out = Path(args.out or f"runs/eval-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(out, "dir", "--out")  # before the work, also for the default directory
    data = load_dataset(args.dataset, n=args.n, offset=args.offset, sample_seed=args.sample_seed,
                        zsre_target=args.zsre_target, allow_skips=args.allow_skips)
    cases = _with_references(data.cases, args.references) if args.references else data.cases
    if data.skipped:
        print(f"[kedit] skipped {len(data.skipped)} malformed records (see summary.json)", file=sys.stderr)
    t0 = time.perf_counter()
    model, tok = load(args)
    load_s = time.perf_counter() - t0
    editor = None if args.method == "none" else make_editor(args, model, tok, verbose=verbose(args))
    progress = verbose(args) and sys.stderr.isatty()
    health = _health(args, model, tok, progress) if args.health else None
    ev = Evaluator(model, tok, max_tokens=args.max_tokens, fluency=args.fluency, fluency_prompts=args.fluency_prompts,
                   seed=args.seed, progress=progress, multihop_tokens=args.multihop_tokens, health=health)
    mode = "single" if args.single else "sequential" if args.sequential else "batch"
    report = ev.run(cases, editor, mode=mode, batch_size=args.batch_size, eval_every_batch=args.eval_every_batch,
                    extra_config={"dataset": data.describe(), "command": " ".join(sys.argv),
                                  "model_load_s": load_s})
    write(report, out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary_dict(report), indent=1, default=str))
    else:
        print(markdown(summary_dict(report)).split("\n```json")[0])
        print(f"wrote {out}/summary.json, cases.jsonl, summary.md" + ("" if args.no_plots else ", *.png")
              + ", report.html")
    return 0
