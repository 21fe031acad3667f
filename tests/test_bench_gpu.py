"""bench/gpu.py runs end to end on a tiny model on CPU (the GPU run is rare: its code must already work)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


# a random tiny model with a few hundred statistics tokens has no null space at AlphaEdit's threshold
@pytest.mark.filterwarnings("ignore:AlphaEdit. no eigenvalue:UserWarning")
def test_gpu_bench_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    assert mod.main(["--device", "cpu", "--shape", "tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == {}, r["errors"]
    ph = r["phases"]
    expected = {"build", "plain_forward", "stats", "anchors_batch1", "anchors_batch4", "solve_memit",
                "solve_alphaedit", "edit_end_to_end", "device_map_gpu_cpu"}
    assert expected <= set(ph)
    assert ph["stats"]["tokens_per_s"] > 0 and ph["stats"]["vs_plain_forward"] > 0
    assert ph["edit_end_to_end"]["extrapolated_2000_s"] > ph["edit_end_to_end"]["extrapolated_1000_s"] > 0
    assert ph["device_map_gpu_cpu"]["logits_changed"] and ph["device_map_gpu_cpu"]["undo_restores_logits"]
    assert r["machine"]["device"] == "cpu" and r["layers"]
