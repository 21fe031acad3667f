"""ArchitectureAdapter: the only code that knows where things live inside a model.

Everything is discovered from the module structure (never from a model-name string):
the block list is the homogeneous ``nn.ModuleList`` whose length is the layer count, W_out is the
linear map ``d_ff -> d_model`` inside each block, its storage layout follows from its module type
(GPT-2's ``Conv1D`` stores ``[in, out]``, ``nn.Linear`` stores ``[out, in]``), and a probe forward
pass confirms that ``W k (+ b)`` equals the module's real output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kedit.errors import UnsupportedArchitecture

try:  # transformers' GPT-2 style transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

# Names that MLP output projections carry across families; used only to break ties when a block
# holds several d_ff -> d_model maps (never needed for the families tested).
W_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "wo")

Layout = Literal["out_in", "in_out"]


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or Conv1D, else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if Conv1D and isinstance(m, Conv1D):
        return m.weight.shape[0], m.weight.shape[1]
    return None


def _n_layers_from_config(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class ArchitectureAdapter:
    """Uniform view of a causal LM: blocks, W_out per block, final norm and LM head.

    ``w_out_weight(l)`` is always ``[d_model, d_ff]`` (out x in); ``add_to_w_out(l, delta)`` writes a
    canonical ``[d_model, d_ff]`` delta into the parameter whatever its storage layout.
    """

    model: nn.Module
    blocks: nn.ModuleList
    w_out_modules: list[nn.Module]
    w_out_names: list[str]
    layout: Layout
    final_norm: nn.Module
    lm_head: nn.Module
    tied: bool
    d_model: int
    d_ff: int
    blocks_path: str

    @classmethod
    def from_model(cls, model: nn.Module, probe: bool = True) -> ArchitectureAdapter:
        """Map ``model``; raises UnsupportedArchitecture naming what could not be found."""
        blocks_path, blocks = _find_blocks(model)
        w_names, w_mods = [], []
        for i, block in enumerate(blocks):
            name, mod = _find_w_out(block, i, blocks_path)
            w_names.append(f"{blocks_path}.{i}.{name}")
            w_mods.append(mod)
        in_f, out_d = _linear_shape(w_mods[0])  # type: ignore[misc]
        layout: Layout = "in_out" if (Conv1D and isinstance(w_mods[0], Conv1D)) else "out_in"
        parent = model.get_submodule(blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else model
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is None:
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: no output embedding (LM head) found via get_output_embeddings(); "
                "kedit edits causal language models (AutoModelForCausalLM)."
            )
        emb = model.get_input_embeddings()
        tied = emb is not None and getattr(lm_head, "weight", None) is getattr(emb, "weight", 0)
        adapter = cls(
            model=model, blocks=blocks, w_out_modules=w_mods, w_out_names=w_names, layout=layout,
            final_norm=_find_final_norm(parent, blocks), lm_head=lm_head, tied=tied,
            d_model=out_d, d_ff=in_f, blocks_path=blocks_path,
        )
        if probe:
            adapter.probe()
        return adapter

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it is a valid block index, else raise ValueError naming the range."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} is out of range: this model has layers 0..{self.n_layers - 1}")
        return layer

    def w_out(self, layer: int) -> nn.Parameter:
        return self.w_out_modules[self.check_layer(layer)].weight

    def w_out_weight(self, layer: int) -> torch.Tensor:
        """W_out of ``layer`` as a ``[d_model, d_ff]`` view (no copy)."""
        w = self.w_out(layer)
        return w.T if self.layout == "in_out" else w

    def to_param_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Canonical ``[d_model, d_ff]`` -> the parameter's storage layout (decided by module type)."""
        return delta.T if self.layout == "in_out" else delta

    @torch.no_grad()
    def add_to_w_out(self, layer: int, delta: torch.Tensor) -> None:
        """In place: W_out(layer) += delta, with ``delta`` in canonical ``[d_model, d_ff]`` layout."""
        w = self.w_out(layer)
        if tuple(delta.shape) != (self.d_model, self.d_ff):
            raise ValueError(f"delta for layer {layer} has shape {tuple(delta.shape)}, "
                             f"expected [d_model, d_ff] = [{self.d_model}, {self.d_ff}]")
        w.add_(self.to_param_layout(delta).to(device=w.device, dtype=w.dtype))

    def w_out_apply(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """``W k + b`` computed through the canonical view; ``k`` is ``[..., d_ff]``."""
        mod = self.w_out_modules[layer]
        out = k @ self.w_out_weight(layer).T
        bias = getattr(mod, "bias", None)
        return out + bias if bias is not None else out

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from last-block residuals ``[..., d_model]``: final norm, LM head, soft-capping."""
        return head_logits(self.model, self.final_norm(h), self.lm_head)

    @torch.no_grad()
    def probe(self) -> None:
        """Check on a 3-token input that W_out's recorded input reproduces its output."""
        from kedit.hooks import Trace

        p = next(self.model.parameters())
        ids = torch.tensor([[1, 2, 3]], device=p.device)
        with Trace(self) as tr:
            tr.capture_key(0)
            tr.capture_key_output(0)
            tr.stop_after(0)
            tr.run(input_ids=ids)
        k, out = tr.keys[0], tr.key_outputs[0]
        ref = self.w_out_apply(0, k.to(p.dtype))
        if not torch.allclose(ref.float(), out.float(), rtol=1e-3, atol=1e-4 * (1 + out.abs().max().item())):
            raise UnsupportedArchitecture(
                f"{self.w_out_names[0]} ({type(self.w_out_modules[0]).__name__}) does not compute W k + b "
                "from its input; its weight layout is not understood"
            )

    def describe(self) -> dict:
        """Summary recorded in run records and printed by the CLI."""
        return {
            "class": type(self.model).__name__, "blocks": self.blocks_path, "n_layers": self.n_layers,
            "w_out": self.w_out_names[0].replace(".0.", ".{l}.", 1), "w_out_type": type(self.w_out_modules[0]).__name__,
            "layout": self.layout, "d_model": self.d_model, "d_ff": self.d_ff, "tied_lm_head": self.tied,
            "final_norm": type(self.final_norm).__name__,
        }


def head_logits(model: nn.Module, h: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
    """Logits from final-norm outputs ``[..., d_model]``: the LM head, then the config's soft-capping if any."""
    logits = (lm_head if lm_head is not None else model.get_output_embeddings())(h)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = _n_layers_from_config(model)
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1]
    if n is not None:
        matching = [(name, m) for name, m in lists if len(m) == n]
    else:
        longest = max((len(m) for _, m in lists), default=0)
        matching = [(name, m) for name, m in lists if len(m) == longest]
    # a block holds a W_out; this drops e.g. lists of norms that happen to have the same length
    matching = [(name, m) for name, m in matching if _mlp_out_candidates(m[0], None)]
    if len(matching) != 1:
        found = ", ".join(f"{name} ({len(m)} x {type(m[0]).__name__})" for name, m in lists) or "none"
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: could not identify the list of transformer blocks "
            f"(looked for one nn.ModuleList of {n if n is not None else 'the most'} identical blocks that "
            f"contain a d_ff -> d_model linear map; ModuleLists found: {found})"
        )
    return matching[0]


