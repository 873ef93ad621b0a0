"""Small helpers of the ``pared search`` command: durations and the Ray backend's driver."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pared.errors import UsageError
from pared.search.study import SearchSpec

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*$")
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 60}


def parse_duration(text: str | None) -> float | None:
    """``"90s"``, ``"15m"``, ``"1h"`` or a bare number of minutes, in seconds (None stays None).

    Raises:
        UsageError: not a duration (the budget itself is checked by ``SearchSpec.validate``).
    """
    if text is None:
        return None
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"--time-budget {text!r} is not a duration such as 90s, 15m or 1h")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def run_backend(spec: SearchSpec, backend: str, *, workers: int, address: str | None,
                resume: bool, overwrite: bool) -> dict[str, Any]:
    """Create (or resume) the study here, run its trials on ``backend``, write the outputs."""
    if backend != "ray":
        raise UsageError(f"unknown backend {backend!r}; choose local or ray")
    from pared.search.output import write_outputs
    from pared.search.ray_backend import run_on_ray
    from pared.search.study import prepare

    study = prepare(spec, resume=resume, overwrite=overwrite)
    run_on_ray(spec, workers, address=address)
    return write_outputs(study, Path(spec.out))
