"""Relative position coding of sparse layers (Deep Compression's index differences), pure numpy.

A layer's nonzero weights are coded in flattened order as entries ``(delta, index)``: ``delta``
zeros are skipped, then comes the weight with codebook index ``index``. A gap longer than the cap
``C`` is bridged by filler entries ``(C, 0)``, each an explicit zero that covers ``C + 1``
positions; zeros after the last entry are implicit. ``C = 0`` codes a dense layer with no position
stream at all. The best cap depends on the layer's sparsity, so the codec tries them all.
"""

from __future__ import annotations

import math

import numpy as np

from pared.cluster import huffman

MAX_HUFFMAN_CAP = 255  # the delta alphabet of a Huffman-coded layer has at most 256 symbols


def to_entries(gaps: np.ndarray, values: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(deltas, indices)`` for nonzeros with ``gaps`` zeros before each and codebook ``values``,
    with ``(cap, 0)`` fillers bridging gaps longer than ``cap``."""
    fill = gaps // (cap + 1)
    # Each nonzero is preceded by its fillers: repeat per gap, then mark the last of each run real.
    count = fill + 1
    ends = np.cumsum(count) - 1
    deltas = np.full(int(count.sum()), cap, dtype=np.int64)
    symbols = np.zeros(int(count.sum()), dtype=np.int64)
    deltas[ends] = gaps - fill * (cap + 1)
    symbols[ends] = values
    return deltas, symbols


def best_cap_fixed(gaps: np.ndarray, width: int) -> int:
    """The cap ``2**d - 1`` that minimises ``entries * (d + width)`` bits (fixed-width streams)."""
    best = (math.inf, 0)
    longest = int(gaps.max()) if gaps.size else 0
    for d in range(0, 17):
        cap = (1 << d) - 1
        entries = gaps.size + int((gaps // (cap + 1)).sum())
        best = min(best, (entries * (d + width), cap))
        if cap >= longest:
            break
    return best[1]


def best_cap_huffman(gaps: np.ndarray, values: np.ndarray, k: int) -> int:
    """The cap in ``0..MAX_HUFFMAN_CAP`` that minimises both Huffman streams plus the delta code
    table (4 bits per symbol); ``k`` is the codebook size (index symbols ``0..k``)."""
    if not gaps.size:
        return 0
    value_hist = np.bincount(values, minlength=k + 1)
    best = (math.inf, 0)
    for cap in range(0, min(int(gaps.max()), MAX_HUFFMAN_CAP) + 1):
        fill = gaps // (cap + 1)
        n_fill = int(fill.sum())
        d_hist = np.bincount(gaps - fill * (cap + 1), minlength=cap + 1)
        d_hist[cap] += n_fill
        i_hist = value_hist.copy()
        i_hist[0] += n_fill
        bits = huffman.encoded_bits(i_hist, huffman.code_lengths(i_hist)) + 4 * (cap + 1 if cap else 0)
        if cap:
            bits += huffman.encoded_bits(d_hist, huffman.code_lengths(d_hist))
        best = min(best, (bits, cap))
    return best[1]


def bits_for(n: int) -> int:
    """Bits to write any integer in 0..n."""
    return int(n).bit_length()
