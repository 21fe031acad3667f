"""Batched anchor optimisation (METHODS §4): one ``delta`` per request, all requests at once.

For request i and anchor layer a, ``delta_i`` is added to ``h_a`` at the decisive token of every
context template (and of the KL prompt ``"{subject} is a"``). Loss per request:
``mean_templates NLL(target | template) + kl_factor KL(p_delta || p_0) + wd ||delta|| / norm^2``.
Requests are independent, so the summed loss gives each ``delta_i`` exactly its own gradient; Adam
is run per row (the same update as ``torch.optim.Adam``), requests whose stopping loss falls below
``early_stop`` are frozen, and once 40% of them are done the batch (with the captured block arguments)
shrinks.

Reference behaviour (MEMIT ``compute_z``, ROME ``compute_v``) is the default; kedit's earlier choices
stay available by name:
- ``kl_position="subject"``: the KL term is read at the subject's last token of ``"{subject} is a"``
  (where delta is injected); ``"last"``: at that prompt's last token (kedit before issue 11).
- ``stop_on="total"``: a request stops once nll + kl_factor kl + decay < ``early_stop``; ``"nll"``: the
  NLL alone.
- ``site="block"`` (MEMIT family): clamp and decay use ``norm = ||h_a||``; ``site="mlp"`` (ROME): delta
  sits on the MLP output and they use ``norm = ||mlp_out_a||`` at the decisive token of the bare prompt.
  Adding delta to the MLP output adds exactly delta to the block output (residual add, parallel
  residual included; tests/test_anchors_reference.py), so delta is still injected at the block output.

Speed: the layers up to ``a`` do not depend on delta, and neither do the tokens before the decisive
token (causal attention). Rows are left-aligned on the decisive token, the layers up to ``a`` run
once (no grad), and each step replays only the blocks above ``a`` on the suffix columns, reusing
the prefix keys/values from a cache and the block arguments captured from a real pass; the LM head
is applied only at target positions. Rows are split into *bands* of similar suffix width, each replayed
on its own: with ``kl_position="subject"`` the KL rows need only their decisive column, so they form a
one-column band instead of being padded to the rewrite rows' width. The replay is checked against
the real forward before the first step, and kedit falls back to full forward passes where it does not
match (e.g. sliding-window caches).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kedit.arch import ArchitectureAdapter
from kedit.generation import cache_kwargs, new_cache
from kedit.hooks import Trace, block_output, record_block_calls
from kedit.tokens import TeacherForced

STOP_ON = ("total", "nll")
KL_POSITIONS = ("subject", "last")
SITES = ("block", "mlp")
CHUNK_ORDERS = ("suffix", "request")


@dataclass(frozen=True)
class AnchorConfig:
    lr: float = 0.5                  # Adam step size (0.1 for Llama-3-8B-size models, METHODS §4)
    steps: int = 25                  # MEMIT: 20-25
    kl_factor: float = 0.0625        # keeps the subject's "is a" distribution (essence drift)
    weight_decay: float = 0.5        # on ||delta|| / ||h_a||^2
    clamp_norm_factor: float = 0.75  # ||delta|| <= factor * norm (MEMIT 0.75 of ||h_a||, ROME 4 of ||mlp_out||)
    early_stop: float = 0.05         # a request stops once its ``stop_on`` loss is below this (reference 5e-2)
    stop_on: str = "total"           # "total": nll + kl + decay (reference); "nll": the NLL alone (old kedit)
    kl_position: str = "subject"     # "subject": subject's last token of "{s} is a" (reference); "last": its end
    site: str = "block"              # norm of clamp/decay: "block" ||h_a|| (MEMIT), "mlp" ||mlp_out_a|| (ROME)
    batch_size: int = 32             # requests optimised together (memory bound)
    chunk_order: str = "suffix"      # chunks of requests sorted by suffix length (less padding); "request": in order
    autocast_bf16: bool = False      # bf16 autocast, fp32 model: weights cast per call (CPUs: load in bf16 instead)

    def __post_init__(self) -> None:
        for name in ("lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AnchorConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("AnchorConfig.steps and batch_size must be >= 1")
        for name, allowed in (("stop_on", STOP_ON), ("kl_position", KL_POSITIONS), ("site", SITES),
                              ("chunk_order", CHUNK_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"AnchorConfig.{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")

    def result_fields(self) -> dict[str, Any]:
        """The fields an anchor depends on (cache key): chunking only changes float rounding (tested)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch_size", "chunk_order")}


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
    requests: torch.Tensor | None = None  # [n] index of each request in the caller's list (None: 0..n-1)


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
    norm: torch.Tensor | None = None  # [n] the norm clamp and decay used (||h|| or ||mlp_out||, see ``site``)
    site: str = "block"      # AnchorConfig.site the anchors were optimised with


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
    row_last: torch.Tensor   # [B] suffix column read for the KL distribution (kl_position; 0 = decisive)
    tok_row: torch.Tensor    # [m] row of each scored target token
    tok_col: torch.Tensor    # [m] suffix column whose logits predict it
    labels: torch.Tensor     # [m]
    tok_weight: torch.Tensor  # [m] 1 / (tokens of its sequence * templates of its request)


