"""The large-model path on tiny models: bf16/fp16 edits, solve precision, accelerate CPU+disk offload,
load_model's dtype/placement options and their bad-input errors (issue 9)."""

from __future__ import annotations

import pytest
import torch
from conftest import low_rank_stats, make_tiny

import kedit.solvers.base as solvers_mod
from kedit.arch import ArchitectureAdapter
from kedit.edit import Edit
from kedit.editor import Editor
from kedit.errors import EditFailed, ModelLoadError, ModelNotFound
from kedit.models import load_model, model_fingerprint, tensor_digest
from kedit.requests import EditRequest
from kedit.solvers import MEMIT, ROME, AlphaEdit, LayerProblem, solve

REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
]
FAST = {"steps": 3, "lr": 1.0, "clamp_norm_factor": 4.0}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])



def _weights(model) -> dict[str, torch.Tensor]:
    a = ArchitectureAdapter.from_model(model, probe=False)
    return {str(layer): a.w_out_storage(layer).clone() for layer in range(a.n_layers)}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8),
                                                                                 b[k].view(torch.uint8)) for k in a)


CASES = [("memit", "backward", [1, 2]), ("memit", "forward", [1, 2]), ("rome", "onelayer", [1]),
         ("alphaedit", "forward", [1, 2])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_half_precision_edits_save_apply_and_undo_bit_identically(tiny_tok, tmp_path, family, dtype):
    """Each solver edits a bf16/fp16 model in its dtype; the saved patch re-applies to the same bits; undo is exact."""
    model = make_tiny(family, tiny_tok).to(dtype)
    f = ArchitectureAdapter.from_model(model).d_ff
    original = _weights(model)
    for method, targets, layers in CASES:
        editor = Editor(model, tiny_tok, method=method, targets=targets, layers=layers,
                        stats=low_rank_stats(f, layers), anchor=FAST, diagnostics=False)
        edit = editor.apply(REQS)
        assert all(p.dtype == dtype for p in model.parameters())
        edited = _weights(model)
        assert not _same_bits(edited, original), f"{method}/{targets} changed nothing"
        assert edit.record["dtype"] == str(dtype)
        path = edit.save(tmp_path / f"{method}-{targets}.safetensors")
        edit.undo()
        assert _same_bits(_weights(model), original), f"{method}/{targets}: undo is not bit-identical"
        loaded = Edit.load(path).apply(model)
        assert _same_bits(_weights(model), edited), f"{method}/{targets}: the patch re-applies differently"
        loaded.undo()
        assert _same_bits(_weights(model), original)


def test_half_precision_write_rounds_once(tiny_tok):
    """W' = round_bf16(W + delta) computed in fp32: one rounding, not round(W + round(delta))."""
    model = make_tiny("llama", tiny_tok).to(torch.bfloat16)
    a = ArchitectureAdapter.from_model(model)
    w0 = a.w_out_weight(1).clone()
    delta = torch.randn(a.d_model, a.d_ff, dtype=torch.float64) * 1e-3
    a.add_to_w_out(1, delta)
    assert torch.equal(a.w_out_weight(1), (w0.float() + delta.float()).to(torch.bfloat16))


def test_anchors_on_bf16_keep_an_fp32_delta(tiny_tok):
    model = make_tiny("llama", tiny_tok).to(torch.bfloat16)
    f = ArchitectureAdapter.from_model(model).d_ff
    editor = Editor(model, tiny_tok, method="memit", targets="onelayer", layers=[2], stats=low_rank_stats(f, [2]),
                    anchor={**FAST, "steps": 6}, diagnostics=False)
    edit = editor.apply(REQS)
    anchors = edit.targets.anchors[0]
    assert anchors.delta.dtype == torch.float32 and anchors.z.dtype == torch.float32
    assert bool(torch.isfinite(anchors.nll_end).all())
    assert float(anchors.nll_end.mean()) < float(anchors.nll_start.mean())  # the fp32 loss went down
    edit.undo()


# -- solve precision ---------------------------------------------------------------------------------
def _problem(f=48, d=16, n=5, seed=0) -> LayerProblem:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(f, n, generator=g, dtype=torch.float64)
    R = torch.randn(d, n, generator=g, dtype=torch.float64)
    W = torch.randn(d, f, generator=g, dtype=torch.float64)
    return LayerProblem(3, K=K, R=R, C=low_rank_stats(f, [0], seed)[0], W=W)


def test_fp32_solve_with_refinement_matches_fp64():
    """The fp32 path (devices without fp64): refinement lowers the backward error; the forward error stays
    ~cond(A) * eps32 either way (whether it beats the plain solve on one system is round-off noise, BLAS-dependent)."""
    resids = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
        A = Q @ torch.diag(torch.logspace(0, 4, 64, dtype=torch.float64)) @ Q.T  # cond 1e4
        B = torch.randn(64, 3, generator=g, dtype=torch.float64)
        ref = torch.linalg.solve(A, B)
        plain = torch.linalg.solve(A.float(), B.float()).double()
        refined = solve(A.float(), B.float()).double()
        err = [float((X - ref).norm() / ref.norm()) for X in (plain, refined)]
        resid = [float((A @ X - B).norm() / (A.norm() * X.norm())) for X in (plain, refined)]
        assert resid[1] < 1e-7  # backward stable at fp32 round-off
        assert err[1] < 1e4 * 6e-8 * 4  # forward error ~ cond(A) * eps32
        assert err[1] < 2 * err[0]
        resids.append(resid)
    plain_mean, refined_mean = (sum(r) / len(r) for r in zip(*resids))
    assert refined_mean < 0.95 * plain_mean


@pytest.mark.parametrize("solver", [MEMIT(lam=10.0), ROME(), AlphaEdit()], ids=lambda s: s.name)
def test_solvers_in_fp32_match_the_fp64_cpu_reference(monkeypatch, solver):
    """Solvers run in the work dtype of their device; the fp32 one agrees with fp64 within 1e-4 relative."""
    ref = solver.solve(_problem()).dense()
    assert ref.dtype == torch.float64
    monkeypatch.setattr(solvers_mod, "work_dtype", lambda device: torch.float32)  # as on MPS
    got = solver.solve(_problem()).dense()
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-4


# -- accelerate dispatch with CPU and disk offload -----------------------------------------------------
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "cpu"}


