"""Data parallelism on torch.distributed: the one owner of process-group facts (issue 14).

kedit never schedules work itself: ``torchrun`` starts one process per device (one or many nodes),
sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, and the parallel parts (second-moment statistics,
anchor optimisation, brute-force layer searches, benchmark grids) use the helpers below. Without
those variables everything here is a no-op and kedit runs as one process.

Backend follows the model's device: ``gloo`` for CPU, ``nccl`` for CUDA (one GPU per local rank).
Collectives and barriers time out after ``KEDIT_DIST_TIMEOUT`` seconds (default 600); a barrier on
gloo names the rank that did not arrive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from kedit.errors import KeditError

T = TypeVar("T")
TIMEOUT_ENV = "KEDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds: long enough for a rank loading an 8B model or a slow shared disk
_serial_depth = 0  # > 0 inside ``serial()``: every rank works alone (no collectives)
_cpu_group: Any = None  # gloo group for barriers and pickled objects (the default group itself when it is gloo)


class DistributedError(KeditError):
    """A multi-process run is misconfigured or a rank failed; the message names the rank(s)."""


# -- process-group facts -------------------------------------------------------------------------------
def world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` for a single process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
    return rank, size, local


def rank() -> int:
    return world()[0]


def world_size() -> int:
    return world()[1]


def is_main() -> bool:
    """True on rank 0 (the rank that writes shared files and prints), and in a single process."""
    return world()[0] == 0


def timeout() -> float:
    """Seconds a collective or barrier waits for the other ranks (``KEDIT_DIST_TIMEOUT``, default 600)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str = "cpu") -> bool:
    """Join torchrun's process group (once) for work on ``device``; False when running as one process.

    Raises DistributedError for CUDA work on a gloo group, nccl without CUDA, or a bad environment.
    """
    _, size, local = world()
    if size == 1 or _serial_depth:
        return False
    device = torch.device(device)
    want = backend_for(device)
    if dist.is_initialized():
        have = dist.get_backend()
        if device.type == "cuda" and have == "gloo":
            raise DistributedError("CUDA tensors requested on a gloo process group; initialise with "
                                   "nccl (kedit does so when the model is on CUDA)")
        if have == "nccl" and not torch.cuda.is_available():
            raise DistributedError("the process group uses nccl but CUDA is not available on this machine")
        _join_cpu_group(have)  # a group the caller initialised: add the gloo side group on first use
        return True
    if want == "nccl" and not torch.cuda.is_available():
        raise DistributedError("nccl needs CUDA, which is not available; run the model on CPU (gloo)")
    if want == "nccl":
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s); "
                                   "use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistributedError(f"WORLD_SIZE={size} but {var} is unset: launch with torchrun")
    dist.init_process_group(want, timeout=timedelta(seconds=timeout()))
    _join_cpu_group(want)
    return True


def _join_cpu_group(backend: str) -> None:
    """Objects and barriers go through gloo even beside nccl: a monitored barrier names missing ranks, and
    a pickled object needs no GPU staging. Collective: every rank calls it at the same point (first init)."""
    global _cpu_group
    if backend != "gloo" and _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout()))


def active(device: torch.device | str | None = None) -> bool:
    """True when this call should split work across ranks (torchrun with > 1 process, not in ``serial()``).

    Joins the process group on first use, for work on ``device`` (default: CPU unless already joined).
    """
    return init("cpu" if device is None else device)


@contextmanager
def serial() -> Iterator[None]:
    """Inside, every rank works alone: kedit code called here issues no collectives.

    For work already split across ranks (e.g. one layer-search window per rank), whose inner steps
    would otherwise try to split themselves again and deadlock.
    """
    global _serial_depth
    _serial_depth += 1
    try:
        yield
    finally:
        _serial_depth -= 1


def close() -> None:
    """Leave the process group (no-op if none)."""
    global _cpu_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _cpu_group = None


# -- partitions ----------------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """``[lo, hi)`` of this rank's contiguous block of ``n`` items: blocks differ by at most one item,
    cover ``range(n)`` in rank order with no overlap and no gap."""
    r, s, _ = world()
    r = r if rank is None else rank
    s = s if size is None else size
    return n * r // s, n * (r + 1) // s


def shard(items: Sequence[T], rank: int | None = None, size: int | None = None) -> list[T]:
    """This rank's contiguous block of ``items`` (see ``shard_bounds``)."""
    lo, hi = shard_bounds(len(items), rank, size)
    return list(items[lo:hi])


