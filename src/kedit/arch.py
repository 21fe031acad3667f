"""ArchitectureAdapter: the only code that knows where things live inside a model.

Everything is discovered from the module structure (never from a model-name string):
the block list is the homogeneous ``nn.ModuleList`` whose length is the layer count, W_out is the
linear map ``d_ff -> d_model`` inside each block, its storage layout follows from its module type
(GPT-2's ``Conv1D`` stores ``[in, out]``, ``nn.Linear`` stores ``[out, in]``), and a probe forward
pass confirms that ``W k (+ b)`` equals the module's real output.

Where the weights really are is also this module's business, and only its: a W_out parameter may live
on any device, or (accelerate dispatch with CPU/disk offload) sit on ``meta`` while the forward pass
reads the real tensor from the offload hook's weights map. ``w_out_storage`` / ``add_to_w_out`` /
``snapshot_w_out`` / ``restore_w_out`` read and write the tensor the forward pass uses, whichever it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
ROW_CHUNK = 4096  # rows of W updated per step: bounds the fp32 temporary of a weight write


def align_hook(module: nn.Module) -> Any | None:
    """accelerate's ``AlignDevicesHook`` attached to ``module`` (directly or inside a SequentialHook), else None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:
        if h is not None and hasattr(h, "execution_device") and hasattr(h, "weights_map"):
            return h
    return None


def module_device(module: nn.Module) -> torch.device:
    """Device ``module`` computes on: its dispatch hook's execution device, else that of its first tensor."""
    hook = align_hook(module)
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids must go: its input embedding's execution device (dispatch-aware)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb if emb is not None else model)


def _offload_slot(module: nn.Module, name: str) -> tuple[Mapping, str] | None:
    """``(mapping, key)`` holding the real tensor ``name`` of an offloaded module, else None.

    accelerate keeps offloaded weights in ``hook.weights_map``: a plain dict (``cpu_offload``) or a
    ``PrefixedDataset`` over an ``OffloadedWeightsLoader`` whose ``state_dict`` (CPU weights) takes
    priority over its ``index`` (disk: ``.dat`` memmaps or the original safetensors files). The
    returned mapping is the one to write into: the loader's ``state_dict`` for disk weights, so an
    edit never writes into the user's checkpoint files.
    """
    hook = align_hook(module)
    if hook is None or not getattr(hook, "offload", False) or hook.weights_map is None:
        return None
    wm = hook.weights_map
    prefix = ""
    if hasattr(wm, "dataset") and hasattr(wm, "prefix"):  # PrefixedDataset
        wm, prefix = wm.dataset, wm.prefix
    key = prefix + name
    if hasattr(wm, "state_dict") and hasattr(wm, "index"):  # OffloadedWeightsLoader
        if key not in wm.state_dict and key not in wm.index:
            return None
        return wm.state_dict, key
    return (wm, key) if key in wm else None


def real_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """Tensor ``name`` (e.g. ``"weight"``) of ``module`` as the forward pass will use it (offload-aware)."""
    slot = _offload_slot(module, name)
    if slot is None:
        return getattr(module, name)
    hook = align_hook(module)
    return hook.weights_map[name]  # the loader resolves state_dict overrides first, then disk


@dataclass
class WeightSnapshot:
    """What ``restore_w_out`` needs to put a W_out back bit for bit: a copy in its own dtype."""

    tensor: torch.Tensor  # storage layout, the weight's dtype, on its device (offloaded: CPU)
    overridden: bool  # offloaded weight: whether the writable offload map already held it in memory


