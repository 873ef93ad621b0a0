"""The exit-code scheme of docs/reliability.md, through ``pared.cli.main`` in this process.

Every user error prints exactly one line, ``error: ...``, no traceback, and exits with its code
(2 usage, 3 input refused, 4 quality gate, 5 environment); a bug prints one
``internal error`` line and exits 1; the traceback appears only with ``--debug`` or
``PARED_DEBUG=1``. Nothing is written for a failed command. (Subprocess runs of the same
paths are in tests/test_cli.py.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import save_file

import pared.recipe
from pared import cli
from pared.artefact import read_manifest, sha256_file
from pared.errors import EnvironmentIOError, InputRefused, QualityGateFailed, UsageError
from pared.testing.models import tiny_mlp

FACTORY = "pared.testing.models:tiny_mlp"
PROGRESS = re.compile(r"^\[\d+/\d+\] ")


class Result(NamedTuple):
    code: int
    out: str
    err: str


class Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.canary}",))


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Result:
    monkeypatch.setattr(sys, "argv", ["pared", *argv])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() replaces it
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def _one_error_line(result: Result) -> str:
    assert "Traceback" not in result.err + result.out
    lines = [ln for ln in result.err.strip().splitlines() if not PROGRESS.match(ln)]
    assert len(lines) == 1, result.err
    assert lines[0].startswith(("error: ", "internal error", "interrupted")), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-files")
    good = tiny_mlp().state_dict()
    save_file(good, root / "good.safetensors")
    save_file({k: torch.zeros(3) for k in good}, root / "misfit.safetensors")
    partial = {k: v for k, v in good.items() if k != "2.bias"}
    save_file({**partial, "extra": torch.zeros(2)}, root / "partial.safetensors")
    save_file({**good, "0.weight": torch.full_like(good["0.weight"], float("nan"))}, root / "nan.safetensors")
    data = (root / "good.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (root / "canary").mkdir()
    torch.save({"0.weight": Evil(root / "canary" / "CANARY")}, root / "evil.pt")
    torch.save(good, root / "plain.pt")
    (root / "zero.yaml").write_text("steps:\n  - technique: int8\n    calibration_batches: 0\n")
    (root / "bits.yaml").write_text("steps:\n  - technique: weight_only\n    bits: 33\n")
    hf = root / "custom-code"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    save_file(good, hf / "model.safetensors")
    (root / "a-file").write_text("not a directory")
    (root / "existing").mkdir()
    # A factory that leaves a mark when called: proves the recipe is refused before the model loads.
    (root / "marking_factory.py").write_text(
        "from pathlib import Path\nimport torch\n\n"
        "def build():\n    Path(__file__).with_name('FACTORY_CALLED').write_text('x')\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 4))\n"
    )
    return root


OUT = ["--out", "{tmp}/out"]
# case -> (argv, exit code, text the one error line must contain)
USER_ERRORS: dict[str, tuple[list[str], int, str]] = {
    "missing model path": (["compress", "--model", "{tmp}/absent", *OUT], 2, "absent"),
    "bare weights file": (["compress", "--model", "{files}/good.safetensors", *OUT], 2, "needs an architecture"),
    "no input shape": (["compress", "--model", FACTORY, *OUT], 2, "--input-shape"),
    "bad input shape": (["compress", "--model", FACTORY, "--input-shape", "2,x", *OUT], 2, "'2,x'"),
    "unknown recipe": (["compress", "--model", "digits", "--recipe", "nope", *OUT], 2, "recipe not found"),
    "recipe value out of range": (["compress", "--model", "marking_factory:build", "--input-shape", "2,16",
                                   "--recipe", "{files}/zero.yaml", *OUT], 2, "calibration_batches"),
    "bits 33": (["compress", "--model", "marking_factory:build", "--input-shape", "2,16",
                 "--recipe", "{files}/bits.yaml", *OUT], 2, "bits must be 4 or 8"),
    "unknown runtime": (["compress", "--model", FACTORY, "--input-shape", "2,16", "--runtime", "tpu", *OUT],
                        2, "unknown runtime 'tpu'"),
    "unknown option": (["compress", "--frobnicate"], 2, "No such option: --frobnicate"),
    "missing option": (["compress", "--model", "digits"], 2, "--out"),
    "not an integer": (["profile", "--model", "digits", "--batch", "many"], 2, "--batch"),
    "existing output": (["compress", "--model", "digits", "--out", "{files}/existing"], 2, "already exists"),
    "weights for a built-in": (["compress", "--model", "digits", "--weights", "{files}/good.safetensors", *OUT],
                               2, "does not apply"),
    "pickle payload": (["compress", "--model", FACTORY, "--weights", "{files}/evil.pt", "--input-shape", "2,16",
                        *OUT], 3, "Unsupported global: GLOBAL"),
    "weights do not fit": (["compress", "--model", FACTORY, "--weights", "{files}/misfit.safetensors",
                            "--input-shape", "2,16", *OUT], 3, "do not fit"),
    "truncated weights": (["profile", "--model", FACTORY, "--weights", "{files}/cut.safetensors",
                           "--input-shape", "2,16"], 3, "invalid safetensors header"),
    "NaN weights": (["profile", "--model", FACTORY, "--weights", "{files}/nan.safetensors", "--input-shape", "2,16"],
                    3, "'0.weight'"),
    "custom code in a model directory": (["profile", "--model", "{files}/custom-code"], 3, "auto_map"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_error_is_one_line_with_its_exit_code(case: str, files: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv, code, needle = USER_ERRORS[case]
    monkeypatch.syspath_prepend(str(files))
    monkeypatch.delenv("PARED_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    result = _cli([a.format(tmp=tmp_path, files=files) for a in argv], monkeypatch, capsys)
    line = _one_error_line(result)
    assert result.code == code, line
    assert line.startswith("error: ") and needle in line, line
    assert list(tmp_path.iterdir()) == [], "a failed command wrote something"
    assert not (files / "canary" / "CANARY").exists()
    assert not (files / "FACTORY_CALLED").exists(), "the model was loaded before the recipe was checked"


def test_quality_gate_failure_is_exit_4_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["compress", "--model", FACTORY, "--input-shape", "2,16", "--recipe", "int8-dynamic", "--runtime",
            "torch", "--rounds", "1", "--max-drop", "0", "--out", str(tmp_path / "out")]  # fmt: skip
    result = _cli(argv, monkeypatch, capsys)
    line = _one_error_line(result)
    assert result.code == QualityGateFailed.exit_code
    assert "mean_cosine dropped" in line and "max_drop=0" in line
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_exit_5(files: Path, monkeypatch, capsys) -> None:
    argv = ["compress", "--model", FACTORY, "--input-shape", "2,16", "--recipe", "int8-dynamic", "--runtime",
            "torch", "--rounds", "1", "--out", str(files / "a-file" / "out")]  # fmt: skip
    result = _cli(argv, monkeypatch, capsys)
    line = _one_error_line(result)
    assert result.code == EnvironmentIOError.exit_code and "a-file" in line
    assert (files / "a-file").read_text() == "not a directory"


# ---------------------------------------------------------------- the mapping itself


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def boom(*_a, **_k):  # type: ignore[no-untyped-def]
        raise exc

    return boom


MAPPED: dict[str, tuple[BaseException, int, str]] = {
    "usage": (UsageError("bad\nvalue"), 2, "error: bad value"),
    "refused": (InputRefused("unsafe file"), 3, "error: unsafe file"),
    "gate": (QualityGateFailed("accuracy dropped"), 4, "error: accuracy dropped"),
    "environment": (EnvironmentIOError("no space left writing x"), 5, "error: no space left writing x"),
    "raw ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), 5, "error: [Errno 28] No space left"),
    "out of memory": (MemoryError(), 5, "error: out of memory"),
    "interrupt": (KeyboardInterrupt(), 130, "interrupted"),  # typer turns it into a return value
    "bug": (RuntimeError("boom\nsecond line"), 1, "internal error (RuntimeError): boom second line (rerun with --debug"),
    "raw FileNotFoundError": (FileNotFoundError(2, "gone"), 1, "internal error (FileNotFoundError)"),
}


@pytest.mark.parametrize("case", sorted(MAPPED))
def test_exit_code_mapping_one_line_and_traceback_only_with_debug(case: str, monkeypatch, capsys) -> None:
    exc, code, text = MAPPED[case]
    monkeypatch.setattr(pared.recipe, "builtin_recipes", _raise(exc))
    monkeypatch.delenv("PARED_DEBUG", raising=False)
    plain = _cli(["recipes"], monkeypatch, capsys)
    assert plain.code == code and _one_error_line(plain).startswith(text), plain.err
    for debug_argv, env in ((["--debug", "recipes"], None), (["recipes"], "1")):
        if env:
            monkeypatch.setenv("PARED_DEBUG", env)
        debug = _cli(debug_argv, monkeypatch, capsys)
        assert debug.code == code
        # typer turns Ctrl-C into a return value: there is no traceback left to show
        assert ("Traceback (most recent call last)" in debug.err) == (case != "interrupt")
        assert debug.err.strip().splitlines()[-1].startswith(text)


def test_success_is_exit_0(monkeypatch, capsys) -> None:
    result = _cli(["recipes"], monkeypatch, capsys)
    assert result.code == 0 and "int8" in result.out and result.err == ""


# ---------------------------------------------------------------- case 5: the explicit opt-in


def test_trust_pickle_loads_warns_and_records_unsafe_load_with_the_hash(files: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task, source = cli._task_for(FACTORY, weights=str(files / "plain.pt"), input_shape="2,16", trust_pickle=True)
    assert [str(w.message) for w in caught if "--trust-pickle" in str(w.message)], "no warning"
    assert source["unsafe_load"] is True
    assert source["weights_sha256"] == sha256_file(files / "plain.pt")
    _, safe_source = cli._task_for(FACTORY, weights=str(files / "good.safetensors"), input_shape="2,16",
                                   trust_pickle=False)  # fmt: skip
    assert "unsafe_load" not in safe_source


def test_unsafe_load_reaches_the_artefact_manifest(files: Path, tmp_path: Path, monkeypatch) -> None:
    from pared.pipeline import compress_task
    from pared.recipe import load_recipe

    monkeypatch.setattr(sys, "argv", ["pared"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, source = cli._task_for(FACTORY, weights=str(files / "plain.pt"), input_shape="2,16", trust_pickle=True)
    compress_task(task, load_recipe("int8-dynamic"), tmp_path / "out", runtime="torch", latency_rounds=1, source=source)
    recorded = read_manifest(tmp_path / "out")["source"]
    assert recorded["unsafe_load"] is True and recorded["weights_sha256"] == sha256_file(files / "plain.pt")


# ---------------------------------------------------------------- case 16: --non-strict


def test_non_strict_loads_what_fits_lists_the_rest_and_is_recorded(files: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["profile", "--model", FACTORY, "--weights", str(files / "partial.safetensors"), "--input-shape", "2,16",
            "--rounds", "1", "--json"]  # fmt: skip
    refused = _cli(argv, monkeypatch, capsys)
    assert refused.code == 3 and "--non-strict" in _one_error_line(refused)
    with pytest.warns(UserWarning, match=r"skipped 1 missing \(2.bias\); 1 unexpected \(extra\)") as caught:
        loaded = _cli([*argv, "--non-strict"], monkeypatch, capsys)
    assert loaded.code == 0, loaded.err
    shown = cli._one_line_warning(caught[0].message, UserWarning, "loading.py", 1)  # how the CLI prints it
    assert shown.startswith("warning: non-strict load from ") and shown.count("\n") == 1
    task, source = cli._task_for(FACTORY, weights=str(files / "partial.safetensors"), input_shape="2,16",
                                 trust_pickle=False, non_strict=True)  # fmt: skip
    assert source["non_strict"] is True
    assert torch.equal(task.model()[0].weight, tiny_mlp().state_dict()["0.weight"])  # what fits was loaded
    from pared.artefact import _rebuild_source

    rebuilt = _rebuild_source(source)  # an artefact's rebuild loads its source the same way
    assert torch.equal(rebuilt[0].weight, tiny_mlp().state_dict()["0.weight"])
    with pytest.raises(InputRefused, match="do not fit"):
        _rebuild_source({**source, "non_strict": False})


# ---------------------------------------------------------------- case 24: --strict

GATED = '''
import torch
from torch import nn


class Gate(nn.Module):
    """A custom layer holding its own parameter: no step of pared knows it."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.sigmoid(self.scale)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(16, 32), Gate(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.gate(self.fc1(x))))


