"""The pared artefact: ``model.safetensors`` (the compressed state_dict) + ``pared.json``.

The JSON says how to rebuild the structure: where the original model came from and which recipe
was applied. Loading rebuilds the float model, replays the recipe in skeleton mode (structure
only, no data) and loads the tensors strictly. Nothing is unpickled; the safetensors file's
SHA-256 recorded in the JSON is checked before it is read.

Tensors that are at least half zeros (pruned weights, and the index maps of pruned, clustered
layers) are stored sparse: a bitmask (1 bit per element, packed in uint8) plus the nonzero values,
listed under ``"sparse"`` in the manifest and expanded again before loading. A 90%-sparse fp32
weight then takes 0.125 + 0.1 * 4 bytes per element instead of 4. "Zero" means all bits zero, so
-0.0 and NaN are kept as values and the round trip is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

import pared
from pared.apply import Context, compress_
from pared.atomic import atomic_write_bytes, atomic_write_text
from pared.config import BaseConfig, config_from_dict, config_to_dict
from pared.errors import InputRefused, UsageError
from pared.loading import load_into, load_state_dict_file

WEIGHTS = "model.safetensors"
MANIFEST = "pared.json"
FORMAT_VERSION = 1
_MAX_MANIFEST_BYTES = 16 << 20
SPARSE_MIN_ZEROS = 0.5  # store a tensor sparse from this fraction of zeros on
SPARSE_MIN_NUMEL = 64  # below this the mask's own bytes and the manifest entry are not worth it
_MASK, _VALUES = "::sparse_mask", "::sparse_values"
_SPARSE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
)}  # fmt: skip


def save_artefact(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    recipe: list[BaseConfig],
    source: dict[str, Any] | None,
    structure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s tensors and the manifest into ``directory`` (which must exist).

    Args:
        model: the compressed model.
        directory: destination folder (normally a temporary one renamed when the job succeeds).
        recipe: the configs that were applied, in order.
        source: how to rebuild the float model (``{"kind": "builtin", "name": "digits"}``, a
            factory, an HF directory), or None when the caller will pass the model at load time.
        structure: ``Context.structure`` of the run (data-dependent shapes to rebuild).

    Returns:
        The manifest written.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS
    tensors, sparse = sparse_encode(_unique_contiguous(model.state_dict()))
    # Serialised in memory and written by atomic_write_bytes: safetensors' own writer reports a
    # full disk as a SafetensorError, which would surface as an internal error, not exit 5.
    atomic_write_bytes(weights, safetensors_bytes(tensors))
    manifest = {
        "format": "pared-artefact",
        "format_version": FORMAT_VERSION,
        "pared_version": pared.__version__,
        "torch_version": torch.__version__,
        "source": source,
        "recipe": [config_to_dict(c) for c in recipe],
        "structure": structure or {},
        "sparse": sparse,
        "files": {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def load_artefact(directory: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compressed model saved by ``save_artefact``.

    Args:
        directory: the artefact folder.
        model: a fresh float model to rebuild on; needed when the artefact has no source.

    Raises:
        UsageError: the folder or its files are missing, or no model can be rebuilt.
        InputRefused: the manifest is invalid, a checksum does not match, tensors do not fit.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS
    expected = manifest["files"][WEIGHTS]["sha256"]
    if sha256_file(weights) != expected:
        raise InputRefused(f"checksum mismatch for {weights}: file changed or corrupt")
    if model is None:
        model = _rebuild_source(manifest.get("source"))
    import pared.recipe  # noqa: F401 - registers every technique a manifest may name

    recipe = [config_from_dict(d) for d in manifest["recipe"]]
    structure = manifest.get("structure", {})
    if not isinstance(structure, dict):
        raise InputRefused(f"{directory / MANIFEST}: structure must be a mapping")
    model = compress_(model, recipe, context=Context(skeleton=True, structure=structure))
    state = sparse_decode(load_state_dict_file(weights), manifest.get("sparse", {}), source=weights)
    load_into(model, state, strict=True, source=str(weights))
    return model.eval()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and validate ``pared.json`` in ``directory``."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise UsageError(f"artefact directory not found: {directory}")
    if not path.is_file():
        raise InputRefused(f"not a pared artefact (no {MANIFEST}): {directory}")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise InputRefused(f"{path} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputRefused(f"invalid JSON in {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "pared-artefact":
        raise InputRefused(f"{path} is not a pared artefact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputRefused(f"{path}: artefact format {manifest.get('format_version')} not supported (expected {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(WEIGHTS), dict) or "sha256" not in files[WEIGHTS]:
        raise InputRefused(f"{path}: missing checksum for {WEIGHTS}")
    if not isinstance(manifest.get("recipe"), list):
        raise InputRefused(f"{path}: recipe must be a list")
    if not (directory / WEIGHTS).is_file():
        raise InputRefused(f"artefact incomplete, missing {directory / WEIGHTS}")
    return manifest


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sparse_encode(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Replace each tensor that is at least ``SPARSE_MIN_ZEROS`` zeros by a bitmask + its nonzeros.

    Args:
        state: name -> tensor.

    Returns:
        ``(tensors, sparse)``: what to write to safetensors (``<name>::sparse_mask`` uint8 and
        ``<name>::sparse_values`` for sparse ones), and ``{name: {"shape", "dtype"}}`` for the
        manifest.
    """
    out: dict[str, torch.Tensor] = {}
    sparse: dict[str, Any] = {}
    for name, t in state.items():
        if name.endswith((_MASK, _VALUES)):
            raise UsageError(f"tensor name {name!r} ends with a suffix reserved for sparse storage")
        key = str(t.dtype).removeprefix("torch.")
        if key not in _SPARSE_DTYPES or t.numel() < SPARSE_MIN_NUMEL:
            out[name] = t
            continue
        keep = _nonzero_bits(t.reshape(-1))
        if int(keep.sum()) > (1 - SPARSE_MIN_ZEROS) * t.numel():
            out[name] = t
            continue
        out[name + _MASK] = torch.from_numpy(np.packbits(keep.cpu().numpy()))
        out[name + _VALUES] = t.reshape(-1)[keep].contiguous()
        sparse[name] = {"shape": list(t.shape), "dtype": key}
    return out, sparse


