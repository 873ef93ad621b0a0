"""Tests for pared.measure: every test checks a number that a wrong implementation would miss."""

from __future__ import annotations

import copy

import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pared.errors import UsageError
from pared.measure import (
    count_macs,
    count_params,
    energy_per_inference,
    estimate_energy,
    file_bytes,
    interleaved_latency,
    latency_from_samples,
    measure_energy_rapl,
    measure_latency,
    load_and_run_memory_bytes,
    peak_memory_bytes,
    rapl_available,
)

MB = 1_000_000


# ---------------------------------------------------------------- toy modules


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class Int8Linear(nn.Module):
    """What a weight-only quantizer leaves behind: int8 buffer, scale, F.linear on dequantized w."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.randint(-127, 128, (out_features, in_features),
                                                      dtype=torch.int8))
        self.register_buffer("scale", torch.full((out_features, 1), 0.01))
        self.register_buffer("keep", torch.ones(out_features, dtype=torch.bool))  # not a weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.scale)


class TinyAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)  # (b, h, t, d/h)


# ---------------------------------------------------------------- size


def test_count_params_linear() -> None:
    assert count_params(nn.Linear(10, 5)) == 55


def test_count_params_tied_counted_once() -> None:
    assert count_params(TiedLM(vocab=100, dim=16)) == 100 * 16


def test_count_params_excludes_batchnorm_stats() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert count_params(model) == (3 * 4 + 4) + (4 + 4)


def test_count_params_counts_int8_buffers_not_bool() -> None:
    assert count_params(Int8Linear(10, 5)) == 10 * 5 + 5


def test_file_bytes_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 250)
    assert file_bytes(tmp_path / "a.bin") == 100
    assert file_bytes(tmp_path) == 350
    with pytest.raises(UsageError):
        file_bytes(tmp_path / "missing")


# ---------------------------------------------------------------- MACs


def test_count_macs_linear() -> None:
    assert count_macs(nn.Linear(64, 32), (torch.zeros(4, 64),)) == 4 * 64 * 32


def test_count_macs_conv() -> None:
    macs = count_macs(nn.Conv2d(3, 8, 3, bias=False), (torch.zeros(1, 3, 10, 10),))
    assert macs == 8 * 3 * 9 * 8 * 8


def test_count_macs_sdpa_counts_qk_and_pv() -> None:
    b, t, dim, heads = 1, 5, 16, 2
    projection = b * t * dim * 3 * dim
    qk = b * heads * t * t * (dim // heads)
    pv = b * heads * t * t * (dim // heads)
    assert count_macs(TinyAttention(dim, heads), (torch.zeros(b, t, dim),)) == projection + qk + pv


def test_count_macs_dequantized_linear_counts_as_linear() -> None:
    assert count_macs(Int8Linear(64, 32), (torch.zeros(4, 64),)) == 4 * 64 * 32


def test_count_macs_leaves_training_state_and_bn_stats_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = model[1].running_mean.clone()
    assert count_macs(model, (torch.randn(8, 4) + 5,)) == 8 * 4 * 4
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)


# ---------------------------------------------------------------- latency


def test_measure_latency_sleep_runner() -> None:
    calls = []

    def run() -> None:
        calls.append(1)
        time.sleep(0.005)

    lat = measure_latency(run, (), runtime="python", batch=1, threads=1, warmup=2, runs=7)
    assert len(calls) == 9
    assert lat.runs == 7 and lat.warmup == 2
    assert 4.5 <= lat.p50_ms <= 30
    assert lat.p90_ms >= lat.p50_ms
    assert set(lat.to_dict()) == {"p50", "p90", "mean", "runs", "warmup", "batch", "threads",
                                  "runtime"}


def test_measure_latency_warmup_not_timed() -> None:
    calls = []

    def run() -> None:
        calls.append(1)
        time.sleep(0.2 if len(calls) <= 2 else 0.001)

    lat = measure_latency(run, (), runtime="python", batch=1, threads=1, warmup=2, runs=5)
    assert lat.p90_ms < 100  # the two 200 ms warm-up calls would dominate p90 if timed


def test_measure_latency_min_time_extends_runs() -> None:
    lat = measure_latency(lambda: time.sleep(0.005), (), runtime="python", batch=1, threads=1,
                          warmup=0, runs=1, min_time_s=0.05)
    assert 2 <= lat.runs <= 10


def test_measure_latency_rejects_zero_runs() -> None:
    with pytest.raises(UsageError):
        measure_latency(lambda: None, (), runtime="x", batch=1, threads=1, runs=0)


def test_latency_from_samples_percentiles() -> None:
    lat = latency_from_samples([float(i) for i in range(1, 11)], runtime="ort", batch=4,
                               threads=2, warmup=3)
    assert lat.p50_ms == pytest.approx(5.5)
    assert lat.p90_ms == pytest.approx(9.1)
    assert lat.mean_ms == pytest.approx(5.5)
    assert lat.to_dict()["batch"] == 4 and lat.runs == 10


def test_interleaved_latency_round_robin() -> None:
    order: list[str] = []
    runners = {name: (lambda x, n=name: order.append(n)) for name in "abc"}
    samples = interleaved_latency(runners, (0,), rounds=3, warmup=1, settle=False)
    assert order == list("abc") * 4
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_interleaved_latency_rotate_and_per_runner_inputs() -> None:
    seen: list[tuple[str, int]] = []
    runners = {name: (lambda x, n=name: seen.append((n, x))) for name in "ab"}
    interleaved_latency(runners, {"a": (1,), "b": (2,)}, rounds=2, warmup=0, rotate=True, settle=False)
    assert seen == [("a", 1), ("b", 2), ("b", 2), ("a", 1)]


# ---------------------------------------------------------------- memory


def test_peak_memory_sees_200mb_allocation() -> None:
    def run() -> float:
        arr = np.ones(200 * MB // 8)  # float64, every page written
        return float(arr[-1])

    peak, method = peak_memory_bytes(run, ())
    assert method == "rss-sampled-delta"
    assert peak >= 150 * MB


def test_peak_memory_warmup_calls_precede_observed_calls() -> None:
    calls: list[int] = []
    peak_memory_bytes(lambda: calls.append(1), (), repeats=2, warmup=3)
    assert len(calls) == 5


def test_peak_memory_torch_activations() -> None:
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    x = torch.randn(256, 1024)
    peak, _ = peak_memory_bytes(model, (x,))
    # two live 256x4096 fp32 activations = 8.4 MB; allocator slack allowed, zero is not
    assert 4 * MB <= peak <= 40 * MB


def test_peak_memory_noop_is_small() -> None:
    peak, _ = peak_memory_bytes(lambda: None, ())
    assert 0 <= peak < 50 * MB


def test_load_and_run_memory_counts_what_loading_keeps() -> None:
    """A 64 MB module copied inside the measurement is charged for its weights; the same
    module's working memory (peak_memory_bytes on the loaded module) is only its activations."""
    model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4))  # 16.8 M params, 67 MB fp32
    x = torch.randn(2, 4096)
    calls: list[int] = []

    def build() -> nn.Module:
        copy_ = copy.deepcopy(model)
        return lambda t: (calls.append(1), copy_(t))[1]

    loaded, method = load_and_run_memory_bytes(build, (x,), calls=2)
    assert method == "rss-sampled-load-and-run"
    assert len(calls) == 2
    assert 55 * MB <= loaded <= 200 * MB
    working, _ = peak_memory_bytes(model, (x,))
    assert working < 20 * MB


