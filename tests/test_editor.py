"""The edit loop on tiny models: update maths, undo, save/load, transactions, every solver x target pair."""

import numpy as np
import pytest
import torch
from conftest import low_rank_stats, make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.edit import Edit
from kedit.editor import Editor, default_layers
from kedit.errors import BadRequest, EditFailed
from kedit.requests import EditRequest
from kedit.solvers import SOLVERS, Delta
from kedit.targets import TARGETS

REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "German", "French"),
]
FAST = {"steps": 4, "lr": 1.0, "clamp_norm_factor": 4.0}


def _identity_stats(model, layers):
    f = ArchitectureAdapter.from_model(model).d_ff
    return {layer: torch.eye(f, dtype=torch.float64) for layer in layers}


def _low_rank_stats(model, layers, seed=0):
    return low_rank_stats(ArchitectureAdapter.from_model(model).d_ff, layers, seed)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_one_request_maps_key_onto_target(tiny_tok, family):
    """C = I, lam = 1e-6: W' k = W k + R to 1e-4 relative (GPT-2 exercises the Conv1D layout)."""
    model = make_tiny(family, tiny_tok)
    editor = Editor(model, tiny_tok, method="memit", targets="onelayer", layers=[2], lam=1e-6,
                    stats=_identity_stats(model, [2]), anchor=FAST)
    w_before = editor.adapter.w_out_weight(2).detach().clone().double()
    edit = editor.apply(REQS[:1])
    p = edit.problems[2]
    w_after = editor.adapter.w_out_weight(2).detach().double()
    change = (w_after - w_before) @ p.K  # [d, 1]
    assert p.R.norm() > 0
    torch.testing.assert_close(change, p.R, rtol=1e-4, atol=1e-4 * p.R.norm().item())


def test_memit_several_requests_match_direct_least_squares(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    lam = 0.5
    editor = Editor(model, tiny_tok, method="memit", targets="onelayer", layers=[2], lam=lam,
                    stats=_identity_stats(model, [2]), anchor=FAST)
    edit = editor.apply(REQS)
    p = edit.problems[2]
    K, R = p.K.numpy(), p.R.numpy()  # [f, n], [d, n]
    f = K.shape[0]
    # min ||D K - R||^2 + lam ||D||^2  <=>  lstsq of D [K, sqrt(lam) I] = [R, 0]
    A = np.concatenate([K, np.sqrt(lam) * np.eye(f)], axis=1)
    B = np.concatenate([R, np.zeros((R.shape[0], f))], axis=1)
    direct = np.linalg.lstsq(A.T, B.T, rcond=None)[0].T
    np.testing.assert_allclose(edit.deltas[2].dense().numpy(), direct, rtol=1e-6, atol=1e-9)


def test_undo_restores_bit_identical_weights(tiny_tok):
    model = make_tiny("gpt2", tiny_tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tiny_tok, layers=[1, 2], stats=_identity_stats(model, [1, 2]), anchor=FAST)
    edit = editor.apply(REQS)
    assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items())
    edit.undo()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_saved_patch_reapplied_to_fresh_model_gives_identical_logits(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1, 2], stats=_identity_stats(model, [1, 2]), anchor=FAST)
    edit = editor.apply(REQS)
    edited = _logits(model)
    path = edit.save(tmp_path / "patch.safetensors")
    fresh = make_tiny("llama", tiny_tok)
    loaded = Edit.load(path)
    assert loaded.layers == [1, 2] and loaded.requests == edit.requests
    assert loaded.record["method"] == "memit" and loaded.record["targets"] == "forward"
    loaded.apply(fresh)
    assert torch.equal(_logits(fresh), edited)
    loaded.undo()
    assert torch.equal(_logits(fresh), _logits(make_tiny("llama", tiny_tok)))
    with loaded.applied(fresh):
        assert torch.equal(_logits(fresh), edited)


