"""The top-k exchange's int64 order key in Triton (meaning and encoding: ``ops/reference.py``, "order keys");
helpers only, no kernel here. Every helper takes loaded values, never pointers (see ``topk_select.py``)."""
import triton
import triton.language as tl

from .radix_select import float_key

NEG_INF_IMAGE = tl.constexpr(-2139095041)  # the order image of -inf: live candidates are above it
# Below every key a candidate can have (dead ones included): the filler of a sort's padding lanes.
NO_KEY = tl.constexpr(-9187343248425746432)  # (NEG_INF_IMAGE - 1) << 32


@triton.jit
def order_key(score, pos):
    """fp32 score, int position -> int64 key: a higher score, then a lower position, is a larger key."""
    # the radix select's unsigned image (±0 tie, as a sort sees them) with its top bit flipped: the signed one
    image = (float_key(score) ^ 2147483648).to(tl.int32, bitcast=True)
    low = 2147483647 - tl.where(score > float("-inf"), pos, 0).to(tl.int64)
    return (image.to(tl.int64) << 32) | low


@triton.jit
def key_position(key):
    return 2147483647 - (key - ((key >> 32) << 32))  # the low word, without a uint32 constant


@triton.jit
def key_live(key):
    return (key >> 32) > NEG_INF_IMAGE
