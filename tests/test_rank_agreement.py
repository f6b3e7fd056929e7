"""Ranks agree, or fail together with a message naming what differs: the same tokens whatever each rank's
random seed, the same stop step whatever each rank's stopping criteria decide, one clear error on every
rank for different weights, inputs or settings, and a rank that fails mid-generate is named by its peers."""
import time

import torch

import dcp_compile
from dcp_compile.testing import left_padded_prompts, run_ranks, tiny_deepseek_v32

PAGE = 4


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)


def agreement_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import StoppingCriteria, StoppingCriteriaList

    mesh = init_device_mesh("cpu", (world,))
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation="sdpa")
    model = dcp_compile.apply(tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation="sdpa"), mesh,
                              page_size=PAGE)
    ids, mask = left_padded_prompts((6, 13), seed=1)
    out = {}

    # Sampling with a different seed on every rank: every rank returns rank 0's tokens, which are what a
    # single process seeded like rank 0 samples.
    torch.manual_seed(100 + rank)
    out["sampled"] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0)
    torch.manual_seed(100)
    out["sampled reference"] = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0)

    # A stopping criterion that fires on rank 1 only (as max_time can): both ranks stop at the same step.
    class StopOnRankOne(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            fire = rank == 1 and input_ids.shape[1] >= ids.shape[1] + 3
            return torch.full((input_ids.shape[0],), fire, dtype=torch.bool)

    out["stopped"] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    stopping_criteria=StoppingCriteriaList([StopOnRankOne()]))

    # Different work on one rank: the same error on every rank, before any other collective.
    other = ids.clone()
    other[0, -1] += rank
    out["prompt content"] = _outcome(lambda: model.generate(other, attention_mask=mask, max_new_tokens=4))
    longer = left_padded_prompts((6, 13 + rank), seed=1)
    out["prompt length"] = _outcome(lambda: model.generate(longer[0], attention_mask=longer[1], max_new_tokens=4))
    out["batch size"] = _outcome(lambda: model.generate(ids[: 1 + rank], attention_mask=mask[: 1 + rank], max_new_tokens=4))
    out["max_new_tokens"] = _outcome(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=4 + rank))
    out["forward"] = _outcome(lambda: model(other, attention_mask=mask))
    out["after mismatches"] = torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                                          ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))

    # Different weights on one rank.
    weights = dcp_compile.apply(tiny_deepseek_v32(seed=rank, dtype=torch.float64, attn_implementation="sdpa"), mesh,
                                page_size=PAGE)
    out["weights"] = _outcome(lambda: weights.generate(ids, attention_mask=mask, max_new_tokens=4))

    # The opt-out skips the check (the caller guarantees identical work) and costs nothing.
    unchecked = dcp_compile.apply(tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation="sdpa"), mesh,
                                  page_size=PAGE, verify_ranks=False)
    out["opt-out"] = torch.equal(unchecked.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                                 ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    return out


def test_ranks_agree_or_fail_together():
    per_rank = run_ranks(agreement_on_rank, 2)
    r0, r1 = per_rank
    assert torch.equal(r0["sampled"], r1["sampled"]), "ranks sampled different tokens"
    assert torch.equal(r0["sampled"], r0["sampled reference"]), "rank 0 did not sample what HF samples with its seed"
    assert torch.equal(r0["stopped"], r1["stopped"]) and r0["stopped"].shape[1] == 13 + 3, r0["stopped"].shape
    expected = {
        "prompt content": "inputs checksum differs",
        "prompt length": "inputs shape differs",
        "batch size": "batch size differs",
        "max_new_tokens": "max_new_tokens",
        "forward": "inputs checksum differs",
        "weights": "weights fingerprint differs",
    }
    for case, words in expected.items():
        kinds = {out[case][0] for out in per_rank}
        messages = {out[case][1] for out in per_rank}
        assert kinds == {"RankMismatchError"}, (case, per_rank[0][case], per_rank[1][case])
        assert len(messages) == 1, f"{case}: the ranks raised different messages"
        assert words in messages.pop(), (case, per_rank[0][case][1])
    for out in per_rank:
        assert out["after mismatches"] is True and out["opt-out"] is True


def fault_on_rank(rank, world, fail_rank, step, stay_alive_s):
    """Rank ``fail_rank`` raises in its second decoder layer at decode step ``step``; every rank reports."""
    from torch.distributed.device_mesh import init_device_mesh

    model = dcp_compile.apply(tiny_deepseek_v32(seed=0, dtype=torch.float32), init_device_mesh("cpu", (world,)),
                              page_size=PAGE)
    calls = {"n": 0}

    def inject(module, args):
        calls["n"] += 1
        if rank == fail_rank and calls["n"] == step + 1:  # call 1 is the prefill
            raise ValueError(f"injected fault on rank {rank} at decode step {step}")

    model.model.layers[1].register_forward_pre_hook(inject)
    prompt = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    outcome = _outcome(lambda: model.generate(prompt, max_new_tokens=16, do_sample=False))
    if rank == fail_rank:
        time.sleep(stay_alive_s)  # a server that keeps the process: its peers must not wait forever
    return outcome


def test_a_failing_rank_is_named_by_every_rank_no_hang():
    # The failing rank stays alive (as a server would), so its peer learns of it when the collective times out
    # (pg_timeout) and then names it from the process group's store.
    outcomes = run_ranks(fault_on_rank, 2, 1, 5, 15, pg_timeout=10, timeout=300)
    kind, msg = outcomes[1]
    assert kind == "ValueError" and "injected fault on rank 1 at decode step 5" in msg, outcomes[1]
    kind, msg = outcomes[0]
    assert kind == "PeerRankFailed", outcomes[0]
    assert "rank 1" in msg and "injected fault on rank 1" in msg, msg


def test_a_rank_that_exits_is_named_by_its_peers():
    # The failing rank's process ends: its peer's collective fails at once (connection closed).
    outcomes = run_ranks(fault_on_rank, 2, 1, 3, 0, pg_timeout=60, timeout=300)
    assert outcomes[1][0] == "ValueError", outcomes[1]
    kind, msg = outcomes[0]
    assert kind == "PeerRankFailed" and "rank 1" in msg and "injected fault" in msg, outcomes[0]
