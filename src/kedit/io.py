"""Files: atomic writes (never a half-written cache, patch or result) and the JSON / JSONL record reader.

``atomic_write`` writes to a temp file in the target's directory, fsyncs it and renames it over the
target; on any failure (KeyboardInterrupt included) the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kedit.errors import KeditError


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp)`` on a temp path beside ``path``, fsync it, then rename it to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, **dumps_kwargs)`` to ``path`` atomically (serialised before the file is opened)."""
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def read_text(path: str | os.PathLike, error: type[KeditError] = KeditError) -> str:
    """A file's UTF-8 text; raises ``error`` naming the file if it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def iter_jsonl(path: str | os.PathLike, error: type[KeditError] = KeditError) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of a JSONL file, streamed; errors name file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, _loads(line, error, f"{path}:{lineno}")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def read_records(path: str | os.PathLike, error: type[KeditError] = KeditError) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON list or a JSONL file (blank lines skipped).

    ``where`` names the record for messages: ``"PATH record I"`` (JSON list) or ``"PATH:LINE"`` (JSONL).
    Invalid JSON, a JSON document that is not a list, or non-UTF-8 bytes raise ``error`` naming the file.
    """
    text = read_text(path, error)
    if text.lstrip().startswith("["):
        data = _loads(text, error, str(path))
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((f"{path}:{lineno}", _loads(line, error, f"{path}:{lineno}")))
    return out


def _loads(text: str, error: type[KeditError], where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e})") from None
