"""Deep Compression's last stage as a recipe step, and the paper's stage-by-stage size table.

``EntropyCodeConfig`` ends a prune -> fine-tune -> cluster -> fine-tune recipe: it rounds the
stored floats to fp16 (so the evaluated model is exactly what the ``.prdc`` file holds) and records
the encoded size. ``measure_stages`` writes the four files of the paper's table and measures them:
fp32 safetensors, pruned (pared artefact with sparse tensors), +clustered (fixed-width
bit-packed ``.prdc``), +Huffman (``.prdc``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from pared.apply import Context, register
from pared.artefact import WEIGHTS, save_artefact
from pared.cluster.codec import encode_with_stats, round_to_storage_, save_compressed
from pared.config import BaseConfig, register_config


@register_config("entropy_code")
@dataclasses.dataclass
class EntropyCodeConfig(BaseConfig):
    """Prepare the model for the ``.prdc`` format and record its size (the last Deep Compression step).

    Attributes:
        half: round float32 tensors (codebooks, biases, BatchNorm) to fp16 values in place.
        entropy: measure the Huffman-coded size (else the fixed-width bit-packed size).
    """

    half: bool = True
    entropy: bool = True


@register(EntropyCodeConfig)
def _apply_entropy_code(model: nn.Module, cfg: EntropyCodeConfig, ctx: Context) -> nn.Module:
    if ctx.skeleton:
        return model  # a saved state already holds the rounded values
    if cfg.half:
        round_to_storage_(model)
    data, records = encode_with_stats(model.state_dict(), entropy=cfg.entropy)
    ctx.summary.append({"technique": "entropy_code", "encoded_bytes": len(data), "records": records,
                        "note": "write the file with pared.cluster.save_compressed"})
    return model


@dataclasses.dataclass
class DeepCompressionResult:
    """Sizes in bytes of the real files of each stage, and their ratio to the fp32 file.

    ``files`` maps each stage to the path written (inside the directory given to
    ``measure_stages``).
    """

    fp32: int
    pruned: int
    clustered: int
    huffman: int
    files: dict[str, str]
    records: list[dict[str, Any]]

    def ratios(self) -> dict[str, float]:
        """``fp32 bytes / stage bytes`` per stage (the paper's "compression rate")."""
        return {s: self.fp32 / getattr(self, s) for s in ("fp32", "pruned", "clustered", "huffman")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the ratios."""
        return {**dataclasses.asdict(self), "ratios": self.ratios()}


def measure_stages(
    fp32: nn.Module,
    pruned: nn.Module,
    clustered: nn.Module,
    directory: str | os.PathLike[str] | None = None,
    *,
    half: bool = True,
) -> DeepCompressionResult:
    """Write the four stage files and measure their bytes.

    Args:
        fp32: the dense float model (``fp32.safetensors``).
        pruned: the pruned, fine-tuned model (``pruned/model.safetensors``: a pared artefact,
            sparse tensors as bitmask + values; the manifest is not counted).
        clustered: the clustered model (``clustered.prdc`` fixed-width, ``huffman.prdc``);
            with ``half`` it is rounded to fp16 in place first, like ``save_compressed``.
        directory: where to write; a temporary directory (deleted afterwards) when None.
        half: store floats as fp16.

    Returns:
        The sizes; ``files`` lists the paths (gone if ``directory`` was None).
    """
    if directory is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measure_stages(fp32, pruned, clustered, tmp, half=half)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {"fp32": d / "fp32.safetensors", "pruned": d / "pruned" / WEIGHTS,
             "clustered": d / "clustered.prdc", "huffman": d / "huffman.prdc"}
    save_file({k: v.detach().contiguous() for k, v in fp32.state_dict().items()}, str(files["fp32"]))
    files["pruned"].parent.mkdir(exist_ok=True)
    save_artefact(pruned, files["pruned"].parent, recipe=[], source=None)
    save_compressed(clustered, files["clustered"], entropy=False, half=half)
    result = save_compressed(clustered, files["huffman"], entropy=True, half=half)
    sizes = {k: p.stat().st_size for k, p in files.items()}
    return DeepCompressionResult(**sizes, files={k: str(p) for k, p in files.items()}, records=result["records"])
