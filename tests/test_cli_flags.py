"""The CLI in-process: one layer grammar, solver hyperparameters, help texts, the error boundary, cache, progress."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest
import torch

from kedit.cli import build_parser, main
from kedit.commands._common import hparam, parse_layers, parse_scalar, solver_hparams
from kedit.errors import UsageError
from kedit.solvers import SOLVERS, make_solver

FACT = ["--prompt", "The capital of {} is", "--subject", "France", "--target", "Berlin"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, cmd: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"kedit {cmd}: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# -- grammar and parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, layers", [("4-8", [4, 5, 6, 7, 8]), ("4,5,6", [4, 5, 6]), ("4-6,9", [4, 5, 6, 9]),
                                          (" 3 , 1-2 ", [1, 2, 3]), ("7", [7]), ("5,5,4-5", [4, 5]), ("auto", "auto")])
def test_layer_grammar(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize("text, message", [("8-4", "reversed"), ("x", "not a layer index"), ("-1", "not a layer"),
                                           ("4,,5", "not a layer"), ("", "not a layer"), ("4-", "not a layer")])
def test_layer_grammar_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_layers(text)
    with pytest.raises(argparse.ArgumentTypeError, match="'auto' is not accepted"):
        parse_layers("auto", allow_auto=False)


def test_every_command_uses_the_one_layer_grammar(capsys):
    parser, _ = build_parser()
    assert parser.parse_args(["edit", "--layers", "4-6,9"]).layers == [4, 5, 6, 9]
    assert parser.parse_args(["eval", "--dataset", "x:y", "--layers", "auto"]).layers == "auto"
    assert parser.parse_args(["stats", "--layers", "1-3"]).layers == [1, 2, 3]
    assert parser.parse_args(["layers", "--dataset", "x:y", "--candidates", "2-4,7"]).candidates == [2, 3, 4, 7]
    rc, _, err = run_cli(capsys, "stats", "--layers", "auto")
    assert_one_line_error(rc, err, "stats", "--layers", "'auto' is not accepted")


def test_hparam_values_parse_as_their_type():
    assert [parse_scalar(v) for v in ("3", "2.5", "1e4", "true", "False", "null", "[1, 2]", '{"a": 1}', "memit")] \
        == [3, 2.5, 1e4, True, False, None, [1, 2], {"a": 1}, "memit"]
    assert hparam("base.lam=5000") == ("base.lam", 5000)
    for bad in ("lam", "=3", "a.b.c=1", "1x=2"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
            hparam(bad)


def _hp(*argv):
    parser, _ = build_parser()
    return solver_hparams(parser.parse_args(["edit", *argv]))


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_lam_applies_or_is_rejected_for_every_solver(method):
    solver_cls = SOLVERS[method]
    if "lam" in solver_cls.__dataclass_fields__:
        hp = _hp("--method", method, "--lam", "7")
        assert hp == {"lam": 7.0} and make_solver(method, **hp).lam == 7.0
    elif "base" in solver_cls.__dataclass_fields__:
        hp = _hp("--method", method, "--lam", "7")
        assert hp == {"base": {"name": "memit", "lam": 7.0}} and make_solver(method, **hp).base.lam == 7.0
        hp = _hp("--method", method, "--lam", "7", "--hparam", "base=emmet", "--hparam", "base.eps=0.5")
        base = make_solver(method, **hp).base
        assert (base.name, base.lam, base.eps) == ("emmet", 7.0, 0.5)
        with pytest.raises(UsageError, match="base alphaedit.* no preservation weight"):
            _hp("--method", method, "--lam", "7", "--hparam", "base=alphaedit")
    else:
        with pytest.raises(UsageError, match=f"--lam: {method} has no preservation weight lam; its hyperparameters"):
            _hp("--method", method, "--lam", "7")


def test_hparam_reaches_every_field_and_rejects_unknown_names():
    assert make_solver("alphaedit", **_hp("--method", "alphaedit", "--hparam", "L2=3", "--hparam",
                                           "relative=false")).L2 == 3
    assert make_solver("rect", **_hp("--method", "rect", "--hparam", "keep=0.3")).keep == 0.3
    with pytest.raises(UsageError, match=r"memit has no hyperparameter 'foo'; valid: lam, sequential_cache"):
        _hp("--hparam", "foo=1")
    with pytest.raises(UsageError, match=r"base solver memit has no hyperparameter 'eps'; valid: lam"):
        _hp("--method", "prune", "--hparam", "base.eps=1")
    with pytest.raises(UsageError, match="only base.NAME may be nested"):
        _hp("--hparam", "lam.x=1")


def test_every_flag_has_help_showing_its_default():
    parser, _ = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for name, sub in subparsers.choices.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            seen += 1
            assert action.help, f"kedit {name} {action.option_strings[0]} has no help"
            text = fmt._get_help_string(action) % {"default": action.default}
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in text, f"kedit {name} {action.option_strings[0]}: {text!r}"
    assert seen > 80


def test_version_is_single_sourced(capsys):
    import tomllib
    from pathlib import Path

    import kedit
    from kedit._version import __version__

    assert kedit.__version__ == __version__
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"kedit {__version__}"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kedit._version.__version__"}


# -- the error boundary: one line, exit 2, before any expensive work ---------------------------------------------

CUDA = torch.cuda.is_available()


def _bad_inputs(tiny, tmp):
    notutf8 = tmp / "latin1.jsonl"
    notutf8.write_bytes(b'{"prompt": "Caf\xe9 {} is", "subject": "x", "target_new": "y"}\n')
    afile = tmp / "afile"
    afile.write_text("x")
    corrupt = tmp / "run"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "summary.json").write_text("{not json")
    m = ["--model", tiny]
    return [
        (["edit", *m, "--layers", "9", *FACT], "edit", "layer 9 is out of range: ", "has 4 layers (0-3)"),
        (["edit", *m, "--layers", "1-x", *FACT], "edit", "--layers", "'1-x'"),
        (["edit", *m, "--tokens", "0", *FACT], "edit", "--tokens", "must be > 0, got 0"),
        (["edit", *m, "--steps", "-3", *FACT], "edit", "--steps", "must be > 0"),
        (["edit", *m, "--lr", "0", *FACT], "edit", "--lr", "must be > 0"),
        (["edit", *m, "--lr", "nan", *FACT], "edit", "--lr"),
        (["eval", *m, "--dataset", "kedit:x.jsonl", "--n", "0"], "eval", "--n", "must be > 0"),
        (["eval", *m, "--dataset", "kedit:x.jsonl", "--sequential", "--batch-size", "0"], "eval", "--batch-size"),
        (["eval", *m, "--dataset", "kedit:x.jsonl", "--sequential"], "eval", "--sequential needs --batch-size"),
        (["stats", *m, "--layers", "1", "--dtype", "foo"], "stats", "--dtype", "invalid choice: 'foo'"),
        (["edit", *m, "--device", "tpu", *FACT], "edit", "--device 'tpu'"),
        *([] if CUDA else [(["edit", *m, "--device", "cuda:0", *FACT], "edit", "CUDA is not available")]),
        (["edit", *m, "--max-memory", "0=lots", *FACT], "edit", "--max-memory", "'0=lots'"),
        (["edit", *m, "--device-map", "nowhere", *FACT], "edit", "--device-map 'nowhere'"),
        (["edit", "--model", "no-such-model", "--save", afile / "p.safetensors", *FACT], "edit",
         f"--save {afile / 'p.safetensors'}", "is a file, not a directory"),  # checked before the model loads
        (["edit", *m, "--save", tmp, *FACT], "edit", "--save", "is a directory"),
        (["eval", *m, "--dataset", "kedit:x.jsonl", "--out", afile], "eval", "--out", "not a directory"),
        (["edit", *m, "--requests", tmp / "missing.jsonl"], "edit", "missing.jsonl"),
        (["edit", *m, "--requests", notutf8], "edit", str(notutf8), "not UTF-8"),
        (["edit", "--model", "no-such-model", *FACT], "edit", "unknown model 'no-such-model'"),
        (["edit", *m, "--hparam", "lam=-1", *FACT], "edit", "lam must be >= 0"),
        (["compare", tmp / "nothing-here"], "compare", "nothing-here"),
        (["compare", corrupt], "compare", str(corrupt / "summary.json")),
        (["cache", "clear", "--older-than", "-1"], "cache clear", "--older-than"),
    ]


def test_bad_inputs_are_one_line_exit_2_without_traceback(tiny_dir, tmp_path, capsys):
    for argv, cmd, *needles in _bad_inputs(tiny_dir, tmp_path):
        rc, out, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, cmd.split()[0] if cmd != "cache clear" else "cache clear", *needles)
        assert out == ""


def test_kedit_home_that_is_a_file_fails_up_front(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("KEDIT_HOME", str(home))
    rc, _, err = run_cli(capsys, "edit", "--model", "no-such-model", *FACT)
    assert_one_line_error(rc, err, "edit", f"KEDIT_HOME {home} is a file")


def test_out_of_range_layers_fail_before_statistics(tiny_dir, tmp_path, capsys, monkeypatch):
    import kedit.stats

    def boom(*a, **k):
        raise AssertionError("statistics computed before the layers were checked")

    monkeypatch.setattr(kedit.stats, "second_moments", boom)
    rc, _, err = run_cli(capsys, "stats", "--model", tiny_dir, "--layers", "2-5")
    assert_one_line_error(rc, err, "stats", "--layers: layer 4 is out of range")


def test_unexpected_errors_are_one_line_with_a_hint_and_debug_shows_the_traceback(capsys, monkeypatch):
    import kedit.commands.cache as cache

    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cache, "run", boom)
    rc, _, err = run_cli(capsys, "cache", "list")
    assert rc == 1 and err.strip() == ("kedit cache: unexpected error: RuntimeError: something broke "
                                       "(rerun with --debug for the traceback)")
    for argv in (["--debug", "cache", "list"], ["cache", "--debug", "list"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 1 and "Traceback (most recent call last)" in err and 'raise RuntimeError("something' in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "run", interrupted)
    rc, _, err = run_cli(capsys, "cache", "list")
    assert rc == 130 and err.strip() == "kedit cache: interrupted"


def test_load_passes_only_the_model_flags_that_were_set():
    import kedit.models
    from kedit.commands._common import load_kwargs

    parser, _ = build_parser()
    assert load_kwargs(parser.parse_args(["edit"])) == {}
    args = parser.parse_args(["edit", "--dtype", "bfloat16", "--device", "cpu", "--trust-remote-code"])
    assert load_kwargs(args) == {"dtype": "bfloat16", "device": "cpu", "trust_remote_code": True}

    args = parser.parse_args(["edit", "--device-map", '{"model": 0}', "--max-memory", "0=20GiB,cpu=60GiB",
                              "--dtype", "auto", "--revision", "abc", "--offload-folder", "/tmp/x"])
    from kedit.commands._common import validate

    validate(args)
    kw = load_kwargs(args)
    assert kw == {"dtype": "auto", "device_map": {"model": 0}, "max_memory": {0: "20GiB", "cpu": "60GiB"},
                  "revision": "abc", "offload_folder": "/tmp/x"}
    import inspect

    assert set(kw) <= set(inspect.signature(kedit.models.load_model).parameters)  # every flag reaches the loader


# -- an edit through the CLI in-process: flags reach the editor, progress callback ---------------------------------


def test_edit_flags_reach_the_editor_and_progress_reports_steps(tiny_dir, tmp_path, capsys, monkeypatch):
    import kedit.editor

    calls = []
    real = kedit.editor.optimize_anchors

    def spy(*a, on_step=None, **k):
        def record(chunk, step, converged):
            calls.append((chunk, step, converged))
            on_step(chunk, step, converged)

        return real(*a, on_step=record, **k)

    monkeypatch.setattr(kedit.editor, "optimize_anchors", spy)
    patch = tmp_path / "p.safetensors"
    rc, out, err = run_cli(capsys, "edit", "--model", tiny_dir, "--layers", "1-2", "--steps", "3", "--corpus",
                           tiny_dir / "corpus.txt", "--tokens", "1000", *FACT, "--method", "prune", "--lam", "7",
                           "--hparam", "alpha=2", "--targets", "backward", "--json", "--save", patch)
    assert rc == 0, err
    assert json.loads(out)["layers"] == [1, 2]
    from kedit.edit import Edit

    solver = Edit.load(patch).record["solver"]
    assert solver["name"] == "prune" and solver["alpha"] == 2 and solver["base"]["lam"] == 7.0
    assert calls and [s for _, s, _ in calls] == list(range(1, len(calls) + 1)) and len(calls) <= 3
    assert all(0 <= c <= 1 for _, _, c in calls)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from kedit.progress import bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert bar(10, "x").disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not bar(10, "x").disable and bar(10, "x", enabled=False).disable


# -- kedit cache -----------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    from kedit.stats import StatsKey, cache_path, save_stats

    home = tmp_path / "home"
    monkeypatch.setenv("KEDIT_HOME", str(home))
    key = StatsKey(model="abc123", revision=None, layer=4, site="w_out.input", corpus="c0ffee" * 8,
                   tokenizer="tok", tokens=5000, max_length=256, dtype="torch.float32")
    save_stats(cache_path(key), key, torch.eye(8, dtype=torch.float64), {"tokens": 5000})
    (home / "templates").mkdir()
    (home / "templates" / "t1.json").write_text(json.dumps({"spec": {"fingerprint": "abc123", "seed": 0},
                                                            "templates": ["{}", "A. {}"]}))
    (home / "templates" / "tmpx.tmp").write_text("half")
    (home / "corpus").mkdir()
    old = home / "corpus" / "abc123-s0-n20000.jsonl"
    old.write_text('{"text": "x"}\n' * 100)
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    (home / "models" / "smollm2-135m").mkdir(parents=True)
    (home / "models" / "smollm2-135m" / "model.safetensors").write_bytes(b"\0" * 4096)
    (home / "models" / "smollm2-135m" / "kedit-manifest.json").write_text('{"source": "m.gguf", "files": {}}')
    return home


def test_cache_list_shows_every_kind_with_sizes_and_what_it_is(cache_home, capsys):
    rc, out, _ = run_cli(capsys, "cache", "list", "--json")
    assert rc == 0
    listing = json.loads(out)
    by_kind = {}
    for e in listing["entries"]:
        by_kind.setdefault(e["kind"], []).append(e)
    assert set(by_kind) == {"stats", "templates", "corpus", "models"}
    assert "model abc123 layer 4" in by_kind["stats"][0]["what"] and "5,000 tokens" in by_kind["stats"][0]["what"]
    assert by_kind["models"][0]["bytes"] > 4096 and "converted from m.gguf" in by_kind["models"][0]["what"]
    assert [e["leftover"] for e in by_kind["templates"]] == [False, True]
    assert "20,000 tokens" in by_kind["corpus"][0]["what"]
    assert listing["bytes"] == sum(e["bytes"] for e in listing["entries"])
    rc, out, _ = run_cli(capsys, "cache", "list")
    assert rc == 0 and "stats: 1 entry" in out and "templates: 2 entries" in out and "total " in out


def test_cache_clear_by_kind_age_and_dry_run(cache_home, capsys):
    before = sorted(p for p in cache_home.rglob("*") if p.is_file())
    rc, out, _ = run_cli(capsys, "cache", "clear", "--dry-run")
    assert rc == 0 and "would remove stats:" in out and sorted(p for p in cache_home.rglob("*") if p.is_file()) \
        == before
    rc, out, _ = run_cli(capsys, "cache", "clear", "--older-than", "5")
    assert rc == 0 and out.count("removed ") == 1 and "abc123-s0-n20000.jsonl" in out
    assert not (cache_home / "corpus" / "abc123-s0-n20000.jsonl").exists()
    rc, out, _ = run_cli(capsys, "cache", "clear", "--kind", "templates", "--json")
    assert rc == 0 and len(json.loads(out)["removed"]) == 2 and not any((cache_home / "templates").iterdir())
    rc, out, _ = run_cli(capsys, "cache", "clear", "--kind", "models")
    assert rc == 0 and not (cache_home / "models" / "smollm2-135m").exists()
    assert any((cache_home / "stats").iterdir())  # other kinds untouched


def test_edit_warns_when_an_edit_did_not_take(tiny_dir, tmp_path, capsys, monkeypatch):
    import kedit.commands.edit as edit_cmd

    probes = iter([[{"p_new": 0.2, "p_true": None, "generation": "x"}],   # before the edit
                   [{"p_new": 0.1, "p_true": None, "generation": "x"}]])  # after: P(new) fell
    monkeypatch.setattr(edit_cmd, "snapshot", lambda *a, **k: next(probes))
    rc, _, err = run_cli(capsys, "edit", "--model", tiny_dir, "--layers", "1", "--steps", "1", "--corpus",
                         tiny_dir / "corpus.txt", "--tokens", "1000", *FACT, "--json")
    assert rc == 0, err
    assert "warning: the edit did not take for 'The capital of France is' -> 'Berlin' (P(new) 0.2 -> 0.1)" in err
