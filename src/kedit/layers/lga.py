"""Layer Gradient Analysis (METHODS §7): score every layer from gradients alone, no trial edits.

``S(l) = sum_i < grad_{W_l} NLL(true_i | q_i), grad_{W_l} NLL(new_i | q_i) >`` (Frobenius, signed,
unnormalised). W_out is linear, so for one sequence ``grad_{W_l} NLL = sum_t g_t k_t^T`` with ``k_t``
its input and ``g_t`` the gradient w.r.t. its output at position ``t``; hence
``<G, G'> = sum_{t,s} (g_t . g'_s)(k_t . k'_s)``: two small ``[T, T']`` Gram matrices per layer instead
of ``d x f`` gradient matrices. One forward and one backward pass give every layer; the true and new
sequences of all requests of a chunk ride in one right-padded batch (rows never interact, so the
gradient of the summed loss holds each row's own gradient).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kedit.arch import ArchitectureAdapter
from kedit.errors import BadRequest
from kedit.hooks import Trace
from kedit.layers.base import LayerChoice, best_window, candidate_layers, check_proxy, tukey_fences
from kedit.requests import EditRequest
from kedit.tokens import TeacherForced, encode_with_subject, pad_id, target_ids, teacher_forced


@dataclass
class GradProducts:
    """Per request ``i`` and candidate layer ``j``: ``<G_true, G_new>``, ``||G_true||^2``, ``||G_new||^2``."""

    layers: list[int]
    inner: torch.Tensor    # [n, L] float64
    sq_true: torch.Tensor  # [n, L] float64
    sq_new: torch.Tensor   # [n, L] float64

    def cosine(self) -> torch.Tensor:
        """Per-request cosine ``[n, L]`` (0 where a gradient vanishes)."""
        den = (self.sq_true * self.sq_new).sqrt()
        return torch.where(den > 0, self.inner / den.clamp_min(1e-300), torch.zeros_like(den))


def _batch(tok: Any, reqs: Sequence[EditRequest], device: torch.device) -> TeacherForced:
    """Rows ``0..n-1``: prompt + true target; rows ``n..2n-1``: prompt + new target (METHODS §8 NLL)."""
    prompts = [encode_with_subject(tok, r.prompt, r.subject).ids for r in reqs]
    targets = ([target_ids(tok, r.filled, r.target_true) for r in reqs]
               + [target_ids(tok, r.filled, r.target_new) for r in reqs])
    return teacher_forced(prompts + prompts, targets, pad_id(tok)).to(device)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmaxes (bf16/fp16 models), float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _seq_nll(adapter: ArchitectureAdapter, h: torch.Tensor, tf: TeacherForced) -> torch.Tensor:
    """Mean NLL of each sequence's target tokens, ``[B]``, from last-block residuals ``h [m, d]``."""
    logp = _upcast(adapter.unembed(h)).log_softmax(-1)               # [m, V]
    nll = -logp.gather(1, tf.labels[:, None])[:, 0]                  # [m]
    total = torch.zeros(tf.n, dtype=nll.dtype, device=nll.device).index_add(0, tf.seq, nll)
    count = torch.zeros(tf.n, dtype=nll.dtype, device=nll.device).index_add(0, tf.seq, torch.ones_like(nll))
    return total / count


