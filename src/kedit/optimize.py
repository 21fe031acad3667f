"""Batched anchor optimisation (METHODS §4): one ``delta`` per request, all requests at once.

For request i and anchor layer a, ``delta_i`` is added to ``h_a`` at the decisive token of every
context template (and of the KL prompt ``"{subject} is a"``). Loss per request:
``mean_templates NLL(target | template) + kl_factor KL(p_delta || p_0) + wd ||delta|| / ||h_a||^2``.
Requests are independent, so the summed loss gives each ``delta_i`` exactly its own gradient; Adam
is run per row (the same update as ``torch.optim.Adam``), requests that reach the early-stop NLL are
frozen, and once 40% of them are done the batch (with the captured block arguments) shrinks.

Speed: the layers up to ``a`` do not depend on delta, and neither do the tokens before the decisive
token (causal attention). Rows are left-aligned on the decisive token, the layers up to ``a`` run
once (no grad), and each step replays only the blocks above ``a`` on the suffix columns, reusing
the prefix keys/values from a cache and the block arguments captured from a real pass; the LM head
is applied only at target positions. The replay is checked against the real forward before the
first step, and kedit falls back to full forward passes where it does not match (e.g. sliding-window
caches).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kedit.arch import ArchitectureAdapter
from kedit.generation import cache_kwargs
from kedit.hooks import Trace, block_output, record_block_calls
from kedit.tokens import TeacherForced


@dataclass(frozen=True)
class AnchorConfig:
    lr: float = 0.5                  # Adam step size (0.1 for Llama-3-8B-size models, METHODS §4)
    steps: int = 25                  # MEMIT: 20-25
    kl_factor: float = 0.0625        # keeps the subject's "is a" distribution (essence drift)
    weight_decay: float = 0.5        # on ||delta|| / ||h_a||^2
    clamp_norm_factor: float = 0.75  # ||delta|| <= factor * ||h_a|| (MEMIT 0.75, ROME 4)
    early_stop_nll: float = 0.05     # a request stops once its mean NLL is below this
    batch_size: int = 32             # requests optimised together (memory bound)
    autocast_bf16: bool = False      # bf16 autocast: for GPUs; 3.3x *slower* on this CPU (measured), different anchors

    def __post_init__(self) -> None:
        for name in ("lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AnchorConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("AnchorConfig.steps and batch_size must be >= 1")


@dataclass
class AnchorProblem:
    """Token-level description of n requests, built once by the editor (kedit.editor)."""

    rewrite: TeacherForced        # n*T sequences: template_t(prompt) + target[:-1]
    rewrite_decisive: torch.Tensor  # [n*T] decisive position per rewrite sequence
    rewrite_request: torch.Tensor   # [n*T] request index per rewrite sequence
    kl_ids: torch.Tensor          # [n, Tk] "{subject} is a" (right padded)
    kl_mask: torch.Tensor         # [n, Tk]
    kl_decisive: torch.Tensor     # [n]
    kl_last: torch.Tensor         # [n] last real position of each KL prompt
    bare_rows: torch.Tensor       # [n] row of the bare-prompt ("{}") sequence of each request
    n: int


@dataclass
class Anchors:
    """Result of optimisation at ``layer``: ``z = h + delta`` at the bare prompt's decisive token."""

    layer: int
    z: torch.Tensor        # [n, d]
    h: torch.Tensor        # [n, d] original h_layer at the decisive token of the bare prompt
    delta: torch.Tensor    # [n, d]
    nll_start: torch.Tensor  # [n] mean target NLL before optimisation
    nll_end: torch.Tensor    # [n] at the last evaluated step
    steps: torch.Tensor      # [n] optimiser steps taken
    seconds: float = 0.0
    flops: float = 0.0       # estimated matmul FLOPs spent (2 * params * tokens per matmul pass)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Layout:
    """Rewrite and KL rows left-aligned on the decisive token: it sits at column ``P`` in every row.

    Columns before ``P`` never see delta (causal attention), so above the anchor layer only the
    suffix columns ``P..W`` are recomputed; the prefix keys/values stay cached.
    """

    ids: torch.Tensor        # [B, W] left-padded so that every decisive token is at column P
    mask: torch.Tensor       # [B, W]
    pos: torch.Tensor        # [B, W] position ids (left padding makes them row-specific)
    P: int
    row_req: torch.Tensor    # [B] request of each row
    row_kl: torch.Tensor     # [B] whether the row is a KL prompt
    row_last: torch.Tensor   # [B] suffix column read for the KL distribution (end of the KL prompt)
    tok_row: torch.Tensor    # [m] row of each scored target token
    tok_col: torch.Tensor    # [m] suffix column whose logits predict it
    labels: torch.Tensor     # [m]
    tok_weight: torch.Tensor  # [m] 1 / (tokens of its sequence * templates of its request)


