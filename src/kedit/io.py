"""Files: atomic writes (never a half-written cache, patch or result) and the JSON / JSONL record reader.

``atomic_write`` writes to a temp file in the target's directory, fsyncs it and renames it over the
target; on any failure (KeyboardInterrupt included) the temp file is removed and the target is untouched.
The result has the permissions a plain ``open(path, "w")`` would give it (an existing target's mode, else
0o666 less the umask), not the owner-only 0o600 of the temp file.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kedit.errors import KeditError


def _fresh_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets: less the process umask."""
    umask = os.umask(0o022)  # read the umask: the only portable way is to set it and put it back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def plain_mode(path: Path, directory: bool = False) -> int:
    """The mode ``open(path, "w")`` (or ``mkdir``) would leave: an existing ``path``'s, else ``_fresh_mode``.
    Temp files and directories are owner-only; set this before renaming one into place so that a cache,
    export or result is as readable as any other file the user writes."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return _fresh_mode(directory)


def share_dir(tmp: Path, target: Path) -> None:
    """Before renaming the temp directory ``tmp`` to ``target``: give it ``target``'s mode (``plain_mode``) and
    everything under it the mode a fresh write gives, undoing the owner-only modes of mkdtemp and of writers
    (safetensors writes 0o600)."""
    file_mode, dir_mode = _fresh_mode(), _fresh_mode(directory=True)
    for root, _, files in os.walk(tmp):
        for name in files:
            os.chmod(Path(root) / name, file_mode)
        if Path(root) != tmp:
            os.chmod(root, dir_mode)
    os.chmod(tmp, plain_mode(target, directory=True))


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
        os.chmod(tmp, plain_mode(path))  # last: a read-only target's mode must not stop the fsync above
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


def read_text(path: str | os.PathLike, error: type[Exception] = KeditError) -> str:
    """A file's UTF-8 text; raises ``error`` naming the file (and the line and byte of a non-UTF-8 byte)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = KeditError,
               encoding_error: type[Exception] | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of a JSONL file, streamed.

    Invalid JSON raises ``error``, a non-UTF-8 line ``encoding_error`` (default ``error``); both name file and line.
    """
    try:
        f = open(path, "rb")  # decoded per line, so a bad byte is reported with its line
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise (encoding_error or error)(
                    f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if line.strip():
                yield lineno, _loads(line, error, f"{path}:{lineno}")


def read_records(path: str | os.PathLike, error: type[Exception] = KeditError,
                 encoding_error: type[Exception] | None = None) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON list or a JSONL file (blank lines skipped).

    ``where`` names the record for messages: ``"PATH record I"`` (JSON list) or ``"PATH:LINE"`` (JSONL).
    Invalid JSON raises ``error``; non-UTF-8 bytes raise ``encoding_error`` (default ``error``), naming the line.
    """
    text = read_text(path, encoding_error or error)
    if text.lstrip().startswith("["):
        data = _loads(text, error, str(path))
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((f"{path}:{lineno}", _loads(line, error, f"{path}:{lineno}")))
    return out


def _loads(text: str, error: type[Exception], where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e})") from None