def test_load_and_run_memory_of_a_runner_that_keeps_nothing_is_small() -> None:
    loaded, _ = load_and_run_memory_bytes(lambda: (lambda: None), ())
    assert 0 <= loaded < 50 * MB


def test_load_and_run_memory_rejects_zero_calls() -> None:
    with pytest.raises(UsageError):
        load_and_run_memory_bytes(lambda: (lambda: None), (), calls=0)


# ---------------------------------------------------------------- energy: estimate


def test_estimate_energy_matches_formula() -> None:
    e = estimate_energy(macs=1000, mac_dtype="fp32", weight_bytes=400, activation_bytes=100)
    assert e.value_j == pytest.approx((1000 * (3.7 + 0.9) + 500 * 160.0) * 1e-12)
    assert e.method.startswith("estimated:")
    assert "Horowitz" in e.detail["source"]
    assert e.to_dict()["value"] == e.value_j


def test_estimate_energy_int8_below_fp32() -> None:
    fp32 = estimate_energy(macs=10**6, mac_dtype="fp32", weight_bytes=4000, activation_bytes=400)
    int8 = estimate_energy(macs=10**6, mac_dtype="int8", weight_bytes=1000, activation_bytes=400)
    assert int8.value_j == pytest.approx((10**6 * 0.3 + 1400 * 160.0) * 1e-12)
    assert int8.value_j < fp32.value_j


