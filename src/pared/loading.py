"""Turn what a user names with ``--model`` into a torch model, without running code from a file.

Rules (docs/security.md):
- the format comes from magic bytes, never from the file name;
- safetensors headers are validated here before safetensors allocates anything;
- pickle-based files (``torch.save`` zip, legacy torch, raw pickle) open only through
  ``torch.load(weights_only=True)``; ``trust_pickle=True`` is the one explicit opt-out, and there
  is no automatic retry without it;
- a Hugging Face directory is built by transformers' own classes from its config; a config that
  asks for custom code (``auto_map``) is refused.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from pared.errors import EnvironmentIOError, InputRefused, UsageError

__all__ = [
    "ACCEPTED_FORMATS",
    "KeyReport",
    "compare_keys",
    "detect_format",
    "load_factory",
    "load_hf_directory",
    "load_into",
    "load_state_dict_file",
    "resolve_model",
    "validate_safetensors_header",
]

logger = logging.getLogger(__name__)

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; the cap safetensors itself applies
MAX_SAFETENSORS_TENSORS = 100_000  # per file; real checkpoints hold a few thousand at most
MIN_TORCH_FOR_PICKLE = (2, 6)
ACCEPTED_FORMATS = "safetensors, or a torch.save file (zip or legacy) that loads with weights_only"
TRUST_HINT = (
    "convert it to safetensors, or pass --trust-pickle if you trust its source "
    "(that lets code inside the file run)"
)
# safetensors dtype name -> bytes per element (the sub-byte F4/F6 kinds are not accepted).
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# What torch's weights_only unpickler allows by default; only used to word an error message.
_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "collections.Counter", "_codecs.encode",
                 "builtins.set", "builtins.bytearray", "builtins.complex")  # fmt: skip
_FACTORY_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_IO_ERRNOS = (errno.EIO, errno.ENOMEM, errno.ESTALE, errno.ENXIO)  # the machine, not the file
_HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ------------------------------------------------------------------------------ format detection


def detect_format(path: Path) -> str:
    """Name the format of ``path`` from its first bytes; the file name is never consulted.

    Args:
        path: a file or a directory.

    Returns:
        "safetensors", "torch-zip", "pickle", "onnx", "directory", "empty" or "unknown".

    Raises:
        UsageError: the path does not exist or cannot be read (permission).
    """
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            return "directory"
        if not stat.S_ISREG(info.st_mode):
            return "unknown"  # a FIFO or device is never opened
        if info.st_size == 0:
            return "empty"
        with path.open("rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise UsageError(f"model file not found: {path}") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"  # u64 header length, then a JSON object
    if head.startswith(b"PK\x03\x04") and _is_torch_zip(path, head):
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2; a legacy torch.save file starts the same way
        return "pickle"
    if head[:1] == b"\x08" and _is_onnx(path, info.st_size):  # ModelProto field 1, ir_version
        return "onnx"
    return "unknown"


def _check_torch_floor(path: Path) -> None:
    """Below torch 2.6, ``weights_only=True`` can be bypassed (CVE-2025-32434): no pickle then."""
    installed = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if installed < MIN_TORCH_FOR_PICKLE:
        need = ".".join(map(str, MIN_TORCH_FOR_PICKLE))
        raise InputRefused(
            f"refused to load {path}: pickle-based files need torch >= {need} (installed: "
            f"{torch.__version__}; weights_only can be bypassed below it, CVE-2025-32434); "
            "convert the file to safetensors"
        )


def _check_torch_zip(path: Path) -> None:
    """Refuse compressed or oversized members before torch inflates them (a decompression bomb).

    ``torch.save`` stores every member uncompressed, so a deflated member can only come from
    another writer, and a few kilobytes of it can expand to gigabytes in memory.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:  # NIE: bad version field
        raise _corrupt(path, exc) from None
    if len(members) > MAX_SAFETENSORS_TENSORS + 16:
        raise InputRefused(f"{path}: {len(members)} zip members exceed the limit of {MAX_SAFETENSORS_TENSORS}")
    size = path.stat().st_size
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise InputRefused(
                f"refused to load {path}: zip member '{m.filename}' is compressed or larger than "
                f"the file ({m.compress_size} -> {m.file_size} bytes); torch.save never "
                "compresses, so this may be a decompression bomb"
            )


