"""Solver building blocks: Delta, LayerProblem, the Solver protocol, precision helpers, the default lam and
the registry functions. The registry itself (``SOLVERS``) is filled in ``kedit.solvers``; the solver modules
import only this module, so the package has no import cycle.
"""


from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


def work_dtype(device: torch.device | str) -> torch.dtype:
    """Precision of closed-form solves on ``device``: fp64 where it exists (CPU, CUDA), else fp32 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the solve precision of its own device (no copy when it already is)."""
    return x.to(work_dtype(x.device))


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^-1 B`` for ``A [f, f]``, ``B [f, n]``; in fp32 refined once: ``X += A^-1 (B - A X)``.

    One step of fixed-precision refinement makes the fp32 solve backward stable (residual at fp32
    round-off of ``A X``); its forward error stays about ``cond(A) * 6e-8``, small for these
    ridge-regularised systems (tests: within 1e-4 of fp64 on the solvers' problems).
    """
    X = torch.linalg.solve(A, B)
    if A.dtype == torch.float32:
        X = X + torch.linalg.solve(A, B - A @ X)
    return X


@dataclass
class LayerProblem:
    layer: int
    K: torch.Tensor   # [f, n] work dtype: template-averaged keys (W_out inputs at decisive tokens)
    R: torch.Tensor   # [d, n] work dtype: wanted change of the layer output at the decisive tokens
    C: torch.Tensor   # [f, f] work dtype: second moment E[k k^T] of background keys
    W: torch.Tensor   # [d, f] current weight (read only, canonical layout)
    state: dict[str, Any] = field(default_factory=dict)  # per-layer solver state of the editor session
    # [f, n] work dtype: the bare prompt's keys, given when the solver asks (``needs_K_bare``: r-ROME's v* - W k*);
    # None means K is itself the bare key (a single template), so v* - W K = R
    K_bare: torch.Tensor | None = None


@dataclass
class Delta:
    """A weight change in canonical ``[d, f]`` layout: ``U @ V.T`` (low rank), ``mask * (U @ V.T)`` or ``dense``.

    ``mask`` (RECT) is a bit mask over the ``d * f`` entries, packed 8 per byte (row-major, LSB first), so
    a sparsified update costs ``d f / 8`` bytes plus its factors instead of a dense fp64 ``[d, f]``.
    """

    U: torch.Tensor | None = None   # [d, r]
    V: torch.Tensor | None = None   # [f, r]
    dense_: torch.Tensor | None = None  # [d, f]
    mask: torch.Tensor | None = None  # [ceil(d f / 8)] uint8: entries of U V^T kept (with U, V only)

    def dense(self) -> torch.Tensor:
        if self.dense_ is not None:
            return self.dense_
        D = self.U @ self.V.T  # [d, f]
        if self.mask is not None:
            D = D * unpack_mask(self.mask, D.shape).to(D.dtype)
        return D

    @property
    def rank(self) -> int | None:
        return None if self.U is None or self.mask is not None else self.U.shape[1]

    def is_finite(self) -> bool:
        parts = [self.dense_] if self.dense_ is not None else [self.U, self.V]
        return all(bool(torch.isfinite(p).all()) for p in parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.dense_ is not None:
            return {"dense": self.dense_}
        return {"U": self.U, "V": self.V, **({"mask": self.mask} if self.mask is not None else {})}

    def cpu(self) -> Delta:
        """A detached CPU copy (what an Edit keeps and saves)."""
        return Delta.from_tensors({k: v.detach().cpu() for k, v in self.tensors().items()})

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Delta:
        return cls(dense_=t["dense"]) if "dense" in t else cls(U=t["U"], V=t["V"], mask=t.get("mask"))


_BITS = 1 << torch.arange(8)  # [8] bit weights of a packed byte, LSB first


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``mask`` (any shape) -> ``[ceil(numel / 8)]`` uint8, row-major, LSB first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BITS.to(device=flat.device, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_mask``: bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = (packed[:, None] & _BITS.to(device=packed.device, dtype=torch.uint8)) != 0  # [bytes, 8]
    return bits.reshape(-1)[:n].view(*shape)


class Solver(Protocol):
    name: str

    def solve(self, p: LayerProblem) -> Delta: ...


def cache_keys(state: dict[str, Any], K: torch.Tensor) -> None:
    """Sequential editing: add ``K K^T`` of applied requests to ``state['C_cache']`` ([f, f])."""
    KKt = K @ K.T  # [f, f] on K's device
    state["C_cache"] = state["C_cache"] + KKt if "C_cache" in state else KKt


# THE default preservation weight (mom2_update_weight) of MEMIT-style solvers: MEMIT, EMMET and, through their
# MEMIT/EMMET base, PRUNE and RECT; the MEMIT and FE papers' value. The same whatever the target construction
# (backward spreading hands each layer only part of the residual and may want less: pass ``lam`` explicitly).
# AlphaEdit has no lam: its regulariser is its own ``L2``.
DEFAULT_LAM = 15000.0


# name -> solver class; filled (one literal dict) by kedit.solvers, which imports every solver module
SOLVERS: dict[str, type] = {}


def register_solver(name: str, cls: type) -> None:
    """Add a solver class under a new lower-case name (raises on duplicates or bad names)."""
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"solver name {name!r} must be a lower-case identifier")
    if name in SOLVERS:
        raise ValueError(f"solver {name!r} is already registered")
    SOLVERS[name] = cls


def make_solver(name: str, **hparams: Any) -> Solver:
    """Instantiate a registered solver; unknown names or hyperparameters list the valid ones."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(SOLVERS)}")
    cls = SOLVERS[name]
    _check_hparams(cls, name, hparams)
    return cls(**hparams)


def hparam_names(solver: Any) -> list[str]:
    """Hyperparameter names of a solver class or object (its dataclass fields), sorted."""
    return sorted(f.name for f in dataclasses.fields(solver)) if dataclasses.is_dataclass(solver) else []


def _check_hparams(solver: Any, name: str, hparams: Mapping[str, Any]) -> None:
    valid = set(hparam_names(solver))
    bad = set(hparams) - valid
    if bad:
        raise ValueError(f"unknown hyperparameter(s) {sorted(bad)} for solver {name!r}; valid: {sorted(valid)}")


def with_hparams(solver: Any, **hparams: Any) -> Any:
    """A copy of the solver object with ``hparams`` replaced (``dataclasses.replace``), names checked."""
    if not hparams:
        return solver
    name = getattr(solver, "name", type(solver).__name__)
    if not dataclasses.is_dataclass(solver):
        raise ValueError(f"solver {name!r} is not a dataclass: set its hyperparameters when constructing it")
    _check_hparams(solver, name, hparams)
    return dataclasses.replace(solver, **hparams)
