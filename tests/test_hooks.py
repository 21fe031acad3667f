import pytest
import torch
from conftest import make_tiny

from kedit.arch import ArchitectureAdapter
from kedit.hooks import Trace

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_capture_matches_hidden_states(tiny_tok, family):
    model = make_tiny(family, tiny_tok)
    a = ArchitectureAdapter.from_model(model)
    with torch.no_grad():
        ref = model(input_ids=IDS, output_hidden_states=True).hidden_states  # ref[l + 1] = output of block l
    idx = (torch.tensor([0, 1]), torch.tensor([2, 4]))
    with Trace(a) as tr:
        tr.capture_block(1)
        tr.capture_block(2, idx)
        tr.run(input_ids=IDS)
    torch.testing.assert_close(tr.blocks[1], ref[2])
    torch.testing.assert_close(tr.blocks[2], ref[3][idx[0], idx[1]])


def test_patch_identity_is_noop_and_set_changes_downstream(tiny_llama):
    a = ArchitectureAdapter.from_model(tiny_llama)
    with torch.no_grad():
        ref = tiny_llama(input_ids=IDS).logits
    with Trace(a) as tr:
        tr.patch_block(1, lambda h: h)
        out = tr.run(input_ids=IDS)
    assert torch.equal(out.logits, ref)
    idx = (torch.tensor([0]), torch.tensor([2]))
    with Trace(a) as tr:
        tr.set_block(1, idx, torch.zeros(1, a.d_model))
        tr.capture_block(1)
        out = tr.run(input_ids=IDS)
    assert tr.blocks[1][0, 2].abs().max() == 0
    assert torch.equal(out.logits[0, :2], ref[0, :2])  # causal: earlier positions untouched
    assert not torch.allclose(out.logits[0, 2:], ref[0, 2:])
    assert torch.equal(out.logits[1], ref[1])


def test_add_to_block_is_differentiable(tiny_llama):
    a = ArchitectureAdapter.from_model(tiny_llama)
    delta = torch.zeros(1, a.d_model, requires_grad=True)
    with Trace(a, detach=False) as tr:
        tr.add_to_block(1, (torch.tensor([0]), torch.tensor([1])), delta)
        out = tr.run(input_ids=IDS)
    out.logits[0, -1].sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_stop_after_skips_later_blocks_and_returns_none(tiny_llama):
    a = ArchitectureAdapter.from_model(tiny_llama)
    seen = []
    a.blocks[3].register_forward_hook(lambda *_: seen.append(3))
    with Trace(a) as tr:
        tr.capture_key(1)
        tr.capture_block(1)
        tr.stop_after(1)
        assert tr.run(input_ids=IDS) is None
    assert 1 in tr.keys and 1 in tr.blocks and not seen


def test_hooks_removed_even_on_exception(tiny_gpt2):
    a = ArchitectureAdapter.from_model(tiny_gpt2)
    base = _hook_count(tiny_gpt2)

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Trace(a) as tr:
            tr.capture_key(0)
            tr.patch_block(2, boom)
            tr.stop_after(3)
            tr.run(input_ids=IDS)
    assert _hook_count(tiny_gpt2) == base


class _Block(torch.nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, h):
        return (h * 2, "extra") if self.as_tuple else h * 2


class _Stack(torch.nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(as_tuple), _Block(as_tuple)])

    def forward(self, input_ids, use_cache=False):
        h = input_ids.float()
        for b in self.blocks:
            out = b(h)
            h = out[0] if isinstance(out, tuple) else out
        return h


@pytest.mark.parametrize("as_tuple", [True, False])
def test_tuple_and_tensor_block_outputs(as_tuple):
    """Blocks returning a tuple (older transformers) or a tensor are captured and patched alike."""
    from types import SimpleNamespace

    stack = _Stack(as_tuple)
    adapter = SimpleNamespace(model=stack, blocks=stack.blocks, check_layer=lambda layer: layer)
    x = torch.ones(1, 3, 2)
    with Trace(adapter) as tr:
        tr.capture_block(0)
        tr.set_block(0, (torch.tensor([0]), torch.tensor([1])), torch.zeros(1, 2))
        tr.capture_block(1)
        out = tr.run(input_ids=x)
    assert torch.equal(tr.blocks[0], torch.full((1, 3, 2), 2.0))  # captured before the later-registered patch
    assert torch.equal(out[0, 1], torch.zeros(2)) and torch.equal(out[0, 0], torch.full((2,), 4.0))
    assert torch.equal(tr.blocks[1], out)
