"""AlphaEdit: null-space projector, closed form vs its objective, preserved keys untouched (METHODS §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kedit.solvers import AlphaEdit, LayerProblem

from ._lib import SPECTRUM, dense, make_problem, rel_err, t


def null_projector(a) -> np.ndarray:
    U = a["Q"][:, SPECTRUM < 1e-2 * SPECTRUM.max()]  # [f, 8]: C's small-eigenvalue eigenvectors
    return U @ U.T


RELATIVE = AlphaEdit(threshold=1e-2, relative=True)  # the variant (kedit's default before issue 11)


def test_projector_relative_and_absolute_and_cached():
    p, a = make_problem()
    P = RELATIVE.projector(p)
    assert P.dtype == torch.float64
    assert rel_err(P.numpy(), null_projector(a)) < 1e-10
    assert int(p.state["null_dim"]) == 8
    assert RELATIVE.projector(p) is P  # computed once per layer, kept in the editor's state
    # absolute threshold (paper: 0.02, the default): here it splits the same gap
    p2, _ = make_problem()
    assert AlphaEdit() == AlphaEdit(threshold=0.02, relative=False)
    assert rel_err(AlphaEdit().projector(p2).numpy(), null_projector(a)) < 1e-10
    # the relative threshold does not depend on C's scale; an absolute one does
    p3, _ = make_problem()
    p3.C = p3.C * 1e3
    assert rel_err(RELATIVE.projector(p3).numpy(), null_projector(a)) < 1e-10
    p4, _ = make_problem()
    p4.C = p4.C * 1e3
    assert int(torch.linalg.matrix_rank(AlphaEdit(threshold=0.02, relative=False).projector(p4))) < 8


@pytest.mark.parametrize("n_prev", [0, 5])
def test_matches_formula(n_prev):
    p, a = make_problem(n_prev=n_prev)
    P, K, R = null_projector(a), a["K"], a["R"]
    M = P @ (K @ K.T + a["Kp"] @ a["Kp"].T) + 10.0 * np.eye(K.shape[0])
    ref = np.linalg.solve(M, P @ K @ R.T).T
    delta = AlphaEdit().solve(p)
    assert delta.rank == 3
    assert rel_err(dense(delta), ref) < 1e-9


@pytest.mark.parametrize("n_prev, L2", [(0, 10.0), (5, 10.0), (5, 0.3)])
def test_minimises_projected_objective(n_prev, L2):
    # The update is Delta~ P with Delta~ minimising ||Delta~ P K - R||^2 + ||Delta~ P Kp||^2 + L2 ||Delta~ P||^2.
    # Least squares per row on [K^T P; Kp^T P; sqrt(L2) P] delta ~ [r; 0; 0]; the update's row is P delta.
    p, a = make_problem(n_prev=n_prev)
    P, K, R, Kp = null_projector(a), a["K"], a["R"], a["Kp"]
    A = np.vstack([K.T @ P, Kp.T @ P, np.sqrt(L2) * P])
    b = np.vstack([R.T, np.zeros((Kp.shape[1] + P.shape[0], R.shape[0]))])
    X, *_ = np.linalg.lstsq(A, b, rcond=None)  # [f, d]
    ref = (P @ X).T  # [d, f]
    assert rel_err(dense(AlphaEdit(L2=L2).solve(p)), ref) < 1e-8


@pytest.mark.parametrize("n_prev", [0, 5])
def test_preserved_keys_unchanged(n_prev):
    # keys in the span of C's large-eigenvalue eigenvectors: Delta k0 = 0, with or without C_cache
    p, a = make_problem(n_prev=n_prev)
    D = dense(AlphaEdit().solve(p))
    k0 = a["Q"][:, :8] @ np.random.default_rng(5).standard_normal((8, 20))  # [f, 20]
    assert np.linalg.norm(D @ k0) <= 1e-6 * np.linalg.norm(D, 2) * np.linalg.norm(k0)


def test_edited_keys_exact_when_l2_small():
    p, a = make_problem()
    D = dense(AlphaEdit(L2=1e-8).solve(p))
    assert rel_err(D @ a["K"], a["R"]) < 1e-5


def test_sequential_state():
    p1, a1 = make_problem(seed=1)
    solver = AlphaEdit()
    solver.update_state(p1.state, p1, solver.solve(p1))
    assert np.allclose(p1.state["C_cache"].numpy(), a1["K"] @ a1["K"].T)
    P = p1.state["P"]
    p2, a2 = make_problem(seed=2)
    p2.state = p1.state  # same layer, next batch
    solver.solve(p2)
    assert p2.state["P"] is P
    solver.update_state(p2.state, p2, None)
    assert np.allclose(p2.state["C_cache"].numpy(), a1["K"] @ a1["K"].T + a2["K"] @ a2["K"].T)
    state: dict = {}
    AlphaEdit(sequential_cache=False).update_state(state, p1, None)
    assert state == {}


def test_empty_null_space_warns_and_gives_zero():
    p, a = make_problem()
    p = LayerProblem(layer=0, K=p.K, R=p.R, C=t(np.eye(16)), W=p.W)
    with pytest.warns(UserWarning, match="null space is empty"):
        delta = AlphaEdit().solve(p)
    assert np.abs(dense(delta)).max() == 0


@pytest.mark.parametrize("kwargs, field", [({"threshold": 0.0}, "threshold"),
                                           ({"threshold": 1.5, "relative": True}, "threshold"),
                                           ({"L2": 0.0}, "L2")])
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AlphaEdit(**kwargs)
