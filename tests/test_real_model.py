"""SmolLM2 end to end (slow: loads the embedded model; statistics from ../shared/data wikitext)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED, shared_data

from kedit.commands.demo import demo_requests, unrelated_prompts
from kedit.edit import Edit
from kedit.editor import Editor
from kedit.probe import greedy, starts_with_target, target_probs
from kedit.stats import StatsSpec

pytestmark = pytest.mark.slow
LAYERS = [4, 5, 6, 7, 8]
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tok = smollm2
    spec = StatsSpec(corpus=str(WIKI), tokens=40_000) if WIKI.is_file() else StatsSpec(tokens=20_000)
    editor = Editor(model, tok, layers=LAYERS, stats=spec)
    stats = {layer: editor.second_moment(layer) for layer in LAYERS}
    facts = demo_requests(10)
    unrelated = unrelated_prompts()
    return model, tok, stats, facts, unrelated, greedy(model, tok, unrelated, 5)


def _success(model, tok, facts) -> list[bool]:
    prompts = [r.filled for r in facts]
    p_new = target_probs(model, tok, prompts, [r.target_new for r in facts])
    p_true = target_probs(model, tok, prompts, [r.target_true for r in facts])
    gens = greedy(model, tok, prompts, 5)
    return [starts_with_target(g, r.target_new) and a > b for g, r, a, b in zip(gens, facts, p_new, p_true)]


# Forward replay with the default lam takes 9/10 edits here but flips up to 3 near-tie unrelated prompts
# ("Barack Obama was born in" flips under any edit); a lam that keeps 9/10 of them (>= 25000) lets only
# 3/10 edits take (closing note of the editing-core issue). Its locality bar is therefore 7/10, not 9/10.
# The success and locality bars of these two tests were measured with wikitext statistics (40k tokens); with
# statistics from the model's own samples (a fresh clone without ../shared) locality differs by a prompt or two.
# The backward bar was measured at lam 5000 (then backward targets' own default; since issue 11 every construction
# gets the solver's one default, 15000): it passes lam=5000 explicitly so that its bar keeps its meaning.
@pytest.mark.parametrize("targets, min_kept, hparams", [("backward", 9, {"lam": 5000.0}), ("forward", 7, {})])
def test_memit_edits_succeed_and_unrelated_prompts_keep(setup, targets, min_kept, hparams, capsys):
    shared_data("wikitext-2-raw/wiki.test.raw")
    model, tok, stats, facts, unrelated, unrelated_before = setup
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tok, method="memit", targets=targets, layers=LAYERS, stats=stats, diagnostics=True,
                    **hparams)
    edit = editor.apply(facts)
    ok = _success(model, tok, facts)
    kept = [a == b for a, b in zip(greedy(model, tok, unrelated, 5), unrelated_before)]
    with capsys.disabled():
        print(f"\n[memit/{targets}] success {sum(ok)}/10, unrelated kept {sum(kept)}/10, residual ratios "
              f"{[round(d['residual_ratio'], 3) for d in edit.record['diagnostics']]}")
    edit.undo()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert sum(ok) >= 9, ok
    assert sum(kept) >= min_kept, kept


def test_rome_single_edits_succeed_and_unrelated_prompts_keep(setup, capsys):
    shared_data("wikitext-2-raw/wiki.test.raw")  # bars measured with wikitext statistics, as above
    model, tok, stats, facts, unrelated, unrelated_before = setup
    editor = Editor(model, tok, method="rome", stats={LAYERS[0]: stats[LAYERS[0]]})  # default layer: 4
    ok, kept = [], []
    for request, edit in zip(facts, editor.apply_each(facts)):
        ok.append(_success(model, tok, [request])[0])
        kept.append(sum(a == b for a, b in zip(greedy(model, tok, unrelated, 5), unrelated_before)))
        edit.undo()
    with capsys.disabled():
        print(f"\n[rome] success {sum(ok)}/10, unrelated kept per edit {kept}")
    assert sum(ok) >= 9, ok
    assert sum(kept) >= 90, kept  # 9 of 10 unrelated prompts kept, on average over the 10 edits


def test_patch_roundtrip_and_forward_replay_consistency(setup, tmp_path, capsys):
    from kedit.batch import TokenBatch
    from kedit.models import load_model

    model, tok, stats, facts, _, _ = setup
    editor = Editor(model, tok, method="memit", targets="forward", layers=LAYERS, stats=stats, diagnostics=True)
    edit = editor.apply(facts[:1])
    # each edited layer's output at the decisive token is close to its target
    prep = TokenBatch(tok, facts[:1], editor.templates, 1)
    _, hidden = editor._read(prep, [], LAYERS)
    z = edit.targets.per_layer
    start = {layer: (z[layer] - edit.problems[layer].R.T.float()).float() for layer in LAYERS}  # h before layer
    ratios = {layer: ((z[layer] - hidden[layer]).norm() / (z[layer] - start[layer]).norm()).item() for layer in LAYERS}
    with capsys.disabled():
        last = [round(d["residual_ratio"], 3) for d in edit.record["diagnostics"]]
        print(f"\n[forward, 1 request] remaining residual per layer after the edit: "
              f"{json.dumps({k: round(v, 3) for k, v in ratios.items()})}; "
              f"at the last layer after each edit: {last}")
    # lam * C regularises each layer's solve, so a layer closes only part of its own residual
    # (measured 0.64, 0.51, 0.38, 0.48, 0.33 for layers 4-8); each must close at least a quarter of it
    assert max(ratios.values()) < 0.75
    ids = torch.tensor([tok("The Eiffel Tower is located in the city of")["input_ids"]])
    with torch.no_grad():
        edited = model(input_ids=ids).logits
    path = edit.save(tmp_path / "edit.safetensors")
    edit.undo()
    fresh, _ = load_model("smollm2-135m")
    Edit.load(path).apply(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, edited)
    # forward-replay targets replayed on the unedited model reproduce themselves exactly
    targets = editor.builder.build(editor._session(prep, {}), LAYERS)
    again = editor._replay(prep, LAYERS[0], targets.per_layer[LAYERS[0]], LAYERS[1:])
    for layer in LAYERS[1:]:
        assert torch.equal(again[layer], targets.per_layer[layer])
