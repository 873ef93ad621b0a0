"""The ``pared`` command line: thin over the Python API, same names and concepts."""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from pared.errors import ParedError, UsageError

app = typer.Typer(
    help="pared: make PyTorch models smaller, faster and less energy-hungry, and prove it by measurement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RUNTIME_HELP = (
    "Runtime for the compressed model: auto (OpenVINO, or ONNX Runtime for int4), openvino, "
    "openvino-bf16 (float ops in bf16 on CPUs with bf16 units), onnxruntime or torch."
)
MODEL_HELP = "Built-in name (minilm, digits, lenet300, lenet5), a package.module:function factory, or a Hugging Face model directory."


@app.command()
def compress(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    recipe: str = typer.Option("int8", "--recipe", "-r", help="Built-in recipe name (see `pared recipes`) or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --overwrite; missing parent folders are created)."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP),
    threads: int = typer.Option(2, help="Intra-op threads for every runtime measured."),
    batch: int = typer.Option(8, help="Batch size for latency, memory and energy."),
    rounds: int = typer.Option(20, help="Timed calls per runner (interleaved)."),
    weights: Optional[str] = typer.Option(None, help="State-dict file for a factory model (safetensors preferred)."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape for a factory returning a bare module, e.g. 1,3,32,32."),
    max_drop: Optional[float] = typer.Option(None, help="Fail (exit 4) if the primary metric drops more than this."),
    allow_regression: bool = typer.Option(False, help="Write the artefact even if --max-drop fails."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    trust_pickle: bool = typer.Option(False, help="Allow pickle-based weight files (runs code from the file: only for files you trust)."),
    non_strict: bool = typer.Option(False, "--non-strict", help="Load only the --weights that fit the factory's model and list the rest (default: refuse, exit 3)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a model with layers a step cannot handle instead of keeping them (int8 strict: exit 3; prune_channels on_unsupported=error: exit 2); recorded in report.json."),
) -> None:
    """Compress a model with a recipe; write the artefacts, report.md and report.json into OUT."""
    from pared.pipeline import compress_task
    from pared.recipe import load_recipe

    configs = load_recipe(recipe)  # validated before the model loads
    if out.exists() and not overwrite:
        raise UsageError(f"output directory already exists: {out} (pass --overwrite to replace it)")
    task, source = _task_for(model, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle,
                             non_strict=non_strict)
    report = compress_task(
        task, configs, out, recipe_name=Path(recipe).stem, runtime=runtime, threads=threads, batch=batch,
        latency_rounds=rounds, overwrite=overwrite, max_drop=max_drop, allow_regression=allow_regression, source=source,
        strict=strict,
    )
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out}: " + ", ".join(f"{a['path']} ({a['bytes'] / 1e6:.2f} MB)" for a in report["artefacts"]))


@app.command()
def profile(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    batch: int = typer.Option(8, help="Batch size."),
    threads: int = typer.Option(2, help="Intra-op threads."),
    rounds: int = typer.Option(20, help="Timed calls."),
    weights: Optional[str] = typer.Option(None, help="State-dict file for a factory model."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape for a bare-module factory, e.g. 1,3,32,32."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    trust_pickle: bool = typer.Option(False, help="Allow pickle-based weight files."),
    non_strict: bool = typer.Option(False, "--non-strict", help="Load only the --weights that fit the factory's model and list the rest (default: refuse, exit 3)."),
) -> None:
    """Measure a float model: parameters, size, MACs, latency, memory (to load and run; peak working), energy and its task metric."""
    from pared.profile import profile_task

    task, _ = _task_for(model, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle,
                        non_strict=non_strict)
    result = profile_task(task, batch=batch, threads=threads, rounds=rounds)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=float))
        return
    for key, value in result.items():
        typer.echo(f"{key:>26}: {value}")


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from pared.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        steps = " -> ".join(type(c).type_name for c in load_recipe(name))  # type: ignore[attr-defined]
        typer.echo(f"{name:>14}: {steps}")


