"""Two gloo processes (torch.multiprocessing.spawn, the env torchrun would set) against one process.

One spawn runs every two-rank scenario on a tiny llama and saves each rank's results; the same
work is then done in this process, and the tests compare: statistics (1e-12, same cache key),
anchors (the batched optimiser's tolerance), edited weights (same digest on both ranks, close to
one process), the brute-force layer choice, and the misuse errors.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CORPUS_TEXT, make_tiny, make_tiny_tok

from kedit import distributed
from kedit.arch import ArchitectureAdapter
from kedit.distributed import DistributedError
from kedit.requests import EditRequest

LAYERS = [0, 1, 2, 3]
REQS = [
    EditRequest("The capital of {} is", "France", "Berlin", "Paris"),
    EditRequest("{} plays", "Michael Jordan", "the violin", "basketball"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "German", "French"),
]
CASES = [
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French",
                paraphrases=("Danielle Darrieux speaks",),
                neighbors=(("The mother tongue of Michael Jordan is", "French"),)),
    EditRequest("{} is the capital of", "Paris", "Germany", "France", paraphrases=("Paris is located in",),
                neighbors=(("Berlin is the capital of", "Germany"),)),
]
ANCHOR = {"steps": 4, "lr": 1.0, "clamp_norm_factor": 4.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int, home: Path, timeout: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), KEDIT_HOME=str(home), KEDIT_DIST_TIMEOUT=str(timeout))
    torch.set_num_threads(1)


def _spec(corpus: Path):
    from kedit.stats import StatsSpec

    return StatsSpec(corpus=str(corpus), tokens=700, max_length=32, batch_tokens=64)  # ~11 batches


def _work(model, tok, corpus: Path) -> dict:
    """What both the two-rank run and the single process compute."""
    from kedit.editor import Editor
    from kedit.layers import BruteForce
    from kedit.stats import StatsInfo, second_moments

    info: dict[int, StatsInfo] = {}
    C = second_moments(model, tok, LAYERS, _spec(corpus), progress=False, info=info)
    cache: dict = {}
    adapter = ArchitectureAdapter.from_model(model)
    before = {layer: adapter.w_out(layer).detach().clone() for layer in (1, 2)}
    edit = Editor(model, tok, layers=[1, 2], stats=C, anchor=ANCHOR, anchor_cache=cache).apply(REQS)
    after = {layer: adapter.w_out(layer).detach().clone() for layer in (1, 2)}
    digest = distributed.weights_digest([after[1], after[2]])
    edit.undo()
    choice = BruteForce(method="rome", stats=C, editor_kwargs={"anchor": ANCHOR}).select(model, None, tok, CASES)
    return {"C": C, "files": {la: i.path.name for la, i in info.items()}, "cached": [i.cached for i in info.values()],
            "tokens": [i.tokens for i in info.values()], "z": {k: a.z for k, a in cache.items()},
            "anchor_ranks": [a.extra.get("world_size", 1) for a in cache.values()],
            "delta": {la: after[la] - before[la] for la in after},
            "digest": digest, "world_size": edit.record["world_size"], "choice": choice.layers,
            "scores": choice.scores, "restored": all(torch.equal(adapter.w_out(la), before[la]) for la in before)}


def _worker(rank: int, out: str, port: int, corpus: str) -> None:
    _env(rank, port, Path(out) / "home", 60)
    tok = make_tiny_tok()
    model = make_tiny("llama", tok)
    res = _work(model, tok, Path(corpus))
    try:  # CUDA work on the gloo group
        distributed.init("cuda")
    except DistributedError as e:
        res["cuda_error"] = str(e)
    try:  # rank 1 loads a different model
        distributed.check_same_model(make_tiny("llama", tok, seed=rank))
    except DistributedError as e:
        res["mismatch_error"] = str(e)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    distributed.close()


def _dying_worker(rank: int, out: str, port: int) -> None:
    _env(rank, port, Path(out) / "home", 2)
    distributed.barrier("start")
    if rank == 1:
        os._exit(0)  # leaves without a word (exit code 0: spawn would otherwise kill rank 0 at once)
    t0 = time.perf_counter()
    try:
        distributed.barrier("statistics cache write")
    except DistributedError as e:
        (Path(out) / "error.txt").write_text(f"{e}\n{time.perf_counter() - t0}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(rank0, rank1, single)`` results; the spawn and the single process use separate KEDIT_HOMEs."""
    out = tmp_path_factory.mktemp("dist")
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS_TEXT * 3)
    mp.spawn(_worker, args=(str(out), _free_port(), str(corpus)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    tok = make_tiny_tok()
    with pytest.MonkeyPatch.context() as mp_env:  # module scope: conftest's per-test KEDIT_HOME is not set yet
        mp_env.setenv("KEDIT_HOME", str(out / "single-home"))
        single = _work(make_tiny("llama", tok), tok, corpus)
    return ranks[0], ranks[1], single


def test_statistics_equal_single_process_and_share_the_cache_key(runs):
    r0, r1, single = runs
    assert r0["files"] == r1["files"] == single["files"]  # the key (hence file name) ignores the world size
    assert not any(r0["cached"] + single["cached"])
    assert r0["tokens"] == r1["tokens"] == single["tokens"] == [700] * len(LAYERS)  # each token counted once
    for layer in LAYERS:
        ref = single["C"][layer]
        for r in (r0, r1):
            err = (r["C"][layer] - ref).abs().max() / ref.abs().max()
            assert err < 1e-12, (layer, err.item())
        assert torch.equal(r0["C"][layer], r1["C"][layer])  # rank 1 read rank 0's entry


def test_anchors_and_edit_match_single_process(runs):
    r0, r1, single = runs
    assert set(r0["z"]) == set(r1["z"]) == set(single["z"]) and len(r0["z"]) >= 1   # the same cache keys
    assert r0["anchor_ranks"] == r1["anchor_ranks"] == [2] * len(r0["z"])  # requests were split across ranks
    for key, zs in single["z"].items():   # by key: the single process caches each chunk as it finishes
        z0, z1 = r0["z"][key], r1["z"][key]
        assert torch.equal(z0, z1)  # gathered to every rank
        torch.testing.assert_close(z0, zs, rtol=2e-4, atol=2e-5)  # tests/test_optimize.py's batched tolerance
    assert r0["digest"] == r1["digest"]
    for layer, d in single["delta"].items():
        assert (r0["delta"][layer] - d).norm() / d.norm() < 1e-3
    assert (r0["world_size"], r1["world_size"], single["world_size"]) == (2, 2, 1)


def test_layer_search_over_two_ranks_same_choice(runs):
    r0, r1, single = runs
    assert r0["choice"] == r1["choice"] == single["choice"]
    # windows outnumber ranks: each window runs whole on one rank, exactly as in one process
    assert r0["scores"] == r1["scores"] == single["scores"]
    assert r0["restored"] and r1["restored"]


def test_misuse_errors_name_the_problem(runs):
    r0, r1, _ = runs
    for r in (r0, r1):
        assert "CUDA tensors requested on a gloo process group" in r["cuda_error"]
        assert r["mismatch_error"].startswith("ranks 1 differ from rank 0 in model fingerprint")
        assert "\n" not in r["mismatch_error"] + r["cuda_error"]


def test_rank_that_dies_is_named_after_the_timeout(tmp_path):
    mp.spawn(_dying_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    msg, seconds = (tmp_path / "error.txt").read_text().split("\n")
    assert msg == ("statistics cache write: rank(s) 1 did not arrive within 2s "
                   "(died or stuck; KEDIT_DIST_TIMEOUT sets the timeout)")
    assert float(seconds) < 30


# -- single-process behaviour of the helpers ---------------------------------------------------------
def test_shards_cover_without_overlap_or_gap():
    for n in (0, 1, 5, 7, 32):
        for size in (1, 2, 3, 8):
            blocks = [distributed.shard(list(range(n)), r, size) for r in range(size)]
            assert [x for b in blocks for x in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.world() == (0, 1, 0) and not distributed.active() and distributed.is_main()
    items = ["a", "b", "c"]
    assert distributed.gather_ordered([(i, x * 2) for i, x in distributed.distribute(items)], 3) == ["aa", "bb", "cc"]
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and distributed.all_gather_object(5) == [5]
    distributed.barrier()


def test_environment_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        distributed.world()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("KEDIT_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="KEDIT_DIST_TIMEOUT='soon' must be a positive number"):
        distributed.timeout()
    monkeypatch.delenv("KEDIT_DIST_TIMEOUT")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR is unset: launch with torchrun"):
        distributed.init("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="nccl needs CUDA, which is not available"):
            distributed.init("cuda")
