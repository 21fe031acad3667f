"""MEMIT: least squares with preservation (METHODS §5).

``Delta = R K^T (K K^T + C_cache + lam C)^-1``, computed as ``R A^T`` with
``A = solve(K K^T + C_cache + lam C, K)`` in float64 (the bracket is symmetric), so the update is
kept as the rank-n factorisation ``U = R [d, n]``, ``V = A [f, n]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kedit.solvers.base import DEFAULT_LAM, Delta, LayerProblem, cache_keys, solve, work


@dataclass(frozen=True)
class MEMIT:
    name: ClassVar[str] = "memit"
    multi_layer: ClassVar[bool] = True
    lam: float = DEFAULT_LAM  # mom2_update_weight: weight of the preserved keys' second moment (15000)
    sequential_cache: bool = True  # keep C_cache = sum K K^T of earlier batches (sequential editing)

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")

    def solve(self, p: LayerProblem) -> Delta:
        K, R = work(p.K), work(p.R)  # [f, n], [d, n]
        A = K @ K.T + self.lam * work(p.C)  # [f, f]
        if "C_cache" in p.state:
            A = A + p.state["C_cache"]
        V = solve(A, K)  # [f, n]
        return Delta(U=R, V=V)

    def update_state(self, state: dict, p: LayerProblem, delta: Delta) -> None:
        if self.sequential_cache:
            cache_keys(state, work(p.K))
