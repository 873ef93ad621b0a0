"""Loader security and robustness: reliability.md cases 1-16 and 20 for pared.loading."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import marshal
import operator
import os
import pickle
import pkgutil
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pared.errors import InputRefused, UsageError
from pared.loading import (
    KeyReport,
    detect_format,
    load_factory,
    load_hf_directory,
    load_into,
    load_state_dict_file,
    resolve_model,
)


class Payload:
    """Pickles as a call to ``fn(*args)``: what an attacker puts in a checkpoint."""

    def __init__(self, fn: object, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


@dataclasses.dataclass
class UserThing:
    """A harmless class that is still not on torch's allowlist."""

    x: int = 1


def _write(path: Path, obj: object, container: str) -> Path:
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # raw pickle at the default protocol (uses FRAME/STACK_GLOBAL)
        path.write_bytes(pickle.dumps(obj))
    return path


def _tiny_state() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bias": torch.ones(2)}

Bert = tuple[Path, nn.Module]  # a saved tiny BertModel directory and the model itself

# --------------------------------------------------------------------------- pickle payloads

# name -> (payload built from the canary path, text the refusal must quote)
PAYLOADS = {
    "system": (lambda c: Payload(os.system, (f"touch {c}",)), "system"),
    "eval": (lambda c: Payload(eval, (f"open({str(c)!r}, 'w')",)), "eval"),
    "exec": (lambda c: Payload(exec, (f"open({str(c)!r}, 'w')",)), "exec"),
    "popen": (lambda c: Payload(subprocess.Popen, (["touch", str(c)],)), "Popen"),
    # scanner-bypass gadgets (reliability case 3): refused by the allowlist, named in the message
    "runpy": (lambda c: Payload(runpy._run_code, (f"open({str(c)!r}, 'w')", {})), "_run_code"),
    "import_module": (lambda c: Payload(importlib.import_module, ("os",)), "import_module"),
    "resolve_name": (lambda c: Payload(pkgutil.resolve_name, ("os:system",)), "resolve_name"),
    "attrgetter": (lambda c: Payload(operator.attrgetter, ("system",)), "operator.attrgetter"),
    "partial": (lambda c: Payload(functools.partial, (os.system, f"touch {c}")), "partial"),
    "marshal": (lambda c: Payload(marshal.loads, (b"N",)), "marshal.loads"),
}


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_pickle_payload_refused_canary_absent(tmp_path: Path, container: str, payload: str) -> None:
    canary = tmp_path / "CANARY"
    make, global_name = PAYLOADS[payload]
    path = _write(tmp_path / "evil.pt", {"w": torch.zeros(2), "x": make(canary)}, container)
    with pytest.raises(InputRefused) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert global_name in message and "--trust-pickle" in message
    assert "Unsupported global: GLOBAL" in message
    assert "\n" not in message
    assert not canary.exists()
    assert info.value.exit_code == 3


