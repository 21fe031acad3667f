"""Layer selection: factored LGA == explicit weight gradients, Tukey fences, causal tracing checks."""

import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.errors import BadRequest
from kedit.layers import (
    LGA,
    SELECTORS,
    BruteForce,
    CausalTrace,
    LayerChoice,
    best_window,
    candidate_layers,
    tukey_fences,
)
from kedit.layers.lga import gradient_products, naive_gradient_products, site_gradients, theta_sites, weight_gradient
from kedit.layers.trace import _encode, indirect_effects
from kedit.requests import EditRequest

PROXY = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    EditRequest("{} is the capital of", "Paris", "Germany", "France"),
    EditRequest("Toyota is a company from {} and", "Japan", "the Eiffel Tower", "Berlin"),
]
# subject at the very end: the decisive token is the last position, whose top-layer state is the output
SUBJECT_LAST = [
    EditRequest("The capital of {}", "France", "Berlin", "Paris"),
    EditRequest("Rivers flow into {}", "the sea", "Japan", "Paris"),
]


def _model(family, tok, dtype=torch.float32):
    model = make_tiny(family, tok).to(dtype)
    return model, ArchitectureAdapter.from_model(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_factored_lga_equals_naive_gradients(family, tiny_tok):
    model, a = _model(family, tiny_tok, torch.float64)  # float64: the check is about the algebra, not rounding
    fact = gradient_products(model, a, tiny_tok, PROXY, range(a.n_layers), batch_size=2)
    ref = naive_gradient_products(model, a, tiny_tok, PROXY, range(a.n_layers))
    for name in ("inner", "sq_true", "sq_new"):
        got, want = getattr(fact, name), getattr(ref, name)
        assert got.shape == (len(PROXY), a.n_layers)
        assert (want.abs() > 0).all()
        assert torch.allclose(got, want, rtol=1e-5, atol=0), name
    assert torch.allclose(fact.cosine(), ref.cosine(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_factored_lga_float32(family, tiny_tok):
    model, a = _model(family, tiny_tok)
    fact = gradient_products(model, a, tiny_tok, PROXY, range(a.n_layers))
    ref = naive_gradient_products(model, a, tiny_tok, PROXY, range(a.n_layers))
    scale = (ref.sq_true * ref.sq_new).sqrt()  # float32 rounding is relative to the norms, not to the product
    assert ((fact.inner - ref.inner).abs() <= 1e-4 * scale).all()
    assert torch.allclose(fact.sq_true, ref.sq_true, rtol=1e-4)


def test_gradient_from_g_and_k_matches_conv1d_parameter_grad(tiny_tok):
    """sum_t g_t k_t^T is the canonical [d, f] gradient; GPT-2's Conv1D stores its transpose."""
    model, a = _model("gpt2", tiny_tok, torch.float64)
    r = PROXY[0]
    (site,) = theta_sites(a, 2, "w_out")
    ((G, K),), _ = site_gradients(model, a, tiny_tok, [r], [site])   # row 0: true target
    w = a.w_out(2)
    w.requires_grad_(True)
    try:
        from kedit.tokens import encode_with_subject, pad_id, target_ids, teacher_forced
        tf = teacher_forced([encode_with_subject(tiny_tok, r.prompt, r.subject).ids],
                            [target_ids(tiny_tok, r.filled, r.target_true)], pad_id(tiny_tok))
        logits = model(input_ids=tf.input_ids).logits[tf.rows, tf.positions]
        (grad,) = torch.autograd.grad(-logits.log_softmax(-1).gather(1, tf.labels[:, None]).mean(), [w])
    finally:
        w.requires_grad_(False)
    mine = weight_gradient(G[0], K[0])
    assert mine.shape == (a.d_model, a.d_ff) and grad.shape == (a.d_ff, a.d_model)
    assert torch.allclose(a.to_param_layout(mine), grad, rtol=1e-8, atol=1e-12)


def test_lga_batching_does_not_change_scores(tiny_tok):
    model, a = _model("llama", tiny_tok, torch.float64)
    one = gradient_products(model, a, tiny_tok, PROXY, [0, 2, 3], batch_size=1)
    all_ = gradient_products(model, a, tiny_tok, PROXY, [0, 2, 3], batch_size=8)   # padded rows
    assert torch.allclose(one.inner, all_.inner, rtol=1e-9)


def test_lga_select_leaves_model_untouched(tiny_tok):
    model, a = _model("gpt2", tiny_tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    choice = LGA(window=2, layers=(1, 2, 3)).select(model, a, tiny_tok, PROXY)
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(choice, LayerChoice) and choice.strategy == "lga"
    assert choice.candidates == [1, 2, 3] and len(choice.scores) == 3
    assert choice.layers in ([1, 2], [2, 3]) and choice.layer == choice.layers[-1]
    d = choice.to_dict()
    assert len(d["details"]["cosine"]) == 3 and len(d["details"]["per_request"]) == len(PROXY)
    ref = naive_gradient_products(model, a, tiny_tok, PROXY, [1, 2, 3]).inner.sum(0)
    assert torch.allclose(torch.tensor(choice.scores, dtype=torch.float64), ref, rtol=1e-3)


# -- Tukey fences and windows ------------------------------------------------------------------------
def test_tukey_fences_drop_outliers_before_argmax():
    scores = [1.0, 2.0, 3.0, 4.0, 100.0]          # Q1 = 2, Q3 = 4, IQR = 2 -> fences [0, 6] with k = 1
    lo, hi, keep = tukey_fences(scores, k=1.0)
    assert (lo, hi) == (0.0, 6.0) and keep == [True, True, True, True, False]
    assert best_window(list(range(5)), scores, 1, keep, lo, hi) == ([3], "fenced")
    assert best_window(list(range(5)), scores, 1, tukey_fences(scores, float("inf"))[2]) == ([4], "argmax")
    # a larger k widens the fences: Q3 + 30 * 2 = 64 still excludes 100, k = 50 keeps it
    assert tukey_fences(scores, 30.0)[2][-1] is False and tukey_fences(scores, 50.0)[2][-1] is True
    # low outliers are dropped too (they can never win, but they leave the kept mask)
    assert tukey_fences([-50.0, 1.0, 2.0, 3.0, 4.0], 1.0)[2] == [False, True, True, True, True]
    with pytest.raises(ValueError, match="k must be >= 0"):
        tukey_fences(scores, -1.0)


def test_best_window_skips_windows_with_fenced_layers():
    cands = [4, 5, 6, 7, 8, 9]
    scores = [1.0, 1.0, 50.0, 3.0, 3.0, 1.0]
    lo, hi, keep = tukey_fences(scores, 1.0)
    assert keep == [True, True, False, True, True, True]
    assert best_window(cands, scores, 2, keep, lo, hi) == ([7, 8], "fenced")   # not [6, 7] (outlier inside)
    assert best_window(cands, scores, 2) == ([6, 7], "argmax")
    # every window of 4 contains layer 6: fall back to scores winsorised at the fences (hi = 3 + 2 = 5):
    # [1, 1, 5, 3, 3, 1] -> sums 10, 12, 12; ties go to the shallower window
    assert hi == 5.0
    assert best_window(cands, scores, 4, keep, lo, hi) == ([5, 6, 7, 8], "winsorised")
    # windows never bridge a gap in the candidate list
    assert best_window([1, 2, 5, 6], [0.0, 0.0, 1.0, 9.0], 2) == ([5, 6], "argmax")
    with pytest.raises(ValueError, match="consecutive"):
        best_window([1, 3, 5], [1.0, 2.0, 3.0], 2)


# -- causal tracing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_noise_gives_zero_indirect_effect(family, tiny_tok):
    model, a = _model(family, tiny_tok)
    choice = CausalTrace(noise=0.0, samples=2).select(model, a, tiny_tok, PROXY)
    assert choice.candidates == list(range(a.n_layers))
    assert max(abs(s) for s in choice.scores) < 1e-7
    assert abs(choice.details["total_effect"]) < 1e-7 and choice.details["p_clean"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_restoring_top_layer_recovers_clean_probability(family, tiny_tok):
    model, a = _model(family, tiny_tok)
    encs = [_encode(tiny_tok, model, r) for r in SUBJECT_LAST]
    assert all(e.last == len(e.ids) - 1 for e in encs)
    res = indirect_effects(model, a, encs, range(a.n_layers), noise_std=0.5, samples=3, seed=0, pad=0)
    assert (res["p_clean"] - res["p_corrupted"]).abs().min() > 1e-6          # the noise did something
    assert torch.allclose(res["p_restored"][:, -1], res["p_clean"], rtol=1e-5, atol=1e-9)
    # decisive token before the end: the top layer's state there never reaches the output -> no effect
    encs = [_encode(tiny_tok, model, r) for r in PROXY]
    res = indirect_effects(model, a, encs, [a.n_layers - 1], noise_std=0.5, samples=3, seed=0, pad=0)
    assert torch.allclose(res["p_restored"][:, 0], res["p_corrupted"], rtol=1e-5, atol=1e-9)


def test_causal_trace_seeded_and_batch_independent(tiny_tok):
    model, a = _model("llama", tiny_tok)
    one = CausalTrace(samples=3, seed=1, batch_size=1).select(model, a, tiny_tok, PROXY + SUBJECT_LAST)
    many = CausalTrace(samples=3, seed=1, batch_size=8).select(model, a, tiny_tok, PROXY + SUBJECT_LAST)
    other = CausalTrace(samples=3, seed=2, batch_size=8).select(model, a, tiny_tok, PROXY + SUBJECT_LAST)
    assert torch.allclose(torch.tensor(one.scores), torch.tensor(many.scores), rtol=1e-4, atol=1e-9)
    assert one.scores != other.scores
    assert one.layers == [max(one.candidates, key=lambda l: one.by_layer()[l])]
    assert one.details["noise_std"] == pytest.approx(3 * one.details["embedding_std"])


def test_causal_trace_answer_predicted_by_default_dataset_on_request(tiny_tok):
    model, a = _model("llama", tiny_tok)
    from kedit.tokens import target_ids

    for r in PROXY:
        ids = _encode(tiny_tok, model, r).ids
        with torch.no_grad():
            argmax = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert _encode(tiny_tok, model, r).answer == argmax                      # default: the clean prediction
        assert _encode(tiny_tok, model, r, "dataset").answer == target_ids(tiny_tok, r.filled, r.target_true)[0]
    # the random model predicts none of the dataset answers, so the switch changes the traced token
    assert any(_encode(tiny_tok, model, r).answer != _encode(tiny_tok, model, r, "dataset").answer for r in PROXY)
    pred = CausalTrace(samples=2).select(model, a, tiny_tok, PROXY)
    data = CausalTrace(samples=2, answer="dataset").select(model, a, tiny_tok, PROXY)
    assert pred.details["answer"] == "predicted" and data.details["answer"] == "dataset"
    assert data.details["answer_matches_dataset"] == 1.0 and pred.details["answer_matches_dataset"] < 1.0
    assert pred.details["p_clean"] > data.details["p_clean"]  # the argmax is the most probable token
    with pytest.raises(ValueError, match="answer must be one of"):
        CausalTrace(answer="gold")


# -- errors and registry -------------------------------------------------------------------------------
@pytest.mark.parametrize("selector", [LGA(), CausalTrace(samples=1), BruteForce()])
def test_errors_name_the_problem(selector, tiny_tok):
    model, a = _model("llama", tiny_tok)
    with pytest.raises(BadRequest, match="proxy set is empty"):
        selector.select(model, a, tiny_tok, [])
    with pytest.raises(ValueError, match=r"\[4, 9\] are out of range: this model has layers 0..3"):
        type(selector)(layers=(2, 4, 9)).select(model, a, tiny_tok, PROXY)
    with pytest.raises(ValueError, match="no 3 consecutive layers"):
        type(selector)(layers=(0, 1, 3), window=3).select(model, a, tiny_tok, PROXY)


def test_lga_needs_target_true_and_valid_settings(tiny_tok):
    model, a = _model("llama", tiny_tok)
    with pytest.raises(BadRequest, match="no target_true"):
        LGA().select(model, a, tiny_tok, [EditRequest("The capital of {}", "France", "Berlin")])
    for bad in (dict(k=-1.0), dict(window=0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            LGA(**bad)
    with pytest.raises(ValueError, match="candidate layer list is empty"):
        candidate_layers(a, [])


def test_registry():
    assert SELECTORS["lga"] is LGA and SELECTORS["causal"] is CausalTrace and SELECTORS["brute"] is BruteForce
    assert all(cls.name == key for key, cls in SELECTORS.items())


# -- brute-force search ----------------------------------------------------------------------------------
CASES = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                paraphrases=("Danielle Darrieux speaks",),
                neighbors=(("The mother tongue of Michael Jordan is", "French"),)),
    EditRequest("{} is the capital of", "Paris", "Germany", "France", paraphrases=("Paris is located in",),
                neighbors=(("Berlin is the capital of", "Germany"),)),
]


class _PlantedEditor:
    """Stand-in for kedit.editor.Editor: only an edit at layer ``PLANTED`` makes the model say target_new.

    It follows the single-request protocol (``apply_each`` yields one applied edit per request, each
    undone by the caller) and acts through a logit hook, so undo is observable.
    """

    PLANTED = 2

    def __init__(self, model, tok, method, targets, layers, stats, seed, **kw):
        self.model, self.tok, self.layers = model, tok, layers
        self.timings = {"optimize": 0.0}

    def planted(self, layers: list[int]) -> bool:
        return layers == [self.PLANTED]

    def apply_each(self, requests, skip_failures=False):
        for r in requests:
            if not self.planted(self.layers):
                yield type("NoEdit", (), {"undo": lambda self: None})()
                continue
            ids = [self.tok(" " + r.target_new)["input_ids"][0]]

            def boost(_m, _a, out, ids=ids):
                out = out.clone()
                out[..., ids] += 20.0
                return out

            handle = self.model.get_output_embeddings().register_forward_hook(boost)
            yield type("Edit", (), {"undo": lambda self, h=handle: h.remove()})()


def test_brute_force_finds_planted_layer(tiny_tok, monkeypatch):
    import kedit.editor
    from kedit.layers import BruteForce

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    choice = BruteForce(stats=stats).select(model, a, tiny_tok, CASES)
    assert choice.layers == [2] and choice.details["optimal"] == [2, 2]
    assert choice.details["histogram"] == {0: 0, 1: 0, 2: 2, 3: 0}
    assert choice.scores[2] > max(choice.scores[:2] + choice.scores[3:])
    assert choice.details["score_keys"] == ["efficacy_score", "paraphrase_score", "neighborhood_score"]
    assert not model.get_output_embeddings()._forward_hooks  # every edit undone


def test_brute_force_in_pieces_equals_one_run(tiny_tok, monkeypatch):
    """A search run window chunk by window chunk (saved as JSON between runs) chooses as one run does."""
    import json

    import kedit.editor
    from kedit.layers import BruteForce
    from kedit.layers.search import WindowScores, as_cases

    model, a = _model("llama", tiny_tok)
    monkeypatch.setattr(kedit.editor, "Editor", _PlantedEditor)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    bf = BruteForce(stats=stats)
    whole = bf.select(model, a, tiny_tok, CASES)
    cases, windows = as_cases(CASES), bf.windows(a)
    parts = [WindowScores.from_dict(json.loads(json.dumps(bf.scores(model, tiny_tok, cases, windows[i:i + 3])
                                                          .to_dict()))) for i in (0, 3)]
    joined = WindowScores.join(parts)
    assert joined.windows == windows and joined.seconds["pre"] == parts[0].seconds["pre"]
    pieces = bf.choose(joined, cases, 1.0)
    assert pieces.layers == whole.layers == [2] and pieces.scores == whole.scores
    keep = ("optimal", "histogram", "per_request", "stability", "golden_score")
    assert {k: pieces.details[k] for k in keep} == {k: whole.details[k] for k in keep}
    with pytest.raises(ValueError, match="two parts"):
        WindowScores.join([parts[0], parts[0]])


def test_brute_force_with_real_editor_restores_model(tiny_tok):
    model, a = _model("llama", tiny_tok)
    stats = {l: torch.eye(a.d_ff, dtype=torch.float64) for l in range(a.n_layers)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choice = BruteForce(method="memit", window=2, layers=(1, 2, 3), stats=stats,
                        editor_kwargs=dict(anchor=dict(steps=3))).select(model, a, tiny_tok, CASES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert choice.details["windows"] == [[1, 2], [2, 3]] and choice.layers in ([1, 2], [2, 3])
    assert sum(choice.details["histogram"].values()) == len(CASES) and choice.details["failures"] == 0


def test_cli_layers_writes_json_and_figure(tiny_tok, tmp_path):
    import json

    from kedit.cli import main
    from kedit.commands.layers import parse_candidates

    assert parse_candidates("0-2,5") == (0, 1, 2, 5) and parse_candidates(None) is None
    model_dir = tmp_path / "tiny"
    make_tiny("llama", tiny_tok).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({**r.to_dict(), "paraphrases": list(r.paraphrases),
                                          "neighbors": [list(n) for n in r.neighbors]})
                              for r in CASES + CASES[:1]))
    out = tmp_path / "out"
    rc = main(["layers", "--model", str(model_dir), "--dataset", f"kedit:{data}", "--proxy", "2", "--test", "1",
               "--strategy", "all", "--candidates", "1-2", "--samples", "2", "--steps", "2", "--tokens", "300",
               "--test-all", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "layers.json").read_text())
    names = {"lga", "brute", "causal", "verified"}
    assert set(res["strategies"]) == names and res["candidates"] == [1, 2]
    assert set(res["test"]["at_choice"]) == names and "sample_wise_optimum" in res["test"]
    assert all(g >= -1e-12 for g in res["test"]["gap"].values()) and set(res["proxy_gap"]) == names
    assert all(res["strategies"][n]["details"]["stability"]["n_proxy"] == 2 for n in ("lga", "causal", "verified"))
    assert (out / "layers.png").stat().st_size > 1000
    assert res["strategies"]["causal"]["details"]["answer"] == "predicted"  # ROME's default
    rc = main(["layers", "--model", str(model_dir), "--dataset", f"kedit:{data}", "--proxy", "2", "--strategy",
               "causal", "--samples", "1", "--bootstrap", "0", "--trace-answer", "dataset", "--no-plots",
               "--out", str(tmp_path / "out2")])
    assert rc == 0
    causal = json.loads((tmp_path / "out2" / "layers.json").read_text())["strategies"]["causal"]["details"]
    assert causal["answer"] == "dataset" and causal["answer_matches_dataset"] == 1.0


def test_auto_layers_cached_per_model_and_method(tiny_tok, monkeypatch):
    import kedit.layers.lga as lga_mod
    from kedit.layers.auto import auto_layers, default_proxy

    assert len(default_proxy()) == 10
    model, _ = _model("llama", tiny_tok)
    one = auto_layers(model, tiny_tok, "rome", proxy=PROXY, strategy="lga")
    window = auto_layers(model, tiny_tok, "memit", window=2, proxy=PROXY, strategy="lga")
    assert len(one) == 1 and len(window) == 2 and window[1] == window[0] + 1

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(lga_mod, "gradient_products", boom)
    assert auto_layers(model, tiny_tok, "rome", proxy=PROXY, strategy="lga") == one
