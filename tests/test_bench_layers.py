"""bench/layers.py's resume rule: a partial file saved with other settings is refused (exit 2, file untouched);
another choice of cells (--datasets, --methods) is not another setting."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


class Loaded(Exception):
    """Raised by the patched model loader: the run got past the settings check."""


@pytest.fixture()
def lb(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_layers", BENCH / "layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "require_data", lambda *paths: None)

    def load_model(*a, **k):
        raise Loaded

    monkeypatch.setattr(mod, "load_model", load_model)
    return mod


def _run(lb, monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["layers.py", *argv])
    return lb.main()


def _saved(path: Path, **settings) -> str:
    config = {"datasets": ["counterfact", "zsre-answers", "zsre-alt"], "methods": ["rome", "memit"], "window": 5,
              "proxy": 30, "test": 50, "variants": "all", "bootstrap": 200, "shortlist": 4, "edits": None,
              "samples": 10, "tokens": 100000, "steps": None, "candidates": None, **settings}
    text = json.dumps({"config": config, "choices": {"counterfact|rome": {"brute": {}}}, "tests": {}, "runs": []})
    path.write_text(text)
    return text


def test_other_settings_refused_and_file_kept(lb, monkeypatch, tmp_path, capsys):
    text = _saved(tmp_path / "ls.partial.json", proxy=20)
    assert _run(lb, monkeypatch, "--out", str(tmp_path / "ls.json")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--proxy 20 (saved) vs 30" in err
    assert (tmp_path / "ls.partial.json").read_text() == text


def test_another_choice_of_cells_resumes(lb, monkeypatch, tmp_path):
    _saved(tmp_path / "ls.partial.json")
    with pytest.raises(Loaded):  # past the check, on to the model
        _run(lb, monkeypatch, "--datasets", "counterfact", "--methods", "memit", "--out", str(tmp_path / "ls.json"))
