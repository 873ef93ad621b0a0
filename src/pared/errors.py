"""Error types and the exit codes the CLI maps them to.

One scheme for the whole project (docs/reliability.md, "Exit codes and error types"):
0 ok, 1 internal error (a bug), 2 usage or configuration error, 3 input refused
(unsafe, invalid or corrupt model/data file), 4 quality gate failed, 5 environment
or I/O (disk full, permission, out of memory), 130 interrupted. ``pared.cli.main`` prints
one line per error and the traceback only with ``--debug``.
"""

from __future__ import annotations


class ParedError(Exception):
    """Base of every error pared raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(ParedError, ValueError):
    """A bad argument, config field, recipe, selection rule or calibration set."""

    exit_code = 2


class InputRefused(ParedError):
    """A model or data file that is unsafe, invalid, corrupt or does not fit."""

    exit_code = 3


class QualityGateFailed(ParedError):
    """The compressed model missed a metric tolerance the user asked for."""

    exit_code = 4


class EnvironmentIOError(ParedError, OSError):
    """Disk full, permission denied, an output that cannot be written."""

    exit_code = 5