def anchor_layout(p: AnchorProblem, pad: int, kl_position: str = "last") -> _Layout:
    """All rows of ``p`` in one layout; with ``kl_position="subject"`` the KL rows end at their decisive token."""
    tf = p.rewrite
    subject = kl_position == "subject"
    seqs = [tf.input_ids[r, : int(tf.attention_mask[r].sum())].tolist() for r in range(tf.n)]
    seqs += [p.kl_ids[i, : int(p.kl_decisive[i]) + 1 if subject else int(p.kl_mask[i].sum())].tolist()
             for i in range(p.n)]
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
    kl_read = p.kl_decisive if subject else p.kl_last
    return _Layout(
        ids=ids, mask=mask, pos=pos, P=P, row_req=row_req, row_kl=torch.arange(B) >= n_rw,
        row_last=torch.cat([p.rewrite_decisive, kl_read]) - torch.tensor(dec),
        tok_row=tf.rows, tok_col=tf.positions + shift[tf.rows] - P, labels=tf.labels,
        tok_weight=1.0 / (tok_per_seq[tf.rows] * seq_per_req[row_req[tf.rows]]),
    )


def _band(lay: _Layout, rows: torch.Tensor) -> _Layout:
    """Rows ``rows`` of ``lay`` with the columns that are padding in all of them cut off (both sides)."""
    mask = lay.mask[rows]
    real = mask.any(0).nonzero()[:, 0]
    c0, c1 = int(real.min()), int(real.max()) + 1  # the decisive column P is real in every row
    new_index = torch.full((lay.ids.shape[0],), -1, dtype=torch.long)
    new_index[rows] = torch.arange(len(rows))
    keep = new_index[lay.tok_row] >= 0
    return _Layout(ids=lay.ids[rows, c0:c1], mask=mask[:, c0:c1], pos=lay.pos[rows, c0:c1], P=lay.P - c0,
                   row_req=lay.row_req[rows], row_kl=lay.row_kl[rows], row_last=lay.row_last[rows],
                   tok_row=new_index[lay.tok_row[keep]], tok_col=lay.tok_col[keep], labels=lay.labels[keep],
                   tok_weight=lay.tok_weight[keep])


def anchor_bands(p: AnchorProblem, pad: int, kl_position: str) -> list[_Layout]:
    """The layouts replayed separately: one for all rows (``"last"``), else rewrite rows and KL rows.

    With ``"subject"`` a KL row is read at its decisive token, suffix column 0: its band is one column
    wide instead of the rewrite rows' suffix width.
    """
    lay = anchor_layout(p, pad, kl_position)
    if kl_position != "subject":
        return [lay]
    rows = torch.arange(lay.ids.shape[0])
    return [_band(lay, rows[~lay.row_kl]), _band(lay, rows[lay.row_kl])]