def _is_torch_zip(path: Path, head: bytes) -> bool:
    # torch writes "<archive>/data.pkl" as the first member, so reading the first local header
    # also recognises a truncated file (one without a central directory).
    first = head[30 : 30 + int.from_bytes(head[26:28], "little")].decode("utf-8", "replace")
    names = [first]
    if not _is_data_pkl(first):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
            return False
    return any(_is_data_pkl(n) for n in names)


def _is_data_pkl(name: str) -> bool:
    return name == "data.pkl" or (name.endswith("/data.pkl") and name.count("/") == 1)


def _is_onnx(path: Path, size: int) -> bool:
    if size >= 2**31:  # over protobuf's limit: not a single ModelProto
        return False
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure just means "not ONNX"
        return False
    return model.ir_version > 0 and model.HasField("graph")


# ------------------------------------------------------------------------------ weights files


def load_state_dict_file(
    path: str | Path, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load a flat ``name -> tensor`` dict from a weights file, refusing anything unsafe.

    Args:
        path: a safetensors file or a ``torch.save`` file (zip or legacy); any file name.
        trust_pickle: open pickle-based files with ``weights_only=False`` (runs code in the file).

    Returns:
        The tensors on CPU; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.

    Raises:
        UsageError: the path is missing, a directory, or unreadable.
        InputRefused: empty, unknown format, unsafe pickle, invalid safetensors header, truncated
            or corrupt, not a flat dict of tensors, or NaN/inf in a floating tensor.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "directory":
        raise UsageError(f"expected a weights file but {path} is a directory")
    if fmt == "empty":
        raise InputRefused(f"empty file: {path}")
    if fmt == "safetensors":
        state = _load_safetensors(path)
    elif fmt in ("torch-zip", "pickle"):
        if not trust_pickle:
            _check_torch_floor(path)
        if fmt == "torch-zip":
            _check_torch_zip(path)
        state = _as_state_dict(_torch_load(path, trust_pickle), path)
    elif fmt == "onnx":
        raise InputRefused(f"{path} is an ONNX model, not a weights file ({ACCEPTED_FORMATS})")
    else:
        raise InputRefused(f"unknown file format: {path} (accepted: {ACCEPTED_FORMATS})")
    _check_tensors(state, path)
    return state


def validate_safetensors_header(path: Path) -> None:
    """Check a safetensors header as safetensors does, before any tensor is allocated.

    Header length <= 100 MB and <= file size - 8; at most ``MAX_SAFETENSORS_TENSORS`` entries;
    a JSON object without duplicate keys; every tensor has a known dtype, a shape of non-negative
    ints and ``data_offsets`` spanning exactly ``prod(shape) * itemsize`` bytes (Python ints: no
    overflow); sorted by offset, the tensors neither overlap nor leave gaps, and they cover
    exactly the data section.

    Args:
        path: the file to check.

    Raises:
        InputRefused: naming the file and, where one is at fault, the tensor.
    """
    size = path.stat().st_size
    bad = f"invalid safetensors header in {path}"
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InputRefused(f"{bad}: shorter than the 8-byte length prefix")
        n = int.from_bytes(prefix, "little")
        if n > MAX_SAFETENSORS_HEADER:
            raise InputRefused(f"{bad}: header length {n} bytes exceeds the 100 MB limit")
        if n > size - 8:
            raise InputRefused(f"{bad}: header length {n} exceeds the file size {size}")
        raw = f.read(n)
    declared = raw.count(b'"data_offsets"')  # counted before parsing: a cheap bound on the work
    if declared > MAX_SAFETENSORS_TENSORS:
        limit = MAX_SAFETENSORS_TENSORS
        raise InputRefused(f"{bad}: {declared} tensors exceed the limit of {limit}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputRefused(f"{bad}: not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InputRefused(f"{bad}: the header is not a JSON object")
    spans = sorted(_span(bad, name, e) for name, e in header.items() if name != "__metadata__")
    pos = 0
    for start, end, name in spans:
        if start != pos:
            kind = "overlaps the previous tensor" if start < pos else "leaves a gap before it"
            raise InputRefused(f"{bad}: tensor '{name}' {kind} (starts at {start}, not {pos})")
        pos = end
    if pos != size - 8 - n:
        raise InputRefused(
            f"{bad}: tensors cover {pos} bytes but the data section holds {size - 8 - n} "
            "(truncated file or trailing bytes)"
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def _span(bad: str, name: str, entry: Any) -> tuple[int, int, str]:
    """``(start, end, name)`` of one header entry, after checking it."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputRefused(f"{bad}: tensor '{name}' needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise InputRefused(f"{bad}: tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputRefused(f"{bad}: tensor '{name}' shape {shape!r} is not non-negative ints")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise InputRefused(f"{bad}: tensor '{name}' data_offsets {offsets!r} are not [start, end]")
    need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != need:
        raise InputRefused(
            f"{bad}: tensor '{name}' ({dtype} {shape}) needs {need} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], name


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    validate_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends on bad content
        raise _corrupt(path, exc) from exc


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        warnings.warn(
            f"--trust-pickle: loading {path} with weights_only=False; code in the file can run",
            UserWarning,
            stacklevel=3,
        )
    try:
        with warnings.catch_warnings():  # torch's note about pickle protocols is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # An open file, not the path: torch >= 2.13 routes "*.safetensors" names by extension.
            with path.open("rb") as f:
                return torch.load(f, weights_only=not trust_pickle, map_location="cpu", mmap=False)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise _corrupt(path, exc) from exc
        raise _pickle_refusal(path, str(exc)) from exc
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        if exc.errno in _IO_ERRNOS:
            raise EnvironmentIOError(f"cannot read {path}: {exc}") from exc
        raise _corrupt(path, exc) from exc  # e.g. EINVAL: a seek past a cut-off end
    except Exception as exc:  # noqa: BLE001 - a corrupt file can raise anything in torch.load
        raise _corrupt(path, exc) from exc


def _pickle_refusal(path: Path, message: str) -> InputRefused:
    """Word torch's weights_only error as one line that quotes the offending global."""
    found = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", message)
    name = found.group(1) if found else _first_unsafe_global(path)
    if name:
        return InputRefused(
            f"refused to load {path}: Unsupported global: GLOBAL {name} (pickle files are opened "
            "with torch.load(weights_only=True), which allows tensors and plain containers "
            f"only); {TRUST_HINT}"
        )
    if re.search(r"truncated|EOF|ran out of input|unexpected end", message, re.IGNORECASE):
        return InputRefused(f"file truncated or corrupt: {path}")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((x for x in lines if "Unsupported" in x), lines[-1] if lines else "no detail")
    return InputRefused(f"refused to load {path}: weights_only failed ({detail}); {TRUST_HINT}")


def _first_unsafe_global(path: Path) -> str | None:
    """The first non-allowlisted global the pickle names, read by ``pickletools`` (no execution)."""
    try:
        with path.open("rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            names = [] if is_zip else _pickle_globals(f)
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                member = next(n for n in zf.namelist() if _is_data_pkl(n))
                with zf.open(member) as f:
                    names = _pickle_globals(f)
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError, NotImplementedError):
        return None
    return next((n for n in names if not n.startswith(_SAFE_GLOBALS)), None)


def _pickle_globals(stream: IO[bytes], max_pickles: int = 5) -> list[str]:
    """Globals named by GLOBAL/INST/STACK_GLOBAL, following strings through the memo."""
    names: list[str] = []
    strings: list[str] = []  # recently pushed strings: STACK_GLOBAL's module and name
    memo: dict[int, str | None] = {}
    last: str | None = None  # the string on top of the stack, if the top is a string
    for _ in range(max_pickles):  # a legacy torch file is several pickles in a row
        try:
            for op, arg, _pos in pickletools.genops(stream):
                kind = op.name
                if kind in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif kind == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if kind in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    slot = len(memo) if kind == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
                    memo[slot] = last
                    continue
                if kind in ("GET", "BINGET", "LONG_BINGET"):
                    arg = memo.get(int(arg))  # type: ignore[arg-type]
                last = arg if isinstance(arg, str) and kind not in ("GLOBAL", "INST") else None
                if last is not None:
                    strings.append(last)
        except Exception:  # noqa: BLE001 - the end of the pickles, or garbage: stop reading
            break
    return names


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        inner = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        obj = inner[0] if inner else obj
    if not isinstance(obj, Mapping):
        hint = " (a pickled module: save its state_dict())" if isinstance(obj, nn.Module) else ""
        found = type(obj).__name__
        raise InputRefused(f"{path}: expected a dict of name -> tensor, found {found}{hint}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputRefused(
                f"{path}: expected a flat dict of name -> tensor, "
                f"but entry {key!r} is a {type(value).__name__}"
            )
    return dict(obj)


def _check_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    if not state:
        raise InputRefused(f"no tensors in {path}")
    for name, t in state.items():
        if t.is_meta or t.layout != torch.strided:
            raise InputRefused(f"tensor '{name}' in {path} is not dense ({t.layout}, {t.device})")
        if t.is_floating_point() or t.is_complex():
            try:
                finite = torch.isfinite(t)
            except (RuntimeError, NotImplementedError):  # float8 kinds lack isfinite
                finite = torch.isfinite(t.float())
            if not bool(finite.all()):
                count = int((~finite).sum())
                raise InputRefused(f"tensor '{name}' in {path} has {count} NaN/inf")


def _corrupt(path: Path, exc: BaseException) -> InputRefused:
    """``file truncated or corrupt``, with the first sentence of the reason (no torch internals)."""
    reason = re.sub(r"^PytorchStreamReader failed [^:]*: ", "", _first_line(exc)).split(". ")[0]
    return InputRefused(f"file truncated or corrupt: {path} ({reason})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


# ------------------------------------------------------------------------------ fitting a model


@dataclass(frozen=True)
class KeyReport:
    """How a state dict fits a model: the names missing, unexpected and of the wrong shape."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    wrong_shape: tuple[str, ...] = ()  # "name: file [a, b] vs model [c, d]"

    @property
    def fits(self) -> bool:
        """True when every name and shape matches."""
        return not (self.missing or self.unexpected or self.wrong_shape)

    def describe(self, limit: int = 5) -> str:
        """One line listing up to ``limit`` names of each kind."""
        parts = []
        kinds = (("missing", self.missing), ("unexpected", self.unexpected),
                 ("wrong shape", self.wrong_shape))  # fmt: skip
        for label, items in kinds:
            if items:
                more = f", ... {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {label} ({', '.join(items[:limit])}{more})")
        return "; ".join(parts)


def compare_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare ``state`` with ``model.state_dict()`` by name and shape.

    Args:
        model: the architecture.
        state: the weights.

    Returns:
        The missing, unexpected and wrongly shaped names.
    """
    expected = model.state_dict()
    return KeyReport(
        missing=tuple(k for k in expected if k not in state),
        unexpected=tuple(k for k in state if k not in expected),
        wrong_shape=tuple(
            f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    )


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True, source: str = ""
) -> KeyReport:
    """Copy ``state`` into ``model``; refuse (strict) or skip and log (non-strict) what misfits.

    Args:
        model: the architecture, changed in place.
        state: name -> tensor.
        strict: refuse any missing, unexpected or wrongly shaped name; nothing is copied then.
        source: where the weights came from, for messages.

    Returns:
        The comparison (``fits`` is true when everything matched).

    Raises:
        InputRefused: strict and the weights do not fit; up to 5 names of each kind are listed.
    """
    report = compare_keys(model, state)
    where = f" from {source}" if source else ""
    if not report.fits:
        if strict:
            raise InputRefused(
                f"weights{where} do not fit the model: {report.describe()} "
                "(--non-strict, or strict=False in the API, loads only what fits)"
            )
        # A warning, not a log record: the CLI has no logging set up and must show the list.
        warnings.warn(f"non-strict load{where} skipped {report.describe()}", UserWarning, stacklevel=2)
    expected = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=False)
    return report


# ------------------------------------------------------------------------------ model sources


def load_factory(spec: str) -> nn.Module:
    """Build a model by calling ``package.module:function`` with no arguments.

    The module is imported by name (installed, or on ``PYTHONPATH``): code the user named
    explicitly, not code read from a weights file.

    Args:
        spec: "package.module:function"; the attribute may be dotted ("mod:Class.build").

    Returns:
        The module the factory returned.

    Raises:
        UsageError: bad form, module or attribute not found, the factory failed or returned
            something that is not an ``nn.Module``.
    """
    if not _FACTORY_SPEC.match(spec):
        raise UsageError(f"bad model factory {spec!r}: expected package.module:function")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise UsageError(f"model factory {spec!r}: module '{missing}' not found") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed on import
        raise UsageError(f"model factory {spec!r}: importing failed: {_first_line(exc)}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"model factory {spec!r}: '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"model factory {spec!r}: '{attr}' is not callable")
    try:
        model = obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        failure = f"{type(exc).__name__}: {_first_line(exc)}"
        raise UsageError(f"model factory {spec!r} raised {failure}") from exc
    if not isinstance(model, nn.Module):
        got = type(model).__name__
        raise UsageError(f"model factory {spec!r} returned {got}, not an nn.Module")
    return model


def load_hf_directory(path: Path, *, trust_pickle: bool = False) -> nn.Module:
    """Build a Hugging Face model from ``config.json`` and load its weights; run no repo code.

    The class is the one ``config.architectures`` names if transformers ships it (a task head
    survives), else ``AutoModel``. Weights come from ``model.safetensors``, a shard index, or
    ``pytorch_model.bin`` (weights_only). Names may differ by the base-model prefix (``bert.``);
    integer buffers the model recreates (``position_ids``) and tied aliases may be absent, and
    buffers the model does not save may be extra; a wrong shape is always refused.

    Args:
        path: the model directory.
        trust_pickle: passed on to ``load_state_dict_file`` for ``.bin`` weights.

    Returns:
        The model, in eval mode.

    Raises:
        UsageError: ``path`` is not a directory.
        InputRefused: no config.json, custom code (``auto_map``), no weights, unsafe or corrupt
            weights, or weights that do not fit.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"not a directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputRefused(f"not a Hugging Face model directory: {path} has no config.json")
    try:
        raw = json.loads(config_file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputRefused(f"cannot read {config_file}: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise InputRefused(f"{config_file} is not a JSON object")
    if "auto_map" in raw:
        raise InputRefused(
            "custom code in config.json (auto_map) is refused: pared never runs code from a "
            f"model directory ({config_file})"
        )
    state = _load_hf_weights(path, trust_pickle)  # refuse bad weights before building anything
    _check_declared_size(path, raw, state)
    model = _build_hf_model(path)
    state = _align_prefix(model, state)
    report = compare_keys(model, state)
    buffers = dict(model.named_buffers())
    # Index buffers (position_ids) are recreated by the model; float buffers (running stats) are
    # data and must be present. A tied weight may be absent when its twin is present.
    recreated = {k for k, b in buffers.items() if not (b.is_floating_point() or b.is_complex())}
    aliases, present = _aliases(model), set(state)
    blocking = KeyReport(
        missing=tuple(
            k for k in report.missing if k not in recreated and not aliases.get(k, set()) & present
        ),
        unexpected=tuple(k for k in report.unexpected if k not in buffers),
        wrong_shape=report.wrong_shape,
    )
    if not blocking.fits:
        arch = type(model).__name__
        raise InputRefused(f"weights in {path} do not fit {arch}: {blocking.describe()}")
    if not report.fits:
        logger.debug("%s: tolerated buffers and tied aliases: %s", path, report.describe())
    fitting = {k: v for k, v in state.items() if k not in report.unexpected}
    model.load_state_dict(fitting, strict=False)
    return model.eval()


def _load_hf_weights(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    for name in _HF_SINGLE:
        if (path / name).is_file():
            return load_state_dict_file(path / name, trust_pickle=trust_pickle)
    for name in _HF_INDEX:
        if (path / name).is_file():
            return _load_sharded(path / name, trust_pickle)
    raise InputRefused(
        f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _load_sharded(index_file: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        shards = sorted(set(json.loads(index_file.read_text("utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputRefused(f"invalid shard index {index_file}: {_first_line(exc)}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise InputRefused(f"{index_file} names {shard!r}: not a file in its directory")
        if not (index_file.parent / shard).is_file():
            raise InputRefused(f"shard {shard} listed in {index_file} is missing")
        part = load_state_dict_file(index_file.parent / shard, trust_pickle=trust_pickle)
        clash = sorted(part.keys() & state.keys())
        if clash:
            raise InputRefused(f"tensor '{clash[0]}' is in more than one shard of {index_file}")
        state.update(part)
    return state


def _check_declared_size(path: Path, raw: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Refuse a config.json that describes a far bigger model than its weights before building it.

    Building allocates (and randomly initialises) what the config declares: ``hidden_size:
    10**6`` would exhaust memory and ``num_hidden_layers: 10**30`` would never finish. So layer
    and expert counts are bounded by the number of tensors in the file, and the model is first
    built on the meta device (no memory) and compared with the weights by parameter count.
    """
    where = path / "config.json"
    for key, value in _config_items(raw):
        if type(value) is int and _COUNT_KEY.search(key) and value > len(state):
            raise InputRefused(f"{where}: {key}={value} but the weights hold only {len(state)} tensors")
    with torch.device("meta"):
        declared = sum(p.numel() for p in _build_hf_model(path).parameters())
    held = sum(t.numel() for t in state.values())
    if declared > 2 * held + 1_000_000:  # slack: tied weights are stored once
        raise InputRefused(f"{where} declares {declared} parameters but the weights hold only {held} values")


_COUNT_KEY = re.compile(r"(^|_)(layers?|experts|blocks)$|^n_layer$")


def _config_items(doc: Any) -> Any:
    """Every ``(key, value)`` pair of a JSON document, nested configs included."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield str(key), value
            yield from _config_items(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _config_items(value)


def _build_hf_model(path: Path) -> nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if len(names) == 1 else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls(config)
        return transformers.AutoModel.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError
        where = path / "config.json"
        raise InputRefused(f"cannot build a model from {where}: {_first_line(exc)}") from exc


def _align_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add or strip the base-model prefix (``bert.``) name by name where that makes it match."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return state
    expected = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in expected:
            if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
                key = key[len(prefix) + 1 :]
            elif f"{prefix}.{key}" in expected:
                key = f"{prefix}.{key}"
        out[key] = value
    return out


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict names that share storage (tied weights), each mapped to its other names."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), []).append(name)
    return {n: set(g) - {n} for g in groups.values() if len(g) > 1 for n in g}


def resolve_model(
    spec: str,
    *,
    weights: str | None = None,
    trust_pickle: bool = False,
    builtin_names: tuple[str, ...] = ("minilm", "digits"),
    strict: bool = True,
) -> tuple[str, nn.Module | None]:
    """Resolve the CLI's ``--model`` value.

    Args:
        spec: a built-in name, "package.module:function", or a Hugging Face model directory.
        weights: a weights file loaded strictly into a factory's model.
        trust_pickle: let pickle-based weights run code (the explicit opt-in).
        builtin_names: names the caller resolves itself (``pared.tasks.get_task``).
        strict: refuse ``weights`` that do not fit exactly; False loads what fits and logs the
            rest (``--non-strict``).

    Returns:
        ``(kind, model)``: "builtin" (model None), "factory", "state-dict" (factory + weights)
        or "hf-directory".

    Raises:
        UsageError: nothing matches, a bare weights file, or ``weights`` where it cannot apply.
        InputRefused: the model or its weights were refused (see ``load_state_dict_file``).
    """
    if spec in builtin_names:
        if weights is not None:
            raise UsageError(f"--weights does not apply to the built-in model '{spec}'")
        return "builtin", None
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise UsageError("--weights does not apply to a model directory: its weights are in it")
        return "hf-directory", load_hf_directory(path, trust_pickle=trust_pickle)
    if path.exists():
        raise UsageError(
            "a weights file needs an architecture: "
            "pass --model package.module:factory --weights FILE"
        )
    if ":" in spec:
        model = load_factory(spec)
        if weights is None:
            return "factory", model
        state = load_state_dict_file(weights, trust_pickle=trust_pickle)
        load_into(model, state, strict=strict, source=weights)
        return "state-dict", model
    raise UsageError(
        f"model not found: '{spec}' is not a built-in name ({', '.join(builtin_names)}), "
        "a package.module:function factory, or an existing directory"
    )
