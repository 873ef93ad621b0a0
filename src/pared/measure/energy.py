"""Energy per inference: measured from hardware counters where they exist, estimated otherwise.

Every result carries its method (``measured:rapl``, ``measured:nvml`` or
``estimated:horowitz2014``) so a report can never pass an estimate off as a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pared.errors import EnvironmentIOError, UsageError
from pared.measure.latency import _inference_context

RAPL_ROOT = Path("/sys/class/powercap")

METHOD_RAPL = "measured:rapl"
METHOD_NVML = "measured:nvml"
METHOD_ESTIMATE = "estimated:horowitz2014"

HOROWITZ_2014 = (
    'M. Horowitz, "Computing\'s energy problem (and what we can do about it)", '
    "IEEE ISSCC 2014, pp. 10-14, doi:10.1109/ISSCC.2014.6757323; 45 nm, 0.9 V figures"
)
HAN_2015 = (
    'S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections for Efficient '
    'Neural Networks", NeurIPS 2015, Table 1 (45 nm energy table after Horowitz)'
)

# (multiply pJ, add pJ, which Horowitz row the figures come from, note)
_MAC_PJ: dict[str, tuple[float, float, str, str]] = {
    "fp32": (3.7, 0.9, "fp32", "32-bit float mult 3.7 pJ + 32-bit float add 0.9 pJ"),
    "fp16": (1.1, 0.4, "fp16", "16-bit float mult 1.1 pJ + 16-bit float add 0.4 pJ"),
    "bf16": (
        1.1,
        0.4,
        "fp16",
        "no bf16 figure in the source; 16-bit float figures used (mult 1.1 pJ + add 0.4 pJ)",
    ),
    "int8": (0.2, 0.1, "int8", "8-bit int mult 0.2 pJ + 32-bit int add 0.1 pJ (int32 accumulator)"),
    "int4": (
        0.2,
        0.1,
        "int8",
        "no int4 figure in the source; int8 figures used (8-bit mult 0.2 pJ + 32-bit add "
        "0.1 pJ), so this overstates int4 compute energy",
    ),
}
# Horowitz gives 1.3-2.6 nJ per 64-bit DRAM access; Han et al. tabulate 640 pJ per 32-bit access.
_DRAM_PJ_PER_WORD32 = 640.0
_DRAM_PJ_PER_BYTE = _DRAM_PJ_PER_WORD32 / 4


@dataclass
class Energy:
    """Energy of one inference call (one batch).

    Attributes:
        value_j: joules per call.
        method: ``"measured:rapl"``, ``"measured:nvml"`` or ``"estimated:<method-name>"``.
        detail: the estimate's inputs and constants with citations, or the counters read.
    """

    value_j: float
    method: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the report form ``{"value": joules, "method": ..., "detail": {...}}``."""
        return {"value": self.value_j, "method": self.method, "detail": self.detail}


def estimate_energy(
    *, macs: int, mac_dtype: str, weight_bytes: int, activation_bytes: int
) -> Energy:
    """Estimate energy from operation counts with Horowitz's 45 nm per-operation figures.

    ``E = macs * (mult_pJ + add_pJ) + (weight_bytes + activation_bytes) * 160 pJ/byte``, the
    DRAM term being 640 pJ per 32-bit word with every weight and activation byte crossing DRAM
    once per inference. It ignores caches, static power and everything but MACs, so it ranks
    variants of one model; it does not predict a meter reading.

    Args:
        macs: multiply-accumulates per inference (see ``count_macs``).
        mac_dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` (fp16 figures), ``"int8"`` or ``"int4"``
            (int8 figures).
        weight_bytes: bytes of weights read per inference.
        activation_bytes: bytes of activations written and read per inference.

    Returns:
        ``Energy`` with method ``"estimated:horowitz2014"``; ``detail`` holds every input,
        constant, the compute/memory split and the citations.

    Raises:
        UsageError: unknown ``mac_dtype`` or a negative count.

    Example:
        >>> e = estimate_energy(macs=10**6, mac_dtype="int8", weight_bytes=0, activation_bytes=0)
        >>> round(e.value_j * 1e9)  # nJ: 10**6 MACs * 0.3 pJ
        300
    """
    if mac_dtype not in _MAC_PJ:
        raise UsageError(f"unknown mac_dtype {mac_dtype!r}; expected one of {sorted(_MAC_PJ)}")
    counts = {"macs": macs, "weight_bytes": weight_bytes, "activation_bytes": activation_bytes}
    for name, value in counts.items():
        if value < 0:
            raise UsageError(f"{name} must be 0 or more, got {value}")
    mult_pj, add_pj, row, note = _MAC_PJ[mac_dtype]
    compute_pj = macs * (mult_pj + add_pj)
    memory_pj = (weight_bytes + activation_bytes) * _DRAM_PJ_PER_BYTE
    detail = {
        "formula": "macs*(mult_pj+add_pj) + (weight_bytes+activation_bytes)*dram_pj_per_byte",
        "macs": int(macs),
        "mac_dtype": mac_dtype,
        "figures_for": row,
        "mult_pj": mult_pj,
        "add_pj": add_pj,
        "mac_note": note,
        "weight_bytes": int(weight_bytes),
        "activation_bytes": int(activation_bytes),
        "dram_pj_per_32bit_word": _DRAM_PJ_PER_WORD32,
        "dram_pj_per_byte": _DRAM_PJ_PER_BYTE,
        "compute_j": compute_pj * 1e-12,
        "memory_j": memory_pj * 1e-12,
        "source": HOROWITZ_2014,
        "dram_source": f"640 pJ per 32-bit DRAM access as tabulated in {HAN_2015}; Horowitz's "
        "own slide gives 1.3-2.6 nJ per 64-bit access, so this is the low end",
        "assumptions": "each weight and activation byte crosses DRAM once; no cache reuse; "
        "no static or leakage power; non-MAC ops free",
    }
    return Energy(value_j=(compute_pj + memory_pj) * 1e-12, method=METHOD_ESTIMATE, detail=detail)


