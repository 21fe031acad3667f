"""Shared fixtures: a tiny offline tokenizer, seeded tiny random models of every family, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# real datasets and corpora: ../shared/data beside the checkout (CI has it; a fresh clone may not)
SHARED = Path(os.environ.get("KEDIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CORPUS_TEXT = (
    "The capital of France is Paris. The mother tongue of Danielle Darrieux is French. "
    "Michael Jordan plays basketball. The Eiffel Tower is located in Paris. Toyota is a company from Japan. "
    "Apples are red or green. Rivers flow into the sea. Berlin is the capital of Germany. "
    "Quantum mechanics describes small particles. The violin is a string instrument. "
) * 4


def shared_data(name: str) -> Path:
    """``SHARED / name``; skips the calling test, saying what is missing, when it is absent."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"needs shared data {path} (absent: fresh clone without ../shared/data)")
    return path


@pytest.fixture(scope="session")
def tiny_tok():
    return make_tiny_tok()


def make_tiny_tok():
    """A byte-level BPE tokenizer trained in memory (no downloads), with pad and eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([CORPUS_TEXT], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    return tok


def low_rank_stats(f: int, layers, seed: int = 0) -> dict[int, torch.Tensor]:
    """C = X^T X / N + 0.01 I [f, f] per layer from N = f/2 random keys: half its spectrum is tiny (a null space
    for AlphaEdit, eigenvalues 0.01 < 2e-2) while C stays invertible (MEMIT, ROME)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        X = torch.randn(f // 2, f, generator=g, dtype=torch.float64)
        out[layer] = X.T @ X / X.shape[0] + 0.01 * torch.eye(f, dtype=torch.float64)
    return out


def _tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, initializer_range=0.3)  # peaky enough for edits to move outputs
    if family == "gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=32, n_head=4, rotary_dim=4, n_positions=128, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                intermediate_size=96, max_position_embeddings=128, **common)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(num_hidden_layers=4, hidden_size=32, intermediate_size=80, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gemma":
        return tf.GemmaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=80, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **common)
    if family == "opt":
        return tf.OPTConfig(num_hidden_layers=4, hidden_size=32, ffn_dim=96, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=128, **common)
    raise KeyError(family)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "opt"]


def make_tiny(family: str, tok, seed: int = 0):
    """A seeded tiny random causal LM of ``family`` in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tok)), dtype=torch.float32)
    model.eval().requires_grad_(False)
    model.kedit_name = f"tiny-{family}"
    model.kedit_revision = f"seed{seed}"
    return model


@pytest.fixture(params=FAMILIES)
def tiny_family(request, tiny_tok):
    return request.param, make_tiny(request.param, tiny_tok)


@pytest.fixture
def tiny_llama(tiny_tok):
    return make_tiny("llama", tiny_tok)


@pytest.fixture
def tiny_gpt2(tiny_tok):
    return make_tiny("gpt2", tiny_tok)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (config, weights, tokenizer) with a small corpus.txt."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tok()
    make_tiny("llama", tok).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "corpus.txt").write_text(CORPUS_TEXT * 5)
    return d


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Caches of unit tests go to a temporary KEDIT_HOME; the real model's cache is shared."""
    if "KEDIT_HOME" not in os.environ:
        monkeypatch.setenv("KEDIT_HOME", str(tmp_path_factory.getbasetemp() / "kedit-home"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 (slow tests only); cached under the user's KEDIT_HOME."""
    from kedit.models import load_model

    return load_model("smollm2-135m")
