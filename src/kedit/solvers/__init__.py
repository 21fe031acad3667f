"""Solvers: how one layer's weights change, given keys K, wanted output changes R and statistics C.

A solver never knows how its targets were built (METHODS §5-6). Each is a frozen dataclass of
hyperparameters with ``name`` and ``solve(problem) -> Delta``; stateful solvers (sequential
editing) also implement ``init_state(problem)`` and ``update_state(state, problem, delta)``, and
their state lives in the editor session, never in a module global. Optional: ``diagnostics(problem) -> dict``
(per-layer facts the editor records, e.g. AlphaEdit's ``null_dim``) and ``needs_K_bare`` (the editor then
reads the bare prompt's keys into ``LayerProblem.K_bare``, e.g. for r-ROME's numerator).

Precision and placement: a solve runs where its LayerProblem's tensors are (the editor puts them on
the edited layer's device) in ``work_dtype`` of that device: fp64 on CPU and CUDA; fp32 on devices
without fp64 (Apple MPS), where ``solve`` adds one step of iterative refinement
(``X += A^-1 (B - A X)``), checked against the fp64 CPU result in tests/test_scale.py.
"""

from __future__ import annotations

from kedit.solvers.alphaedit import AlphaEdit
from kedit.solvers.base import (  # noqa: F401  (the public names of kedit.solvers)
    DEFAULT_LAM,
    SOLVERS,
    Delta,
    LayerProblem,
    Solver,
    cache_keys,
    hparam_names,
    make_solver,
    pack_mask,
    register_solver,
    solve,
    unpack_mask,
    with_hparams,
    work,
    work_dtype,
)
from kedit.solvers.emmet import EMMET
from kedit.solvers.memit import MEMIT
from kedit.solvers.post import Prune, Rect
from kedit.solvers.rome import ROME

SOLVERS.update({
    "memit": MEMIT,
    "rome": ROME,
    "alphaedit": AlphaEdit,
    "emmet": EMMET,
    "prune": Prune,
    "rect": Rect,
})
