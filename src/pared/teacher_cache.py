"""Teacher outputs kept per training sample, so distillation runs the teacher once per sample.

Keys are hashes of each sample's inputs. For right-padded token inputs (with an attention mask)
the key and the stored rows cover only the sample's real tokens: the same sentence padded to
another length in a later batch still hits, and its rows are zero-padded back to the batch's
length (every masked loss ignores padded positions).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


class TeacherCache:
    """Teacher tensors per training sample, keyed by a hash of the sample's inputs.

    With a token mask, a sample's key and its stored rows cover only its real tokens, so the same
    sentence padded to another batch length hits; rows are padded back with zeros, which every
    masked loss ignores.
    """

    def __init__(self) -> None:
        self.rows: dict[bytes, list[torch.Tensor]] = {}

    def keys(self, inputs: tuple[torch.Tensor, ...], lengths: list[int] | None) -> list[bytes]:
        """One key per sample of the batch; ``lengths`` are the real-token counts, or None."""
        out = []
        for b in range(inputs[0].shape[0]):
            h = hashlib.sha1()
            for t in inputs:
                row = t[b, : lengths[b]] if lengths is not None else t[b]
                h.update(row.detach().cpu().contiguous().numpy().tobytes())
            out.append(h.digest())
        return out

    def lookup(
        self, keys: list[bytes], seq_len: int | None, device: torch.device
    ) -> list[torch.Tensor] | None:
        """The stored tensors re-batched (per-token rows padded to ``seq_len``), or None unless
        every sample hits."""
        if not all(k in self.rows for k in keys):
            return None
        columns = zip(*(self.rows[k] for k in keys), strict=True)
        return [torch.stack([_fit(r, seq_len) for r in col]).to(device) for col in columns]

    def store(
        self,
        keys: list[bytes],
        tensors: list[torch.Tensor],
        lengths: list[int] | None,
        seq_len: int | None,
    ) -> None:
        """Keep sample b's slice of every tensor (per-token rows cut to its real tokens)."""
        for b, key in enumerate(keys):
            self.rows[key] = [
                _trim(t[b], seq_len, lengths[b] if lengths else None) for t in tensors
            ]


def _trim(row: torch.Tensor, seq_len: int | None, length: int | None) -> torch.Tensor:
    # A row is per-token when its first dim is the batch's sequence length.
    if length is not None and row.dim() >= 2 and row.shape[0] == seq_len:
        row = row[:length]
    return row.detach().cpu().clone()


def _fit(row: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    if seq_len is None or row.dim() < 2 or row.shape[0] >= seq_len:
        return row
    return F.pad(row, (0,) * (2 * (row.dim() - 1)) + (0, seq_len - row.shape[0]))
