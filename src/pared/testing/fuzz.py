"""Mutation fuzzing of every file loader pared has: only pared's own errors may come out.

Each target starts from valid seed files pared itself would accept, mutates them (bit flips,
interesting bytes, truncation, insertions, splices, integer fields that lie about lengths,
JSON values of the wrong type or size) and loads the result. Loading may succeed or raise a
``ParedError``; anything else (a raw exception, a hang past the time limit) is a finding.
Peak memory over the run is reported, so a loader that allocates what a file merely declares
shows up too.

The test suite runs a few hundred inputs per target (``tests/test_fuzz.py``); the longer run is::

    python -m pared.testing.fuzz --iterations 10000            # every target
    python -m pared.testing.fuzz --target prdc --iterations 100000 --seed 7

It prints one JSON line per target and exits 1 if any input produced a finding; the inputs
that did are written to ``--save-dir`` for replay.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pared.errors import ParedError

INTERESTING_INTS = (0, 1, 2, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**40, 2**63 - 1, 2**64 - 1)  # fmt: skip
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("-"))
HANG_SECONDS = 10.0


@dataclass
class Target:
    """One loader: valid seed inputs, how to write an input to disk and how to load it."""

    name: str
    seeds: Callable[[], list[bytes]]
    load: Callable[[bytes], Any]
    fix_up: Callable[[bytes, random.Random], bytes] | None = None  # re-validate a checksum, sometimes


@dataclass
class Finding:
    """An input that made a loader raise something other than a ParedError, or hang."""

    target: str
    kind: str
    message: str
    data: bytes = field(repr=False)


# ------------------------------------------------------------------------------ mutations


def mutate(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """Apply 1 to 3 random byte-level mutations to ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        _MUTATIONS[rng.randrange(len(_MUTATIONS))](out, rng, others)
    return bytes(out)


def _flip_bits(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    for _ in range(rng.randint(1, 8)):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)


def _interesting_byte(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    if b:
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)


