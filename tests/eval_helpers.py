"""Test helpers for the eval suite: a word-level tokenizer, a bigram LM whose logits we set, a fake editor."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

WORDS = ("<eos> <unk> Angola is located in Antarctica Africa belongs to Ghana the Paris France capital of "
         "Berlin Germany Tokyo Japan a b c").split()


def word_tok():
    """Whitespace word-level fast tokenizer: every word is one token, ' ' + word continues a prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


class BigramLM(nn.Module):
    """logits[t] = table[input_ids[t]]: the next-token distribution depends only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)  # [V, V]
        self.kedit_name = "bigram"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **_):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)

    def get_output_embeddings(self):
        return None


def base_table(v: int = len(WORDS)) -> torch.Tensor:
    """Distinct, tie-free logits per row (so top-k sets are unambiguous)."""
    return -0.01 * torch.arange(v, dtype=torch.float32).repeat(v, 1)


class FakeEdit:
    def __init__(self, param: torch.Tensor, log: list):
        self.param, self.orig, self.log = param, param.detach().clone(), log

    def undo(self) -> None:
        with torch.no_grad():
            self.param.copy_(self.orig)
        self.log.append("undo")


class FakeEditor:
    """Raises logit ``(row, col) += amount`` per apply call; records calls; undo restores exactly."""

    def __init__(self, model: BigramLM, row: int, col: int, amount: float = 5.0):
        self.model, self.row, self.col, self.amount = model, row, col, amount
        self.log: list = []

    def apply(self, requests):
        edit = FakeEdit(self.model.table, self.log)
        with torch.no_grad():
            self.model.table[self.row, self.col] += self.amount
        self.log.append(("apply", len(requests)))
        return edit

    def apply_each(self, requests):
        for r in requests:
            yield self.apply([r])

    def config(self) -> dict:
        return {"method": "fake", "row": self.row, "col": self.col}

    def reset(self) -> None:
        self.log.append("reset")
