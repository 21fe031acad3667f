"""Pure metric functions (numbers in, numbers out), each labelled with its convention (METHODS §8).

Inputs are per-token log-probabilities, argmax ids, next-token log-distributions or texts; no model
is touched here. ``METRICS`` is the one metric table (name, family, convention label, direction, display
order); reports, the harness and the layer search read it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: every list of metric names in kedit is read from ``METRICS``.

    ``family`` groups rows in reports; ``selects`` names the dataset kind whose layer search scores
    on this metric (kedit.layers.search.SCORE_KEYS); rows are listed in display order.
    """

    name: str
    family: str
    convention: str                      # one-line label of what is computed (printed in reports)
    higher_is_better: bool | None = True  # None: neither (diagnostic values such as p_new, perplexity)
    selects: str | None = None


# display order: CounterFact family, distribution shift, text, zsRE, portability, MQuAKE, health, diagnostics
# ("rome" = ROME/MEMIT summarize.py definitions; METHODS §8)
_TABLE = (
    Metric("efficacy_score", "counterfact",
           "rome/ES: 1[NLL(new|prompt) < NLL(true|prompt)], NLL = mean over tokens of ' '+target",
           selects="counterfact"),
    Metric("paraphrase_score", "counterfact", "rome/PS: ES over paraphrase prompts, mean per record",
           selects="counterfact"),
    Metric("neighborhood_score", "counterfact",
           "rome/NS: 1[NLL(true) < NLL(new)] over neighborhood prompts, mean per record", selects="counterfact"),
    Metric("score", "counterfact", "rome/S: harmonic mean of ES, PS, NS (of the means; CI by resampling records)"),
    Metric("efficacy_acc", "counterfact",
           "acc: 1 iff every token of ' '+target_new is the teacher-forced argmax (edit prompt)"),
    Metric("paraphrase_acc", "counterfact",
           "acc: every target_new token is the teacher-forced argmax, mean over paraphrases"),
    Metric("neighborhood_acc", "counterfact",
           "acc: every ground-truth token is the teacher-forced argmax, mean over neighbors"),
    Metric("efficacy_magnitude", "counterfact",
           "rome/EM: P(new)-P(true), P = exp(-mean token NLL) (geometric-mean token prob.)"),
    Metric("paraphrase_magnitude", "counterfact",
           "rome/PM: P(new)-P(true) over paraphrase prompts, P = exp(-mean token NLL)"),
    Metric("neighborhood_magnitude", "counterfact",
           "rome/NM: P(true)-P(new) over neighborhood prompts, P = exp(-mean token NLL)"),
    Metric("neighborhood_kl", "locality",
           "KL(p_before || p_after) of the next-token distribution at neighborhood prompts, nats", False),
    Metric("top1_overlap", "locality", "|top1_before & top1_after| / 1, next token at neighborhood prompts"),
    Metric("top5_overlap", "locality", "|top5_before & top5_after| / 5, next token at neighborhood prompts"),
    Metric("top10_overlap", "locality", "|top10_before & top10_after| / 10, next token at neighborhood prompts"),
    Metric("fluency", "generation",
           "rome/GE: mean over texts of (H2 + 2 H3)/3, H_n = entropy (bits) of word n-gram freqs"),
    Metric("consistency", "generation",
           "rome/RS-like: TF-IDF cosine(generated, reference texts), IDF fitted on the run's references"),
    Metric("efficacy_token_acc", "zsre", "zsre: teacher-forced token accuracy of the target on src (mean over tokens)",
           selects="zsre"),
    Metric("efficacy_exact_match", "zsre", "zsre: 1 iff every target token is the teacher-forced argmax on src"),
    Metric("generalization_token_acc", "zsre", "zsre: teacher-forced token accuracy of the target on rephrase",
           selects="zsre"),
    Metric("generalization_exact_match", "zsre",
           "zsre: 1 iff every target token is the teacher-forced argmax on rephrase"),
    Metric("specificity_agreement", "zsre",
           "zsre/easyedit-loc: post-edit argmax == pre-edit argmax, teacher forced on loc?+loc_ans", selects="zsre"),
    Metric("specificity_loc_acc", "zsre",
           "zsre/rome-loc: token accuracy of ' '+loc_ans after loc+'?' (teacher forced)"),
    Metric("portability_token_acc", "portability",
           "easyedit/portability: teacher-forced token accuracy of ' '+New Answer after New Question"),
    Metric("portability_exact_match", "portability",
           "portability: 1 iff every ' '+New Answer token is the teacher-forced argmax after New Question"),
    Metric("multihop_acc", "mquake",
           "mquake: 1 iff the greedy answer to any of the case's questions matches new_answer or an alias "
           "(normalised prefix match, few-shot QA prompt, token budget)"),
    Metric("multihop_old_acc", "mquake",
           "mquake: 1 iff the greedy answer to any question matches the pre-edit answer or an alias", None),
    Metric("multihop_score", "mquake",
           "mquake: mean over questions of 1[NLL(new_answer|question) < NLL(answer|question)], teacher forced"),
    Metric("hopwise_acc", "mquake",
           "mquake: greedy continuation of each new_single_hops cloze matches its answer or an alias, mean per case"),
    Metric("edit_wise_score", "mquake",
           "mquake: 1[NLL(new) < NLL(true)] for each requested_rewrite prompt, mean per case (rome/ES per edit)"),
    Metric("edit_wise_acc", "mquake",
           "mquake: every ' '+target_new token is the teacher-forced argmax, mean over the case's rewrites"),
    Metric("health_perplexity", "health",
           "health: exp(mean token NLL) on a fixed slice of the health corpus, CI by resampling rows", False),
    Metric("health_top1_agreement", "health",
           "health: post-edit next-token argmax == pre-edit argmax on kedit's fixed unrelated prompt set"),
    Metric("health_kl", "health",
           "health: KL(p_before || p_after) of the next token on the fixed unrelated prompt set, nats", False),
    Metric("p_new", "diagnostic", "exp(-NLL(new|edit prompt)), for plots", None),
    Metric("p_true", "diagnostic", "exp(-NLL(true|edit prompt)), for plots", None),
)
METRICS: dict[str, Metric] = {m.name: m for m in _TABLE}
# summary key -> convention label (derived from METRICS; kept for readers of the old name)
CONVENTIONS = {name: m.convention for name, m in METRICS.items()}
ORDER = tuple(METRICS)


def score_keys(kind: str) -> tuple[str, ...]:
    """Metrics a layer search scores on for dataset ``kind`` (rows with ``selects == kind``, display order)."""
    return tuple(m.name for m in _TABLE if m.selects == kind)


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


# -- generated answers (MQuAKE) --------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: NFKD without accents, lower case, no punctuation/articles, single spaces."""
    import unicodedata

    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_span(generation: str) -> str:
    """The answer part of a greedy continuation: its first non-empty line, cut at a new ``Q:`` turn."""
    for line in generation.strip().splitlines():
        if line.strip():
            return line.split("Q:")[0].strip()
    return ""


def alias_match(generation: str, aliases: Sequence[str]) -> bool:
    """Whether the normalised answer span equals, or starts with (whole words), a normalised alias.

    A prefix match accepts "Paris, the capital" for "Paris"; an empty alias never matches.
    """
    got = normalize_answer(answer_span(generation))
    for alias in aliases:
        a = normalize_answer(alias)
        if a and (got == a or got.startswith(a + " ")):
            return True
    return False
