"""ROME in the r-ROME form (METHODS §5): an exact rank-one update per request.

``Delta = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)`` with the template-averaged key ``k*`` used in
both places. With several requests the rank-one updates are applied one after another, each on the
residual left by the previous ones (ROME's sequential protocol): each request is exact when it is
applied, and later updates may disturb earlier keys. For an exact batch use EMMET with ``eps=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit.solvers import Delta, LayerProblem, solve, work


@dataclass(frozen=True)
class ROME:
    name: ClassVar[str] = "rome"
    multi_layer: ClassVar[bool] = False
    ridge: float = 0.0  # added to C's diagonal (relative to its mean diagonal) if C is ill-conditioned

    def solve(self, p: LayerProblem) -> Delta:
        K, R = work(p.K), work(p.R)  # [f, n], [d, n]
        C = work(p.C)
        if self.ridge:
            C = C + self.ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        CinvK = solve(C, K)  # [f, n]: C^-1 k_i per column
        U = torch.zeros_like(R)
        V = torch.zeros_like(CinvK)
        for i in range(K.shape[1]):
            k, u = K[:, i], CinvK[:, i]
            # residual still missing for request i after the rank-one updates of earlier requests
            r = R[:, i] - U[:, :i] @ (V[:, :i].T @ k)
            U[:, i] = r
            V[:, i] = u / (k @ u)
        return Delta(U=U, V=V)
