"""Reference-faithful anchor optimisation (MEMIT compute_z, ROME compute_v) against a naive transcription.

The naive version runs every template and the KL prompt one by one through the full model with a hook
adding delta at the anchor layer, logits over the whole sequence and ``torch.optim.Adam``; the batched
optimiser (suffix replay, bands, chunks sorted by suffix length) must give the same anchors.
"""

import warnings

import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.batch import KL_PROMPT, TokenBatch
from kedit.editor import Editor, default_anchor_config
from kedit.hooks import Trace
from kedit.optimize import AnchorConfig, optimize_anchors
from kedit.requests import EditRequest
from kedit.tokens import encode_with_subject, pad_id, target_ids

REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "German", "French"),
    EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("{} was born in", "Albert Einstein", "Oslo", "Ulm"),
]


def _batched(editor, reqs, layer, cfg, chunk=None, order="suffix"):
    prep = TokenBatch(editor.tok, reqs, editor.templates, chunk or len(reqs), order)
    return optimize_anchors(editor.model, editor.adapter, prep.chunks, layer, cfg, pad_id(editor.tok))


def _logits(adapter, layer, ids, col, delta, site):
    """Full forward of one sequence with ``delta`` added at ``col`` of block ``layer`` (or its MLP output)."""
    with Trace(adapter, detach=False) as tr:
        if site == "mlp":
            def add(out):
                onehot = torch.zeros(out.shape[1], 1)
                onehot[col] = 1
                return out + onehot * delta
            tr.patch_key_output(layer, add)
        else:
            tr.add_to_block(layer, (torch.tensor([0]), torch.tensor([col])), delta[None])
        return tr.run(input_ids=torch.tensor([ids])).logits[0]


def _naive(editor, req, layer, cfg):
    """One request, MEMIT compute_z / ROME compute_v style; returns (z, steps, nll_end, norm)."""
    tok, adapter = editor.tok, editor.adapter
    tgt = target_ids(tok, req.filled, req.target_new)
    rows = []
    for t in editor.templates:
        enc = encode_with_subject(tok, t.replace("{}", req.prompt, 1), req.subject)
        rows.append((enc.ids + tgt[:-1], enc.decisive, len(enc.ids)))
    kl = encode_with_subject(tok, KL_PROMPT, req.subject)
    kl_read = kl.decisive if cfg.kl_position == "subject" else len(kl.ids) - 1
    bare_ids, bare_dec, _ = rows[0]  # template 0 is the bare prompt "{}"
    with torch.no_grad(), Trace(adapter) as tr:
        tr.capture_block(layer, (torch.tensor([0]), torch.tensor([bare_dec])))
        tr.capture_key_output(layer, (torch.tensor([0]), torch.tensor([bare_dec])))
        tr.run(input_ids=torch.tensor([bare_ids]))
    h0 = tr.blocks[layer][0]
    norm = (tr.key_outputs[layer][0] if cfg.site == "mlp" else h0).norm()
    delta = torch.zeros(adapter.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    steps, kl0, nll = 0, None, None
    for it in range(cfg.steps):
        nlls = []
        for ids, dec, plen in rows:
            logp = torch.log_softmax(_logits(adapter, layer, ids, dec, delta, "block"), -1)
            nlls.append(-torch.stack([logp[plen - 1 + j, tgt[j]] for j in range(len(tgt))]).mean())
        nll = torch.stack(nlls).mean()
        klp = torch.log_softmax(_logits(adapter, layer, kl.ids, kl.decisive, delta, "block")[kl_read], -1)
        kl0 = klp.detach() if kl0 is None else kl0
        total = nll + cfg.kl_factor * (klp.exp() * (klp - kl0)).sum() + cfg.weight_decay * delta.norm() / norm ** 2
        if (total if cfg.stop_on == "total" else nll) < cfg.early_stop or it == cfg.steps - 1:
            break
        opt.zero_grad()
        total.backward()
        opt.step()
        steps += 1
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * norm
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return h0 + delta.detach(), steps, float(nll.detach()), float(norm)


@pytest.fixture(scope="module")
def editor(tiny_tok):
    return Editor(make_tiny("llama", tiny_tok), tiny_tok, layers=[1])


def _close(a, b, tol=2e-4):
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())))


@pytest.mark.parametrize("position", ["subject", "last"])
def test_kl_is_read_at_the_configured_position(editor, position):
    other = "last" if position == "subject" else "subject"
    cfg = AnchorConfig(steps=5, lr=1.0, kl_factor=20.0, weight_decay=0.0, early_stop=0.0, clamp_norm_factor=4.0,
                       kl_position=position)
    a = _batched(editor, REQS[:3], 1, cfg)
    for i, r in enumerate(REQS[:3]):
        z, steps, nll, _ = _naive(editor, r, 1, cfg)
        assert _close(a.z[i], z), (a.z[i] - z).abs().max()
        assert int(a.steps[i]) == steps
        z_other = _naive(editor, r, 1, AnchorConfig(**{**cfg.__dict__, "kl_position": other}))[0]
        assert not _close(a.z[i], z_other, 1e-3), "the two KL positions must differ in this case"


