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
from kedit.layers.base import (
    LayerChoice,
    best_window,
    bootstrap_stability,
    candidate_layers,
    check_proxy,
    tukey_fences,
)
from kedit.requests import EditRequest
from kedit.tokens import TeacherForced, encode_with_subject, pad_id, target_ids, teacher_forced

THETAS = ("w_out", "mlp", "block")           # which parameters theta_l are differentiated
SCORES = ("sum", "cosine", "normalised")     # how per-layer gradients become S(l)


@dataclass
class GradProducts:
    """Per request ``i`` and candidate layer ``j``: ``<G_true, G_new>``, ``||G_true||^2``, ``||G_new||^2``.

    ``tt``, ``tn``, ``nn`` (``[L, n, n]``, only when cross-request products were asked for) hold
    ``<G_true_i, G_true_j>``, ``<G_true_i, G_new_j>``, ``<G_new_i, G_new_j>``: with them the cosine of
    the *summed* gradients can be recomputed exactly for any reweighting of the requests (bootstrap).
    """

    layers: list[int]
    inner: torch.Tensor    # [n, L] float64
    sq_true: torch.Tensor  # [n, L] float64
    sq_new: torch.Tensor   # [n, L] float64
    tt: torch.Tensor | None = None   # [L, n, n] float64
    tn: torch.Tensor | None = None   # [L, n, n] float64
    nn: torch.Tensor | None = None   # [L, n, n] float64

    def cosine(self) -> torch.Tensor:
        """Per-request cosine ``[n, L]`` (0 where a gradient vanishes)."""
        den = (self.sq_true * self.sq_new).sqrt()
        return torch.where(den > 0, self.inner / den.clamp_min(1e-300), torch.zeros_like(den))

    def scores(self, score: str = "sum", weights: torch.Tensor | None = None) -> torch.Tensor:
        """``S(l)`` ``[L]`` for request weights ``weights [n]`` (default all 1; bootstrap: resample counts).

        sum: ``sum_i w_i <Gt_i, Gn_i>``; normalised: ``sum_i w_i cos(Gt_i, Gn_i)``;
        cosine: ``cos(sum_i w_i Gt_i, sum_i w_i Gn_i)`` (needs the cross-request products).
        """
        w = torch.ones(self.inner.shape[0], dtype=torch.float64) if weights is None else weights.double()
        if score == "sum":
            return w @ self.inner
        if score == "normalised":
            return w @ self.cosine()
        if score == "cosine":
            if self.tn is None or self.tt is None or self.nn is None:
                raise ValueError("the cosine score needs cross-request products (cross=True)")
            quad = lambda M: torch.einsum("i,lij,j->l", w, M, w)  # noqa: E731  [L]
            den = (quad(self.tt) * quad(self.nn)).clamp_min(0).sqrt()
            return torch.where(den > 0, quad(self.tn) / den.clamp_min(1e-300), torch.zeros_like(den))
        raise BadRequest(f"unknown LGA score {score!r}; choose one of {', '.join(SCORES)}")


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
                      proxy: Sequence[EditRequest], layers: Sequence[int], batch_size: int = 16,
                      cross: bool = False) -> GradProducts:
    """Factored W_out gradient inner products and squared norms for every request and layer (no d x f matrix).

    ``cross``: also the ``[L, n, n]`` cross-request products, from the token Gram matrices of all
    requests (the masked positions' ``g`` and ``k`` are kept on the CPU until the end).
    """
    layers = list(layers)
    rows: list[list[torch.Tensor]] = [[], [], []]
    # per layer, per side (true/new): packed g [N, d], k [N, f] and the request index of each token
    packed: dict[int, list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {l: [[], []] for l in layers}
    was_training = model.training
    model.eval()  # dropout would make the gradients random
    try:
        for start in range(0, len(proxy), batch_size):
            chunk = proxy[start:start + batch_size]
            n = len(chunk)
            K, G, mask = activation_gradients(model, adapter, tok, chunk, layers)
            out = torch.zeros(3, n, len(layers), dtype=torch.float64)
            for j, l in enumerate(layers):
                Kt, Kn, Gt, Gn = K[l][:n], K[l][n:], G[l][:n], G[l][n:]   # [n, T, f] / [n, T, d]
                gram = lambda a, b: torch.einsum("btx,bsx->bts", a, b)   # noqa: E731  [n, T, T]
                out[0, :, j] = (gram(Gt, Gn) * gram(Kt, Kn)).sum((1, 2)).cpu()
                out[1, :, j] = (gram(Gt, Gt) * gram(Kt, Kt)).sum((1, 2)).cpu()
                out[2, :, j] = (gram(Gn, Gn) * gram(Kn, Kn)).sum((1, 2)).cpu()
                if cross:
                    for side, sl in enumerate((slice(0, n), slice(n, 2 * n))):
                        r, t = mask[sl].nonzero(as_tuple=True)
                        packed[l][side].append((G[l][sl][r, t].cpu(), K[l][sl][r, t].cpu(), r.cpu() + start))
            for i in range(3):
                rows[i].append(out[i])
    finally:
        model.train(was_training)
    gp = GradProducts(layers, *(torch.cat(r) for r in rows))
    if cross:
        n = len(proxy)
        mats = torch.zeros(3, len(layers), n, n, dtype=torch.float64)

        def pair(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
            """``[n, n]``: ``<G_a, G_b> = sum_{t,s} (g_t . g'_s)(k_t . k'_s)`` summed per request pair."""
            (g, k, r), (g2, k2, r2) = a, b
            onehot = lambda x: torch.nn.functional.one_hot(x, n).double()  # noqa: E731  [N, n]
            return onehot(r).T @ ((g @ g2.T) * (k @ k2.T)) @ onehot(r2)

        for j, l in enumerate(layers):
            t, nw = (tuple(torch.cat(x) for x in zip(*packed[l][s], strict=True)) for s in (0, 1))
            mats[0, j], mats[1, j], mats[2, j] = pair(t, t), pair(t, nw), pair(nw, nw)
        gp.tt, gp.tn, gp.nn = mats[0], mats[1], mats[2]
    return gp


def theta_parameters(adapter: ArchitectureAdapter, layer: int, theta: str) -> list[torch.nn.Parameter]:
    """The parameters theta_l that LGA differentiates: W_out, every weight of the MLP, or the whole block."""
    if theta == "w_out":
        return [adapter.w_out(layer)]
    block = adapter.blocks[adapter.check_layer(layer)]
    if theta == "block":
        return [p for p in block.parameters()]
    if theta != "mlp":
        raise BadRequest(f"unknown LGA theta {theta!r}; choose one of {', '.join(THETAS)}")
    w_mod = adapter.w_out_modules[layer]
    parent = adapter.model.get_submodule(adapter.w_out_names[layer].rsplit(".", 1)[0])
    if parent is not block:  # a dedicated MLP module (GPT-2 .mlp, Llama .mlp, ...): all of it
        return [p for p in parent.parameters()]
    # MLP linears sit directly in the block (OPT fc1/fc2): the linears into and out of the d_ff width
    mods = [m for m in block.modules() if isinstance(m, torch.nn.Linear) and adapter.d_ff in m.weight.shape]
    return [p for m in dict.fromkeys([*mods, w_mod]) for p in m.parameters()]


def autograd_products(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                      proxy: Sequence[EditRequest], layers: Sequence[int], theta: str = "w_out",
                      cross: bool = False, max_bytes: int = 2 << 30) -> tuple[GradProducts, dict[str, Any]]:
    """Per-request autograd for any theta (no factorisation): one forward (true + new rows) and two
    backward passes per request. Returns the products and the cost ``{"forward", "backward", "groups"}``.

    ``cross`` keeps every request's flattened gradient per layer until the end; when that would exceed
    ``max_bytes`` the layers are processed in groups, re-running the passes per group.
    """
    layers = list(layers)
    n = len(proxy)
    params = {l: theta_parameters(adapter, l, theta) for l in layers}
    itemsize = 8  # gradients are accumulated in float64
    per_layer = {l: 2 * n * sum(p.numel() for p in params[l]) * itemsize for l in layers}
    groups: list[list[int]] = [[]]
    for l in layers:  # greedy grouping so the kept gradients stay under max_bytes (at least one layer each)
        if cross and groups[-1] and sum(per_layer[x] for x in groups[-1]) + per_layer[l] > max_bytes:
            groups.append([])
        groups[-1].append(l)
    out = torch.zeros(3, n, len(layers), dtype=torch.float64)
    mats = torch.zeros(3, len(layers), n, n, dtype=torch.float64) if cross else None
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    cost = {"forward": 0, "backward": 0, "groups": len(groups)}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for group in groups:
            plist = [p for l in group for p in params[l]]
            sizes = [sum(p.numel() for p in params[l]) for l in group]
            for p in plist:
                p.requires_grad_(True)
            kept: dict[int, list[list[torch.Tensor]]] = {l: [[], []] for l in group}
            for i, r in enumerate(proxy):
                tf = _batch(tok, [r], device)
                with torch.enable_grad():
                    logits = model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
                    logp = _upcast(logits[tf.rows, tf.positions]).log_softmax(-1)     # [m, V]
                    nll = -logp.gather(1, tf.labels[:, None])[:, 0]                    # [m]
                    seq_loss = [nll[tf.seq == s].mean() for s in (0, 1)]               # true, new
                    cost["forward"] += 1
                    flat = []
                    for s, loss in enumerate(seq_loss):
                        grads = torch.autograd.grad(loss, plist, retain_graph=s == 0, allow_unused=True)
                        cost["backward"] += 1
                        vec = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                         for g, p in zip(grads, plist, strict=True)]).cpu()
                        flat.append(vec.split(sizes))
                for l, gt, gn in zip(group, flat[0], flat[1], strict=True):
                    j = layers.index(l)
                    out[:, i, j] = torch.stack([gt @ gn, gt @ gt, gn @ gn])
                    if cross:
                        kept[l][0].append(gt)
                        kept[l][1].append(gn)
            if mats is not None:
                for l in group:
                    j = layers.index(l)
                    T, N = torch.stack(kept[l][0]), torch.stack(kept[l][1])           # [n, P]
                    mats[0, j], mats[1, j], mats[2, j] = T @ T.T, T @ N.T, N @ N.T
                    del kept[l]
            for p in plist:
                p.requires_grad_(False)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    gp = GradProducts(layers, out[0], out[1], out[2])
    if mats is not None:
        gp.tt, gp.tn, gp.nn = mats[0], mats[1], mats[2]
    return gp, cost


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
    """Layer Gradient Analysis: fenced argmax (or best window) of ``S(l)`` over the candidate layers.

    Variants (METHODS §7 is a reconstruction, so none is privileged beyond being the default):
    ``theta`` in THETAS picks the differentiated parameters, ``score`` in SCORES the aggregation.
    Window scores are sums of layer scores. Every choice carries its bootstrap stability.
    """

    name: ClassVar[str] = "lga"
    k: float = 1.0                          # Tukey fence multiplier (paper: 1)
    window: int = 1                         # consecutive layers edited (1 = ROME; e.g. 5 for MEMIT-style)
    layers: tuple[int, ...] | None = None   # candidate layers; None = every layer
    batch_size: int = 16                    # requests per forward/backward pass (2 rows each)
    naive: bool = False                     # materialise weight gradients (reference / timing only)
    predicted_true: bool = False            # no target_true: use the model's own answer instead of failing
    theta: str = "w_out"                    # w_out (factored, exact) | mlp | block (per-request autograd)
    score: str = "sum"                      # sum (signed, the reconstruction) | cosine | normalised
    bootstrap: int = 200                    # resamples of the proxy set for the stability report (0 = off)
    seed: int = 0                           # bootstrap seed
    max_gradient_bytes: int = 2 << 30       # memory cap for kept per-request gradients (cosine, autograd)

    def __post_init__(self) -> None:
        if not self.k >= 0:
            raise BadRequest(f"LGA.k (Tukey multiplier) must be >= 0, got {self.k}")
        if self.window < 1:
            raise BadRequest(f"LGA.window must be >= 1, got {self.window}")
        if self.batch_size < 1:
            raise BadRequest(f"LGA.batch_size must be >= 1, got {self.batch_size}")
        if self.theta not in THETAS:
            raise BadRequest(f"unknown LGA theta {self.theta!r}; choose one of {', '.join(THETAS)}")
        if self.score not in SCORES:
            raise BadRequest(f"unknown LGA score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.bootstrap < 0:
            raise BadRequest(f"LGA.bootstrap must be >= 0, got {self.bootstrap}")

    @property
    def variant(self) -> str:
        """``"w_out/sum"`` etc."""
        return f"{self.theta}/{self.score}"

    @property
    def label(self) -> str:
        """Strategy label: ``lga`` for the default reading, else ``lga-<theta>-<score>``."""
        return "lga" if (self.theta, self.score) == ("w_out", "sum") else f"lga-{self.theta}-{self.score}"

    def products(self, model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                 proxy: Sequence[EditRequest], cands: Sequence[int]) -> tuple[GradProducts, dict[str, Any]]:
        """The gradient products this variant needs and their cost (passes, implementation)."""
        cross = self.score == "cosine"
        if self.theta == "w_out" and not self.naive:
            n_chunks = -(-len(proxy) // self.batch_size)
            gp = gradient_products(model, adapter, tok, proxy, cands, self.batch_size, cross=cross)
            return gp, {"implementation": "factored", "forward": n_chunks, "backward": n_chunks, "groups": 1}
        gp, cost = autograd_products(model, adapter, tok, proxy, cands, self.theta, cross, self.max_gradient_bytes)
        return gp, {"implementation": "autograd per request", **cost}

    def decide(self, gp: GradProducts, cands: list[int], weights: torch.Tensor | None = None
               ) -> tuple[list[int], str, torch.Tensor, tuple[float, float, list[bool]]]:
        """Scores, fences and the chosen window for request ``weights`` (None = every request once)."""
        S = gp.scores(self.score, weights)                   # [L]
        lo, hi, keep = tukey_fences(S, self.k)
        chosen, rule = best_window(cands, S.tolist(), self.window, keep, lo, hi)
        return chosen, rule, S, (lo, hi, keep)

    def select(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None, tok: Any,
               proxy: Sequence[EditRequest]) -> LayerChoice:
        """Score every candidate layer on ``proxy`` (needs target_true) and choose; raises BadRequest."""
        t0 = time.perf_counter()
        adapter = adapter or ArchitectureAdapter.from_model(model)
        if self.predicted_true:
            proxy = with_predicted_true(model, tok, check_proxy(proxy, who="LGA"))
        proxy = check_proxy(proxy, need_true=True, who="LGA")
        cands = candidate_layers(adapter, self.layers, self.window)
        gp, cost = self.products(model, adapter, tok, proxy, cands)
        chosen, rule, S, (lo, hi, keep) = self.decide(gp, cands)
        t_scores = time.perf_counter() - t0
        stability = bootstrap_stability(lambda w: self.decide(gp, cands, w)[0][0], len(proxy), chosen[0],
                                        self.bootstrap, self.seed)
        details = {
            "variant": self.variant, "theta": self.theta, "score": self.score,
            "k": self.k, "window": self.window, "window_score": "sum of layer scores", "fences": [lo, hi],
            "kept": keep, "rule": rule, "n_proxy": len(proxy), "predicted_true": self.predicted_true,
            "implementation": cost.pop("implementation"), "cost": {**cost, "seconds": t_scores},
            "stability": stability,
            # mean over requests: S(l) = n * mean(|G_true| |G_new| cos), so these say whether
            # alignment or magnitude decides a layer's score
            "cosine": gp.cosine().mean(0).tolist(),
            "norm_true": gp.sq_true.sqrt().mean(0).tolist(),
            "norm_new": gp.sq_new.sqrt().mean(0).tolist(),
            "per_request": gp.inner.tolist(),                # [n][L], for sample-wise comparisons
        }
        return LayerChoice(self.label, chosen, cands, S.tolist(), time.perf_counter() - t0, details)
