"""EMMET: equality-constrained batch editing (METHODS §5; Gupta et al. 2024, "A unified framework").

``Delta = R (K^T C'^-1 K + eps I)^-1 K^T C'^-1`` with ``C' = lam C (+ C_cache)``. With ``eps = 0`` it is
the minimum-``C'``-norm update with ``Delta K = R`` exactly (ROME's constraint for a batch); ``eps > 0``
regularises an ill-conditioned ``K^T C'^-1 K`` and equals ``argmin eps tr(Delta C' Delta^T) + ||Delta K - R||^2``,
i.e. MEMIT with ``lam * eps`` in place of ``lam``. Computed without any inverse as the rank-n factorisation
``Delta = R B^T``, ``B = A D^-1`` with ``A = solve(C', K)`` [f, n] and ``D = K^T A + eps I`` [n, n]
(both ``C'`` and ``D`` are symmetric, so ``B^T = D^-1 K^T C'^-1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit.solvers.base import DEFAULT_LAM, Delta, LayerProblem, cache_keys, solve, work


@dataclass(frozen=True)
class EMMET:
    name: ClassVar[str] = "emmet"
    multi_layer: ClassVar[bool] = True
    lam: float = DEFAULT_LAM  # mom2_update_weight: C' = lam C, as in MEMIT
    eps: float = 0.1  # emmet_lambda: ridge on K^T C'^-1 K (paper code: 0.1); 0 = exact equality constraints
    # Sequential editing: C' = lam C + C_cache (sum K K^T of earlier batches), the same choice as MEMIT and
    # AlphaEdit here, so earlier edits are preserved like background keys (the EMMET code we read uses
    # lam C only, i.e. sequential_cache=False).
    sequential_cache: bool = True

    def __post_init__(self) -> None:
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0 (C' = lam C must be invertible), got {self.lam}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def solve(self, p: LayerProblem) -> Delta:
        K, R = work(p.K), work(p.R)  # [f, n], [d, n]
        Cp = self.lam * work(p.C)  # [f, f]
        if "C_cache" in p.state:
            Cp = Cp + p.state["C_cache"]
        A = solve(Cp, K)  # [f, n] = C'^-1 K
        D = K.T @ A  # [n, n] = K^T C'^-1 K
        D = (D + D.T) / 2 + self.eps * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
        B = solve(D, A.T).T  # [f, n] = C'^-1 K D^-1
        return Delta(U=R, V=B)

    def update_state(self, state: dict, p: LayerProblem, delta: Delta) -> None:
        if self.sequential_cache:
            cache_keys(state, work(p.K))