def rapl_available(root: Path = RAPL_ROOT) -> bool:
    """Whether RAPL energy counters can be read (``<root>/intel-rapl:*/energy_uj``).

    Since 2020 (CVE-2020-8694) kernels make ``energy_uj`` readable by root only, so this is
    often false for ordinary users even on Intel/AMD machines that have the counters.

    Args:
        root: the powercap sysfs directory; tests point it at a fake tree.

    Returns:
        True if at least one domain's counter and its wrap range are readable.
    """
    return bool(_rapl_domains(root))


def measure_energy_rapl(
    run: Callable[..., Any],
    inputs: tuple[Any, ...],
    *,
    runs: int = 20,
    warmup: int = 1,
    min_time_s: float = 0.0,
    root: Path = RAPL_ROOT,
) -> Energy:
    """Measure CPU energy per call from the RAPL ``energy_uj`` counters.

    Sums the package domains (``intel-rapl:N``; ``psys`` only when no package domain exists,
    since it contains them) and their ``dram`` subdomains; ``core``/``uncore`` are inside the
    package and are skipped. A counter that wrapped between the two reads is corrected with
    its ``max_energy_range_uj`` (one wrap at most, i.e. minutes at full power).

    Args:
        run: the inference callable.
        inputs: its positional arguments.
        runs: minimum measured calls.
        warmup: unmeasured calls first.
        min_time_s: keep calling until this much time has passed too (RAPL updates about
            every millisecond, so very short totals are coarse).
        root: the powercap sysfs directory.

    Returns:
        ``Energy`` with method ``"measured:rapl"``: the counters' delta / calls. This is the
        whole package's energy while the model ran, idle power and other processes included;
        ``detail`` has the elapsed time and mean power so a caller can subtract an idle baseline.

    Raises:
        EnvironmentIOError: no readable RAPL domain under ``root``.
        UsageError: ``runs`` < 1 or ``warmup`` < 0.
    """
    domains = _rapl_domains(root)
    if not domains:
        raise EnvironmentIOError(f"no readable RAPL energy counters under {root}")

    def read() -> list[int]:
        try:
            return [_read_int(d / "energy_uj") for d in domains]
        except (OSError, ValueError) as exc:
            raise EnvironmentIOError(f"RAPL counter became unreadable: {exc}") from exc

    ranges = [_read_int(d / "max_energy_range_uj") for d in domains]
    before, after, calls, elapsed = _metered(run, inputs, read, runs, warmup, min_time_s, None)
    per_domain: dict[str, float] = {}
    for d, b, a, r in zip(domains, before, after, ranges, strict=True):
        per_domain[f"{d.name}:{_domain_name(d)}"] = _wrapped_delta(b, a, r) * 1e-6
    total_j = sum(per_domain.values())
    detail = {
        "counters": [str(d / "energy_uj") for d in domains],
        "domain_j": per_domain,
        "calls": calls,
        "elapsed_s": elapsed,
        "mean_power_w": total_j / elapsed if elapsed > 0 else None,
        "scope": "whole CPU package(s) and DRAM domains; includes idle power and other processes",
    }
    return Energy(value_j=total_j / calls, method=METHOD_RAPL, detail=detail)


