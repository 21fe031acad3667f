"""The model's applied-edit stack: undo order is enforced (refused, never a silent corruption)."""

import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.edit import Edit, applied_edits
from kedit.errors import EditFailed, EditOrderError
from kedit.requests import EditRequest
from kedit.solvers import Delta


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _edit(model, layers, seed, force=True):
    """A hand-made edit (random rank-1 deltas) applied to ``model`` on ``layers``."""
    ad = ArchitectureAdapter.from_model(model, probe=False)
    g = torch.Generator().manual_seed(seed)
    e = Edit([EditRequest("The capital of {} is", "France", f"City{seed}")], {"method": "test", "n_requests": 1})
    from kedit.models import tensor_digest

    for layer in layers:
        e.deltas[layer] = Delta(U=torch.randn(ad.d_model, 1, generator=g), V=torch.randn(ad.d_ff, 1, generator=g))
        e.base_digests[layer] = tensor_digest(ad.w_out(layer))
    return e.apply(model, force=force)


@pytest.fixture
def model(tiny_tok):
    return make_tiny("llama", tiny_tok)


def test_undo_of_older_edit_on_same_layer_is_refused_and_changes_nothing(model):
    base = _state(model)
    a = _edit(model, [1], 1)
    b = _edit(model, [1, 2], 2)
    both = _state(model)
    with pytest.raises(EditOrderError, match=r"layer\(s\) \[1\].*undo them first"):
        a.undo()
    assert _same(model, both) and a.is_applied and b.is_applied
    assert applied_edits(model) == [a, b]
    b.undo()
    a.undo()
    assert _same(model, base) and applied_edits(model) == []


def test_disjoint_layers_undo_in_any_order(model):
    base = _state(model)
    a = _edit(model, [0], 1)
    after_a = _state(model)
    b = _edit(model, [3], 2)
    a.undo()  # allowed: b does not touch layer 0
    assert not _same(model, after_a) and applied_edits(model) == [b]
    b.undo()
    assert _same(model, base)
    b2 = _edit(model, [3], 2)
    a2 = _edit(model, [0], 1)
    b2.undo()
    a2.undo()
    assert _same(model, base)


def test_three_edits_undo_in_reverse_restores_each_state(model):
    states = [_state(model)]
    edits = []
    for i in range(3):
        edits.append(_edit(model, [1, 2], 10 + i))
        states.append(_state(model))
    for i in (0, 1):
        with pytest.raises(EditOrderError):
            edits[i].undo()
    for i in (2, 1, 0):
        edits[i].undo()
        assert _same(model, states[i])


def test_undo_after_a_failed_apply(model):
    base = _state(model)
    a = _edit(model, [1], 1)
    after_a = _state(model)
    bad = Edit([EditRequest("{} is", "Paris", "big")], {"method": "test"})
    ad = ArchitectureAdapter.from_model(model, probe=False)
    bad.deltas = {1: Delta(dense_=torch.full((ad.d_model, ad.d_ff), float("nan"))), 2: Delta(dense_=torch.zeros(
        ad.d_model, ad.d_ff))}
    bad.base_digests = {1: "x", 2: "y"}
    with pytest.raises(EditFailed, match="non-finite"):
        bad.apply(model, force=True)
    assert _same(model, after_a) and applied_edits(model) == [a] and not bad.is_applied
    a.undo()
    assert _same(model, base)


def test_stacks_are_per_model(tiny_tok, model):
    other = make_tiny("llama", tiny_tok)
    a = _edit(model, [1], 1)
    b = _edit(other, [1], 1)
    a.undo()  # b is on another model: no conflict
    assert applied_edits(model) == [] and applied_edits(other) == [b]
    b.undo()


def test_editor_edits_join_the_stack(tiny_tok, model):
    from kedit.editor import Editor

    f = ArchitectureAdapter.from_model(model).d_ff
    stats = {layer: torch.eye(f, dtype=torch.float64) for layer in (1, 2)}
    editor = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor={"steps": 2, "lr": 1.0})
    base = _state(model)
    first = editor.apply([EditRequest("The capital of {} is", "France", "Berlin")])
    second = editor.apply([EditRequest("{} plays", "Michael Jordan", "the violin")])
    assert applied_edits(model) == [first, second]
    with pytest.raises(EditOrderError):
        first.undo()
    second.undo()
    first.undo()
    assert _same(model, base)
