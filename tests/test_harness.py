"""The multi-rank harness (dcp_compile/testing.py): per-rank results, a working gloo group, the child's
traceback on failure, how a failure was detected (a raise, a dead process, a timeout), the process
group timeout, and teardown. No test asserts a wall-clock bound: each checks the detection path instead."""
from __future__ import annotations

import os
import time
from datetime import timedelta

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
    with pytest.raises(RankFailed) as info:
        run_ranks(_fail_on_rank_one, 2, timeout=300)
    msg = str(info.value)
    assert info.value.how == RankFailed.RAISED and info.value.ranks == [1], msg
    assert "Traceback (most recent call last)" in msg
    assert "ValueError: deliberate failure marker xyzzy on rank 1" in msg
    assert "_a_helper_that_raises" in msg and "test_harness.py" in msg
    assert "rank 1" in msg


def test_failure_while_a_peer_blocks_in_a_collective():
    """The failing rank's traceback comes back, reported as a raise (not as a timeout: the peer blocked in a
    barrier did not hold the run up until then), and the blocked peer is gone when run_ranks returns."""
    with pytest.raises(RankFailed) as info:
        run_ranks(_fail_while_peer_waits, 2, timeout=300)
    assert info.value.how == RankFailed.RAISED and info.value.ranks == [0], str(info.value)
    assert "KeyError: 'rank zero gives up'" in str(info.value)
    assert None not in info.value.exitcodes, f"a rank is still running after run_ranks returned: {info.value.exitcodes}"


def test_rank_that_dies_without_traceback_is_reported_from_its_exit_code():
    """A rank that exits without reporting (segfault, os._exit, OOM kill) fails the run with a message that names
    it and its exit code, found from the exit code (how == "died") instead of by waiting out the timeout (which
    here only guards against a hang: the surviving rank would sleep past it)."""
    with pytest.raises(RankFailed) as info:
        run_ranks(_die_hard, 2, timeout=300)
    msg = str(info.value)
    assert info.value.how == RankFailed.DIED and info.value.ranks == [1], msg
    assert "rank 1 of 2 died" in msg and "exit code 3" in msg, msg
    assert info.value.exitcodes[1] == 3 and info.value.exitcodes[0] is not None, info.value.exitcodes


def _exit_quietly(rank, world):
    if rank == 0:
        os._exit(0)  # a clean exit code, but no result
    time.sleep(600)


def test_rank_that_exits_zero_without_a_result_is_reported_as_died():
    with pytest.raises(RankFailed) as info:
        run_ranks(_exit_quietly, 2, timeout=300)
    assert info.value.how == RankFailed.DIED and info.value.ranks == [0], str(info.value)
    assert "exit code 0" in str(info.value)


def _hang(rank, world):
    time.sleep(600)


def test_hang_is_reported_as_timeout():
    with pytest.raises(RankFailed) as info:
        run_ranks(_hang, 2, timeout=3)
    assert info.value.how == RankFailed.TIMEOUT and info.value.ranks == [0, 1], str(info.value)
    assert "timeout" in str(info.value) and "[0, 1]" in str(info.value)
    assert None not in info.value.exitcodes, f"a rank is still running after run_ranks returned: {info.value.exitcodes}"


def _barrier_with_a_late_peer(rank, world, **kwargs):
    """Rank 0 enters a barrier that rank 1 never joins, so the group's timeout fires; rank 1 waits (on the store,
    not a collective) until rank 0 has seen it. Returns what the collective raised and the kwargs fn got."""
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        try:
            dist.barrier()
            outcome = "barrier returned"
        except RuntimeError as exc:
            outcome = str(exc)
        store.set("rank0_done", "1")
    else:
        store.wait(["rank0_done"], timedelta(seconds=300))
        outcome = None
    return outcome, kwargs


def test_pg_timeout_sets_the_collective_timeout_and_is_not_passed_to_fn():
    outcome, kwargs = run_ranks(_barrier_with_a_late_peer, 2, pg_timeout=2, scale=3, timeout=300)[0]
    # gloo names the configured timeout in its error: 2 s, not the 120 s default.
    assert "Timed out waiting 2000ms" in outcome, outcome
    assert kwargs == {"scale": 3}, "the harness consumes timeout and pg_timeout; fn gets only its own kwargs"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
