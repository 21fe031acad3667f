"""PRUNE and RECT post-processing properties, on a fixed base Delta and composed with MEMIT (METHODS §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kedit.solvers import EMMET, MEMIT, Delta, LayerProblem, Prune, Rect

from ._lib import dense, make_problem, rel_err, t


@dataclass(frozen=True)
class Fixed:
    """A stand-in base solver returning a given Delta (low rank or dense)."""

    delta: Delta

    def solve(self, p: LayerProblem) -> Delta:
        return self.delta


def spectral_problem(sigmas, w_max: float, seed: int = 0):
    """A problem whose W has largest singular value ``w_max``, and a low-rank Delta with singular values ``sigmas``."""
    rng = np.random.default_rng(seed)
    p, a = make_problem(seed=seed)
    d, f = a["W"].shape
    L, _ = np.linalg.qr(rng.standard_normal((d, len(sigmas))))  # [d, r]
    Rv, _ = np.linalg.qr(rng.standard_normal((f, len(sigmas))))  # [f, r]
    T = rng.standard_normal((len(sigmas), len(sigmas))) + 3 * np.eye(len(sigmas))  # invertible mixing
    # U V^T = L diag(sigmas) Rv^T, but the factors are not the SVD's
    delta = Delta(U=t((L * np.asarray(sigmas)) @ T), V=t(Rv @ np.linalg.inv(T).T))
    Uw, sw, Vwt = np.linalg.svd(a["W"], full_matrices=False)
    p.W = t(Uw @ np.diag(sw / sw[0] * w_max) @ Vwt)
    return p, delta


def log_restrained(s: np.ndarray, b: float, alpha: float = math.e) -> np.ndarray:
    F = b + (np.log(s) - np.log(b)) / np.log(alpha)
    return np.where(s > b, np.minimum(s, F), s)


@pytest.mark.parametrize("alpha", [math.e, 2.0, 1.2])
def test_prune_compresses_large_singular_values_only(alpha):
    sigmas = np.array([200.0, 30.0, 5.0, 1.0])  # b = 8 >= 1 / ln(alpha) for every alpha here: F(s) < s
    p, delta = spectral_problem(sigmas, w_max=8.0)
    D0 = dense(delta)
    out = Prune(base=Fixed(delta), alpha=alpha).solve(p)
    D1 = dense(out)
    assert out.rank == 4
    U0, s0, V0t = np.linalg.svd(D0)
    s0, U0, V0t = s0[:4], U0[:, :4], V0t[:4]
    expected = log_restrained(s0, 8.0, alpha)
    assert np.allclose(np.linalg.svd(D1, compute_uv=False)[:4], expected, rtol=1e-10)
    assert np.all(expected[:2] < s0[:2]) and np.all(expected[2:] == s0[2:])
    assert np.all(expected[:2] <= 8.0 + np.log(s0[:2] / 8.0) / np.log(alpha) + 1e-12)  # the bound F
    # singular vectors unchanged: D1 = U0 diag(F(s0)) V0^T
    assert rel_err(D1, (U0 * expected) @ V0t) < 1e-10


def test_prune_never_enlarges():
    # with b ln(alpha) < 1, F(s) > s just above b: the min keeps s
    p, delta = spectral_problem([0.6, 0.1], w_max=0.5)
    s = np.linalg.svd(dense(Prune(base=Fixed(delta)).solve(p)), compute_uv=False)[:2]
    assert np.allclose(s, [0.6, 0.1], rtol=1e-10)


def test_prune_bound_from_first_weight_seen():
    p, delta = spectral_problem([20.0, 1.0], w_max=2.0)
    solver = Prune(base=Fixed(delta))
    first = dense(solver.solve(p))
    assert float(p.state["W_sigma_max"]) == pytest.approx(2.0)
    p.W = p.W * 100  # later batch: W already edited; the original model's bound still applies
    assert rel_err(dense(solver.solve(p)), first) < 1e-12


def test_prune_dense_base():
    p, delta = spectral_problem([20.0, 5.0, 1.0], w_max=2.0)
    low = dense(Prune(base=Fixed(delta)).solve(p))
    p2, _ = spectral_problem([20.0, 5.0, 1.0], w_max=2.0)
    assert rel_err(dense(Prune(base=Fixed(Delta(dense_=delta.dense()))).solve(p2)), low) < 1e-10


def test_prune_composes_with_memit_and_its_state():
    p, a = make_problem()
    p.W = p.W * 1e-3  # small W: MEMIT's Delta has singular values above the bound
    D_memit = dense(MEMIT(lam=0.1).solve(make_problem()[0]))
    solver = Prune(base=MEMIT(lam=0.1))
    D = dense(solver.solve(p))
    b = np.linalg.norm(a["W"] * 1e-3, 2)
    s0 = np.linalg.svd(D_memit, compute_uv=False)[:3]
    assert s0[0] > b
    assert np.allclose(np.linalg.svd(D, compute_uv=False)[:3], log_restrained(s0, b), rtol=1e-9)
    solver.update_state(p.state, p, None)
    assert np.allclose(p.state["C_cache"].numpy(), a["K"] @ a["K"].T)
    Prune(base=Fixed(Delta(dense_=torch.zeros(8, 16)))).update_state({}, p, None)  # base without state: no-op


@dataclass(frozen=True)
class Sequence:
    """A stand-in base solver returning the next of given Deltas on every solve."""

    deltas: list

    def solve(self, p: LayerProblem) -> Delta:
        return self.deltas[p.state["calls"][0]]  # the batch index _run_batches puts in the state


def _run_batches(solver, p, deltas):
    """Solve + commit (as the editor does after applying) once per batch; returns the applied Deltas."""
    applied = []
    for i in range(len(deltas)):
        p.state["calls"] = [i]
        applied.append(solver.solve(p))
        solver.update_state(p.state, p, applied[-1])
    return applied


@pytest.mark.parametrize("dense_base", [False, True])
def test_prune_restrains_the_accumulated_edit(dense_base):
    """Paper: after t batches the weight is W_0 + F(Delta_1 + ... + Delta_t), not sum_i F(Delta_i)."""
    p, _ = spectral_problem([6.0, 1.0], w_max=8.0)  # each batch alone stays under the bound
    parts = [spectral_problem([6.0, 1.0], w_max=8.0, seed=k)[1] for k in (0, 0, 0, 1)]  # aligned: they add up
    if dense_base:
        parts = [Delta(dense_=d.dense()) for d in parts]
    applied = _run_batches(Prune(base=Sequence(parts)), p, parts)
    raw = sum(dense(d) for d in parts)
    U, s, Vt = np.linalg.svd(raw, full_matrices=False)
    assert s[0] > 8.0  # the sum crosses the bound: 3 x 6 along the same direction
    want = (U * log_restrained(s, 8.0)) @ Vt
    assert rel_err(sum(dense(d) for d in applied), want) < 1e-10
    assert rel_err(dense(applied[0]), dense(parts[0])) < 1e-12  # the first batch alone is under the bound
    # S_t and F(S_t) in the state as tensors (dense here: rank 8 of [8, 16] is past the factors' break-even)
    assert {k for k in p.state if k.startswith("prune_")} == {"prune_sum_dense", "prune_total_dense"}
    # per batch (accumulated=False): nothing is restrained, the edits are the base's
    p2, _ = spectral_problem([6.0, 1.0], w_max=8.0)
    alone = _run_batches(Prune(base=Sequence(parts), accumulated=False), p2, parts)
    assert rel_err(sum(dense(d) for d in alone), raw) < 1e-12 and not any(k.startswith("prune_") for k in p2.state)


def test_prune_solving_twice_counts_a_batch_once_and_reports_what_it_restrained():
    p, delta = spectral_problem([20.0, 5.0, 1.0], w_max=8.0)
    solver = Prune(base=Fixed(delta))
    first = dense(solver.solve(p))
    assert rel_err(dense(solver.solve(p)), first) < 1e-12  # not committed: no double count
    diag = solver.diagnostics(p)
    assert diag["prune_restrained"] == 1 and diag["prune_sigma_max"] == pytest.approx(20.0)
    assert diag["prune_bound"] == pytest.approx(8.0)
    solver.update_state(p.state, p, None)
    second = dense(solver.solve(p))  # committed: now F(2 Delta) - F(Delta)
    U, s, Vt = np.linalg.svd(2 * dense(delta), full_matrices=False)
    assert rel_err(first + second, (U * log_restrained(s, 8.0)) @ Vt) < 1e-10


@pytest.mark.parametrize("keep", [0.6, 0.25, 1.0])
def test_rect_keeps_exact_fraction_of_largest_entries(keep):
    rng = np.random.default_rng(0)
    D0 = rng.standard_normal((8, 16))
    p, _ = make_problem()
    out = Rect(base=Fixed(Delta(dense_=t(D0))), keep=keep).solve(p)
    assert out.dense_ is not None
    D1 = dense(out)
    kept = D1 != 0
    assert kept.sum() == round(keep * D0.size)
    assert np.array_equal(D1[kept], D0[kept])
    if keep < 1:
        assert np.abs(D0[kept]).min() >= np.abs(D0[~kept]).max()


def test_rect_relative_change():
    rng = np.random.default_rng(1)
    D0 = rng.standard_normal((8, 16))
    p, a = make_problem()
    D1 = dense(Rect(base=Fixed(Delta(dense_=t(D0))), relative=True).solve(p))
    kept = D1 != 0
    score = np.abs(D0) / np.abs(a["W"])
    assert kept.sum() == round(0.6 * D0.size)
    assert score[kept].min() >= score[~kept].max()


def test_rect_composes_with_memit_and_its_state():
    p, a = make_problem()
    D0 = dense(MEMIT().solve(make_problem()[0]))
    D1 = dense(Rect().solve(p))
    kept = D1 != 0
    assert kept.sum() == round(0.6 * D0.size) and np.array_equal(D1[kept], D0[kept])
    Rect().update_state(p.state, p, None)
    assert np.allclose(p.state["C_cache"].numpy(), a["K"] @ a["K"].T)


def test_base_by_name_and_validation():
    assert Rect(base="emmet").base == EMMET()
    assert Prune().base == MEMIT()
    assert Prune(base={"name": "memit", "lam": 3.0}).base == MEMIT(lam=3.0)
    with pytest.raises(ValueError, match="keep"):
        Rect(keep=0.0)
    with pytest.raises(ValueError, match="keep"):
        Rect(keep=1.5)
    with pytest.raises(ValueError, match="alpha"):
        Prune(alpha=1.0)
    with pytest.raises(ValueError, match="accumulated"):
        Prune(accumulated="no")
    with pytest.raises(ValueError, match="base"):
        Prune(base=42)
    with pytest.raises(ValueError, match="unknown solver"):
        Rect(base="nope")
