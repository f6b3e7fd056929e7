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
    """hist [BINS] int32 counts of one digit over the still-matching elements, rem >= 0 of them still to
    take (rem <= sum(hist) when rem > 0). Returns (d, rem', in_bin): the bin d that holds the rem-th largest
    element, how many of bin d are still to take once every higher bin is taken, and bin d's count."""
    bins = tl.arange(0, hist.shape[0])
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


# --- the window digit of the candidate scheme: quarter octaves, re-centred per row ----------------------------
# A 256-bin histogram costs ~150 instructions per 32 elements (``tl.histogram``: one warp ballot per bit of
# the bin, then per bin a mask and a popcount), a 32-bin one ~27. So the full-row pass counts only WINDOW bins:
# the quarter octaves around the row's estimated threshold (from a 1/16 sample's 256-bin histogram of the
# coarse digit), the ones below and above clamped into the end bins. Any base is exact (the map stays
# monotone; the end bins only hold more candidates); a good one keeps the threshold bin one quarter octave.
# The quarter octave is the top 11 bits of a signed order key (``quarter_octave``): ~10 integer operations
# an element, where the coarse digit's clamping takes ~25 (the row passes are bound by integer issue).
WINDOW = tl.constexpr(32)
# A row's histograms in one int32 buffer [T, HISTS] (one memset; one tensor, not views of one: Inductor copies a
# view that a user kernel mutates): the sample's RADIX coarse bins, then the WINDOW window bins.
HISTS = tl.constexpr(256 + 32)
WINDOW_AT = tl.constexpr(256)
WINDOW_CENTER = tl.constexpr(16)  # the estimated threshold's quarter octave maps here
NEG_INF_OCTANT = tl.constexpr(-1021)  # quarter_octave(-inf): no finite score shares it


@triton.jit
def quarter_octave(x):
    """fp32 -> int32 in [-1024, 1023], monotone non-decreasing in x: the top 11 bits (sign, exponent, 2 mantissa
    bits) of an int32 whose signed order is the float order (negative floats: magnitude bits flipped); -0.0 and
    +0.0 equal (0); -inf alone at NEG_INF_OCTANT (no NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 21


@triton.jit
def window_base(SAMPLE_ROW, take, L):
    """The quarter octave that window bin 0 stands for (``window_digit``), from a row's sample histogram
    SAMPLE_ROW [RADIX] of coarse digits: the sample's bin of the same quantile as the take-th of L columns (as
    a quarter octave: coarse bins 1 .. 127 are -572 + bin, 128 .. 255 are 316 + bin, the end bins clamped),
    minus WINDOW_CENTER."""
    hist = tl.load(SAMPLE_ROW + tl.arange(0, RADIX))
    sampled = tl.sum(hist, 0)
    rank = tl.maximum((sampled.to(tl.int64) * take + L - 1) // tl.maximum(L, 1), 1).to(tl.int32)  # <= sampled
    d, _, _ = pick_bin(hist, rank)
    d = tl.where(sampled > 0, d, 128)  # an empty sample: zero
    return tl.where(d >= 128, d + 316, d - 572) - WINDOW_CENTER


@triton.jit
def window_digit(x, base):
    """fp32 -> int32 window bin in [0, WINDOW): 0 = -inf only, then quarter_octave - base clamped to
    1 .. WINDOW - 1 (monotone non-decreasing in x)."""
    q = quarter_octave(x)
    return tl.where(q == NEG_INF_OCTANT, 0, tl.minimum(tl.maximum(q - base, 1), WINDOW - 1))


@triton.jit
def threshold_bin(HIST_ROW, take, cap):
    """From a row's window histogram HIST_ROW [WINDOW]: (d0, rem, in_bin, buffered): the bin d0 that holds the
    take-th largest element, how many of its in_bin elements are in (the take - rem elements of higher bins
    all are), and whether they go through the candidate buffer (not if they overflow its cap, or d0 is the
    -inf bin)."""
    d0, rem, in_bin = pick_bin(tl.load(HIST_ROW + tl.arange(0, WINDOW)), take)
    return d0, rem, in_bin, (in_bin <= cap) & (d0 != NEG_INF_BIN)
