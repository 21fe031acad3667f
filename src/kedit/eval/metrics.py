"""Pure metric functions (numbers in, numbers out), each labelled with its convention (METHODS §8).

Inputs are per-token log-probabilities, argmax ids, next-token log-distributions or texts; no model
is touched here. ``CONVENTIONS`` maps every summary key to a one-line label of what it computes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# summary key -> convention label (printed in reports; "rome" = ROME/MEMIT summarize.py definitions)
CONVENTIONS = {
    "efficacy_score": "rome/ES: 1[NLL(new|prompt) < NLL(true|prompt)], NLL = mean over tokens of ' '+target",
    "paraphrase_score": "rome/PS: ES over paraphrase prompts, mean per record",
    "neighborhood_score": "rome/NS: 1[NLL(true) < NLL(new)] over neighborhood prompts, mean per record",
    "score": "rome/S: harmonic mean of ES, PS, NS (of the means; CI by resampling records)",
    "efficacy_magnitude": "rome/EM: P(new)-P(true), P = exp(-mean token NLL) (geometric-mean token prob.)",
    "paraphrase_magnitude": "rome/PM: P(new)-P(true) over paraphrase prompts, P = exp(-mean token NLL)",
    "neighborhood_magnitude": "rome/NM: P(true)-P(new) over neighborhood prompts, P = exp(-mean token NLL)",
    "efficacy_acc": "acc: 1 iff every token of ' '+target_new is the teacher-forced argmax (edit prompt)",
    "paraphrase_acc": "acc: every target_new token is the teacher-forced argmax, mean over paraphrases",
    "neighborhood_acc": "acc: every ground-truth token is the teacher-forced argmax, mean over neighbors",
    "neighborhood_kl": "KL(p_before || p_after) of the next-token distribution at neighborhood prompts, nats",
    "top1_overlap": "|top1_before & top1_after| / 1, next token at neighborhood prompts",
    "top5_overlap": "|top5_before & top5_after| / 5, next token at neighborhood prompts",
    "top10_overlap": "|top10_before & top10_after| / 10, next token at neighborhood prompts",
    "fluency": "rome/GE: mean over texts of (H2 + 2 H3)/3, H_n = entropy (bits) of word n-gram freqs",
    "consistency": "rome/RS-like: TF-IDF cosine(generated, reference texts), IDF fitted on the run's references",
    "efficacy_token_acc": "zsre: teacher-forced token accuracy of the target on src (mean over tokens)",
    "efficacy_exact_match": "zsre: 1 iff every target token is the teacher-forced argmax on src",
    "generalization_token_acc": "zsre: teacher-forced token accuracy of the target on rephrase",
    "generalization_exact_match": "zsre: 1 iff every target token is the teacher-forced argmax on rephrase",
    "specificity_agreement": "zsre/easyedit-loc: post-edit argmax == pre-edit argmax, teacher forced on loc?+loc_ans",
    "specificity_loc_acc": "zsre/rome-loc: token accuracy of ' '+loc_ans after loc+'?' (teacher forced)",
    "p_new": "exp(-NLL(new|edit prompt)), for plots",
    "p_true": "exp(-NLL(true|edit prompt)), for plots",
}


@dataclass(frozen=True)
class Aggregate:
    """Mean of per-record values with a bootstrap 95% CI; ``n`` = records that define the metric."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


# -- CounterFact (NLLs are mean per-token negative log-likelihoods) ---------------------------------
def nll(logprobs: Sequence[float]) -> float:
    """Mean over target tokens of -log p (teacher forced), METHODS §8."""
    return -float(np.mean(logprobs))