def test_posix_system_quoted_exactly(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    path = _write(tmp_path / "evil.pt", {"x": Payload(os.system, (f"touch {canary}",))}, "zip")
    with pytest.raises(InputRefused, match=r"Unsupported global: GLOBAL (posix|nt)\.system"):
        load_state_dict_file(path)
    assert not canary.exists()


def test_payload_in_hf_directory_bin_refused(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    torch.save({"x": Payload(os.system, (f"touch {canary}",))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputRefused, match="system.*--trust-pickle"):
        load_hf_directory(tmp_path)
    assert not canary.exists()


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_benign_unlisted_class_refused_by_name(tmp_path: Path, container: str) -> None:
    path = _write(tmp_path / "thing.pt", {"w": torch.zeros(2), "cfg": UserThing()}, container)
    with pytest.raises(InputRefused, match=r"UserThing.*--trust-pickle"):
        load_state_dict_file(path)


def test_trust_pickle_loads_plain_dict_and_warns(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.pt", _tiny_state(), "zip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_state_dict_file(path, trust_pickle=True)
    assert torch.equal(state["weight"], _tiny_state()["weight"])
    assert sum("trust-pickle" in str(w.message) for w in caught) == 1


def test_plain_pt_loads_without_trust(tmp_path: Path) -> None:
    for container in ("zip", "legacy"):
        state = load_state_dict_file(_write(tmp_path / f"{container}.pt", _tiny_state(), container))
        assert set(state) == {"weight", "bias"}
        assert torch.equal(state["bias"], torch.ones(2))


def test_wrappers_unwrapped_and_other_objects_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "ckpt.pt", {"state_dict": _tiny_state(), "epoch": 3}, "zip")
    assert set(load_state_dict_file(path)) == {"weight", "bias"}
    path = _write(tmp_path / "model.pt", {"model": _tiny_state()}, "zip")
    assert set(load_state_dict_file(path)) == {"weight", "bias"}
    with pytest.raises(InputRefused, match="found list"):
        load_state_dict_file(_write(tmp_path / "list.pt", [torch.zeros(1)], "zip"))
    with pytest.raises(InputRefused, match="entry 'epoch' is a int"):
        load_state_dict_file(_write(tmp_path / "mix.pt", {"w": torch.zeros(1), "epoch": 3}, "zip"))


# --------------------------------------------------------------------------- safetensors


def _raw_safetensors(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    n = len(blob) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + blob + data)
    return path


def test_safetensors_round_trip(tmp_path: Path) -> None:
    save_file(_tiny_state(), tmp_path / "w.safetensors")
    assert detect_format(tmp_path / "w.safetensors") == "safetensors"
    state = load_state_dict_file(tmp_path / "w.safetensors")
    assert all(torch.equal(state[k], v) for k, v in _tiny_state().items())


def _entry(start: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [start, end]}


A = _entry(0, 8)  # a valid F32 [2] tensor at the start of the data section
HUGE = 2**40 * 2**40 * 4
# case -> (arguments of _raw_safetensors, pattern the refusal must match)
SAFETENSORS_ATTACKS = {
    "header longer than file": (dict(header={"a": A}, data=bytes(8), length=10_000), "file size"),
    "header over 100 MB": (dict(header={"a": A}, data=b"", length=200 * 2**20), "100 MB"),
    "overlap": (dict(header={"a": A, "b": _entry(4, 12)}, data=bytes(12)), "'b'.*overlaps"),
    "gap": (dict(header={"a": A, "b": _entry(12, 20)}, data=bytes(20)), "'b'.*gap"),
    "trailing bytes": (dict(header={"a": A}, data=bytes(8) + b"<html>x</html>"), "trailing"),
    "2 bytes missing": (dict(header={"a": A}, data=bytes(6)), "truncated"),
    "huge shape": (
        dict(header={"a": _entry(0, 8, [2**40, 2**40])}, data=bytes(8)),
        f"'a'.*needs {HUGE} bytes",
    ),
    "unknown dtype": (dict(header={"a": _entry(0, 8, dtype="Q7")}, data=bytes(8)), "'Q7'"),
    "dtype not a string": (dict(header={"a": _entry(0, 8, dtype=["F32"])}, data=bytes(8)), r"unknown dtype \['F32'\]"),
    "negative dim": (dict(header={"a": _entry(0, 8, [-2])}, data=bytes(8)), "'a'.*non-negative"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_ATTACKS))
def test_safetensors_header_attacks_refused(tmp_path: Path, case: str) -> None:
    kwargs, pattern = SAFETENSORS_ATTACKS[case]
    path = _raw_safetensors(tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(InputRefused, match=pattern) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value)


def test_safetensors_duplicate_key_refused(tmp_path: Path) -> None:
    entry = json.dumps(A)
    blob = f'{{"a": {entry}, "a": {entry}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(8))
    with pytest.raises(InputRefused, match="duplicate key 'a'"):
        load_state_dict_file(path)


def test_safetensors_tensor_count_bomb_refused_fast(tmp_path: Path) -> None:
    entry = json.dumps(_entry(0, 0, [0]))
    blob = ("{" + ",".join(f'"t{i}": {entry}' for i in range(200_000)) + "}").encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(InputRefused, match="200000 tensors exceed the limit"):
        load_state_dict_file(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_safetensors_refused(tmp_path: Path, fraction: float) -> None:
    save_file(_tiny_state(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputRefused):
        load_state_dict_file(cut)


# --------------------------------------------------------------------------- corrupt and wrong-kind


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_torch_file_refused(tmp_path: Path, container: str, fraction: float) -> None:
    big = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    data = _write(tmp_path / "full.pt", big, container).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputRefused, match="truncated or corrupt") as info:
        load_state_dict_file(cut)
    assert "PytorchStreamReader" not in str(info.value) and "\n" not in str(info.value)


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="model file not found") as info:
        load_state_dict_file(tmp_path / "nope.pt")
    assert info.value.exit_code == 2


def test_directory_as_file_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="directory"):
        load_state_dict_file(tmp_path)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.safetensors"
    save_file(_tiny_state(), path)
    path.chmod(0)
    try:
        with pytest.raises(UsageError, match="permission denied"):
            load_state_dict_file(path)
    finally:
        path.chmod(0o600)


def test_permission_error_is_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_tiny_state(), path)
    real_open = Path.open

    def deny(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(UsageError, match="permission denied"):
        load_state_dict_file(path)


def test_truncated_zip_still_detected_as_torch(tmp_path: Path) -> None:
    data = _write(tmp_path / "full.pt", _tiny_state(), "zip").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:200])
    assert detect_format(tmp_path / "cut.pt") == "torch-zip"


