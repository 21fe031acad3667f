"""Layer Gradient Analysis (METHODS §7): score every layer from gradients alone, no trial edits.

``S(l) = sum_i < grad_{W_l} NLL(true_i | q_i), grad_{W_l} NLL(new_i | q_i) >`` (Frobenius, signed,
unnormalised). W_out is linear, so for one sequence ``grad_{W_l} NLL = sum_t g_t k_t^T`` with ``k_t``
its input and ``g_t`` the gradient w.r.t. its output at position ``t``; hence
``<G, G'> = sum_{t,s} (g_t . g'_s)(k_t . k'_s)``: two small ``[T, T']`` Gram matrices per layer instead
of ``d x f`` gradient matrices. One forward and one backward pass give every layer; the true and new
sequences of all requests of a chunk ride in one right-padded batch (rows never interact, so the
gradient of the summed loss holds each row's own gradient).

The other thetas (the whole MLP, the whole block) are sums over *sites*: every linear map factors the same
way (its bias as a column of ones), and the few small parameters (norm weights) get each row's gradient by
re-running their module alone on that row's captured input. Only where that does not apply (a large
non-linear parameter, a module called twice) do the products come from per-request autograd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kedit.arch import ArchitectureAdapter, linear_shape
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


@dataclass(frozen=True)
class Site:
    """A module owning parameters of theta_l, and how its per-row gradients are taken (one batched pass).

    ``linear`` (``nn.Linear``, GPT-2's ``Conv1D``): ``grad W = sum_t g_t x_t^T`` and ``grad b = sum_t g_t``
    with ``x_t`` its input and ``g_t`` the gradient w.r.t. its output, kept as the factors ``g [T, out]`` and
    ``x [T, in]`` (a column of ones appended when the bias is in theta, so one product covers both).
    ``small`` (norms and other modules with few parameters): the module alone is re-run on each row's captured
    input and differentiated, ``[p]`` per row (exact for modules that treat batch rows independently).
    """

    layer: int
    module: torch.nn.Module
    kind: str                                 # "linear" | "small"
    params: tuple[torch.nn.Parameter, ...]    # its parameters that are in theta_l
    weight: bool = True                       # linear: the weight is in theta_l
    bias: bool = False                        # linear: the bias is in theta_l


SMALL_SITE_PARAMS = 1 << 20   # a non-linear module with more parameters (in theta) makes theta unfactorable


def theta_sites(adapter: ArchitectureAdapter, layer: int, theta: str) -> list[Site] | None:
    """The sites that together own theta_l exactly once, or None when no factored computation applies
    (a large non-linear parameter, a parameter shared between modules)."""
    params = theta_parameters(adapter, layer, theta)
    wanted = {id(p) for p in params}
    owner: dict[int, torch.nn.Module] = {}
    for mod in adapter.blocks[adapter.check_layer(layer)].modules():
        for p in mod.parameters(recurse=False):
            if id(p) in wanted:
                if id(p) in owner and owner[id(p)] is not mod:
                    return None
                owner[id(p)] = mod
    if set(owner) != wanted:
        return None
    sites = []
    for mod in dict.fromkeys(owner.values()):
        own = tuple(p for p in params if owner[id(p)] is mod)
        if linear_shape(mod) is not None:
            ids = {id(p) for p in own}
            bias = getattr(mod, "bias", None)
            sites.append(Site(layer, mod, "linear", own, weight=id(mod.weight) in ids,
                              bias=bias is not None and id(bias) in ids))
        elif sum(p.numel() for p in own) <= SMALL_SITE_PARAMS:
            sites.append(Site(layer, mod, "small", own))
        else:
            return None
    return sites


class Unfactorable(Exception):
    """A site was not called exactly once with one tensor in the pass: per-request autograd must do it."""


@contextlib.contextmanager
def _requiring_grad(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def site_gradients(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any, reqs: Sequence[EditRequest],
                   sites: Sequence[Site]) -> tuple[list[Any], torch.Tensor]:
    """Per-row gradient factors of every site for the 2n rows of ``_batch`` (one forward, one backward pass).

    Returns ``(parts, mask [2n, T])``: per site, ``(g [2n, T, out], x [2n, T, in'])`` (linear) or
    ``[2n, p]`` (small), zero outside the positions that can influence a target token, in at least float32.
    Parameters keep their ``requires_grad``: only activations get gradients. Raises Unfactorable.
    """
    device = next(model.parameters()).device
    tf = _batch(tok, reqs, device)
    last = adapter.n_layers - 1
    with torch.enable_grad(), Trace(adapter, detach=False) as tr:
        for i, site in enumerate(sites):
            tr.capture_io(i, site.module)
        # logits only where targets are scored: the full [B, T, vocab] tensor is never built
        tr.capture_block(last, (tf.rows, tf.positions))
        tr.stop_after(last)
        tr.run(input_ids=tf.input_ids, attention_mask=tf.attention_mask)
        for i, site in enumerate(sites):
            if tr.calls.get(i, (0, 0))[0] != 1 or tr.outputs.get(i) is None or tr.inputs.get(i) is None or (
                    site.kind == "small" and tr.calls[i][1]):
                raise Unfactorable(f"{type(site.module).__name__} of layer {site.layer}")
        loss = _seq_nll(adapter, tr.blocks[last], tf).sum()
        grads = torch.autograd.grad(loss, [tr.outputs[i] for i in range(len(sites))], allow_unused=True)
    # positions after a row's last scored position cannot influence its loss (causal): g = 0 there;
    # masking also keeps padding out whatever the attention implementation does with it
    mask = torch.zeros_like(tf.attention_mask, dtype=torch.bool)
    mask[tf.rows, tf.positions] = True
    mask = mask.flip(1).cummax(1).values.flip(1) & tf.attention_mask.bool()   # [2n, T]
    m = mask[..., None]
    # OPT runs its MLP on flattened [B*T, width] tensors: view everything as [B, T, width]
    shape = lambda x: _upcast(x.reshape(*mask.shape, -1))  # noqa: E731
    parts: list[Any] = []
    for i, site in enumerate(sites):
        out, inp = tr.outputs[i], tr.inputs[i]
        g = torch.where(m, shape(grads[i] if grads[i] is not None else torch.zeros_like(out)), 0.0)  # [2n, T, out]
        if site.kind == "linear":
            x = shape(inp)                                                                           # [2n, T, in]
            cols = ([x] if site.weight else []) + ([torch.ones_like(x[..., :1])] if site.bias else [])
            parts.append((g, torch.where(m, torch.cat(cols, -1), 0.0)))
            continue
        rows = []
        with torch.enable_grad(), _requiring_grad(site.params):
            for b in range(g.shape[0]):   # the module alone, one row at a time: that row's own gradient
                y = site.module(inp.reshape(*mask.shape, -1)[b:b + 1])
                gb = torch.autograd.grad(y, site.params, g[b:b + 1].reshape(y.shape).to(y.dtype), allow_unused=True)
                rows.append(torch.cat([_upcast(d if d is not None else torch.zeros_like(p)).reshape(-1)
                                       for d, p in zip(gb, site.params, strict=True)]))
        parts.append(torch.stack(rows))                                                              # [2n, p]
    return parts, mask


def weight_gradient(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_t g_t x_t^T``: the canonical ``[out, in]`` gradient of a linear map from ``g [T, out]``, ``x [T, in]``."""
    return g.T @ x


def gradient_products(model: torch.nn.Module, adapter: ArchitectureAdapter, tok: Any,
                      proxy: Sequence[EditRequest], layers: Sequence[int], batch_size: int = 16,
                      cross: bool = False, theta: str = "w_out") -> GradProducts:
    """Factored gradient inner products and squared norms of theta_l for every request and layer.

    No parameter gradient is materialised for linear maps: ``<G, G'> = sum_{t,s} (g_t . g'_s)(x_t . x'_s)``,
    two small ``[T, T']`` Gram matrices per site (summed over the sites of a layer). ``cross``: also the
    ``[L, n, n]`` cross-request products, from the token Gram matrices of all requests (the masked positions'
    factors are kept on the CPU until the end, about ``tokens x sum(in + out)`` numbers per layer).
    Raises Unfactorable (see ``theta_sites`` / ``site_gradients``): per-request autograd must do it.
    """
    layers = list(layers)
    sites = {l: theta_sites(adapter, l, theta) for l in layers}
    if any(v is None for v in sites.values()):
        raise Unfactorable(f"theta {theta!r} has parameters without a factored gradient")
    flat = [s for l in layers for s in sites[l]]
    rows: list[list[torch.Tensor]] = [[], [], []]
    # per site, per side (true/new): packed factors, and the request index of each token / row
    packed: list[list[list[tuple[torch.Tensor, ...]]]] = [[[], []] for _ in flat]
    gram = lambda a, b: torch.einsum("btx,bsx->bts", a.double(), b.double())   # noqa: E731  [n, T, T]
    was_training = model.training
    model.eval()  # dropout would make the gradients random
    try:
        for start in range(0, len(proxy), batch_size):
            chunk = proxy[start:start + batch_size]
            n = len(chunk)
            parts, mask = site_gradients(model, adapter, tok, chunk, flat)
            out = torch.zeros(3, n, len(layers), dtype=torch.float64)
            for k, (site, part) in enumerate(zip(flat, parts, strict=True)):
                j = layers.index(site.layer)
                if site.kind == "linear":
                    (Gt, Gn), (Xt, Xn) = (part[0][:n], part[0][n:]), (part[1][:n], part[1][n:])
                    out[0, :, j] += (gram(Gt, Gn) * gram(Xt, Xn)).sum((1, 2)).cpu()
                    out[1, :, j] += (gram(Gt, Gt) * gram(Xt, Xt)).sum((1, 2)).cpu()
                    out[2, :, j] += (gram(Gn, Gn) * gram(Xn, Xn)).sum((1, 2)).cpu()
                else:
                    vt, vn = part[:n].double(), part[n:].double()
                    out[:, :, j] += torch.stack([(vt * vn).sum(-1), (vt * vt).sum(-1), (vn * vn).sum(-1)]).cpu()
                if cross:
                    for side, sl in enumerate((slice(0, n), slice(n, 2 * n))):
                        if site.kind == "linear":
                            r, t = mask[sl].nonzero(as_tuple=True)
                            packed[k][side].append((part[0][sl][r, t].cpu(), part[1][sl][r, t].cpu(), r.cpu() + start))
                        else:
                            packed[k][side].append((part[sl].cpu(),))
            for i in range(3):
                rows[i].append(out[i])
    finally:
        model.train(was_training)
    gp = GradProducts(layers, *(torch.cat(r) for r in rows))
    if cross:
        n = len(proxy)
        mats = torch.zeros(3, len(layers), n, n, dtype=torch.float64)
        onehot = lambda x: torch.nn.functional.one_hot(x, n).double()  # noqa: E731  [N, n]

        def pair(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
            """``[n, n]`` products of the two sides' gradients, per request pair."""
            if len(a) == 1:   # small site: the per-row gradients themselves
                return a[0].double() @ b[0].double().T
            (g, x, r), (g2, x2, r2) = a, b   # linear: sum_{t,s} (g_t . g'_s)(x_t . x'_s) per request pair
            return onehot(r).T @ ((g.double() @ g2.double().T) * (x.double() @ x2.double().T)) @ onehot(r2)

        for k, site in enumerate(flat):
            j = layers.index(site.layer)
            t, nw = (tuple(torch.cat(x) for x in zip(*packed[k][s], strict=True)) for s in (0, 1))
            mats[0, j] += pair(t, t)
            mats[1, j] += pair(t, nw)
            mats[2, j] += pair(nw, nw)
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
    naive: bool = False                     # per-request autograd, weight gradients materialised (reference)
    predicted_true: bool = False            # no target_true: use the model's own answer instead of failing
    theta: str = "w_out"                    # w_out | mlp | block (factored, exact; else per-request autograd)
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
        if not self.naive:
            try:
                gp = gradient_products(model, adapter, tok, proxy, cands, self.batch_size, cross=cross,
                                       theta=self.theta)
                n_chunks = -(-len(proxy) // self.batch_size)
                return gp, {"implementation": "factored", "forward": n_chunks, "backward": n_chunks, "groups": 1}
            except Unfactorable:
                pass
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
