"""Reference-faithful defaults (issue 11): grouped key weighting, the r-ROME numerator, AlphaEdit's absolute
null-space threshold with null_dim recorded, one default lam, every setting in the record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import low_rank_stats, make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.batch import TokenBatch
from kedit.edit import Edit
from kedit.editor import Editor, describe
from kedit.hooks import Trace
from kedit.requests import EditRequest
from kedit.solvers import ROME, AlphaEdit, LayerProblem
from kedit.templates import template_weights

REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
]
FAST = {"steps": 4, "lr": 1.0, "clamp_norm_factor": 4.0}


def _stats(model, layers, seed=0):
    return low_rank_stats(ArchitectureAdapter.from_model(model).d_ff, layers, seed)


# -- grouped key weighting ---------------------------------------------------------------------------------


def test_template_weights_follow_the_template_list():
    six = ["{}"] + [f"P{i}. {{}}" for i in range(5)]
    assert template_weights(six).tolist() == pytest.approx([0.5] + [0.1] * 5)  # MEMIT's compute_ks
    assert template_weights(six, "flat").tolist() == pytest.approx([1 / 6] * 6)
    three = ["{}", "A. {}", "B. {}"]  # grouping follows the list, not a hard-coded 6
    assert template_weights(three).tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert template_weights(["{}"]).tolist() == [1.0]
    assert template_weights(["A. {}", "B. {}"]).tolist() == pytest.approx([0.5, 0.5])  # one group present
    for w in (template_weights(six), template_weights(three, "flat")):
        assert w.dtype == torch.float64 and float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown key_weighting 'mean'; valid: \\['grouped', 'flat'\\]"):
        template_weights(six, "mean")


def _keys_row_by_row(editor, prep, layer):
    """Each template row's key [n*T, f] from its own unpadded forward pass (no batching)."""
    rows = []
    for r in range(prep.key_ids.shape[0]):
        width = int(prep.key_mask[r].sum())
        with Trace(editor.adapter) as tr:
            tr.capture_key(layer, (torch.arange(1), prep.key_decisive[r:r + 1]))
            tr.stop_after(layer)
            tr.run(input_ids=prep.key_ids[r:r + 1, :width])
        rows.append(tr.keys[layer][0].double())
    return torch.stack(rows)


def test_grouped_keys_equal_the_hand_weighted_mean(tiny_llama, tiny_tok):
    editor = Editor(tiny_llama, tiny_tok, layers=[1, 2], stats=_stats(tiny_llama, [1, 2]), anchor=FAST)
    T = len(editor.templates)
    assert T > 2 and editor.templates[0] == "{}" and editor.key_weighting == "grouped"
    reqs = [*REQS, EditRequest("{} is", "Rome", "Milan", "Lazio")]
    bare_len = TokenBatch(tiny_tok, reqs, editor.templates, 8).key_mask.sum(1)[::T]
    reqs = [reqs[i] for i in torch.argsort(-bare_len, stable=True)]  # longest bare prompt first
    prep = TokenBatch(tiny_tok, reqs, editor.templates, 8)
    per_row = _keys_row_by_row(editor, prep, 1).view(len(reqs), T, -1)  # [n, T, f]
    lengths = prep.key_mask.sum(1)
    assert lengths[prep.bare_rows][0] > lengths[prep.bare_rows][-1]  # _read (length-sorted) reorders bare rows
    bare_h = []  # each bare prompt's block-2 output at its decisive token, from its own pass
    for r in prep.bare_rows.tolist():
        with Trace(editor.adapter) as tr:
            tr.capture_block(2, (torch.arange(1), prep.key_decisive[r:r + 1]))
            tr.run(input_ids=prep.key_ids[r:r + 1, :int(lengths[r])])
        bare_h.append(tr.blocks[2][0])
    for chunk in (256, 3):  # one chunk, and chunks that split the length-sorted rows
        bare_out: dict[int, torch.Tensor] = {}
        keys, hidden = editor._read(prep, [1], [2], chunk=chunk, bare_keys=bare_out)
        hand = 0.5 * per_row[:, 0] + 0.5 * per_row[:, 1:].mean(1)  # [n, f]: within the groups, then over them
        torch.testing.assert_close(keys[1], hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bare_out[1].double(), per_row[:, 0], rtol=1e-4, atol=1e-5)  # fp32, other padding
        torch.testing.assert_close(hidden[2], torch.stack(bare_h), rtol=1e-4, atol=1e-5)  # in request order
    flat = Editor(tiny_llama, tiny_tok, layers=[1, 2], key_weighting="flat")
    flat_keys, _ = flat._read(prep, [1], [])
    torch.testing.assert_close(flat_keys[1], per_row.mean(1), rtol=1e-5, atol=1e-6)
    assert (keys[1] - flat_keys[1]).norm() > 1e-3 * keys[1].norm()  # the two estimators differ here
    assert flat.config()["key_weighting"] == "flat" and editor.config()["key_weighting"] == "grouped"
    with pytest.raises(ValueError, match="unknown key_weighting"):
        Editor(tiny_llama, tiny_tok, layers=[1, 2], key_weighting="Grouped")


