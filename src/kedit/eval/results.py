"""Per-case scores -> metric values -> summary: what a model state yields for a case, and the Report.

``Evaluator.measure`` (kedit.eval.harness) fills a ``Snapshot`` per case from ``pairs`` and
``generations``; ``case_metrics`` turns a post-edit and a pre-edit snapshot into metric values
(named in the metric table, kedit.eval.metrics.METRICS); ``summarize`` aggregates them. The protocol
(kedit.eval.protocol) and the harness both import this module and not each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase, filled_prompt
from kedit.eval.scoring import PairScore
from kedit.requests import EditRequest, fill

TOPK = (1, 5, 10)
# MQuAKE questions go to a base LM as a two-shot QA prompt (zero-shot, SmolLM-size models rarely answer
# in the "name only" form the alias match needs); the teacher-forced comparison uses the same prompt.
QA_PROMPT = ("Q: What is the capital of France?\nA: Paris\n"
             "Q: Who wrote the play Hamlet?\nA: William Shakespeare\n"
             "Q: {}\nA:")


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
    gens: dict[tuple, str] = field(default_factory=dict)  # greedy continuations by tag (MQuAKE)


@dataclass
class Report:
    """Everything a run produced; ``report.write(dir)`` lives in kedit.eval.report."""

    summary: dict[str, dict[str, Any]]      # key -> mean/ci_low/ci_high/n, "pre": {...}, "convention"
    cases: list[dict[str, Any]]
    config: dict[str, Any]
    timings: dict[str, float]
    evaluated: str                          # when post-edit metrics were taken
    trajectory: list[dict[str, Any]] = field(default_factory=list)  # sequential + eval_every_batch
    health: list[dict[str, Any]] = field(default_factory=list)      # health after 0, 1, ... batches


def qa_prompt(question: str) -> str:
    """The few-shot QA prompt of a MQuAKE question (QA_PROMPT)."""
    return QA_PROMPT.format(question)


def pairs(case: EvalCase) -> list[tuple[tuple, str, str, bool]]:
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
    for k, (q, ans) in enumerate(case.portability):
        out.append((("port", k, "ans"), q, ans, False))
    if case.multihop is not None:
        for j, e in enumerate(case.edits):
            out.append((("ew", j, "new"), fill(e.prompt, e.subject), e.target_new, False))
            out.append((("ew", j, "true"), fill(e.prompt, e.subject), e.target_true, False))
        for q, question in enumerate(case.multihop.questions):
            out.append((("mh", q, "new"), qa_prompt(question), case.multihop.new_answer, False))
            out.append((("mh", q, "old"), qa_prompt(question), case.multihop.answer, False))
    return out


def generations(case: EvalCase) -> list[tuple[tuple, str]]:
    """(tag, prompt) of every greedy continuation a case needs (MQuAKE questions and single-hop clozes)."""
    if case.multihop is None:
        return []
    out = [(("mh", q), qa_prompt(question)) for q, question in enumerate(case.multihop.questions)]
    return out + [(("hop", h), cloze) for h, (cloze, _, _) in enumerate(case.multihop.new_single_hops)]


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
        if case.portability:
            ports = [s[("port", k, "ans")] for k in range(len(case.portability))]
            out["portability_token_acc"] = _mean(M.token_accuracy(p.argmax, p.labels) for p in ports)
            out["portability_exact_match"] = _mean(M.exact_match(p.argmax, p.labels) for p in ports)
    elif case.kind == "mquake":
        out.update(_mquake_metrics(case, post))
        if case.request.target_true is not None:
            out["p_true"] = math.exp(-s[("rw", "true")].nll)
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


def _mquake_metrics(case: EvalCase, snap: Snapshot) -> dict[str, float | None]:
    """Edit-wise, multi-hop (generated and teacher forced) and hop-wise values of one MQuAKE case."""
    mh, s, out = case.multihop, snap.scores, {}
    assert mh is not None
    n_e, n_q = len(case.edits), len(mh.questions)
    out["edit_wise_score"] = _mean(M.new_beats_true([s[("ew", j, "new")].nll], [s[("ew", j, "true")].nll])
                                   for j in range(n_e))
    out["edit_wise_acc"] = _mean(M.all_correct(s[("ew", j, "new")].correct) for j in range(n_e))
    out["multihop_score"] = _mean(M.new_beats_true([s[("mh", q, "new")].nll], [s[("mh", q, "old")].nll])
                                  for q in range(n_q))
    if snap.gens:  # generation may be switched off (Evaluator(multihop_tokens=0))
        new, old = (mh.new_answer, *mh.new_answer_aliases), (mh.answer, *mh.answer_aliases)
        out["multihop_acc"] = float(any(M.alias_match(snap.gens[("mh", q)], new) for q in range(n_q)))
        out["multihop_old_acc"] = float(any(M.alias_match(snap.gens[("mh", q)], old) for q in range(n_q)))
        if mh.new_single_hops:
            out["hopwise_acc"] = _mean(float(M.alias_match(snap.gens[("hop", h)], (ans, *aliases)))
                                       for h, (_, ans, aliases) in enumerate(mh.new_single_hops))
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
            summary[key] = entry(key, post, pre)
    if all(k in summary for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")):
        s = {when: M.aggregate_score(*([c[when].get(k) for c in cases] for k in
                                       ("efficacy_score", "paraphrase_score", "neighborhood_score")),
                                     seed=seed, n_boot=n_boot) for when in ("post", "pre")}
        summary["score"] = entry("score", s["post"], s["pre"])
    return summary


def entry(key: str, post: M.Aggregate | None, pre: M.Aggregate | None) -> dict[str, Any]:
    """A summary entry: post-edit aggregate, ``pre`` aggregate, and the metric table's labels."""
    blank = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    m = M.METRICS.get(key)
    return {**(post.to_dict() if post else blank), "pre": pre.to_dict() if pre else blank,
            "convention": m.convention if m else "", "family": m.family if m else "other",
            "higher_is_better": m.higher_is_better if m else None}
