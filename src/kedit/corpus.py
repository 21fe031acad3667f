"""Background text for second-moment statistics (METHODS §3): sources, token-budget packing, batches.

Sources: a text file (one continuous document), a directory of text files (sorted; one document
per file), a JSONL file (one document per record, field ``text`` by default) and, when the user
gives none, text sampled from the model itself (seeded, cached once per model). A corpus is
identified by a hash of its content, never by its path, so an edited file invalidates caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kedit.errors import DatasetFormatError, InputFileError, KeditError, warn_cache_unwritable
from kedit.io import iter_jsonl, write_text

# Prefixes the self-sampled corpus starts from (ROME/MEMIT sample their templates the same way).
PREFIXES = ("The", "In", "A", "It", "This", "When", "There", "One", "After", "Many", "He", "She", "We", "I",
            "Because", "Therefore", "However", "According to", "During", "Although")
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")
_PIECE_CHARS = 1 << 16  # a text file is tokenised in line-aligned pieces so huge files stream


@dataclass(frozen=True)
class Corpus:
    """A background text source: ``kind`` in {"text", "dir", "jsonl"}; ``identity`` = content hash."""

    path: Path
    kind: str
    identity: str
    text_field: str = "text"
    # in-memory documents: a sampled corpus whose cache file could not be written (read-only KEDIT_HOME)
    docs: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def documents(self) -> Iterator[str]:
        """Documents in a fixed order; a text file yields line-aligned pieces of one document."""
        if self.docs is not None:
            yield from self.docs
        elif self.kind == "jsonl":
            yield from _jsonl_documents(self.path, self.text_field)
        elif self.kind == "dir":
            for f in _dir_files(self.path):
                yield f.read_text(encoding="utf-8", errors="replace")
        else:
            yield from _text_pieces(self.path)

    @property
    def continuous(self) -> bool:
        """True when ``documents()`` yields pieces of one document (rows then run across pieces)."""
        return self.kind == "text"


def open_corpus(source: str | os.PathLike, text_field: str = "text") -> Corpus:
    """A Corpus for a text file, a directory of text files or a ``.jsonl`` file; raises KeditError."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = _dir_files(path)
        if not files:
            raise KeditError(f"corpus directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        h = hashlib.sha256(b"dir\0")
        for f in files:  # names and bytes in order: renaming or reordering files changes the identity
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(f, h)
        return Corpus(path, "dir", h.hexdigest())
    if not path.is_file():
        raise KeditError(f"corpus {path} does not exist (give a text file, a directory of text files or a .jsonl file)")
    kind = "jsonl" if path.suffix in (".jsonl", ".ndjson") else "text"
    h = hashlib.sha256(f"{kind}\0{text_field if kind == 'jsonl' else ''}\0".encode())
    _hash_file(path, h)
    return Corpus(path, kind, h.hexdigest(), text_field)


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _dir_files(path: Path) -> list[Path]:
    return sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                  key=lambda p: p.relative_to(path).as_posix())


