"""Cost of ``pared report``: render time (wall and CPU) and page size for real output folders.

Usage:
    python benchmarks/bench_report.py                      # compress digits int8 into a temp dir, then render
    python benchmarks/bench_report.py out/minilm-int8 out/my-search   # render existing folders

One JSON line per (folder, repetition) plus one for the matplotlib import; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path, help="compress or search output folders (default: a fresh digits int8 run)")
    parser.add_argument("--repeat", type=int, default=3, help="renders per folder")
    args = parser.parse_args()

    _, wall, cpu = _timed(lambda: __import__("pared.plots"))
    print(json.dumps({"bench": "report", "step": "import matplotlib + pared.plots", "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}))
    from pared.html_report import write_report

    with tempfile.TemporaryDirectory() as scratch:
        dirs = args.dirs or [_digits_int8(Path(scratch) / "digits-int8")]
        for directory in dirs:
            for rep in range(args.repeat):
                written, wall, cpu = _timed(lambda d=directory: write_report(d))
                page = written["files"][0].read_text(encoding="utf-8")
                print(json.dumps({
                    "bench": "report", "dir": directory.name, "kind": written["kind"], "repetition": rep,
                    "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "html_bytes": len(page.encode("utf-8")),
                    "figures": re.findall(r'<figure data-figure="([^"]+)"', page),
                    "report_json_bytes": (directory / "report.json").stat().st_size,
                }), flush=True)


def _digits_int8(out: Path) -> Path:
    from pared.pipeline import compress_task
    from pared.recipe import load_recipe
    from pared.tasks import get_task

    print("compressing digits with int8 (ONNX Runtime, 3 rounds) ...", file=sys.stderr)
    compress_task(get_task("digits"), load_recipe("int8"), out, recipe_name="int8", runtime="onnxruntime", latency_rounds=3)
    return out


if __name__ == "__main__":
    main()
