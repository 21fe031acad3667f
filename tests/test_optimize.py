import pytest
import torch
from conftest import make_tiny

from kedit.batch import TokenBatch
from kedit.editor import Editor
from kedit.optimize import AnchorConfig, optimize_anchors
from kedit.requests import EditRequest
from kedit.tokens import pad_id

REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "German", "French"),
    EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris"),
]


def _anchors(editor, reqs, layer, cfg, chunk):
    prep = TokenBatch(editor.tok, reqs, editor.templates, chunk)
    return optimize_anchors(editor.model, editor.adapter, prep.chunks, layer, cfg, pad_id(editor.tok))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_batched_equals_one_by_one(tiny_tok, family):
    model = make_tiny(family, tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1, 2])
    cfg = AnchorConfig(steps=8, lr=0.2, early_stop=0.0)
    batched = _anchors(editor, REQS, 1, cfg, chunk=len(REQS))
    assert batched.extra["replay"]
    for i, r in enumerate(REQS):
        single = _anchors(editor, [r], 1, cfg, chunk=1)
        torch.testing.assert_close(batched.z[i], single.z[0], rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(batched.nll_end[i], single.nll_end[0], rtol=1e-3, atol=1e-4)


def test_shrinking_batch_and_early_stop_match_single(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1])
    # a high early-stop threshold makes requests finish at different steps, which shrinks the batch
    cfg = AnchorConfig(steps=12, lr=1.0, clamp_norm_factor=4.0, early_stop=7.6)
    batched = _anchors(editor, REQS, 1, cfg, chunk=len(REQS))
    singles = [_anchors(editor, [r], 1, cfg, chunk=1) for r in REQS]
    steps = torch.stack([s.steps[0] for s in singles])
    assert steps.unique().numel() > 1, "test needs requests that stop at different steps"
    torch.testing.assert_close(batched.steps, steps)
    for i, s in enumerate(singles):
        torch.testing.assert_close(batched.z[i], s.z[0], rtol=2e-4, atol=2e-5)


def test_optimisation_lowers_nll_and_respects_clamp(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[2])
    a = _anchors(editor, REQS, 2, AnchorConfig(steps=10, lr=1.0, clamp_norm_factor=4.0), chunk=4)
    assert (a.nll_end < a.nll_start - 0.05).all()
    torch.testing.assert_close(a.z, a.h + a.delta)
    clamped = _anchors(editor, REQS, 2, AnchorConfig(steps=10, lr=1.0, clamp_norm_factor=0.05), chunk=4)
    norms = clamped.delta.norm(dim=-1) / clamped.h.norm(dim=-1)
    assert (norms <= 0.05 + 1e-5).all() and (norms > 0.049).all()


def test_full_forward_fallback_matches_replay(tiny_tok, monkeypatch):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1])
    cfg = AnchorConfig(steps=5, lr=0.3, early_stop=0.0)
    fast = _anchors(editor, REQS, 1, cfg, chunk=4)
    import kedit.optimize as opt

    monkeypatch.setattr(opt.torch, "allclose", lambda *a, **k: False)  # force the fallback path
    slow = _anchors(editor, REQS, 1, cfg, chunk=4)
    assert not slow.extra["replay"]
    torch.testing.assert_close(fast.z, slow.z, rtol=2e-4, atol=2e-5)


def test_deterministic(tiny_tok):
    model = make_tiny("llama", tiny_tok)
    editor = Editor(model, tiny_tok, layers=[1])
    cfg = AnchorConfig(steps=5)
    a, b = _anchors(editor, REQS, 1, cfg, 4), _anchors(editor, REQS, 1, cfg, 4)
    assert torch.equal(a.z, b.z)


def test_bf16_cpu_anchor_loop_uses_maths_attention_and_keeps_the_replay(tiny_tok, monkeypatch):
    """A bf16 model on the CPU runs the anchor loop with the maths SDPA backend (CPU flash attention's bf16
    backward was the slowest op of a step), the suffix replay still reproduces the real forward, and an
    fp32 model keeps torch's choice."""
    import kedit.optimize as opt

    model = make_tiny("llama", tiny_tok)
    editor32 = Editor(model, tiny_tok, layers=[1])
    assert isinstance(opt.attention_backend(editor32.adapter, AnchorConfig()), type(opt.contextlib.nullcontext()))
    model16 = make_tiny("llama", tiny_tok).to(torch.bfloat16)
    editor16 = Editor(model16, tiny_tok, layers=[1])
    editor16.templates  # noqa: B018 (sampled now: generation is outside the anchor loop)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch._C._get_flash_sdp_enabled() or torch._C._get_mem_efficient_sdp_enabled())
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    a = _anchors(editor16, REQS, 1, AnchorConfig(steps=3, early_stop=0.0), chunk=len(REQS))
    assert a.extra["replay"] and torch.isfinite(a.z).all()
    assert seen and not any(seen)  # the tiny Llama attends through SDPA: only the maths backend was allowed
    assert torch._C._get_flash_sdp_enabled()  # torch's choice restored afterwards
