"""Subprocess smoke tests of the CLI on a tiny saved model; JSON schema of the output."""

import json
import os
import subprocess
import sys

import pytest


def kedit(*args, home):
    env = {**os.environ, "KEDIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kedit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_edit_json_save_and_apply(tiny_dir, tmp_path):
    patch = tmp_path / "p.safetensors"
    r = kedit("edit", "--model", tiny_dir, "--layers", "1,2", "--steps", "3", "--corpus", tiny_dir / "corpus.txt",
              "--tokens", "1500", "--prompt", "The capital of {} is", "--subject", "France", "--target", "Berlin",
              "--true", "Paris", "--json", "--save", patch, "--diagnostics", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "memit" and out["targets"] == "forward" and out["layers"] == [1, 2]
    assert out["seconds"] > 0 and len(out["diagnostics"]) == 2
    # every hyperparameter of the run, not only the flags given (issue 11)
    from kedit.optimize import AnchorConfig
    assert out["solver"] == {"name": "memit", "lam": 15000.0, "sequential_cache": True}
    assert set(out["anchor"]) == {f for f in AnchorConfig.__dataclass_fields__} and out["anchor"]["steps"] == 3
    assert out["key_weighting"] == "grouped" and out["edit_layers"] == [1, 2] and out["seed"] == 0
    req = out["requests"][0]
    for phase in ("before", "after"):
        assert set(req[phase]) == {"p_new", "p_true", "generation"}
    assert req["after"]["p_new"] != req["before"]["p_new"]
    assert patch.is_file()
    r = kedit("apply", "--model", tiny_dir, patch, "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stdout)["requests"][0]
    assert applied["after"]["p_new"] == pytest.approx(req["after"]["p_new"], rel=1e-5)


def test_cli_errors_are_clear(tiny_dir, tmp_path):
    r = kedit("edit", "--model", "nope-model", "--prompt", "{} is", "--subject", "A", "--target", "B", home=tmp_path)
    assert r.returncode == 2 and "unknown model 'nope-model'" in r.stderr
    r = kedit("edit", "--model", tiny_dir, "--prompt", "The capital is", "--subject", "France", "--target", "B",
              home=tmp_path)
    assert r.returncode == 2 and "absent" in r.stderr
    r = kedit("edit", "--model", tiny_dir, "--layers", "9", "--prompt", "{} is", "--subject", "A", "--target", "B",
              home=tmp_path)
    assert r.returncode != 0 and "out of range" in r.stderr


def test_python_m_kedit_and_version_without_torch(tmp_path):
    from kedit._version import __version__

    r = kedit("--version", home=tmp_path)  # through kedit.cli's __main__ guard
    assert r.returncode == 0 and r.stdout.strip() == f"kedit {__version__}"
    env = {**os.environ, "KEDIT_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "kedit", "--version"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"kedit {__version__}"
    r = subprocess.run([sys.executable, "-c", "import sys, kedit; print(kedit.__version__, 'torch' in sys.modules)"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == [__version__, "False"]
    r = subprocess.run([sys.executable, "-m", "kedit", "edit", "--layers", "4-x"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("kedit edit: error: argument --layers: '4-x'")
    assert len(r.stderr.strip().splitlines()) == 1