def _mlp_out_candidates(block: nn.Module, d_model: int | None) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D maps inside ``block`` that expand-then-project back: in != out (= d_model)."""
    shapes = {name: _linear_shape(m) for name, m in block.named_modules()}
    shapes = {k: v for k, v in shapes.items() if v is not None}
    if d_model is None:  # the residual width is what most maps of a block read (q, k, v, up, gate, ...)
        ins = [i for i, _ in shapes.values()]
        d_model = max(set(ins), key=ins.count) if ins else -1
    # W_out maps from a wider inner space back to the residual stream; the inner width must be the
    # output size of some other map in the block (the up/in projection), which rules out attention.
    inner = {o for _, o in shapes.values()}
    return [(name, block.get_submodule(name)) for name, (i, o) in shapes.items()
            if o == d_model and i != d_model and i in inner and i > d_model]


def _find_w_out(block: nn.Module, index: int, blocks_path: str) -> tuple[str, nn.Module]:
    cands = _mlp_out_candidates(block, None)
    if len(cands) > 1:
        cands = [(n, m) for n, m in cands if n.rsplit(".", 1)[-1] in W_OUT_NAMES] or cands
    if len(cands) != 1:
        listing = ", ".join(f"{n} {_linear_shape(m)}" for n, m in block.named_modules() if _linear_shape(m))
        raise UnsupportedArchitecture(
            f"block {blocks_path}.{index} ({type(block).__name__}): expected exactly one MLP output projection "
            f"(a Linear/Conv1D mapping d_ff -> d_model), found {len(cands)}; linear maps present: {listing or 'none'}"
        )
    return cands[0]


def _find_final_norm(parent: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    norms = [m for m in parent.children()
             if m is not blocks and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm"))]
    # the final norm is registered after the blocks in every HF causal LM; embeddings norms come before
    return norms[-1] if norms else nn.Identity()
