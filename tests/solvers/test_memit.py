"""MEMIT's closed form against a direct least-squares solution of its objective (METHODS §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kedit.solvers import MEMIT

from ._lib import dense, make_problem, rel_err, ridge_lstsq, sqrt_psd


@pytest.mark.parametrize("lam", [0.5, 15000.0])
def test_minimises_least_squares_with_preservation(lam):
    # argmin ||Delta K - R||^2 + lam tr(Delta C Delta^T): rows [K^T; sqrt(lam) L^T] delta ~ [r; 0], C = L L^T
    p, a = make_problem()
    ref = ridge_lstsq(a["K"], a["R"], [np.sqrt(lam) * sqrt_psd(a["C"])])
    delta = MEMIT(lam=lam).solve(p)
    assert delta.rank == 3
    assert rel_err(dense(delta), ref) < 1e-8


def test_c_cache_preserves_earlier_edits():
    # sequential: + ||Delta K_prev||^2, i.e. C_cache = K_prev K_prev^T inside the bracket
    p, a = make_problem(n_prev=5)
    ref = ridge_lstsq(a["K"], a["R"], [np.sqrt(2.0) * sqrt_psd(a["C"]), a["Kp"]])
    assert rel_err(dense(MEMIT(lam=2.0).solve(p)), ref) < 1e-8


def test_matches_formula():
    p, a = make_problem()
    K, R, C = a["K"], a["R"], a["C"]
    ref = R @ K.T @ np.linalg.inv(K @ K.T + 15000.0 * C)  # NumPy transcription (the reference may invert)
    assert rel_err(dense(MEMIT().solve(p)), ref) < 1e-8


def test_update_state_accumulates_keys():
    p1, a1 = make_problem(seed=1)
    p2, a2 = make_problem(seed=2)
    state: dict = {}
    MEMIT().update_state(state, p1, None)
    MEMIT().update_state(state, p2, None)
    expected = a1["K"] @ a1["K"].T + a2["K"] @ a2["K"].T
    assert torch.allclose(state["C_cache"], torch.from_numpy(expected))
    state2: dict = {}
    MEMIT(sequential_cache=False).update_state(state2, p1, None)
    assert state2 == {}


def test_validation_names_field():
    with pytest.raises(ValueError, match="lam"):
        MEMIT(lam=-1.0)
