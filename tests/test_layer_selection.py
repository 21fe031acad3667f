"""Layer selection a user can trust (issue 10): LGA variants == autograd, bootstrap stability, the verified
selector, `--layers auto`, one-line errors."""

import pytest
import torch
from conftest import make_tiny
from test_layers import _PlantedEditor as PlantedLayerEditor

from kedit.arch import ArchitectureAdapter
from kedit.errors import BadRequest, KeditError
from kedit.layers import LGA, Verified, bootstrap_stability
from kedit.layers.lga import SCORES, THETAS, GradProducts, theta_parameters
from kedit.requests import EditRequest
from kedit.tokens import encode_with_subject, pad_id, target_ids, teacher_forced

PROXY = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                paraphrases=("Danielle Darrieux speaks",),
                neighbors=(("The mother tongue of Michael Jordan is", "French"),)),
    EditRequest("{} is the capital of", "Paris", "Germany", "France", paraphrases=("Paris is located in",),
                neighbors=(("Berlin is the capital of", "Germany"),)),
    EditRequest("Toyota is a company from {} and", "Japan", "the Eiffel Tower", "Berlin"),
]


def _model(family, tok, dtype=torch.float32):
    model = make_tiny(family, tok).to(dtype)
    return model, ArchitectureAdapter.from_model(model)


def _reference_scores(model, a, tok, proxy, theta):
    """Naive: every request's full gradient w.r.t. theta_l by autograd, then the three scores by definition."""
    layers = list(range(a.n_layers))
    params = {l: theta_parameters(a, l, theta) for l in layers}
    flat = [p for l in layers for p in params[l]]
    for p in flat:
        p.requires_grad_(True)
    per = {l: ([], []) for l in layers}   # per layer: true grads, new grads (flattened)
    try:
        for r in proxy:
            prompt = encode_with_subject(tok, r.prompt, r.subject).ids
            for side, target in enumerate((r.target_true, r.target_new)):
                tf = teacher_forced([prompt], [target_ids(tok, r.filled, target)], pad_id(tok))
                logits = model(input_ids=tf.input_ids).logits[tf.rows, tf.positions]
                loss = -logits.log_softmax(-1).gather(1, tf.labels[:, None]).mean()
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                it = iter(grads)
                for l in layers:
                    g = [next(it) for _ in params[l]]
                    per[l][side].append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                                   for x, p in zip(g, params[l], strict=True)]))
    finally:
        for p in flat:
            p.requires_grad_(False)
    out = {s: [] for s in SCORES}
    for l in layers:
        T, N = torch.stack(per[l][0]), torch.stack(per[l][1])     # [n, P]
        out["sum"].append((T * N).sum().item())
        out["normalised"].append(torch.nn.functional.cosine_similarity(T, N, dim=1).sum().item())
        out["cosine"].append(torch.nn.functional.cosine_similarity(T.sum(0), N.sum(0), dim=0).item())
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("theta", THETAS)
def test_every_lga_variant_equals_naive_autograd(family, theta, tiny_tok):
    model, a = _model(family, tiny_tok, torch.float64)
    ref = _reference_scores(model, a, tiny_tok, PROXY, theta)
    for score in SCORES:
        for naive in (False, True):   # factored sites (linear maps and per-row norms) / per-request autograd
            choice = LGA(theta=theta, score=score, bootstrap=0, batch_size=2, naive=naive).select(
                model, a, tiny_tok, PROXY)
            assert choice.details["variant"] == f"{theta}/{score}"
            assert choice.strategy == ("lga" if (theta, score) == ("w_out", "sum") else f"lga-{theta}-{score}")
            got, want = (torch.tensor(x, dtype=torch.float64) for x in (choice.scores, ref[score]))
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-12), (theta, score, naive)
            cost = choice.details["cost"]
            assert cost["forward"] >= 1 and cost["backward"] >= 1 and cost["seconds"] > 0
            assert choice.details["implementation"] == ("autograd per request" if naive else "factored")


def test_unfactorable_theta_falls_back_to_autograd(tiny_tok, monkeypatch):
    """A non-linear site too large to differentiate row by row: per-request autograd, same numbers."""
    import kedit.layers.lga as lga_mod

    model, a = _model("llama", tiny_tok, torch.float64)
    fact = LGA(theta="block", score="cosine", bootstrap=0).select(model, a, tiny_tok, PROXY)
    monkeypatch.setattr(lga_mod, "SMALL_SITE_PARAMS", 0)   # the RMSNorm weights no longer count as small
    assert lga_mod.theta_sites(a, 0, "block") is None and len(lga_mod.theta_sites(a, 0, "mlp")) == 3
    slow = LGA(theta="block", score="cosine", bootstrap=0).select(model, a, tiny_tok, PROXY)
    assert (fact.details["implementation"], slow.details["implementation"]) == ("factored", "autograd per request")
    assert torch.allclose(torch.tensor(fact.scores), torch.tensor(slow.scores), rtol=1e-8)


