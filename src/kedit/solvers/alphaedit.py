"""AlphaEdit: MEMIT-style least squares projected onto the null space of the preserved keys (METHODS §5).

``P = U U^T`` with ``U`` the eigenvectors of ``C`` whose eigenvalues fall below a threshold: directions
that background keys (almost) never take. The update solves (AlphaEdit paper, Eq. 14/15, L2 = ``I``'s weight)
``Delta^T = solve(P (K K^T + C_cache) + L2 I, P K R^T)``, i.e. it minimises
``||Delta K - R||^2 + ||Delta K_prev||^2 + L2 ||Delta||^2`` over updates of the form ``Delta = Delta~ P``,
so ``Delta k0 = 0`` for every key ``k0`` in the span of C's large-eigenvalue eigenvectors, whatever
``C_cache`` holds. Kept as the rank-n factorisation ``Delta = R X^T`` with ``X = solve(M, P K)``
(``M`` is not symmetric, so ``Delta = R (M^-1 P K)^T``); ``X`` lies in the range of ``P``.
The projector is computed once per (C, threshold) and cached in the editor's per-layer ``state`` and on disk.

Threshold: absolute ``2e-2`` on the eigenvalues of ``C = E[k k^T]`` by default (the reference code's
``nullspace_threshold``, applied to the SVD of the layer statistics' normalised second moment, which is kedit's
``C``: a mean, not a sum); ``relative=True`` makes it a fraction of C's largest eigenvalue (kedit before issue 11
used ``threshold=1e-2, relative=True``), which does not depend on the model's key scale. Either way the null
space's dimension is reported per layer (``diagnostics``: ``null_dim``), since an absolute threshold can leave
a small or empty null space on a model whose keys are larger than the papers'.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from kedit.io import atomic_write
from kedit.solvers.base import Delta, LayerProblem, cache_keys, solve, work


@dataclass(frozen=True)
class AlphaEdit:
    name: ClassVar[str] = "alphaedit"
    multi_layer: ClassVar[bool] = True
    # Eigenvalues of C below this span the preserved-null space. Absolute by default, the reference code's
    # nullspace_threshold = 2e-2 (tuned for GPT2-XL/GPT-J/Llama3-8B key scales: check null_dim on other models).
    threshold: float = 2e-2
    relative: bool = False  # True: `threshold` is a fraction of C's largest eigenvalue (scale-free variant)
    L2: float = 10.0  # weight of ||Delta P||^2 (paper's hparam "L2"): keeps M invertible, limits the norm
    sequential_cache: bool = True  # keep C_cache = sum K K^T of earlier batches (paper's cache_c)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.relative and self.threshold >= 1:
            raise ValueError(f"threshold must be < 1 when relative=True (fraction of C's largest eigenvalue), "
                             f"got {self.threshold}")
        if not self.L2 > 0:
            raise ValueError(f"L2 must be > 0 (M is singular without it), got {self.L2}")

    def projector(self, p: LayerProblem) -> torch.Tensor:
        """``P`` [f, f] (work dtype, C's device) onto the span of C's small-eigenvalue eigenvectors.

        Computed once per (C, threshold, relative): kept in ``p.state['P']`` for the session and on disk
        (``kedit_home()/stats/P-<digest>.safetensors``, the basis ``U [f, m]`` in fp64; C's content hash
        stands for the model fingerprint, layer and statistics key it came from), so a later run with the
        same statistics skips the ``eigh`` (minutes for f = 14336 on CPU).
        """
        if "P" not in p.state:
            C = work(p.C)
            path = _projector_path(C, self.threshold, self.relative)
            U, cut = _load_basis(path)
            if U is None:
                evals, evecs = torch.linalg.eigh(C)  # ascending; [f], [f, f]
                cut = float(self.threshold * evals[-1].clamp(min=0)) if self.relative else self.threshold
                U = evecs[:, evals < cut]  # [f, m]
                if U.shape[1] == 0:
                    warnings.warn(f"AlphaEdit: no eigenvalue of C below {cut:.3g} at layer {p.layer}: "
                                  "the null space is empty and every update will be zero", stacklevel=2)
                _save_basis(path, U, cut)
            U = U.to(device=C.device, dtype=C.dtype)
            p.state["P"] = U @ U.T  # [f, f]
            p.state["null_dim"] = torch.tensor(U.shape[1])
            p.state["null_cut"] = torch.tensor(cut, dtype=torch.float64)  # the absolute eigenvalue cut used
        return p.state["P"]

    def solve(self, p: LayerProblem) -> Delta:
        K, R = work(p.K), work(p.R)  # [f, n], [d, n]
        P = self.projector(p).to(K.device)  # [f, f]
        A = K @ K.T  # [f, f]
        if "C_cache" in p.state:
            A = A + p.state["C_cache"]
        M = P @ A + self.L2 * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)  # [f, f], not symmetric
        X = solve(M, P @ K)  # [f, n]: Delta^T = X R^T
        return Delta(U=R, V=X)

    def diagnostics(self, p: LayerProblem) -> dict:
        """Per-layer record entries: ``null_dim`` (of ``f`` dimensions) and the threshold it came from."""
        self.projector(p)
        return {"null_dim": int(p.state["null_dim"]), "d_ff": int(p.C.shape[0]),
                "null_threshold": self.threshold, "null_threshold_kind": "relative" if self.relative else "absolute",
                "null_cut": float(p.state["null_cut"])}

    def update_state(self, state: dict, p: LayerProblem, delta: Delta) -> None:
        # The paper adds K K^T of the batch after all layers are edited (keys recomputed on the edited
        # model); here the keys the solve used are cached, as for MEMIT.
        if self.sequential_cache:
            cache_keys(state, work(p.K))


PROJECTOR_VERSION = 2  # 2: the file also holds the eigenvalue cut


def _projector_path(C: torch.Tensor, threshold: float, relative: bool) -> Path:
    from kedit.models import kedit_home, tensor_digest

    key = json.dumps({"C": tensor_digest(C), "dtype": str(C.dtype), "threshold": threshold, "relative": relative,
                      "version": PROJECTOR_VERSION}, sort_keys=True)
    return kedit_home() / "stats" / f"P-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _load_basis(path: Path) -> tuple[torch.Tensor | None, float]:
    """The cached null-space basis and eigenvalue cut, or ``(None, nan)`` (absent, or unreadable: then it is
    recomputed and rewritten)."""
    if not path.is_file():
        return None, float("nan")
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path))
        return saved["U"], float(saved["cut"])
    except Exception as e:  # a damaged cache file is never trusted
        warnings.warn(f"AlphaEdit projector cache {path} is unreadable ({type(e).__name__}); recomputing",
                      stacklevel=3)
        return None, float("nan")


def _save_basis(path: Path, U: torch.Tensor, cut: float) -> None:
    """Write ``U`` (fp64, CPU) atomically: a temp file renamed into place, never half-written."""
    from safetensors.torch import save_file

    tensors = {"U": U.detach().to("cpu", torch.float64).contiguous(), "cut": torch.tensor(cut, dtype=torch.float64)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
