"""A rank's local top-k candidates as order keys, sorted best first: the kernel of ``dcp::candidate_keys``
(host wrapper: ``ops/triton/candidate_keys.py``).

One program per row: the row's k (score, position) pairs become int64 order keys (``order_key.py``), padded
to a power of two with keys below every candidate, sorted descending in registers (``tl.sort``, a bitonic
network) and stored. Sorted blocks are what lets ``topk_select`` rank a candidate by binary searches instead
of a serial select over every rank's candidates.
"""
import triton
import triton.language as tl

from .order_key import NO_KEY, order_key


@triton.jit
def candidate_keys_kernel(
    SCORES, POS, KEYS,
    k,
    stride_st, stride_pt, stride_kt,
    BLOCK: tl.constexpr,  # next power of two >= k: the whole row is one tile
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < k
    score = tl.load(SCORES + t * stride_st + cols, mask=inside, other=float("-inf"))
    pos = tl.load(POS + t * stride_pt + cols, mask=inside, other=0).to(tl.int64)
    key = tl.where(inside, order_key(score, pos), NO_KEY)
    key = tl.sort(key, descending=True)  # padding lanes (NO_KEY) sort last: the first k are the row's keys
    tl.store(KEYS + t * stride_kt + cols, key, mask=inside)