def activation_gradients(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                         reqs: Sequence[EditRequest], layers: Sequence[int]
                         ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """W_out inputs ``k`` and output gradients ``g`` per layer for the 2n rows of ``_batch``.

    Returns ``(keys {l: [2n, T, f]}, grads {l: [2n, T, d]}, mask [2n, T])``, float64, zero outside
    the positions that can influence a target token. Parameters stay ``requires_grad=False``:
    only activations get gradients.
    """
    device = next(model.parameters()).device
    tf = _batch(tok, reqs, device)
    last = adapter.n_layers - 1
    outs: dict[int, torch.Tensor] = {}

    def root(layer: int):
        def fn(out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # shallowest hooked layer: nothing upstream needs a gradient,
                out = out.detach().requires_grad_()  # so a fresh leaf is exact and roots the graph
            outs[layer] = out
            return out
        return fn

    with torch.enable_grad(), Trace(adapter, detach=False) as tr:
        for l in layers:
            tr.capture_key(l)
            tr.patch_key_output(l, root(l))
        # logits only where targets are scored: the full [B, T, vocab] tensor is never built
        tr.capture_block(last, (tf.rows, tf.positions))
        tr.stop_after(last)
        tr.run(input_ids=tf.input_ids, attention_mask=tf.attention_mask)
        loss = _seq_nll(adapter, tr.blocks[last], tf).sum()
        grads = torch.autograd.grad(loss, [outs[l] for l in layers], allow_unused=True)
    keys = {l: tr.keys[l].detach() for l in layers}
    # positions after a row's last scored position cannot influence its loss (causal): g = 0 there;
    # masking also keeps padding out whatever the attention implementation does with it
    mask = torch.zeros_like(tf.attention_mask, dtype=torch.bool)
    mask[tf.rows, tf.positions] = True
    mask = mask.flip(1).cummax(1).values.flip(1) & tf.attention_mask.bool()   # [2n, T]
    m = mask[..., None]
    # OPT runs its MLP on flattened [B*T, width] tensors: view everything as [B, T, width]
    shape = lambda x: x.reshape(*mask.shape, -1).double()  # noqa: E731
    G = {l: torch.where(m, shape(g if g is not None else torch.zeros_like(outs[l])), 0.0)
         for l, g in zip(layers, grads, strict=True)}
    K = {l: torch.where(m, shape(keys[l]), 0.0) for l in layers}
    return K, G, mask


def weight_gradient(g: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``sum_t g_t k_t^T``: the canonical ``[d, f]`` gradient of W_out from ``g [T, d]``, ``k [T, f]``."""
    return g.T @ k


def gradient_products(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                      proxy: Sequence[EditRequest], layers: Sequence[int], batch_size: int = 16) -> GradProducts:
    """Factored gradient inner products and squared norms for every request and layer (no d x f matrix)."""
    layers = list(layers)
    rows: list[list[torch.Tensor]] = [[], [], []]
    was_training = model.training
    model.eval()  # dropout would make the gradients random
    try:
        for start in range(0, len(proxy), batch_size):
            chunk = proxy[start:start + batch_size]
            n = len(chunk)
            K, G, _ = activation_gradients(model, adapter, tok, chunk, layers)
            out = torch.zeros(3, n, len(layers), dtype=torch.float64)
            for j, l in enumerate(layers):
                Kt, Kn, Gt, Gn = K[l][:n], K[l][n:], G[l][:n], G[l][n:]   # [n, T, f] / [n, T, d]
                gram = lambda a, b: torch.einsum("btx,bsx->bts", a, b)   # noqa: E731  [n, T, T]
                out[0, :, j] = (gram(Gt, Gn) * gram(Kt, Kn)).sum((1, 2)).cpu()
                out[1, :, j] = (gram(Gt, Gt) * gram(Kt, Kt)).sum((1, 2)).cpu()
                out[2, :, j] = (gram(Gn, Gn) * gram(Kn, Kn)).sum((1, 2)).cpu()
            for i in range(3):
                rows[i].append(out[i])
    finally:
        model.train(was_training)
    return GradProducts(layers, *(torch.cat(r) for r in rows))


def naive_gradient_products(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                            proxy: Sequence[EditRequest], layers: Sequence[int]) -> GradProducts:
    """Reference: materialise each ``d x f`` weight gradient with autograd, one request and target at a time."""
    layers = list(layers)
    params = [adapter.w_out(l) for l in layers]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = params[0].device
    out = torch.zeros(3, len(proxy), len(layers), dtype=torch.float64)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        for i, r in enumerate(proxy):
            prompt = encode_with_subject(tok, r.prompt, r.subject).ids
            grads = []
            for target in (r.target_true, r.target_new):
                tf = teacher_forced([prompt], [target_ids(tok, r.filled, target)], pad_id(tok)).to(device)
                with torch.enable_grad():
                    logits = model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
                    logp = _upcast(logits[tf.rows, tf.positions]).log_softmax(-1)     # [m, V]
                    loss = -logp.gather(1, tf.labels[:, None]).mean()
                    grads.append([g.double() for g in torch.autograd.grad(loss, params)])
            for j, (a, b) in enumerate(zip(*grads, strict=True)):
                out[:, i, j] = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]).cpu()
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return GradProducts(layers, out[0], out[1], out[2])


@torch.no_grad()
def with_predicted_true(model: torch.nn.Module, tok: Any, proxy: Sequence[EditRequest]) -> list[EditRequest]:
    """Requests without target_true get the model's own answer: the first word of 3 greedy tokens.

    (zsRE in the ROME convention has no true target.) Raises BadRequest if no word comes out.
    """
    device = next(model.parameters()).device
    out = []
    for r in proxy:
        if r.target_true is None:
            ids = torch.tensor([encode_with_subject(tok, r.prompt, r.subject).ids], device=device)
            for _ in range(3):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
            words = tok.decode(ids[0, -3:]).split()
            if not words:
                raise BadRequest(f"LGA: no predicted answer for {r.filled!r} to stand in for target_true")
            r = dataclasses.replace(r, target_true=words[0])
        out.append(r)
    return out


@dataclass(frozen=True)
class LGA:
    """Layer Gradient Analysis: fenced argmax (or best window) of ``S(l)`` over the candidate layers."""

    name: ClassVar[str] = "lga"
    k: float = 1.0                          # Tukey fence multiplier (paper: 1)
    window: int = 1                         # consecutive layers edited (1 = ROME; e.g. 5 for MEMIT-style)
    layers: tuple[int, ...] | None = None   # candidate layers; None = every layer
    batch_size: int = 16                    # requests per forward/backward pass (2 rows each)
    naive: bool = False                     # materialise weight gradients (reference / timing only)
    predicted_true: bool = False            # no target_true: use the model's own answer instead of failing

    def __post_init__(self) -> None:
        if not self.k >= 0:
            raise ValueError(f"LGA.k (Tukey multiplier) must be >= 0, got {self.k}")
        if self.window < 1:
            raise ValueError(f"LGA.window must be >= 1, got {self.window}")
        if self.batch_size < 1:
            raise ValueError(f"LGA.batch_size must be >= 1, got {self.batch_size}")

    def select(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None, tok: Any,
               proxy: Sequence[EditRequest]) -> LayerChoice:
        """Score every candidate layer on ``proxy`` (needs target_true) and choose; raises BadRequest/ValueError."""
        t0 = time.perf_counter()
        adapter = adapter or ArchitectureAdapter.from_model(model)
        if self.predicted_true:
            proxy = with_predicted_true(model, tok, check_proxy(proxy, who="LGA"))
        proxy = check_proxy(proxy, need_true=True, who="LGA")
        cands = candidate_layers(adapter, self.layers, self.window)
        if self.naive:
            gp = naive_gradient_products(model, adapter, tok, proxy, cands)
        else:
            gp = gradient_products(model, adapter, tok, proxy, cands, self.batch_size)
        S = gp.inner.sum(0)                                  # [L]
        lo, hi, keep = tukey_fences(S, self.k)
        chosen, rule = best_window(cands, S.tolist(), self.window, keep, lo, hi)
        details = {
            "k": self.k, "window": self.window, "fences": [lo, hi], "kept": keep, "rule": rule,
            "n_proxy": len(proxy), "predicted_true": self.predicted_true,
            "implementation": "naive" if self.naive else "factored",
            # mean over requests: S(l) = n * mean(|G_true| |G_new| cos), so these say whether
            # alignment or magnitude decides a layer's score
            "cosine": gp.cosine().mean(0).tolist(),
            "norm_true": gp.sq_true.sqrt().mean(0).tolist(),
            "norm_new": gp.sq_new.sqrt().mean(0).tolist(),
            "per_request": gp.inner.tolist(),                # [n][L], for sample-wise comparisons
        }
        return LayerChoice("lga", chosen, cands, S.tolist(), time.perf_counter() - t0, details)
