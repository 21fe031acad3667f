"""Causal tracing (ROME's causal mediation analysis, Meng et al. 2022 §2.1) as a layer selector.

Per proxy prompt: a clean run; corrupted runs where Gaussian noise is added to the input embeddings
of every subject token; and, for each candidate layer ``l``, corrupted runs in which the residual
stream after block ``l`` at the decisive (last subject) token is overwritten by its clean value.
Indirect effect ``IE(l) = p_restored(l) - p_corrupted`` of the traced answer token, averaged over
noise samples and prompts; the layer (or window) with the largest mean IE is chosen.

The traced token, ``answer``: ``"predicted"`` (default, ROME's choice: the clean model's own greedy next
token after the prompt) or ``"dataset"`` (the first token of ``" " + target_true``; a request without
a target_true falls back to the prediction). Tracing the dataset answer measures where a fact the
model may not hold would be recalled, a different (and noisier) question; the choice is recorded.

Noise level, exactly: ``noise x std`` where ``std`` is the standard deviation of all coordinates of
the input-embedding vectors of the subject tokens of the proxy prompts (as they are tokenised inside
the prompts), and ``noise = 3`` by default. ROME's ``collect_embedding_std`` computes the same
statistic over subjects tokenised on their own. Noise is seeded per request (``seed``, index), so a
result does not depend on the batch size, and the same noise is reused for every restored layer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kedit.arch import ArchitectureAdapter
from kedit.hooks import Index, Trace
from kedit.layers.base import LayerChoice, best_window, bootstrap_stability, candidate_layers, check_proxy
from kedit.requests import EditRequest
from kedit.tokens import Encoded, encode_with_subject, pad_id, pad_right, target_ids


@dataclass
class Traced(Encoded):
    """A prompt encoded with its subject span (kedit.tokens.Encoded) plus the answer token that is traced."""

    answer: int

    @property
    def last(self) -> int:
        """The decisive (last subject) token."""
        return self.decisive


ANSWERS = ("predicted", "dataset")  # which token is traced (module docstring)


def _encode(tok: Any, model: torch.nn.Module, r: EditRequest, answer: str = "predicted") -> Traced:
    """Prompt ids and subject span (kedit.tokens), and the traced token (``answer``, see ANSWERS).

    ``"predicted"``: the clean model's argmax after the prompt (ROME); ``"dataset"``: the first token of
    ``" " + target_true``, or the prediction when the request has none.
    """
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
    e = encode_with_subject(tok, r.prompt, r.subject)
    if answer == "dataset" and r.target_true is not None:
        answer = target_ids(tok, r.filled, r.target_true)[0]
    else:
        with torch.no_grad():
            x = torch.tensor([e.ids], device=next(model.parameters()).device)
            answer = int(model(input_ids=x).logits[0, -1].argmax())
    return Traced(e.ids, e.decisive, e.first, answer)


def subject_embedding_std(model: torch.nn.Module, encs: Sequence[Traced]) -> float:
    """Std of all coordinates of the subject tokens' input embeddings (float64)."""
    emb = model.get_input_embeddings()
    device = next(model.parameters()).device
    with torch.no_grad():
        vecs = [emb(torch.tensor(e.ids[e.first:e.decisive + 1], device=device)) for e in encs]  # [s_i, d]
    return torch.cat(vecs).double().std().item()