def sparse_decode(tensors: dict[str, torch.Tensor], sparse: Any, *, source: Path) -> dict[str, torch.Tensor]:
    """Inverse of ``sparse_encode``; every inconsistency is an ``InputRefused`` naming ``source``."""
    if not isinstance(sparse, dict):
        raise InputRefused(f"{source}: the manifest's 'sparse' entry must be a mapping")
    out = dict(tensors)
    for name, meta in sparse.items():
        bad = f"{source}: sparse tensor {name!r}"
        if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or meta["dtype"] not in _SPARSE_DTYPES:
            raise InputRefused(f"{bad} has no valid dtype in the manifest")
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InputRefused(f"{bad} has no valid shape in the manifest")
        mask, values = out.pop(name + _MASK, None), out.pop(name + _VALUES, None)
        if mask is None or values is None or name in out:
            raise InputRefused(f"{bad}: mask or values missing from the weights file")
        numel = math.prod(shape)
        if mask.dtype != torch.uint8 or mask.shape != ((numel + 7) // 8,):
            raise InputRefused(f"{bad}: mask has the wrong dtype or length")
        keep = torch.from_numpy(np.unpackbits(mask.numpy())).bool()
        if keep[numel:].any():
            raise InputRefused(f"{bad}: mask sets bits past the tensor's end")
        keep = keep[:numel]
        dtype = _SPARSE_DTYPES[meta["dtype"]]
        if values.dtype != dtype or values.shape != (int(keep.sum()),):
            raise InputRefused(
                f"{bad}: {values.numel()} values of {values.dtype} for {int(keep.sum())} mask bits of {dtype}"
            )
        dense = torch.zeros(numel, dtype=dtype)
        dense[keep] = values
        out[name] = dense.reshape(shape)
    leftover = [k for k in out if k.endswith((_MASK, _VALUES))]
    if leftover:
        raise InputRefused(f"{source}: sparse parts without a manifest entry: {leftover[:5]}")
    return out


def _nonzero_bits(flat: torch.Tensor) -> torch.Tensor:
    # Compare the bit patterns, not the values: -0.0 is kept as a value, so decoding is bit-exact.
    if flat.is_floating_point():
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
    return flat != 0


def _rebuild_source(source: Any) -> nn.Module:
    from pared.loading import load_factory, load_hf_directory
    from pared.tasks import get_task

    if not isinstance(source, dict):
        raise UsageError("this artefact records no source model: pass model=<fresh float model>")
    kind = source.get("kind")
    if kind == "builtin":
        return get_task(str(source.get("name"))).model()
    if kind == "factory":
        model = load_factory(str(source.get("spec")))
        if source.get("weights"):
            strict = not source.get("non_strict", False)  # rebuild exactly as the compress run loaded
            load_into(model, load_state_dict_file(source["weights"]), strict=strict)
        return model
    if kind == "hf-directory":
        return load_hf_directory(Path(str(source.get("path"))))
    raise InputRefused(f"unknown source kind in manifest: {kind!r}")


def _unique_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; tied weights are saved once per name as a copy.
    return {k: v.detach().contiguous().clone() if _is_view(v) else v.detach().contiguous() for k, v in state.items()}


def _is_view(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
