"""Radix-select helpers of the top-k kernels (``local_topk.py``; ``float_key`` also ``order_key.py``); no kernel here.

A top-k by value is a threshold search over an integer image of the value whose unsigned order is the
value's order: one 8-bit digit per level, most significant first. At each level the histogram of the digit
over the elements that still match the prefix found so far says which bin holds the k-th element
(``pick_bin``); everything in a higher bin is in, the bin itself becomes the next prefix.
"""
import triton
import triton.language as tl

RADIX_BITS = tl.constexpr(8)
RADIX = tl.constexpr(256)  # bins per level (1 << RADIX_BITS)


@triton.jit
def float_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (no NaN). -0.0 and +0.0 get the same key: a
    full sort sees them as equal, so they must tie here too (``w · relu(·)`` with w < 0 makes -0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    # negative floats: flip every bit (larger magnitude = smaller); non-negative: set the sign bit
    key = tl.where(bits < 0, ~bits, bits | -2147483648)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def pick_bin(hist, rem):
    """hist [RADIX] int32 counts of one digit over the still-matching elements, rem >= 0 of them still to
    take (rem <= sum(hist) when rem > 0). Returns (d, rem', in_bin): the bin d that holds the rem-th largest
    element, how many of bin d are still to take once every higher bin is taken, and bin d's count."""
    bins = tl.arange(0, RADIX)
    total = tl.sum(hist, 0)
    at_or_above = total - tl.cumsum(hist, 0) + hist  # elements with digit >= bins (non-increasing)
    d = tl.sum((at_or_above >= rem).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins > d, hist, 0), 0)
    in_bin = tl.sum(tl.where(bins == d, hist, 0), 0)
    return d, rem - above, in_bin


@triton.jit
def threshold_prefix(HIST_ROW, rem, LEVELS: tl.constexpr):
    """Replay the first LEVELS levels of a row's search from its total histograms (HIST_ROW [LEVELS, RADIX]
    int32): the uint32 prefix (LEVELS·8 top bits of the threshold key) and how many elements equal to that
    prefix are still to take."""
    prefix = tl.zeros([], tl.uint32)
    for level in tl.static_range(LEVELS):
        hist = tl.load(HIST_ROW + level * RADIX + tl.arange(0, RADIX))
        d, rem, _ = pick_bin(hist, rem)
        prefix = (prefix << 8) | d.to(tl.uint32)
    return prefix, rem


# --- the coarse digit of the candidate scheme (``local_topk_candidates.py``) --------------------------------
# A monotone (non-decreasing) map of the uint32 key to 8 bits, so that one histogram pass finds a bin that
# holds the k-th element and few others: every element of a higher bin is in, only that bin's elements
# (the candidates) need the full key. The top 8 bits of the key would be sign + 7 exponent bits (bins of
# 4 octaves, useless); instead, like an fp16 image: sign, 5 exponent bits (magnitudes 2^-16 .. 2^16, beyond
# that clamped into the end bins) and 2 mantissa bits, i.e. bins of a quarter octave. Any monotone map is
# correct (the bins only filter); this one keeps the threshold bin small for real score distributions.
# Bin 0 is -inf alone: the -inf padding of short rows is a tie of its own (taken by lowest column, no select).
COARSE_MAG_LOW = tl.constexpr(4 * (127 - 16))  # (biased exponent << 2 | 2 mantissa bits) of 2^-16
NEG_INF_KEY = tl.constexpr(0x007FFFFF)  # float_key(-inf)
NEG_INF_BIN = tl.constexpr(0)


@triton.jit
def coarse_digit(key):
    """uint32 key (``float_key``) -> int32 bin in [0, RADIX): 0 = -inf only, 1 .. 127 negative (larger
    magnitude lower), 128 .. 255 zero and positive; quarter-octave bins over magnitudes 2^-16 .. 2^16."""
    top = (key >> 21).to(tl.int32)  # sign, 8 exponent bits, 2 mantissa bits: 0 .. 2047, monotone in key
    positive = top >= 1024
    # (exponent << 2 | mantissa) of |x| minus that of 2^-16, clamped to 7 bits; a negative key is ~bits, so
    # there top = 1023 - (exponent << 2 | mantissa)
    mag = tl.where(positive, top - 1024, 1023 - top) - COARSE_MAG_LOW
    mag = tl.minimum(tl.maximum(mag, 0), 127)
    digit = tl.where(positive, 128 + mag, 127 - mag)
    return tl.where(key == NEG_INF_KEY, NEG_INF_BIN, tl.maximum(digit, 1))


@triton.jit
def threshold_bin(HIST_ROW, take, cap):
    """From a row's coarse histogram: (d0, rem, in_bin, buffered): the bin d0 that holds the take-th largest
    element, how many of its in_bin elements are in (the take - rem elements of higher bins all are), and
    whether they go through the candidate buffer (not if they overflow its cap, or d0 is the -inf bin)."""
    d0, rem, in_bin = pick_bin(tl.load(HIST_ROW + tl.arange(0, RADIX)), take)
    return d0, rem, in_bin, (in_bin <= cap) & (d0 != NEG_INF_BIN)


@triton.jit
def coarse_overflow(COARSE_ROW, take, cap):
    """True where the candidate scheme's threshold bin (``threshold_bin`` of the row's coarse histogram
    COARSE_ROW [RADIX]) holds more than ``cap`` elements of finite score: too many for the candidate buffer,
    so that row is selected by the five-pass kernels instead (``local_topk.py``)."""
    d0, _, _, buffered = threshold_bin(COARSE_ROW, take, cap)
    return (not buffered) & (d0 != NEG_INF_BIN)
