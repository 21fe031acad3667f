import pytest
import torch
from conftest import make_tiny
from torch import nn

from kedit.arch import ArchitectureAdapter
from kedit.errors import UnsupportedArchitecture
from kedit.hooks import Trace


def test_adapter_maps_every_family(tiny_family):
    family, model = tiny_family
    a = ArchitectureAdapter.from_model(model)
    assert a.n_layers == 4
    assert a.d_model == 32
    assert a.d_ff in (80, 96, 128)
    assert a.layout == ("in_out" if family == "gpt2" else "out_in")
    assert a.w_out_weight(2).shape == (a.d_model, a.d_ff)
    assert not isinstance(a.final_norm, nn.Identity)


def test_w_k_through_adapter_equals_module_output(tiny_family):
    _, model = tiny_family
    a = ArchitectureAdapter.from_model(model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for layer in range(a.n_layers):
        with Trace(a) as tr:
            tr.capture_key(layer)
            tr.capture_key_output(layer)
            tr.run(input_ids=ids)
        torch.testing.assert_close(a.w_out_apply(layer, tr.keys[layer]), tr.key_outputs[layer], rtol=1e-5, atol=1e-5)


def test_in_place_update_is_correct_for_both_layouts(tiny_tok):
    for family in ("gpt2", "llama"):
        model = make_tiny(family, tiny_tok)
        a = ArchitectureAdapter.from_model(model)
        k = torch.randn(3, a.d_ff)
        before = a.w_out_apply(1, k)
        delta = torch.randn(a.d_model, a.d_ff) * 0.01
        a.add_to_w_out(1, delta)
        torch.testing.assert_close(a.w_out_apply(1, k), before + k @ delta.T, rtol=1e-5, atol=1e-5)


def test_unembed_matches_model_logits(tiny_family):
    _, model = tiny_family
    a = ArchitectureAdapter.from_model(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with Trace(a) as tr:
        tr.capture_block(a.n_layers - 1)
        out = tr.run(input_ids=ids)
    torch.testing.assert_close(a.unembed(tr.blocks[a.n_layers - 1]), out.logits, rtol=1e-4, atol=1e-4)


def test_unmappable_model_names_what_is_missing():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(UnsupportedArchitecture, match="list of transformer blocks"):
        ArchitectureAdapter.from_model(NoBlocks())


def test_layer_out_of_range(tiny_llama):
    a = ArchitectureAdapter.from_model(tiny_llama)
    with pytest.raises(ValueError, match="out of range"):
        a.w_out(4)