def test_empty_file_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputRefused, match="empty file"):
        load_state_dict_file(tmp_path / "empty.pt")


def test_format_comes_from_magic_bytes_not_extension(tmp_path: Path) -> None:
    save_file(_tiny_state(), tmp_path / "really_safetensors.pt")
    torch.save(_tiny_state(), tmp_path / "really_torch.safetensors")
    assert detect_format(tmp_path / "really_safetensors.pt") == "safetensors"
    assert detect_format(tmp_path / "really_torch.safetensors") == "torch-zip"
    assert set(load_state_dict_file(tmp_path / "really_safetensors.pt")) == {"weight", "bias"}
    assert set(load_state_dict_file(tmp_path / "really_torch.safetensors")) == {"weight", "bias"}


def test_random_bytes_and_foreign_formats_refused(tmp_path: Path) -> None:
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "rand.pt").write_bytes(noise.to(torch.uint8).numpy().tobytes())
    (tmp_path / "arr.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '|O'")
    for name in ("rand.pt", "arr.npy"):
        assert detect_format(tmp_path / name) == "unknown"
        with pytest.raises(InputRefused, match="unknown file format.*safetensors"):
            load_state_dict_file(tmp_path / name)


def test_onnx_file_detected_and_refused_as_weights(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.bin")
    assert detect_format(tmp_path / "m.bin") == "onnx"
    with pytest.raises(InputRefused, match="ONNX model"):
        load_state_dict_file(tmp_path / "m.bin")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_refused_by_name(tmp_path: Path, bad: float) -> None:
    state = _tiny_state()
    state["encoder.layer.0.weight"] = torch.tensor([1.0, bad, 2.0])
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(InputRefused, match=r"'encoder\.layer\.0\.weight'.*1 NaN/inf"):
        load_state_dict_file(tmp_path / "w.safetensors")


# --------------------------------------------------------------------------- load_into


def test_load_into_fits_exactly() -> None:
    model = nn.Linear(3, 2)
    report = load_into(model, _tiny_state(), source="w.pt")
    assert report == KeyReport() and report.fits
    assert torch.equal(model.weight.detach(), _tiny_state()["weight"])


def test_load_into_lists_missing_unexpected_and_wrong_shape() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(2, 3), "1.weight": torch.zeros(5, 5), "x.bias": torch.zeros(1)}
    before = model[0].weight.detach().clone()
    with pytest.raises(InputRefused) as info:
        load_into(model, state, source="w.pt")
    message = str(info.value)
    assert "2 missing (0.bias, 1.bias)" in message
    assert "1 unexpected (x.bias)" in message
    assert "1.weight: file [5, 5] vs model [2, 2]" in message and "w.pt" in message
    assert torch.equal(model[0].weight.detach(), before)  # nothing loaded on refusal


def test_load_into_caps_list_at_five() -> None:
    state = {f"k{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(InputRefused, match=r"8 unexpected \(k0, k1, k2, k3, k4, \.\.\. 3 more\)"):
        load_into(nn.Identity(), state)


def test_load_into_non_strict_loads_what_fits() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    state = {"0.weight": torch.full((2, 3), 7.0), "1.weight": torch.zeros(5, 5)}
    report = load_into(model, state, strict=False)
    assert torch.equal(model[0].weight.detach(), torch.full((2, 3), 7.0))
    assert report.missing == ("0.bias", "1.bias") and len(report.wrong_shape) == 1


# --------------------------------------------------------------------------- factories


def test_load_factory_builds_module() -> None:
    assert isinstance(load_factory("torch.nn:Identity"), nn.Identity)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("nosuchpkg.x:f", "module 'nosuchpkg' not found"),
        ("torch.nn:NoSuch", "has no attribute 'NoSuch'"),
        ("badspec", "expected package.module:function"),
        ("torch:__version__", "not callable"),
        ("builtins:dict", "returned dict, not an nn.Module"),
        ("torch.nn:Linear", "raised TypeError"),
    ],
)
def test_load_factory_errors(spec: str, pattern: str) -> None:
    with pytest.raises(UsageError, match=pattern):
        load_factory(spec)


# --------------------------------------------------------------------------- HF directories


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Bert:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_hf_directory_round_trip(tiny_bert_dir: Bert) -> None:
    path, original = tiny_bert_dir
    loaded = load_hf_directory(path)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, original(ids).last_hidden_state)
    assert not loaded.training


