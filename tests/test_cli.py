"""End-to-end ``pared`` CLI on the digits task, and its one-line errors with documented exit codes.

Every CLI call is a real subprocess (``python -m pared.cli``). They are started together and
collected once per module, because each one pays for importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from pared.errors import UsageError
from pared.pipeline import compress_task
from pared.recipe import load_recipe
from pared.tasks import UserTask
from pared.tasks.digits import DigitsCNN


class Result(NamedTuple):
    rc: int
    stdout: str
    stderr: str


class Evil:
    """Pickles as a call to ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.canary}",))


def _tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        h.update(str(p.relative_to(directory)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "canary-dir").mkdir()
    torch.save({"weight": Evil(root / "canary-dir" / "CANARY")}, root / "evil.pt")
    (root / "unknown.yaml").write_text("steps:\n  - technique: prune_everything\n", encoding="utf-8")
    (root / "badtype.yaml").write_text(
        "steps:\n  - technique: int8\n    calibration_batches: many\n", encoding="utf-8"
    )
    existing = root / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous run", encoding="utf-8")
    for case in CASES:
        (root / case).mkdir()  # one parent per run: concurrent jobs never share a parent
    return root


CASES: dict[str, list[str]] = {
    # Relative, under a parent that does not exist yet: the README's first command on a fresh clone.
    "compress": ["compress", "--model", "digits", "--recipe", "int8", "--out", "out/digits-int8", "--rounds", "3"],
    "profile": ["profile", "--model", "digits", "--json", "--rounds", "3"],
    "recipes": ["recipes"],
    "help": ["--help"],
    "missing_model": ["compress", "--model", "/nonexistent/dir", "--out", "{case}/out"],
    "pickle": ["compress", "--model", "torch.nn:Identity", "--weights", "{root}/evil.pt",
               "--input-shape", "1,4", "--out", "{case}/out"],
    "unknown_technique": ["compress", "--model", "digits", "--recipe", "{root}/unknown.yaml",
                          "--out", "{case}/out"],
    "bad_type": ["compress", "--model", "digits", "--recipe", "{root}/badtype.yaml", "--out", "{case}/out"],
    "exists": ["compress", "--model", "digits", "--out", "{root}/existing"],
    "nothing": ["compress", "--model", "torch.nn:ReLU", "--input-shape", "2,4", "--recipe", "int8-static",
                "--out", "{case}/out"],
    "nothing_default_recipe": ["compress", "--model", "torch.nn:ReLU", "--input-shape", "2,4",
                               "--out", "{case}/out"],
}


@pytest.fixture(scope="module")
def runs(work: Path, digits_fp32: torch.nn.Module) -> dict[str, Result]:
    # digits_fp32 has trained the CNN into the session cache that the subprocesses inherit.
    env = dict(os.environ)
    assert env.get("PARED_CACHE_DIR")
    env.pop("PARED_DEBUG", None)
    def run(case: str) -> Result:
        argv = [a.format(root=work, case=work / case) for a in CASES[case]]
        proc = subprocess.run(
            [sys.executable, "-m", "pared.cli", *argv],
            cwd=work / case, env=env, capture_output=True, text=True, timeout=240,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    # Two at a time on this 2-core machine (more only oversubscribes torch's threads);
    # the two long runs first.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CASES, pool.map(run, CASES)))
    return results


PROGRESS = re.compile(r"^\[\d+/\d+\] ")


def _one_error_line(result: Result, *, progress_allowed: bool = False) -> str:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    if progress_allowed:
        lines = [ln for ln in lines if not PROGRESS.match(ln)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- the happy path


def test_compress_digits_writes_every_artefact(runs: dict[str, Result], work: Path) -> None:
    result = runs["compress"]
    assert result.rc == 0, result.stderr
    out = work / "compress" / "out" / "digits-int8"
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx", "model.safetensors", "pared.json", "report.json", "report.md"
    ]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".pared-tmp")] == []
    assert "# pared report" in result.stdout and "wrote" in result.stdout
    assert "| memory to load and run |" in result.stdout and "| peak working memory |" in result.stdout
    assert re.search(r"fp32 exported to openvino: p50 [\d.]+ ms, so compression alone gives [\d.]+x of the runtime's "
                     r"own fp32 latency; memory to load and run [\d.]+ [kM]B, so [\d.]+x of its fp32 memory\.", result.stdout)


