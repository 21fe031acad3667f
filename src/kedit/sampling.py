"""Seeded top-k samples of one prefix (context templates, the self-sampled corpus); see kedit.generation.

Seeded with private ``torch.Generator`` objects: the global RNG is never touched, and the same model,
prefix and seed always give the same text on the same machine.
"""

from __future__ import annotations

from kedit.generation import generate


def sample(model, tok, prefix: str, n: int, max_new_tokens: int, seed: int, top_k: int = 5) -> list[str]:
    """``n`` continuations of ``prefix`` (``top_k`` sampling: 0 = whole vocabulary, 1 = greedy), each prefixed by it.

    Text stops at EOS; never runs past the model's context length (``max_new_tokens`` is cut to what fits).
    """
    return [prefix + text for text in generate(model, tok, [prefix] * n, max_new_tokens, top_k=top_k, seed=seed)]