class _SuffixReplay:
    """Blocks ``layer+1 ..`` on the suffix columns, with the constant prefix keys/values cached.

    Two no-grad passes set it up: the full batch (reference output, h_layer, the prefix cache) and the
    suffix alone on that cache, recording every upper block's arguments. Each call resets the cache to
    the prefix and replays the upper blocks on a given suffix residual.
    """

    def __init__(self, adapter: ArchitectureAdapter, layer: int, lay: _Layout):
        self.adapter, self.layer = adapter, layer
        last = adapter.n_layers - 1
        # the reference is the last block's output; the pass stops there (the caller applies the LM head at
        # the read positions only: over all B x W positions it cost ~2.5 optimisation steps, and the
        # model's own head on a bf16 CPU model materialised a [B, d, V] weight copy per row)
        self.cache = new_cache(adapter.model)
        with torch.no_grad(), Trace(adapter) as tr:
            tr.capture_block(layer)
            tr.capture_block(last)
            tr.stop_after(last)
            tr.run(input_ids=lay.ids, attention_mask=lay.mask, position_ids=lay.pos, use_cache=True,
                   **cache_kwargs(adapter.model, self.cache))
        self.ref_h: torch.Tensor | None = tr.blocks[last][:, lay.P:]  # [B, W-P, d]
        self.h = tr.blocks[layer][:, lay.P:]  # [B, W-P, d]
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


def attention_backend(adapter: ArchitectureAdapter, cfg: AnchorConfig) -> contextlib.AbstractContextManager:
    """The SDPA backend for the anchor loop: plain-maths attention for bf16/fp16 on a CPU, else torch's choice.

    CPU flash attention's backward in bf16 took 44% of an anchor step on SmolLM2 (35 ms a call vs 3.4 ms in
    fp32; Intel Xeon with AMX, torch 2.13); the maths backend computes it with bf16 matrix products instead.
    GPUs keep torch's choice (flash / memory-efficient kernels).
    """
    low = adapter.lm_head.weight.dtype in (torch.bfloat16, torch.float16) or cfg.autocast_bf16
    if adapter.input_device.type != "cpu" or not low:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def chunk_requests(chunks: list[AnchorProblem], i: int) -> torch.Tensor:
    """``[n_i]`` the caller's index of every request of chunk ``i`` (chunks may be sorted by suffix length)."""
    c = chunks[i]
    return torch.arange(c.n) + sum(x.n for x in chunks[:i]) if c.requests is None else c.requests


def optimize_anchors(model, adapter: ArchitectureAdapter, chunks: list[AnchorProblem], layer: int,
                     cfg: AnchorConfig, pad: int, progress=None,
                     on_step: Callable[[int, int, int], None] | None = None,
                     on_chunk: Callable[[torch.Tensor, Anchors], None] | None = None) -> Anchors:
    """Optimise one delta per request at ``layer``; returned in request order (``AnchorProblem.requests``).

    ``on_step(chunk_index, step, converged)``: called after every optimisation step (progress display).
    ``on_chunk(request_indices, anchors)``: called as each chunk finishes, with the caller's indices of its
    requests (a cache can keep them before the next chunk starts: an interrupted run loses one chunk at most).
    """
    start = time.perf_counter()
    parts = []
    with attention_backend(adapter, cfg):
        for c, chunk in enumerate(chunks):
            step_cb = None if on_step is None else (lambda it, done, c=c: on_step(c, it, done))
            parts.append(_optimize_chunk(model, adapter, chunk, layer, cfg, pad, step_cb))
            if on_chunk is not None:
                on_chunk(chunk_requests(chunks, c), parts[-1])
            if progress is not None:
                progress.update(chunk.n)
    # chunks may hold requests in any order (sorted by suffix length): back to the caller's order
    order = torch.cat([chunk_requests(chunks, i) for i in range(len(chunks))])
    return concat_anchors(layer, parts, time.perf_counter() - start, cfg.site,
                          {"setup_seconds": sum(p.extra["setup_seconds"] for p in parts)}, torch.argsort(order))


def concat_anchors(layer: int, parts: list[Anchors], seconds: float, site: str, extra: dict[str, Any],
                   rows: torch.Tensor | None = None) -> Anchors:
    """``parts`` concatenated (then rows ``rows`` in that order), on CPU: anchors are small ([n, d]) and meet
    CPU-side residuals in the targets. ``extra`` is added to the parts' combined ``replay`` flag."""
    def cat(name: str) -> torch.Tensor:
        x = torch.cat([getattr(p, name).cpu() for p in parts])
        return x if rows is None else x[rows]

    return Anchors(layer, cat("z"), cat("h"), cat("delta"), cat("nll_start"), cat("nll_end"), cat("steps"),
                   seconds, sum(p.flops for p in parts), {"replay": all(p.extra["replay"] for p in parts), **extra},
                   norm=cat("norm"), site=site)


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