def test_compress_report_json(runs: dict[str, Result], work: Path) -> None:
    assert runs["compress"].rc == 0
    out = work / "compress" / "out" / "digits-int8"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for side in ("baseline", "compressed"):
        r = report[side]
        assert isinstance(r["size_bytes"], int) and r["size_bytes"] > 0
        assert isinstance(r["params"], int) and r["params"] > 0
        assert r["macs"] > 0
        lat = r["latency_ms"]
        assert {"p50", "p90", "batch", "threads", "runtime"} <= set(lat)
        assert 0 < lat["p50"] <= lat["p90"] and lat["batch"] == 8 and lat["threads"] == 2
        assert {"value", "method"} <= set(r["energy_j"]) and r["energy_j"]["value"] > 0
        assert 0 <= r["metrics"]["accuracy"] <= 100
        assert isinstance(r["load_and_run_memory_bytes"], int) and r["load_and_run_memory_bytes"] >= 0
        assert r["load_and_run_memory_method"] == "rss-sampled-load-and-run"
    assert report["baseline"]["latency_ms"]["runtime"] == "torch"
    assert report["compressed"]["latency_ms"]["runtime"] == "openvino"
    assert report["fp32_same_runtime"]["load_and_run_memory_bytes"] >= 0
    assert report["baseline"]["metrics"]["accuracy"] >= 97.0
    drop = report["baseline"]["metrics"]["accuracy"] - report["compressed"]["metrics"]["accuracy"]
    assert drop <= 0.3
    assert report["compressed"]["size_bytes"] <= 0.3 * report["baseline"]["size_bytes"]
    assert report["recipe"]["name"] == "int8"
    assert [s["technique"] for s in report["recipe"]["steps"]] == ["smoothquant", "int8"]
    arts = {a["path"]: a for a in report["artefacts"]}
    assert {"model.onnx", "model.safetensors", "pared.json"} <= set(arts)
    assert arts["model.onnx"]["format"] == "onnx-qdq" and arts["model.safetensors"]["format"] == "safetensors"
    for name, a in arts.items():
        assert a["bytes"] == (out / name).stat().st_size
    assert report["compressed"]["size_bytes"] == arts["model.onnx"]["bytes"]


def test_compressed_artefact_loads(runs: dict[str, Result], work: Path) -> None:
    from pared.artefact import load_artefact
    from pared.tasks import get_task

    assert runs["compress"].rc == 0
    model = load_artefact(work / "compress" / "out" / "digits-int8")
    report = json.loads((work / "compress" / "out" / "digits-int8" / "report.json").read_text(encoding="utf-8"))
    acc = get_task("digits").evaluate(model)["accuracy"]
    assert abs(acc - report["compressed"]["metrics"]["accuracy"]) <= 0.5  # eager vs OpenVINO


def test_profile_json(runs: dict[str, Result]) -> None:
    result = runs["profile"]
    assert result.rc == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["task"] == "digits"
    assert data["params"] == sum(p.numel() for p in DigitsCNN().parameters())
    assert data["latency_ms"]["p50"] > 0 and data["latency_ms"]["runs"] == 3
    assert data["metrics"]["accuracy"] >= 97.0
    assert data["load_and_run_memory_method"] == "rss-sampled-load-and-run" and data["load_and_run_memory_bytes"] >= 0


def test_recipes_and_help(runs: dict[str, Result]) -> None:
    assert runs["recipes"].rc == 0
    listed = {line.split(":")[0].strip(): line for line in runs["recipes"].stdout.splitlines()}
    assert {"int8", "int8-static", "int8-dynamic"} <= set(listed)
    assert "smoothquant -> int8" in listed["int8"]
    assert runs["help"].rc == 0 and "compress" in runs["help"].stdout and "profile" in runs["help"].stdout