def anchor_layout(p: AnchorProblem, pad: int) -> _Layout:
    tf = p.rewrite
    seqs = [tf.input_ids[r, : int(tf.attention_mask[r].sum())].tolist() for r in range(tf.n)]
    seqs += [p.kl_ids[i, : int(p.kl_mask[i].sum())].tolist() for i in range(p.n)]
    dec = torch.cat([p.rewrite_decisive, p.kl_decisive]).tolist()
    P = max(dec)
    W = P + max(len(s) - d for s, d in zip(seqs, dec))
    B = len(seqs)
    ids = torch.full((B, W), pad, dtype=torch.long)
    mask = torch.zeros((B, W), dtype=torch.long)
    shift = torch.tensor([P - d for d in dec])
    for i, s in enumerate(seqs):
        ids[i, shift[i]: shift[i] + len(s)] = torch.tensor(s)
        mask[i, shift[i]: shift[i] + len(s)] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    n_rw = tf.n
    tok_per_seq = torch.bincount(tf.rows, minlength=n_rw).float()
    seq_per_req = torch.bincount(p.rewrite_request, minlength=p.n).float()
    row_req = torch.cat([p.rewrite_request, torch.arange(p.n)])
    return _Layout(
        ids=ids, mask=mask, pos=pos, P=P, row_req=row_req, row_kl=torch.arange(B) >= n_rw,
        row_last=torch.cat([p.rewrite_decisive, p.kl_last]) - torch.tensor(dec),
        tok_row=tf.rows, tok_col=tf.positions + shift[tf.rows] - P, labels=tf.labels,
        tok_weight=1.0 / (tok_per_seq[tf.rows] * seq_per_req[row_req[tf.rows]]),
    )


class _SuffixReplay:
    """Blocks ``layer+1 ..`` on the suffix columns, with the constant prefix keys/values cached.

    Two no-grad passes set it up: the full batch (reference logits, h_layer, the prefix cache) and the
    suffix alone on that cache, recording every upper block's arguments. Each call resets the cache to
    the prefix and replays the upper blocks on a given suffix residual.
    """

    def __init__(self, adapter: ArchitectureAdapter, layer: int, lay: _Layout):
        self.adapter, self.layer = adapter, layer
        with torch.no_grad(), Trace(adapter) as tr:
            tr.capture_block(layer)
            out = tr.run(input_ids=lay.ids, attention_mask=lay.mask, position_ids=lay.pos, use_cache=True)
        self.ref_logits = out.logits[:, lay.P:]  # [B, W-P, V]
        self.h = tr.blocks[layer][:, lay.P:]  # [B, W-P, d]
        self.cache = out.past_key_values
        self.prefix = [(c.keys[:, :, : lay.P], c.values[:, :, : lay.P]) for c in self.cache.layers]
        self._reset()
        with record_block_calls(adapter.blocks[layer + 1:]) as self.calls, torch.no_grad(), Trace(adapter) as tr:
            tr.stop_after(adapter.n_layers - 1)
            tr.run(input_ids=lay.ids[:, lay.P:], attention_mask=lay.mask, position_ids=lay.pos[:, lay.P:],
                   use_cache=True, **cache_kwargs(adapter.model, self.cache))  # no deprecated keyword

    def _reset(self) -> None:
        for c, (k, v) in zip(self.cache.layers, self.prefix):
            c.keys, c.values = k, v

    def subset(self, keep: torch.Tensor) -> None:
        """Keep batch rows ``keep`` (converged requests leave the batch)."""
        batch = self.h.shape[0]
        self.h = self.h[keep.to(self.h.device)]
        self.prefix = [(k[keep.to(k.device)], v[keep.to(v.device)]) for k, v in self.prefix]
        self.calls = [_subset_rows(c, keep, batch) for c in self.calls]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self._reset()
        for block, (args, kwargs) in zip(self.adapter.blocks[self.layer + 1:], self.calls, strict=True):
            h = block_output(block(h, *args, **kwargs))
        self._reset()  # drop the suffix keys/values (and the graph they hold) from the cache
        return h