def test_estimate_energy_bf16_uses_fp16_figures() -> None:
    kw = {"macs": 1000, "weight_bytes": 0, "activation_bytes": 0}
    assert estimate_energy(mac_dtype="bf16", **kw).value_j == pytest.approx(1000 * 1.5e-12)
    assert estimate_energy(mac_dtype="bf16", **kw).value_j == estimate_energy(
        mac_dtype="fp16", **kw).value_j


def test_estimate_energy_unknown_dtype() -> None:
    with pytest.raises(UsageError):
        estimate_energy(macs=1, mac_dtype="fp8", weight_bytes=0, activation_bytes=0)


# ---------------------------------------------------------------- energy: RAPL on a fake sysfs

MAX_RANGE = 1_000_000
# domain dir -> (name, start µJ, µJ added per call)
FAKE_DOMAINS = {
    "intel-rapl:0": ("package-0", MAX_RANGE - 50_000, 30_000),  # wraps on the 2nd call
    "intel-rapl:1": ("package-1", 1_000, 10_000),
    "intel-rapl:0:0": ("core", 0, 20_000),  # inside package-0: must not be added again
}


def _fake_rapl(root: Path) -> None:
    for dirname, (name, start, _) in FAKE_DOMAINS.items():
        d = root / dirname
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{start}\n")
        (d / "max_energy_range_uj").write_text(f"{MAX_RANGE}\n")


def _burn(root: Path) -> None:
    """Advance every fake counter by one call's energy, wrapping like the kernel does."""
    for dirname, (_, _, step) in FAKE_DOMAINS.items():
        counter = root / dirname / "energy_uj"
        value = int(counter.read_text()) + step
        counter.write_text(f"{value - MAX_RANGE if value > MAX_RANGE else value}\n")


def test_rapl_fake_sysfs_with_wraparound(tmp_path: Path) -> None:
    _fake_rapl(tmp_path)
    assert rapl_available(tmp_path)
    energy = measure_energy_rapl(lambda: _burn(tmp_path), (), runs=5, root=tmp_path)
    assert energy.method == "measured:rapl"
    assert energy.value_j == pytest.approx((30_000 + 10_000) * 1e-6)
    assert energy.detail["calls"] == 5
    assert len(energy.detail["counters"]) == 2


def test_rapl_unavailable_falls_back_to_labelled_estimate(tmp_path: Path) -> None:
    assert not rapl_available(tmp_path / "nope")
    kw = {"macs": 1000, "mac_dtype": "int8", "weight_bytes": 10, "activation_bytes": 10}
    est = energy_per_inference(lambda: None, (), rapl_root=tmp_path / "nope", **kw)
    assert est.method == "estimated:horowitz2014"
    assert est.value_j == pytest.approx(estimate_energy(**kw).value_j)
    assert "not_measured" in est.detail

    _fake_rapl(tmp_path)
    measured = energy_per_inference(lambda: _burn(tmp_path), (), rapl_root=tmp_path, runs=3, **kw)
    assert measured.method == "measured:rapl"
    assert measured.value_j == pytest.approx(0.04)
    assert measured.detail["estimate_j"] == pytest.approx(est.value_j)


# ---------------------------------------------------------------- energy: NVML path, faked


def test_nvml_missing_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    kw = {"macs": 10, "mac_dtype": "fp16", "weight_bytes": 0, "activation_bytes": 0}
    e = energy_per_inference(lambda: None, (), device="cuda", **kw)
    assert e.method == "estimated:horowitz2014"
    assert "pynvml" in e.detail["not_measured"]


def test_nvml_counter_delta_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"mj": 5_000}
    fake = types.SimpleNamespace(
        NVMLError=type("NVMLError", (Exception,), {}),
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: state["mj"],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="1234"))

    def run() -> None:
        state["mj"] += 250  # 0.25 J per call

    kw = {"macs": 10, "mac_dtype": "fp32", "weight_bytes": 0, "activation_bytes": 0}
    e = energy_per_inference(run, (), device="cuda", runs=3, **kw)
    assert e.method == "measured:nvml"
    assert e.value_j == pytest.approx(0.25)
    assert e.detail["calls"] >= 3 and e.detail["elapsed_s"] >= 1.0


def test_interleaved_latency_settle_calls_each_runner_twice_in_a_row() -> None:
    order: list[str] = []
    runners = {name: (lambda _x, n=name: order.append(n)) for name in ("a", "b")}
    samples = interleaved_latency(runners, (0,), rounds=2, warmup=0)
    assert order == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert [len(v) for v in samples.values()] == [2, 2]
