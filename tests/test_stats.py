"""Second-moment statistics: one pass == naive per-layer X^T X, padding excluded, cache keyed and verified."""

import json
from dataclasses import fields, replace

import pytest
import torch
from conftest import CORPUS_TEXT, make_tiny

import kedit.stats as stats_mod
from kedit.arch import ArchitectureAdapter
from kedit.corpus import batches, open_corpus, pack_rows, sampled_corpus
from kedit.errors import DatasetFormatError, KeditError, StatsCacheError
from kedit.hooks import Trace
from kedit.stats import StatsInfo, StatsKey, StatsSpec, accumulate, load_stats, second_moments

SENTENCES = [s.strip() + "." for s in CORPUS_TEXT.split(".") if s.strip()]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh cache per test, so hits and misses are this test's own."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT.replace(". ", ".\n"))
    return p


@pytest.fixture
def jsonl_file(tmp_path):
    p = tmp_path / "corpus.jsonl"  # documents of varied length: batches carry padding
    p.write_text("".join(json.dumps({"body": " ".join(SENTENCES[i:i + 1 + i % 4])}) + "\n" for i in range(24)))
    return p


def naive(model, rows, layer):
    """C_l the slow, obvious way: one unpadded forward per row, full depth, plain fp64 X^T X / n."""
    a = ArchitectureAdapter.from_model(model)
    xs = []
    for row in rows:
        with Trace(a) as tr:
            tr.capture_key(layer)
            tr.run(input_ids=torch.tensor([row]))
        xs.append(tr.keys[layer][0].double())
    X = torch.cat(xs)  # [n, f]
    return X.T @ X / X.shape[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_one_pass_equals_naive_per_layer(family, tiny_tok, jsonl_file):
    model = make_tiny(family, tiny_tok)
    spec = StatsSpec(corpus=str(jsonl_file), tokens=300, max_length=24, batch_tokens=96, text_field="body")
    info: dict[int, StatsInfo] = {}
    C = second_moments(model, tiny_tok, [0, 1, 2, 3], spec, progress=False, info=info)
    rows = list(pack_rows(tiny_tok, open_corpus(jsonl_file, "body"), 24, 300))
    assert len({len(r) for r in rows}) > 1  # padding really happens
    for layer in range(4):
        ref = naive(model, rows, layer)
        assert C[layer].dtype == torch.float64 and C[layer].shape == ref.shape
        assert rel_err(C[layer], ref) < 1e-6
        scale = ref.diagonal().sqrt()  # entrywise, relative to sqrt(C_ii C_jj)
        assert ((C[layer] - ref).abs() / torch.outer(scale, scale)).max() < 1e-6
        assert torch.equal(C[layer], C[layer].T)
        assert info[layer].tokens == 300 and not info[layer].cached


def test_padding_excluded(tiny_llama, tiny_tok):
    a = ArchitectureAdapter.from_model(tiny_llama)
    rows = [tiny_tok(s)["input_ids"] for s in SENTENCES[:6]]
    assert len({len(r) for r in rows}) > 1
    padded, n1 = accumulate(a, [1, 3], batches(rows, 10_000, 0), progress=False)
    alone, n2 = accumulate(a, [1, 3], batches(rows, 1, 0), progress=False)  # one row per batch: no padding
    assert n1 == n2 == sum(map(len, rows))
    for layer in (1, 3):
        assert rel_err(padded[layer], alone[layer]) < 1e-6


def test_token_budget_and_packing(tiny_tok, text_file):
    rows = list(pack_rows(tiny_tok, open_corpus(text_file), 16, 100))
    assert sum(map(len, rows)) == 100 and all(0 < len(r) <= 16 for r in rows)
    ids, mask = next(batches(rows, 48, 0))
    assert ids.shape == (3, 16) and mask.all()


def test_cache_hit_on_second_call(tiny_gpt2, tiny_tok, text_file, monkeypatch):
    spec = StatsSpec(corpus=str(text_file), tokens=200, max_length=32)
    info1: dict[int, StatsInfo] = {}
    first = second_moments(tiny_gpt2, tiny_tok, [1, 2], spec, progress=False, info=info1)
    assert all(info1[la].path.is_file() and not info1[la].cached for la in (1, 2))
    monkeypatch.setattr(stats_mod, "accumulate", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    info2: dict[int, StatsInfo] = {}
    second = second_moments(tiny_gpt2, tiny_tok, [2, 1], spec, progress=False, info=info2)
    assert all(info2[la].cached and info2[la].path == info1[la].path for la in (1, 2))
    assert all(torch.equal(first[la], second[la]) for la in (1, 2))


def test_missing_layers_computed_in_one_pass(tiny_llama, tiny_tok, text_file, monkeypatch):
    spec = StatsSpec(corpus=str(text_file), tokens=200, max_length=32)
    second_moments(tiny_llama, tiny_tok, [2], spec, progress=False)
    calls, real = [], stats_mod.accumulate

    def spy(a, layers, *rest, **kw):
        calls.append(layers)
        return real(a, layers, *rest, **kw)

    monkeypatch.setattr(stats_mod, "accumulate", spy)
    info: dict[int, StatsInfo] = {}
    second_moments(tiny_llama, tiny_tok, [0, 2, 3], spec, progress=False, info=info)
    assert calls == [[0, 3]] and info[2].cached and not info[0].cached


def test_cache_invalidated_by_corpus_content_and_budget(tiny_llama, tiny_tok, text_file):
    spec = StatsSpec(corpus=str(text_file), tokens=200, max_length=32)
    info: dict[int, StatsInfo] = {}
    base = second_moments(tiny_llama, tiny_tok, [1], spec, progress=False, info=info)
    path0 = info[1].path
    second_moments(tiny_llama, tiny_tok, [1], replace(spec, tokens=150), progress=False, info=info)
    assert not info[1].cached and info[1].tokens == 150 and info[1].path != path0
    text_file.write_text(text_file.read_text().replace("Paris", "Rome"))  # same path, new content
    changed = second_moments(tiny_llama, tiny_tok, [1], spec, progress=False, info=info)
    assert not info[1].cached and info[1].path != path0
    assert not torch.equal(base[1], changed[1])


def test_key_changes_with_every_field():
    key = StatsKey("fp", "rev", 3, "site", "corpus", "tok", 100, 64, "torch.float32")
    digests = {key.digest()}
    for f in fields(StatsKey):
        value = getattr(key, f.name)
        digests.add(replace(key, **{f.name: value + 1 if isinstance(value, int) else f"{value}x"}).digest())
    assert len(digests) == len(fields(StatsKey)) + 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_detected_and_recomputed(damage, tiny_llama, tiny_tok, text_file):
    spec = StatsSpec(corpus=str(text_file), tokens=200, max_length=32)
    info: dict[int, StatsInfo] = {}
    good = second_moments(tiny_llama, tiny_tok, [1], spec, progress=False, info=info)
    path = info[1].path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF  # inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(StatsCacheError, match=str(path)):
        load_stats(path)
    with pytest.warns(UserWarning, match="recomputing"):
        again = second_moments(tiny_llama, tiny_tok, [1], spec, progress=False, info=info)
    assert not info[1].cached and torch.equal(again[1], good[1])
    load_stats(path)  # rewritten, valid again


def test_cache_with_foreign_key_rejected(tiny_llama, tiny_tok, text_file):
    spec = StatsSpec(corpus=str(text_file), tokens=200, max_length=32)
    info: dict[int, StatsInfo] = {}
    second_moments(tiny_llama, tiny_tok, [1, 2], spec, progress=False, info=info)
    info[1].path.write_bytes(info[2].path.read_bytes())  # a valid file, but for layer 2
    key1 = json.loads(json.dumps(load_stats(info[2].path)[1]["key"]))
    with pytest.raises(StatsCacheError, match="another key"):
        load_stats(info[1].path, StatsKey(**{**key1, "layer": 1}))


def test_errors(tiny_llama, tiny_tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(KeditError, match="empty.txt"):
        second_moments(tiny_llama, tiny_tok, [1], StatsSpec(corpus=str(empty)), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        second_moments(tiny_llama, tiny_tok, [1, 4], StatsSpec(corpus=str(empty)), progress=False)
    with pytest.raises(KeditError, match="nowhere.txt"):
        second_moments(tiny_llama, tiny_tok, [1], StatsSpec(corpus=str(tmp_path / "nowhere.txt")), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DatasetFormatError, match="bad.jsonl:2"):
        second_moments(tiny_llama, tiny_tok, [1], StatsSpec(corpus=str(bad)), progress=False)
    with pytest.raises(ValueError, match="StatsSpec.tokens"):
        StatsSpec(tokens=0)


def test_directory_corpus_sorted_and_hashed(tiny_tok, tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(SENTENCES[1])
    (d / "a.txt").write_text(SENTENCES[0])
    (d / "sub" / "c.txt").write_text(SENTENCES[2])
    (d / "skip.bin").write_bytes(b"\x00\x01")
    corpus = open_corpus(d)
    assert list(corpus.documents()) == SENTENCES[:3]
    rows = list(pack_rows(tiny_tok, corpus, 64, 10_000))
    assert rows == [tiny_tok(s)["input_ids"] for s in SENTENCES[:3]]  # one row per document
    (d / "a.txt").rename(d / "z.txt")
    assert open_corpus(d).identity != corpus.identity


def test_jsonl_text_field_is_part_of_identity(jsonl_file):
    assert open_corpus(jsonl_file, "body").identity != open_corpus(jsonl_file, "text").identity


def test_self_sampled_corpus_is_seeded_and_cached(tiny_llama, tiny_tok, home):
    c1 = sampled_corpus(tiny_llama, tiny_tok, tokens=300, seed=1, progress=False)
    assert c1.path.parent == home / "corpus" and c1.path.is_file()
    mtime = c1.path.stat().st_mtime_ns
    assert sampled_corpus(tiny_llama, tiny_tok, tokens=300, seed=1, progress=False).identity == c1.identity
    assert c1.path.stat().st_mtime_ns == mtime  # reused, not resampled
    c1.path.unlink()
    assert sampled_corpus(tiny_llama, tiny_tok, tokens=300, seed=1, progress=False).identity == c1.identity
    info: dict[int, StatsInfo] = {}
    C = second_moments(tiny_llama, tiny_tok, [2], StatsSpec(tokens=300, seed=1), progress=False, info=info)
    assert info[2].tokens == 300 and torch.isfinite(C[2]).all()


def test_sampling_stops_at_the_context_length(tiny_tok):
    from conftest import make_tiny

    from kedit.sampling import sample

    gpt2 = make_tiny("gpt2", tiny_tok)  # learned positions: a step past n_positions would raise IndexError
    texts = sample(gpt2, tiny_tok, "The city of", 2, max_new_tokens=gpt2.config.n_positions + 50, seed=0, top_k=0)
    assert len(texts) == 2 and all(t.startswith("The city of") for t in texts)


def test_cli_stats_json(tiny_llama, tiny_tok, tmp_path, text_file, capsys):
    from kedit.cli import main

    model_dir = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    argv = ["stats", "--model", str(model_dir), "--layers", "1,3", "--corpus", str(text_file), "--tokens", "200",
            "--max-length", "32", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in out["layers"]] == [1, 3] and not out["layers"][0]["cached"]
    assert all(r["tokens"] == 200 for r in out["layers"])
    assert main(argv) == 0
    assert all(r["cached"] for r in json.loads(capsys.readouterr().out)["layers"])
    assert main(["stats", "--model", str(model_dir), "--layers", "9", "--corpus", str(text_file)]) == 2


def test_corpus_smaller_than_budget_warns(tiny_gpt2, tiny_tok, text_file):
    info: dict[int, StatsInfo] = {}
    with pytest.warns(UserWarning, match="fewer than the budget"):
        spec = StatsSpec(corpus=str(text_file), tokens=10**6)
        second_moments(tiny_gpt2, tiny_tok, [0], spec, progress=False, info=info)
    assert 0 < info[0].tokens < 10**6
