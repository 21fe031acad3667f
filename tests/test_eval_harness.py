"""Scoring, Evaluator protocols and reports on models whose logits are known (bigram table) or tiny random LMs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_helpers import WORDS, BigramLM, FakeEditor, base_table, word_tok

from kedit.eval import Evaluator
from kedit.eval import metrics as M
from kedit.eval.datasets import EvalCase
from kedit.eval.report import load_summary, write
from kedit.eval.scoring import Scorer
from kedit.requests import EditRequest

W = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture
def bigram():
    t = base_table()
    t[W["in"], W["Africa"]] += 2.0        # "... in" -> Africa (the true object)
    t[W["to"], W["Antarctica"]] += 3.0    # "... belongs to" -> Antarctica
    return BigramLM(t), word_tok()


def _cf_case(i: int = 0) -> EvalCase:
    req = EditRequest("{} is located in", "Angola", "Antarctica", "Africa", case_id=i)
    return EvalCase(req, "counterfact", "mem", i, paraphrases=("Angola belongs to",),
                    neighborhood=(("Ghana is in", "Africa"),))


def _logp(table: torch.Tensor, row: str) -> np.ndarray:
    return table[W[row]].double().log_softmax(-1).numpy()


def test_scorer_hand_computed_multitoken(bigram):
    model, tok = bigram
    res, dists = Scorer(model, tok).score([("Angola is located in", "Paris France"), ("Ghana is in", None)])
    lp_in, lp_paris = _logp(model.table, "in"), _logp(model.table, "Paris")
    assert res[0].labels == [W["Paris"], W["France"]]
    assert res[0].logprobs == pytest.approx([lp_in[W["Paris"]], lp_paris[W["France"]]], rel=1e-5)
    assert res[0].nll == pytest.approx(-(lp_in[W["Paris"]] + lp_paris[W["France"]]) / 2, rel=1e-5)
    assert res[0].argmax == [W["Africa"], W["<eos>"]] and res[0].correct == [False, False]
    assert res[1] is None and np.allclose(dists[1].numpy(), lp_in, atol=1e-6)


def test_counterfact_metrics_hand_computed(bigram):
    model, tok = bigram
    before = model.table.detach().clone()
    editor = FakeEditor(model, W["in"], W["Antarctica"], 5.0)
    rep = Evaluator(model, tok).run([_cf_case()], editor, mode="batch")
    pre, post = rep.cases[0]["pre"], rep.cases[0]["post"]
    lp = _logp(before, "in")
    after = before.clone()
    after[W["in"], W["Antarctica"]] += 5.0
    la = _logp(after, "in")
    p_new, p_true = np.exp(lp[W["Antarctica"]]), np.exp(lp[W["Africa"]])
    assert pre["efficacy_score"] == 0 and post["efficacy_score"] == 1
    assert pre["paraphrase_score"] == post["paraphrase_score"] == 1 == post["paraphrase_acc"]
    assert pre["neighborhood_score"] == 1 and post["neighborhood_score"] == 0
    assert (pre["efficacy_acc"], post["efficacy_acc"]) == (0, 1)
    assert (pre["neighborhood_acc"], post["neighborhood_acc"]) == (1, 0)
    assert pre["efficacy_magnitude"] == pytest.approx(p_new - p_true, rel=1e-5)
    assert pre["p_new"] == pytest.approx(p_new, rel=1e-5)
    assert post["neighborhood_magnitude"] == pytest.approx(np.exp(la[W["Africa"]]) - np.exp(la[W["Antarctica"]]),
                                                           rel=1e-5)
    kl = float(np.sum(np.exp(lp) * (lp - la)))
    assert post["neighborhood_kl"] == pytest.approx(kl, rel=1e-4) and pre["neighborhood_kl"] == 0
    for k in (1, 5, 10):
        top_b, top_a = set(np.argsort(-lp)[:k]), set(np.argsort(-la)[:k])
        assert post[f"top{k}_overlap"] == pytest.approx(len(top_b & top_a) / k) and pre[f"top{k}_overlap"] == 1
    assert post["top1_overlap"] == 0 and post["top5_overlap"] == pytest.approx(0.8)
    assert rep.summary["score"]["mean"] == 0.0 and rep.summary["score"]["pre"]["mean"] == 0.0  # NS / ES are 0
    assert torch.equal(model.table, before)  # the protocol restores the model


def test_zsre_metrics_both_specificity_labels(bigram):
    model, tok = bigram
    req = EditRequest("{} is located in", "Angola", "Antarctica Africa", "Africa", case_id=0)
    case = EvalCase(req, "zsre", "mem", 0, paraphrases=("Angola belongs to",),
                    neighborhood=(("Ghana is in", "Africa"),), loc="Ghana is in", loc_ans="Africa")
    rep = Evaluator(model, tok).run([case], FakeEditor(model, W["in"], W["Antarctica"]), mode="batch")
    pre, post = rep.cases[0]["pre"], rep.cases[0]["post"]
    # target tokens [Antarctica, Africa]: after the edit the first is the argmax, the second (after "Antarctica") not
    assert (pre["efficacy_token_acc"], post["efficacy_token_acc"]) == (0.0, 0.5)
    assert post["efficacy_exact_match"] == 0.0
    assert post["generalization_token_acc"] == 0.5
    assert (pre["specificity_agreement"], post["specificity_agreement"]) == (1.0, 0.0)
    assert (pre["specificity_loc_acc"], post["specificity_loc_acc"]) == (1.0, 0.0)
    assert "efficacy_score" not in post  # CounterFact metrics are not defined on zsRE
    assert "easyedit" in rep.summary["specificity_agreement"]["convention"]
    assert "rome" in rep.summary["specificity_loc_acc"]["convention"]


def test_protocols_log_restore_and_agree(bigram):
    from kedit.eval import protocol

    model, tok = bigram
    before = model.table.detach().clone()
    cases = [_cf_case(i) for i in range(4)]
    protocol._PRE_CACHE.clear()  # another test may have scored these cases on this model
    ev = Evaluator(model, tok)
    ed = FakeEditor(model, W["in"], W["Antarctica"], 1.5)
    seq = ev.run(cases, ed, mode="sequential", batch_size=2, eval_every_batch=True)
    assert ed.log == ["reset", ("apply", 2), ("apply", 2), "undo", "undo", "reset"]
    assert [t["n_edited"] for t in seq.trajectory] == [2, 4] and "after all 2 batches" in seq.evaluated
    # after one +1.5 Antarctica is still below Africa (+2); after two (+3) it wins
    assert seq.trajectory[0]["summary"]["efficacy_score"]["mean"] == 0.0
    assert seq.summary["efficacy_score"]["mean"] == 1.0 and [c["edit_batch"] for c in seq.cases] == [0, 0, 1, 1]
    ed.log.clear()
    single = ev.run(cases, ed, mode="single")
    assert ed.log == ["reset"] + [("apply", 1), "undo"] * 4 + ["reset"]  # anchors batched, each edit undone
    assert single.summary["efficacy_score"]["mean"] == 0.0  # each edit alone is too weak
    assert single.timings["pre_eval_cached"] and not seq.timings["pre_eval_cached"]  # same weights, same cases
    # shared across evaluators of the process (one eval per method), keyed by the weights' content
    assert Evaluator(model, tok).run(cases, ed, mode="single").timings["pre_eval_cached"]
    assert not Evaluator(model, tok, multihop_tokens=3).run(cases, ed, mode="single").timings["pre_eval_cached"]
    with torch.no_grad():
        model.table[0, 0] += 1.0
    assert not Evaluator(model, tok).run(cases, None).timings["pre_eval_cached"]
    with torch.no_grad():
        model.table[0, 0] -= 1.0
    ed.log.clear()
    none = ev.run(cases, None)
    assert none.config["editor"] == {"method": "none"} and none.summary["neighborhood_kl"]["mean"] == 0.0
    assert none.summary["efficacy_score"]["mean"] == none.summary["efficacy_score"]["pre"]["mean"]
    assert torch.equal(model.table, before)
    t = seq.timings
    assert t["pre_eval_s"] > 0 and t["post_eval_s"] > 0 and t["post_eval_records_per_s"] > 0


def test_failed_edit_restores_model(bigram):
    model, tok = bigram
    before = model.table.detach().clone()

    class Failing(FakeEditor):
        def apply(self, requests):
            if len(self.log) > 1:
                raise RuntimeError("solver blew up")
            return super().apply(requests)

    with pytest.raises(RuntimeError, match="blew up"):
        Evaluator(model, tok).run([_cf_case(i) for i in range(4)], Failing(model, 0, 1), mode="sequential",
                                  batch_size=2)
    assert torch.equal(model.table, before)


def test_left_and_right_padding_score_equally(tiny_llama, tiny_tok):
    pairs = [("The capital of France is", "Paris"), ("Michael Jordan plays", "basketball and more"),
             ("Rivers", "flow into the sea"), ("Berlin is the capital of", None)]
    (r, dr), (l, dl) = (Scorer(tiny_llama, tiny_tok, max_tokens=40, padding_side=s).score(pairs, [True] * 4)
                        for s in ("right", "left"))
    for a, b in zip(r[:3], l[:3], strict=True):
        assert a.labels == b.labels and a.argmax == b.argmax
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    for k in dr:
        assert torch.allclose(dr[k], dl[k], atol=1e-5)


def test_head_only_scoring_matches_full_logits(tiny_family, tiny_tok):
    family, model = tiny_family
    s = Scorer(model, tiny_tok, max_tokens=24)
    assert s.head_only, family
    pairs = [("The capital of France is", "Paris"), ("Toyota is a company from", "Japan and Asia")]
    res, _ = s.score(pairs)
    for (p, _t), sc in zip(pairs, res, strict=True):
        ids = tiny_tok(p)["input_ids"] + sc.labels[:-1]
        lp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        ref = [lp[len(ids) - len(sc.labels) + j, y].item() for j, y in enumerate(sc.labels)]
        assert sc.logprobs == pytest.approx(ref, abs=1e-5), family


def test_left_padded_generation_equals_one_by_one(tiny_llama, tiny_tok):
    s = Scorer(tiny_llama, tiny_tok)
    prompts = ["The capital of France is", "Apples", "Michael Jordan plays basketball"]
    batched = s.generate(prompts, max_length=20, top_k=1)
    alone = [s.generate([p], max_length=20, top_k=1)[0] for p in prompts]
    assert batched == alone and all(t.startswith(p) for t, p in zip(batched, prompts, strict=True))
    assert s.generate(prompts, max_length=20, seed=3) == s.generate(prompts, max_length=20, seed=3)


def test_report_files_and_compare(bigram, tmp_path, capsys):
    model, tok = bigram
    ev = Evaluator(model, tok)
    cases = [_cf_case(i) for i in range(3)]
    for name, editor in (("a", FakeEditor(model, W["in"], W["Antarctica"])), ("b", None)):
        write(ev.run(cases, editor, extra_config={"dataset": {"spec": "mem"}}), tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["cases.jsonl", "metrics.png", "p_new_scatter.png", "report.html", "summary.json", "summary.md"]
    s = load_summary(tmp_path / "a")
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_acc",
                "neighborhood_kl", "top1_overlap", "top5_overlap", "top10_overlap"):
        assert set(s[key]) >= {"mean", "ci_low", "ci_high", "n", "pre", "convention"}, key
        assert set(s[key]["pre"]) == {"mean", "ci_low", "ci_high", "n"}
    assert s["config"]["editor"]["method"] == "fake" and s["n_cases"] == 3 and "timings" in s
    lines = (tmp_path / "a" / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["post"]["efficacy_score"] == 1.0
    assert "| efficacy_score |" in (tmp_path / "a" / "summary.md").read_text()
    from kedit.cli import main

    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "efficacy_score" in out and "a (fake/-)" in out and (tmp_path / "c.png").is_file()


@pytest.mark.parametrize("method", ["none", "memit"])
def test_cli_eval_on_tiny_model(tmp_path, tiny_tok, capsys, method):
    from conftest import make_tiny, shared_data

    from kedit.cli import main

    data = shared_data("counterfact_subset500.json")
    model_dir = tmp_path / "tiny"
    make_tiny("llama", tiny_tok).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = main(["eval", "--model", str(model_dir), "--method", method, "--dataset", f"counterfact:{data}", "--n", "3",
               "--sample-seed", "1", "--tokens", "1000", "--out", str(out), "--json", "--no-plots"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_cases"] == 3 and s["config"]["dataset"]["selection"] == {"n": 3, "offset": 0, "sample_seed": 1}
    assert s["config"]["editor"]["method"] == method and s["efficacy_score"]["n"] == 3
    assert (out / "summary.json").is_file() and (out / "cases.jsonl").is_file()
    if method == "memit":
        assert s["config"]["editor"]["layers"] and s["timings"]["edit_s"] > 0


@pytest.mark.slow
def test_cli_smollm2_memit_20_counterfact(tmp_path, tmp_path_factory, request, capsys, monkeypatch):
    import os

    from conftest import shared_data

    from kedit.cli import main

    counterfact, wiki = shared_data("counterfact_subset500.json"), shared_data("wikitext-2-raw/wiki.test.raw")
    if os.environ.get("KEDIT_HOME", "").startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.delenv("KEDIT_HOME")  # share the real model and statistics caches, as the smollm2 fixture does
    request.getfixturevalue("smollm2")  # after the data check: a fresh clone skips without loading the model

    out = tmp_path / "run"
    rc = main(["eval", "--model", "smollm2-135m", "--method", "memit", "--targets", "forward",
               "--dataset", f"counterfact:{counterfact}", "--n", "20", "--corpus", str(wiki),
               "--out", str(out), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_cases"] == 20 and s["config"]["protocol"]["mode"] == "batch"
    # the edit must move the edited facts (pre-edit ES of SmolLM2 on CounterFact is well below 0.5)
    assert s["efficacy_score"]["mean"] > s["efficacy_score"]["pre"]["mean"] + 0.3
    assert s["neighborhood_kl"]["mean"] > 0 and s["top1_overlap"]["mean"] > 0.5
    assert {p.name for p in out.iterdir()} >= {"summary.json", "cases.jsonl", "summary.md", "metrics.png"}


def test_fluency_and_consistency_use_generated_text(tiny_llama, tiny_tok):
    req = EditRequest("The capital of {} is", "France", "Berlin", "Paris", case_id=0)
    case = EvalCase(req, "counterfact", "mem", 0, generation_prompts=("France is", "Paris is"),
                    references=("Berlin is the capital of Germany.",))
    ev = Evaluator(tiny_llama, tiny_tok, fluency=True, fluency_length=16)
    rep = ev.run([case], None)
    c = rep.cases[0]
    assert len(c["texts_post"]) == 2 and c["texts_post"][0].startswith("France is")
    assert c["post"]["fluency"] == pytest.approx(np.mean([M.ngram_entropy(t) for t in c["texts_post"]]))
    idf = M.fit_idf([" ".join(case.references)])
    assert c["post"]["consistency"] == pytest.approx(M.tfidf_cosine(" ".join(c["texts_post"]),
                                                                    " ".join(case.references), idf))
    assert rep.timings["generation_s"] > 0 and "consistency" in rep.summary
