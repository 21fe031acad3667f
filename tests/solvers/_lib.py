"""Helpers for the per-solver tests: small random layer problems (f=16, d=8) as NumPy and torch."""

from __future__ import annotations

import numpy as np
import torch

from kedit.solvers import Delta, LayerProblem

F, D = 16, 8
# Background second moment with a clear gap: 8 large eigenvalues in [0.1, 1] and 8 tiny ones in
# [1e-6, 1e-4], so AlphaEdit's default relative threshold (1e-2 of the largest) splits it in half.
SPECTRUM = np.concatenate([np.linspace(1.0, 0.1, 8), np.logspace(-4, -6, 8)])


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def make_problem(n: int = 3, seed: int = 0, n_prev: int = 0) -> tuple[LayerProblem, dict[str, np.ndarray]]:
    """``(LayerProblem, NumPy arrays)`` for ``n`` random requests at one layer.

    ``n_prev`` > 0 puts ``C_cache = Kp Kp^T`` of that many earlier keys into the state (sequential editing).
    The arrays are K [f, n], R [d, n], C [f, f], W [d, f], Q (C's eigenvectors, in SPECTRUM's order), Kp.
    """
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((F, F)))  # [f, f] orthonormal
    C = (Q * SPECTRUM) @ Q.T  # [f, f]
    C = (C + C.T) / 2
    K = rng.standard_normal((F, n))  # [f, n]
    R = rng.standard_normal((D, n))  # [d, n]
    W = rng.standard_normal((D, F))  # [d, f]
    Kp = rng.standard_normal((F, n_prev))  # [f, n_prev]
    state = {"C_cache": t(Kp @ Kp.T)} if n_prev else {}
    p = LayerProblem(layer=3, K=t(K), R=t(R), C=t(C), W=t(W), state=state)
    return p, dict(K=K, R=R, C=C, W=W, Q=Q, Kp=Kp)


def dense(delta: Delta) -> np.ndarray:
    return delta.dense().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def sqrt_psd(C: np.ndarray) -> np.ndarray:
    """``L`` with ``L L^T = C`` for a symmetric PSD ``C`` (eigendecomposition; tiny negatives clipped)."""
    w, V = np.linalg.eigh(C)
    return V * np.sqrt(np.clip(w, 0, None))


def ridge_lstsq(K: np.ndarray, R: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """Delta [d, f] minimising ``||Delta K - R||^2 + sum_B ||Delta B||^2`` by least squares on the stacked rows.

    Each row ``delta`` of Delta solves ``[K^T; B_1^T; ...] delta ~ [r; 0; ...]`` independently (no normal
    equations are formed: this is the direct numerical solution the closed forms are checked against).
    """
    A = np.vstack([K.T] + [B.T for B in blocks])  # [n + sum cols(B), f]
    b = np.vstack([R.T] + [np.zeros((B.shape[1], R.shape[0])) for B in blocks])  # [.., d]
    X, *_ = np.linalg.lstsq(A, b, rcond=None)  # [f, d]
    return X.T


def kkt_min_norm(K: np.ndarray, R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Delta [d, f] minimising ``tr(Delta C Delta^T)`` subject to ``Delta K = R``, from the KKT system."""
    f, n = K.shape
    KKT = np.block([[2 * C, K], [K.T, np.zeros((n, n))]])  # [f + n, f + n]
    rhs = np.vstack([np.zeros((f, R.shape[0])), R.T])  # [f + n, d]
    return np.linalg.solve(KKT, rhs)[:f].T
