"""Contract matrix over every registered solver (ARCHITECTURE §2.5): shapes, dtype, rank, determinism, state."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kedit.solvers import SOLVERS, Delta, LayerProblem, make_solver

F, D, N = 16, 8, 3
LOW_RANK = {"memit", "rome", "alphaedit", "emmet", "prune"}  # solvers that promise U V^T with rank <= n


def problem(seed: int = 0, w_dtype: torch.dtype = torch.float64) -> LayerProblem:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(F, F, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -6, F, dtype=torch.float64)  # decaying, like real key statistics
    C = (Q * spectrum) @ Q.T  # [f, f]
    return LayerProblem(
        layer=2,
        K=torch.randn(F, N, generator=g, dtype=torch.float64),  # [f, n]
        R=torch.randn(D, N, generator=g, dtype=torch.float64),  # [d, n]
        C=(C + C.T) / 2,
        W=torch.randn(D, F, generator=g, dtype=torch.float64).to(w_dtype),  # [d, f]
    )


@pytest.fixture(params=sorted(SOLVERS))
def name(request):
    return request.param


def test_registry_entry(name):
    cls = SOLVERS[name]
    assert cls.name == name and name == name.lower()
    assert isinstance(cls.multi_layer, bool)
    solver = make_solver(name)
    assert isinstance(solver, cls) and callable(solver.solve)
    # a frozen dataclass: hyperparameters are its fields and cannot change under a running editor
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert hash(solver) == hash(make_solver(name)) and solver == make_solver(name)


@pytest.mark.parametrize("w_dtype", [torch.float64, torch.float32])
def test_delta_contract(name, w_dtype):
    p = problem(w_dtype=w_dtype)
    before = {k: getattr(p, k).clone() for k in "KRCW"}
    delta = make_solver(name).solve(p)
    assert isinstance(delta, Delta)
    full = delta.dense()
    assert full.shape == (D, F) and full.dtype == torch.float64
    assert delta.is_finite() and bool(full.abs().max() > 0)
    if name in LOW_RANK:
        assert delta.rank is not None and delta.rank <= N
        assert delta.U.shape == (D, delta.rank) and delta.V.shape == (F, delta.rank)
        assert int(torch.linalg.matrix_rank(full)) <= N
    for k, v in before.items():  # inputs are read only
        assert torch.equal(getattr(p, k), v)


def test_deterministic(name):
    solver = make_solver(name)
    a = solver.solve(problem()).dense()
    b = solver.solve(problem()).dense()
    assert torch.equal(a, b)


def test_sequential_state(name):
    """Two batches through one per-layer state: the state stays tensors (saved with the Edit), solves stay finite."""
    solver = make_solver(name)
    state: dict = {}
    for seed in (0, 1):
        p = problem(seed)
        p.state = state
        delta = solver.solve(p)
        assert delta.is_finite()
        if hasattr(solver, "update_state"):
            solver.update_state(state, p, delta)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if hasattr(solver, "update_state") and getattr(solver, "sequential_cache", True):
        assert "C_cache" in state and state["C_cache"].shape == (F, F)
    # the state is the editor's: a copy solved again gives the same answer
    p = problem(2)
    p.state = copy.deepcopy(state)
    p2 = problem(2)
    p2.state = copy.deepcopy(state)
    assert torch.equal(solver.solve(p).dense(), solver.solve(p2).dense())