def build():
    torch.manual_seed(0)
    return Gated()
'''


@pytest.fixture
def gated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the ``gated:build`` factory and a recipe that skips unsupported groups."""
    root = tmp_path / "gated"
    root.mkdir()
    (root / "gated.py").write_text(GATED)
    (root / "prune.yaml").write_text("steps:\n  - technique: prune_channels\n    ratio: 0.25\n"
                                     "    on_unsupported: skip\n")
    monkeypatch.syspath_prepend(str(root))
    return root


def _compress(model: str, recipe: str, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", model, "--input-shape", "2,16", "--recipe", recipe, "--runtime", "torch",
            "--rounds", "1", "--out", str(out), *extra]  # fmt: skip


def test_strict_makes_int8_refuse_the_custom_layer_it_would_keep_float(gated: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    kept = _cli(_compress("gated:build", "int8-dynamic", tmp_path / "kept"), monkeypatch, capsys)
    assert kept.code == 0, kept.err
    report = json.loads((tmp_path / "kept" / "report.json").read_text())
    assert report["strict"] is False and report["steps"][0]["unsupported"] == {"gate": "Gate"}
    refused = _cli(_compress("gated:build", "int8-dynamic", tmp_path / "refused", "--strict"), monkeypatch, capsys)
    line = _one_error_line(refused)
    assert refused.code == InputRefused.exit_code == 3
    assert "cannot quantize 1 layer(s): 'gate' (Gate)" in line
    assert not (tmp_path / "refused").exists()


def test_strict_overrides_a_recipe_that_skips_unsupported_groups_and_is_recorded(gated: Path, tmp_path: Path,
                                                                                  monkeypatch, capsys) -> None:
    recipe = str(gated / "prune.yaml")  # on_unsupported: skip
    refused = _cli(_compress("gated:build", recipe, tmp_path / "refused", "--strict"), monkeypatch, capsys)
    line = _one_error_line(refused)
    assert refused.code == UsageError.exit_code  # prune_channels' refusal is exit 2, with or without --strict
    assert "cannot prune the group of 'fc1'" in line and "module 'gate'" in line
    assert not (tmp_path / "refused").exists()
    # a model every step handles passes under --strict; report.json records it and the strict steps
    ok = _cli(_compress(FACTORY, "int8-dynamic", tmp_path / "ok", "--strict"), monkeypatch, capsys)
    assert ok.code == 0, ok.err
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["strict"] is True and report["recipe"]["steps"][0]["strict"] is True
    assert report["steps"][0]["unsupported"] == {}


def test_strict_recipe_sets_every_field_that_keeps_unsupported_layers() -> None:
    from pared.prune import ChannelPruneConfig
    from pared.quant import Int8Config
    from pared.recipe import strict_recipe

    lenient = [Int8Config(mode="dynamic"), ChannelPruneConfig(ratio=0.3, on_unsupported="skip")]
    strict = strict_recipe(lenient)
    assert strict == [Int8Config(mode="dynamic", strict=True), ChannelPruneConfig(ratio=0.3, on_unsupported="error")]
    assert lenient[0].strict is False and lenient[1].on_unsupported == "skip"  # the loaded recipe is not changed