def new_beats_true(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """ES / PS: mean over prompts of 1[NLL(new) < NLL(true)]."""
    return float(np.mean(np.asarray(nll_new) < np.asarray(nll_true)))


def true_beats_new(nll_new: Sequence[float], nll_true: Sequence[float]) -> float:
    """NS: mean over neighborhood prompts of 1[NLL(true) < NLL(new)]."""
    return float(np.mean(np.asarray(nll_true) < np.asarray(nll_new)))


def magnitude(nll_a: Sequence[float], nll_b: Sequence[float]) -> float:
    """ROME's magnitude: mean over prompts of exp(-NLL_a) - exp(-NLL_b)."""
    return float(np.mean(np.exp(-np.asarray(nll_a)) - np.exp(-np.asarray(nll_b))))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (ROME's score S over ES, PS, NS)."""
    v = np.asarray(values, dtype=float)
    return 0.0 if (v <= 0).any() else float(len(v) / np.sum(1.0 / v))


def all_correct(correct: Sequence[bool]) -> float:
    """Accuracy variant: 1.0 iff every target token is the teacher-forced argmax."""
    return float(all(correct))


# -- zsRE -------------------------------------------------------------------------------------------
def token_accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of target positions where the teacher-forced argmax equals the label."""
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def exact_match(pred: Sequence[int], labels: Sequence[int]) -> float:
    """1.0 iff every teacher-forced argmax equals its label."""
    return float(list(pred) == list(labels))


def agreement(pred_before: Sequence[int], pred_after: Sequence[int]) -> float:
    """Fraction of positions where the post-edit argmax equals the pre-edit argmax (EasyEdit locality)."""
    return token_accuracy(pred_after, pred_before)


# -- distribution shift on neighborhood prompts ----------------------------------------------------
def kl_divergence(logp_before: torch.Tensor, logp_after: torch.Tensor) -> float:
    """KL(p_before || p_after) in nats from log-probabilities ``[V]`` (log-softmax outputs)."""
    lb, la = logp_before.double(), logp_after.double()
    return float((lb.exp() * (lb - la)).sum().clamp_min(0.0))


def topk_overlap(logp_before: torch.Tensor, logp_after: torch.Tensor, k: int) -> float:
    """``|topk(before) & topk(after)| / k`` on ``[V]`` scores."""
    a = set(logp_before.topk(k).indices.tolist())
    b = set(logp_after.topk(k).indices.tolist())
    return len(a & b) / k


# -- generated text ---------------------------------------------------------------------------------
_WORD = re.compile(r"\w+|[^\w\s]")  # word / punctuation split; stands in for nltk.word_tokenize


def words(text: str) -> list[str]:
    """Word tokens of ``text`` (regex \\w+ | single punctuation), the n-gram unit for fluency."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: mean_n(w_n * H_n), H_n in bits = (H_2 + 2 H_3) / 3 by default."""
    toks, parts = words(text), []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return float(np.mean(parts))


def fluency(texts: Sequence[str]) -> float:
    """GE: mean n-gram entropy over generated texts."""
    return float(np.mean([ngram_entropy(t) for t in texts]))


def fit_idf(documents: Sequence[str]) -> dict[str, float]:
    """Smoothed IDF ``log((1+N)/(1+df)) + 1`` (sklearn's default) over lower-cased word tokens."""
    df: Counter[str] = Counter()
    for d in documents:
        df.update(set(w.lower() for w in words(d)))
    n = len(documents)
    return {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}


def tfidf_cosine(text_a: str, text_b: str, idf: dict[str, float]) -> float:
    """Cosine of TF-IDF vectors of two texts; words unknown to ``idf`` are ignored (as ROME's vocab)."""
    va, vb = (Counter(w.lower() for w in words(t) if w.lower() in idf) for t in (text_a, text_b))
    dot = sum(va[w] * vb[w] * idf[w] ** 2 for w in va.keys() & vb.keys())
    na = math.sqrt(sum((c * idf[w]) ** 2 for w, c in va.items()))
    nb = math.sqrt(sum((c * idf[w]) ** 2 for w, c in vb.items()))
    return dot / (na * nb) if na and nb else 0.0


# -- aggregation ------------------------------------------------------------------------------------
def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] | None = None,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` over records (rows of ``values``), seeded.

    ``values`` is ``[n]`` (default stat: the mean) or ``[n, m]`` with a ``stat`` mapping ``[n, m]`` to a
    float (joint statistics such as S). Fewer than 2 records give a zero-width interval.
    """
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        v = (stat(x) if stat else float(x.mean())) if len(x) else float("nan")
        return v, v
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))  # [n_boot, n]
    boots = x[idx].mean(axis=1) if stat is None else np.array([stat(x[i]) for i in idx])
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def aggregate(values: Sequence[float | None], seed: int = 0, n_boot: int = 1000) -> Aggregate | None:
    """Mean + bootstrap CI over the defined (non-None, finite) per-record values; None if there are none."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return None
    lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return Aggregate(float(x.mean()), lo, hi, len(x))


def aggregate_score(es: Sequence[float | None], ps: Sequence[float | None], ns: Sequence[float | None],
                    seed: int = 0, n_boot: int = 1000) -> Aggregate | None:
    """S = harmonic mean of (mean ES, mean PS, mean NS) over records defining all three; joint bootstrap."""
    rows = np.array([r for r in zip(es, ps, ns, strict=True) if None not in r], dtype=float)
    if not len(rows):
        return None

    def stat(a: np.ndarray) -> float:
        return harmonic_mean(a.mean(axis=0))

    lo, hi = bootstrap_ci(rows, stat=stat, n_boot=n_boot, seed=seed)
    return Aggregate(stat(rows), lo, hi, len(rows))
