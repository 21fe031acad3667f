"""Evaluator: pre-edit and post-edit metrics from one code path, for batch / sequential / single editing.

Invariant: the model at the end of ``run`` equals the model at the start (every edit is undone, in
reverse order, even when a step raises). Per-record values go to ``Report.cases``; aggregates
(mean, bootstrap 95% CI, n) with their convention labels to ``Report.summary``. Per-case metric
code lives in kedit.eval.results, the protocol loop in kedit.eval.protocol (neither imports this module).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

import kedit
from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase
from kedit.eval.health import Health
from kedit.eval.protocol import MODES, run_protocol
from kedit.eval.results import (  # noqa: F401  (re-exported: kedit.layers.search and tests read them here)
    TOPK,
    EditorLike,
    Report,
    Snapshot,
    case_metrics,
    generations,
    pairs,
    summarize,
)
from kedit.eval.scoring import Scorer

GEN_BATCH = 32  # prompts per greedy-generation call


class Evaluator:
    """Runs the evaluation protocol on ``model``; scoring and generation are batched by ``Scorer``.

    ``fluency``: generate from generation prompts (``fluency_prompts`` per case at most, ROME's
    top-k 5, ``fluency_length`` tokens in total) before and after editing. MQuAKE cases are answered
    greedily with at most ``multihop_tokens`` new tokens (0: no generation, teacher-forced metrics only).
    ``health``: a Health probe measured before and after editing (after every batch in sequential mode).
    """

    def __init__(self, model: torch.nn.Module, tok, *, max_tokens: int = 4096, padding_side: str = "right",
                 fluency: bool = False, fluency_prompts: int | None = None, fluency_length: int = 100,
                 seed: int = 0, n_boot: int = 1000, chunk: int = 64, progress: bool = False,
                 multihop_tokens: int = 16, health: Health | None = None):
        self.model, self.tok = model, tok
        self.scorer = Scorer(model, tok, max_tokens=max_tokens, padding_side=padding_side)
        self.fluency, self.fluency_prompts, self.fluency_length = fluency, fluency_prompts, fluency_length
        self.seed, self.n_boot, self.chunk, self.progress = seed, n_boot, chunk, progress
        self.generation_s = 0.0  # seconds spent generating (part of the eval phases' time)
        self.multihop_tokens, self.health = multihop_tokens, health

    def measure(self, cases: Sequence[EvalCase]) -> list[Snapshot]:
        """Score every pair of ``cases`` on the model as it is now (and generate if fluency is on)."""
        snaps: list[Snapshot] = []
        bar = tqdm(total=len(cases), desc="scoring", unit="case", file=sys.stderr, leave=False,
                   disable=not self.progress or len(cases) <= 1)
        for c0 in range(0, len(cases), self.chunk):  # chunks bound the memory of next-token dists
            chunk = cases[c0:c0 + self.chunk]
            plan = [(ci, tag, p, t, w) for ci, c in enumerate(chunk) for tag, p, t, w in pairs(c)]
            res, dists = self.scorer.score([(p, t) for _, _, p, t, _ in plan], [w for *_, w in plan])
            part = [Snapshot({}, {}) for _ in chunk]
            for j, (ci, tag, *_rest) in enumerate(plan):
                part[ci].scores[tag] = res[j]
                if j in dists:
                    part[ci].dists[tag[1]] = dists[j]
            if self.fluency:
                prompts = [(ci, p) for ci, c in enumerate(chunk) for p in c.generation_prompts[:self.fluency_prompts]]
                t_gen = time.perf_counter()
                texts = self.scorer.generate([p for _, p in prompts], max_length=self.fluency_length,
                                             seed=self.seed)
                self.generation_s += time.perf_counter() - t_gen
                for (ci, _), text in zip(prompts, texts, strict=True):
                    part[ci].texts.append(text)
            gens = [(ci, tag, p) for ci, c in enumerate(chunk) for tag, p in generations(c)]
            if gens and self.multihop_tokens > 0:
                from kedit.probe import greedy  # the project's greedy decoder (stable signature)

                t_gen = time.perf_counter()
                for g0 in range(0, len(gens), GEN_BATCH):
                    batch = gens[g0:g0 + GEN_BATCH]
                    outs = greedy(self.model, self.tok, [p for *_, p in batch], self.multihop_tokens)
                    for (ci, tag, _), text in zip(batch, outs, strict=True):
                        part[ci].gens[tag] = text
                self.generation_s += time.perf_counter() - t_gen
            snaps.extend(part)
            bar.update(len(chunk))
        bar.close()
        return snaps

    def run(self, cases: Sequence[EvalCase], editor: EditorLike | None, mode: str = "batch",
            batch_size: int | None = None, eval_every_batch: bool = False, extra_config: dict | None = None,
            ) -> Report:
        """Evaluate ``editor`` on ``cases`` (None = the unedited model). Raises ValueError for a bad mode."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return run_protocol(self, list(cases), editor, mode, batch_size, eval_every_batch, extra_config or {})

    def idf(self, cases: Sequence[EvalCase]) -> dict[str, float] | None:
        """IDF over the reference documents of the run (one document per case), or None without references."""
        docs = [" ".join(c.references) for c in cases if c.references]
        return M.fit_idf(docs) if docs and self.fluency else None

    def describe(self) -> dict[str, Any]:
        """Evaluator settings recorded in every report (scoring, generation, bootstrap, versions)."""
        return {"max_tokens": self.scorer.max_tokens, "padding_side": self.scorer.padding_side,
                "head_only_logits": self.scorer.head_only, "fluency": self.fluency,
                "fluency_prompts": self.fluency_prompts, "fluency_length": self.fluency_length,
                "fluency_sampling": "top-k 5, seeded", "seed": self.seed, "n_boot": self.n_boot,
                "multihop_tokens": self.multihop_tokens, "health": self.health.describe() if self.health else None,
                "kedit_version": kedit.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