def test_patch_refuses_other_base_and_touches_nothing(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    edit = Editor(model, tiny_tok, layers=[1, 2], stats=_identity_stats(model, [1, 2]), anchor=FAST).apply(REQS)
    other = make_tiny("llama", tiny_tok, seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(EditFailed, match="differs"):
        Edit.load(edit.save(tmp_path / "p.safetensors")).apply(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_corrupt_patch_file_is_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a patch")
    from kedit.errors import KeditError

    with pytest.raises(KeditError, match="bad.safetensors"):
        Edit.load(bad)


class _NaNOnSecondLayer:
    name = "nan"
    multi_layer = True

    def __init__(self):
        self.calls = 0

    def solve(self, p):
        self.calls += 1
        d, f = p.W.shape
        value = float("nan") if self.calls == 2 else 1e-3
        return Delta(dense_=torch.full((d, f), value, dtype=torch.float64))


def test_failed_edit_restores_every_layer(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tiny_tok, method=_NaNOnSecondLayer(), layers=[1, 2], stats=_identity_stats(model, [1, 2]),
                    anchor=FAST)
    with pytest.raises(EditFailed, match="layer 2.*restored"):
        editor.apply(REQS)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_requests(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1], stats=_identity_stats(model, [1]), anchor=FAST)
    with pytest.raises(BadRequest, match="conflicting"):
        editor.apply([REQS[0], EditRequest("The capital of {} is", "France", "Madrid")])
    with pytest.raises(BadRequest, match="no edit requests"):
        editor.apply([])
    with pytest.raises(ValueError, match="out of range"):
        Editor(model, tiny_tok, layers=[7])
    with pytest.raises(ValueError, match="unknown solver"):
        Editor(model, tiny_tok, method="nope")
    with pytest.raises(ValueError, match="unknown target"):
        Editor(model, tiny_tok, targets="nope")
    with pytest.raises(ValueError, match="exactly one layer"):
        Editor(model, tiny_tok, method="rome", layers=[1, 2])


def test_default_layers_follow_depth():
    assert default_layers(30, True) == [4, 5, 6, 7, 8]
    assert default_layers(28, True) == [4, 5, 6, 7, 8]
    assert default_layers(30, False) == [4]
    assert default_layers(4, True) == [1]


def test_forward_replay_targets_reproduce_themselves(tiny_tok):
    """Replaying z_1 on the unedited model gives z_2..z_L; replaying z_j at layer j gives the later ones."""
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, targets="forward", layers=[1, 2, 3], stats=_identity_stats(model, [1, 2, 3]),
                    anchor=FAST)
    from kedit.batch import TokenBatch

    prep = TokenBatch(tiny_tok, REQS, editor.templates, 8)
    targets = editor.builder.build(editor._session(prep, {}), editor.layers)
    z = targets.per_layer
    again = editor._replay(prep, 1, z[1], [2, 3])
    torch.testing.assert_close(again[2], z[2], rtol=0, atol=0)
    from_two = editor._replay(prep, 2, z[2], [3])
    torch.testing.assert_close(from_two[3], z[3], rtol=1e-5, atol=1e-5)


def test_backward_shares_sum_to_the_residual():
    from kedit.optimize import Anchors
    from kedit.targets import Targets

    z = torch.randn(2, 4)
    h = torch.randn(2, 4)
    t = Targets([1, 2, 3], 3, z, [Anchors(3, z, h, z - h, torch.zeros(2), torch.zeros(2), torch.zeros(2))], share=True)
    shares = [t.residual(j, lambda _layer: h) for j in range(3)]
    torch.testing.assert_close(shares[0], (z - h) / 3)
    torch.testing.assert_close(shares[2], z - h)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_every_solver_and_target_pair_runs(tiny_tok, family, method, targets):
    model = make_tiny(family, tiny_tok)
    layers = [2] if method == "rome" else [1, 2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tiny_tok, method=method, targets=targets, layers=layers,
                    stats=_low_rank_stats(model, layers), anchor=FAST, diagnostics=True)
    edit = editor.apply(REQS[:2])
    assert edit.layers and all(layer in layers for layer in edit.layers)
    assert all(edit.deltas[layer].dense().abs().sum() > 0 for layer in edit.layers)
    assert len(edit.record["diagnostics"]) == len(edit.layers)
    edit.undo()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_apply_each_equals_separate_applies(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    stats = _low_rank_stats(model, [1, 2])
    editor = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor=FAST)
    singles = []
    for edit in editor.apply_each(REQS):
        singles.append(edit.deltas[2].dense().clone())
        edit.undo()
    for i, r in enumerate(REQS):
        edit = editor.apply([r])
        # float32 solves in a different order: compare relative to the update's scale
        scale = singles[i].abs().max().item()
        torch.testing.assert_close(edit.deltas[2].dense(), singles[i], rtol=1e-3, atol=1e-4 * scale)
        edit.undo()
    with pytest.raises(Exception, match="undo"):
        for _edit in editor.apply_each(REQS[:2]):
            pass


def test_shared_anchor_cache_reuses_anchors_only_for_the_same_weights(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    stats = _low_rank_stats(model, [1, 2])
    cache: dict = {}
    plain = Editor(model, tiny_tok, "alphaedit", layers=[1, 2], stats=stats, anchor=FAST).apply(REQS[:2])
    want = plain.deltas[2].dense().clone()
    plain.undo()
    first = Editor(model, tiny_tok, "memit", layers=[1, 2], stats=stats, anchor=FAST, anchor_cache=cache)
    e1 = first.apply(REQS[:2])
    # one entry per request (kedit.anchor_cache keys anchors per request since issue 11)
    assert len(cache) == 2 and (e1.record["anchors"][0]["reused"], e1.record["anchors"][0]["optimised"]) == (0, 2)
    e1.undo()
    second = Editor(model, tiny_tok, "alphaedit", layers=[1, 2], stats=stats, anchor=FAST, anchor_cache=cache)
    e2 = second.apply(REQS[:2])
    a2 = e2.record["anchors"]
    assert len(a2) == 1 and (a2[0]["layer"], a2[0]["reused"], a2[0]["optimised"], a2[0]["seconds"]) == (1, 2, 0, 0.0)
    torch.testing.assert_close(e2.deltas[2].dense(), want)  # same result as without the cache
    e3 = second.apply(REQS[2:3])  # weights changed by e2: new key, fresh optimisation
    assert e3.record["anchors"][0]["reused"] == 0 and len(cache) == 3
    e3.undo()
    e2.undo()


def test_anchor_cache_keeps_each_finished_chunk_when_a_run_is_interrupted(tiny_tok, tmp_path, monkeypatch):
    """A run killed in its second chunk of anchors leaves the first chunk's anchors in the cache."""
    import kedit.optimize as opt

    model = make_tiny("llama", tiny_tok)
    stats = _low_rank_stats(model, [1, 2])
    real, calls = opt._optimize_chunk, []

    def dies_in_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    editor = Editor(model, tiny_tok, "memit", layers=[1, 2], stats=stats, anchor={**FAST, "batch_size": 2},
                    anchor_cache=tmp_path / "anchors")
    w = model.model.layers[2].mlp.down_proj.weight.detach().clone()
    with monkeypatch.context() as m:
        m.setattr(opt, "_optimize_chunk", dies_in_the_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            editor.apply(REQS[:3])
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, w)   # nothing applied
    assert len(list((tmp_path / "anchors").glob("anchor-*.safetensors"))) == 2   # the first chunk's two
    edit = editor.apply(REQS[:3])
    assert (edit.record["anchors"][0]["reused"], edit.record["anchors"][0]["optimised"]) == (2, 1)
    edit.undo()


def test_sequential_state_carried_and_rolled_back_by_undo(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1, 2], stats=_low_rank_stats(model, [1, 2]), anchor=FAST)
    first = editor.apply(REQS[:2])
    cache = editor.state[2]["C_cache"].clone()
    second = editor.apply(REQS[2:])
    assert not torch.equal(editor.state[2]["C_cache"], cache)
    second.undo()
    assert torch.equal(editor.state[2]["C_cache"], cache)
    first.undo()
    assert "C_cache" not in editor.state[2]


def test_sequential_prune_carries_its_accumulated_edit_and_undo_rolls_it_back(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, "prune", layers=[1, 2], stats=_low_rank_stats(model, [1, 2]), anchor=FAST)
    w0 = model.model.layers[2].mlp.down_proj.weight.detach().clone()
    first = editor.apply(REQS[:2])
    state = {k: v.clone() for k, v in editor.state[2].items()}
    assert {"prune_sum_U", "prune_total_U", "C_cache"} <= set(state) and not any("next" in k for k in state)
    diag = {e["layer"]: e for e in first.record["diagnostics"]}
    assert diag[2]["prune_restrained"] >= 0 and diag[2]["prune_bound"] > 0
    second = editor.apply(REQS[2:])
    w2 = model.model.layers[2].mlp.down_proj.weight.detach().double()
    total = editor.state[2]["prune_total_U"] @ editor.state[2]["prune_total_V"].T  # F(S_2): the whole edit
    torch.testing.assert_close(w2 - w0.double(), total.to(w2), atol=1e-5, rtol=0)
    second.undo()
    assert set(editor.state[2]) == set(state) and all(torch.equal(editor.state[2][k], v) for k, v in state.items())
    first.undo()
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, w0)


