"""Invariants of reliability plan 3.2 that tests/test_quant_primitives.py, test_weight_only.py,
test_cluster.py and test_prune_*.py do not already cover (docs/reliability.md maps all twelve):
size-0 tensors, sparsity preserved (6), shapes/dtypes/metadata (7), determinism (9) and
serialization round-trip with arbitrary dtypes and shapes (10). 200 examples each.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pared.apply import compress_
from pared.artefact import WEIGHTS, save_artefact, sparse_decode, sparse_encode
from pared.errors import InputRefused
from pared.loading import load_state_dict_file
from pared.prune import MagnitudePruneConfig, follows_nm, nm_mask
from pared.quant import Int8Config
from pared.quant.gptq import dequantize_groups, rtn_quantize
from pared.quant.primitives import (
    MIN_SCALE,
    choose_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
)
from pared.testing.models import random_batches, tiny_mlp

PROPS = settings(max_examples=200, deadline=None, database=None)

# Values the PyTorch strategies exclude: NaN, infinities, denormals, signed zeros, huge and tiny.
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-42, 1.2e-38, 3e38, -3e38, 1.0]
special_or_finite = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e3, 1e3, width=32))


@st.composite
def tensors(draw, *, min_dims: int = 0, max_dims: int = 3, allow_special: bool = True):  # type: ignore[no-untyped-def]
    """Float32 tensors with dims of size 0, 1 or more; constant ones; specials when allowed."""
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=min_dims, max_size=max_dims))
    numel = int(torch.tensor(shape).prod()) if shape else 1
    elements = special_or_finite if allow_special else st.floats(-1e3, 1e3, width=32)
    if draw(st.booleans()):  # constant tensor
        values = [draw(elements)] * numel
    else:
        values = draw(st.lists(elements, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


# ---------------------------------------------------------------- 2, 3, 8 with size-0 and size-1 dims


@PROPS
@given(tensors(), st.sampled_from([2, 4, 8]), st.booleans(), st.booleans())
def test_primitives_keep_shape_and_stay_finite_for_any_tensor(x: torch.Tensor, bits: int, symmetric: bool, signed: bool) -> None:
    finite = x[torch.isfinite(x)]
    lo = finite.min() if finite.numel() else torch.tensor(0.0)
    hi = finite.max() if finite.numel() else torch.tensor(0.0)
    scale, zp = choose_qparams(lo, hi, bits=bits, symmetric=symmetric, signed=signed)
    assert torch.isfinite(scale) and float(scale) >= float(torch.tensor(MIN_SCALE))
    qmin, qmax = qrange(bits, signed=signed)
    q = quantize(x, scale, zp, qmin, qmax)
    assert q.shape == x.shape and q.dtype == (torch.int8 if signed else torch.uint8)
    assert bool(((q.to(torch.int32) >= qmin) & (q.to(torch.int32) <= qmax)).all())
    once = fake_quantize(x, scale, zp, qmin, qmax)
    assert once.shape == x.shape and torch.equal(fake_quantize(once, scale, zp, qmin, qmax), once)
    assert bool(torch.isfinite(once[~torch.isnan(x)]).all())  # inf saturates; only NaN in gives NaN out
    assert bool((once[x == 0] == 0).all())


@PROPS
@given(st.integers(0, 4), st.integers(1, 6), st.booleans())
def test_per_channel_qparams_match_channels_including_zero_channels(channels: int, width: int, signed: bool) -> None:
    w = torch.randn(channels, width)
    bound = w.abs().amax(dim=1) if channels else torch.zeros(0)
    scale, zp = choose_qparams(-bound, bound, symmetric=True, signed=signed)
    assert scale.shape == zp.shape == (channels,)
    qmin, qmax = qrange(8, signed=signed)
    q = quantize(w, scale, zp, qmin, qmax, axis=0)
    assert q.shape == w.shape and dequantize(q, scale, zp, axis=0).shape == w.shape


# ---------------------------------------------------------------- 6. sparsity preserved


@st.composite
def sparse_weights(draw, *, rows: tuple[int, int] = (1, 8), cols: tuple[int, ...] = (8, 16, 32)):  # type: ignore[no-untyped-def]
    r, c = draw(st.integers(*rows)), draw(st.sampled_from(cols))
    seed = draw(st.integers(0, 2**31 - 1))
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(seed))
    zeros = torch.rand(r, c, generator=torch.Generator().manual_seed(seed + 1)) < draw(st.floats(0.0, 1.0))
    return w.masked_fill(zeros, 0.0)


@PROPS
@given(sparse_weights(), st.sampled_from(["static", "dynamic", "weight"]))
def test_int8_keeps_every_zero_weight(w: torch.Tensor, mode: str) -> None:
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        model[0].weight.copy_(w)
    q = compress_(model, Int8Config(mode=mode), calib=random_batches((2, w.shape[1]), n=1))
    codes = q[0].weight_q
    assert bool((codes[w == 0] == 0).all())


@PROPS
@given(sparse_weights(rows=(1, 1), cols=(32,)), st.sampled_from([4, 8]))
def test_group_wise_rtn_keeps_every_zero_weight(w: torch.Tensor, bits: int) -> None:
    codes, scales, zeros = rtn_quantize(w, bits=bits, group_size=32)
    assert bool((dequantize_groups(codes, scales, zeros)[w == 0] == 0).all())


@PROPS
@given(sparse_weights(cols=(8, 16, 32)), st.sampled_from([(1, 4), (2, 4), (4, 8), (1, 2)]))
def test_nm_mask_holds_in_every_group_and_reaches_the_ratio(w: torch.Tensor, nm: tuple[int, int]) -> None:
    n, m = nm
    mask = nm_mask(w.abs(), n, m)
    assert bool((mask.reshape(-1, m).sum(dim=1) == n).all())
    pruned = w * mask
    assert follows_nm(pruned, n, m)
    assert float((pruned == 0).float().mean()) >= 1 - n / m
    assert bool((pruned[w == 0] == 0).all())


@PROPS
@given(sparse_weights(rows=(2, 16), cols=(16,)), st.floats(0.0, 0.95))
def test_magnitude_pruning_keeps_zeros_and_reaches_the_ratio(w: torch.Tensor, sparsity: float) -> None:
    model = nn.Sequential(nn.Linear(16, w.shape[0]))
    with torch.no_grad():
        model[0].weight.copy_(w)
    pruned = compress_(model, MagnitudePruneConfig(sparsity=sparsity))
    weight = pruned[0].weight.detach()  # pruned weights are exact zeros; no mask is kept
    assert bool((weight[w == 0] == 0).all())
    assert float((weight == 0).float().mean()) >= sparsity - 1 / w.numel()


# ---------------------------------------------------------------- 7. shapes, dtypes, metadata


@PROPS
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 12), st.integers(1, 5),
       st.sampled_from(["static", "dynamic", "weight"]))  # fmt: skip
def test_int8_keeps_shapes_device_and_state_dict_names(d_in: int, hidden: int, d_out: int, batch: int, mode: str) -> None:
    model = tiny_mlp(d_in, hidden, d_out, seed=d_in * 31 + hidden)
    x = torch.randn(batch, d_in)
    expected = model(x)
    modules_before = {n for n, _ in model.named_modules()}
    q = compress_(copy.deepcopy(model), Int8Config(mode=mode), calib=random_batches((batch, d_in), n=1))
    out = q(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == expected.device
    assert {n for n, _ in q.named_modules()} == modules_before  # layers replaced in place, not renamed
    for name, layer in (("0", q[0]), ("2", q[2])):
        assert layer.weight_scale.shape == (layer.weight_q.shape[0],), name
        assert layer.weight_q.dtype == torch.int8 and layer.weight_q.shape == model.get_submodule(name).weight.shape
    assert all(t.device.type == "cpu" for t in q.state_dict().values())


# ---------------------------------------------------------------- 9. determinism


RECIPE = [MagnitudePruneConfig(sparsity=0.5), Int8Config(mode="static")]


def _compressed(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return compress_(tiny_mlp(16, 32, 8, seed=seed), RECIPE, calib=random_batches((4, 16), seed=seed))


def _artefact_hash(seed: int, folder: Path) -> str:
    """SHA-256 of the artefact's model.safetensors, written by save_artefact."""
    folder.mkdir(parents=True, exist_ok=True)
    save_artefact(_compressed(seed), folder, recipe=RECIPE, source=None)
    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def _weights_bytes(seed: int) -> bytes:
    """What save_artefact writes to model.safetensors, without the fsyncs."""
    return safetensors_bytes(sparse_encode(_compressed(seed).state_dict())[0])


