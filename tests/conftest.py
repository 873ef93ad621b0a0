"""Shared fixtures: a session-wide pared cache (never ~/.cache/pared) and one trained digits CNN."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# A shell that starts a job in the background without job control (as CI runners do) sets SIGINT
# to "ignore", and Python then never turns it into KeyboardInterrupt. The Ctrl-C tests send
# SIGINT to forked children and subprocesses, which inherit the disposition, so restore it.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def pared_session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``PARED_CACHE_DIR`` for the whole session, set in ``os.environ`` so subprocesses inherit it.

    Tests that need their own cache still override it per test or module with ``monkeypatch``;
    the monkeypatch restores this value afterwards.
    """
    path = tmp_path_factory.mktemp("pared-session-cache")
    before = os.environ.get("PARED_CACHE_DIR")
    os.environ["PARED_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("PARED_CACHE_DIR", None)
        else:
            os.environ["PARED_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def digits_fp32(pared_session_cache: Path) -> torch.nn.Module:
    """The built-in digits CNN, trained once into the session cache (later ``model()`` calls and
    CLI subprocesses load the cached weights)."""
    from pared.tasks import get_task

    prev = os.environ.get("PARED_CACHE_DIR")
    os.environ["PARED_CACHE_DIR"] = str(pared_session_cache)  # a module fixture may have overridden it
    try:
        model = get_task("digits").model()
    finally:
        if prev is not None:
            os.environ["PARED_CACHE_DIR"] = prev
    assert (pared_session_cache / "digits_cnn_w16.safetensors").is_file()
    return model


@pytest.fixture
def one_thread() -> Iterator[None]:
    """PyTorch on one thread for the test: for tiny layers a second OpenMP thread only waits, which
    on a busy 2-core machine made a 40-step training test 6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
