"""The multi-rank harness (dcp_compile/testing.py): per-rank results, a working gloo group, the child's
traceback on failure, and prompt teardown."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from dcp_compile.testing import RankFailed, free_port, run_ranks


def _collect(rank, world, base, *, scale=1):
    """Per-rank payload plus a real collective on the group the harness set up."""
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return {
        "rank": rank,
        "world": world,
        "value": (base + rank) * scale,
        "sum": t.item(),
        "gathered": [g.item() for g in gathered],
        "dist_rank": dist.get_rank(),
        "dist_world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "tensor": torch.arange(4, dtype=torch.float64) * rank,  # must survive the child's exit
    }


def _fail_on_rank_one(rank, world):
    if rank == 1:
        _a_helper_that_raises(rank)
    return rank


def _a_helper_that_raises(rank):
    raise ValueError(f"deliberate failure marker xyzzy on rank {rank}")


def _fail_while_peer_waits(rank, world):
    if rank == 0:
        raise KeyError("rank zero gives up")
    dist.barrier()  # never completes: rank 0 is gone
    return rank


def _die_hard(rank, world):
    if rank == 1:
        os._exit(3)  # no Python exception, nothing put on the queue
    time.sleep(120)
    return rank


def test_run_ranks_returns_per_rank_results():
    results = run_ranks(_collect, 3, 10, scale=2)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["value"] for r in results] == [20, 22, 24]
    for r in results:
        assert r["world"] == 3 and r["dist_rank"] == r["rank"] and r["dist_world"] == 3
        assert r["backend"] == "gloo"
        assert r["sum"] == 6.0 and r["gathered"] == [0.0, 1.0, 2.0]
        assert torch.equal(r["tensor"], torch.arange(4, dtype=torch.float64) * r["rank"])


def test_failing_rank_raises_with_child_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_fail_on_rank_one, 2, timeout=60)
    msg = str(info.value)
    assert "Traceback (most recent call last)" in msg
    assert "ValueError: deliberate failure marker xyzzy on rank 1" in msg
    assert "_a_helper_that_raises" in msg and "test_harness.py" in msg
    assert "rank 1" in msg
    assert time.monotonic() - start < 45


def test_failure_while_a_peer_blocks_in_a_collective():
    """The failing rank's traceback comes back and the peer stuck in a barrier is torn down promptly."""
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_fail_while_peer_waits, 2, timeout=60)
    assert "KeyError: 'rank zero gives up'" in str(info.value)
    assert time.monotonic() - start < 45


def test_rank_that_dies_without_traceback_is_reported_promptly():
    """A rank that exits without reporting (segfault, os._exit, OOM kill) fails the run promptly with a message
    that names it, instead of waiting out the whole timeout."""
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_die_hard, 2, timeout=15)
    elapsed = time.monotonic() - start
    assert "1" in str(info.value)
    assert elapsed < 10, f"run_ranks took {elapsed:.0f}s to notice that rank 1 exited (code 3) without a result"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
