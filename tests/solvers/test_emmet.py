"""EMMET against its equality-constrained objective and its penalised (eps > 0) form (METHODS §5)."""

from __future__ import annotations

import numpy as np
import pytest

from kedit.solvers import EMMET, MEMIT

from ._lib import dense, kkt_min_norm, make_problem, rel_err, ridge_lstsq, sqrt_psd


def test_matches_formula():
    p, a = make_problem()
    K, R, Cp = a["K"], a["R"], 15000.0 * a["C"]
    Ci = np.linalg.inv(Cp)  # NumPy transcription (the reference may invert)
    ref = R @ np.linalg.inv(K.T @ Ci @ K + 0.1 * np.eye(3)) @ K.T @ Ci
    delta = EMMET().solve(p)
    assert delta.rank == 3
    assert rel_err(dense(delta), ref) < 1e-8


@pytest.mark.parametrize("lam", [1.0, 15000.0])
def test_eps_zero_is_exact_min_c_norm(lam):
    # eps -> 0: Delta K = R exactly, with minimal tr(Delta C' Delta^T) (KKT system, C' = lam C)
    p, a = make_problem()
    D = dense(EMMET(lam=lam, eps=0.0).solve(p))
    assert rel_err(D @ a["K"], a["R"]) < 1e-9
    assert rel_err(D, kkt_min_norm(a["K"], a["R"], lam * a["C"])) < 1e-7
    D_small = dense(EMMET(lam=lam, eps=1e-9).solve(p))
    assert rel_err(D_small, D) < 1e-6


@pytest.mark.parametrize("eps", [0.1, 3.0])
def test_eps_positive_minimises_penalised_objective(eps):
    # argmin eps tr(Delta C' Delta^T) + ||Delta K - R||^2 (C' = lam C), by least squares on stacked rows
    lam = 2.0
    p, a = make_problem()
    ref = ridge_lstsq(a["K"], a["R"], [np.sqrt(eps * lam) * sqrt_psd(a["C"])])
    assert rel_err(dense(EMMET(lam=lam, eps=eps).solve(p)), ref) < 1e-8
    # ... which is MEMIT with lam * eps
    assert rel_err(dense(EMMET(lam=lam, eps=eps).solve(p)), dense(MEMIT(lam=lam * eps).solve(p))) < 1e-8


def test_c_cache_joins_c_prime():
    p, a = make_problem(n_prev=4)
    Cp = 2.0 * a["C"] + a["Kp"] @ a["Kp"].T
    D = dense(EMMET(lam=2.0, eps=0.0).solve(p))
    assert rel_err(D, kkt_min_norm(a["K"], a["R"], Cp)) < 1e-7


def test_update_state_accumulates_keys():
    p, a = make_problem()
    state: dict = {}
    EMMET().update_state(state, p, None)
    assert np.allclose(state["C_cache"].numpy(), a["K"] @ a["K"].T)
    state2: dict = {}
    EMMET(sequential_cache=False).update_state(state2, p, None)
    assert state2 == {}


@pytest.mark.parametrize("kwargs, field", [({"lam": 0.0}, "lam"), ({"eps": -0.1}, "eps")])
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EMMET(**kwargs)