def test_hf_directory_prefixed_keys_and_bin(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, original = tiny_bert_dir
    copy = _copy_dir(path, tmp_path / "prefixed", skip=("model.safetensors",))
    prefixed = {f"bert.{k}": v for k, v in original.state_dict().items()}
    prefixed["bert.embeddings.position_ids"] = torch.arange(512)[None]  # old persistent buffer
    torch.save(prefixed, copy / "pytorch_model.bin")
    loaded = load_hf_directory(copy)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, original(ids).last_hidden_state)


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "BertForMaskedLM"])
def test_hf_directory_keeps_task_head_and_tied_weights(tmp_path: Path, arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    original = getattr(transformers, arch)(config).eval()
    original.save_pretrained(tmp_path)  # MaskedLM leaves out the decoder weight tied to embeddings
    loaded = load_hf_directory(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert type(loaded).__name__ == arch
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_hf_directory_extra_weight_refused(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, original = tiny_bert_dir
    copy = _copy_dir(path, tmp_path / "extra", skip=("model.safetensors",))
    state = {k: v.clone() for k, v in original.state_dict().items()}
    state["adapter.weight"] = torch.zeros(2)
    save_file(state, copy / "model.safetensors")
    with pytest.raises(InputRefused, match=r"1 unexpected \(adapter\.weight\)"):
        load_hf_directory(copy)


def test_hf_directory_wrong_shape_refused(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, original = tiny_bert_dir
    copy = _copy_dir(path, tmp_path / "wrong", skip=("model.safetensors",))
    state = {k: v.clone() for k, v in original.state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(4, 4)
    save_file(state, copy / "model.safetensors")
    with pytest.raises(InputRefused, match=r"pooler\.dense\.weight: file \[4, 4\] vs model"):
        load_hf_directory(copy)


def test_hf_directory_sharded(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, original = tiny_bert_dir
    copy = _copy_dir(path, tmp_path / "sharded", skip=("model.safetensors",))
    items = sorted(original.state_dict().items())
    halves = {
        "model-00001-of-00002.safetensors": dict(items[:10]),
        "model-00002-of-00002.safetensors": dict(items[10:]),
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: v.contiguous() for k, v in part.items()}, copy / name)
        weight_map.update(dict.fromkeys(part, name))
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_hf_directory(copy)
    assert torch.equal(loaded.pooler.dense.weight, original.pooler.dense.weight)
    escape = {"weight_map": {"x": "../escape.safetensors"}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(escape))
    with pytest.raises(InputRefused, match="not a file in its directory"):
        load_hf_directory(copy)


def test_hf_auto_map_refused(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, _ = tiny_bert_dir
    copy = _copy_dir(path, tmp_path / "custom")
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "modeling_evil.py").write_text(f"open({str(tmp_path / 'CANARY')!r}, 'w')\n")
    with pytest.raises(InputRefused, match=r"custom code in config\.json \(auto_map\) is refused"):
        load_hf_directory(copy)
    assert not (tmp_path / "CANARY").exists()


def test_hf_directory_without_weights_or_config(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    path, _ = tiny_bert_dir
    with pytest.raises(InputRefused, match="no weights"):
        load_hf_directory(_copy_dir(path, tmp_path / "noweights", skip=("model.safetensors",)))
    with pytest.raises(InputRefused, match="no config.json"):
        load_hf_directory(_copy_dir(path, tmp_path / "noconfig", skip=("config.json",)))


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_kinds(tiny_bert_dir: Bert, tmp_path: Path) -> None:
    assert resolve_model("minilm") == ("builtin", None)
    assert resolve_model("digits") == ("builtin", None)
    kind, model = resolve_model("torch.nn:Identity")
    assert kind == "factory" and isinstance(model, nn.Identity)
    kind, model = resolve_model(str(tiny_bert_dir[0]))
    assert kind == "hf-directory" and type(model).__name__ == "BertModel"


def test_resolve_model_factory_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_factory_mod.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file(_tiny_state(), tmp_path / "w.safetensors")
    kind, model = resolve_model("toy_factory_mod:build", weights=str(tmp_path / "w.safetensors"))
    assert kind == "state-dict" and torch.equal(model.weight.detach(), _tiny_state()["weight"])
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(InputRefused, match="1 missing \\(bias\\)"):
        resolve_model("toy_factory_mod:build", weights=str(tmp_path / "bad.safetensors"))


def test_resolve_model_errors(tmp_path: Path) -> None:
    save_file(_tiny_state(), tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="needs an architecture"):
        resolve_model(str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="model not found: 'bert-base' is not a built-in name"):
        resolve_model("bert-base")
    with pytest.raises(UsageError, match="does not apply"):
        resolve_model("minilm", weights=str(tmp_path / "w.safetensors"))
