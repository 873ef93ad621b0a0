"""The compact storage format of Deep Compression (stage 3): ``.prdc`` files.

Layout (integers are unsigned LEB128 varints unless a width is given, little-endian)::

    b"PRDC"  u8 format version  u8 flags (bit 0: Huffman)  varint record count
    record*  (in state-dict order)
    u32 CRC-32 of every byte before it

    dense record:     u8 kind=0, name, u8 dtype, u8 stored dtype, shape, raw bytes
    clustered record: u8 kind=1, name (the layer, keys "<name>.codebook"/"<name>.indices"),
                      u8 indices dtype, shape, varint k, u8 codebook dtype, u8 stored dtype,
                      codebook bytes, varint entries, position/index streams (below)

A clustered layer is a sequence of entries ``(delta, index)`` over its flattened weight: ``delta``
zeros are skipped, then the weight at the next position is ``[0, *codebook][index]``. A gap longer
than the cap ``C`` is bridged by filler entries ``(C, 0)`` (an explicit zero), as in the paper;
zeros after the last entry are implicit. Fixed-width files store ``ceil(log2(C + 1))``-bit deltas
and ``ceil(log2(k + 1))``-bit indices; Huffman files store canonical code lengths (4 bits per
symbol) and the two Huffman streams. ``C`` is chosen per layer to minimise the total size.

Floating tensors are stored as fp16 whenever that is lossless, so ``decode(encode(s))`` is
bit-exact for any state. ``save_compressed(half=True)`` first rounds floats to fp16 (biases,
codebooks, BatchNorm): the file then decodes to exactly the model ``round_to_storage_`` gives.
Every read is bounds-checked and the CRC is verified first, so a corrupted or truncated file is
refused with ``InputRefused`` naming it, never loaded as a wrong model.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pared.atomic import atomic_write_bytes
from pared.cluster import huffman
from pared.cluster.deltas import MAX_HUFFMAN_CAP, best_cap_fixed, best_cap_huffman, bits_for, to_entries
from pared.cluster.weight_sharing import CLUSTERED, ClusteredConv2d, ClusteredLinear
from pared.errors import InputRefused, UsageError
from pared.loading import load_into

MAGIC = b"PRDC"
FORMAT_VERSION = 1
_HUFFMAN = 1
_DENSE, _CLUSTERED = 0, 1
_MAX_NAME, _MAX_NDIM = 1024, 8
_MAX_CODEBOOK = 4096  # index alphabets stay far below the 2**15 symbols a 15-bit code can hold
MAX_FILE_BYTES = 4 << 30

_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip
_CODE = {d: i for i, d in enumerate(_DTYPES)}


# ------------------------------------------------------------------------------ encoding


def encode(state: dict[str, torch.Tensor], *, entropy: bool = True) -> bytes:
    """Serialize a state dict; ``<p>.codebook``/``<p>.indices`` pairs are coded as clustered layers.

    Args:
        state: name -> tensor (CPU or not; copied to CPU).
        entropy: Huffman-code the clustered streams; False writes fixed-width bit-packed streams.

    Returns:
        The file's bytes.
    """
    return encode_with_stats(state, entropy=entropy)[0]


def encode_with_stats(
    state: dict[str, torch.Tensor], *, entropy: bool = True
) -> tuple[bytes, list[dict[str, Any]]]:
    """``encode`` plus one size line per record (bytes, and for clustered layers the streams)."""
    if sys.byteorder != "little":
        raise UsageError("the .prdc codec needs a little-endian machine")
    state = {k: v.detach().cpu() for k, v in state.items()}
    pairs = _clustered_pairs(state)
    body = bytearray()
    stats: list[dict[str, Any]] = []
    done: set[str] = set()
    records = 0
    for key, t in state.items():
        if key in done:
            continue
        start = len(body)
        prefix = _layer_of(key)
        if prefix is not None and prefix in pairs:
            line = _put_clustered(body, prefix, state[f"{prefix}.codebook"], state[f"{prefix}.indices"], entropy)
            done.update((f"{prefix}.codebook", f"{prefix}.indices"))
        else:
            _put_dense(body, key, t)
            line = {"name": key, "kind": "dense", "numel": t.numel()}
            done.add(key)
        line["bytes"] = len(body) - start
        stats.append(line)
        records += 1
    head = MAGIC + bytes([FORMAT_VERSION, _HUFFMAN if entropy else 0]) + _varint(records)
    data = head + bytes(body)
    return data + zlib.crc32(data).to_bytes(4, "little"), stats


def _layer_of(key: str) -> str | None:
    """``"fc1"`` for ``"fc1.codebook"`` or ``"fc1.indices"``, else None."""
    for suffix in (".codebook", ".indices"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _clustered_pairs(state: dict[str, torch.Tensor]) -> set[str]:
    out = set()
    for key, cb in state.items():
        if not key.endswith(".codebook"):
            continue
        prefix = key[: -len(".codebook")]
        idx = state.get(f"{prefix}.indices")
        if (idx is None or cb.dim() != 1 or not cb.is_floating_point() or idx.dtype not in _CODE
                or idx.is_floating_point() or idx.dtype == torch.bool or cb.dtype not in _CODE):
            continue
        if cb.numel() > _MAX_CODEBOOK or cb.numel() > torch.iinfo(idx.dtype).max:
            continue  # stored densely: the decoder accepts only codebooks the index dtype can address
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > cb.numel()):
            continue
        out.add(prefix)
    return out


def _put_dense(out: bytearray, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _CODE:
        raise UsageError(f"cannot store tensor {name!r} of dtype {t.dtype} in a .prdc file")
    stored = _stored_dtype(t)
    out += bytes([_DENSE]) + _name(name) + bytes([_CODE[t.dtype], _CODE[stored]]) + _shape(t.shape)
    out += _raw(t.to(stored))


def _put_clustered(
    out: bytearray, name: str, codebook: torch.Tensor, indices: torch.Tensor, entropy: bool
) -> dict[str, Any]:
    k = codebook.numel()
    stored = _stored_dtype(codebook)
    out += bytes([_CLUSTERED]) + _name(name) + bytes([_CODE[indices.dtype]]) + _shape(indices.shape)
    out += _varint(k) + bytes([_CODE[codebook.dtype], _CODE[stored]]) + _raw(codebook.to(stored))
    idx = indices.reshape(-1).to(torch.int64).numpy()
    nz = np.flatnonzero(idx)
    gaps = np.diff(nz, prepend=-1) - 1
    values = idx[nz]
    before = len(out)
    if entropy:
        cap = best_cap_huffman(gaps, values, k)
        deltas, symbols = to_entries(gaps, values, cap)
        out += _varint(deltas.size) + _varint(cap)
        idx_lengths = huffman.code_lengths(np.bincount(symbols, minlength=k + 1))
        out += _nibbles(idx_lengths)
        if cap > 0:
            d_lengths = huffman.code_lengths(np.bincount(deltas, minlength=cap + 1))
            out += _nibbles(d_lengths)
            d_bytes, d_bits = huffman.pack_codes(deltas, d_lengths)
            out += _varint(d_bits) + d_bytes
        i_bytes, i_bits = huffman.pack_codes(symbols, idx_lengths) if symbols.size else (b"", 0)
        out += _varint(i_bits) + i_bytes
    else:
        width = bits_for(k)
        cap = best_cap_fixed(gaps, width)
        deltas, symbols = to_entries(gaps, values, cap)
        out += _varint(deltas.size) + _varint(cap)
        out += huffman.pack_bits(deltas, bits_for(cap))[0] + huffman.pack_bits(symbols, width)[0]
    return {"name": name, "kind": "clustered", "numel": int(idx.size), "nonzero": int(nz.size), "clusters": k,
            "entries": int(deltas.size), "delta_cap": cap, "stream_bytes": len(out) - before}


def _stored_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype == torch.float32 and torch.equal(t.to(torch.float16).to(torch.float32), t):
        return torch.float16  # lossless: the value is exactly representable
    return t.dtype


def _raw(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > _MAX_NAME:
        raise UsageError(f"tensor name longer than {_MAX_NAME} bytes: {name[:40]}...")
    return _varint(len(raw)) + raw


def _shape(shape: torch.Size) -> bytes:
    if len(shape) > _MAX_NDIM:
        raise UsageError(f"tensors of more than {_MAX_NDIM} dimensions are not supported")
    return bytes([len(shape)]) + b"".join(_varint(d) for d in shape)


def _nibbles(lengths: list[int]) -> bytes:
    padded = list(lengths) + [0] * (len(lengths) % 2)
    return bytes((padded[i] << 4) | padded[i + 1] for i in range(0, len(padded), 2))


# ------------------------------------------------------------------------------ decoding


class _Reader:
    """Bounds-checked cursor over the record section; any overrun is a ``ValueError``."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("record runs past the end of the file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        n = shift = 0
        while True:
            byte = self.u8()
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def dtype(self) -> torch.dtype:
        code = self.u8()
        if code >= len(_DTYPES):
            raise ValueError(f"unknown dtype code {code}")
        return _DTYPES[code]

    def name(self) -> str:
        n = self.varint()
        if n > _MAX_NAME:
            raise ValueError("name too long")
        return self.take(n).decode("utf-8")

    def shape(self) -> tuple[int, ...]:
        ndim = self.u8()
        if ndim > _MAX_NDIM:
            raise ValueError("too many dimensions")
        return tuple(self.varint() for _ in range(ndim))

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        raw = self.take(n * torch.empty((), dtype=dtype).element_size())
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)

    def nibbles(self, count: int) -> list[int]:
        raw = self.take((count + 1) // 2)
        out = [v for b in raw for v in (b >> 4, b & 0xF)]
        if count % 2 and out[-1]:
            raise ValueError("nonzero padding nibble")
        return out[:count]


def decode(data: bytes, *, max_elements: int = 1 << 34) -> dict[str, torch.Tensor]:
    """Rebuild the state dict from ``encode``'s bytes, bit-exact.

    Args:
        data: the file's bytes.
        max_elements: refuse files declaring more tensor elements in total (a memory bound).

    Raises:
        ValueError: bad magic, version, CRC, or any malformed or truncated record (the caller
            words it; ``load_compressed`` raises ``InputRefused`` naming the file).
    """
    return _decode(data, max_elements)[0]


def _decode(data: bytes, max_elements: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    if len(data) < len(MAGIC) + 7 or data[:4] != MAGIC:
        raise ValueError("not a .prdc file (bad magic number or too short)")
    if int.from_bytes(data[-4:], "little") != zlib.crc32(data[:-4]):
        raise ValueError("CRC mismatch: the file is corrupt or truncated")
    if data[4] != FORMAT_VERSION:
        raise ValueError(f"format version {data[4]} not supported (this pared reads {FORMAT_VERSION})")
    flags = data[5]
    if flags & ~_HUFFMAN:
        raise ValueError(f"unknown flags {flags:#x}")
    r = _Reader(data[:-4], 6)
    records = r.varint()
    state: dict[str, torch.Tensor] = {}
    clustered: list[str] = []
    budget = [max_elements]
    for _ in range(records):
        kind = r.u8()
        if kind == _DENSE:
            name = r.name()
            dtype, stored, shape = r.dtype(), r.dtype(), r.shape()
            if stored != dtype and (dtype, stored) != (torch.float32, torch.float16):
                raise ValueError(f"tensor {name!r}: invalid stored dtype")
            _spend(budget, math.prod(shape))
            _put(state, name, r.tensor(stored, shape).to(dtype))
        elif kind == _CLUSTERED:
            name = r.name()
            clustered.append(name)
            for key, t in _get_clustered(r, bool(flags & _HUFFMAN), budget).items():
                _put(state, f"{name}.{key}", t)
        else:
            raise ValueError(f"unknown record kind {kind}")
    if r.pos != len(r.data):
        raise ValueError("trailing bytes after the last record")
    return state, clustered


def _spend(budget: list[int], n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise ValueError("the file declares more tensor elements than allowed")


def _put(state: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> None:
    if name in state:
        raise ValueError(f"duplicate tensor {name!r}")
    state[name] = t


def _get_clustered(r: _Reader, entropy: bool, budget: list[int]) -> dict[str, torch.Tensor]:
    idx_dtype, shape = r.dtype(), r.shape()
    numel = math.prod(shape)
    _spend(budget, numel)
    k = r.varint()
    if idx_dtype.is_floating_point or idx_dtype == torch.bool:
        raise ValueError("invalid index dtype")
    if k > min(torch.iinfo(idx_dtype).max, _MAX_CODEBOOK):
        raise ValueError("invalid index dtype for the codebook size")
    cb_dtype, cb_stored = r.dtype(), r.dtype()
    lossless = cb_stored == cb_dtype or (cb_dtype, cb_stored) == (torch.float32, torch.float16)
    if not cb_dtype.is_floating_point or not lossless:
        raise ValueError("invalid codebook dtype")
    codebook = r.tensor(cb_stored, (k,)).to(cb_dtype)
    entries, cap = r.varint(), r.varint()
    if entries > numel or cap > 0xFFFF:
        raise ValueError("more entries than weights, or delta cap out of range")
    if entropy:
        if cap > MAX_HUFFMAN_CAP:
            raise ValueError("delta cap out of range")
        idx_lengths = r.nibbles(k + 1)
        deltas = np.zeros(entries, dtype=np.int64)
        if cap > 0:
            d_lengths = r.nibbles(cap + 1)
            d_bits = r.varint()
            deltas = huffman.decode_codes(r.take((d_bits + 7) // 8), entries, d_lengths, d_bits)
        i_bits = r.varint()
        raw = r.take((i_bits + 7) // 8)
        symbols = huffman.decode_codes(raw, entries, idx_lengths, i_bits) if entries else np.zeros(0, np.int64)
        if not entries and i_bits:
            raise ValueError("index stream without entries")
    else:
        d_width, i_width = bits_for(cap), bits_for(k)
        deltas = huffman.unpack_fixed(r.take((entries * d_width + 7) // 8), entries, d_width)
        symbols = huffman.unpack_fixed(r.take((entries * i_width + 7) // 8), entries, i_width)
    if (deltas > cap).any() or (symbols > k).any():
        raise ValueError("stream value out of range")
    positions = np.cumsum(deltas + 1) - 1
    if entries and positions[-1] >= numel:
        raise ValueError("entries run past the end of the layer")
    flat = np.zeros(numel, dtype=np.int64)
    flat[positions] = symbols
    indices = torch.from_numpy(flat).to(idx_dtype).reshape(shape)
    return {"codebook": codebook, "indices": indices}


# ------------------------------------------------------------------------------ files


def round_to_storage_(model: nn.Module) -> nn.Module:
    """Round float32 parameters and buffers to fp16 values in place, where finite in fp16.

    This is the lossy step of ``save_compressed(half=True)``: evaluate the model after it to
    measure exactly what the file will hold.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype == torch.float32 and t.numel() and bool(t.abs().max() <= 65504):
                t.copy_(t.to(torch.float16).to(torch.float32))
    return model


def save_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, entropy: bool = True, half: bool = True
) -> dict[str, Any]:
    """Write ``model``'s state as a ``.prdc`` file, atomically.

    Args:
        model: typically a pruned and clustered model (``ClusteredLinear``/``ClusteredConv2d``);
            any other tensor is stored densely.
        path: destination file.
        entropy: Huffman-code the clustered layers (else fixed-width bit-packing).
        half: round float32 tensors to fp16 first (``round_to_storage_``; changes ``model``).

    Returns:
        ``{"path", "bytes", "records": [...]}`` with the size of every record.

    Example:
        >>> save_compressed(model, "lenet.prdc")
        >>> model2 = load_compressed("lenet.prdc", LeNet300())
    """
    if half:
        round_to_storage_(model)
    data, stats = encode_with_stats(model.state_dict(), entropy=entropy)
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": len(data), "records": stats}


def load_compressed(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load a ``.prdc`` file into ``model`` (the float architecture, or an already clustered one).

    Layers stored as clustered are replaced by ``ClusteredLinear``/``ClusteredConv2d`` with the
    file's codebook size before the strict load.

    Raises:
        UsageError: the path is missing or unreadable.
        InputRefused: the file is corrupt, truncated or not a ``.prdc`` file, or its tensors do
            not fit ``model`` (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"compressed model file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InputRefused(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    try:
        state, clustered = _decode(data, 1 << 34)
    except (ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise InputRefused(f"corrupt or truncated compressed model {path}: {exc}") from None
    for name in clustered:
        _make_clustered(model, name, state[f"{name}.codebook"].numel(), path)
    load_into(model, state, strict=True, source=str(path))
    return model.eval()


def _make_clustered(model: nn.Module, name: str, k: int, path: Path) -> None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise InputRefused(f"{path}: clustered layer {name!r} is not in the model") from None
    if isinstance(m, CLUSTERED) and m.codebook.numel() == k:
        return
    if isinstance(m, (nn.Linear, ClusteredLinear)):
        new: nn.Module = ClusteredLinear(m.in_features, m.out_features, k, bias=m.bias is not None)
    elif isinstance(m, nn.Conv2d):
        new = ClusteredConv2d(m, k)
    elif isinstance(m, ClusteredConv2d):
        new = ClusteredConv2d(_conv_like(m), k)
    else:
        raise InputRefused(f"{path}: layer {name!r} is a {type(m).__name__}, not a Linear or Conv2d")
    model.set_submodule(name, new)


def _conv_like(m: ClusteredConv2d) -> nn.Conv2d:
    shape = m.indices.shape
    return nn.Conv2d(m.in_channels, m.out_channels, tuple(shape[2:]), stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups, bias=m.bias is not None, device="meta")
