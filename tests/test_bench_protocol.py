"""bench/protocol.py end to end on a tiny random model: scaling, sequential (2 batches), compare; outputs; resume."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS_TEXT, make_tiny

from kedit.models import model_fingerprint

BENCH = Path(__file__).resolve().parents[1] / "bench"
FACTS = [  # (prompt with {}, subject, new, true, paraphrase, neighbour prompt, its answer)
    ("The capital of {} is", "France", "Berlin", "Paris", "France has its capital in", "Germany has the capital",
     "Berlin"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French", "Danielle Darrieux speaks",
     "The mother tongue of Paris is", "French"),
    ("{} plays", "Michael Jordan", "the violin", "basketball", "Michael Jordan is good at", "Apples are",
     "red"),
    ("{} is a company from", "Toyota", "Germany", "Japan", "Toyota comes from", "Berlin is in", "Germany"),
    ("The Eiffel Tower is located in {}", "Paris", "Japan", "France", "Paris holds the Eiffel Tower",
     "Rivers flow into", "the sea"),
    ("{} is a string instrument", "The violin", "Quantum", "The", "The violin has strings", "Apples are",
     "green"),
]
# a random tiny model with few statistics rows has no null space at AlphaEdit's threshold
pytestmark = pytest.mark.filterwarnings("ignore:AlphaEdit. no eigenvalue:UserWarning")


def _load():
    sys.path.insert(0, str(BENCH))  # protocol.py imports bench/common.py as `common`
    spec = importlib.util.spec_from_file_location("bench_protocol", BENCH / "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through the module
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("protocol-data")
    mend = [{"case_id": i, "prompt": p.format(s), "subject": s, "target_new": n, "ground_truth": t,
             "rephrase_prompt": para, "locality_prompt": nb, "locality_ground_truth": nba}
            for i, (p, s, n, t, para, nb, nba) in enumerate(FACTS)]
    rome = [{"case_id": i, "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": n},
                                                 "target_true": {"str": t}},
             "paraphrase_prompts": [para, para + " the"], "neighborhood_prompts": [nb]}
            for i, (p, s, n, t, para, nb, _) in enumerate(FACTS[:4])]
    zsre = [{"subject": s, "src": f"What is {s} known for?", "rephrase": f"{s} is known for what?", "alt": n,
             "answers": [t], "loc": "nq question: where do rivers flow", "loc_ans": "the sea"}
            for p, s, n, t, *_ in FACTS]
    paths = {"counterfact": d / "mend.json", "sequential": d / "rome.json", "zsre": d / "zsre.json",
             "health": d / "health.txt"}
    for key, recs in (("counterfact", mend), ("sequential", rome), ("zsre", zsre)):
        paths[key].write_text(json.dumps(recs))
    paths["health"].write_text(CORPUS_TEXT)
    return paths


def _setup(mod, files, tiny_tok):
    model = make_tiny("llama", tiny_tok)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 400, generator=g, dtype=torch.float64)
    # [f, f]: well conditioned, and small next to lam = 15000 so that the edits move the tiny model
    stats = {layer: X @ X.T / 400 * 1e-6 for layer in (1, 2)}
    return mod.Setup(model, tiny_tok, stats, dict(files), model_name="tiny-llama")


ARGS = ["--layers", "1,2", "--sizes", "2,4", "--zsre-sizes", "2", "--datasets", "counterfact,zsre-alt",
        "--solvers", "memit,alphaedit,prune", "--seq-n", "4", "--seq-batch", "2", "--health-tokens", "200",
        "--compare-n", "2", "--proxy-n", "2", "--lam-grid", "5000,15000", "--tune-grid", "15000,50000", "--quiet"]


def test_protocol_end_to_end_and_resume(tmp_path, files, tiny_tok, monkeypatch):
    mod = _load()
    setup = _setup(mod, files, tiny_tok)
    fp = model_fingerprint(setup.model)
    out = tmp_path / "protocol"
    assert mod.main([*ARGS, "--out", str(out)], setup=setup) == 0
    assert model_fingerprint(setup.model) == fp  # every run restored the model

    # scaling: every (size, solver, targets) row, nested slices, lam stated, diagnostics and time split
    rows = {p.name: json.loads(p.read_text()) for p in (out / "scaling" / "counterfact").glob("*.json")}
    assert set(rows) == {f"n{n}_{s}_{t}.json" for n in (2, 4) for s, t in (
        ("memit", "backward"), ("memit", "forward"), ("alphaedit", "backward"), ("alphaedit", "forward"),
        ("memit", "onelayer"), ("memit", "blue"))}
    r = rows["n4_memit_forward.json"]
    assert r["lam"] == 15000 and rows["n4_alphaedit_forward.json"]["lam"] is None
    assert r["data"]["format"] == "mend" and r["data"]["indices"] == "0..3" and r["n"] == 4
    assert {"efficacy_score", "efficacy_acc", "paraphrase_score", "paraphrase_acc", "neighborhood_score",
            "neighborhood_kl", "top1_overlap", "top5_overlap", "top10_overlap"} <= set(r["metrics"])
    assert r["metrics"]["neighborhood_kl"]["mean"] > 0  # the edit changed the model (then was undone)
    assert [d["layer"] for d in r["diagnostics"]] == [1, 2] and all("delta_norm" in d for d in r["diagnostics"])
    assert r["seconds"]["anchors_s"] >= 0 and r["seconds"]["solve_s"] > 0
    assert r["machine"]["cores"] and r["command"] and r["editor"]["layers"] == [1, 2]
    # anchors shared per request: memit (first solver) optimises only what n2 did not, alphaedit reuses all 4
    assert (r["seconds"]["anchors_reused"], r["seconds"]["anchors_optimised"]) == (2, 2)
    assert (rows["n4_alphaedit_forward.json"]["seconds"]["anchors_reused"],
            rows["n4_alphaedit_forward.json"]["seconds"]["anchors_optimised"]) == (4, 0)
    z = json.loads((out / "scaling" / "zsre-alt" / "n2_memit_forward.json").read_text())
    assert z["data"]["zsre_target"] == "alt" and "efficacy_token_acc" in z["metrics"]

    # sequential: per-batch curve, health, full evaluation at the end
    seq = json.loads((out / "sequential" / "prune_forward" / "result.json").read_text())
    assert [b["after_batch"] for b in seq["batches"]] == [1, 2] and [b["n_edited"] for b in seq["batches"]] == [2, 4]
    b = seq["batches"][-1]
    assert {"efficacy_score", "efficacy_acc"} <= set(b["first_batch"]) and b["health"]["health_perplexity"] > 1
    assert seq["metrics"]["efficacy_score"]["n"] == 4 and seq["lam"] == 15000 and seq["data"]["format"] == "rome"
    assert [d["layer"] for d in b["diagnostics"] if d["prune_bound"] > 0] == [1, 2]  # PRUNE's accumulated sigma_max
    assert "prune forward: accumulated edit's sigma_max / bound" in (out / "sequential.md").read_text()

    # compare: the grid, solvers without lam once, the tuned row chosen on the disjoint proxy records
    cmp_dir = out / "compare" / "counterfact"
    assert {p.name for p in cmp_dir.glob("memit_forward_*.json")} >= {
        "memit_forward_lam5000.json", "memit_forward_lam15000.json", "memit_forward_tuned.json"}
    assert (cmp_dir / "alphaedit_backward_lam-.json").is_file()  # no lam: one row, no tuning
    assert not (cmp_dir / "alphaedit_backward_tuned.json").exists()
    tuned = json.loads((cmp_dir / "prune_backward_tuned.json").read_text())
    assert tuned["lam"] in (15000, 50000) and tuned["tuned_on"]["indices"] == "4..5"
    assert (cmp_dir / f"prune_backward_lam{tuned['lam']:g}.json").is_file()
    assert json.loads((cmp_dir / "prune_backward_lam5000.json").read_text())["lam"] == 5000  # base lam passed

    # outputs: tables, plots, README skeleton
    for name in ("scaling.md", "sequential.md", "compare.md", "protocol.json", "README.md",
                 "scaling-counterfact-efficacy.png", "scaling-zsre-alt-specificity.png",
                 "scaling-counterfact-diagnostics.png", "sequential-forgetting.png", "sequential-health.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    readme = (out / "README.md").read_text()
    assert "Not written yet: put the per-solver answer" in readme and "a different model" in readme
    assert "](scaling-counterfact-efficacy.png)" in readme and "| 4 | memit | 15000 | forward |" in readme
    assert "tuned: " in (out / "compare.md").read_text()

    # a second call skips finished work: no edit runs, no file changes
    from kedit.editor import Editor

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    with monkeypatch.context() as m:  # (a bare undo() would also drop conftest's temporary KEDIT_HOME)
        m.setattr(Editor, "apply", lambda *a, **k: pytest.fail("finished work was redone"))
        assert mod.main([*ARGS, "--out", str(out)], setup=setup) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "protocol.json")

    # --lam tuned: extra scaling and sequential runs at compare's tuned lam, beside the fixed-lam ones
    tuned_args = [*ARGS, "--modes", "scaling,sequential", "--solvers", "memit,alphaedit", "--targets", "forward",
                  "--sizes", "2", "--lam", "tuned", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:  # a tuned lam missing: one line, exit 2, before anything runs
        (cmp_dir / "memit_forward_tuned.json").rename(tmp_path / "kept.json")
        mod.main(tuned_args, setup=setup)
    assert exc.value.code == 2
    (tmp_path / "kept.json").rename(cmp_dir / "memit_forward_tuned.json")
    lam = json.loads((cmp_dir / "memit_forward_tuned.json").read_text())["lam"]
    assert mod.main(tuned_args, setup=setup) == 0
    row = json.loads((out / "scaling" / "counterfact" / "n2_memit_forward_tuned.json").read_text())
    assert row["lam"] == lam and row["lam_policy"] == "tuned" and row["n"] == 2
    assert not list((out / "scaling" / "counterfact").glob("*alphaedit*tuned*"))  # no lam: nothing to tune
    seq_t = json.loads((out / "sequential" / "memit_forward_tuned" / "result.json").read_text())
    assert seq_t["lam"] == lam and seq_t["lam_policy"] == "tuned" and len(seq_t["batches"]) == 2
    assert f"| 2 | memit | tuned: {lam:g} | forward |" in (out / "scaling.md").read_text()
    assert f"| memit | forward | tuned: {lam:g} | 2 |" in (out / "sequential.md").read_text()
    assert model_fingerprint(setup.model) == fp

    # another tune grid re-tunes (its shared proxy rows reused); a changed tuned lam redoes the tuned rows
    proxy_stamps = {p: p.stat().st_mtime_ns for p in (cmp_dir / "proxy").glob("memit_forward_*.json")}
    grid = [*ARGS[:-3], "--tune-grid", "15000,50000,100", "--quiet"]
    assert mod.main([*grid, "--modes", "compare", "--solvers", "memit", "--targets", "forward", "--out", str(out)],
                    setup=setup) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in proxy_stamps.items())
    retuned = json.loads((cmp_dir / "memit_forward_tuned.json").read_text())
    assert set(retuned["proxy_scores"]) == {"15000", "50000", "100"}
    if retuned["lam"] != lam:
        assert mod.main(tuned_args, setup=setup) == 0
        row = json.loads((out / "scaling" / "counterfact" / "n2_memit_forward_tuned.json").read_text())
        assert row["lam"] == retuned["lam"]


def test_sequential_resumes_from_the_last_checkpoint(tmp_path, files, tiny_tok, monkeypatch):
    mod = _load()
    setup = _setup(mod, files, tiny_tok)
    fp = model_fingerprint(setup.model)
    args = [*ARGS, "--modes", "sequential", "--solvers", "alphaedit", "--targets", "forward"]
    assert mod.main([*args, "--out", str(tmp_path / "whole")], setup=setup) == 0
    calls = []

    def budget(self, need_s=0.0):  # the budget runs out after the first batch: a clean stop
        calls.append(need_s)
        self.stopped = len(calls) > 1
        return not self.stopped

    part = tmp_path / "part"
    with monkeypatch.context() as m:  # (a bare undo() would also drop conftest's temporary KEDIT_HOME)
        m.setattr(mod.Ctx, "time_left", budget)
        assert mod.main([*args, "--out", str(part)], setup=setup) == 0
    d = part / "sequential" / "alphaedit_forward"
    ckpt = mod.checkpoint_dir(part) / "sequential_alphaedit_forward.pt"
    assert ckpt.is_file() and not (d / "result.json").exists() and not list(d.glob("*.pt"))
    assert len(json.loads((d / "progress.json").read_text())) == 1
    assert model_fingerprint(setup.model) == fp  # stopped runs restore the model too
    assert mod.main([*args, "--out", str(part)], setup=setup) == 0  # continues at batch 2
    whole = json.loads((tmp_path / "whole" / "sequential" / "alphaedit_forward" / "result.json").read_text())
    resumed = json.loads((d / "result.json").read_text())
    assert model_fingerprint(setup.model) == fp
    assert [b["after_batch"] for b in resumed["batches"]] == [1, 2] and not ckpt.exists()  # finished: deleted
    for a, b in zip(whole["batches"], resumed["batches"], strict=True):  # same weights and state after resume
        assert a["first_batch"] == pytest.approx(b["first_batch"], abs=1e-6)
        assert a["health"] == pytest.approx(b["health"], rel=1e-5)
    assert {k: v["mean"] for k, v in whole["metrics"].items()} == pytest.approx(
        {k: v["mean"] for k, v in resumed["metrics"].items()}, abs=1e-6)

    # --table-only rebuilds the outputs from the JSON alone
    for f in ("README.md", "sequential.md", "sequential-forgetting.png"):
        (part / f).unlink()
    assert mod.main(["--table-only", "--out", str(part)]) == 0
    assert all((part / f).is_file() for f in ("README.md", "sequential.md", "sequential-forgetting.png"))
    assert "alphaedit | forward | - | 2 |" in (part / "README.md").read_text()  # no lam: "-", 2 batches
    (part / "answer.md").write_text("Forward keeps the first batch better.\n")  # the person's answer is kept
    assert mod.main(["--table-only", "--out", str(part)]) == 0
    readme = (part / "README.md").read_text()
    assert "## Answer per solver\n\nForward keeps the first batch better.\n" in readme and "Not written" not in readme


def test_scaling_runs_what_still_fits_and_counts_cached_anchors(tmp_path, files, tiny_tok, monkeypatch):
    mod = _load()
    setup = _setup(mod, files, tiny_tok)
    out = tmp_path / "protocol"
    args = ["--modes", "scaling", "--layers", "1,2", "--sizes", "2", "--datasets", "counterfact", "--solvers",
            "memit,alphaedit", "--targets", "backward,forward", "--quiet", "--out", str(out)]
    needs = []

    def first_unit_does_not_fit(self, need_s=0.0):
        needs.append(need_s)
        return len(needs) != 1

    with monkeypatch.context() as m:
        m.setattr(mod.Ctx, "time_left", first_unit_does_not_fit)
        assert mod.main(args, setup=setup) == 0
    assert {p.name for p in (out / "scaling" / "counterfact").glob("*.json")} == {
        "n2_memit_forward.json", "n2_alphaedit_backward.json", "n2_alphaedit_forward.json"}  # later units ran

    seen = []

    def record(self, need_s=0.0):  # memit/backward's anchors are alphaedit/backward's: in the cache now
        seen.append((need_s, mod.estimate_edit(self, 2, 0), mod.estimate_edit(self, 2, 1)))
        return True

    with monkeypatch.context() as m:
        m.setattr(mod.Ctx, "time_left", record)
        assert mod.main(args, setup=setup) == 0
        # BLUE anchors at the first and the last layer: forward's and backward's, both cached now
        assert mod.main([*args[:-2], "--targets", "blue", "--solvers", "memit", "--out", str(out)], setup=setup) == 0
    (need, cached, fresh), (need_blue, cached_blue, _) = seen  # (rates are re-measured on the rows per call)
    assert need == cached < fresh and need_blue == cached_blue
    assert (out / "scaling" / "counterfact" / "n2_memit_backward.json").is_file()
    assert (out / "scaling" / "counterfact" / "n2_memit_blue.json").is_file()

    # a cold anchor cache (another machine): the finished rows on disk no longer make BLUE's anchors free
    (out / "scaling" / "counterfact" / "n2_memit_blue.json").unlink()
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(mod, "anchor_dir", lambda: tmp_path / "cold")
        m.setattr(mod.Ctx, "time_left", record)
        assert mod.main([*args[:-2], "--targets", "blue", "--solvers", "memit", "--out", str(out)], setup=setup) == 0
    (need_cold, _, one_anchor), = seen
    assert need_cold > one_anchor   # 2 requests x 2 anchor layers to optimise