def _text_pieces(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        piece: list[str] = []
        size = 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= _PIECE_CHARS:
                yield "".join(piece)
                piece, size = [], 0
        if piece:
            yield "".join(piece)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for lineno, record in iter_jsonl(path, DatasetFormatError, InputFileError):
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DatasetFormatError(f"{path}:{lineno}: record has no string field {field!r}")
        yield text


def sampled_corpus(model, tok, tokens: int, seed: int = 0, progress: bool = True, per_prefix: int = 32,
                   max_new_tokens: int = 128, top_k: int = 50) -> Corpus:
    """Text sampled from ``model`` (top-k, seeded) until ``tokens`` tokens; cached as JSONL per model.

    Rows go ``per_prefix`` at a time to each of PREFIXES in turn; row ``r`` has its own seed
    (kedit.generation), so the text does not depend on batching. All rows needed run as one batched call
    (a second one tops up if rows stop early at EOS). Cached under
    ``kedit_home()/corpus/<fingerprint>-s<seed>-n<tokens>.jsonl``.
    """
    from kedit.generation import generate_ids, row_seed
    from kedit.models import kedit_home, model_fingerprint
    from kedit.tokens import pad_id

    path = kedit_home() / "corpus" / f"{model_fingerprint(model)}-s{seed}-n{tokens}.jsonl"
    if not path.is_file():
        prefix_ids = [tok(p)["input_ids"] for p in PREFIXES]
        which = lambda r: (r // per_prefix) % len(PREFIXES)  # noqa: E731  (prefix index of row r)
        docs: list[str] = []
        n = 0
        while n < tokens:  # every sample holds at least its prefix, so this ends
            # rows for the rest, with spare for rows that stop early at EOS (SmolLM2's rows fill ~90% of
            # max_new_tokens): spare rows in the same batch cost only their own compute, while a top-up round
            # costs another max_new_tokens sequential steps whatever its size, so a top-up samples generously
            per_row = n / len(docs) if docs else max_new_tokens  # tokens per row so far
            spare, least = (2.0, 8) if docs else (1.2, 1)
            rows = range(len(docs), len(docs) + max(least, math.ceil(spare * (tokens - n) / max(per_row, 1))))
            new = generate_ids(model, [prefix_ids[which(r)] for r in rows], max_new_tokens, top_k=top_k,
                               seeds=[row_seed(seed, r) for r in rows], eos_token_id=tok.eos_token_id,
                               pad_token_id=pad_id(tok), progress=progress, desc="sampling corpus")
            for r, ids in zip(rows, new, strict=True):
                text = PREFIXES[which(r)] + tok.decode(ids, skip_special_tokens=True)
                docs.append(text)
                n += len(tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(json.dumps({"text": t}) + "\n" for t in docs)
        try:
            write_text(path, text)
        except OSError as e:  # read-only KEDIT_HOME: the sampled text is still good for this run
            warn_cache_unwritable("sampled corpus", path, e)
            h = hashlib.sha256(b"jsonl\0text\0" + text.encode("utf-8"))  # = open_corpus(path) of that file
            return Corpus(path, "jsonl", h.hexdigest(), "text", docs=tuple(docs))
    return open_corpus(path)


def bos_id(tok) -> int | None:
    """The BOS id if ``tok`` prepends one by default (then every row starts with it), else None."""
    bos = getattr(tok, "bos_token_id", None)
    return bos if bos is not None and tok("a")["input_ids"][:1] == [bos] else None


def pack_rows(tok, corpus: Corpus, max_length: int, budget: int) -> Iterator[list[int]]:
    """Token rows of at most ``max_length`` ids, ``budget`` ids in total (the last row is cut).

    A document starts a new row; a long one is split. Raises KeditError if the corpus has no tokens.
    """
    bos = bos_id(tok)
    prefix = [bos] if bos is not None else []
    width = max_length - len(prefix)  # content ids per row
    left, buf = budget, []

    def take() -> list[int]:  # the next row, cut to what is left of the budget
        nonlocal buf, left
        row = (prefix + buf[:width])[:left]
        buf = buf[width:]
        left -= len(row)
        return row

    for doc in corpus.documents():
        if doc.strip():  # whitespace-only documents are empty: a file of blank lines is an empty corpus
            buf.extend(tok(doc, add_special_tokens=False)["input_ids"])
        while len(buf) >= width and left > 0:
            yield take()
        if buf and left > 0 and not corpus.continuous:  # a document's tail never shares a row
            yield take()
        if left <= 0:
            return
    if buf and left > 0:
        yield take()
    if left == budget:
        raise KeditError(f"corpus {corpus.path} yields no tokens (is it empty, or is the text field wrong?)")


def batches(rows: Iterable[list[int]], batch_tokens: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids [B, T], attention_mask [B, T])`` with ``B * T <= batch_tokens``.

    A row longer than ``batch_tokens`` goes alone in its batch.
    """
    from kedit.tokens import pad_right

    group: list[list[int]] = []
    width = 0
    for row in rows:
        if group and (len(group) + 1) * max(width, len(row)) > batch_tokens:
            yield pad_right(group, pad_id)
            group, width = [], 0
        group.append(row)
        width = max(width, len(row))
    if group:
        yield pad_right(group, pad_id)