def test_autograd_layer_groups_do_not_change_cosine(tiny_tok):
    """A tiny gradient-memory cap splits the layers into groups (more passes), same numbers."""
    model, a = _model("llama", tiny_tok, torch.float64)
    one = LGA(theta="mlp", score="cosine", bootstrap=0, naive=True).select(model, a, tiny_tok, PROXY)
    split = LGA(theta="mlp", score="cosine", bootstrap=0, naive=True, max_gradient_bytes=1).select(
        model, a, tiny_tok, PROXY)
    assert split.details["cost"]["groups"] == a.n_layers and one.details["cost"]["groups"] == 1
    assert split.details["cost"]["forward"] == a.n_layers * len(PROXY)
    assert torch.allclose(torch.tensor(one.scores), torch.tensor(split.scores), rtol=1e-10)


def test_lga_select_restores_flags_and_weights(tiny_tok):
    model, a = _model("gpt2", tiny_tok)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    LGA(theta="block", score="normalised", bootstrap=5).select(model, a, tiny_tok, PROXY)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _products(per_request):
    inner = torch.tensor(per_request, dtype=torch.float64)
    return GradProducts(list(range(inner.shape[1])), inner, torch.ones_like(inner), torch.ones_like(inner))


def test_bootstrap_stability_is_one_for_a_dominant_layer_and_spreads_on_a_tie():
    lga = LGA(window=1)
    cands = list(range(6))
    # layer 5 leads for every request by a margin that stays inside the Tukey fences
    dominant = _products([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6 + 0.01 * i] for i in range(10)])
    chosen = lga.decide(dominant, cands)[0]
    stab = bootstrap_stability(lambda w: lga.decide(dominant, cands, w)[0][0], 10, chosen[0], 200, seed=1)
    assert chosen == [5] and stab["fraction"] == 1.0 and stab["alternatives"] == []
    assert stab["n_proxy"] == 10 and stab["resamples"] == 200
    # half the requests favour layer 1, half layer 3, equally: a tie that resampling splits
    tie = _products([[0, 1, 0, 0, 0, 0]] * 5 + [[0, 0, 0, 1, 0, 0]] * 5)
    lga_inf = LGA(k=float("inf"))   # no fences: the tie is between the two layers only
    chosen = lga_inf.decide(tie, cands)[0]
    stab = bootstrap_stability(lambda w: lga_inf.decide(tie, cands, w)[0][0], 10, chosen[0], 200, seed=1)
    assert chosen == [1] and 0.25 < stab["fraction"] < 0.75
    assert stab["alternatives"][0][0] == 3 and abs(stab["fraction"] + stab["alternatives"][0][1] - 1) < 1e-12
    again = bootstrap_stability(lambda w: lga_inf.decide(tie, cands, w)[0][0], 10, chosen[0], 200, seed=1)
    assert again == stab  # seeded


def test_lga_and_causal_report_stability(tiny_tok):
    from kedit.layers import CausalTrace

    model, a = _model("llama", tiny_tok)
    for sel in (LGA(bootstrap=30), CausalTrace(samples=2, bootstrap=30)):
        stab = sel.select(model, a, tiny_tok, PROXY).details["stability"]
        assert 0 < stab["fraction"] <= 1 and stab["n_proxy"] == len(PROXY) and stab["resamples"] == 30
        assert sum(f for _, f in stab["alternatives"]) <= 1 - stab["fraction"] + 1e-12


class _PlantedEditor(PlantedLayerEditor):
    """Stand-in for kedit.editor.Editor: only an edit whose window starts at ``PLANTED`` says target_new."""

    def planted(self, layers: list[int]) -> bool:
        return layers[0] == self.PLANTED


def test_verified_finds_planted_layer_from_the_shortlist(tiny_tok, monkeypatch):
    import kedit.editor
    from kedit.layers import verified as ver

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    # the cheap signals rank the planted layer second; the default window (layer 1) leads the shortlist,
    # then the signals' choices round robin, the more stable signal first
    fake = {"causal": ([1, 0, 3, 2], 0.4), "lga": ([3, 2, 1, 0], 0.9)}

    def signals(self, model, adapter, tok, proxy, cands):
        from kedit.layers import LayerChoice

        return {n: LayerChoice(n, [r[0]], cands, [float(-r.index(c)) for c in cands], 0.0,
                               {"stability": {"fraction": f}}) for n, (r, f) in fake.items()}

    monkeypatch.setattr(ver.Verified, "signals", signals)
    choice = Verified(shortlist=3, edits=2, stats=stats, bootstrap=50).select(model, a, tiny_tok, PROXY)
    assert choice.details["shortlist"] == [1, 3, 2] and choice.layers == [2]
    assert choice.details["stability"]["fraction"] == 1.0
    cost = choice.details["cost"]
    assert cost["edits"] == 6 and cost["brute_force_edits"] == len(PROXY) * a.n_layers
    assert cost["brute_force_seconds_estimate"] > 0 and cost["stats_seconds"] >= 0
    assert cost["fraction_of_brute_force"] == pytest.approx(
        (cost["seconds"] - cost["stats_seconds"]) / cost["brute_force_seconds_estimate"])
    assert not model.get_output_embeddings()._forward_hooks  # every edit undone


