"""Metrics on hand-computed cases: NLL comparisons, magnitudes, S, accuracy, KL, top-k, fluency, TF-IDF, CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kedit.eval import metrics as M


def test_counterfact_scores_and_magnitudes():
    assert M.nll([math.log(0.5), math.log(0.25)]) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert M.new_beats_true([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert M.new_beats_true([2.0], [2.0]) == 0.0  # ties are failures (strict <)
    assert M.true_beats_new([1.0, 3.0], [2.0, 2.0]) == 0.5
    # ROME magnitude: exp(-NLL_a) - exp(-NLL_b), averaged over prompts
    assert M.magnitude([math.log(2)], [math.log(4)]) == pytest.approx(0.5 - 0.25)
    assert M.magnitude([0.0, math.log(2)], [math.log(2), 0.0]) == pytest.approx(0.0)


def test_harmonic_mean_and_accuracy():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert M.harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert M.all_correct([True, True]) == 1.0 and M.all_correct([True, False]) == 0.0


def test_zsre_token_metrics():
    assert M.token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert M.exact_match([1, 2], [1, 2]) == 1.0 and M.exact_match([1, 2], [1, 3]) == 0.0
    assert M.agreement([5, 6, 7], [5, 0, 7]) == pytest.approx(2 / 3)


def test_kl_and_topk_overlap():
    p = torch.tensor([0.5, 0.25, 0.25]).log()
    q = torch.tensor([0.25, 0.25, 0.5]).log()
    expected = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)
    assert M.kl_divergence(p, q) == pytest.approx(expected)
    assert M.kl_divergence(p, p) == 0.0
    a = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2])
    b = torch.tensor([9.0, 8, 7, 6, -5, -4, 3, 2, 1, 0, 11, -2])  # top1 changes; 4 of top5 kept
    assert M.topk_overlap(a, b, 1) == 0.0
    assert M.topk_overlap(a, b, 5) == pytest.approx(4 / 5)
    assert M.topk_overlap(a, a, 10) == 1.0


def test_ngram_entropy_hand_computed():
    # words a b a b: bigrams (a,b)x2 (b,a)x1; trigrams (a,b,a) (b,a,b)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert M.ngram_entropy("a b a b") == pytest.approx((h2 + 2 * h3) / 3)
    assert M.ngram_entropy("a") == 0.0
    assert M.words("Paris, France.") == ["Paris", ",", "France", "."]
    assert M.fluency(["a b a b", "a"]) == pytest.approx((h2 + 2 * h3) / 6)


def test_tfidf_cosine():
    idf = M.fit_idf(["paris is big", "berlin is old"])
    assert idf["is"] == pytest.approx(1.0) and idf["paris"] == pytest.approx(math.log(3 / 2) + 1)
    assert M.tfidf_cosine("Paris is big", "paris IS big", idf) == pytest.approx(1.0)
    assert M.tfidf_cosine("paris big", "berlin old", idf) == 0.0
    # shared "is" only: cos = idf_is^2 / (|a| |b|)
    na = math.sqrt(idf["paris"] ** 2 + 1)
    nb = math.sqrt(idf["berlin"] ** 2 + 1)
    assert M.tfidf_cosine("paris is", "berlin is", idf) == pytest.approx(1 / (na * nb))


def test_bootstrap_ci_matches_manual_resampling():
    x = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    lo, hi = M.bootstrap_ci(x, n_boot=500, seed=3)
    idx = np.random.default_rng(3).integers(0, len(x), size=(500, len(x)))
    ref = np.quantile(x[idx].mean(1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(ref))
    assert lo <= x.mean() <= hi
    assert M.bootstrap_ci(x, n_boot=500, seed=3) == (lo, hi)  # seeded: reproducible
    assert M.bootstrap_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert M.bootstrap_ci([0.3]) == (0.3, 0.3)


def test_aggregate_skips_undefined_and_score_is_joint():
    agg = M.aggregate([1.0, None, 0.0, 1.0, float("nan")], seed=0)
    assert agg.n == 3 and agg.mean == pytest.approx(2 / 3) and agg.ci_low <= agg.mean <= agg.ci_high
    assert M.aggregate([None]) is None
    s = M.aggregate_score([1, 1, 0, None], [1, 0.5, 0.5, 1], [0, 1, 1, 1], seed=0)
    assert s.n == 3
    assert s.mean == pytest.approx(M.harmonic_mean([2 / 3, 2 / 3, 2 / 3]))
    assert s.ci_low <= s.mean <= s.ci_high


def test_every_summary_key_has_a_convention():
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_acc",
                "neighborhood_kl", "top1_overlap", "fluency", "efficacy_token_acc", "specificity_agreement",
                "specificity_loc_acc"):
        assert M.CONVENTIONS[key]


def test_one_metric_table_feeds_every_list():
    from kedit.eval import report
    from kedit.layers import search

    assert report.ORDER == tuple(M.METRICS) and set(M.CONVENTIONS) == set(M.METRICS)
    assert search.SCORE_KEYS == {"counterfact": ("efficacy_score", "paraphrase_score", "neighborhood_score"),
                                 "zsre": ("efficacy_token_acc", "generalization_token_acc", "specificity_agreement")}
    assert all(m.family and m.convention for m in M.METRICS.values())
    assert M.METRICS["neighborhood_kl"].higher_is_better is False and M.METRICS["p_new"].higher_is_better is None


def test_harness_and_protocol_import_no_cycle():
    import ast
    import inspect

    from kedit.eval import protocol, results

    for mod in (protocol, results):  # neither imports the harness at run time (TYPE_CHECKING only)
        tree = ast.parse(inspect.getsource(mod))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        runtime = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in typing_only]
        assert "kedit.eval.harness" not in runtime, mod.__name__
