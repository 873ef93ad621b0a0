"""Reliability cases 1-16 that tests/test_loading.py does not already cover (docs/reliability.md):
more pickle gadgets and containers, the torch floor, zip bombs, memory bounds, ONNX files."""

from __future__ import annotations

import io
import json
import operator
import os
import resource
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

import pared.loading as loading
from pared.errors import InputRefused, ParedError, UsageError
from pared.loading import detect_format, load_hf_directory, load_state_dict_file
from pared.testing.models import tiny_mlp


class Payload:
    def __init__(self, fn: object, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def _refused(path: Path, canary: Path, *needles: str) -> str:
    with pytest.raises(InputRefused) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 3
    for needle in needles:
        assert needle in message, message
    assert not canary.exists(), "the payload ran"
    return message


# ---------------------------------------------------------------- 2. every container


def test_npy_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    path = tmp_path / "weights.npy"
    np.save(path, np.array([Payload(os.system, (f"touch {canary}",))], dtype=object), allow_pickle=True)
    assert detect_format(path) == "unknown"
    _refused(path, canary, "unknown file format")


def test_payload_in_a_shard_of_an_index_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    torch.save({"x": Payload(os.system, (f"touch {canary}",))}, tmp_path / "part-1.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "part-1.bin"}}))
    with pytest.raises(InputRefused, match="GLOBAL .*system"):
        load_hf_directory(tmp_path)
    assert not canary.exists()


# ---------------------------------------------------------------- 3. scanner-bypass gadgets


def test_methodcaller_gadget_refused(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    torch.save({"x": Payload(operator.methodcaller, ("system", f"touch {canary}"))}, tmp_path / "m.pt")
    _refused(tmp_path / "m.pt", canary, "operator.methodcaller", "--trust-pickle")


def _memo_confused_pickle(canary: Path) -> bytes:
    """``posix.system`` reached by STACK_GLOBAL through memoised strings (picklescan #14/#22)."""
    ops = bytearray(b"\x80\x04")
    for text in ("posix", "system", "innocent"):  # strings are memoised 0, 1, 2 ...
        raw = text.encode()
        ops += b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE + MEMOIZE
    ops += b"0" * 3  # POP the three strings: only the memo remembers them
    ops += b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL -> posix.system
    arg = f"touch {canary}".encode()
    ops += b"\x8c" + bytes([len(arg)]) + arg + b"\x85R."  # TUPLE1, REDUCE, STOP
    return bytes(ops)


def test_stack_global_through_the_memo_is_refused_and_named(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    path = tmp_path / "memo.pkl"
    path.write_bytes(_memo_confused_pickle(canary))
    _refused(path, canary, "GLOBAL posix.system")


def test_numpy_build_trick_is_refused(tmp_path: Path) -> None:
    """GLOBAL numpy.prod + BUILD (modelscan #85): numpy globals are not on torch's allowlist."""
    canary = tmp_path / "CANARY"
    ops = b"\x80\x02cnumpy\nprod\n}(X\x01\x00\x00\x00xX" + struct.pack("<I", 4) + b"evilub."
    path = tmp_path / "build.pkl"
    path.write_bytes(ops)
    _refused(path, canary, "numpy.prod")


# ---------------------------------------------------------------- 4. benign but not allowlisted


def test_numpy_scalar_in_state_dict_is_refused_with_the_opt_in(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "step": np.float64(3.0)}, tmp_path / "np.pt")
    _refused(tmp_path / "np.pt", tmp_path / "CANARY", "numpy", "--trust-pickle")


# ---------------------------------------------------------------- 6. torch below the floor


def test_old_torch_refuses_pickle_but_loads_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(tiny_mlp().state_dict(), tmp_path / "w.pt")
    save_file(tiny_mlp().state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    message = _refused(tmp_path / "w.pt", tmp_path / "CANARY", "2.5.1", ">= 2.6", "CVE-2025-32434")
    assert "safetensors" in message
    assert set(load_state_dict_file(tmp_path / "w.safetensors")) == set(tiny_mlp().state_dict())


# ---------------------------------------------------------------- 7, 11. memory bounds and bombs


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_lying_header_lengths_allocate_nothing(tmp_path: Path) -> None:
    before = _peak_rss_mb()
    for length in (200 << 20, (1 << 64) - 1, 1 << 40):
        path = tmp_path / f"lie{length}.safetensors"
        path.write_bytes(length.to_bytes(8, "little") + b'{"a": 1}' + bytes(64))
        with pytest.raises(InputRefused, match="invalid safetensors header"):
            load_state_dict_file(path)
    assert _peak_rss_mb() - before < 50


def _deflated_torch_zip(path: Path, numel: int) -> Path:
    """A torch.save zip whose tensor record is deflated: ``numel * 4`` zero bytes in a small file."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(buf)
    pkl = src.read("archive/data.pkl").replace(b"M\x04\x00", b"J" + struct.pack("<i", numel))  # storage numel
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                out.writestr(info.filename, pkl)
            elif info.filename.endswith("data/0"):
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with out.open(deflated, "w", force_zip64=True) as f:
                    for _ in range(numel * 4 >> 20):
                        f.write(bytes(1 << 20))
            else:
                out.writestr(info, src.read(info.filename))
    return path


def test_decompression_bomb_zip_is_refused_before_inflating(tmp_path: Path) -> None:
    numel = 32 << 20  # 128 MB of float32 zeros, deflated to a few hundred kB
    path = _deflated_torch_zip(tmp_path / "bomb.pt", numel)
    with zipfile.ZipFile(path) as zf:  # torch itself would inflate this member into memory
        assert zf.getinfo("archive/data/0").file_size == numel * 4
    assert path.stat().st_size < 1 << 20
    before = _peak_rss_mb()
    _refused(path, tmp_path / "CANARY", "compressed", "decompression bomb")
    assert _peak_rss_mb() - before < 100


def test_zip_claiming_an_unknown_version_is_refused(tmp_path: Path) -> None:
    """Found by the 10k fuzz run: zipfile raises NotImplementedError for such a central directory."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    data = bytearray(buf.getvalue())
    central = data.index(b"PK\x01\x02")
    data[central + 6 : central + 8] = (128).to_bytes(2, "little")  # "version needed to extract": 12.8
    (tmp_path / "v.pt").write_bytes(bytes(data))
    _refused(tmp_path / "v.pt", tmp_path / "CANARY", "truncated or corrupt", "zip file version 12.8")


def test_legacy_storage_size_lie_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf, _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    # The storage's element count (little-endian int64) sits just before its 16 data bytes.
    at = len(data) - 16 - 8
    assert int.from_bytes(data[at : at + 8], "little") == 4
    data[at : at + 8] = (1 << 40).to_bytes(8, "little")
    (tmp_path / "lie.pt").write_bytes(bytes(data))
    before = _peak_rss_mb()
    _refused(tmp_path / "lie.pt", tmp_path / "CANARY", "truncated or corrupt")
    assert _peak_rss_mb() - before < 100


def test_hf_config_declaring_a_huge_model_is_refused_before_building(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    before = _peak_rss_mb()
    for edit, needle in (({"hidden_size": 2**20, "vocab_size": 2**20}, "declares"),
                         ({"num_hidden_layers": 10**30}, "num_hidden_layers=")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**raw, **edit}))
        with pytest.raises(InputRefused, match=needle):
            load_hf_directory(tmp_path)
    assert _peak_rss_mb() - before < 200


# ---------------------------------------------------------------- 12-14. ONNX files


def _onnx_with_external_data(tmp_path: Path, location: str) -> Path:
    weight = onnx.numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    path = tmp_path / "model" / "evil.onnx"
    path.parent.mkdir()
    path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    return path


class _Timeout(BaseException):
    pass


@pytest.mark.parametrize("location", ["../../secret", "sub/../../secret", "/etc/passwd", "link"])
def test_onnx_external_data_is_never_followed(tmp_path: Path, location: str) -> None:
    """A FIFO stands where the external data points: opening it would block, so any read hangs."""
    path = _onnx_with_external_data(tmp_path, location)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (path.parent / "link").symlink_to(fifo)
    if location.startswith(".."):
        (tmp_path.parent / "secret").unlink(missing_ok=True)
        os.mkfifo(tmp_path.parent / "secret")

    def on_alarm(*_):  # type: ignore[no-untyped-def]
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    try:
        assert detect_format(path) == "onnx"
        with pytest.raises(InputRefused, match="is an ONNX model, not a weights file"):
            load_state_dict_file(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        (tmp_path.parent / "secret").unlink(missing_ok=True)


def test_exported_onnx_keeps_every_tensor_inside_the_file(tmp_path: Path) -> None:
    from pared.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model.get_submodule("0").weight.data.fill_(0.5)
    out = export_onnx(model, (torch.zeros(1, 4),), tmp_path / "model.onnx", input_names=["x"])
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    onnx.checker.check_model(proto, full_check=True)


def test_export_failing_the_checker_is_an_internal_error_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    import pared.onnx_export as onnx_export

    def break_graph(graph: onnx.GraphProto) -> None:
        graph.node.append(onnx.helper.make_node("NoSuchOp", ["x"], ["y2"]))

    monkeypatch.setattr(onnx_export, "remove_unused_initializers", break_graph)
    with pytest.raises(ParedError, match="exported ONNX failed the checker") as info:
        onnx_export.export_onnx(torch.nn.Linear(4, 3), (torch.zeros(1, 4),), tmp_path / "model.onnx", input_names=["x"])
    assert info.value.exit_code == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_onnx_given_as_weights_is_refused(tmp_path: Path, fraction: float) -> None:
    from pared.onnx_export import export_onnx

    data = export_onnx(torch.nn.Linear(8, 8), (torch.zeros(1, 8),), tmp_path / "m.onnx", input_names=["x"]).read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputRefused) as info:
        load_state_dict_file(cut)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- 15. wrong-kind paths


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert detect_format(tmp_path / "pipe.safetensors") == "unknown"
    with pytest.raises(InputRefused, match="unknown file format"):
        load_state_dict_file(tmp_path / "pipe.safetensors")


def test_symlink_to_directory_and_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "to-dir").symlink_to(tmp_path / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    with pytest.raises(UsageError, match="is a directory"):
        load_state_dict_file(tmp_path / "to-dir")
    with pytest.raises(UsageError, match="not found"):
        load_state_dict_file(tmp_path / "dangling")


# ---------------------------------------------------------------- 16. state dicts that do not fit


def test_misfit_message_names_the_kinds_and_the_opt_in() -> None:
    model = tiny_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(3, 3)
    state.pop("2.bias")
    state["extra"] = torch.zeros(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputRefused) as info:
        loading.load_into(model, state, source="w.safetensors")
    message = str(info.value)
    assert "1 missing (2.bias)" in message and "1 unexpected (extra)" in message
    assert "0.weight: file [3, 3] vs model [32, 16]" in message
    assert "--non-strict" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "partial load"
