"""MQuAKE loader and metrics, answer normalisation, zsRE portability and model health on known-logit models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_helpers import WORDS, BigramLM, FakeEdit, base_table, word_tok

import kedit.probe
from kedit.errors import DatasetFormatError
from kedit.eval import Evaluator
from kedit.eval import metrics as M
from kedit.eval.datasets import load_dataset
from kedit.eval.health import Health, health_prompts

W = {w: i for i, w in enumerate(WORDS)}
UNK = W["<unk>"]  # the QA prompt ends in "A:", which the word tokenizer maps to <unk>


@pytest.fixture
def bigram():
    t = base_table()
    t[W["in"], W["Africa"]] += 2.0       # pre-edit: "... located in" -> Africa
    t[UNK, W["Berlin"]] += 2.0           # pre-edit: the QA prompt's answer is Berlin
    return BigramLM(t), word_tok()


class CellEditor:
    """Adds ``amount`` to several logit cells per apply call; undo restores the table exactly."""

    def __init__(self, model: BigramLM, cells: list[tuple[int, int]], amount: float = 5.0):
        self.model, self.cells, self.amount, self.log = model, cells, amount, []

    def apply(self, requests):
        edit = FakeEdit(self.model.table, self.log)
        with torch.no_grad():
            for r, c in self.cells:
                self.model.table[r, c] += self.amount
        self.log.append(("apply", len(requests)))
        return edit

    def apply_each(self, requests):
        for r in requests:
            yield self.apply([r])

    def config(self) -> dict:
        return {"method": "cells"}

    def reset(self) -> None:
        self.log.append("reset")


def _mquake_record(case_id: int = 7) -> dict:
    return {"case_id": case_id,
            "requested_rewrite": [
                {"prompt": "{} is located in", "subject": "Angola", "target_new": {"str": "Antarctica"},
                 "target_true": {"str": "Africa"}},
                {"prompt": "{} belongs to", "subject": "Ghana", "target_new": {"str": "Japan"},
                 "target_true": {"str": "France"}}],
            "questions": ["capital of Angola ?", "the capital of Angola ?"],
            "answer": "Berlin", "answer_alias": ["Berlin Germany"],
            "new_answer": "Paris", "new_answer_alias": ["Paris France"],
            "new_single_hops": [{"cloze": "Angola is located in", "answer": "Antarctica", "answer_alias": []},
                                {"cloze": "Ghana belongs to", "answer": "Japan", "answer_alias": ["Tokyo"]}]}


def _write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _greedy_argmax(calls):
    """A stand-in for kedit.probe.greedy: one greedy step of the bigram model (the argmax after the prompt)."""
    def greedy(model, tok, prompts, max_new_tokens=8):
        calls.append(max_new_tokens)
        return [" " + WORDS[int(model.table[tok(p)["input_ids"][-1]].argmax())] + "\nQ: next" for p in prompts]
    return greedy


# -- loader ------------------------------------------------------------------------------------------
def test_mquake_loader_reads_every_rewrite(tmp_path):
    data = load_dataset(f"mquake:{_write(tmp_path, [_mquake_record(1), _mquake_record(2)])}")
    c = data.cases[1]
    assert data.kind == "mquake" and c.kind == "mquake" and c.case_id == 2 and len(c.requests) == 2
    assert [r.target_new for r in c.requests] == ["Antarctica", "Japan"] and c.request == c.requests[0]
    assert c.multihop.new_answer == "Paris" and c.multihop.answer_aliases == ("Berlin Germany",)
    assert c.multihop.new_single_hops[1] == ("Ghana belongs to", "Japan", ("Tokyo",))


@pytest.mark.parametrize("breaks, field", [
    (lambda r: r["requested_rewrite"][1].pop("target_new"), "requested_rewrite.1: missing field 'target_new.str'"),
    (lambda r: r.pop("questions"), "missing field 'questions'"),
    (lambda r: r.update(questions=[]), "'questions' must hold at least one question"),
    (lambda r: r.update(new_answer=""), "'new_answer' must be a non-empty string"),
    (lambda r: r["new_single_hops"][0].pop("cloze"), "new_single_hops.0: missing field 'cloze'"),
    (lambda r: r.update(requested_rewrite=[]), "'requested_rewrite' must be a non-empty list"),
    (lambda r: r["requested_rewrite"][0].update(prompt="{} and {}"), "requested_rewrite.0"),
])
def test_mquake_malformed_record_names_case_and_field(tmp_path, breaks, field):
    bad = _mquake_record(9)
    breaks(bad)
    path = _write(tmp_path, [_mquake_record(1), bad])
    with pytest.raises(DatasetFormatError) as e:
        load_dataset(f"mquake:{path}")
    assert f"{path} record 1" in str(e.value) and field in str(e.value)
    assert len(load_dataset(f"mquake:{path}", allow_skips=True).cases) == 1


# -- answer matching ----------------------------------------------------------------------------------
def test_alias_normalisation():
    assert M.normalize_answer("  The Kolinda Grabar-Kitarović! ") == "kolinda grabar kitarovic"
    assert M.answer_span("\n Croatia.\nQ: who") == "Croatia." and M.answer_span(" Paris Q: next") == "Paris"
    assert M.alias_match(" Croatia, a country\nQ: x", ["Croatia"])
    assert M.alias_match(" the republic of croatia", ["Republic of Croatia"])
    assert M.alias_match(" Grabar-Kitarovic", ["Kolinda Grabar-Kitarović", "Grabar-Kitarović"])
    assert not M.alias_match(" Croatian citizenship", ["Croatia"])  # whole words only
    assert not M.alias_match("\nQ: Croatia", ["Croatia"])  # the answer line is cut at a new question
    assert not M.alias_match(" anything", ["", "  "])      # empty aliases never match


# -- multi-hop scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "single"])
def test_multihop_scoring_on_known_model(bigram, tmp_path, monkeypatch, mode):
    model, tok = bigram
    calls: list[int] = []
    monkeypatch.setattr(kedit.probe, "greedy", _greedy_argmax(calls))
    before = model.table.detach().clone()
    data = load_dataset(f"mquake:{_write(tmp_path, [_mquake_record(1), _mquake_record(2)])}")
    # the edit makes Antarctica follow "in", Japan follow "to", and Paris answer the QA prompt
    editor = CellEditor(model, [(W["in"], W["Antarctica"]), (W["to"], W["Japan"]), (UNK, W["Paris"])])
    rep = Evaluator(model, tok, multihop_tokens=5).run(data.cases, editor, mode=mode)
    pre, post = rep.cases[0]["pre"], rep.cases[0]["post"]
    assert pre["edit_wise_score"] == 0.0 and post["edit_wise_score"] == 1.0  # Africa, France win before
    assert pre["edit_wise_acc"] == 0.0 and post["edit_wise_acc"] == 1.0
    assert (pre["multihop_acc"], pre["multihop_old_acc"]) == (0.0, 1.0)      # answers Berlin before
    assert (post["multihop_acc"], post["multihop_old_acc"]) == (1.0, 0.0)    # and Paris after
    assert pre["multihop_score"] == 0.0 and post["multihop_score"] == 1.0
    assert pre["hopwise_acc"] == 0.0 and post["hopwise_acc"] == 1.0
    assert post["p_new"] > pre["p_new"] and "efficacy_score" not in post  # no single-edit CounterFact family
    assert rep.summary["multihop_acc"]["mean"] == 1.0 and rep.summary["multihop_acc"]["pre"]["mean"] == 0.0
    assert rep.summary["multihop_acc"]["family"] == "mquake" and set(rep.summary) <= set(M.METRICS)
    assert set(calls) == {5} and rep.cases[0]["answers_post"]["mh/0"].startswith(" Paris")
    assert torch.equal(model.table, before)  # every edit undone
    applies = [e for e in editor.log if isinstance(e, tuple)]
    if mode == "batch":  # all cases' rewrites in one batch
        assert applies == [("apply", 4)] and "4 rewrites" in rep.evaluated
    else:  # one batch per case, holding that case's rewrites
        assert applies == [("apply", 2), ("apply", 2)] and rep.evaluated.startswith("per case")


def test_multihop_without_generation_keeps_teacher_forced_metrics(bigram, tmp_path, monkeypatch):
    model, tok = bigram
    monkeypatch.setattr(kedit.probe, "greedy", lambda *a, **k: pytest.fail("generation must be off"))
    data = load_dataset(f"mquake:{_write(tmp_path, [_mquake_record()])}")
    rep = Evaluator(model, tok, multihop_tokens=0).run(data.cases, None)
    assert "multihop_score" in rep.summary and "multihop_acc" not in rep.summary


# -- portability --------------------------------------------------------------------------------------
def _zsre_record(port: dict | None) -> dict:
    rec = {"subject": "Angola", "src": "Angola is located in", "rephrase": "Angola belongs to", "alt": "Antarctica",
           "answers": ["Africa"], "loc": "Ghana", "loc_ans": "the"}
    if port is not None:
        rec["portability"] = port
    return rec


def test_portability_metric_on_constructed_record(bigram, tmp_path):
    model, tok = bigram
    path = _write(tmp_path, [_zsre_record({"New Question": "Ghana is in", "New Answer": "Africa"}),
                             _zsre_record(None)])
    data = load_dataset(f"zsre:{path}", zsre_target="alt")
    assert data.cases[0].portability == (("Ghana is in", "Africa"),) and data.cases[1].portability == ()
    rep = Evaluator(model, tok).run(data.cases, CellEditor(model, [(W["in"], W["Antarctica"])]))
    pre, post = rep.cases[0]["pre"], rep.cases[0]["post"]
    assert pre["portability_token_acc"] == 1.0 and pre["portability_exact_match"] == 1.0  # Africa after "in"
    assert post["portability_token_acc"] == 0.0 and post["portability_exact_match"] == 0.0
    assert "portability_token_acc" not in rep.cases[1]["post"]
    assert rep.summary["portability_token_acc"]["n"] == 1 and rep.summary["portability_token_acc"]["family"] == \
        "portability"


def test_portability_malformed_names_field(tmp_path):
    path = _write(tmp_path, [_zsre_record({"New Question": "Ghana is in"})])
    with pytest.raises(DatasetFormatError, match=r"record 0: missing field 'portability.New Answer'"):
        load_dataset(f"zsre:{path}", zsre_target="alt")


# -- model health -------------------------------------------------------------------------------------
def _health(model, tok, tmp_path):
    from kedit.corpus import open_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Angola is located in Africa\nGhana belongs to Africa\nParis France capital of France\n" * 4)
    return Health(model, tok, open_corpus(corpus), prompts=["Angola is located in", "Paris", "Ghana belongs to"],
                  tokens=64, max_length=16)


def test_health_perplexity_agreement_kl(bigram, tmp_path):
    model, tok = bigram
    h = _health(model, tok, tmp_path)
    s0 = h.measure()
    # perplexity by hand: exp(mean NLL of each next token) over the rows
    nll, n = 0.0, 0
    for row in h.rows:
        lp = model.table[row[:-1]].log_softmax(-1)
        nll -= float(lp[torch.arange(len(row) - 1), row[1:]].sum())
        n += len(row) - 1
    same = h.compare(s0, s0)
    assert same["health_perplexity"].mean == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert same["health_top1_agreement"].mean == 1.0 and same["health_kl"].mean == 0.0
    with torch.no_grad():
        model.table[W["in"], W["Antarctica"]] += 5.0
    moved = h.compare(s0, h.measure())
    assert moved["health_top1_agreement"].mean == pytest.approx(2 / 3) and moved["health_kl"].mean > 0
    assert moved["health_perplexity"].mean > same["health_perplexity"].mean  # "in Africa" got less likely
    assert len(health_prompts()) >= 30


def test_health_in_sequential_mode_after_every_batch(bigram, tmp_path):
    from eval_helpers import FakeEditor
    from test_eval_harness import _cf_case

    model, tok = bigram
    ev = Evaluator(model, tok, health=_health(model, tok, tmp_path))
    rep = ev.run([_cf_case(i) for i in range(3)], FakeEditor(model, W["in"], W["Antarctica"], 2.0),
                 mode="sequential", batch_size=1)
    assert [p["n_edited"] for p in rep.health] == [0, 1, 2, 3]
    ppl = [p["health_perplexity"] for p in rep.health]
    assert ppl == sorted(ppl) and ppl[0] < ppl[-1]  # each batch pushes "in" further from Africa
    assert rep.summary["health_perplexity"]["mean"] == pytest.approx(ppl[-1])
    assert rep.summary["health_perplexity"]["pre"]["mean"] == pytest.approx(ppl[0])
    assert rep.summary["health_kl"]["pre"]["mean"] == 0.0 and rep.summary["health_kl"]["mean"] > 0
    assert rep.config["evaluator"]["health"]["n_prompts"] == 3


# -- CLI ------------------------------------------------------------------------------------------------
def _cli_files(tmp_path, tiny_tok):
    """(MQuAKE file, saved tiny Llama folder, statistics corpus); skips without the shared data."""
    from conftest import SHARED, make_tiny

    data = SHARED / "mquake_cf3k_akew_subset354.json"
    if not data.is_file():
        pytest.skip("shared MQuAKE data not present")
    model_dir = tmp_path / "tiny"
    make_tiny("llama", tiny_tok).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The capital of France is Paris. Water boils at one hundred degrees.\n" * 30)
    return data, model_dir, corpus


@pytest.mark.parametrize("method, extra", [("none", ["--health-corpus", "CORPUS"]), ("memit", ["--single"])])
def test_cli_mquake_with_health_on_tiny_model(tmp_path, tiny_tok, capsys, method, extra):
    from kedit.cli import main

    data, model_dir, corpus = _cli_files(tmp_path, tiny_tok)
    out = tmp_path / "run"
    extra = [str(corpus) if a == "CORPUS" else a for a in extra]
    rc = main(["eval", "--model", str(model_dir), "--method", method, "--dataset", f"mquake:{data}", "--n", "2",
               "--offset", "1", "--tokens", "1000", "--health", "--health-tokens", "128", "--multihop-tokens", "4",
               "--out", str(out), "--json", "--no-plots", *extra])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("edit_wise_score", "edit_wise_acc", "multihop_acc", "multihop_score", "hopwise_acc",
                "health_perplexity", "health_top1_agreement", "health_kl"):
        assert s[key]["n"] >= 1 and s[key]["pre"]["n"] >= 1, key
    assert s["caveats"] and "alias" in s["caveats"][0] and (out / "report.html").is_file()
    health = s["config"]["evaluator"]["health"]
    assert health["tokens"] == 128 and (health["corpus"] == str(corpus)) == (method == "none")
    if method == "memit":  # case index 1 has two rewrites, applied as one batch (per-case protocol)
        assert s["evaluated"].startswith("per case") and len(s["health_trajectory"]) == 3
        assert s["edit_wise_score"]["mean"] >= s["edit_wise_score"]["pre"]["mean"]
    else:
        assert s["health_kl"]["mean"] == 0.0 and s["health_top1_agreement"]["mean"] == 1.0


def test_cli_health_flags_need_health(tmp_path, capsys):
    from kedit.cli import main

    assert main(["eval", "--model", "x", "--method", "none", "--dataset", "mquake:x", "--health-corpus", "c"]) == 2
    assert "--health-corpus / --health-tokens need --health" in capsys.readouterr().err


def test_cli_anchor_cache_feeds_the_per_case_run(tmp_path, tiny_tok, capsys):
    """A batch run's anchors (--anchor-cache DIR) are reused by the per-case run on the same cases."""
    from kedit.cli import main

    data, model_dir, corpus = _cli_files(tmp_path, tiny_tok)
    cache = tmp_path / "anchors"
    base = ["eval", "--model", str(model_dir), "--method", "memit", "--dataset", f"mquake:{data}", "--n", "2",
            "--offset", "1", "--tokens", "1000", "--corpus", str(corpus), "--multihop-tokens", "2", "--no-plots",
            "--anchor-cache", str(cache)]
    assert main([*base, "--out", str(tmp_path / "batch")]) == 0
    first = capsys.readouterr().err
    stored = sorted(cache.glob("anchor-*.safetensors"))
    assert "0 reused, 3 to optimise" in first and len(stored) == 3  # cases 1 and 2: 2 + 1 rewrites
    assert main([*base, "--single", "--out", str(tmp_path / "single")]) == 0
    second = capsys.readouterr().err
    assert "2 reused, 0 to optimise" in second and "1 reused, 0 to optimise" in second
    assert " 1 to optimise" not in second and " 2 to optimise" not in second
    assert sorted(cache.glob("anchor-*.safetensors")) == stored
    # a file where the directory should be: one line, exit 2, before any work
    assert main([*base[:-1], str(corpus), "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
