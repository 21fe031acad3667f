"""ROME in the r-ROME form (METHODS §5): an exact rank-one update per request.

``Delta = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)`` with the template-averaged key ``k*`` (``K``) used in
both places (r-ROME, Gupta et al. 2024; the original mixed a bare-prompt key in). ``v*`` is the MLP-output
target at the bare prompt's decisive token: the MLP output there plus the wanted change ``R``, so
``v* - W k* - b = R + W (k_bare - k*)`` (the bias cancels). After the update ``W' k* + b = v*`` exactly.
Numerators (``numerator``):
- ``"r-rome"`` (default, the reference): ``R + W (K_bare - K)``, with ``K_bare`` from the LayerProblem;
- ``"bare"`` (kedit before issue 11): ``R = z - h_bare``, so ``W' k* = W k* + R``: the MLP output at ``k*``
  moves by ``R``, which reaches ``v*`` only when ``k* = k_bare`` (a single template).
``K_bare = None`` means ``K`` is the bare key itself; then both numerators are ``R``.
With several requests the rank-one updates are applied one after another, each on the residual left by the
previous ones with the current ``W`` (ROME's sequential protocol): each request is exact when it is applied,
and later updates may disturb earlier keys. For an exact batch use EMMET with ``eps=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit.solvers.base import Delta, LayerProblem, solve, work

NUMERATORS = ("r-rome", "bare")


@dataclass(frozen=True)
class ROME:
    name: ClassVar[str] = "rome"
    multi_layer: ClassVar[bool] = False
    ridge: float = 0.0  # added to C's diagonal (relative to its mean diagonal) if C is ill-conditioned
    numerator: str = "r-rome"  # "r-rome": v* - W k* (reference); "bare": R = z - h_bare (previous kedit)

    def __post_init__(self) -> None:
        if self.numerator not in NUMERATORS:
            raise ValueError(f"numerator must be one of {list(NUMERATORS)}, got {self.numerator!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")

    @property
    def needs_K_bare(self) -> bool:
        """Whether the editor must read the bare prompt's keys into ``LayerProblem.K_bare``."""
        return self.numerator == "r-rome"

    def solve(self, p: LayerProblem) -> Delta:
        K, R = work(p.K), work(p.R)  # [f, n], [d, n]
        if self.numerator == "r-rome" and p.K_bare is not None:
            W = work(p.W).to(K.device)  # [d, f]
            R = R + W @ (work(p.K_bare).to(K.device) - K)  # [d, n] = v* - W k* - b
        C = work(p.C)
        if self.ridge:
            C = C + self.ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        CinvK = solve(C, K)  # [f, n]: C^-1 k_i per column
        U = torch.zeros_like(R)
        V = torch.zeros_like(CinvK)
        for i in range(K.shape[1]):
            k, u = K[:, i], CinvK[:, i]
            # residual still missing for request i after the rank-one updates of earlier requests (current W)
            r = R[:, i] - U[:, :i] @ (V[:, :i].T @ k)
            U[:, i] = r
            V[:, i] = u / (k @ u)
        return Delta(U=U, V=V)
