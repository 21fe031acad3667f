"""PRUNE and RECT: post-processing of another solver's Delta, MEMIT's by default (METHODS §5).

Each wraps a ``base`` solver: ``solve`` runs the base and restrains its Delta, ``update_state`` is the
base's (so sequential editing keeps the base's ``C_cache``). The base is a solver object, a registry name
or a config dict with a ``name``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kedit.solvers.base import Delta, LayerProblem, pack_mask, work
from kedit.solvers.memit import MEMIT


@dataclass(frozen=True)
class _PostProcess:
    multi_layer: ClassVar[bool] = True
    # the solver whose Delta is post-processed: an object, a SOLVERS name or a config {"name": ..., **hparams}
    base: Any = field(default_factory=MEMIT)

    def __post_init__(self) -> None:
        from kedit.solvers.base import make_solver  # the registry is filled once kedit.solvers is imported

        if isinstance(self.base, str):
            object.__setattr__(self, "base", make_solver(self.base))
        elif isinstance(self.base, dict) and "name" in self.base:
            object.__setattr__(self, "base", make_solver(**self.base))
        if not callable(getattr(self.base, "solve", None)):
            raise ValueError(f"base must be a solver (with solve()) or a registered name, got {self.base!r}")

    def diagnostics(self, p: LayerProblem) -> dict:
        """The base solver's per-layer record entries (e.g. AlphaEdit's null_dim), if it has any."""
        return self.base.diagnostics(p) if hasattr(self.base, "diagnostics") else {}

    def update_state(self, state: dict, p: LayerProblem, delta: Delta) -> None:
        if hasattr(self.base, "update_state"):
            self.base.update_state(state, p, delta)


def _svd(delta: Delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``Delta = L diag(s) Rv^T``: ``L`` [d, r], ``s`` [r] (descending), ``Rv`` [f, r]; r = rank bound."""
    if delta.U is None or delta.mask is not None:
        L, s, Vh = torch.linalg.svd(work(delta.dense()), full_matrices=False)
        return L, s, Vh.T
    # U V^T = Qu (Ru Rv^T) Qv^T: only an r x r SVD, never the [d, f] matrix
    Qu, Ru = torch.linalg.qr(work(delta.U))  # [d, r], [r, r]
    Qv, Rv = torch.linalg.qr(work(delta.V))  # [f, r], [r, r]
    A, s, Bh = torch.linalg.svd(Ru @ Rv.T)  # [r, r], [r], [r, r]
    return Qu @ A, s, Qv @ Bh.T


def _compact(U: torch.Tensor, V: torch.Tensor) -> Delta:
    """``U V^T`` as factors while the rank is below the dense size's break-even ``d f / (d + f)``, else dense."""
    (d, r), f = U.shape, V.shape[0]
    return Delta(U=U, V=V) if r < d * f / (d + f) else Delta(dense_=U @ V.T)


def _plus(a: Delta, b: Delta, sign: float = 1.0) -> Delta:
    """``a + sign * b`` (factors ``[U_a, sign U_b] [V_a, V_b]^T`` while both are plain low rank)."""
    if a.rank is not None and b.rank is not None:
        return _compact(torch.cat([a.U, sign * b.U.to(a.U)], 1), torch.cat([a.V, b.V.to(a.V)], 1))
    A = work(a.dense())
    return Delta(dense_=A + sign * work(b.dense()).to(A.device))


