"""Batched teacher-forced scoring, next-token distributions and fluency generation (kedit.generation).

Many ``(prompt, target)`` pairs are scored in few forward passes: a pair needs the logits at the
positions of ``prompt + target[:-1]`` that predict the target, so pairs whose sequence is a prefix
of another one's (``(p, new)`` and ``(p, true)`` with one-token targets, say) share a row. The model
body runs once per batch and the LM head is applied only at the scored positions (checked against
the full model on a probe at construction; full logits otherwise). Rows are length-sorted to keep
padding small; left padding passes explicit ``position_ids`` so both sides score the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kedit.arch import head_logits
from kedit.generation import generate_ids, row_seed
from kedit.tokens import pad_id, pad_left, pad_right, target_ids

HEAD_CHUNK = 256  # scored positions per LM-head call: [256, V] fp32 is ~50 MB for a 49k vocabulary


@dataclass
class PairScore:
    """Teacher-forced result for one pair: per target token label, log-prob and argmax id."""

    labels: list[int]
    logprobs: list[float]
    argmax: list[int]

    @property
    def nll(self) -> float:
        """Mean over target tokens of -log p (METHODS §8)."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def correct(self) -> list[bool]:
        return [a == b for a, b in zip(self.argmax, self.labels, strict=True)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Scorer:
    """Scores pairs on ``model`` in batches of at most ``max_tokens`` padded tokens.

    ``padding_side`` is "right" or "left" (results agree up to float rounding).
    """

    def __init__(self, model: torch.nn.Module, tok, max_tokens: int = 4096, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model, self.tok, self.padding_side = model, tok, padding_side
        self.max_tokens = max_tokens
        self.pad = pad_id(tok)
        self.head_only = self._probe_head()

    # -- model plumbing ---------------------------------------------------------------------------
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states ``[m, d]`` (after the body's final norm) -> ``[m, V]``."""
        return head_logits(self.model, h)

    @torch.no_grad()
    def _probe_head(self) -> bool:
        """True if body + head reproduces the model's logits (so the head can run on scored positions only)."""
        body = getattr(self.model, "base_model", self.model)
        if body is self.model or self.model.get_output_embeddings() is None:
            return False
        ids = torch.tensor([[1, 2, 3, 4]], device=_device(self.model))
        try:
            ref = self.model(input_ids=ids).logits.float()
            got = self._head(body(input_ids=ids).last_hidden_state).float()
        except Exception:  # any body that does not expose last_hidden_state: use full logits
            return False
        return got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * (1 + ref.abs().max()))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, d]`` (head_only) or logits ``[B, T, V]``."""
        kw = {}
        if self.padding_side == "left":  # positions must count real tokens only
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        if self.head_only:
            return self.model.base_model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask, **kw).logits

    def _pad(self, seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Pad to ``[B, T]``; returns ids, mask and each row's offset of its first real token."""
        if self.padding_side == "right":
            return (*pad_right(seqs, self.pad), [0] * len(seqs))
        ids, mask = pad_left(seqs, self.pad)
        return ids, mask, [ids.shape[1] - len(s) for s in seqs]

    # -- public API ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str | None]], want_dist: Sequence[bool] | None = None,
              ) -> tuple[list[PairScore | None], dict[int, torch.Tensor]]:
        """Score ``(prompt, target)`` pairs teacher forced; a None target only yields the distribution.

        Returns per-pair PairScore (None for None targets) and ``{pair index: log p(next | prompt) [V]}``
        (float32, CPU) for pairs flagged in ``want_dist`` or with a None target.
        """
        want = list(want_dist) if want_dist is not None else [False] * len(pairs)
        prompt_cache: dict[str, list[int]] = {}
        p_ids, t_ids = [], []
        for prompt, target in pairs:
            if prompt not in prompt_cache:
                prompt_cache[prompt] = self.tok(prompt)["input_ids"]
            p_ids.append(prompt_cache[prompt])
            t_ids.append(target_ids(self.tok, prompt, target) if target is not None else [])
        seqs = [tuple(p) + tuple(t[:-1]) for p, t in zip(p_ids, t_ids, strict=True)]
        # share rows: a pair whose sequence is a prefix of a longer kept sequence reads that row
        rows: list[tuple[int, ...]] = []
        row_of: dict[tuple[int, ...], int] = {}
        pair_row = [0] * len(pairs)
        for i in sorted(range(len(pairs)), key=lambda i: -len(seqs[i])):
            r = row_of.get(seqs[i])
            if r is None:
                r = len(rows)
                rows.append(seqs[i])
                for n in range(1, len(seqs[i]) + 1):
                    row_of.setdefault(seqs[i][:n], r)
            pair_row[i] = r
        by_row: dict[int, list[int]] = {}
        for i, r in enumerate(pair_row):
            by_row.setdefault(r, []).append(i)
        results: list[PairScore | None] = [None] * len(pairs)
        dists: dict[int, torch.Tensor] = {}
        order = sorted(range(len(rows)), key=lambda r: len(rows[r]))  # similar lengths share a batch
        start = 0
        while start < len(order):
            end = start + 1  # grow while the padded batch stays within the token budget
            while end < len(order) and (end - start + 1) * len(rows[order[end]]) <= self.max_tokens:
                end += 1
            self._score_batch([order[k] for k in range(start, end)], rows, by_row, p_ids, t_ids, want,
                              results, dists)
            start = end
        return results, dists

    def _score_batch(self, batch_rows, rows, by_row, p_ids, t_ids, want, results, dists) -> None:
        ids, mask, offsets = self._pad([rows[r] for r in batch_rows])
        out = self._forward(ids.to(_device(self.model)), mask.to(_device(self.model)))  # [B, T, d or V]
        b_idx, pos, owners = [], [], []  # one entry per scored position: (pair, token j or -1 = dist only)
        for b, r in enumerate(batch_rows):
            for i in by_row[r]:
                first = offsets[b] + len(p_ids[i]) - 1  # logits here predict the first target token
                for j in range(max(len(t_ids[i]), 1)):
                    b_idx.append(b)
                    pos.append(first + j)
                    owners.append((i, j if t_ids[i] else -1))
        per_pair: dict[int, tuple[list[float], list[int]]] = {}
        for c in range(0, len(owners), HEAD_CHUNK):
            sl = slice(c, c + HEAD_CHUNK)
            x = out[torch.tensor(b_idx[sl], device=out.device), torch.tensor(pos[sl], device=out.device)]  # [m, d|V]
            logp = (self._head(x) if self.head_only else x).float().log_softmax(-1)  # [m, V]
            top = logp.argmax(-1).tolist()
            for k, (i, j) in enumerate(owners[sl]):
                if j <= 0 and (want[i] or j < 0):
                    dists[i] = logp[k].cpu()
                if j >= 0:
                    lp, am = per_pair.setdefault(i, ([], []))
                    lp.append(float(logp[k, t_ids[i][j]]))
                    am.append(top[k])
        for i, (lp, am) in per_pair.items():
            results[i] = PairScore(list(t_ids[i]), lp, am)

    def generate(self, prompts: Sequence[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                 batch_size: int = 32) -> list[str]:
        """Sample continuations (top-k, seeded per row; see kedit.generation); each text = prompt + new tokens.

        ROME's fluency protocol: sequences of ``max_length`` tokens in total.
        """
        enc = [self.tok(p)["input_ids"] for p in prompts]
        new = generate_ids(self.model, enc, [max(max_length - len(e), 0) for e in enc], top_k=top_k,
                           seeds=[row_seed(seed, i) for i in range(len(enc))], eos_token_id=self.tok.eos_token_id,
                           pad_token_id=self.pad, batch_size=batch_size)
        return [self.tok.decode(e + row, skip_special_tokens=True) for e, row in zip(enc, new, strict=True)]
