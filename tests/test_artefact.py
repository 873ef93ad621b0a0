"""The pared artefact (model.safetensors + pared.json): round-trip, refusals, determinism."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pared.apply import compress_
from pared.artefact import MANIFEST, WEIGHTS, load_artefact, save_artefact, sha256_file
from pared.errors import InputRefused, UsageError
from pared.quant import QuantConv2d, QuantLinear
from pared.recipe import load_recipe
from pared.tasks import get_task

SOURCE = {"kind": "builtin", "name": "digits"}


def _compress(fp32: nn.Module) -> nn.Module:
    return compress_(copy.deepcopy(fp32), load_recipe("int8"), calib=get_task("digits").calibration())


@pytest.fixture(scope="module")
def saved(digits_fp32: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _compress(digits_fp32)
    directory = tmp_path_factory.mktemp("artefact")
    manifest = save_artefact(model, directory, recipe=load_recipe("int8"), source=SOURCE)
    assert manifest["files"][WEIGHTS]["sha256"] == sha256_file(directory / WEIGHTS)
    assert manifest["source"] == SOURCE
    assert [s["technique"] for s in manifest["recipe"]] == ["smoothquant", "int8"]
    return model, directory


@pytest.fixture()
def copy_of(saved, tmp_path: Path) -> Path:
    _, directory = saved
    dst = tmp_path / "copy"
    shutil.copytree(directory, dst)
    return dst


def _x() -> torch.Tensor:
    return get_task("digits").example_inputs(32)[0]


def test_round_trip_is_bit_identical(saved) -> None:
    model, directory = saved
    loaded = load_artefact(directory)
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    assert sum(isinstance(m, QuantConv2d) for m in loaded.modules()) == 3
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2
    assert a["classifier.1.1.weight_q"].dtype == torch.int8
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_artefact_is_smaller_than_fp32(saved, digits_fp32: nn.Module) -> None:
    _, directory = saved
    fp32_bytes = sum(t.numel() * t.element_size() for t in digits_fp32.state_dict().values())
    assert (directory / WEIGHTS).stat().st_size < 0.35 * fp32_bytes


def test_corrupted_byte_is_checksum_mismatch(copy_of: Path) -> None:
    weights = copy_of / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(InputRefused, match="checksum mismatch") as info:
        load_artefact(copy_of)
    assert str(weights) in str(info.value) and info.value.exit_code == 3


def _rehash(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][WEIGHTS]["sha256"] = sha256_file(directory / WEIGHTS)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_weights_refused(copy_of: Path, keep: float) -> None:
    weights = copy_of / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputRefused, match="checksum mismatch"):
        load_artefact(copy_of)
    _rehash(copy_of)  # a manifest that agrees: the safetensors validation must still refuse it
    with pytest.raises(InputRefused) as info:
        load_artefact(copy_of)
    assert "\n" not in str(info.value) and WEIGHTS in str(info.value)


def test_missing_manifest_refused(copy_of: Path) -> None:
    (copy_of / MANIFEST).unlink()
    with pytest.raises(InputRefused, match=r"no pared\.json"):
        load_artefact(copy_of)


def test_missing_weights_refused(copy_of: Path) -> None:
    (copy_of / WEIGHTS).unlink()
    with pytest.raises(InputRefused, match="incomplete"):
        load_artefact(copy_of)


def test_missing_directory_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_artefact(tmp_path / "absent")


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_format_version_refused(copy_of: Path, version) -> None:
    _edit_manifest(copy_of, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(InputRefused, match="format"):
        load_artefact(copy_of)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.__setitem__("format", "something-else"),
        lambda m: m.__delitem__("files"),
        lambda m: m["files"][WEIGHTS].__delitem__("sha256"),
        lambda m: m.__setitem__("recipe", {"technique": "int8"}),
    ],
)
def test_malformed_manifest_refused(copy_of: Path, edit) -> None:
    _edit_manifest(copy_of, edit)
    with pytest.raises(InputRefused):
        load_artefact(copy_of)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe"])
def test_invalid_json_refused(copy_of: Path, text: str) -> None:
    (copy_of / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(InputRefused):
        load_artefact(copy_of)


def test_unknown_technique_in_manifest_is_usage_error(copy_of: Path) -> None:
    _edit_manifest(copy_of, lambda m: m["recipe"][0].__setitem__("technique", "nosuch"))
    with pytest.raises(UsageError, match="nosuch"):
        load_artefact(copy_of)


def test_unknown_source_kind_refused(copy_of: Path) -> None:
    _edit_manifest(copy_of, lambda m: m.__setitem__("source", {"kind": "url", "path": "http://x"}))
    with pytest.raises(InputRefused, match="unknown source kind"):
        load_artefact(copy_of)


def test_no_source_needs_a_model(copy_of: Path, digits_fp32: nn.Module, saved) -> None:
    _edit_manifest(copy_of, lambda m: m.__setitem__("source", None))
    with pytest.raises(UsageError, match="model="):
        load_artefact(copy_of)
    loaded = load_artefact(copy_of, model=copy.deepcopy(digits_fp32))
    with torch.no_grad():
        assert torch.equal(loaded(_x()), saved[0](_x()))


def test_compression_is_deterministic(digits_fp32: nn.Module, saved, tmp_path: Path) -> None:
    hashes = []
    for i in range(2):
        d = tmp_path / str(i)
        d.mkdir()
        save_artefact(_compress(digits_fp32), d, recipe=load_recipe("int8"), source=SOURCE)
        hashes.append(hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest())
    assert hashes[0] == hashes[1]
    assert hashes[0] == sha256_file(saved[1] / WEIGHTS)  # and equal to the module fixture's run
