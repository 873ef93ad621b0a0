"""Crash safety of artefact writes: SIGKILL and SIGINT mid-save, disk full, read-only output,
concurrent writers (reliability.md cases 29, 34, 35, 36; docs/reliability.md).

Writers run in ``os.fork()`` children of the test process: torch is already imported there, so
a hundred kills take seconds instead of a hundred interpreter start-ups. The children only
serialise tensors the parent computed (no parallel torch kernels after the fork).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pared.apply import compress_
from pared.artefact import MANIFEST, WEIGHTS, load_artefact, read_manifest, save_artefact
from pared.atomic import TMP_PREFIX, atomic_directory, clean_orphans
from pared.errors import EnvironmentIOError, ParedError, UsageError
from pared.quant import Int8Config
from pared.testing.models import tiny_mlp

RECIPE = [Int8Config(mode="dynamic")]
VARIANTS = 4  # distinct weight sets the writers cycle through


@pytest.fixture(scope="module")
def variants() -> list[nn.Module]:
    """Compressed models whose tensors differ, so a loaded artefact tells which one was saved."""
    return [compress_(tiny_mlp(seed=10 + v), RECIPE) for v in range(VARIANTS)]


def _fresh() -> nn.Module:
    return tiny_mlp(seed=0)


def _write(out: Path, model: nn.Module, version: int, *, overwrite: bool = True) -> None:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_artefact(model, tmp, recipe=RECIPE, source={"kind": "test", "version": version})


def _fork(work: Callable[[], None]) -> int:
    """Run ``work`` in a child; its exit status is 0, the ParedError's code, 130 or 99."""
    # SIGINT stays blocked across the fork until the child is inside its try: a Ctrl-C landing in
    # the first bytecodes of the child would otherwise unwind into the inherited pytest session
    # (seen once in CI: the child printed a pytest summary and died of SIGINT, status -2).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 99
        try:
            # The child inherits the whole pytest process. Without this, its garbage collector now
            # and then finalized an inherited object that closed a descriptor the child was writing
            # through (EBADF: exit 5 instead of 130, 2 of 25 runs under load; 0 of 30 with it).
            gc.freeze()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            work()
            code = 0
        except KeyboardInterrupt:
            code = 130
        except ParedError as exc:
            code = exc.exit_code
            os.write(2, f"child {os.getpid()}: {type(exc).__name__}: {exc}\n".encode())  # shown on failure
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    return pid


def _status(pid: int, *, limit: float = 120.0) -> int:
    """Exit code, or minus the signal number that ended the child; a child still running after
    ``limit`` seconds is killed and the test fails (a hang must not stall the suite)."""
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} still running after {limit:.0f} s")
        time.sleep(0.005)


def _interrupt(pid: int) -> int:
    """Ctrl-C ``pid`` and return its exit status, pressing again every 2 s while it runs on.

    Python loses a KeyboardInterrupt raised inside a finalizer (``__del__`` or a weakref
    callback run by the garbage collector), printing "Exception ignored"; a user presses Ctrl-C
    again, and so does this.
    """
    for _ in range(30):
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
    return _status(pid, limit=1.0)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))


def _check_complete(out: Path, variants: list[nn.Module]) -> int:
    """Load ``out`` (checksum, strict load) and compare every tensor with the variant it claims."""
    version = read_manifest(out)["source"]["version"]
    loaded = load_artefact(out, model=_fresh()).state_dict()
    expected = variants[version % VARIANTS].state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), f"version {version}: tensor {k} differs"
    return version


# ---------------------------------------------------------------- 29. SIGKILL during saves


def _save_seconds(tmp_path: Path, variants) -> float:
    """How long one save takes in a forked child on this machine right now (fsyncs dominate)."""
    r, w = os.pipe()

    def timed() -> None:
        t0 = time.perf_counter()
        for v in range(3):
            _write(tmp_path / "timing", variants[v], v)
        os.write(w, str((time.perf_counter() - t0) / 3).encode())

    assert _status(_fork(timed)) == 0
    seconds = float(os.read(r, 64))
    os.close(r)
    os.close(w)
    shutil.rmtree(tmp_path / "timing")
    return seconds


