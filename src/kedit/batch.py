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
    All on CPU: consumers move what they need to the device of the module that reads it.
    """

    def __init__(self, tok, requests: list[EditRequest], templates: list[str], chunk: int):
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
        self.chunks = []
        for lo in range(0, self.n, chunk):
            hi = min(self.n, lo + chunk)
            rows = list(range(lo * self.T, hi * self.T))
            tf = teacher_forced([seqs[s] for s in rows], [self.targets[req_of[s]] for s in rows], pad)
            kl_ids, kl_mask = pad_right([kl[i].ids for i in range(lo, hi)], pad)
            self.chunks.append(AnchorProblem(
                rewrite=tf, rewrite_decisive=self.key_decisive[rows], rewrite_request=self.key_request[rows] - lo,
                kl_ids=kl_ids, kl_mask=kl_mask, kl_decisive=torch.tensor([kl[i].decisive for i in range(lo, hi)]),
                kl_last=kl_mask.sum(1) - 1, bare_rows=torch.arange(hi - lo) * self.T, n=hi - lo,
            ))