def test_brute_force_reports_stability(tiny_tok, monkeypatch):
    import kedit.editor
    from kedit.layers import BruteForce

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    choice = BruteForce(stats=stats, bootstrap=40).select(model, a, tiny_tok, PROXY[:2])
    assert choice.layers == [2] and choice.details["stability"]["fraction"] == 1.0


def test_verified_with_real_signals_and_windows(tiny_tok, monkeypatch):
    import kedit.editor

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    choice = Verified(method="memit", window=2, shortlist=3, stats=stats, causal_samples=2,
                      bootstrap=20).select(model, a, tiny_tok, PROXY)
    assert choice.layers == [2, 3] and choice.details["window"] == 2     # all 3 window starts shortlisted
    sig = choice.details["signals"]
    assert set(sig) == {"lga", "lga-w_out-cosine", "lga-w_out-normalised", "causal"}
    assert all(s["stability"]["n_proxy"] == len(PROXY) for s in sig.values())


def test_bad_input_is_one_line_error(tiny_tok):
    model, a = _model("llama", tiny_tok)
    cases = [
        (lambda: Verified(edits=5).select(model, a, tiny_tok, PROXY), "only 3 requests"),
        (lambda: LGA(window=a.n_layers + 5).select(model, a, tiny_tok, PROXY), "longer than the model"),
        (lambda: LGA(theta="attention"), "unknown LGA theta"),
        (lambda: LGA(score="dot"), "unknown LGA score"),
        (lambda: Verified(shortlist=0), "shortlist"),
    ]
    for fn, text in cases:
        with pytest.raises(KeditError) as e:
            fn()
        assert text in str(e.value) and "\n" not in str(e.value)
    from kedit.commands.layers import parse_variants

    assert parse_variants("w_out/sum,mlp/cosine") == [("w_out", "sum"), ("mlp", "cosine")]
    assert len(parse_variants("all")) == 9
    with pytest.raises(BadRequest, match="unknown LGA variant 'mlp/dot'"):
        parse_variants("mlp/dot")


def test_auto_verified_decision_is_cached_and_summarised(tiny_tok, monkeypatch):
    import kedit.editor
    from kedit.layers import verified as ver
    from kedit.layers.auto import resolve_auto

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    first = resolve_auto(model, tiny_tok, "rome", proxy=PROXY, stats=stats)
    assert first.strategy == "verified" and not first.cached and first.path.is_file()
    assert first.layers == [2]  # shortlist = every layer of the tiny model (4 <= default k)
    line = first.summary()
    assert "layers [2] by verified" in line and "stability" in line and str(first.path) in line

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(ver.Verified, "select", boom)
    again = resolve_auto(model, tiny_tok, "rome", proxy=PROXY, stats=stats)
    assert again.cached and again.layers == [2] and "cached at" in again.summary()
    # another targets construction is another decision
    with pytest.raises(AssertionError, match="recomputed"):
        resolve_auto(model, tiny_tok, "rome", targets="backward", proxy=PROXY, stats=stats)
    # so is the same request after a default changed (solver, anchor settings or key weighting)
    import kedit.templates

    monkeypatch.setattr(kedit.templates, "DEFAULT_KEY_WEIGHTING", "flat")
    with pytest.raises(AssertionError, match="recomputed"):
        resolve_auto(model, tiny_tok, "rome", proxy=PROXY, stats=stats)


def test_cli_edit_layers_auto_prints_its_decision(tiny_tok, tmp_path, capsys):
    from conftest import CORPUS_TEXT

    from kedit.cli import main

    model_dir = tmp_path / "tiny"
    make_tiny("llama", tiny_tok).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(CORPUS_TEXT * 5)
    args = ["edit", "--model", str(model_dir), "--method", "rome", "--layers", "auto", "--steps", "2",
            "--corpus", str(tmp_path / "corpus.txt"), "--tokens", "1500", "--prompt", "The capital of {} is",
            "--subject", "France", "--target", "Berlin", "--true", "Paris", "--json"]
    assert main(args) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "--layers auto:" in x)
    assert "by verified (stability" in line and "saved to" in line and "brute-force time" in line
    assert main(args) == 0
    assert "cached at" in capsys.readouterr().err