@dataclass(frozen=True)
class Prune(_PostProcess):
    """PRUNE (Ma et al. 2024): log-compress the singular values of the edit above ``sigma_max(W)``.

    With ``b = sigma_max(W)``: ``sigma -> min(sigma, b + log_alpha(sigma) - log_alpha(b))`` for
    ``sigma > b`` (PRUNE's F, as in its public ``func_log`` / ``func_logn``), others unchanged. The
    ``min`` only matters when ``b ln(alpha) < 1`` (F would then enlarge sigma just above b; alpha = 1.2
    needs b >= 5.5), so it never changes PRUNE's result where PRUNE restrains.
    Singular vectors are kept. ``b`` is taken from the first W seen at this layer (the unedited weight)
    and cached in ``state['W_sigma_max']``, so every sequential batch is bounded by the original model's
    spectrum, as in the paper.

    What is restrained (``accumulated``):
      - ``True`` (default, the paper's code): the *accumulated* edit of the editor session. With
        ``S_t = Delta_1 + ... + Delta_t`` the base solver's raw Deltas, the weight after batch t is
        ``W_0 + F(S_t)``, so batch t applies ``F(S_t) - F(S_{t-1})`` (rank <= rank S_t + rank S_{t-1}).
        ``S`` and ``F(S)`` are kept in the layer's solver state, factored while their rank (<= edits so far)
        is below ``d f / (d + f)``, else dense.
        On a single batch this equals restraining that batch's Delta.
      - ``False``: each batch's Delta on its own. Batches smaller than the weight's spectrum are then never
        restrained (500 CounterFact edits in batches of 50 on SmolLM2: identical to MEMIT).
    """

    name: ClassVar[str] = "prune"
    alpha: float = math.e  # base of the log in F (PRUNE's code offers e, 2, 1.5 and 1.2)
    accumulated: bool = True  # restrain the session's accumulated edit (paper) or each batch's Delta alone

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha > 1:
            raise ValueError(f"alpha (log base) must be > 1, got {self.alpha}")
        if not isinstance(self.accumulated, bool):
            raise ValueError(f"accumulated must be true or false, got {self.accumulated!r}")

    def solve(self, p: LayerProblem) -> Delta:
        if "W_sigma_max" not in p.state:
            p.state["W_sigma_max"] = torch.linalg.matrix_norm(work(p.W), ord=2)  # [] spectral norm
        raw = self.base.solve(p)
        previous = _get(p.state, "prune_sum") if self.accumulated else None  # S_{t-1}
        L, s, Rv = _svd(raw if previous is None else _plus(previous, raw))  # [d, r], [r], [f, r]
        b = p.state["W_sigma_max"].to(s)
        F = b + (torch.log(s) - torch.log(b)) / math.log(self.alpha)  # [r]; -inf where s == 0 (unused)
        restrained = torch.where(s > b, torch.minimum(s, F), s)
        total = _compact(L * restrained, Rv)  # F(S_t)
        # S_t and F(S_t) are committed by update_state once the edit is applied: solving twice counts a batch once
        _put(p.state, "prune_next_sum", _compact(L * s, Rv))
        _put(p.state, "prune_next_total", total)
        p.state["prune_next_stats"] = torch.stack([s.max(), b, (restrained < s).sum().to(s)])  # [3]
        return _plus(total, _get(p.state, "prune_total"), -1.0) if previous is not None else total

    def diagnostics(self, p: LayerProblem) -> dict:
        own = {}
        if "prune_next_stats" in p.state:
            sigma_max, bound, restrained = p.state["prune_next_stats"].tolist()
            own = {"prune_sigma_max": sigma_max, "prune_bound": bound, "prune_restrained": int(restrained)}
        return {**super().diagnostics(p), **own}

    def update_state(self, state: dict, p: LayerProblem, delta: Delta) -> None:
        if self.accumulated and "prune_next_stats" in state:  # a solved, now applied batch
            for part in ("sum", "total"):
                _put(state, f"prune_{part}", _get(state, f"prune_next_{part}"))
        for key in [k for k in state if k.startswith("prune_next_")]:
            del state[key]
        super().update_state(state, p, delta)


def _put(state: dict, prefix: str, delta: Delta) -> None:
    """Keep a Delta in a solver state as tensors: ``{prefix}_U`` / ``{prefix}_V`` or ``{prefix}_dense``."""
    for k in [k for k in state if k.startswith(prefix + "_")]:
        del state[k]
    state.update({f"{prefix}_{k}": v for k, v in delta.tensors().items()})


def _get(state: dict, prefix: str) -> Delta | None:
    parts = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + "_")}
    return Delta.from_tensors(parts) if parts else None


@dataclass(frozen=True)
class Rect(_PostProcess):
    """RECT (Gu et al. 2024): keep the top ``keep`` fraction of Delta's entries, zero the rest.

    Exactly ``round(keep * d * f)`` entries are kept, unchanged. Ranked by ``|Delta_ij|`` (METHODS §5), or
    by the relative change ``|Delta_ij| / |W_ij|`` (the paper's "RElative Change in weighT") with
    ``relative=True``, against the current weight. A low-rank base Delta stays factored, with the kept
    entries as a packed bit mask (``Delta.mask``, d f / 8 bytes); a dense base stays dense.
    """

    name: ClassVar[str] = "rect"
    keep: float = 0.6  # fraction of entries kept (METHODS §5: top 60%)
    relative: bool = False  # rank by |Delta| / |W| instead of |Delta|

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")

    def solve(self, p: LayerProblem) -> Delta:
        base = self.base.solve(p)
        D = work(base.dense())  # [d, f] transient
        score = D.abs()
        if self.relative:  # |W_ij| = 0 -> inf (kept first); 0 / 0 -> nan -> 0
            score = torch.nan_to_num(score / work(p.W).abs().to(D.device), nan=0.0)
        k = round(self.keep * D.numel())
        idx = torch.topk(score.flatten(), k, sorted=False).indices  # [k]
        mask = torch.zeros(D.numel(), dtype=torch.bool, device=D.device)
        mask[idx] = True
        if base.U is not None and base.mask is None:
            return Delta(U=base.U, V=base.V, mask=pack_mask(mask))
        return Delta(dense_=torch.where(mask.view_as(D), D, torch.zeros((), dtype=D.dtype, device=D.device)))
