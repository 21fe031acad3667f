"""bench/layers_auto.py's paired comparison: differences, CIs, S and the verdict on constructed records."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def la():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("layers_auto", BENCH / "layers_auto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(str(BENCH))


def _runs(es, ps, ns):
    return {i: {"case_id": i, "post": {"efficacy_score": e, "paraphrase_score": p, "neighborhood_score": n,
                                       "neighborhood_kl": 0.1}}
            for i, (e, p, n) in enumerate(zip(es, ps, ns, strict=True))}


def test_paired_difference_s_and_verdict(la):
    n = 40
    default = _runs([1.0] * n, [0.5] * n, [0.8] * n)
    better = _runs([1.0] * n, [0.5 + 0.5 * (i % 2) for i in range(n)], [0.8] * n)  # PS 0.5 -> 0.75
    out = la.compare("counterfact", default, better)
    assert out["n"] == n and out["verdict"] == "as good or better"
    ps = out["metrics"]["paraphrase_score"]
    assert ps["diff"] == pytest.approx(0.25) and ps["ci"][0] > 0
    assert out["rank_score"]["diff"] == pytest.approx(0.25 / 3)
    hm = 3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.8)
    assert out["S"]["auto"] == pytest.approx(hm) and out["S"]["diff"] == pytest.approx(hm - 3 / (1 + 2 + 1.25))
    assert out["S"]["ci"][0] > 0
    worse = la.compare("counterfact", better, default)  # the same gap the other way round
    assert worse["verdict"] == "worse" and worse["rank_score"]["ci"][1] < 0
    # only records present in both runs are paired
    assert la.compare("counterfact", default, {k: v for k, v in better.items() if k < 10})["n"] == 10