@PROPS
@given(st.integers(0, 2**16))
def test_same_seed_gives_byte_identical_artefacts_in_process(seed: int) -> None:
    assert _weights_bytes(seed) == _weights_bytes(seed)


def test_a_different_seed_gives_a_different_artefact(tmp_path: Path) -> None:
    assert _artefact_hash(1, tmp_path / "a") != _artefact_hash(2, tmp_path / "b")
    assert _artefact_hash(1, tmp_path / "c") == hashlib.sha256(_weights_bytes(1)).hexdigest()


_SPAWNED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from test_invariants import _artefact_hash
    print(_artefact_hash(int(sys.argv[2]), Path(sys.argv[3])))
    """
)


def test_same_seed_gives_byte_identical_artefacts_across_fresh_processes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _SPAWNED, str(Path(__file__).parent), "7", str(tmp_path / str(i))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        for i in range(2)
    ]
    hashes = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        hashes.append(out.strip().splitlines()[-1])
    assert hashes[0] == hashes[1] == _artefact_hash(7, tmp_path / "here")


# ---------------------------------------------------------------- 10. serialization round-trip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]  # fmt: skip


@st.composite
def state_dicts(draw):  # type: ignore[no-untyped-def]
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), min_size=1, max_size=5, unique=True))
    state = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        base = draw(tensors(max_dims=3, allow_special=dtype.is_floating_point))
        if draw(st.booleans()):  # mostly zeros: stored sparse by the artefact
            base = base.reshape(-1)[:0].new_zeros(max(base.numel(), 80)).index_fill(0, torch.tensor([3]), 1.5)
        state[name] = base.to(dtype) if dtype.is_floating_point else base.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)
    return state


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@PROPS
@given(state_dicts())
def test_artefact_storage_round_trip_is_bit_identical_or_refused(tmp_path_factory, state: dict) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("rt") / "w.safetensors"
    tensors, sparse = sparse_encode(state)
    path.write_bytes(safetensors_bytes(tensors))
    non_finite = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if non_finite:
        with pytest.raises(InputRefused, match="NaN/inf"):
            load_state_dict_file(path)
        return
    loaded = sparse_decode(load_state_dict_file(path), sparse, source=path)
    assert loaded.keys() == state.keys()
    for k, t in state.items():
        got = loaded[k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(_bits(got), _bits(t)), k
