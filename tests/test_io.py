"""kedit.io: atomic writes leave the target whole and no temp file behind; one JSON / JSONL reader."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from kedit.errors import BadRequest, CacheNotWritable, DatasetFormatError, InputFileError, KeditError
from kedit.io import (
    atomic_write,
    iter_jsonl,
    plain_mode,
    read_records,
    share_dir,
    write_bytes,
    write_json,
    write_text,
)


def test_write_helpers_replace_the_target(tmp_path):
    p = tmp_path / "sub" / "a.json"
    write_json(p, {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    write_text(p, "second")
    assert p.read_text() == "second"
    write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and [f.name for f in p.parent.iterdir()] == ["a.json"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, exc):
    p = tmp_path / "stats.bin"
    p.write_text("old")

    def writer(tmp):
        tmp.write_text("half")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(p, writer)
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["stats.bin"]


def test_unserialisable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_read_records_json_list_and_jsonl(tmp_path):
    lst = tmp_path / "a.json"
    lst.write_text('[{"a": 1}, {"a": 2}]')
    assert read_records(lst) == [(f"{lst} record 0", {"a": 1}), (f"{lst} record 1", {"a": 2})]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_records(jl) == [(f"{jl}:1", {"a": 1}), (f"{jl}:3", {"a": 2})]
    assert list(iter_jsonl(jl)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_reader_errors_name_file_and_line(tmp_path):
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DatasetFormatError, match=r"b\.jsonl:2: invalid JSON"):
        read_records(jl, DatasetFormatError)
    with pytest.raises(BadRequest, match=r"b\.jsonl:2: invalid JSON"):
        list(iter_jsonl(jl, BadRequest))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    for read in (read_records, lambda p, e, enc=None: list(iter_jsonl(p, e, enc))):
        with pytest.raises(DatasetFormatError, match=r"latin1\.jsonl:1: not UTF-8 text \(byte 13"):
            read(bad, DatasetFormatError)
        with pytest.raises(BadRequest, match=r"latin1\.jsonl:1: not UTF-8"):  # its own error type
            read(bad, DatasetFormatError, BadRequest)
    with pytest.raises(KeditError, match="cannot read"):
        read_records(tmp_path / "missing.jsonl")


def test_request_and_dataset_readers_use_it(tmp_path):
    from kedit.eval.datasets import _read_records
    from kedit.requests import read_requests

    bad = tmp_path / "r.jsonl"
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(InputFileError, match="r.jsonl:1: not UTF-8"):
        read_requests(bad)
    with pytest.raises(DatasetFormatError, match="not UTF-8"):
        _read_records(bad)


def test_templates_cache_written_atomically(tiny_llama, tiny_tok, monkeypatch, tmp_path):
    """A failing write leaves no temp file in the templates cache (it did before kedit.io)."""
    import kedit.io

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))  # an empty cache of its own: other tests fill the shared one
    from kedit.models import kedit_home
    from kedit.templates import context_templates

    calls = []

    def boom(path, writer):  # the writer runs, then the disk "fills"
        calls.append(path)
        return real(path, lambda tmp: (writer(tmp), (_ for _ in ()).throw(OSError("disk full"))))

    real = kedit.io.atomic_write
    monkeypatch.setattr(kedit.io, "atomic_write", boom)
    with pytest.warns(CacheNotWritable):  # the templates are kept in memory, with one warning
        context_templates(tiny_llama, tiny_tok, seed=5)
    folder = kedit_home() / "templates"
    assert calls and (not folder.exists() or list(folder.iterdir()) == [])


def test_written_files_get_the_mode_a_plain_write_would(tmp_path):
    """Temp files are owner-only (0o600); what lands must not be, or a shared cache or result is unreadable."""
    old = os.umask(0o022)
    try:
        p = write_text(tmp_path / "new.json", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(write_text(tmp_path / "private.json", "x").stat().st_mode) == 0o600
        p.chmod(0o640)  # an existing file keeps its mode, as open(path, "w") would
        assert stat.S_IMODE(write_bytes(p, b"y").stat().st_mode) == 0o640
        p.chmod(0o444)  # read-only too: the mode is set after the temp file's fsync, so that still works
        assert stat.S_IMODE(write_bytes(p, b"z").stat().st_mode) == 0o444 and p.read_bytes() == b"z"
        os.umask(0o022)
        assert plain_mode(tmp_path / "d", directory=True) == 0o755
    finally:
        os.umask(old)


def test_share_dir_opens_a_temp_tree_as_mkdir_and_plain_writes_would(tmp_path):
    old = os.umask(0o022)
    try:
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0o700, as the export and the model cache start
        (tmp / "sub").mkdir(mode=0o700)
        for f in (tmp / "model.safetensors", tmp / "sub" / "x.json"):
            f.write_text("x")
            f.chmod(0o600)  # as safetensors leaves its files
        share_dir(tmp, tmp_path / "absent")
        modes = {p.relative_to(tmp).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp.rglob("*")}
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o755
        assert modes == {"model.safetensors": 0o644, "sub": 0o755, "sub/x.json": 0o644}
        (tmp_path / "existing").mkdir(mode=0o750)
        share_dir(tmp, tmp_path / "existing")  # replacing a directory keeps that directory's mode
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o750
    finally:
        os.umask(old)