def _truncate(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    del b[rng.randrange(len(b) + 1) :]


def _insert(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    at = rng.randrange(len(b) + 1)
    b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def _delete(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    if b:
        at = rng.randrange(len(b))
        del b[at : at + rng.randint(1, 64)]


def _duplicate(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    if b:
        at = rng.randrange(len(b))
        b[at:at] = b[at : at + rng.randint(1, 256)]


def _lying_int(b: bytearray, rng: random.Random, _o: list[bytes]) -> None:
    """Overwrite a 1/2/4/8-byte little-endian field with a length that lies."""
    width = rng.choice((1, 2, 4, 8))
    if len(b) < width:
        return
    at = 0 if rng.random() < 0.2 else rng.randrange(len(b) - width + 1)  # often the length prefix
    value = rng.choice((*INTERESTING_INTS, len(b), len(b) + 1, len(b) - 1, rng.getrandbits(64)))
    b[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _splice(b: bytearray, rng: random.Random, others: list[bytes]) -> None:
    if others and b:
        other = rng.choice(others)
        at, frm = rng.randrange(len(b)), rng.randrange(len(other) + 1)
        b[at:] = other[frm:]


_MUTATIONS = (_flip_bits, _interesting_byte, _truncate, _insert, _delete, _duplicate, _lying_int, _splice)


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """Replace one value somewhere in a JSON document by one of the wrong type or size."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    slots = list(_json_slots(doc))
    if slots:
        parent, key = rng.choice(slots)
        parent[key] = rng.choice(
            [None, True, -1, 0, 2**31, 2**63, 10**30, -(10**9), 1e308, float("nan"), "", "x" * 1000,
             [], {}, [1] * 100, {"technique": "int8"}, "../../etc/passwd", rng.choice(INTERESTING_INTS)]
        )  # fmt: skip
    elif isinstance(doc, dict) and doc:
        del doc[rng.choice(list(doc))]
    return json.dumps(doc).encode()


def _json_slots(doc: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield doc, k
            yield from _json_slots(v)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield doc, i
            yield from _json_slots(v)


# ------------------------------------------------------------------------------ running


class _Hang(BaseException):  # not an Exception: a loader's broad except must not swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: Any) -> None:
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_one(target: Target, data: bytes, *, hang_seconds: float = HANG_SECONDS) -> Finding | None:
    """Load one input; return a finding unless it loaded or raised a ``ParedError``."""
    try:
        with _time_limit(hang_seconds):
            target.load(data)
    except ParedError:
        return None
    except _Hang as exc:
        return Finding(target.name, "hang", str(exc), data)
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        return Finding(target.name, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "", data)
    return None


def next_input(target: Target, seeds: list[bytes], rng: random.Random) -> bytes:
    """A mutation of a random seed (sometimes with its checksum made valid again)."""
    data = mutate(rng.choice(seeds), rng, seeds)
    if target.fix_up is not None and rng.random() < 0.5:
        data = target.fix_up(data, rng)
    return data


def fuzz(target: Target, *, iterations: int, seed: int = 0, hang_seconds: float = HANG_SECONDS) -> dict[str, Any]:
    """Run ``iterations`` mutated inputs through ``target``; a JSON-friendly summary + findings."""
    rng = random.Random(seed)
    seeds = target.seeds()
    for s in seeds:  # a seed that already fails would make every mutation of it a false finding
        finding = check_one(target, s, hang_seconds=hang_seconds)
        if finding:
            raise AssertionError(f"seed of {target.name} fails: {finding.kind}: {finding.message}")
    rss_before = _peak_rss_mb()
    findings: list[Finding] = []
    start = time.perf_counter()
    for _ in range(iterations):
        finding = check_one(target, next_input(target, seeds, rng), hang_seconds=hang_seconds)
        if finding:
            findings.append(finding)
    return {
        "target": target.name,
        "iterations": iterations,
        "seed": seed,
        "findings": len(findings),
        "kinds": sorted({f"{f.kind}: {f.message[:80]}" for f in findings}),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_growth_mb": round(_peak_rss_mb() - rss_before, 1),
        "_findings": findings,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------ targets


class _Scratch:
    """One temporary folder per process where inputs are written before a loader reads them."""

    _dir: Path | None = None

    @classmethod
    def path(cls, name: str) -> Path:
        if cls._dir is None:
            cls._dir = Path(tempfile.mkdtemp(prefix="pared-fuzz-"))
            atexit.register(shutil.rmtree, cls._dir, True)
        return cls._dir / name


def _write(name: str, data: bytes) -> Path:
    path = _Scratch.path(name)
    path.write_bytes(data)
    return path


def _states() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"weight": torch.randn(4, 3, generator=gen), "bias": torch.zeros(4)},
        {"emb": torch.arange(12, dtype=torch.int64).reshape(3, 4), "half": torch.ones(5, dtype=torch.float16),
         "empty": torch.zeros(0, 2), "scalar": torch.tensor(2.5)},
    ]  # fmt: skip


def _safetensors_seeds() -> list[bytes]:
    from safetensors.torch import save

    return [save(s) for s in _states()] + [save(_states()[0], metadata={"format": "pt"})]


def _pickle_seeds() -> list[bytes]:
    import io

    out = []
    for state in _states():
        for legacy in (False, True):
            buf = io.BytesIO()
            torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
            out.append(buf.getvalue())
    return out


def _load_weights(data: bytes) -> Any:
    from pared.loading import load_state_dict_file

    return load_state_dict_file(_write("weights.bin", data))


def _onnx_seeds() -> list[bytes]:
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        torch.onnx.export(model, (torch.zeros(1, 3),), buf, opset_version=17, dynamo=False)
    return [buf.getvalue()]


def _load_onnx(data: bytes) -> Any:
    # pared reads ONNX files only to recognise them (and refuse them as weights files).
    from pared.loading import detect_format, load_state_dict_file

    path = _write("model.onnx", data)
    detect_format(path)
    return load_state_dict_file(path)


def _artefact_model() -> torch.nn.Module:
    from pared.testing.models import tiny_mlp

    return tiny_mlp(8, 16, 4, seed=0)


_ARTEFACT_RECIPE: list[Any] = []


def _artefact_seeds() -> list[bytes]:
    from pared.apply import compress_
    from pared.artefact import save_artefact
    from pared.prune import MagnitudePruneConfig
    from pared.quant import Int8Config

    seeds = []
    for i, recipe in enumerate(([Int8Config(mode="dynamic")], [MagnitudePruneConfig(sparsity=0.75)])):
        model = compress_(_artefact_model(), recipe)
        folder = _Scratch.path(f"artefact-seed-{i}")
        folder.mkdir(exist_ok=True)
        save_artefact(model, folder, recipe=recipe, source=None)
        seeds.append(_pack({p.name: p.read_bytes() for p in folder.iterdir()}))
    return seeds


def _pack(files: dict[str, bytes]) -> bytes:
    """Both artefact files in one blob: u32 length + bytes per file, manifest first."""
    from pared.artefact import MANIFEST, WEIGHTS

    return b"".join(struct.pack("<I", len(files[n])) + files[n] for n in (MANIFEST, WEIGHTS))


def _unpack(blob: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(blob[:4].ljust(4, b"\0"), "little")
    manifest = blob[4 : 4 + n]
    rest = blob[4 + n :]
    m = int.from_bytes(rest[:4].ljust(4, b"\0"), "little")
    return manifest, rest[4 : 4 + m]


def _artefact_fix_up(blob: bytes, rng: random.Random) -> bytes:
    """Mutate the manifest as JSON, and make its checksum match the (mutated) weights."""
    from pared.artefact import MANIFEST, WEIGHTS

    manifest, weights = _unpack(blob)
    if rng.random() < 0.5:
        manifest = mutate_json(manifest, rng)
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        doc = json.loads(manifest)
        doc["files"][WEIGHTS]["sha256"] = hashlib.sha256(weights).hexdigest()
        manifest = json.dumps(doc).encode()
    return _pack({MANIFEST: manifest, WEIGHTS: weights})


def _load_artefact(blob: bytes) -> Any:
    from pared.artefact import MANIFEST, WEIGHTS, load_artefact

    folder = _Scratch.path("artefact")
    folder.mkdir(exist_ok=True)
    manifest, weights = _unpack(blob)
    (folder / MANIFEST).write_bytes(manifest)
    (folder / WEIGHTS).write_bytes(weights)
    return load_artefact(folder, model=_artefact_model())


def _prdc_seeds() -> list[bytes]:
    from pared.apply import compress_
    from pared.cluster import ClusterConfig
    from pared.cluster.codec import encode
    from pared.prune import MagnitudePruneConfig

    model = compress_(_artefact_model(), [MagnitudePruneConfig(sparsity=0.5), ClusterConfig(clusters=4)])
    dense = _artefact_model().state_dict()
    return [encode(model.state_dict(), entropy=True), encode(model.state_dict(), entropy=False), encode(dense)]


def _prdc_fix_up(data: bytes, _rng: random.Random) -> bytes:
    import zlib

    body = data[:-4] if len(data) >= 4 else data
    return body + zlib.crc32(body).to_bytes(4, "little")  # a CRC that matches: the parser must cope


def _load_prdc(data: bytes) -> Any:
    from pared.cluster.codec import load_compressed

    return load_compressed(_write("model.prdc", data), _artefact_model())


def _recipe_seeds() -> list[bytes]:
    from importlib import resources

    files = resources.files("pared.recipes")
    return [p.read_bytes() for p in sorted(files.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")]


def _recipe_fix_up(data: bytes, rng: random.Random) -> bytes:
    import yaml

    try:
        doc = yaml.safe_load(data)
        return yaml.safe_dump(json.loads(mutate_json(json.dumps(doc).encode(), rng))).encode()
    except Exception:  # noqa: BLE001 - not YAML/JSON any more: keep the byte mutation
        return data


def _load_recipe(data: bytes) -> Any:
    from pared.recipe import load_recipe

    return load_recipe(_write("recipe.yaml", data))


def _hf_seeds() -> list[bytes]:
    import transformers

    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    folder = _Scratch.path("hf-seed")
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    return [(folder / "config.json").read_bytes()]


def _load_hf(config: bytes) -> Any:
    from pared.loading import load_hf_directory

    folder = _Scratch.path("hf")
    folder.mkdir(exist_ok=True)
    shutil.copyfile(_Scratch.path("hf-seed") / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_bytes(config)
    return load_hf_directory(folder)


def _hf_fix_up(data: bytes, rng: random.Random) -> bytes:
    return mutate_json(data, rng)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("safetensors", _safetensors_seeds, _load_weights),
        Target("torch-pickle", _pickle_seeds, _load_weights),
        Target("onnx", _onnx_seeds, _load_onnx),
        Target("artefact", _artefact_seeds, _load_artefact, _artefact_fix_up),
        Target("prdc", _prdc_seeds, _load_prdc, _prdc_fix_up),
        Target("recipe", _recipe_seeds, _load_recipe, _recipe_fix_up),
        Target("hf-config", _hf_seeds, _load_hf, _hf_fix_up),
    )
}


def main(argv: list[str] | None = None) -> int:
    """``python -m pared.testing.fuzz``: one JSON line per target; exit 1 on any finding."""
    parser = argparse.ArgumentParser(prog="python -m pared.testing.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default: all")
    parser.add_argument("--iterations", type=int, default=1000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=HANG_SECONDS)
    parser.add_argument("--save-dir", type=Path, default=Path("fuzz-findings"))
    args = parser.parse_args(argv)
    import logging

    failed = False
    # Only the JSON lines on stdout: transformers and non-strict loads would log every input.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in args.target or sorted(TARGETS):
                result = fuzz(TARGETS[name], iterations=args.iterations, seed=args.seed,
                              hang_seconds=args.hang_seconds)  # fmt: skip
                findings = result.pop("_findings")
                for i, f in enumerate(findings):
                    args.save_dir.mkdir(parents=True, exist_ok=True)
                    (args.save_dir / f"{name}-{i}.bin").write_bytes(f.data)
                failed |= bool(findings)
                print(json.dumps(result), flush=True)
    finally:
        logging.disable(logging.NOTSET)  # main() may be called in-process (the tests do)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
