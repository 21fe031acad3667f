"""ROME (r-ROME form) against the minimum-C-norm exact update (METHODS §5)."""

from __future__ import annotations

import numpy as np

from kedit.solvers import ROME

from ._lib import dense, kkt_min_norm, make_problem, rel_err


def test_single_request_exact_and_minimal_c_norm():
    # argmin tr(Delta C Delta^T) s.t. Delta k = r, solved directly from the KKT system
    p, a = make_problem(n=1)
    delta = ROME().solve(p)
    D = dense(delta)
    assert delta.rank == 1
    assert rel_err(D @ a["K"], a["R"]) < 1e-10
    assert rel_err(D, kkt_min_norm(a["K"], a["R"], a["C"])) < 1e-8


def test_single_request_matches_formula():
    p, a = make_problem(n=1)
    k, r = a["K"][:, 0], a["R"][:, 0]
    Cinv_k = np.linalg.solve(a["C"], k)
    ref = np.outer(r, Cinv_k) / (k @ Cinv_k)
    assert rel_err(dense(ROME().solve(p)), ref) < 1e-10


def test_ridge_regularises_c():
    p, a = make_problem(n=1)
    C = a["C"] + 0.1 * np.mean(np.diag(a["C"])) * np.eye(a["C"].shape[0])
    ref = kkt_min_norm(a["K"], a["R"], C)
    assert rel_err(dense(ROME(ridge=0.1).solve(p)), ref) < 1e-8


def test_several_requests_equal_sequential_rank_one_edits():
    # What rome.py computes for n > 1: one rank-one ROME edit per request, each on the residual left so far
    p, a = make_problem(n=3)
    D = np.zeros((a["R"].shape[0], a["K"].shape[0]))
    for i in range(3):
        k = a["K"][:, i]
        Cinv_k = np.linalg.solve(a["C"], k)
        D = D + np.outer(a["R"][:, i] - D @ k, Cinv_k) / (k @ Cinv_k)
    assert rel_err(dense(ROME().solve(p)), D) < 1e-8


def test_several_requests_apply_one_after_another():
    """Each rank-one update lands its own request exactly on what the earlier ones left (ROME's
    sequential protocol): the last request is exact and the first one alone equals a one-request solve."""
    p, a = make_problem(n=3)
    delta = dense(ROME().solve(p))
    assert rel_err(delta @ a["K"][:, -1:], a["R"][:, -1:]) < 1e-8
    first, _ = make_problem(n=3)
    first.K, first.R = first.K[:, :1], first.R[:, :1]
    one = dense(ROME().solve(first))
    assert rel_err(one @ a["K"][:, :1], a["R"][:, :1]) < 1e-8
