"""Quick looks at a model: probability of a target after a prompt, greedy continuations.

Used by ``kedit edit``/``apply``/``demo`` to show before and after; the evaluation harness has the
full metric suite (kedit.eval).
"""

from __future__ import annotations

import torch

from kedit.arch import input_device
from kedit.generation import generate
from kedit.tokens import pad_id, target_ids, teacher_forced


@torch.no_grad()
def target_probs(model, tok, prompts: list[str], targets: list[str]) -> list[float]:
    """P(target | prompt) for each pair: the product of the teacher-forced token probabilities."""
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    tgt = [target_ids(tok, p, t) for p, t in zip(prompts, targets, strict=True)]
    tf = teacher_forced(prompt_ids, tgt, pad_id(tok))
    device = input_device(model)  # the embedding's device (dispatch-aware)
    logits = model(input_ids=tf.input_ids.to(device), attention_mask=tf.attention_mask.to(device)).logits
    labels = tf.labels[:, None].to(logits.device)  # the LM head's device
    logp = torch.log_softmax(logits[tf.rows, tf.positions].float(), -1).gather(1, labels)[:, 0]
    total = torch.zeros(len(prompts)).index_add(0, tf.seq, logp.cpu())
    return total.exp().tolist()


def greedy(model, tok, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations (text after the prompt), batched; see kedit.generation."""
    return generate(model, tok, prompts, max_new_tokens, top_k=1)


def did_not_take(before: list[float], after: list[float]) -> list[int]:
    """Indices of requests whose P(target_new) did not rise with the edit (``after <= before``).

    The CLI warns about these: an edit that ran without error but changed nothing the user asked for.
    """
    return [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if not a > b]


def starts_with_target(continuation: str, target: str) -> bool:
    """Whether a continuation begins with ``target`` (leading whitespace and case ignored)."""
    return continuation.strip().lower().startswith(target.strip().lower())
