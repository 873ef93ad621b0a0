"""Atomic file and directory writes: old version or nothing, never half; typed I/O errors."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import pared.atomic as atomic
from pared.atomic import TMP_PREFIX, atomic_directory, atomic_write_bytes, atomic_write_text, clean_orphans
from pared.errors import EnvironmentIOError, UsageError

SRC = Path(atomic.__file__).resolve().parent


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))


def _tree_hash(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        h.update(str(p.relative_to(directory)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- files


def test_atomic_write_bytes_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(str(target), b"second, longer")
    assert target.read_bytes() == b"second, longer"
    atomic_write_text(target, "tr\u00e8s")
    assert target.read_bytes() == "tr\u00e8s".encode()
    assert _leftovers(tmp_path) == []


def test_missing_parents_are_created(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "no" / "f.bin", b"x")
    assert (tmp_path / "no" / "f.bin").read_bytes() == b"x"
    with atomic_directory(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "w").write_bytes(b"y")
    assert (tmp_path / "a" / "b" / "out" / "w").read_bytes() == b"y"
    assert _leftovers(tmp_path / "a" / "b") == []


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_file_in_the_way_of_the_parent_is_exit_5_and_writes_nothing(tmp_path: Path, below: str) -> None:
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(EnvironmentIOError, match="a file is in the way") as info:
        atomic_write_bytes(tmp_path / "f" / below / "x.bin", b"x")
    assert info.value.exit_code == 5
    assert (tmp_path / "f").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_enospc_on_file_write_keeps_old_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(EnvironmentIOError) as info:
        atomic_write_bytes(target, b"new" * 1000)
    assert str(info.value) == f"no space left writing {target}"
    assert info.value.exit_code == 5
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []  # the temp file was removed


def test_enospc_during_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(EnvironmentIOError, match="^no space left writing"):
        atomic_write_bytes(target, b"x" * 10)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_interrupt_during_write_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"x")
    assert not target.exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- directories


def test_atomic_directory_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
        assert not out.exists()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"
    assert _leftovers(tmp_path) == []


def test_failure_mid_block_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            raise RuntimeError("boom")
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_existing_dir_without_overwrite_is_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _tree_hash(out)
    entered = False
    with pytest.raises(UsageError, match="already exists") as info:
        with atomic_directory(out):
            entered = True
    assert not entered and info.value.exit_code == 2
    assert _tree_hash(out) == before
    assert _leftovers(tmp_path) == []


def test_existing_dir_with_overwrite_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert (out / "new.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_overwrite_that_fails_keeps_previous_version(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = _tree_hash(out)
    with pytest.raises(ValueError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("half-way")
    assert _tree_hash(out) == before and _leftovers(tmp_path) == []


def test_read_only_parent_is_environment_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # We run as root, so chmod cannot make a directory read-only: inject what mkdtemp would raise.
    def denied(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    out = tmp_path / "out"
    with pytest.raises(EnvironmentIOError) as info:
        with atomic_directory(out):
            pytest.fail("block must not run")
    assert info.value.exit_code == 5
    assert str(info.value) == f"permission denied writing {out}"
    assert not out.exists()


def _enospc_on_rename_to(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def full(src: object, dst: object) -> None:
        # Moving the new version in fails; moving the kept previous version back (a rename
        # within one directory that allocates nothing) does not.
        if Path(str(dst)) == out and Path(str(src)).name != "previous":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", full)


def test_enospc_on_directory_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _enospc_on_rename_to(out, monkeypatch)
    with pytest.raises(EnvironmentIOError, match=f"^no space left writing {out}$") as info:
        with atomic_directory(out) as tmp:
            (tmp / "v1.txt").write_text("v1")
    assert info.value.exit_code == 5
    assert not out.exists() and _leftovers(tmp_path) == []


def test_enospc_on_overwrite_keeps_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "v1.txt").write_text("v1")
    before = _tree_hash(out)
    _enospc_on_rename_to(out, monkeypatch)
    with pytest.raises(EnvironmentIOError, match=f"^no space left writing {out}$") as info:
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "v2.txt").write_text("v2")
    assert info.value.exit_code == 5
    monkeypatch.undo()
    assert not any((p / "v2.txt").exists() for p in tmp_path.rglob("*") if p.is_dir())
    assert out.exists(), "previous output vanished after a failed overwrite"
    assert _tree_hash(out) == before


def test_orphans_are_cleaned_by_next_run(tmp_path: Path) -> None:
    (tmp_path / f"{TMP_PREFIX}deadbeef").mkdir()
    (tmp_path / f"{TMP_PREFIX}deadbeef" / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / f"{TMP_PREFIX}file123").write_bytes(b"half")
    (tmp_path / "unrelated.txt").write_text("keep me")
    with atomic_directory(tmp_path / "out") as tmp:
        assert _leftovers(tmp_path) == [tmp.name]
        (tmp / "x").write_text("x")
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "unrelated.txt"]


def test_clean_orphans_on_missing_dir_is_a_no_op(tmp_path: Path) -> None:
    clean_orphans(tmp_path / "absent")


def test_concurrent_jobs_in_same_parent_do_not_destroy_each_other(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with atomic_directory(a) as tmp_a:
        (tmp_a / "a.txt").write_text("a")
        with atomic_directory(b) as tmp_b:  # a second job starting in the same parent
            (tmp_b / "b.txt").write_text("b")
        (tmp_a / "a2.txt").write_text("a2")
    assert (a / "a.txt").read_text() == "a" and (b / "b.txt").read_text() == "b"


# ---------------------------------------------------------------- SIGKILL during writes

SIZE = 2 << 20
HEADER = struct.Struct("<II")

_WRITER = textwrap.dedent(
    """
    import struct, sys, types
    # Import pared.atomic without pared/__init__ (which imports torch): fast start-up.
    pkg = types.ModuleType("pared"); pkg.__path__ = [sys.argv[1]]; sys.modules["pared"] = pkg
    from pared.atomic import atomic_write_bytes
    target, proc = sys.argv[2], int(sys.argv[3])
    size = {size}
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    i = 1
    while True:
        fill = (proc * 31 + i) % 251
        atomic_write_bytes(target, struct.pack("<II", proc, i) + bytes([fill]) * (size - 8))
        i += 1
    """
).format(size=SIZE)


def _check_version(data: bytes, proc: int) -> int:
    assert len(data) == SIZE, f"partial file: {len(data)} bytes"
    p, i = HEADER.unpack_from(data)
    assert p == proc
    fill = (proc * 31 + i) % 251
    assert data[8:] == bytes([fill]) * (SIZE - 8), f"torn content in version {i}"
    return i


def test_sigkill_during_writes_leaves_old_version_or_nothing(tmp_path: Path) -> None:
    rng = random.Random(0)
    n = 20
    targets = [tmp_path / f"target{p}.bin" for p in range(n)]
    for p in range(0, n, 2):  # even writers start from a previous complete version 0
        targets[p].write_bytes(HEADER.pack(p, 0) + bytes([(p * 31) % 251]) * (SIZE - 8))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(SRC), str(targets[p]), str(p)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for p in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        start = time.monotonic()
        order = sorted((rng.uniform(0.02, 1.5), p) for p in range(n))
        for at, p in order:
            time.sleep(max(0.0, start + at - time.monotonic()))
            assert procs[p].poll() is None, procs[p].stderr.read().decode()  # type: ignore[union-attr]
            procs[p].send_signal(signal.SIGKILL)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert all(proc.returncode == -signal.SIGKILL for proc in procs)

    versions = []
    for p, target in enumerate(targets):
        if target.exists():
            versions.append(_check_version(target.read_bytes(), p))
        else:
            assert p % 2 == 1, "a pre-existing complete version disappeared"
    assert max(versions) >= 1, "no writer completed a single write: the test exercised nothing"

    orphans = _leftovers(tmp_path)
    assert orphans, "no kill landed mid-write (expected temp files left behind)"
    with atomic_directory(tmp_path / "next-run") as tmp:  # the next run cleans up
        (tmp / "ok").write_text("ok")
    assert _leftovers(tmp_path) == []
    for p, target in enumerate(targets):  # cleaning never touches the final files
        if target.exists():
            _check_version(target.read_bytes(), p)
