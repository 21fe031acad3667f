"""Token batches of edit requests: what the editor reads keys from and optimises anchors on.

Built once per batch of requests from the tokenizer and the context templates; pure CPU tensors.
"""

from __future__ import annotations

import torch

from kedit.optimize import AnchorProblem
from kedit.requests import EditRequest
from kedit.tokens import encode_with_subject, pad_id, pad_right, target_ids, teacher_forced

KL_PROMPT = "{} is a"  # METHODS §4: protects the subject's essence


class TokenBatch:
    """Token-level view of a batch of requests: key-reading batch and anchor-optimisation chunks.

    ``key_ids``/``key_mask`` [n*T, width]: every context template filled with every request's prompt
    (row ``i*T`` is request i's bare prompt), ``key_decisive`` the subject's decisive token per row,
    ``key_request`` the request of each row; ``chunks``: AnchorProblems of at most ``chunk`` requests.
    ``order="suffix"`` composes the chunks of requests sorted by suffix length (prompt tail after the
    subject + target tokens, shared by a request's template rows), so that a chunk's rows pad little;
    ``"request"`` keeps request order. ``optimize_anchors`` returns the anchors in request order either way.
    All on CPU: consumers move what they need to the device of the module that reads it.
    """

    def __init__(self, tok, requests: list[EditRequest], templates: list[str], chunk: int, order: str = "suffix"):
        self.n, self.T = len(requests), len(templates)
        self.requests = tuple(requests)
        pad = pad_id(tok)
        seqs, decisive, req_of = [], [], []
        self.targets = []
        kl = []
        for i, r in enumerate(requests):
            self.targets.append(target_ids(tok, r.filled, r.target_new))
            for t in templates:
                enc = encode_with_subject(tok, t.replace("{}", r.prompt, 1), r.subject)
                seqs.append(enc.ids)
                decisive.append(enc.decisive)
                req_of.append(i)
            kl.append(encode_with_subject(tok, KL_PROMPT, r.subject))
        # key batch: every template sequence, prompt only; row i*T is request i's bare prompt
        self.key_ids, self.key_mask = pad_right(seqs, pad)
        self.key_decisive = torch.tensor(decisive)
        self.key_request = torch.tensor(req_of)
        self.bare_rows = torch.arange(self.n) * self.T
        if order not in ("suffix", "request"):
            raise ValueError(f"TokenBatch order must be 'suffix' or 'request', got {order!r}")
        # suffix width of a request: the columns replayed above the anchor layer for its longest row
        suffix = [max(len(seqs[s]) - decisive[s] for s in range(i * self.T, (i + 1) * self.T)) + len(self.targets[i])
                  for i in range(self.n)]
        ranked = sorted(range(self.n), key=suffix.__getitem__) if order == "suffix" else list(range(self.n))
        self.chunks = []
        for lo in range(0, self.n, chunk):
            reqs = ranked[lo:lo + chunk]
            rows = [i * self.T + t for i in reqs for t in range(self.T)]
            tf = teacher_forced([seqs[s] for s in rows], [self.targets[req_of[s]] for s in rows], pad)
            kl_ids, kl_mask = pad_right([kl[i].ids for i in reqs], pad)
            self.chunks.append(AnchorProblem(
                rewrite=tf, rewrite_decisive=self.key_decisive[rows],
                rewrite_request=torch.arange(len(reqs)).repeat_interleave(self.T),
                kl_ids=kl_ids, kl_mask=kl_mask, kl_decisive=torch.tensor([kl[i].decisive for i in reqs]),
                kl_last=kl_mask.sum(1) - 1, bare_rows=torch.arange(len(reqs)) * self.T, n=len(reqs),
                requests=torch.tensor(reqs),
            ))