def test_default_preservation_weight_is_the_solvers_whatever_the_targets(tiny_llama, tiny_tok):
    # issue 11: one lam default (kedit.solvers.DEFAULT_LAM), for names and objects alike, whatever the targets
    # (before, backward spreading got 5000 through a per-construction preference)
    from kedit.solvers import DEFAULT_LAM, EMMET, MEMIT, Prune, Rect

    def solver(method, targets, **hp):
        return Editor(tiny_llama, tiny_tok, method=method, targets=targets, layers=[1, 2], **hp).solver

    assert DEFAULT_LAM == 15000.0
    for targets in ("backward", "forward", "onelayer", "blue"):
        for method in ("memit", MEMIT(), "emmet", EMMET()):
            assert solver(method, targets).lam == DEFAULT_LAM
        for method in ("prune", Prune(), "rect", Rect()):
            assert solver(method, targets).base == MEMIT(lam=DEFAULT_LAM)
        assert solver("rect", targets, base="emmet").base == EMMET(lam=DEFAULT_LAM)
        assert solver(Rect(base="emmet"), targets).base == EMMET(lam=DEFAULT_LAM)
    # a lam the user set is kept, by name, object or nested base
    assert solver("prune", "backward", base={"name": "memit", "lam": 7.0}).base.lam == 7.0
    assert solver("memit", "backward", lam=5000.0).lam == 5000.0
    assert solver(MEMIT(lam=5000.0), "forward").lam == 5000.0
    assert not hasattr(Editor(tiny_llama, tiny_tok, method="rome", layers=[1]).solver, "lam")
    assert MEMIT().lam == EMMET().lam == DEFAULT_LAM


