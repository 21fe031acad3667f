"""Model health: is the edited model still a good language model? Perplexity and unrelated-prompt drift.

Two fixed probes, measured before and after editing (and after every batch in sequential mode):
perplexity on the first ``tokens`` tokens of a corpus (default: the statistics corpus of the run)
and, on the unrelated prompts shipped in ``kedit/data/health_prompts.jsonl``, the next-token top-1
agreement with the unedited model and KL(p_before || p_after).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from kedit.corpus import Corpus, pack_rows
from kedit.errors import KeditError
from kedit.eval import metrics as M
from kedit.eval.scoring import Scorer
from kedit.tokens import pad_id

KEYS = ("health_perplexity", "health_top1_agreement", "health_kl")


def health_prompts() -> list[str]:
    """kedit's fixed unrelated prompt set (package data, one ``{"prompt": ...}`` per line)."""
    text = (resources.files("kedit") / "data" / "health_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


@dataclass
class HealthState:
    """Raw health probe of one model state: per-row (sum NLL, tokens) and next-token log-dists ``[P, V]``."""

    row_nll: np.ndarray     # [rows, 2]: summed token NLL, number of predicted tokens
    logp: torch.Tensor      # [P, V] float32 log p(next | prompt)

    @property
    def perplexity(self) -> float:
        return math.exp(self.row_nll[:, 0].sum() / self.row_nll[:, 1].sum())


class Health:
    """Measures HealthState on ``model``; ``compare(before, after)`` gives the health metrics.

    ``rows`` are token rows of the corpus slice (``tokens`` ids in rows of ``max_length``); the slice
    is fixed by the corpus content, so every state of a run (and every run) reads the same text.
    """

    def __init__(self, model: torch.nn.Module, tok, corpus: Corpus, prompts: list[str] | None = None,
                 tokens: int = 4096, max_length: int = 256, batch_rows: int = 8):
        self.model, self.tok, self.corpus = model, tok, corpus
        self.prompts = list(prompts) if prompts is not None else health_prompts()
        if not self.prompts:
            raise KeditError("health needs at least one unrelated prompt")
        self.rows = [r for r in pack_rows(tok, corpus, max_length, tokens) if len(r) >= 2]
        if not self.rows:
            raise KeditError(f"health corpus {corpus.path} yields no row of 2 or more tokens")
        self.tokens, self.max_length, self.batch_rows = tokens, max_length, batch_rows
        self.scorer = Scorer(model, tok)

    @torch.no_grad()
    def measure(self) -> HealthState:
        """Perplexity rows and prompt distributions of the model as it is now."""
        dev = next(self.model.parameters()).device
        out = []
        for s in range(0, len(self.rows), self.batch_rows):
            rows = self.rows[s:s + self.batch_rows]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id(self.tok), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # right padding: positions of real tokens start at 0
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()  # [B, T, V]
            logp = logits[:, :-1].log_softmax(-1)
            nll = -logp.gather(-1, ids[:, 1:, None].to(dev))[..., 0] * mask[:, 1:].to(dev)  # [B, T-1]
            out += [(float(nll[i].sum()), int(mask[i, 1:].sum())) for i in range(len(rows))]
        _, dists = self.scorer.score([(p, None) for p in self.prompts])
        return HealthState(np.array(out, dtype=float), torch.stack([dists[i] for i in range(len(self.prompts))]))

    def compare(self, before: HealthState, after: HealthState, seed: int = 0,
                n_boot: int = 1000) -> dict[str, M.Aggregate]:
        """Health metrics of ``after`` relative to ``before``: perplexity (CI over rows), agreement, KL."""
        lo, hi = M.bootstrap_ci(after.row_nll, stat=lambda a: math.exp(a[:, 0].sum() / a[:, 1].sum()),
                                n_boot=n_boot, seed=seed)
        agree = (before.logp.argmax(-1) == after.logp.argmax(-1)).float().tolist()
        kl = [M.kl_divergence(b, a) for b, a in zip(before.logp, after.logp, strict=True)]
        return {"health_perplexity": M.Aggregate(after.perplexity, lo, hi, len(after.row_nll)),
                "health_top1_agreement": M.aggregate(agree, seed=seed, n_boot=n_boot),
                "health_kl": M.aggregate(kl, seed=seed, n_boot=n_boot)}

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the report: corpus, slice size and prompt set."""
        return {"corpus": str(self.corpus.path), "corpus_identity": self.corpus.identity,
                "tokens": sum(len(r) for r in self.rows), "rows": len(self.rows), "max_length": self.max_length,
                "n_prompts": len(self.prompts)}