# ---------------------------------------------------------------- bad inputs


def test_missing_model_path(runs: dict[str, Result], work: Path) -> None:
    result = runs["missing_model"]
    assert result.rc == 2
    assert "/nonexistent/dir" in _one_error_line(result)
    assert list((work / "missing_model").iterdir()) == []


def test_pickle_payload_refused_and_never_run(runs: dict[str, Result], work: Path) -> None:
    result = runs["pickle"]
    assert result.rc == 3
    line = _one_error_line(result)
    assert "evil.pt" in line and "system" in line and "--trust-pickle" in line
    assert not (work / "canary-dir" / "CANARY").exists()
    assert list((work / "pickle").iterdir()) == []


def test_recipe_with_unknown_technique(runs: dict[str, Result], work: Path) -> None:
    result = runs["unknown_technique"]
    assert result.rc == 2
    line = _one_error_line(result)
    assert "prune_everything" in line and "unknown.yaml" in line
    assert list((work / "unknown_technique").iterdir()) == []


def test_recipe_with_wrong_type(runs: dict[str, Result], work: Path) -> None:
    result = runs["bad_type"]
    assert result.rc == 2
    line = _one_error_line(result)
    assert "calibration_batches" in line and "'many'" in line
    assert list((work / "bad_type").iterdir()) == []


def test_existing_output_dir_untouched(runs: dict[str, Result], work: Path) -> None:
    result = runs["exists"]
    assert result.rc == 2
    assert "already exists" in _one_error_line(result) and "--overwrite" in result.stderr
    assert sorted(p.name for p in (work / "existing").iterdir()) == ["keep.txt"]
    assert (work / "existing" / "keep.txt").read_text(encoding="utf-8") == "previous run"


def test_nothing_to_quantize(runs: dict[str, Result], work: Path) -> None:
    result = runs["nothing"]
    assert result.rc == 2
    assert "nothing to quantize" in _one_error_line(result, progress_allowed=True)
    assert list((work / "nothing").iterdir()) == []  # no out dir, no .pared-tmp-* left


def test_nothing_to_smooth_with_default_recipe(runs: dict[str, Result], work: Path) -> None:
    # The default recipe starts with SmoothQuant, which has nothing to smooth and passes on;
    # the int8 step then reports that nothing can be quantized.
    result = runs["nothing_default_recipe"]
    assert result.rc == 2
    assert "nothing to quantize" in _one_error_line(result, progress_allowed=True)
    assert list((work / "nothing_default_recipe").iterdir()) == []


def test_no_run_is_an_internal_error(runs: dict[str, Result]) -> None:
    assert {case: r.rc for case, r in runs.items() if r.rc == 1} == {}
    assert not any("internal error" in r.stderr for r in runs.values())


# ---------------------------------------------------------------- Python API


def test_empty_calibration_via_api(tmp_path: Path) -> None:
    x = torch.randn(16, 4)
    task = UserTask(
        "empty-calib",
        model_fn=lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)),
        example_inputs_fn=lambda b: (x[:b],),
        evaluate_fn=lambda run: {"accuracy": 1.0},
        calibration_data=[],
    )
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="calibration dataset must not be empty"):
        compress_task(task, load_recipe("int8-static"), out, runtime="torch", latency_rounds=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_existing_output_before_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a")
    before = _tree_hash(out)

    def never() -> torch.nn.Module:
        raise AssertionError("model built although the output exists")

    task = UserTask("t", model_fn=never, example_inputs_fn=lambda b: (torch.zeros(b, 4),),
                    evaluate_fn=lambda run: {"accuracy": 1.0}, calibration_data=[])
    with pytest.raises(UsageError, match="already exists"):
        compress_task(task, load_recipe("int8"), out)
    assert _tree_hash(out) == before