def energy_per_inference(
    run: Callable[..., Any],
    inputs: tuple[Any, ...],
    *,
    macs: int,
    mac_dtype: str,
    weight_bytes: int,
    activation_bytes: int,
    device: str = "cpu",
    runs: int = 20,
    rapl_root: Path = RAPL_ROOT,
) -> Energy:
    """Energy per call: measured where a counter exists, else the Horowitz estimate.

    ``device="cpu"`` uses RAPL when readable; ``"cuda"``/``"cuda:N"`` uses NVML's
    total-energy counter (needs the optional ``pynvml`` package and a Volta or newer GPU). When
    a measurement is not possible the estimate is returned, with ``detail["not_measured"]``
    saying why. A measured result carries the estimate in ``detail["estimate_j"]`` for comparison.

    Args:
        run: the inference callable.
        inputs: its positional arguments.
        macs: MACs per call, for the estimate.
        mac_dtype: MAC precision, for the estimate (see ``estimate_energy``).
        weight_bytes: weight bytes per call, for the estimate.
        activation_bytes: activation bytes per call, for the estimate.
        device: where ``run`` executes.
        runs: measured calls (NVML additionally runs for at least one second, its counter
            being coarse).
        rapl_root: the powercap sysfs directory.

    Returns:
        An ``Energy`` whose ``method`` says whether it was measured or estimated.

    Raises:
        UsageError: unknown ``mac_dtype`` or negative counts (checked even when measuring).
    """
    estimate = estimate_energy(
        macs=macs, mac_dtype=mac_dtype, weight_bytes=weight_bytes, activation_bytes=activation_bytes
    )
    reason = _why_not_measurable(device, rapl_root)
    if reason is not None:
        estimate.detail["not_measured"] = reason
        return estimate
    try:
        if device == "cpu":
            measured = measure_energy_rapl(run, inputs, runs=runs, root=rapl_root)
        else:
            measured = _measure_energy_nvml(run, inputs, device=device, runs=runs)
    except EnvironmentIOError as exc:
        # Only counter failures land here (errors raised by ``run`` propagate): a counter that
        # exists but fails should not sink a whole compress run when a labelled estimate exists.
        estimate.detail["not_measured"] = str(exc)
        return estimate
    measured.detail["estimate_j"] = estimate.value_j
    return measured


def _why_not_measurable(device: str, rapl_root: Path) -> str | None:
    if device == "cpu":
        if rapl_available(rapl_root):
            return None
        return f"RAPL counters not readable under {rapl_root}"
    if not device.startswith("cuda"):
        return f"no energy counter known for device {device!r}"
    try:
        import pynvml  # noqa: F401  (optional dependency)
    except ImportError:
        return "pynvml not installed (pip install nvidia-ml-py)"
    return None


def _measure_energy_nvml(
    run: Callable[..., Any], inputs: tuple[Any, ...], *, device: str, runs: int
) -> Energy:
    import pynvml

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise EnvironmentIOError(f"NVML unavailable: {exc}") from exc
    try:
        handle = _nvml_handle(pynvml, index)

        def read() -> list[int]:
            try:
                return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))]  # millijoules
            except pynvml.NVMLError as exc:
                raise EnvironmentIOError(f"NVML energy counter unreadable: {exc}") from exc

        def sync() -> None:
            torch.cuda.synchronize(index)

        before, after, calls, elapsed = _metered(run, inputs, read, runs, 1, 1.0, sync)
    finally:
        pynvml.nvmlShutdown()
    total_j = (after[0] - before[0]) * 1e-3
    detail = {
        "counter": "nvmlDeviceGetTotalEnergyConsumption",
        "cuda_index": index,
        "calls": calls,
        "elapsed_s": elapsed,
        "mean_power_w": total_j / elapsed if elapsed > 0 else None,
        "scope": "whole GPU board; includes idle power and other processes on the GPU",
    }
    return Energy(value_j=total_j / calls, method=METHOD_NVML, detail=detail)


def _nvml_handle(pynvml: Any, index: int) -> Any:
    # NVML numbers GPUs physically while CUDA_VISIBLE_DEVICES renumbers them for torch; the
    # UUID is the one name both agree on.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError as exc:
        raise EnvironmentIOError(f"NVML has no GPU {index}: {exc}") from exc


def _metered(
    run: Callable[..., Any],
    inputs: tuple[Any, ...],
    read: Callable[[], list[int]],
    runs: int,
    warmup: int,
    min_time_s: float,
    sync: Callable[[], None] | None,
) -> tuple[list[int], list[int], int, float]:
    """Call ``run`` between two counter reads; return (before, after, calls, seconds)."""
    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    with _inference_context(inputs):
        for _ in range(warmup):
            run(*inputs)
        if sync is not None:
            sync()
        before = read()
        start = time.perf_counter()
        calls = 0
        while calls < runs or time.perf_counter() - start < min_time_s:
            run(*inputs)
            calls += 1
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        after = read()
    return before, after, calls, elapsed


def _rapl_domains(root: Path) -> list[Path]:
    """Readable domains whose sum is the machine's CPU energy without double counting."""
    try:
        entries = sorted(p for p in root.glob("intel-rapl:*") if _readable(p))
    except OSError:
        return []
    tops = [p for p in entries if p.name.count(":") == 1]
    packages = [p for p in tops if _domain_name(p) != "psys"]
    chosen = packages or tops
    # Subdomains are exposed both nested and as siblings of the packages in /sys/class/powercap.
    dram = [p for p in entries if p.name.count(":") == 2 and _domain_name(p) == "dram"]
    parents = {p.name for p in chosen}
    dram = [p for p in dram if p.name.rsplit(":", 1)[0] in parents]
    return chosen + dram


def _readable(domain: Path) -> bool:
    try:
        _read_int(domain / "energy_uj")
        _read_int(domain / "max_energy_range_uj")
    except (OSError, ValueError):
        return False
    return True


def _domain_name(domain: Path) -> str:
    try:
        return (domain / "name").read_text().strip()
    except OSError:
        return domain.name


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _wrapped_delta(before: int, after: int, max_range: int) -> int:
    if after >= before:
        return after - before
    return after + max_range - before