@pytest.fixture
def saved_llama(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tok.save_pretrained(path)
    return path


def test_offloaded_model_edits_like_an_undispatched_copy(saved_llama, tmp_path):
    off, tok = load_model(str(saved_llama), device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    plain, _ = load_model(str(saved_llama))
    a = ArchitectureAdapter.from_model(off)
    assert a.w_out(1).device.type == "meta" and a.offload_summary() == {"cpu": 2, "offload": 2}
    assert model_fingerprint(off) == model_fingerprint(plain)  # offloaded weights are read, not skipped
    before, w_before = _logits(off), _weights(off)
    ckpt = {p.name: p.read_bytes() for p in saved_llama.iterdir() if p.suffix == ".safetensors"}
    f = a.d_ff
    kw = dict(method="memit", targets="forward", layers=[1, 2], stats=low_rank_stats(f, [1, 2]), anchor=FAST,
              diagnostics=False)
    edit = Editor(off, tok, **kw).apply(REQS)
    ref_edit = Editor(plain, tok, **kw).apply(REQS)
    assert edit.record["devices"] == {"cpu": 2, "offload": 2}
    assert edit.record["device_map"] == {"cpu": 5, "disk": 3}
    after = _logits(off)
    assert (after - before).abs().max() > 1e-3  # the forward pass uses the edited weights
    torch.testing.assert_close(after, _logits(plain), rtol=1e-4, atol=1e-4)
    path = edit.save(tmp_path / "offload.safetensors")
    edit.undo()
    assert _same_bits(_weights(off), w_before)
    torch.testing.assert_close(_logits(off), before, rtol=0, atol=0)
    assert {p.name: p.read_bytes() for p in saved_llama.iterdir() if p.suffix == ".safetensors"} == ckpt
    ref_edit.undo()
    Edit.load(path).apply(plain)  # the offloaded model's patch on the undispatched copy: same logits
    edit2 = Edit.load(path).apply(off)
    torch.testing.assert_close(_logits(plain), _logits(off), rtol=0, atol=0)
    edit2.undo()


# -- load_model options --------------------------------------------------------------------------------
def test_load_model_dtype_and_checkpoint_dtype(saved_llama, tiny_tok, tmp_path):
    model, _ = load_model(str(saved_llama), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    half = make_tiny("llama", tiny_tok).to(torch.float16)
    half.save_pretrained(tmp_path / "half")
    tiny_tok.save_pretrained(tmp_path / "half")
    kept, _ = load_model(str(tmp_path / "half"))  # dtype=None keeps the checkpoint's
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float8x"), "unknown dtype 'float8x'; valid: auto, float32"),
    (dict(device="cuda"), "CUDA is not available"),
    (dict(device_map={"": "cuda:0"}), r"device_map\[''\] is 'cuda:0' but CUDA is not available"),
    (dict(device_map={"": 1}), "CUDA is not available"),
    (dict(device_map={"": "disk"}), "no offload_folder"),
    (dict(device="cpu", device_map="auto"), "either device or device_map"),
])
def test_bad_load_options_fail_before_loading(saved_llama, monkeypatch, kwargs, match):
    if torch.cuda.is_available() and "CUDA" in match:
        pytest.skip("this machine has CUDA")
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded despite bad options")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(saved_llama), **kwargs)


def test_unwritable_offload_folder_is_refused(saved_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ModelLoadError, match="offload folder .* is not writable"):
        load_model(str(saved_llama), device_map=DISK_MAP, offload_folder=blocker / "offload")


def test_hub_id_offline_uses_the_local_cache(tiny_tok, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1: a cached hub id loads from the cache (with a message); an uncached one fails clearly."""
    snap = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kedit-test--tiny"
    make_tiny("llama", tiny_tok).save_pretrained(repo / "snapshots" / snap)
    tiny_tok.save_pretrained(repo / "snapshots" / snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = load_model("kedit-test/tiny", cache_dir=str(tmp_path / "hub"))
    assert model.kedit_name == "kedit-test/tiny" and model.kedit_revision == snap
    assert "HF_HUB_OFFLINE is set: loaded kedit-test/tiny from the local HF cache" in capsys.readouterr().err
    with pytest.raises(ModelNotFound, match="could not be downloaded .*HF_HUB_OFFLINE.* not in the local HF cache"):
        load_model("kedit-test/absent", revision="v1", cache_dir=str(tmp_path / "hub"))


def test_load_model_does_not_change_transformers_logging(saved_llama):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    load_model(str(saved_llama))
    assert hf_logging.get_verbosity() == hf_logging.WARNING


# -- patches across dtypes -----------------------------------------------------------------------------
def test_bf16_patch_on_fp32_model_is_refused_with_both_dtypes_named(tiny_tok, tmp_path):
    bf = make_tiny("llama", tiny_tok).to(torch.bfloat16)
    f = ArchitectureAdapter.from_model(bf).d_ff
    edit = Editor(bf, tiny_tok, method="memit", targets="onelayer", layers=[2], stats=low_rank_stats(f, [2]),
                  anchor=FAST, diagnostics=False).apply(REQS)
    path = edit.save(tmp_path / "bf16.safetensors")
    fp32 = make_tiny("llama", tiny_tok)
    w = _weights(fp32)
    with pytest.raises(EditFailed, match="made on a torch.bfloat16 model but the model's W_out is torch.float32.*"
                                         "dtype='bfloat16'"):
        Edit.load(path).apply(fp32)
    assert _same_bits(_weights(fp32), w)  # untouched
    forced = Edit.load(path).apply(fp32, force=True)  # documented escape hatch: the cast is the dtype's rounding
    assert forced.is_applied and not _same_bits(_weights(fp32), w)
    forced.undo()
    assert _same_bits(_weights(fp32), w)


def test_tensor_digest_streams_the_same_bytes():
    t = torch.randn(300, 7).to(torch.bfloat16)
    import hashlib

    whole = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:20]
    assert tensor_digest(t) == whole == tensor_digest(t, chunk_bytes=100)


# -- memory-bounded solver outputs and caches ------------------------------------------------------------
def test_rect_delta_stays_factored_with_a_bit_mask(tmp_path):
    from kedit.solvers import Rect, pack_mask, unpack_mask

    m = torch.rand(5, 13) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)
    p = _problem()
    full = MEMIT(lam=10.0).solve(p).dense()
    delta = Rect(base=MEMIT(lam=10.0), keep=0.6).solve(p)
    assert delta.dense_ is None and delta.mask is not None and delta.mask.numel() == -(-full.numel() // 8)
    kept = delta.dense() != 0
    assert int(kept.sum()) == round(0.6 * full.numel())
    assert torch.equal(delta.dense()[kept], full[kept])  # kept entries unchanged
    assert full.abs()[kept].min() >= full.abs()[~kept].max()  # the largest ones


def test_rect_patch_roundtrip_keeps_the_mask(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    f = ArchitectureAdapter.from_model(model).d_ff
    edit = Editor(model, tiny_tok, method="rect", targets="onelayer", layers=[2], stats=low_rank_stats(f, [2]),
                  anchor=FAST, diagnostics=False).apply(REQS)
    edited = _weights(model)
    edit.undo()
    loaded = Edit.load(edit.save(tmp_path / "rect.safetensors"))
    assert loaded.deltas[2].mask is not None and loaded.deltas[2].dense_ is None
    loaded.apply(model)
    assert _same_bits(_weights(model), edited)


def test_alphaedit_projector_is_cached_on_disk(monkeypatch):
    p = _problem()
    first = AlphaEdit().solve(p).dense()

    def no_eigh(*a, **k):
        raise AssertionError("eigh recomputed despite the disk cache")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    again = AlphaEdit().solve(_problem()).dense()  # fresh state: the basis comes from disk
    torch.testing.assert_close(again, first, rtol=1e-12, atol=1e-14)
    with pytest.raises(AssertionError, match="eigh recomputed"):
        AlphaEdit(threshold=0.05).solve(_problem())  # another threshold is another projector (0.02: the default)


def test_records_name_dtype_devices_and_versions(tiny_tok):
    import transformers

    model = make_tiny("llama", tiny_tok).to(torch.bfloat16)
    f = ArchitectureAdapter.from_model(model).d_ff
    editor = Editor(model, tiny_tok, method="memit", targets="onelayer", layers=[2], stats=low_rank_stats(f, [2]),
                    anchor=FAST, diagnostics=False)
    cfg = editor.config()
    assert cfg["dtype"] == "torch.bfloat16" and cfg["devices"] == {"cpu": 4} and cfg["device_map"] is None
    assert cfg["transformers"] == transformers.__version__ and cfg["revision"] == "seed0"
