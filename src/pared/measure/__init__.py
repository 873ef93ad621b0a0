"""What every compress run and ``pared profile`` report: size, MACs, latency, memory, energy.

Each function measures one thing and says how (a ``method`` label or the recorded settings),
so a report can show the number next to the way it was obtained. See docs/measurement.md.
"""

from pared.measure.energy import (
    Energy,
    energy_per_inference,
    estimate_energy,
    measure_energy_rapl,
    rapl_available,
)
from pared.measure.latency import (
    Latency,
    interleaved_latency,
    latency_from_samples,
    measure_latency,
)
from pared.measure.macs import count_macs
from pared.measure.memory import load_and_run_memory_bytes, peak_memory_bytes
from pared.measure.size import count_params, file_bytes

__all__ = [
    "Energy",
    "Latency",
    "count_macs",
    "count_params",
    "energy_per_inference",
    "estimate_energy",
    "file_bytes",
    "interleaved_latency",
    "latency_from_samples",
    "load_and_run_memory_bytes",
    "measure_energy_rapl",
    "measure_latency",
    "peak_memory_bytes",
    "rapl_available",
]
