import pytest
import torch
from conftest import make_tiny

from kedit.errors import ModelNotFound
from kedit.models import load_model, model_fingerprint


def test_unknown_model_lists_what_is_available():
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        load_model("no-such-model-anywhere")


def test_local_directory_roundtrip(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    model.save_pretrained(tmp_path)
    tiny_tok.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model_fingerprint(loaded) == model_fingerprint(model)


def test_fingerprint_changes_with_weights(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_embedded_cache_conversion_is_atomic(tmp_path, monkeypatch):
    """A damaged cache (manifest lists a file of another size) is rebuilt, not used."""
    from kedit import models

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")
    (target / "kedit-manifest.json").write_text('{"files": {"model.safetensors": 999}}')
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda folder, f, t: calls.append(t))
    models.ensure_embedded("smollm2-135m")
    assert calls == [target] and not target.exists()