def linear_shape(m: nn.Module) -> tuple[int, int] | None:
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
        in_f, out_d = linear_shape(w_mods[0])  # type: ignore[misc]
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
        """The W_out parameter object (on ``meta`` when offloaded: use ``w_out_storage`` for values)."""
        return self.w_out_modules[self.check_layer(layer)].weight

    def w_out_storage(self, layer: int) -> torch.Tensor:
        """W_out of ``layer`` as the forward pass uses it, in its storage layout and dtype (read only)."""
        return real_tensor(self.w_out_modules[self.check_layer(layer)], "weight")

    def w_out_weight(self, layer: int) -> torch.Tensor:
        """W_out of ``layer`` as a ``[d_model, d_ff]`` view (no copy)."""
        w = self.w_out_storage(layer)
        return w.T if self.layout == "in_out" else w

    def layer_device(self, layer: int) -> torch.device:
        """Device block ``layer``'s W_out computes on (where its keys appear and its solve should run)."""
        return module_device(self.w_out_modules[self.check_layer(layer)])

    @property
    def input_device(self) -> torch.device:
        """Device of the input embedding: where input ids must be sent."""
        return input_device(self.model)

    def to_param_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Canonical ``[d_model, d_ff]`` -> the parameter's storage layout (decided by module type)."""
        return delta.T if self.layout == "in_out" else delta

    @torch.no_grad()
    def add_to_w_out(self, layer: int, delta: torch.Tensor) -> None:
        """W_out(layer) += delta, ``delta`` canonical ``[d_model, d_ff]``, into the weight the forward uses.

        The sum is formed in fp32 (fp64 for an fp64 weight) and rounded once to the weight's dtype, in
        blocks of ROW_CHUNK rows (bounded temporary). An offloaded weight is replaced by an in-memory
        override in the offload map (``snapshot_w_out`` first, so ``restore_w_out`` can drop it again).
        """
        if tuple(delta.shape) != (self.d_model, self.d_ff):
            raise ValueError(f"delta for layer {layer} has shape {tuple(delta.shape)}, "
                             f"expected [d_model, d_ff] = [{self.d_model}, {self.d_ff}]")
        mod = self.w_out_modules[self.check_layer(layer)]
        slot = _offload_slot(mod, "weight")
        w = self.w_out_storage(layer)
        if slot is not None:
            w = w.clone()  # a fresh tensor for the override; never the loader's file-backed one
        d = self.to_param_layout(delta)
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        for lo in range(0, w.shape[0], ROW_CHUNK):
            rows = w[lo:lo + ROW_CHUNK]
            rows.copy_((rows.to(acc) + d[lo:lo + ROW_CHUNK].to(device=w.device, dtype=acc)).to(w.dtype))
        if slot is not None:
            mapping, key = slot
            mapping[key] = w

    def snapshot_w_out(self, layer: int) -> WeightSnapshot:
        """A copy of W_out(layer) for ``restore_w_out``; memory: one W_out in its dtype."""
        slot = _offload_slot(self.w_out_modules[self.check_layer(layer)], "weight")
        overridden = slot is not None and _is_override(*slot)
        return WeightSnapshot(self.w_out_storage(layer).detach().clone(), overridden)

    @torch.no_grad()
    def restore_w_out(self, layer: int, snap: WeightSnapshot) -> None:
        """Put W_out(layer) back exactly as ``snap`` recorded it (an offload override is dropped)."""
        slot = _offload_slot(self.w_out_modules[self.check_layer(layer)], "weight")
        if slot is None:
            self.w_out(layer).copy_(snap.tensor)
            return
        mapping, key = slot
        if snap.overridden:
            mapping[key] = snap.tensor.clone()
        elif _is_override(mapping, key):
            del mapping[key]  # the loader falls back to the untouched weights on disk

    def offload_summary(self) -> dict[str, int]:
        """Where the edited model's W_out weights live: ``{device or "offload": count}`` over blocks."""
        out: dict[str, int] = {}
        for mod in self.w_out_modules:
            where = "offload" if _offload_slot(mod, "weight") is not None else str(module_device(mod))
            out[where] = out.get(where, 0) + 1
        return out

    def w_out_apply(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """``W k + b`` computed through the canonical view; ``k`` is ``[..., d_ff]``."""
        mod = self.w_out_modules[layer]
        out = k @ self.w_out_weight(layer).T
        bias = real_tensor(mod, "bias") if getattr(mod, "bias", None) is not None else None
        return out + bias.to(out.device) if bias is not None else out

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from last-block residuals ``[..., d_model]``: final norm, LM head, soft-capping."""
        return head_logits(self.model, self.final_norm(h), self.lm_head)

    @torch.no_grad()
    def probe(self) -> None:
        """Check on a 3-token input that W_out's recorded input reproduces its output."""
        from kedit.hooks import Trace

        ids = torch.tensor([[1, 2, 3]], device=self.input_device)
        with Trace(self) as tr:
            tr.capture_key(0)
            tr.capture_key_output(0)
            tr.stop_after(0)
            tr.run(input_ids=ids)
        k, out = tr.keys[0], tr.key_outputs[0]
        w = self.w_out_storage(0)
        ref = self.w_out_apply(0, k.to(device=w.device, dtype=w.dtype)).to(out.device)
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


def _is_override(mapping: Mapping, key: str) -> bool:
    """Whether the writable offload map holds an in-memory tensor under ``key`` (else it comes from disk)."""
    return key in mapping


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
    shapes = {name: linear_shape(m) for name, m in block.named_modules()}
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
        listing = ", ".join(f"{n} {linear_shape(m)}" for n, m in block.named_modules() if linear_shape(m))
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