def distribute(items: Sequence[T], device: torch.device | str | None = None) -> list[tuple[int, T]]:
    """``(index, item)`` pairs this rank should run (a contiguous share), for grids of independent configurations.

    Pair with ``gather_ordered`` to assemble every rank's results in item order. One process: all items.
    ``device``: where the work runs (selects the backend if the process group is not joined yet).
    """
    lo, hi = shard_bounds(len(items)) if active(device) else (0, len(items))
    return [(i, items[i]) for i in range(lo, hi)]


def gather_ordered(results: Sequence[tuple[int, Any]], n: int) -> list[Any]:
    """Every rank's ``(index, result)`` pairs as one list of ``n`` results in index order (on every rank)."""
    merged: dict[int, Any] = {}
    parts = all_gather_object(list(results)) if active() else [list(results)]
    for part in parts:
        merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise DistributedError(f"no result for items {missing[:10]} after gathering from every rank")
    return [merged[i] for i in range(n)]


# -- collectives (each failure becomes a one-line DistributedError) ------------------------------------
def _failed(what: str, e: Exception) -> DistributedError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(f"rank {rank()}: {what} failed after at most {timeout():g}s ({msg}); "
                            f"another rank probably died or is stuck (see its log; {TIMEOUT_ENV} sets the timeout)")


def barrier(what: str = "barrier", seconds: float | None = None) -> None:
    """Wait for every rank, at most ``seconds`` (default ``timeout()``); a rank that does not arrive is named.

    Give ``seconds`` where ranks legitimately finish far apart (e.g. unequal shares of a benchmark grid).
    """
    if not active():
        return
    limit = timeout() if seconds is None else seconds
    try:  # rank 0 collects every rank (wait_all_ranks: it reports all the missing ones, not the first)
        dist.monitored_barrier(group=_cpu_group, timeout=timedelta(seconds=limit), wait_all_ranks=True)
    except RuntimeError as e:
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        if missing:
            raise DistributedError(f"{what}: rank(s) {missing.group(1).strip()} did not arrive within "
                                   f"{limit:g}s (died or stuck; {TIMEOUT_ENV} sets the timeout)") from None
        raise _failed(what, e) from None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: ``t`` becomes the sum over ranks, reduced in float64 (returned for chaining)."""
    if not active(t.device):
        return t
    buf = t if t.dtype == torch.float64 else t.double()
    try:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    except RuntimeError as e:
        raise _failed("all-reduce", e) from None
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, any size) as a list in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(out, obj, group=_cpu_group)
    except RuntimeError as e:
        raise _failed("all-gather", e) from None
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    try:
        dist.broadcast_object_list(box, src=src, group=_cpu_group)
    except RuntimeError as e:
        raise _failed("broadcast", e) from None
    return box[0]


# -- consistency checks --------------------------------------------------------------------------------
def check_same(what: str, value: Any) -> None:
    """All-gather ``value``; DistributedError naming the ranks whose value differs from rank 0's."""
    values = all_gather_object(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        shown = ", ".join(f"rank {r}: {values[r]}" for r in bad[:4])
        raise DistributedError(f"ranks {', '.join(map(str, bad))} differ from rank 0 in {what} "
                               f"(rank 0: {values[0]}; {shown})")


def check_same_model(model: torch.nn.Module, fingerprint: str | None = None) -> None:
    """Every rank loaded the same model (``model_fingerprint``), else DistributedError naming the ranks."""
    from kedit.models import model_fingerprint

    if active(next(model.parameters()).device):
        check_same("model fingerprint (every rank must load the same model and weights)",
                   fingerprint or model_fingerprint(model))


def weights_digest(tensors: Sequence[torch.Tensor]) -> str:
    """Exact digest of a list of tensors' bytes (e.g. the edited W_out of every layer)."""
    import hashlib

    from kedit.models import tensor_digest

    return hashlib.sha256("".join(tensor_digest(t) for t in tensors).encode()).hexdigest()[:20]


def describe() -> dict[str, Any]:
    """``{"rank", "world_size", "local_rank", "backend"}`` for records and benchmark results."""
    r, s, local = world()
    return {"rank": r, "world_size": s, "local_rank": local,
            "backend": dist.get_backend() if dist.is_initialized() else None}
