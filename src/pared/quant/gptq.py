"""GPTQ: Hessian-aware rounding of a weight matrix, one column at a time (pure function).

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023. Each column is rounded, and its rounding error is spread over the
not-yet-rounded columns in proportion to the inverse Hessian of the layer's inputs, so the
layer's output error on the calibration data stays small.
"""

from __future__ import annotations

import torch

from pared.quant.primitives import choose_qparams, qrange


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) group-wise along ``in`` with GPTQ error compensation.

    Args:
        weight: float weight, shape (N, K); K must be a multiple of ``group_size``.
        hessian: (K, K) ``2/n * X^T X`` of the layer's calibration inputs.
        bits: 4 or 8 (asymmetric unsigned codes with a zero point per group).
        group_size: columns sharing one scale and zero point.
        damp: fraction of the mean Hessian diagonal added to it for numerical stability.
        block: columns processed per lazy-update block (a multiple of ``group_size``).
        act_order: round columns in order of decreasing Hessian diagonal (the inputs that
            matter most first, while the most error can still be compensated). Group scales are
            then fixed up front from the float weight ("static groups"), so groups stay
            contiguous in the original layout that integer kernels expect.

    Returns:
        ``(codes uint8 (N, K), scales float (N, K // group_size), zero_points uint8 same shape)``.
    """
    w = weight.detach().double().clone()
    n_out, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    qmin, qmax = qrange(bits, signed=False)
    # Static groups: scale and zero point per original group, with the clipping that minimises
    # each group's own rounding error, decided before any error is propagated.
    _, scales, zeros = rtn_quantize(w.float(), bits=bits, group_size=group_size)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    col_scale = scales.double()[:, order // group_size]
    col_zero = zeros.double()[:, order // group_size]
    codes = torch.zeros(n_out, k, dtype=torch.uint8)
    for start in range(0, k, block):
        end = min(start + block, k)
        w_blk, err_blk, h_blk = w[:, start:end].clone(), torch.zeros(n_out, end - start, dtype=w.dtype), h_inv[start:end, start:end]
        for i in range(end - start):
            s, z = col_scale[:, start + i], col_zero[:, start + i]
            q = torch.clamp(torch.round(w_blk[:, i] / s) + z, qmin, qmax)
            codes[:, order[start + i]] = q.to(torch.uint8)
            err = (w_blk[:, i] - (q - z) * s) / h_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) @ h_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ h_inv[start:end, end:]
    return codes, scales, zeros


# Shrink factors tried for each group's range: a slightly clipped range often rounds the bulk
# of the weights more finely than it costs on the few extremes (the same search AWQ/HQQ use).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise quantization with a per-group clipping search.

    Returns the same triple as ``gptq_quantize``: codes (N, K), scales and zero points (N, K/group).
    """
    n_out, k = weight.shape
    w = weight.detach().float().reshape(n_out, k // group_size, group_size)
    lo, hi = w.min(dim=2).values, w.max(dim=2).values
    qmin, qmax = qrange(bits, signed=False)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = torch.ones_like(lo), torch.zeros_like(lo, dtype=torch.int32)
    for ratio in CLIP_RATIOS:
        s, z = choose_qparams(lo * ratio, hi * ratio, bits=bits, symmetric=False, signed=False)
        q = torch.clamp(torch.round(w / s.unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax)
        err = ((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - w).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    codes = torch.clamp(torch.round(w / best_s.unsqueeze(-1)) + best_z.unsqueeze(-1), qmin, qmax).to(torch.uint8)
    return codes.reshape(n_out, k), best_s, best_z.to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Float weight (N, K) from group-wise codes, scales and zero points."""
    n_out, k = codes.shape
    group = k // scales.shape[1]
    q = codes.float().reshape(n_out, -1, group) - zeros.float().unsqueeze(-1)
    return (q * scales.unsqueeze(-1)).reshape(n_out, k)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim (even index in the low nibble)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
