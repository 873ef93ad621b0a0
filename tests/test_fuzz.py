"""Bounded fuzzing of every file loader (pared.testing.fuzz): only pared's errors may come out.

A few hundred hypothesis-chosen mutations per loader here; the long run is
``python -m pared.testing.fuzz --iterations 10000`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pared.errors import InputRefused
from pared.testing.fuzz import (
    TARGETS,
    Target,
    _peak_rss_mb,
    check_one,
    fuzz,
    main,
    mutate,
    next_input,
)

# Inputs per loader in the normal suite: each target stays within a few seconds.
EXAMPLES = {"safetensors": 200, "torch-pickle": 150, "onnx": 100, "artefact": 100, "prdc": 200, "recipe": 200,
            "hf-config": 60}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_loader_raises_only_pared_errors(name: str) -> None:
    if name == "hf-config":
        pytest.importorskip("transformers")
    target = TARGETS[name]
    seeds = target.seeds()
    rss_before = _peak_rss_mb()

    @settings(max_examples=EXAMPLES[name], deadline=None, database=None)
    @given(st.randoms(use_true_random=False))
    def one_input(rng: random.Random) -> None:
        finding = check_one(target, next_input(target, seeds, rng), hang_seconds=5.0)
        assert finding is None, f"{finding.kind}: {finding.message}"

    one_input()
    assert _peak_rss_mb() - rss_before < 256, "a loader allocated what a mutated file declared"


def test_seeds_are_accepted_or_refused_cleanly() -> None:
    for target in TARGETS.values():
        if target.name == "hf-config":
            continue
        for seed in target.seeds():
            assert check_one(target, seed) is None, target.name


def test_findings_are_reported_for_raw_exceptions_and_hangs() -> None:
    raw = Target("raw", lambda: [b"x"], lambda data: {}[data])
    finding = check_one(raw, b"x")
    assert finding is not None and finding.kind == "KeyError"

    def swallowing(_data: bytes) -> None:  # a loader whose broad except would hide a timeout
        try:
            time.sleep(3)
        except Exception as exc:  # noqa: BLE001
            raise InputRefused("refused") from exc

    started = time.perf_counter()
    finding = check_one(Target("slow", lambda: [b""], swallowing), b"", hang_seconds=0.2)
    assert finding is not None and finding.kind == "hang"
    assert time.perf_counter() - started < 2


def test_campaign_summary_and_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    flaky = Target("flaky", lambda: [b"ok"], lambda data: 1 / (data == b"ok" or len(data) % 2))
    result = fuzz(flaky, iterations=50, seed=3)
    assert result["findings"] == len(result["_findings"]) > 0
    assert any(k.startswith("ZeroDivisionError") for k in result["kinds"])
    assert main(["--target", "recipe", "--iterations", "20"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["target"] == "recipe" and line["iterations"] == 20 and line["findings"] == 0


def test_mutations_are_seeded_and_change_the_input() -> None:
    data = bytes(range(256)) * 4
    a = [mutate(data, random.Random(s)) for s in range(50)]
    assert a == [mutate(data, random.Random(s)) for s in range(50)]
    assert sum(m != data for m in a) >= 45
