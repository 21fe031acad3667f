"""A fresh clone with nothing beside it: the tests that need ../shared/data skip (with a reason) instead of failing.

Clones the committed HEAD into a temporary directory (no sibling ``shared/``) and runs the data-dependent
tests there with the clone's own sources on the path; ~15 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_TESTS = [
    "tests/test_eval_datasets.py::test_shared_files_load",
    "tests/test_eval_harness.py::test_cli_eval_on_tiny_model",
    "tests/test_eval_harness.py::test_cli_smollm2_memit_20_counterfact",
]


def test_fresh_clone_without_shared_data_skips_data_tests(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    inside = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-inside-work-tree"], capture_output=True,
                            text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip(f"{ROOT} is not a git checkout")
    clone = tmp_path / "kedit"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=60)
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("KEDIT_SHARED_DATA", "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(clone / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *DATA_TESTS],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "4 skipped" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]
    assert "needs shared data" in r.stdout and str(tmp_path / "shared" / "data") in r.stdout