def test_name_and_object_give_the_same_config_and_edit(tiny_tok):
    from kedit.editor import describe
    from kedit.solvers import MEMIT, Prune

    for name, obj, hp in (("memit", MEMIT(), {}), ("prune", Prune(), {"alpha": 2.0}), ("memit", MEMIT(), {"lam": 3.0})):
        deltas, configs = [], []
        for method in (name, obj):
            model = make_tiny("llama", tiny_tok)
            editor = Editor(model, tiny_tok, method=method, targets="backward", layers=[1, 2],
                            stats=_low_rank_stats(model, [1, 2]), anchor=FAST, **hp)
            configs.append(describe(editor.solver))
            edit = editor.apply(REQS[:1])
            deltas.append({layer: d.dense() for layer, d in edit.deltas.items()})
            assert edit.record["solver"] == configs[-1]
        lam = configs[0]["base"]["lam"] if name == "prune" else configs[0]["lam"]
        assert configs[0] == configs[1] and lam == hp.get("lam", 15000.0)  # one default lam (issue 11)
        assert deltas[0].keys() == deltas[1].keys()
        assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_hparams_with_an_object_method_are_applied_and_checked(tiny_llama, tiny_tok):
    from kedit.solvers import AlphaEdit

    editor = Editor(tiny_llama, tiny_tok, method=AlphaEdit(), layers=[1, 2], L2=3.0)
    assert editor.solver == AlphaEdit(L2=3.0)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lam'\] for solver 'alphaedit'; valid: "):
        Editor(tiny_llama, tiny_tok, method=AlphaEdit(), layers=[1, 2], lam=3.0)
    with pytest.raises(ValueError, match="valid: .*'L2'"):
        Editor(tiny_llama, tiny_tok, method="alphaedit", layers=[1, 2], lam=3.0)


def test_templates_sampled_after_an_edit_are_not_cached_as_the_unedited_models(tiny_tok, tmp_path, monkeypatch):
    """An editor built before the weights changed samples its templates from the weights as they are then,
    and caches them under those weights, never under the fingerprint it was built with."""
    from kedit.templates import context_templates

    model = make_tiny("llama", tiny_tok)
    w = ArchitectureAdapter.from_model(model).w_out_storage(1)
    original = w.detach().clone()
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "reference"))  # references sampled in a home of their own
    unedited = context_templates(model, tiny_tok, seed=0)
    with torch.no_grad():
        w.mul_(3.0)
    edited = context_templates(model, tiny_tok, seed=0)
    with torch.no_grad():
        w.copy_(original)
    assert edited != unedited  # the edit changes what the model samples

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    late = Editor(model, tiny_tok, layers=[1, 2], stats=_identity_stats(model, [1, 2]))  # built, nothing sampled
    with torch.no_grad():
        w.mul_(3.0)
    assert late.templates == edited  # sampled by the weights as they are
    with torch.no_grad():
        w.copy_(original)
    assert Editor(model, tiny_tok, layers=[1, 2], stats=_identity_stats(model, [1, 2])).templates == unedited