class _Band:
    """One layout's rows at the anchor layer: the suffix residual, its replay (or None: full passes)."""

    def __init__(self, adapter: ArchitectureAdapter, layer: int, lay: _Layout):
        self.adapter, self.layer, self.P = adapter, layer, lay.P
        dev = adapter.input_device  # token ids go to the embedding; bookkeeping follows h_layer (below)
        self.ids, self.mask, self.pos = lay.ids.to(dev), lay.mask.to(dev), lay.pos.to(dev)
        self.replay = None
        ok = False
        try:
            self.replay = _SuffixReplay(adapter, layer, _Layout(**{**lay.__dict__, "ids": self.ids, "mask": self.mask,
                                                                   "pos": self.pos}))
            with torch.no_grad():  # the replay must reproduce the real forward at every read position
                rows = torch.cat([lay.tok_row, lay.row_kl.nonzero()[:, 0]])
                cols = torch.cat([lay.tok_col, lay.row_last[lay.row_kl]])
                ref = adapter.unembed(_at(self.replay.ref_h, rows, cols)).float()
                got = adapter.unembed(_at(self.replay(self.replay.h), rows, cols)).float().to(ref.device)
                tol = max(1e-3, 8 * torch.finfo(self.replay.h.dtype).eps)  # bf16/fp16: a few roundings differ
                ok = bool(torch.allclose(got, ref, rtol=tol, atol=tol * (1 + ref.abs().max().item())))
            self.h = self.replay.h
            self.replay.ref_h = None
        except (AttributeError, TypeError, ValueError, RuntimeError):  # no reusable per-layer key/value cache
            ok = False
        if not ok:
            self.replay = None
            with torch.no_grad(), Trace(adapter) as tr:
                tr.capture_block(layer)
                tr.stop_after(layer)
                tr.run(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos)
            self.h = tr.blocks[layer][:, lay.P:]
        # bookkeeping lives on h_layer's device
        d = self.h.device
        self.row_req, self.row_kl, self.row_last = lay.row_req.to(d), lay.row_kl.to(d), lay.row_last.to(d)
        self.tok_row, self.tok_col = lay.tok_row.to(d), lay.tok_col.to(d)
        self.labels, self.tok_weight = lay.labels.to(d), lay.tok_weight.to(d)

    def subset(self, active: torch.Tensor) -> None:
        """Drop the rows of requests that are no longer ``active`` (and the captured block arguments' rows)."""
        keep = active[self.row_req]
        new_index = torch.cumsum(keep.long(), 0) - 1
        kept_tok = keep[self.tok_row]
        self.tok_row, self.tok_col = new_index[self.tok_row[kept_tok]], self.tok_col[kept_tok]
        self.labels, self.tok_weight = self.labels[kept_tok], self.tok_weight[kept_tok]
        keep_in = keep.to(self.ids.device)
        self.ids, self.mask, self.pos, self.h = self.ids[keep_in], self.mask[keep_in], self.pos[keep_in], self.h[keep]
        self.row_req, self.row_last, self.row_kl = self.row_req[keep], self.row_last[keep], self.row_kl[keep]
        if self.replay is not None:
            self.replay.subset(keep)

    def logits(self, dl: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[m, V]`` at this band's target positions and ``[k, V]`` at its KL rows' read positions."""
        device = self.h.device
        rows = torch.arange(self.ids.shape[0], device=device)
        kl_rows = rows[self.row_kl]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if self.replay is not None:
                first = self.h[:, :1] + dl[self.row_req][:, None].to(self.h.dtype)
                h = self.replay(torch.cat([first, self.h[:, 1:]], 1))  # [B, W-P, d]
                rows_all = torch.cat([self.tok_row, kl_rows])
                cols_all = torch.cat([self.tok_col, self.row_last[kl_rows]])
                logits = self.adapter.unembed(_at(h, rows_all, cols_all)).float().to(device)  # [m+k, V]
            else:
                with Trace(self.adapter, detach=False) as tr:
                    tr.add_to_block(self.layer, (rows, torch.full_like(rows, self.P)), dl[self.row_req])
                    out = tr.run(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos)
                logits = _at(out.logits, torch.cat([self.tok_row, kl_rows]),
                             torch.cat([self.tok_col, self.row_last[kl_rows]]) + self.P).float().to(device)
        m = len(self.tok_row)
        return logits[:m], logits[m:]

    def flops(self, n_params_above: int, head: int) -> float:
        """Forward + input-gradient backward = 4 FLOPs per weight per token (no weight gradients)."""
        tokens = self.ids.shape[0] * (self.ids.shape[1] - self.P if self.replay is not None else self.ids.shape[1])
        return 4 * tokens * n_params_above + 4 * (len(self.tok_row) + int(self.row_kl.sum())) * head


@torch.no_grad()
def mlp_output_norm(adapter: ArchitectureAdapter, layer: int, ids: torch.Tensor, mask: torch.Tensor,
                    pos: torch.Tensor, col: int) -> torch.Tensor:
    """``||mlp_out_layer||`` [rows] at column ``col`` of every row (ROME's ``target_init`` norm)."""
    dev = adapter.input_device
    rows = torch.arange(ids.shape[0])
    with Trace(adapter) as tr:
        tr.capture_key_output(layer, (rows, torch.full_like(rows, col)))
        tr.stop_after(layer)
        tr.run(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
    return tr.key_outputs[layer].float().norm(dim=-1)


def _optimize_chunk(model, adapter: ArchitectureAdapter, p: AnchorProblem, layer: int, cfg: AnchorConfig,
                    pad: int, on_step: Callable[[int, int], None] | None = None) -> Anchors:
    n, d = p.n, adapter.d_model
    t0 = time.perf_counter()
    lays = anchor_bands(p, pad, cfg.kl_position)
    bands = [_Band(adapter, layer, lay) for lay in lays]
    # delta, its optimiser state and the per-request loss live on h_layer's device, in fp32 whatever
    # the model's dtype (the loss is computed from fp32 logits); delta is cast to h's dtype when added
    device = bands[0].h.device
    bare = p.bare_rows.to(device)  # rewrite rows come first in band 0, in the problem's row order
    h0 = bands[0].h[bare, 0].float()  # [n, d]: the decisive token is suffix column 0 in every row
    if cfg.site == "mlp":  # ROME compute_v: clamp and decay relative to the MLP output at the decisive token
        b = p.bare_rows
        norm = mlp_output_norm(adapter, layer, lays[0].ids[b], lays[0].mask[b], lays[0].pos[b], lays[0].P).to(device)
    else:
        norm = h0.norm(dim=-1)  # [n]
    max_norm = cfg.clamp_norm_factor * norm  # [n]
    setup = time.perf_counter() - t0

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
            for band in bands:  # enough requests converged: drop their rows
                band.subset(active)
            present = active.clone()
        dl = delta.clone().requires_grad_(True)
        nll = torch.zeros(n, device=device)
        kl_logp, kl_req = [], []
        for band in bands:
            logits_t, logits_kl = band.logits(dl, cfg.autocast_bf16)
            tok_nll = -torch.log_softmax(logits_t, -1).gather(1, band.labels[:, None])[:, 0]  # [m]
            nll = nll.index_add(0, band.row_req[band.tok_row], tok_nll * band.tok_weight)  # [n]
            kl_logp.append(torch.log_softmax(logits_kl, -1))  # [k, V]
            kl_req.append(band.row_req[band.row_kl])
            flops += band.flops(n_params_above, head)
        kl_lp, kl_r = torch.cat(kl_logp), torch.cat(kl_req)  # KL rows of the requests present, in request order
        if it == 0:
            kl_init = kl_lp.detach().clone()  # [n, V]: all requests are present at step 0
            nll_start = nll.detach().clone()
        kl = torch.zeros(n, device=device).index_add(
            0, kl_r, (kl_lp.exp() * (kl_lp - kl_init[kl_r])).sum(-1))  # KL(p_delta || p_0), [n]
        wd = dl.norm(dim=-1) / norm ** 2
        loss_each = nll + cfg.kl_factor * kl + cfg.weight_decay * wd
        nll_last = torch.where(active, nll.detach(), nll_last)
        stop_loss = loss_each if cfg.stop_on == "total" else nll  # reference: the total loss < 5e-2
        active &= stop_loss.detach() >= cfg.early_stop
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
                   step, flops=flops, norm=norm.detach(), site=cfg.site,
                   extra={"replay": all(b.replay is not None for b in bands), "setup_seconds": setup})
