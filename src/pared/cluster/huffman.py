"""Canonical Huffman codes and bit packing (pure functions over numpy arrays).

A canonical code is fully described by its code lengths, so a file stores only the lengths
(4 bits per symbol here). Lengths are limited to ``MAX_CODE_LEN`` bits so that a decoder can use
one lookup table of ``2**MAX_CODE_LEN`` entries. Bits are written most significant first.
Decoders raise ``ValueError`` on any inconsistency; the codec turns that into ``InputRefused``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import numpy as np

MAX_CODE_LEN = 15


def code_lengths(freqs: Sequence[int], *, limit: int = MAX_CODE_LEN) -> list[int]:
    """Huffman code length per symbol (0 for symbols that never occur).

    Deterministic: ties are broken by symbol order. When the optimal code is deeper than
    ``limit``, frequencies are halved (never to zero) and the code rebuilt, which costs a few
    bits in rare, very skewed cases and keeps the decoder's table small.

    Args:
        freqs: non-negative count per symbol.
        limit: longest allowed code, in bits.

    Returns:
        One length per symbol. A single used symbol gets length 1.
    """
    f = [int(x) for x in freqs]
    if any(x < 0 for x in f):
        raise ValueError("frequencies must be non-negative")
    used = [s for s, x in enumerate(f) if x > 0]
    lengths = [0] * len(f)
    if len(used) == 1:
        lengths[used[0]] = 1
    if len(used) <= 1:
        return lengths
    if len(used) > 1 << limit:
        raise ValueError(f"{len(used)} symbols do not fit a code of at most {limit} bits")
    while True:
        depth = _tree_depths({s: f[s] for s in used})
        if max(depth.values()) <= limit:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        f = [(x + 1) // 2 if x > 0 else 0 for x in f]


def _tree_depths(freqs: dict[int, int]) -> dict[int, int]:
    counter = itertools.count()
    heap: list[tuple[int, int, list[int]]] = [(fr, next(counter), [s]) for s, fr in sorted(freqs.items())]
    heapq.heapify(heap)
    depth = dict.fromkeys(freqs, 0)
    while len(heap) > 1:
        fa, _, a = heapq.heappop(heap)
        fb, _, b = heapq.heappop(heap)
        for s in itertools.chain(a, b):
            depth[s] += 1
        heapq.heappush(heap, (fa + fb, next(counter), a + b))
    return depth


def canonical_codes(lengths: Sequence[int]) -> list[int]:
    """Code value per symbol for canonical Huffman ``lengths`` (0 where the length is 0).

    Raises:
        ValueError: the lengths do not form a complete prefix code (or one single 1-bit symbol).
    """
    check_lengths(lengths)
    codes = [0] * len(lengths)
    code = 0
    prev = 0
    for length, sym in sorted((n, s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def check_lengths(lengths: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``lengths`` describe a usable canonical code."""
    used = [n for n in lengths if n > 0]
    if any(n < 0 or n > MAX_CODE_LEN for n in lengths):
        raise ValueError("code length out of range")
    if not used:
        raise ValueError("empty code")
    if used == [1]:
        return
    kraft = sum(1 << (MAX_CODE_LEN - n) for n in used)
    if kraft != 1 << MAX_CODE_LEN:
        raise ValueError("code lengths do not form a complete prefix code")


def encoded_bits(freqs: Sequence[int], lengths: Sequence[int]) -> int:
    """Total payload bits of symbols with ``freqs`` under code ``lengths``."""
    return sum(int(f) * int(n) for f, n in zip(freqs, lengths))


def pack_codes(symbols: np.ndarray, lengths: Sequence[int]) -> tuple[bytes, int]:
    """Huffman-encode ``symbols`` (ints) with the canonical code for ``lengths``.

    Returns:
        ``(bytes, n_bits)``; the last byte is zero-padded.
    """
    codes = np.asarray(canonical_codes(lengths), dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size and lens[symbols].min() == 0:
        raise ValueError("a symbol without a code")
    return pack_bits(codes[symbols], lens[symbols])


def pack_bits(values: np.ndarray, widths: np.ndarray | int) -> tuple[bytes, int]:
    """Concatenate each ``values[i]`` written in ``widths[i]`` bits (MSB first) into bytes.

    Returns:
        ``(bytes, n_bits)``; the last byte is zero-padded.
    """
    values = np.asarray(values, dtype=np.int64)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
    if values.size == 0:
        return b"", 0
    w_max = int(widths.max())
    if w_max == 0:
        return b"", 0
    # (n, w_max) bit matrix, right-aligned per row, then keep the last widths[i] columns of row i.
    shifts = np.arange(w_max - 1, -1, -1, dtype=np.int64)
    bits = ((values[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    keep = shifts[None, :] < widths[:, None]
    flat = bits[keep]
    return np.packbits(flat).tobytes(), int(flat.size)


def unpack_fixed(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_bits`` with one fixed ``width``: ``count`` unsigned ints (int64).

    Raises:
        ValueError: ``data`` is shorter than ``count * width`` bits.
    """
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.int64)
    need = count * width
    if len(data) * 8 < need:
        raise ValueError("bit stream shorter than declared")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:need].reshape(count, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def decode_codes(data: bytes, count: int, lengths: Sequence[int], n_bits: int) -> np.ndarray:
    """Decode ``count`` symbols from a canonical Huffman stream of exactly ``n_bits`` bits.

    Raises:
        ValueError: the stream is shorter than ``n_bits``, a bit pattern has no symbol, or the
            symbols do not end exactly at ``n_bits``.
    """
    codes = canonical_codes(lengths)
    if len(data) * 8 < n_bits:
        raise ValueError("bit stream shorter than declared")
    table_sym, table_len = _lookup_table(codes, lengths)
    padded = data + b"\x00" * 4
    out = np.empty(count, dtype=np.int64)
    pos = 0
    shift_base = 32 - MAX_CODE_LEN
    mask = (1 << MAX_CODE_LEN) - 1
    for i in range(count):
        b = pos >> 3
        window = int.from_bytes(padded[b : b + 4], "big")
        peek = (window >> (shift_base - (pos & 7))) & mask
        n = table_len[peek]
        if n == 0:
            raise ValueError("invalid Huffman code in stream")
        out[i] = table_sym[peek]
        pos += n
        if pos > n_bits:
            raise ValueError("Huffman stream runs past its declared length")
    if pos != n_bits:
        raise ValueError("Huffman stream length does not match its symbol count")
    return out


def _lookup_table(codes: Sequence[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    size = 1 << MAX_CODE_LEN
    table_sym = [0] * size
    table_len = [0] * size
    for sym, (code, n) in enumerate(zip(codes, lengths)):
        if n == 0:
            continue
        start = code << (MAX_CODE_LEN - n)
        span = 1 << (MAX_CODE_LEN - n)
        table_sym[start : start + span] = [sym] * span
        table_len[start : start + span] = [n] * span
    return table_sym, table_len