@app.command()
def search(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Search folder: study.db, search.json, pareto.md, recipes/, points/."),
    objective: list[str] = typer.Option(["metric", "latency"], help="Objective metric (repeat): metric, latency, size, macs, energy, memory, or any metric name."),
    constraint: list[str] = typer.Option([], help="Constraint (repeat), e.g. 'metric_drop <= 0.01', 'metric_drop <= 1%', 'latency_ratio <= 0.2', 'memory_bytes <= 100e6'."),
    techniques: Optional[str] = typer.Option(None, help="Comma-separated techniques to search (default: every one that applies)."),
    trials: Optional[int] = typer.Option(50, help="Trial budget of the study (killed-and-retried trials count once)."),
    time_budget: Optional[str] = typer.Option(None, help="Wall-clock budget of this run: 90s, 15m, 1h (bare number: minutes)."),
    sampler: str = typer.Option("tpe", help="tpe, nsga2 or random."),
    seed: int = typer.Option(0, help="Sampler seed (a resumed search proposes what an uninterrupted one would)."),
    storage: Optional[str] = typer.Option(None, help="Optuna RDB URL, e.g. postgresql://user:pw@host/db (default: sqlite OUT/study.db)."),
    study_name: str = typer.Option("pared", help="Study name inside the storage."),
    resume: bool = typer.Option(False, help="Continue a stopped search: retry its interrupted trials, keep finished ones."),
    join: bool = typer.Option(False, help="Work on a study other workers share (created if absent)."),
    backend: str = typer.Option("local", help="local (this process) or ray (--workers Ray tasks on one storage)."),
    workers: int = typer.Option(1, help="Ray tasks running trials at once (with --backend ray)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    runtime: str = typer.Option("auto", help=RUNTIME_HELP),
    threads: int = typer.Option(2, help="Intra-op threads for every runtime measured."),
    batch: int = typer.Option(8, help="Batch size for latency, memory and energy."),
    rounds: int = typer.Option(20, help="Timed calls per runner in each trial."),
    sensitivity: bool = typer.Option(True, help="Measure per-group sensitivity first to narrow the per-group knobs."),
    overwrite: bool = typer.Option(False, help="Delete an existing search in OUT (and its study) first."),
    weights: Optional[str] = typer.Option(None, help="State-dict file for a factory model."),
    input_shape: Optional[str] = typer.Option(None, help="Input shape for a bare-module factory, e.g. 1,3,32,32."),
    trust_pickle: bool = typer.Option(False, help="Allow pickle-based weight files."),
) -> None:
    """Search recipes for the best trade-offs (task metric, latency, size, MACs, energy, memory) under constraints."""
    from pared.search import SearchSpec
    from pared.search import search as run_search
    from pared.search.cli_support import parse_duration, run_backend

    spec = SearchSpec(
        model=model, out=str(out), objectives=tuple(objective), constraints=tuple(constraint),
        techniques=None if techniques is None else tuple(t.strip() for t in techniques.split(",") if t.strip()),
        trials=trials, time_budget_s=parse_duration(time_budget), seed=seed, sampler=sampler, storage=storage,
        study_name=study_name, runtime=runtime, threads=threads, batch=batch, rounds=rounds,
        sensitivity=sensitivity, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle,
    )
    try:
        if backend == "local":
            doc = run_search(spec, resume=resume, join=join, overwrite=overwrite)
        else:
            doc = run_backend(spec, backend, workers=workers, address=ray_address, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite", "--join")]
        typer.echo("search interrupted; the running trial will be retried. Resume with:\n  pared "
                   + " ".join(shlex.quote(a) for a in args) + " --resume", err=True)
        raise
    typer.echo((out / "pareto.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out}: {len(doc['trials'])} trials, {sum(t['pareto'] for t in doc['trials'])} on the front")


@app.command()
def report(
    directory: Path = typer.Argument(..., metavar="DIR", help="Output folder of pared compress or pared search."),
) -> None:
    """Render DIR (a compress or search output) to a self-contained report.html, plus report.md and report.json."""
    from pared.html_report import write_report

    written = write_report(directory)
    typer.echo(f"{written['kind']} report: wrote " + ", ".join(str(p) for p in written["files"]))


def _task_for(
    spec: str, *, weights: str | None, input_shape: str | None, trust_pickle: bool, non_strict: bool = False
) -> tuple[Any, dict[str, Any]]:
    from pared.loading import resolve_model
    from pared.tasks import BUILTIN_TASKS, get_task
    from pared.tasks.fidelity import fidelity_task, hf_encoder_task

    kind, module = resolve_model(spec, weights=weights, trust_pickle=trust_pickle, builtin_names=BUILTIN_TASKS,
                                 strict=not non_strict)
    if kind == "builtin":
        return get_task(spec), {"kind": "builtin", "name": spec}
    if kind == "hf-directory":
        return hf_encoder_task(Path(spec)), {"kind": "hf-directory", "path": str(Path(spec).resolve())}
    source = {"kind": "factory", "spec": spec, "weights": str(Path(weights).resolve()) if weights else None}
    if trust_pickle and weights:  # the artefact says that code from this exact file may have run
        from pared.artefact import sha256_file

        source.update(unsafe_load=True, weights_sha256=sha256_file(Path(weights)))
    if non_strict and weights:  # the artefact rebuilds its source the same way
        source["non_strict"] = True
    if input_shape is None:
        raise UsageError("a factory returning a bare nn.Module needs --input-shape (or return a pared UserTask)")
    return fidelity_task(spec, module, _shape(input_shape)), source


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape dimensions must be >= 1, got {text!r}")
    return shape


def main() -> None:
    """Entry point: maps pared errors to one line on stderr and the documented exit code."""
    debug = "--debug" in sys.argv or os.environ.get("PARED_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)
    except ParedError as exc:
        _fail(exc.exit_code, f"error: {exc}", debug)
    except KeyboardInterrupt:
        _fail(130, "interrupted", debug)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except MemoryError:
        _fail(5, "error: out of memory (try a smaller --batch)", debug)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            _fail(1, f"internal error ({type(exc).__name__}): {exc} (rerun with --debug for the traceback)", debug)
        _fail(5, f"error: {exc}", debug)  # disk full or read-only where pared did not wrap it
    except Exception as exc:  # noqa: BLE001 - a bug: one line, traceback only with --debug
        # click's usage errors, matched by shape: typer vendors its own copy of click.
        if hasattr(exc, "format_message"):
            _fail(2, f"error: {exc.format_message()} (see --help)", debug)
        if type(exc).__name__ == "Abort":
            _fail(130, "interrupted", debug)
        _fail(1, f"internal error ({type(exc).__name__}): {exc} (rerun with --debug for the traceback)", debug)
    # Without standalone mode typer returns an exit code instead of exiting: 130 for Ctrl-C.
    if code == 130:
        _fail(130, "interrupted", debug)
    if isinstance(code, int) and code:
        sys.exit(code)


_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """``warning: <message>``: no file name and source line (those come with --debug)."""
    return f"warning: {' '.join(str(message).split())}\n"


def _fail(code: int, message: str, debug: bool) -> NoReturn:
    """Exit with ``code`` after one line on stderr; the traceback comes first only with --debug."""
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.echo(" ".join(message.split()), err=True)  # one line even if the message had newlines
    sys.exit(code)


if __name__ == "__main__":
    main()
