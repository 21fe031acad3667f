"""Evaluator: pre-edit and post-edit metrics from one code path, for batch / sequential / single editing.

Invariant: the model at the end of ``run`` equals the model at the start (every edit is undone, in
reverse order, even when a step raises). Per-record values go to ``Report.cases``; aggregates
(mean, bootstrap 95% CI, n) with their convention labels to ``Report.summary``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

import kedit
from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase, filled_prompt
from kedit.eval.scoring import PairScore, Scorer
from kedit.requests import EditRequest

MODES = ("batch", "sequential", "single")
TOPK = (1, 5, 10)


class EditorLike(Protocol):
    def apply(self, requests: list[EditRequest]) -> Any: ...  # returns an Edit with .undo()
    def apply_each(self, requests: list[EditRequest]) -> Any: ...  # yields one applied Edit per request
    def config(self) -> dict[str, Any]: ...
    def reset(self) -> None: ...


@dataclass
class Snapshot:
    """Raw scores of one case on one model state: PairScores by tag, next-token log-dists, texts."""

    scores: dict[tuple, PairScore]
    dists: dict[int, torch.Tensor]          # neighborhood prompt k -> log p(next) [V]
    texts: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Everything a run produced; ``report.write(dir)`` lives in kedit.eval.report."""

    summary: dict[str, dict[str, Any]]      # key -> mean/ci_low/ci_high/n, "pre": {...}, "convention"
    cases: list[dict[str, Any]]
    config: dict[str, Any]
    timings: dict[str, float]
    evaluated: str                          # when post-edit metrics were taken
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # sequential + eval_every_batch


def _pairs(case: EvalCase) -> list[tuple[tuple, str, str, bool]]:
    """(tag, prompt, target, want next-token distribution) for every score a case needs."""
    r, zsre = case.request, case.kind == "zsre"
    out = [(("rw", "new"), filled_prompt(case), r.target_new, False)]
    if r.target_true is not None and not zsre:
        out.append((("rw", "true"), filled_prompt(case), r.target_true, False))
    for k, p in enumerate(case.paraphrases):
        out.append((("para", k, "new"), p, r.target_new, False))
        if r.target_true is not None and not zsre:
            out.append((("para", k, "true"), p, r.target_true, False))
    for k, (p, ans) in enumerate(case.neighborhood):
        out.append((("nb", k, "ans"), p, ans, True))
        if not zsre:
            out.append((("nb", k, "new"), p, r.target_new, False))
    return out


def case_metrics(case: EvalCase, post: Snapshot, pre: Snapshot, idf: dict[str, float] | None = None,
                 ) -> dict[str, float | None]:
    """Per-record metric values of ``post`` (``pre`` gives the reference for KL / overlap / agreement).

    Pre-edit values are ``case_metrics(case, pre, pre)``: one code path for both.
    """
    s, out = post.scores, {}
    rw = s[("rw", "new")]
    out["p_new"] = math.exp(-rw.nll)
    paras = range(len(case.paraphrases))
    nbs = range(len(case.neighborhood))
    if case.kind == "zsre":
        out["efficacy_token_acc"] = M.token_accuracy(rw.argmax, rw.labels)
        out["efficacy_exact_match"] = M.exact_match(rw.argmax, rw.labels)
        if paras:
            out["generalization_token_acc"] = _mean(M.token_accuracy(s[("para", k, "new")].argmax, s[
                ("para", k, "new")].labels) for k in paras)
            out["generalization_exact_match"] = _mean(M.exact_match(s[("para", k, "new")].argmax, s[
                ("para", k, "new")].labels) for k in paras)
        if nbs:
            out["specificity_agreement"] = _mean(M.agreement(pre.scores[("nb", k, "ans")].argmax,
                                                             s[("nb", k, "ans")].argmax) for k in nbs)
            out["specificity_loc_acc"] = _mean(M.token_accuracy(s[("nb", k, "ans")].argmax,
                                                                s[("nb", k, "ans")].labels) for k in nbs)
    else:
        out["efficacy_acc"] = M.all_correct(rw.correct)
        if paras:
            out["paraphrase_acc"] = _mean(M.all_correct(s[("para", k, "new")].correct) for k in paras)
        if nbs:
            out["neighborhood_acc"] = _mean(M.all_correct(s[("nb", k, "ans")].correct) for k in nbs)
            nll_new = [s[("nb", k, "new")].nll for k in nbs]
            nll_ans = [s[("nb", k, "ans")].nll for k in nbs]
            out["neighborhood_score"] = M.true_beats_new(nll_new, nll_ans)
            out["neighborhood_magnitude"] = M.magnitude(nll_ans, nll_new)
        if case.request.target_true is not None:
            rt = s[("rw", "true")]
            out["p_true"] = math.exp(-rt.nll)
            out["efficacy_score"] = M.new_beats_true([rw.nll], [rt.nll])
            out["efficacy_magnitude"] = M.magnitude([rw.nll], [rt.nll])
            if paras:
                pn = [s[("para", k, "new")].nll for k in paras]
                pt = [s[("para", k, "true")].nll for k in paras]
                out["paraphrase_score"] = M.new_beats_true(pn, pt)
                out["paraphrase_magnitude"] = M.magnitude(pn, pt)
    if nbs:
        out["neighborhood_kl"] = _mean(M.kl_divergence(pre.dists[k], post.dists[k]) for k in nbs)
        for k_top in TOPK:
            out[f"top{k_top}_overlap"] = _mean(M.topk_overlap(pre.dists[k], post.dists[k], k_top) for k in nbs)
    if post.texts:
        out["fluency"] = M.fluency(post.texts)
        if idf is not None and case.references:
            out["consistency"] = M.tfidf_cosine(" ".join(post.texts), " ".join(case.references), idf)
    return out


