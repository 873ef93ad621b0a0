"""``pared report DIR``: the HTML page of a real compress run and of a search folder, rendered in
headless Chromium (figures decoded, tables present, a screenshot that is not blank), the
per-layer weight statistics behind the histograms, and one-line errors for bad folders.

The search folder is built here from the search.json contract (docs/report.md) with a real
digits int8 compress output as its Pareto point, so this file does not depend on the search code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pared.apply import compress_
from pared.cli import main
from pared.cluster import ClusterConfig
from pared.errors import InputRefused
from pared.html_report import write_report
from pared.pipeline import compress_task
from pared.plots import front_2d
from pared.prune.sensitivity import save_sensitivity
from pared.prune.structured import ChannelPruneConfig
from pared.quant import Int8Config, SmoothQuantConfig, WeightOnlyConfig
from pared.quant.smoothquant import SmoothedLinear
from pared.recipe import load_recipe
from pared.tasks import get_task
from pared.testing.models import random_batches, tiny_cnn, tiny_mlp
from pared.weight_stats import effective_weight, layer_weight_stats

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def compress_dir(tmp_path_factory: pytest.TempPathFactory, digits_fp32: torch.nn.Module) -> Path:
    """A real ``pared compress --model digits --recipe int8`` output (3 timed rounds, ONNX Runtime)."""
    out = tmp_path_factory.mktemp("compress") / "digits-int8"
    compress_task(get_task("digits"), load_recipe("int8"), out, recipe_name="int8", runtime="onnxruntime",
                  latency_rounds=3)
    return out


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory, compress_dir: Path) -> Path:
    """A search folder following the contract, with the compress run above as Pareto point 3."""
    out = tmp_path_factory.mktemp("search") / "digits-search"
    (out / "recipes").mkdir(parents=True)
    (out / "points").mkdir()
    shutil.copytree(compress_dir, out / "points" / "trial-0003")
    point = json.loads((compress_dir / "report.json").read_text())
    (out / "search.json").write_text(json.dumps(fake_search(point)), encoding="utf-8")
    for n in range(12):
        (out / "recipes" / f"trial-{n:04d}.yaml").write_text("steps:\n  - technique: int8\n", encoding="utf-8")
    return out


def fake_search(point: dict) -> dict:
    """12 trials on a smooth accuracy/latency trade-off, one failure, one NaN, two peers."""
    base = point["baseline"]
    trials = []
    for n in range(12):
        ratio = 0.15 + 0.07 * n
        metrics = {"accuracy": 99.2 - 6.0 / (1 + 8 * ratio) - 0.3 * (n % 3), "latency_ratio": ratio,
                   "latency_ms": ratio * base["latency_ms"]["p50"], "size_bytes": int(base["size_bytes"] * (0.2 + 0.05 * n)),
                   "size_ratio": 0.2 + 0.05 * n, "energy_j": base["energy_j"]["value"] * (0.3 + 0.04 * n), "macs": base["macs"]}
        trials.append({"number": n, "state": "COMPLETE", "params": {"bits": 8 if n % 2 else 4}, "metrics": metrics,
                       "feasible": metrics["accuracy"] >= 97.0, "pareto": n in (3, 6, 9),
                       "recipe": f"recipes/trial-{n:04d}.yaml", "artefact": "points/trial-0003" if n == 3 else None,
                       "error": None})
    trials[3]["metrics"].update(accuracy=point["compressed"]["metrics"]["accuracy"])
    trials[7]["metrics"]["accuracy"] = float("nan")
    trials[9]["recipe"] = "../../etc/passwd"  # must never become a link
    trials[6]["recipe"] = "javascript:alert(1)"
    trials.append({"number": 12, "state": "FAIL", "params": {"bits": 2}, "metrics": {}, "feasible": False,
                   "pareto": False, "recipe": None, "artefact": None, "error": HOSTILE})
    metric = point["baseline"]["metrics"]["accuracy"]
    return {
        "task": "digits", "runtime": "onnxruntime", "batch": 8,
        "objectives": [{"name": "accuracy", "direction": "maximize"}, {"name": "latency_ratio", "direction": "minimize"}],
        "constraints": ["metric_drop <= 2.0"],
        "baseline": {"metrics": {"accuracy": metric}, "latency_ms": base["latency_ms"]["p50"],
                     "size_bytes": base["size_bytes"], "macs": base["macs"], "energy_j": base["energy_j"]["value"]},
        "trials": trials,
        "peers": [{"name": "ort-quantize-dynamic", "metrics": {"accuracy": metric - 0.4, "latency_ratio": 0.5,
                                                               "size_bytes": base["size_bytes"] // 3, "energy_j": None}},
                  {"name": HOSTILE, "metrics": {"accuracy": metric - 1.0, "latency_ratio": 0.8}}],
        "sensitivity": {f"features.{i}": {"int8": 0.01 * i, "int4": 0.2 * i, "prune50": 0.5 * i} for i in (0, 3, 7)},
    }


def test_compress_report_is_self_contained_and_keeps_report_json(compress_dir: Path) -> None:
    before = hashlib.sha256((compress_dir / "report.json").read_bytes()).hexdigest()
    written = write_report(compress_dir)
    assert written == {"kind": "compress", "files": [compress_dir / "report.html", compress_dir / "report.md"]}
    assert hashlib.sha256((compress_dir / "report.json").read_bytes()).hexdigest() == before
    page = (compress_dir / "report.html").read_text(encoding="utf-8")
    assert _figures(page) == ["ratios", "histograms", "layer-error"]
    _assert_offline(page)
    assert 'data-table="before-after"' in page and "How each figure was measured" in page
    assert "estimated:horowitz2014" in page or "measured:rapl" in page  # energy method from report.json
    markdown = (compress_dir / "report.md").read_text(encoding="utf-8")
    assert "## Per-layer weights" in markdown and "classifier.3" in markdown


def test_compress_report_adds_pruning_sensitivity_when_saved(compress_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-sensitivity"
    shutil.copytree(compress_dir, folder)
    result = {"metric": "accuracy", "baseline": 99.1, "ratios": [0.25, 0.5], "higher_is_better": True,
              "technique": "prune_channels", "layers": {"features.0": {"channels": 16, "drops": {"0.25": 0.1, "0.5": 0.9}},
                                                        "features.3": {"channels": 32, "drops": {"0.25": 0.0, "0.5": 0.2}}}}
    save_sensitivity(result, folder)
    write_report(folder)
    assert _figures((folder / "report.html").read_text(encoding="utf-8")) == ["ratios", "histograms", "layer-error", "sensitivity"]


def test_cli_renders_a_report_json_without_weight_statistics(compress_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "older"
    shutil.copytree(compress_dir, folder)
    report = json.loads((folder / "report.json").read_text())
    del report["weights"]  # as written before pared recorded them
    (folder / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["pared", "report", str(folder)])
    main()
    assert capsys.readouterr().out.startswith(f"compress report: wrote {folder / 'report.html'}")
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert _figures(page) == ["ratios"] and "No per-layer weight statistics" in page


def test_search_report_pareto_table_and_escaping(search_dir: Path) -> None:
    written = write_report(search_dir)
    assert written["kind"] == "search" and [p.name for p in written["files"]] == ["report.html", "report.md", "report.json"]
    page = (search_dir / "report.html").read_text(encoding="utf-8")
    assert _figures(page) == ["pareto-latency_ratio", "pareto-size_bytes", "pareto-energy_j", "sensitivity",
                              "histograms", "layer-error"]
    _assert_offline(page)
    assert HOSTILE not in page and "&lt;script&gt;" in page
    assert 'href="recipes/trial-0003.yaml"' in page and 'href="points/trial-0003"' in page
    assert "etc/passwd" in page and 'href="../../etc/passwd"' not in page and 'href="javascript:' not in page
    table = re.search(r'<table data-table="before-after">.*?</table>', page, re.S).group(0)
    assert table.count('class="pareto"') == 3 and table.count('class="peer"') == 2
    summary = json.loads((search_dir / "report.json").read_text(), parse_constant=_refuse_constant)  # strict JSON: no NaN
    accuracies = [t["metrics"]["accuracy"] for t in summary["pareto"]]
    assert accuracies == sorted(accuracies, reverse=True)  # best point first
    doc = json.loads((search_dir / "search.json").read_text())
    feasible = sum(t["feasible"] for t in doc["trials"])
    assert summary["counts"] == {"COMPLETE": 12, "FAIL": 1, "PRUNED": 0, "feasible": feasible, "pareto": 3}


@pytest.mark.parametrize("which", ["compress", "search"])
def test_report_renders_in_headless_chromium(which: str, compress_dir: Path, search_dir: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required under CI (apt-get install chromium)")
        pytest.skip("chromium not installed")
    directory = compress_dir if which == "compress" else search_dir
    page = write_report(directory)["files"][0]
    expected = len(_figures(page.read_text(encoding="utf-8")))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-figures-loaded="{expected}/{expected}"' in body, body
    assert f'data-tables="{page.read_text(encoding="utf-8").count("<table ")}"' in body
    assert dom.count('data-loaded="yes"') == expected
    shot = tmp_path / f"{which}.png"
    _chromium(tmp_path, "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri())
    _assert_not_blank(shot, width=1100, height=2600)
    keep = os.environ.get("PARED_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


def test_weight_stats_int8_with_smoothquant_and_folded_batchnorm() -> None:
    mlp = tiny_mlp()
    smoothed = compress_(copy.deepcopy(mlp), SmoothQuantConfig(alpha=0.8), calib=random_batches((4, 16)))
    only_smooth = layer_weight_stats(mlp, smoothed)["layers"]
    # The ChannelScale is folded back: SmoothQuant alone changes nothing but float rounding.
    assert set(only_smooth) == {"0", "2"} and all((e["sqnr_db"] or math.inf) > 100 for e in only_smooth.values())
    quantized = compress_(copy.deepcopy(smoothed), Int8Config(mode="static"), calib=random_batches((4, 16)))
    stats = layer_weight_stats(mlp, quantized)
    for entry in stats["layers"].values():
        assert sum(entry["before"]) == entry["numel_before"] and sum(entry["after"]) == entry["numel_after"]
        assert 30 < entry["sqnr_db"] < 60  # int8 per channel, not identical, not wrong
    cnn = tiny_cnn()
    stats = layer_weight_stats(cnn, compress_(copy.deepcopy(cnn), Int8Config(mode="static"), calib=random_batches((4, 3, 6, 6))))
    assert stats["reference"].startswith("fp32 with BatchNorm folded") and stats["layers"]["conv"]["sqnr_db"] > 30


def _weight_only_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("configs", [
    [SmoothQuantConfig(alpha=0.5), Int8Config(mode="weight")],
    [WeightOnlyConfig(bits=4, group_size=32, method="rtn")],
    [ClusterConfig(bits=3)],
], ids=["smoothquant-int8", "int4", "cluster"])
def test_effective_weight_is_what_each_compressed_layer_computes_with(configs: list) -> None:
    fp32 = _weight_only_model()
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    compressed = compress_(copy.deepcopy(fp32), configs, calib=[(ids,)] * 2)
    layers = dict(compressed.named_modules())
    with torch.no_grad():
        assert torch.equal(effective_weight(layers["0"])[ids], layers["0"](ids).float())  # embedding rows
        for name, width in (("1", 64), ("3", 32)):
            x = torch.randn(4, 6, width)
            bias = layers[name][1].bias if isinstance(layers[name], SmoothedLinear) else layers[name].bias
            expected = torch.nn.functional.linear(x, effective_weight(layers[name]), bias)
            assert torch.allclose(layers[name](x), expected, atol=1e-5), name
    stats = layer_weight_stats(fp32, compressed)["layers"]
    assert list(stats) == ["0", "1", "3"]
    assert all((e["sqnr_db"] is None and e["identical"]) or 5 < e["sqnr_db"] < 60 for e in stats.values()), stats


def test_weight_stats_after_channel_pruning_has_no_sqnr() -> None:
    mlp = tiny_mlp()
    pruned = compress_(copy.deepcopy(mlp), ChannelPruneConfig(ratio=0.5), calib=random_batches((4, 16)))
    layers = layer_weight_stats(mlp, pruned)["layers"]
    assert layers["0"]["sqnr_db"] is None and layers["0"]["numel_after"] == layers["0"]["numel_before"] // 2
    assert sum(layers["2"]["after"]) == layers["2"]["numel_after"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(-5, 5)), min_size=1, max_size=30), st.booleans())
def test_front_2d_is_exactly_the_non_dominated_set(points: list[tuple[float, float]], maximize: bool) -> None:
    sign = 1 if maximize else -1

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_or_equal = a[0] <= b[0] and sign * a[1] >= sign * b[1]
        return better_or_equal and (a[0] < b[0] or sign * a[1] > sign * b[1])

    front = front_2d(points, maximize_y=maximize)
    for i in front:
        assert not any(dominates(p, points[i]) for p in points)
    for i in set(range(len(points))) - set(front):
        assert any(dominates(points[j], points[i]) for j in front) or points[i] in [points[j] for j in front]
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def _small_search() -> dict:
    trials = [{"number": n, "state": "COMPLETE", "params": {"b": n}, "feasible": n > 0, "pareto": n == 2,
               "metrics": {"accuracy": 90.0 + n, "latency_ratio": 0.2 * (n + 1), "size_bytes": 1000 * (n + 1), "energy_j": 0.1 * n}}
              for n in range(3)]
    return {"task": "t", "objectives": [{"name": "accuracy", "direction": "maximize"}], "constraints": [],
            "baseline": {"metrics": {"accuracy": 93.0}, "latency_ms": 2.0, "size_bytes": 4000, "energy_j": 0.5},
            "trials": trials, "peers": [{"name": "p", "metrics": {"accuracy": 91.0, "latency_ratio": 0.5}}],
            "sensitivity": {"fc": {"int8": 0.1}}}


MUTATION_PATHS = [("task",), ("objectives",), ("objectives", 0), ("objectives", 0, "direction"), ("baseline",),
                  ("baseline", "metrics"), ("baseline", "size_bytes"), ("trials",), ("trials", 1), ("trials", 1, "metrics"),
                  ("trials", 1, "number"), ("trials", 2, "recipe"), ("trials", 2, "params"), ("peers",), ("peers", 0),
                  ("peers", 0, "metrics"), ("sensitivity",), ("sensitivity", "fc"), ("constraints",)]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(MUTATION_PATHS), JSON_VALUES)
def test_mutated_search_json_renders_or_is_refused_in_one_line(path: tuple, value: object) -> None:
    doc = _small_search()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "search.json").write_text(json.dumps(doc), encoding="utf-8")
        try:
            written = write_report(folder)
        except InputRefused as exc:
            assert "\n" not in str(exc) and not (Path(folder) / "report.html").exists()
        else:
            assert written["files"][0].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_renders_the_folder_pared_search_itself_writes(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from search_synthetic import SyntheticEvaluator  # cheap trials; the search's own output code

    from pared.search import SearchSpec, search

    doc = search(SearchSpec(model="digits", out=str(tmp_path / "s"), trials=5, sampler="random", seed=1,
                            constraints=("metric_drop <= 2",)), evaluator=SyntheticEvaluator())
    write_report(tmp_path / "s")
    page = (tmp_path / "s" / "report.html").read_text(encoding="utf-8")
    assert _figures(page)[:4] == ["pareto-latency_ratio", "pareto-size_bytes", "pareto-energy_j", "sensitivity"]
    table = re.search(r'<table data-table="before-after">.*?</table>', page, re.S).group(0)
    front = [t for t in doc["trials"] if t["pareto"]]
    assert front and table.count('class="pareto"') == len(front)
    assert all(f'href="{t["recipe"]}"' in table for t in front)
    summary = json.loads((tmp_path / "s" / "report.json").read_text())
    assert summary["counts"]["pareto"] == len(front) and summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"] == 5



def test_a_memory_search_plots_and_tables_memory(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from search_synthetic import SyntheticEvaluator  # reports memory to load and run = 3x the file size

    from pared.search import SearchSpec, search

    doc = search(SearchSpec(model="digits", out=str(tmp_path / "s"), trials=5, sampler="random", seed=1,
                            objectives=("metric", "memory"), constraints=("memory_bytes <= 150000",)),
                 evaluator=SyntheticEvaluator())
    assert doc["baseline"]["memory_bytes"] == 300_000  # the synthetic fp32 file is 100 kB
    write_report(tmp_path / "s")
    page = (tmp_path / "s" / "report.html").read_text(encoding="utf-8")
    assert _figures(page)[:4] == ["pareto-latency_ratio", "pareto-size_bytes", "pareto-energy_j", "pareto-memory_bytes"]
    table = re.search(r'<table data-table="before-after">.*?</table>', page, re.S).group(0)
    assert "memory to load and run (bytes)" in table and "300,000" in table
    markdown = (tmp_path / "s" / "report.md").read_text(encoding="utf-8")
    assert "| memory to load and run (bytes) |" in markdown

def test_a_broken_pareto_point_folder_does_not_hide_the_search(tmp_path: Path) -> None:
    doc = _small_search()
    doc["trials"][2]["artefact"] = "points/trial-0002"
    (tmp_path / "points" / "trial-0002").mkdir(parents=True)
    (tmp_path / "points" / "trial-0002" / "report.json").write_text('{"baseline": ', encoding="utf-8")
    (tmp_path / "search.json").write_text(json.dumps(doc), encoding="utf-8")
    write_report(tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Skipped a Pareto point: malformed JSON in" in page and "histograms" not in _figures(page)
    assert _figures(page)[:3] == ["pareto-latency_ratio", "pareto-size_bytes", "pareto-energy_j"]


def _bad_folders(root: Path) -> dict[str, tuple[Path, int, str]]:
    empty = root / "empty"
    empty.mkdir()
    (root / "a-file").write_text("x")
    cases = {"missing": (root / "nope", 2, "does not exist"), "file": (root / "a-file", 2, "not a directory"),
             "empty": (empty, 2, "neither search.json nor report.json")}
    bodies = {
        "malformed": ("search.json", '{"task": "digits", "trials": [', 3, "malformed JSON"),
        "not_object": ("report.json", "[1, 2]", 3, "must hold a JSON object"),
        "no_trials": ("search.json", '{"task": "t", "objectives": [{"name": "m", "direction": "maximize"}], '
                                     '"baseline": {"metrics": {}}}', 3, "missing field 'trials'"),
        "bad_trial": ("search.json", '{"task": "t", "objectives": [{"name": "m", "direction": "maximize"}], '
                                     '"baseline": {"metrics": {}}, "trials": [{"number": "one"}]}', 3, "trials[0]"),
        "no_latency": ("report.json", '{"task": "t", "baseline": {}, "compressed": {}}', 3, "missing field 'baseline.size_bytes'"),
        "binary": ("report.json", b"\xff\xfe\x00garbage", 3, "not UTF-8"),
    }
    for name, (file, body, code, message) in bodies.items():
        folder = root / name
        folder.mkdir()
        path = folder / file
        path.write_bytes(body) if isinstance(body, bytes) else path.write_text(body)
        cases[name] = (folder, code, message)
    return cases


def test_bad_folders_give_one_line_errors_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for name, (folder, code, message) in _bad_folders(tmp_path).items():
        monkeypatch.setattr(sys, "argv", ["pared", "report", str(folder)])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err
        assert exc.value.code == code, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert not (folder / "report.html").exists() if folder.is_dir() else True


def _figures(page: str) -> list[str]:
    return re.findall(r'<figure data-figure="([^"]+)"', page)


def _assert_offline(page: str) -> None:
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page and "@import" not in page
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]+)"', page))


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


def _chromium(tmp: Path, *args: str) -> str:
    with tempfile.TemporaryDirectory(dir=tmp) as profile:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _assert_not_blank(png: Path, *, width: int, height: int) -> None:
    from PIL import Image

    image = Image.open(png).convert("L")
    assert image.size == (width, height)
    dark = sum(image.histogram()[:200]) / (width * height)
    assert dark > 0.02, f"screenshot {png} is nearly blank ({dark:.1%} non-white pixels)"
