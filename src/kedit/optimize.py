"""Batched anchor optimisation (METHODS §4): one ``delta`` per request, all requests at once.

For request i and anchor layer a, ``delta_i`` is added to ``h_a`` at the decisive token of every
context template (and of the KL prompt ``"{subject} is a"``). Loss per request:
``mean_templates NLL(target | template) + kl_factor KL(p_delta || p_0) + wd ||delta|| / ||h_a||^2``.
Requests are independent, so the summed loss gives each ``delta_i`` exactly its own gradient; Adam
is run per row (the same update as ``torch.optim.Adam``), requests that reach the early-stop NLL are
frozen, and once 40% of them are done the batch (with the captured block arguments) shrinks.

Speed: the layers up to ``a`` do not depend on delta, so they run once (no grad); each step replays
only the blocks above ``a`` with the keyword arguments captured from that first pass, and the LM
head is applied only at target positions. The replay is checked against the real forward at step 0
and kedit falls back to full forward passes for an architecture where it does not match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kedit.arch import ArchitectureAdapter
from kedit.hooks import Trace, _first
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
    autocast_bf16: bool = False      # bf16 matmuls on CPU/GPU: ~2.5x faster here, slightly different anchors

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


def _joint_batch(p: AnchorProblem, pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rewrite and KL sequences in one right-padded batch: ``(ids, mask, n_rewrite_rows)``."""
    a, b = p.rewrite.input_ids, p.kl_ids
    width = max(a.shape[1], b.shape[1])
    ids = torch.full((a.shape[0] + b.shape[0], width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[: a.shape[0], : a.shape[1]], mask[: a.shape[0], : a.shape[1]] = a, p.rewrite.attention_mask
    ids[a.shape[0]:, : b.shape[1]], mask[a.shape[0]:, : b.shape[1]] = b, p.kl_mask
    return ids, mask, a.shape[0]


class _Replay:
    """Runs blocks ``layer+1 ..`` on a residual stream, with the arguments captured from a real pass."""

    def __init__(self, adapter: ArchitectureAdapter, layer: int, ids: torch.Tensor, mask: torch.Tensor,
                 full_logits: bool):
        self.adapter, self.layer = adapter, layer
        self.calls: list[tuple[tuple, dict]] = []
        handles = []
        for b in adapter.blocks[layer + 1:]:
            handles.append(b.register_forward_pre_hook(
                lambda _m, args, kwargs: self.calls.append((args[1:], dict(kwargs))), with_kwargs=True))
        try:
            with torch.no_grad(), Trace(adapter) as tr:
                tr.capture_block(layer)
                if not full_logits:
                    tr.stop_after(adapter.n_layers - 1)
                out = tr.run(input_ids=ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
        self.h = tr.blocks[layer]  # [B, T, d]
        self.logits = out.logits if out is not None else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        for block, (args, kwargs) in zip(self.adapter.blocks[self.layer + 1:], self.calls, strict=True):
            h = _first(block(h, *args, **kwargs))
        return h


def _adam(delta, grad, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """In-place Adam on rows (same arithmetic as torch.optim.Adam); ``step`` is [rows]."""
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1 = (1 - b1 ** step)[:, None]
    bc2 = (1 - b2 ** step)[:, None]
    delta.sub_(lr * m / bc1 / ((v.sqrt() / bc2.sqrt()) + eps))


def optimize_anchors(model, adapter: ArchitectureAdapter, chunks: list[AnchorProblem], layer: int,
                     cfg: AnchorConfig, pad: int, progress=None) -> Anchors:
    """Optimise one delta per request at ``layer``; ``chunks`` are consecutive groups of requests."""
    start = time.perf_counter()
    parts = []
    for chunk in chunks:
        parts.append(_optimize_chunk(model, adapter, chunk, layer, cfg, pad))
        if progress is not None:
            progress.update(chunk.n)
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return Anchors(layer, cat("z"), cat("h"), cat("delta"), cat("nll_start"), cat("nll_end"), cat("steps"),
                   time.perf_counter() - start, sum(p.flops for p in parts),
                   {"replay": all(p.extra["replay"] for p in parts)})


def _subset_rows(obj: Any, keep: torch.Tensor, batch: int) -> Any:
    """Select batch rows ``keep`` in every tensor of a captured block call whose dim 0 is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj[keep] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_subset_rows(x, keep, batch) for x in obj)
    if isinstance(obj, list):
        return [_subset_rows(x, keep, batch) for x in obj]
    if isinstance(obj, dict):
        return {k: _subset_rows(v, keep, batch) for k, v in obj.items()}
    return obj


def _optimize_chunk(model, adapter: ArchitectureAdapter, p: AnchorProblem, layer: int, cfg: AnchorConfig,
                    pad: int) -> Anchors:
    device = next(model.parameters()).device
    n, d = p.n, adapter.d_model
    ids, mask, n_rw = _joint_batch(p, pad)
    ids, mask = ids.to(device), mask.to(device)
    # per row (rewrite sequences, then one KL prompt per request): its request and decisive position
    row_req = torch.cat([p.rewrite_request, torch.arange(n)]).to(device)
    row_pos = torch.cat([p.rewrite_decisive, p.kl_decisive]).to(device)
    row_last = torch.cat([p.rewrite_decisive, p.kl_last]).to(device)  # KL is read at the prompt's end
    row_kl = torch.arange(ids.shape[0], device=device) >= n_rw
    # per scored target token: its row, position, label and weight (mean over tokens, then templates)
    tf = p.rewrite
    tok_row, tok_pos, labels = tf.rows.to(device), tf.positions.to(device), tf.labels.to(device)
    tok_per_seq = torch.bincount(tf.rows, minlength=n_rw).to(device).float()
    seq_per_req = torch.bincount(p.rewrite_request, minlength=n).to(device).float()
    tok_weight = 1.0 / (tok_per_seq[tok_row] * seq_per_req[row_req[tok_row]])

    replay = _Replay(adapter, layer, ids, mask, full_logits=True)
    h_all = replay.h
    bare = p.bare_rows.to(device)
    h0 = h_all[bare, row_pos[bare]].float()  # [n, d]
    max_norm = cfg.clamp_norm_factor * h0.norm(dim=-1)  # [n]
    with torch.no_grad():  # the replay must reproduce the real forward, else use full passes
        ref = replay.logits[tok_row, tok_pos]
        got = adapter.unembed(replay(h_all)[tok_row, tok_pos])
        use_replay = bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item())))
    replay.logits = None

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
            tok_row, tok_pos = new_index[tok_row[kept_tok]], tok_pos[kept_tok]
            labels, tok_weight = labels[kept_tok], tok_weight[kept_tok]
            batch = ids.shape[0]
            ids, mask, h_all = ids[keep], mask[keep], h_all[keep]
            row_req, row_pos, row_last, row_kl = row_req[keep], row_pos[keep], row_last[keep], row_kl[keep]
            if use_replay:
                replay.calls = [_subset_rows(c, keep, batch) for c in replay.calls]
            present = active.clone()
        dl = delta.clone().requires_grad_(True)
        rows = torch.arange(ids.shape[0], device=device)
        kl_rows = rows[row_kl]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            if use_replay:
                h = h_all.index_put((rows, row_pos), dl[row_req].to(h_all.dtype), accumulate=True)
                h = replay(h)
                logits_t = adapter.unembed(h[tok_row, tok_pos]).float()  # [m, V]
                logits_kl = adapter.unembed(h[kl_rows, row_last[kl_rows]]).float()  # [k, V]
            else:
                with Trace(adapter, detach=False) as tr:
                    tr.add_to_block(layer, (rows, row_pos), dl[row_req])
                    out = tr.run(input_ids=ids, attention_mask=mask)
                logits_t = out.logits[tok_row, tok_pos].float()
                logits_kl = out.logits[kl_rows, row_last[kl_rows]].float()
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
        flops += 4 * ids.numel() * n_params_above + 4 * (len(tok_row) + len(kl_rows)) * head
        active &= nll.detach() >= cfg.early_stop_nll
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
                   step, flops=flops, extra={"replay": use_replay})