# -- r-ROME ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2: Conv1D with a bias, which cancels
def test_rrome_lands_the_averaged_key_on_v_star(tiny_tok, family):
    model = make_tiny(family, tiny_tok)
    editor = Editor(model, tiny_tok, method="rome", layers=[2], stats=_stats(model, [2]), anchor=FAST)
    w0 = editor.adapter.w_out_weight(2).detach().double().clone()  # [d, f]
    edit = editor.apply(REQS[:1])
    p = edit.problems[2]
    assert p.K_bare is not None and (p.K_bare - p.K).norm() > 1e-3 * p.K.norm()  # averaged != bare
    D = edit.deltas[2].dense().double()  # [d, f]
    v_star = w0 @ p.K_bare + p.R  # [d, 1] MLP output (less the bias) at the bare prompt + the wanted change
    # exact in fp64: W' k* = v*
    torch.testing.assert_close((w0 + D) @ p.K, v_star, rtol=1e-10, atol=1e-10 * v_star.norm().item())
    # through the model: keys at the edited layer do not depend on its W_out; MLP output at k* is v* (+ b)
    prep = TokenBatch(tiny_tok, REQS[:1], editor.templates, 1)
    bare_after: dict[int, torch.Tensor] = {}
    k_after, _ = editor._read(prep, [2], [], bare_keys=bare_after)
    torch.testing.assert_close(k_after[2].T, p.K, rtol=1e-6, atol=1e-7)
    w1 = editor.adapter.w_out_weight(2).detach().double()
    torch.testing.assert_close(w1 @ p.K, v_star, rtol=1e-5, atol=1e-5 * v_star.norm().item())
    # the previous numerator ("bare") moves the MLP output at k* by R instead, which misses v* here
    old = ROME(numerator="bare").solve(LayerProblem(2, K=p.K, R=p.R, C=p.C, W=w0, K_bare=p.K_bare)).dense()
    torch.testing.assert_close(old @ p.K, p.R, rtol=1e-9, atol=1e-9 * p.R.norm().item())
    assert ((w0 + old) @ p.K - v_star).norm() > 1e-3 * p.R.norm()
    edit.undo()


def test_rrome_with_a_single_template_moves_the_block_output_to_the_anchor(tiny_llama, tiny_tok):
    editor = Editor(tiny_llama, tiny_tok, method="rome", layers=[2], stats=_stats(tiny_llama, [2]), anchor=FAST)
    editor._templates = ["{}"]  # k* = k_bare: the MLP output changes by exactly R = z - h
    prep = TokenBatch(tiny_tok, REQS[:1], editor.templates, 1)
    _, before = editor._read(prep, [], [2])
    edit = editor.apply(REQS[:1])
    p = edit.problems[2]
    torch.testing.assert_close(p.K_bare, p.K)
    _, after = editor._read(prep, [], [2])
    z = edit.targets.per_layer[2]  # [1, d] the anchor at the decisive token
    torch.testing.assert_close(after[2] - before[2], p.R.T.float(), rtol=1e-4, atol=1e-4 * p.R.norm().item())
    torch.testing.assert_close(after[2], z, rtol=1e-4, atol=1e-4 * z.norm().item())
    bare = ROME(numerator="bare").solve(LayerProblem(2, K=p.K, R=p.R, C=p.C, W=p.W, K_bare=p.K_bare))
    torch.testing.assert_close(bare.dense(), edit.deltas[2].dense(), rtol=1e-12, atol=0.0)
    edit.undo()


def test_rome_numerator_is_validated_and_recorded(tiny_llama, tiny_tok):
    with pytest.raises(ValueError, match="numerator must be one of \\['r-rome', 'bare'\\]"):
        ROME(numerator="z")
    editor = Editor(tiny_llama, tiny_tok, method="rome", layers=[2], numerator="bare")
    assert editor.config()["solver"] == {"name": "rome", "ridge": 0.0, "numerator": "bare"}
    assert ROME().needs_K_bare and not ROME(numerator="bare").needs_K_bare


# -- AlphaEdit's threshold -------------------------------------------------------------------------------

F, D = 16, 8
# 4 large eigenvalues, 4 mid (0.03-0.08: above the absolute 2e-2, below 1e-2 of the top, 10), 8 tiny
SPECTRUM = np.concatenate([np.linspace(10.0, 2.0, 4), np.linspace(0.08, 0.03, 4), np.logspace(-4, -6, 8)])


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((F, F)))  # [f, f] eigenvectors in SPECTRUM's order
    C = (Q * SPECTRUM) @ Q.T
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    p = LayerProblem(3, K=t(rng.standard_normal((F, 3))), R=t(rng.standard_normal((D, 3))), C=t((C + C.T) / 2),
                     W=t(rng.standard_normal((D, F))))
    return p, Q