def _saving_forever(out: Path, variants, *, start: int) -> Callable[[], None]:
    """Work for a child: save versions start, start + 1, ... to ``out`` until killed."""

    def work() -> None:
        v = start
        while True:
            _write(out, variants[v % VARIANTS], v)
            v += 1

    return work


def test_100_sigkills_during_saves_leave_previous_version_or_nothing(tmp_path: Path, variants) -> None:
    started = time.perf_counter()
    rng = random.Random(29)
    window = 2.5 * _save_seconds(tmp_path, variants)  # kills land before, during and between saves
    out = tmp_path / "out"
    last = -1  # newest complete version seen; -1: none written yet
    kills_mid_write = 0
    kills = 0
    # At least 100 kills; on a loaded machine (fork and fsync slower than the timing above) keep
    # killing, up to 300, until enough saves completed and enough kills landed mid-write. A kill
    # that let no save finish widens the window, one that did narrows it back: under load the
    # kills still land both during and between saves.
    while kills < 100 or (kills < 300 and (last < 20 or kills_mid_write < 10)):
        kills += 1
        pid = _fork(_saving_forever(out, variants, start=last + 1))
        time.sleep(rng.uniform(0.0, window))
        os.kill(pid, signal.SIGKILL)
        assert _status(pid) == -signal.SIGKILL
        kills_mid_write += bool(_leftovers(tmp_path))
        if out.exists():  # straight after the kill: a complete version, never a torn one
            assert _check_complete(out, variants) >= last
        clean_orphans(tmp_path)  # what the next run does first
        assert _leftovers(tmp_path) == []
        if last >= 0:
            assert out.exists(), "a previous complete version was lost"
        if out.exists():
            version = _check_complete(out, variants)
            assert version >= last
            window *= 0.95 if version > last else 1.1
            last = version
        else:
            window *= 1.1
    # One JSON line for docs/benchmarks.md (visible with pytest -s); every check above passed.
    print(json.dumps({"kill_test": {"sigkills": kills, "saves_completed": last + 1, "kills_mid_write": kills_mid_write,
                                    "corrupt_or_lost": 0, "seconds": round(time.perf_counter() - started, 1)}}))
    assert last >= 20, f"only {last + 1} saves completed: the kills exercised too little"
    assert kills_mid_write >= 10, "too few kills landed mid-write"


def test_kill_between_the_two_renames_of_an_overwrite_is_recovered(tmp_path: Path, variants, monkeypatch) -> None:
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)
    real_replace = os.replace

    def replace_then_die(src, dst) -> None:  # the previous version moved aside, the new not in yet
        real_replace(src, dst)
        if Path(src) == out:
            os.kill(os.getpid(), signal.SIGKILL)

    def child() -> None:
        monkeypatch.setattr(os, "replace", replace_then_die)
        _write(out, variants[1], 1)

    assert _status(_fork(child)) == -signal.SIGKILL
    monkeypatch.undo()
    assert not out.exists() and _leftovers(tmp_path), "the kill did not land in the window"
    _write(tmp_path / "next", variants[2], 2, overwrite=False)  # the next run cleans orphans first
    assert _check_complete(out, variants) == 0  # the previous version is back, whole
    assert _leftovers(tmp_path) == []


def test_sigint_during_saves_exits_130_and_leaves_a_complete_version(tmp_path: Path, variants) -> None:
    rng = random.Random(30)
    window = 2 * _save_seconds(tmp_path, variants)
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)
    last = 0
    for _ in range(20):
        pid = _fork(_saving_forever(out, variants, start=last + 1))
        time.sleep(rng.uniform(0.001, 1.5 * window))
        assert _interrupt(pid) == 130
        version = _check_complete(out, variants)
        assert version >= last
        last = version
        clean_orphans(tmp_path)
        assert _leftovers(tmp_path) == []
    assert last >= 2  # saves did complete between interrupts (about 15 expected); not all early kills


# ---------------------------------------------------------------- 34. disk full


