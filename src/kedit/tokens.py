"""Every tokenisation rule in one place: decisive token, target ids, teacher-forced batches.

Rules (METHODS §1):
- The decisive token is the last token whose character span overlaps the subject inside the
  formatted text; found with the fast tokenizer's offsets, so BPE leading spaces, SentencePiece
  markers and BOS tokens need no special cases.
- Target ids are the tokens the model would emit after the prompt: the prompt and the
  continuation ``" " + target`` are tokenised together and the prompt's tokens are cut off, so
  tokenizers that merge the space or mark word starts give the right ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.errors import BadRequest


@dataclass
class TokenLimits:
    """Caps on an edit request's token counts, checked before any optimisation (``check_limits``).

    Long prompts and targets cost time and memory in every anchor step and rarely take (a
    591-token target ran 384 s at ~12 GB without taking). Raise them with e.g.
    ``kedit.tokens.LIMITS.max_target_tokens = 64``. Evaluation is not capped: zsRE's
    neighbourhood answers run to 126 tokens and are only scored.
    """

    max_prompt_tokens: int = 256
    max_target_tokens: int = 32


LIMITS = TokenLimits()


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


@dataclass
class Encoded:
    """A prompt's token ids with the subject's span in them."""

    ids: list[int]
    decisive: int  # index of the subject's last token in ``ids``
    first: int     # index of the subject's first token (causal tracing corrupts first..decisive)


def encode_with_subject(tok, template: str, subject: str) -> Encoded:
    """Tokenise ``template`` with ``subject`` written into its ``{}``; locate the subject's first and last tokens.

    The first token is the first one overlapping the subject (a BPE token carrying its leading space counts).
    """
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2:]
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        hits = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
        if not hits:
            raise BadRequest(f"subject {subject!r} maps to no token in {text!r}")
        return Encoded(list(enc["input_ids"]), hits[-1], hits[0])
    ids = tok(text)["input_ids"]
    prefix = tok(text[:end])["input_ids"]
    if ids[: len(prefix)] != prefix:
        raise BadRequest(f"subject {subject!r} ends inside a token of {text!r}; cannot locate its last token")
    # the text before the subject, its trailing space left to the subject's first token
    first = min(len(tok(text[:start].rstrip())["input_ids"]), len(prefix) - 1)
    return Encoded(list(ids), len(prefix) - 1, first)


def continuation(prompt_text: str, target: str) -> str:
    """The text appended to a prompt to express ``target``: ``" " + target`` unless a space is there."""
    return target if prompt_text[-1:].isspace() else " " + target


def target_ids(tok, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as emitted after ``prompt_text`` (never empty; raises BadRequest)."""
    cont = continuation(prompt_text, target)
    prompt_ids = tok(prompt_text)["input_ids"]
    full_ids = tok(prompt_text + cont)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        ids = full_ids[len(prompt_ids):]
    else:  # the tokenizer merged across the boundary: fall back to the continuation alone
        ids = tok(cont, add_special_tokens=False)["input_ids"]
    eos = getattr(tok, "eos_token_id", None)
    if ids and ids[-1] == eos and not target.endswith(tok.eos_token or "\0"):
        ids = ids[:-1]  # some tokenizers append EOS to every encoding
    if not ids:
        raise BadRequest(f"target {target!r} tokenises to nothing after {prompt_text!r}")
    return ids


def check_limits(tok, requests) -> None:
    """Raise BadRequest for the first request whose filled prompt or target exceeds ``LIMITS``."""
    for r in requests:
        where = f" (request {r.case_id})" if r.case_id is not None else ""
        n_prompt = len(tok(r.filled)["input_ids"])
        n_target = len(target_ids(tok, r.filled, r.target_new))
        for what, n, cap, text in (("prompt", n_prompt, LIMITS.max_prompt_tokens, r.filled),
                                   ("target", n_target, LIMITS.max_target_tokens, r.target_new)):
            if n > cap:
                raise BadRequest(f"{what} {_short(text)} is {n} tokens, over the limit of {cap}{where}; "
                                 f"raise kedit.tokens.LIMITS.max_{what}_tokens to allow it")


@dataclass
class TeacherForced:
    """A right-padded batch of ``prompt + target[:-1]`` sequences for teacher-forced scoring.

    ``rows[m]``, ``positions[m]`` index the logits that predict ``labels[m]``; ``seq[m]`` says
    which sequence each scored token belongs to.
    """

    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor            # [m]
    positions: torch.Tensor       # [m]
    labels: torch.Tensor          # [m]
    seq: torch.Tensor             # [m]
    prompt_lens: list[int]
    n: int

    def to(self, device) -> TeacherForced:
        for name in ("input_ids", "attention_mask", "rows", "positions", "labels", "seq"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: ``(input_ids [B, T], attention_mask [B, T])``, real tokens at the end of each row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def teacher_forced(prompt_ids: list[list[int]], target_token_ids: list[list[int]], pad_id: int) -> TeacherForced:
    """Batch ``prompt + target[:-1]`` per pair, recording where each target token is predicted."""
    seqs, rows, positions, labels, seq = [], [], [], [], []
    for i, (p, t) in enumerate(zip(prompt_ids, target_token_ids, strict=True)):
        seqs.append(list(p) + list(t[:-1]))
        for j, label in enumerate(t):
            rows.append(i)
            positions.append(len(p) - 1 + j)
            labels.append(label)
            seq.append(i)
    ids, mask = pad_right(seqs, pad_id)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return TeacherForced(ids, mask, as_long(rows), as_long(positions), as_long(labels), as_long(seq),
                         [len(p) for p in prompt_ids], len(seqs))


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