def _answer_prob(adapter: ArchitectureAdapter, ids: torch.Tensor, mask: torch.Tensor, answers: torch.Tensor,
                 capture: tuple[Sequence[int], Index] | None = None,
                 restore: tuple[int, Index, torch.Tensor] | None = None, noise: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """p(answer) at each row's last real position ``[B]``, and the blocks captured at ``capture``.

    ``capture = (layers, index)`` records block outputs; ``restore = (layer, index, values)``
    overwrites block ``layer``'s output at ``index`` with ``values [m, d]``; ``noise [B, T, d]`` is
    added to the input embeddings.
    """
    last = adapter.n_layers - 1
    rows = torch.arange(ids.shape[0], device=ids.device)
    pos = mask.sum(1) - 1
    final: dict[str, torch.Tensor] = {}

    def grab(h: torch.Tensor) -> torch.Tensor:
        final["h"] = h[rows, pos]  # [B, d]: registered after the patches, so it sees patched values
        return h

    with torch.no_grad(), Trace(adapter) as tr:
        if noise is not None:
            tr.patch_embeddings(lambda e: e + noise.to(e.dtype))
        if capture is not None:
            for l in capture[0]:
                tr.capture_block(l, capture[1])
        if restore is not None:
            tr.set_block(*restore)
        tr.patch_block(last, grab)
        tr.stop_after(last)
        tr.run(input_ids=ids, attention_mask=mask)
    logits = adapter.unembed(final["h"])                                      # [B, V]
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
    return probs[rows, answers].cpu().double(), tr.blocks


def _trace_chunk(model: torch.nn.Module, adapter: ArchitectureAdapter, chunk: Sequence[Traced],
                 layers: Sequence[int], noise_std: float, samples: int, seeds: Sequence[int],
                 pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p_clean [n]``, ``p_corrupted [n]``, ``p_restored [n, L]`` for one chunk (means over samples)."""
    device = next(model.parameters()).device
    d = model.get_input_embeddings().weight.shape[1]
    n = len(chunk)
    ids, mask = (x.to(device) for x in pad_right([e.ids for e in chunk], pad))  # [n, T]
    answers = torch.tensor([e.answer for e in chunk], device=device)
    dec = torch.tensor([e.decisive for e in chunk], device=device)
    p_clean, clean = _answer_prob(adapter, ids, mask, answers, (layers, (torch.arange(n, device=device), dec)))
    # corrupted batch: row r belongs to request r // samples; noise only on subject tokens
    noise = torch.zeros(n * samples, ids.shape[1], d, dtype=torch.float64)         # [n*s, T, d]
    for i, (e, seed) in enumerate(zip(chunk, seeds, strict=True)):
        gen = torch.Generator().manual_seed(seed)
        noise[i * samples:(i + 1) * samples, e.first:e.decisive + 1] = torch.randn(
            samples, e.decisive - e.first + 1, d, generator=gen, dtype=torch.float64)
    noise = (noise * noise_std).to(device)
    rep = lambda x: x.repeat_interleave(samples, 0)  # noqa: E731
    ids_r, mask_r, ans_r = rep(ids), rep(mask), rep(answers)
    idx_r = (torch.arange(n * samples, device=device), rep(dec))
    p_cor = _answer_prob(adapter, ids_r, mask_r, ans_r, noise=noise)[0]                # [n*s]
    p_res = torch.stack([_answer_prob(adapter, ids_r, mask_r, ans_r, restore=(l, idx_r, rep(clean[l])), noise=noise)[0]
                         for l in layers], 1)                                          # [n*s, L]
    return p_clean, p_cor.view(n, samples).mean(1), p_res.view(n, samples, len(layers)).mean(1)


def indirect_effects(model: torch.nn.Module, adapter: ArchitectureAdapter, encs: Sequence[Traced],
                     layers: Sequence[int], noise_std: float, samples: int, seed: int, pad: int,
                     batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``p_clean [n]``, ``p_corrupted [n]`` and ``p_restored [n, L]`` (means over noise samples).

    Request ``i`` draws its noise from its own generator seeded ``seed * 1_000_003 + i``, so the
    result does not depend on ``batch_size``.
    """
    parts = [_trace_chunk(model, adapter, encs[s:s + batch_size], layers, noise_std, samples,
                          [seed * 1_000_003 + i for i in range(s, min(s + batch_size, len(encs)))], pad)
             for s in range(0, len(encs), batch_size)]
    return {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(("p_clean", "p_corrupted", "p_restored"))}


def _agreement(tok: Any, encs: Sequence[Traced], proxy: Sequence[EditRequest]) -> float | None:
    """Fraction of traced tokens equal to the first token of ``" " + target_true`` (None without any)."""
    pairs = [(e.answer, target_ids(tok, r.filled, r.target_true)[0]) for e, r in zip(encs, proxy, strict=True)
             if r.target_true is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


@dataclass(frozen=True)
class CausalTrace:
    """Choose the layer (or window) whose clean hidden state at the decisive token restores most."""

    name: ClassVar[str] = "causal"
    noise: float = 3.0                      # noise std in units of the subject-embedding std (ROME: 3)
    samples: int = 10                       # noise samples per prompt (ROME: 10)
    seed: int = 0
    window: int = 1                         # consecutive layers edited (1 = ROME)
    layers: tuple[int, ...] | None = None   # candidate layers; None = every layer
    batch_size: int = 8                     # prompts per forward pass (x samples rows)
    bootstrap: int = 200                    # resamples of the proxy set for the stability report (0 = off)
    answer: str = "predicted"               # traced token: the clean greedy prediction (ROME) or "dataset"

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"CausalTrace.answer must be one of {ANSWERS}, got {self.answer!r}")
        if not self.noise >= 0:
            raise ValueError(f"CausalTrace.noise must be >= 0, got {self.noise}")
        if self.bootstrap < 0:
            raise ValueError(f"CausalTrace.bootstrap must be >= 0, got {self.bootstrap}")
        for name in ("samples", "window", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalTrace.{name} must be >= 1, got {getattr(self, name)}")

    def select(self, model: torch.nn.Module, adapter: ArchitectureAdapter | None, tok: Any,
               proxy: Sequence[EditRequest]) -> LayerChoice:
        """Trace every candidate layer over ``proxy`` and choose; raises BadRequest / ValueError."""
        t0 = time.perf_counter()
        proxy = check_proxy(proxy, who="causal tracing")
        adapter = adapter or ArchitectureAdapter.from_model(model)
        cands = candidate_layers(adapter, self.layers, self.window)
        was_training = model.training
        model.eval()
        try:
            encs = [_encode(tok, model, r, self.answer) for r in proxy]
            emb_std = subject_embedding_std(model, encs)
            res = indirect_effects(model, adapter, encs, cands, self.noise * emb_std, self.samples, self.seed,
                                   pad_id(tok), self.batch_size)
        finally:
            model.train(was_training)
        ie = res["p_restored"] - res["p_corrupted"][:, None]    # [n, L]
        scores = ie.mean(0).tolist()
        chosen, _ = best_window(cands, scores, self.window)
        stability = bootstrap_stability(lambda w: best_window(cands, (w @ ie / w.sum()).tolist(), self.window)[0][0],
                                        len(proxy), chosen[0], self.bootstrap, self.seed)
        details = {
            "noise": self.noise, "embedding_std": emb_std, "noise_std": self.noise * emb_std,
            "samples": self.samples, "seed": self.seed, "window": self.window, "n_proxy": len(proxy),
            "window_score": "sum of layer scores", "stability": stability,
            "site": "residual stream after block l, decisive token", "answer": self.answer,
            "answer_rule": ("the clean model's greedy next token" if self.answer == "predicted"
                            else "first token of ' ' + target_true (the prediction where absent)"),
            "answer_matches_dataset": _agreement(tok, encs, proxy),
            "p_clean": res["p_clean"].mean().item(), "p_corrupted": res["p_corrupted"].mean().item(),
            "total_effect": (res["p_clean"] - res["p_corrupted"]).mean().item(),
            "per_request": ie.tolist(),
        }
        return LayerChoice("causal", chosen, cands, scores, time.perf_counter() - t0, details)