def test_file_size_limit_mid_save_is_exit_5_and_keeps_previous(tmp_path: Path, variants) -> None:
    """A real write failure (RLIMIT_FSIZE -> EFBIG) inside safetensors serialisation."""
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
        _write(out, variants[1], 1)

    assert _status(_fork(child)) == EnvironmentIOError.exit_code
    assert _check_complete(out, variants) == 0
    assert _leftovers(tmp_path) == []


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the path")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_enospc_on_a_full_tmpfs_names_the_path(tmp_path: Path, variants) -> None:
    with _tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "out"
        _write(out, variants[0], 0, overwrite=False)
        fs = os.statvfs(disk)
        (disk / "ballast").write_bytes(bytes(fs.f_bavail * fs.f_frsize - fs.f_frsize))  # one page left
        with pytest.raises(EnvironmentIOError, match=f"^no space left writing {out}/") as info:
            _write(out, variants[1], 1)
        assert info.value.exit_code == 5
        assert _check_complete(out, variants) == 0
        assert _leftovers(disk) == []


def test_injected_enospc_writing_the_manifest_is_environment_error(tmp_path: Path, variants, monkeypatch) -> None:
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)
    import pared.artefact as artefact

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artefact, "atomic_write_text", full)
    with pytest.raises(EnvironmentIOError, match=f"^no space left writing {out}$"):
        _write(out, variants[1], 1)
    assert _check_complete(out, variants) == 0
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- 35. existing or read-only output


def test_read_only_parent_is_exit_5_and_nothing_written(variants) -> None:
    base = Path(tempfile.mkdtemp())  # not under pytest's 0700 tree: the child may drop to nobody
    parent = base / "ro"
    parent.mkdir()
    r, w = os.pipe()

    def child() -> None:
        os.chmod(parent, 0o555)
        if os.geteuid() == 0:  # root ignores permission bits: drop to nobody in the child
            os.setgid(65534)
            os.setuid(65534)
        try:
            _write(parent / "out", variants[0], 0, overwrite=False)
        except EnvironmentIOError as exc:
            os.write(w, str(exc).encode())
            raise

    try:
        os.chmod(base, 0o755)
        assert _status(_fork(child)) == EnvironmentIOError.exit_code
        assert os.read(r, 4096).decode() == f"permission denied writing {parent / 'out'}"
        assert list(parent.iterdir()) == []
    finally:
        os.chmod(parent, 0o700)
        shutil.rmtree(base)
        os.close(r)
        os.close(w)


def test_existing_output_without_overwrite_is_usage_error_before_work(tmp_path: Path, variants) -> None:
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        _write(out, variants[1], 1, overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- 36. concurrent writers


def _race(out: Path, variants, *, overwrite: bool, saves: int) -> list[int]:
    """Two children released together, each saving ``saves`` versions to ``out``."""
    r, w = os.pipe()

    def writer(first: int) -> Callable[[], None]:
        def work() -> None:
            os.read(r, 1)  # both wait for the same start signal
            for v in range(first, first + saves):
                _write(out, variants[v % VARIANTS], v, overwrite=overwrite)
        return work

    pids = [_fork(writer(1000 * (i + 1))) for i in range(2)]
    os.write(w, b"go")
    codes = [_status(p) for p in pids]
    os.close(r)
    os.close(w)
    return codes


def test_two_writers_on_a_new_path_one_wins_the_other_gets_a_clear_error(tmp_path: Path, variants) -> None:
    for round_ in range(5):
        out = tmp_path / f"out{round_}"
        codes = _race(out, variants, overwrite=False, saves=1)
        assert sorted(codes)[0] == 0 and sorted(codes)[1] in (UsageError.exit_code, EnvironmentIOError.exit_code), codes
        version = _check_complete(out, variants)
        assert version in (1000, 2000)
    clean_orphans(tmp_path)
    assert _leftovers(tmp_path) == []


def test_two_writers_overwriting_never_interleave(tmp_path: Path, variants) -> None:
    out = tmp_path / "out"
    _write(out, variants[0], 0, overwrite=False)
    codes = _race(out, variants, overwrite=True, saves=15)
    assert set(codes) <= {0, EnvironmentIOError.exit_code}, codes  # a lost race is a clear I/O error
    clean_orphans(tmp_path)
    assert out.exists() and _leftovers(tmp_path) == []
    version = _check_complete(out, variants)  # one writer's whole version: manifest, hash and tensors agree
    assert version // 1000 in (1, 2)
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS, MANIFEST]