def test_stopping_on_the_total_loss(editor):
    # the tiny model barely moves its NLL: a large step and decay make the decay term decide the stop
    base = dict(steps=6, lr=8.0, weight_decay=300.0, clamp_norm_factor=4.0, early_stop=7.7)
    total, nll_only = AnchorConfig(**base), AnchorConfig(**base, stop_on="nll")
    a, b = _batched(editor, REQS, 1, total), _batched(editor, REQS, 1, nll_only)
    assert total.stop_on == "total" and total.kl_position == "subject"  # reference defaults
    assert (a.steps >= b.steps).all() and (a.steps > b.steps).any(), "test needs the decay term to delay a stop"
    for i, r in enumerate(REQS):
        z, steps, _, _ = _naive(editor, r, 1, total)
        assert int(a.steps[i]) == steps and _close(a.z[i], z)


def test_mlp_site_uses_the_mlp_output_norm(editor, tiny_tok):
    cfg = AnchorConfig(steps=6, lr=1.0, early_stop=0.0, site="mlp", clamp_norm_factor=0.3)
    a = _batched(editor, REQS[:3], 1, cfg)
    assert a.site == "mlp"
    for i, r in enumerate(REQS[:3]):
        z, steps, _, norm = _naive(editor, r, 1, cfg)
        assert abs(float(a.norm[i]) - norm) <= 1e-5 * norm and _close(a.z[i], z)
        assert float(a.delta[i].norm()) <= 0.3 * norm * (1 + 1e-5)
    assert float(a.norm.max()) < float(a.h.norm(dim=-1).min())  # a different norm from the residual's
    rome = Editor(editor.model, tiny_tok, "rome", layers=[1])
    assert (rome.anchor_cfg.site, rome.anchor_cfg.clamp_norm_factor) == ("mlp", 4.0)
    assert rome.config()["anchor"]["site"] == "mlp" and rome.config()["anchor"]["stop_on"] == "total"
    assert default_anchor_config(editor.model, True).site == "block"


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_delta_on_mlp_output_is_delta_on_block_output(tiny_tok, family):
    model = make_tiny(family, tiny_tok)
    adapter = ArchitectureAdapter.from_model(model)
    ids = tiny_tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    delta = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = _logits(adapter, 1, ids, 3, torch.zeros_like(delta), "block")
        on_mlp = _logits(adapter, 1, ids, 3, delta, "mlp")
        on_block = _logits(adapter, 1, ids, 3, delta, "block")
    assert (on_mlp - plain).abs().max() > 1e-2  # the patch does something
    torch.testing.assert_close(on_mlp, on_block, rtol=1e-5, atol=1e-5)


def test_anchors_do_not_depend_on_the_chunk(editor):
    cfg = AnchorConfig(steps=6, lr=1.0, clamp_norm_factor=4.0, early_stop=7.6)
    one = _batched(editor, REQS, 1, cfg, chunk=len(REQS), order="request")
    for chunk, order in ((2, "suffix"), (1, "request"), (3, "suffix")):
        other = _batched(editor, REQS, 1, cfg, chunk=chunk, order=order)
        torch.testing.assert_close(other.z, one.z, rtol=1e-5, atol=1e-5 * float(one.z.abs().max()))
        torch.testing.assert_close(other.steps, one.steps)
    prep = TokenBatch(editor.tok, REQS, editor.templates, 2, "suffix")
    assert [int(i) for c in prep.chunks for i in c.requests] != list(range(len(REQS)))  # really reordered


def test_per_request_cache_across_batches(tiny_tok, tmp_path):
    model = make_tiny("llama", tiny_tok)
    stats = {layer: torch.eye(ArchitectureAdapter.from_model(model).d_ff, dtype=torch.float64) for layer in (1, 2)}
    fast = {"steps": 4, "lr": 1.0, "clamp_norm_factor": 4.0}
    fresh = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor=fast).prepare(REQS)[1].anchors[0]
    cache: dict = {}
    ed = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor=fast, anchor_cache=cache)
    _, _, log3 = ed.prepare(REQS[:3])
    _, targets, log5 = ed.prepare([REQS[3], REQS[0], REQS[4], REQS[2], REQS[1]])
    assert (log3["anchors"][0]["optimised"], log5["anchors"][0]["reused"], log5["anchors"][0]["optimised"]) == (3, 3, 2)
    torch.testing.assert_close(targets.anchors[0].z, fresh.z[[3, 0, 4, 2, 1]], rtol=1e-5, atol=1e-5)
    # a directory: entries on disk, reused by a new editor (new process), a damaged one recomputed
    ed_disk = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor=fast, anchor_cache=tmp_path / "anchors")
    ed_disk.prepare(REQS[:2])
    files = sorted((tmp_path / "anchors").glob("anchor-*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:-8] + b"\0" * 8)
    again = Editor(model, tiny_tok, layers=[1, 2], stats=stats, anchor=fast, anchor_cache=tmp_path / "anchors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t2, log = again.prepare(REQS[:2])
    assert (log["anchors"][0]["reused"], log["anchors"][0]["optimised"]) == (1, 1)
    assert any("anchor cache" in str(w.message) for w in caught)
    torch.testing.assert_close(t2.anchors[0].z, fresh.z[:2], rtol=1e-5, atol=1e-5)
