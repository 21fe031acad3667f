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


def _cell(window: int) -> dict:
    cands = list(range(6))
    brute_starts = cands[:len(cands) - window + 1]
    lga = {"layers": [3], "candidates": cands, "scores": [10.0, 1.0, 2.0, 3.0, 2.5, 0.5],
           "details": {"variant": "w_out/sum", "window": window, "kept": [False, True, True, True, True, True],
                       "stability": {"fraction": 0.6}}}
    brute = {"layers": [0], "candidates": brute_starts, "scores": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4][:len(brute_starts)],
             "details": {"stability": {"fraction": 0.9}}}
    return {"brute": brute, "lga": lga, "causal": {"layers": [1], "details": {}}}


def test_fence_rows_compare_fenced_and_unfenced_choices(lb):
    rows = lb.fence_rows({"choices": {"cf|rome": _cell(1)}})
    # fenced: layer 0 (score 10) is an outlier, argmax of the rest is 3; unfenced: 0, the golden layer
    assert rows == [["cf", "rome", "lga", 3, 0.6, 0, 0.9, 0.9]]
    rows = lb.fence_rows({"choices": {"cf|memit": _cell(2)}})
    assert rows[0][5] == 0 and rows[0][6] == 0.9  # window sums: 0-1 (11.0) beats every other window


@pytest.mark.parametrize("window", [1, 2])
def test_plot_cell_draws_a_figure(lb, tmp_path, window):
    path = tmp_path / "cell.png"
    lb.plot_cell("cf|rome", _cell(window), {"3": {"mean": 0.7}, "0": {"mean": 0.9}}, window, path)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
