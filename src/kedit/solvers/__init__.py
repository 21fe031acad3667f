"""Solvers: how one layer's weights change, given keys K, wanted output changes R and statistics C.

A solver never knows how its targets were built (METHODS §5-6). Each is a frozen dataclass of
hyperparameters with ``name`` and ``solve(problem) -> Delta``; stateful solvers (sequential
editing) also implement ``init_state(problem)`` and ``update_state(state, problem, delta)``, and
their state lives in the editor session, never in a module global.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class LayerProblem:
    layer: int
    K: torch.Tensor   # [f, n] float64: template-averaged keys (W_out inputs at decisive tokens)
    R: torch.Tensor   # [d, n] float64: wanted change of the layer output at the decisive tokens
    C: torch.Tensor   # [f, f] float64: second moment E[k k^T] of background keys
    W: torch.Tensor   # [d, f] current weight (read only, canonical layout)
    state: dict[str, Any] = field(default_factory=dict)  # per-layer solver state of the editor session


@dataclass
class Delta:
    """A weight change in canonical ``[d, f]`` layout: ``U @ V.T`` (low rank) or ``dense``."""

    U: torch.Tensor | None = None   # [d, r]
    V: torch.Tensor | None = None   # [f, r]
    dense_: torch.Tensor | None = None  # [d, f]

    def dense(self) -> torch.Tensor:
        return self.dense_ if self.dense_ is not None else self.U @ self.V.T

    @property
    def rank(self) -> int | None:
        return None if self.U is None else self.U.shape[1]

    def is_finite(self) -> bool:
        parts = [self.dense_] if self.dense_ is not None else [self.U, self.V]
        return all(bool(torch.isfinite(p).all()) for p in parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dense": self.dense_} if self.dense_ is not None else {"U": self.U, "V": self.V}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Delta:
        return cls(dense_=t["dense"]) if "dense" in t else cls(U=t["U"], V=t["V"])


class Solver(Protocol):
    name: str

    def solve(self, p: LayerProblem) -> Delta: ...


def cache_keys(state: dict[str, Any], K: torch.Tensor) -> None:
    """Sequential editing: add ``K K^T`` of applied requests to ``state['C_cache']`` ([f, f])."""
    KKt = K @ K.T
    state["C_cache"] = state["C_cache"] + KKt if "C_cache" in state else KKt


class Preferred(float):
    """A hyperparameter default that defers to the target construction (see ``resolve_defaults``).

    It computes and compares as its float value, the solver's own default when called directly; the
    editor replaces it by the target construction's preferred value. A plain float set by the user is kept.
    """

    def __repr__(self) -> str:
        return f"Preferred({float(self)!r})"


# Preservation weight of MEMIT-style solvers unless the target construction prefers another (the papers' value)
PREFERRED_LAM = Preferred(15000.0)


from kedit.solvers.alphaedit import AlphaEdit  # noqa: E402
from kedit.solvers.emmet import EMMET  # noqa: E402
from kedit.solvers.memit import MEMIT  # noqa: E402
from kedit.solvers.post import Prune, Rect  # noqa: E402
from kedit.solvers.rome import ROME  # noqa: E402

SOLVERS: dict[str, type] = {
    "memit": MEMIT,
    "rome": ROME,
    "alphaedit": AlphaEdit,
    "emmet": EMMET,
    "prune": Prune,
    "rect": Rect,
}


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


def resolve_defaults(solver: Any, preferred: Mapping[str, float]) -> Any:
    """THE preservation-weight policy: every ``Preferred`` default (nested ``base`` solvers too) takes the
    value in ``preferred`` (the target construction's, ``kedit.targets.preferred_hparams``) or, if absent,
    its own; values the user set are kept. Names and objects go through here alike (kedit.editor.Editor).
    """
    if not dataclasses.is_dataclass(solver) or isinstance(solver, type):
        return solver
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(solver):
        value = getattr(solver, f.name)
        if isinstance(value, Preferred):
            changes[f.name] = float(preferred.get(f.name, value))
        elif callable(getattr(value, "solve", None)):  # a base solver (PRUNE / RECT)
            resolved = resolve_defaults(value, preferred)
            if resolved is not value:
                changes[f.name] = resolved
    return dataclasses.replace(solver, **changes) if changes else solver
