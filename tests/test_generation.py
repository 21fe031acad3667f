"""kedit.generation: greedy equals transformers' generate, batching changes nothing, seeded sampling."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny

from kedit.generation import cache_kwargs, generate, generate_ids, new_cache, row_seed
from kedit.probe import greedy
from kedit.sampling import sample

PROMPTS = ["The capital of France is", "Apples", "Michael Jordan plays basketball in the city of", "Rivers"]


def _hf_greedy(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_greedy_equals_transformers_generate(family, tiny_tok):
    model = make_tiny(family, tiny_tok)
    want = [_hf_greedy(model, tiny_tok, p, 12) for p in PROMPTS]
    assert generate(model, tiny_tok, PROMPTS, 12) == want
    assert greedy(model, tiny_tok, PROMPTS, 12) == want


def test_batched_equals_one_by_one_greedy_and_sampled(tiny_llama, tiny_tok):
    ids = [tiny_tok(p)["input_ids"] for p in PROMPTS]
    seeds = [row_seed(7, i) for i in range(len(ids))]
    for top_k in (1, 5, 0):
        batched = generate_ids(tiny_llama, ids, 15, top_k=top_k, seeds=seeds, batch_size=4)
        alone = [generate_ids(tiny_llama, [x], 15, top_k=top_k, seeds=[s])[0] for x, s in zip(ids, seeds, strict=True)]
        in_pairs = generate_ids(tiny_llama, ids, 15, top_k=top_k, seeds=seeds, batch_size=2)
        assert batched == alone == in_pairs, top_k


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_llama, tiny_tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample(tiny_llama, tiny_tok, "The", 6, 15, seed=1, top_k=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == sample(tiny_llama, tiny_tok, "The", 6, 15, seed=1, top_k=5)
    assert a != sample(tiny_llama, tiny_tok, "The", 6, 15, seed=2, top_k=5)
    assert len(set(a)) > 1 and all(t.startswith("The") for t in a)  # rows differ from one another


def test_top_k_restricts_choices(tiny_llama, tiny_tok):
    ids = tiny_tok("Apples")["input_ids"]
    logits = tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    firsts = {row[0] for row in generate_ids(tiny_llama, [ids] * 40, 1, top_k=3,
                                             seeds=[row_seed(0, i) for i in range(40)])}
    assert firsts <= allowed and len(firsts) > 1


def test_limits_eos_and_context_length(tiny_tok):
    gpt2 = make_tiny("gpt2", tiny_tok)  # learned positions: a step past n_positions would raise IndexError
    ctx = gpt2.config.n_positions
    ids = [tiny_tok("The city of")["input_ids"], [5] * (ctx - 2), [5] * (ctx + 3)]
    out = generate_ids(gpt2, ids, [ctx, 10, 10], top_k=0, seeds=[1, 2, 3])
    assert len(ids[0]) + len(out[0]) <= ctx and len(out[1]) <= 2 and out[2] == []
    eos = tiny_tok.eos_token_id
    per_row = generate_ids(gpt2, ids[:1] * 3, [0, 1, 7], eos_token_id=None)
    assert [len(r) for r in per_row] == [0, 1, 7]
    # with the first greedy token declared EOS, nothing is emitted
    first = per_row[1][0]
    assert generate_ids(gpt2, ids[:1], 7, eos_token_id=first) == [[]]
    assert all(eos not in r for r in generate_ids(gpt2, ids[:1] * 2, 30, top_k=0, seeds=[0, 1], eos_token_id=eos))


def test_bad_arguments_are_rejected(tiny_llama, tiny_tok):
    ids = [tiny_tok("The")["input_ids"]]
    with pytest.raises(ValueError, match="seed"):
        generate_ids(tiny_llama, ids, 3, top_k=5)
    with pytest.raises(ValueError, match="token limits"):
        generate_ids(tiny_llama, ids, [3, 4])
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(tiny_llama, [[]], 3)


def test_current_cache_api_without_deprecation_warnings(tiny_llama, tiny_tok):
    cache = new_cache(tiny_llama)
    assert list(cache_kwargs(tiny_llama, cache).values()) == [cache]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate(tiny_llama, tiny_tok, PROMPTS, 5, top_k=5, seed=0)
        greedy(tiny_llama, tiny_tok, PROMPTS, 5)


def test_finished_rows_are_dropped_or_kept_alike(tiny_llama, tiny_tok, monkeypatch):
    """The fallback for a cache without batch_select_indices gives the same tokens."""
    ids = [tiny_tok(p)["input_ids"] for p in PROMPTS]
    want = generate_ids(tiny_llama, ids, [3, 9, 5, 12])
    from transformers import DynamicCache

    monkeypatch.setattr(DynamicCache, "batch_select_indices", property(lambda self: (_ for _ in ()).throw(
        AttributeError("no selection"))))
    assert generate_ids(tiny_llama, ids, [3, 9, 5, 12]) == want