def _mean(values) -> float:
    return float(np.mean(list(values)))


def summarize(cases: list[dict[str, Any]], seed: int = 0, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Aggregate per-case ``pre`` / ``post`` values: mean, bootstrap CI and n for every key, plus S."""
    keys = sorted({k for c in cases for k in c["post"]} | {k for c in cases for k in c["pre"]})
    summary: dict[str, dict[str, Any]] = {}
    for key in keys:
        post = M.aggregate([c["post"].get(key) for c in cases], seed=seed, n_boot=n_boot)
        pre = M.aggregate([c["pre"].get(key) for c in cases], seed=seed, n_boot=n_boot)
        if post is not None or pre is not None:
            summary[key] = _entry(key, post, pre)
    if all(k in summary for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")):
        s = {when: M.aggregate_score(*([c[when].get(k) for c in cases] for k in
                                       ("efficacy_score", "paraphrase_score", "neighborhood_score")),
                                     seed=seed, n_boot=n_boot) for when in ("post", "pre")}
        summary["score"] = _entry("score", s["post"], s["pre"])
    return summary


def _entry(key: str, post: M.Aggregate | None, pre: M.Aggregate | None) -> dict[str, Any]:
    blank = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    return {**(post.to_dict() if post else blank), "pre": pre.to_dict() if pre else blank,
            "convention": M.CONVENTIONS.get(key, "")}


class Evaluator:
    """Runs the evaluation protocol on ``model``; scoring and generation are batched by ``Scorer``.

    ``fluency``: generate from generation prompts (``fluency_prompts`` per case at most, ROME's
    top-k 5, ``fluency_length`` tokens in total) before and after editing.
    """

    def __init__(self, model: torch.nn.Module, tok, *, max_tokens: int = 4096, padding_side: str = "right",
                 fluency: bool = False, fluency_prompts: int | None = None, fluency_length: int = 100,
                 seed: int = 0, n_boot: int = 1000, chunk: int = 64, progress: bool = False):
        self.model, self.tok = model, tok
        self.scorer = Scorer(model, tok, max_tokens=max_tokens, padding_side=padding_side)
        self.fluency, self.fluency_prompts, self.fluency_length = fluency, fluency_prompts, fluency_length
        self.seed, self.n_boot, self.chunk, self.progress = seed, n_boot, chunk, progress
        self.pre_cache: tuple[tuple, list[Snapshot]] | None = None  # (key, pre-edit snapshots), see protocol
        self.generation_s = 0.0  # seconds spent generating for fluency (part of the eval phases' time)

    def measure(self, cases: Sequence[EvalCase]) -> list[Snapshot]:
        """Score every pair of ``cases`` on the model as it is now (and generate if fluency is on)."""
        snaps: list[Snapshot] = []
        bar = tqdm(total=len(cases), desc="scoring", unit="case", file=sys.stderr, leave=False,
                   disable=not self.progress or len(cases) <= 1)
        for c0 in range(0, len(cases), self.chunk):  # chunks bound the memory of next-token dists
            chunk = cases[c0:c0 + self.chunk]
            plan = [(ci, tag, p, t, w) for ci, c in enumerate(chunk) for tag, p, t, w in _pairs(c)]
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
            snaps.extend(part)
            bar.update(len(chunk))
        bar.close()
        return snaps

    def run(self, cases: Sequence[EvalCase], editor: EditorLike | None, mode: str = "batch",
            batch_size: int | None = None, eval_every_batch: bool = False, extra_config: dict | None = None,
            ) -> Report:
        """Evaluate ``editor`` on ``cases`` (None = the unedited model). Raises ValueError for a bad mode."""
        from kedit.eval.protocol import run_protocol  # protocol loop kept in its own module

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
                "kedit_version": kedit.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