def _at(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[rows, cols]`` with the indices moved to ``x``'s device (blocks may sit on several devices)."""
    return x[rows.to(x.device), cols.to(x.device)]


def _adam(delta, grad, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """In-place Adam on rows (same arithmetic as torch.optim.Adam); ``step`` is [rows]."""
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1 = (1 - b1 ** step)[:, None]
    bc2 = (1 - b2 ** step)[:, None]
    delta.sub_(lr * m / bc1 / ((v.sqrt() / bc2.sqrt()) + eps))


def optimize_anchors(model, adapter: ArchitectureAdapter, chunks: list[AnchorProblem], layer: int,
                     cfg: AnchorConfig, pad: int, progress=None,
                     on_step: Callable[[int, int, int], None] | None = None) -> Anchors:
    """Optimise one delta per request at ``layer``; ``chunks`` are consecutive groups of requests.

    ``on_step(chunk_index, step, converged)``: called after every optimisation step (progress display).
    """
    start = time.perf_counter()
    parts = []
    for c, chunk in enumerate(chunks):
        step_cb = None if on_step is None else (lambda it, done, c=c: on_step(c, it, done))
        parts.append(_optimize_chunk(model, adapter, chunk, layer, cfg, pad, step_cb))
        if progress is not None:
            progress.update(chunk.n)
    # anchors are small ([n, d]) and meet CPU-side residuals in the targets: returned on CPU, fp32
    cat = lambda name: torch.cat([getattr(p, name).cpu() for p in parts])  # noqa: E731
    return Anchors(layer, cat("z"), cat("h"), cat("delta"), cat("nll_start"), cat("nll_end"), cat("steps"),
                   time.perf_counter() - start, sum(p.flops for p in parts),
                   {"replay": all(p.extra["replay"] for p in parts)})


def _subset_rows(obj: Any, keep: torch.Tensor, batch: int) -> Any:
    """Select batch rows ``keep`` in every tensor of a captured block call whose dim 0 is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj[keep.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_subset_rows(x, keep, batch) for x in obj)
    if isinstance(obj, list):
        return [_subset_rows(x, keep, batch) for x in obj]
    if isinstance(obj, dict):
        return {k: _subset_rows(v, keep, batch) for k, v in obj.items()}
    return obj


def _optimize_chunk(model, adapter: ArchitectureAdapter, p: AnchorProblem, layer: int, cfg: AnchorConfig,
                    pad: int, on_step: Callable[[int, int], None] | None = None) -> Anchors:
    device = adapter.input_device  # token ids go to the embedding; bookkeeping follows h_layer (below)
    n, d = p.n, adapter.d_model
    lay = anchor_layout(p, pad)
    ids, mask, pos, P = lay.ids.to(device), lay.mask.to(device), lay.pos.to(device), lay.P
    row_req, row_kl, row_last = lay.row_req.to(device), lay.row_kl.to(device), lay.row_last.to(device)
    tok_row, tok_col, labels = lay.tok_row.to(device), lay.tok_col.to(device), lay.labels.to(device)
    tok_weight = lay.tok_weight.to(device)

    replay = None
    try:
        replay = _SuffixReplay(adapter, layer, _Layout(**{**lay.__dict__, "ids": ids, "mask": mask, "pos": pos}))
        with torch.no_grad():  # the replay must reproduce the real forward, else use full passes
            ref = _at(replay.ref_logits, tok_row, tok_col).float()
            got = adapter.unembed(_at(replay(replay.h), tok_row, tok_col)).float().to(ref.device)
            tol = max(1e-3, 8 * torch.finfo(replay.h.dtype).eps)  # bf16/fp16: a few roundings differ
            ok = bool(torch.allclose(got, ref, rtol=tol, atol=tol * (1 + ref.abs().max().item())))
        h_suffix = replay.h
        replay.ref_logits = None
    except (AttributeError, TypeError, ValueError, RuntimeError):  # no reusable per-layer key/value cache
        ok = False
    if not ok:
        replay = None
        with torch.no_grad(), Trace(adapter) as tr:
            tr.capture_block(layer)
            tr.stop_after(layer)
            tr.run(input_ids=ids, attention_mask=mask, position_ids=pos)
        h_suffix = tr.blocks[layer][:, P:]
    # delta, its optimiser state and the per-request loss live on h_layer's device, in fp32 whatever
    # the model's dtype (the loss is computed from fp32 logits); delta is cast to h's dtype when added
    device = h_suffix.device
    row_req, row_kl, row_last = row_req.to(device), row_kl.to(device), row_last.to(device)
    tok_row, tok_col, labels, tok_weight = tok_row.to(device), tok_col.to(device), labels.to(device), \
        tok_weight.to(device)
    bare = p.bare_rows.to(device)
    h0 = h_suffix[bare, 0].float()  # [n, d]: the decisive token is suffix column 0 in every row
    max_norm = cfg.clamp_norm_factor * h0.norm(dim=-1)  # [n]

    delta = torch.zeros(n, d, device=device)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    step = torch.zeros(n, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    present = torch.ones(n, dtype=torch.bool, device=device)  # requests whose rows are still in the batch
    nll_start = torch.zeros(n, device=device)
    nll_last = torch.zeros(n, device=device)
    kl_init = torch.zeros(0)
    flops = 0.0
    n_params_above = sum(p_.numel() for b in adapter.blocks[layer + 1:] for p_ in b.parameters())
    head = adapter.d_model * adapter.lm_head.weight.shape[0]

    for it in range(cfg.steps):
        if int(active.sum()) <= 0.6 * int(present.sum()):
            # enough requests converged: drop their rows (and the captured block arguments' rows)
            keep = active[row_req]
            new_index = torch.cumsum(keep.long(), 0) - 1
            kept_tok = keep[tok_row]
            tok_row, tok_col = new_index[tok_row[kept_tok]], tok_col[kept_tok]
            labels, tok_weight = labels[kept_tok], tok_weight[kept_tok]
            keep_in = keep.to(ids.device)
            ids, mask, pos, h_suffix = ids[keep_in], mask[keep_in], pos[keep_in], h_suffix[keep]
            row_req, row_last, row_kl = row_req[keep], row_last[keep], row_kl[keep]
            if replay is not None:
                replay.subset(keep)
            present = active.clone()
        dl = delta.clone().requires_grad_(True)
        rows = torch.arange(ids.shape[0], device=device)
        kl_rows = rows[row_kl]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            if replay is not None:
                first = h_suffix[:, :1] + dl[row_req][:, None].to(h_suffix.dtype)
                h = replay(torch.cat([first, h_suffix[:, 1:]], 1))  # [B, W-P, d]
                logits_t = adapter.unembed(_at(h, tok_row, tok_col)).float().to(device)  # [m, V]
                logits_kl = adapter.unembed(_at(h, kl_rows, row_last[kl_rows])).float().to(device)  # [k, V]
            else:
                with Trace(adapter, detach=False) as tr:
                    tr.add_to_block(layer, (rows, torch.full_like(rows, P)), dl[row_req])
                    out = tr.run(input_ids=ids, attention_mask=mask, position_ids=pos)
                logits_t = _at(out.logits, tok_row, tok_col + P).float().to(device)
                logits_kl = _at(out.logits, kl_rows, row_last[kl_rows] + P).float().to(device)
        tok_nll = -torch.log_softmax(logits_t, -1).gather(1, labels[:, None])[:, 0]  # [m]
        nll = torch.zeros(n, device=device).index_add(0, row_req[tok_row], tok_nll * tok_weight)  # [n]
        kl_logp = torch.log_softmax(logits_kl, -1)  # [k, V], k = requests present
        kl_req = row_req[kl_rows]
        if it == 0:
            kl_init = kl_logp.detach().clone()  # [n, V]: all requests are present at step 0
            nll_start = nll.detach().clone()
        kl = torch.zeros(n, device=device).index_add(
            0, kl_req, (kl_logp.exp() * (kl_logp - kl_init[kl_req])).sum(-1))  # KL(p_delta || p_0), [n]
        wd = dl.norm(dim=-1) / h0.norm(dim=-1) ** 2
        loss_each = nll + cfg.kl_factor * kl + cfg.weight_decay * wd
        nll_last = torch.where(active, nll.detach(), nll_last)
        # forward + input-gradient backward = 4 FLOPs per weight per token (no weight gradients)
        tokens = ids.shape[0] * (ids.shape[1] - P if replay is not None else ids.shape[1])
        flops += 4 * tokens * n_params_above + 4 * (len(tok_row) + len(kl_rows)) * head
        active &= nll.detach() >= cfg.early_stop_nll
        if on_step is not None:
            on_step(it + 1, n - int(active.sum()))
        if not bool(active.any()) or it == cfg.steps - 1:
            break
        (loss_each * active).sum().backward()
        with torch.no_grad():
            step += active.float()
            grad = torch.where(active[:, None], dl.grad, torch.zeros_like(dl.grad))
            new = delta.clone()
            _adam(new, grad, m, v, step.clamp(min=1), cfg.lr)
            delta = torch.where(active[:, None], new, delta)
            norms = delta.norm(dim=-1)
            delta = delta * torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), 1.0)[:, None]
    return Anchors(layer, (h0 + delta).detach(), h0.detach(), delta.detach(), nll_start, nll_last,
                   step, flops=flops, extra={"replay": replay is not None})
