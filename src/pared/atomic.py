"""Write files and directories so that a crash leaves the old version or nothing, never half.

Pattern: write into a temporary sibling, fsync, ``os.replace`` onto the final name, fsync the
parent directory. Temporaries carry a recognisable prefix so a later run can clean orphans.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pared.errors import EnvironmentIOError, UsageError

TMP_PREFIX = ".pared-tmp-"
_BACKUP, _TARGET = "previous", "target"  # inside an overwrite's holder folder


def _tmp_prefix() -> str:
    # The writer's PID in the name lets a later run tell an orphan (writer gone) from a live
    # temporary of a concurrent job in the same folder, which must not be touched.
    return f"{TMP_PREFIX}{os.getpid()}-"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=_parent(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        raise _io_error(exc, path) from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    Raises:
        UsageError: ``path`` exists and ``overwrite`` is false (checked before any work).
        EnvironmentIOError: the parent cannot be written (read-only, disk full).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"output directory already exists: {path} (pass --overwrite to replace it)")
    parent = _parent(path)
    clean_orphans(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=parent))
    except OSError as exc:
        raise _io_error(exc, path) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            if not overwrite:  # another job created it while this one worked
                raise EnvironmentIOError(f"cannot write {path}: another process wrote it at the same time")
            _swap_in(tmp, path, parent)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    except EnvironmentIOError as exc:  # a write inside the block failed: name the final path
        shutil.rmtree(tmp, ignore_errors=True)
        raise EnvironmentIOError(str(exc).replace(str(tmp), str(path))) from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _io_error(exc, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_orphans(directory: str | os.PathLike[str]) -> None:
    """Remove temporaries that interrupted earlier runs left in ``directory``.

    Only those whose writer process is gone: a concurrent job's live temporary is kept.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.glob(TMP_PREFIX + "*"):
        if _writer_alive(entry.name):
            continue
        with contextlib.suppress(OSError):
            _restore_previous(entry, directory)
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _restore_previous(holder: Path, directory: Path) -> None:
    """Put back the previous version an overwrite had moved aside when its writer died before
    renaming the new version in: the final path is then absent, and deleting the orphan would
    lose the only complete copy."""
    backup, target = holder / _BACKUP, holder / _TARGET
    if not (backup.exists() and target.is_file()):
        return
    name = target.read_text(encoding="utf-8")
    if name in ("", ".", "..") or Path(name).name != name:
        return
    if not os.path.lexists(directory / name):
        os.replace(backup, directory / name)
        _fsync_dir(directory)


def _writer_alive(name: str) -> bool:
    pid_text = name[len(TMP_PREFIX):].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # another job of this very process; failed calls clean up after themselves
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, path: Path, parent: Path) -> None:
    """Replace the existing ``path`` by ``tmp``; on failure put the previous version back."""
    holder = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=parent))
    # Record the final name first: if this process is killed between the two renames,
    # clean_orphans finds the previous version here and moves it back.
    (holder / _TARGET).write_text(path.name, encoding="utf-8")
    backup = holder / _BACKUP
    with _interrupts_deferred():
        os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(backup, path)
            raise
    shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends: a Ctrl-C between (or inside) the two renames of
    an overwrite would otherwise leave the final path absent until the next run's cleanup."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _parent(path: Path) -> Path:
    """The directory the temp file goes in, created like ``mkdir -p`` when missing: ``--out
    out/run1`` on a fresh checkout must work. The parents are empty directories, never a
    half-written artefact, so they are not rolled back on failure."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        return parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise EnvironmentIOError(f"cannot create directory {parent}: a file is in the way") from None
    except OSError as exc:
        raise EnvironmentIOError(f"cannot create directory {parent}: {exc.strerror or exc}") from None
    return parent


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _io_error(exc: OSError, path: Path) -> EnvironmentIOError:
    if exc.errno == errno.ENOSPC:
        return EnvironmentIOError(f"no space left writing {path}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EnvironmentIOError(f"permission denied writing {path}")
    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
        return EnvironmentIOError(f"cannot write {path}: another process wrote it at the same time")
    return EnvironmentIOError(f"cannot write {path}: {exc.strerror or exc}")
