"""Tasks: a model plus the data and metric that judge it (built-ins and ``UserTask``).

Example:
    >>> from pared.tasks import get_task
    >>> task = get_task("digits")
    >>> task.evaluate(task.model())
    {'accuracy': 99.1...}
"""

from __future__ import annotations

from collections.abc import Callable

from pared.errors import UsageError
from pared.tasks.base import Runner, Task
from pared.tasks.digits import DigitsTask
from pared.tasks.lenet import Lenet5Task, Lenet300Task
from pared.tasks.minilm import MiniLMTask
from pared.tasks.user import UserTask

_BUILTINS: dict[str, Callable[[], Task]] = {
    "minilm": MiniLMTask, "digits": DigitsTask, "lenet300": Lenet300Task, "lenet5": Lenet5Task,
}
BUILTIN_TASKS: tuple[str, ...] = tuple(_BUILTINS)


def get_task(name: str) -> Task:
    """A new instance of the built-in task ``name``.

    Raises:
        UsageError: ``name`` is not a built-in task (the message lists the known ones).
    """
    try:
        factory = _BUILTINS[name]
    except (KeyError, TypeError):
        known = ", ".join(BUILTIN_TASKS)
        raise UsageError(f"unknown task {name!r}; built-in tasks are: {known}") from None
    return factory()


__all__ = ["BUILTIN_TASKS", "DigitsTask", "Lenet300Task", "Lenet5Task", "MiniLMTask", "Runner", "Task", "UserTask", "get_task"]