def test_absolute_threshold_keeps_every_key_above_it_and_reports_null_dim():
    p, Q = _problem()
    solver = AlphaEdit()
    assert (solver.threshold, solver.relative) == (2e-2, False)  # the reference code's nullspace_threshold
    Dl = solver.solve(p).dense().numpy()  # [d, f]
    assert np.abs(Dl).max() > 0
    k0 = Q[:, :8] @ np.random.default_rng(1).standard_normal((8, 20))  # keys in the span above 2e-2
    assert np.linalg.norm(Dl @ k0) <= 1e-9 * np.linalg.norm(Dl, 2) * np.linalg.norm(k0)
    assert solver.diagnostics(p) == {"null_dim": 8, "d_ff": F, "null_threshold": 0.02,
                                     "null_threshold_kind": "absolute", "null_cut": 0.02}
    # the relative variant (1e-2 of the top eigenvalue, cut 0.1) also edits the mid band: those keys move
    p2, _ = _problem()
    rel = AlphaEdit(threshold=1e-2, relative=True)
    Dr = rel.solve(p2).dense().numpy()
    assert rel.diagnostics(p2)["null_dim"] == 12 and rel.diagnostics(p2)["null_cut"] == pytest.approx(0.1)
    mid = Q[:, 4:8] @ np.random.default_rng(1).standard_normal((4, 20))
    assert np.linalg.norm(Dr @ mid) > 1e-3 * np.linalg.norm(Dr, 2) * np.linalg.norm(mid)


def test_null_dim_is_recorded_per_layer_with_or_without_diagnostics(tiny_llama, tiny_tok, tmp_path):
    stats = _stats(tiny_llama, [1, 2])  # eigenvalues: f/2 at 0.01 (< 2e-2), f/2 larger
    f = ArchitectureAdapter.from_model(tiny_llama).d_ff
    for diagnostics in (True, False):
        editor = Editor(tiny_llama, tiny_tok, method="alphaedit", layers=[1, 2], stats=stats, anchor=FAST,
                        diagnostics=diagnostics)
        edit = editor.apply(REQS[:1])
        diag = edit.record["diagnostics"]
        assert [d["layer"] for d in diag] == [1, 2]
        for d in diag:
            assert d["null_dim"] == f // 2 and d["d_ff"] == f
            assert d["null_threshold_kind"] == "absolute" and d["null_threshold"] == 0.02
            assert ("residual_ratio" in d) == diagnostics
        saved = Edit.load(edit.save(tmp_path / f"a{diagnostics}.safetensors")).record
        assert saved["diagnostics"] == diag
        edit.undo()


# -- records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, hparams", [("rect", {"keep": 0.5}), ("alphaedit", {"L2": 3.0})])
def test_record_and_patch_hold_every_setting(tiny_llama, tiny_tok, tmp_path, method, hparams):
    editor = Editor(tiny_llama, tiny_tok, method=method, targets="backward", layers=[1, 2],
                    stats=_stats(tiny_llama, [1, 2]), anchor=FAST, key_weighting="flat", **hparams)
    edit = editor.apply(REQS[:1])
    rec = Edit.load(edit.save(tmp_path / "e.safetensors")).record
    edit.undo()
    assert rec["solver"] == describe(editor.solver) and rec["solver"]["name"] == method
    if method == "rect":  # nested base with its own lam (the one default, not the targets')
        assert rec["solver"] == {"name": "rect", "base": {"name": "memit", "lam": 15000.0, "sequential_cache": True},
                                 "keep": 0.5, "relative": False}
    else:
        assert rec["solver"] == {"name": "alphaedit", "threshold": 0.02, "relative": False, "L2": 3.0,
                                 "sequential_cache": True}
    assert rec["key_weighting"] == "flat" and rec["targets"] == "backward" and rec["layers"] == [1, 2]
    assert rec["edit_layers"] == [1, 2] and rec["anchor"]["steps"] == 4 and rec["templates"] == editor.templates


def test_cli_key_weighting_and_rome_numerator_reach_the_editor(tiny_llama, tiny_tok):
    from kedit.cli import build_parser
    from kedit.commands._common import make_editor

    parser, _ = build_parser()
    args = parser.parse_args(["edit", "--layers", "2", "--method", "rome", "--key-weighting", "flat",
                              "--hparam", "numerator=bare"])
    editor = make_editor(args, tiny_llama, tiny_tok, verbose=False)
    assert editor.key_weighting == "flat" and editor.solver == ROME(numerator="bare")
    default = make_editor(parser.parse_args(["edit", "--layers", "1,2"]), tiny_llama, tiny_tok, verbose=False)
    assert default.key_weighting == "grouped" and default.solver.lam == 15000.0
    with pytest.raises(SystemExit):
        parser.parse_args(["edit", "--key-weighting", "mean"])
