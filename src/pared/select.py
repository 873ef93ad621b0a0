"""One layer-selection mechanism shared by every technique.

A rule is a string:
- ``type:Linear`` matches modules whose class name is ``Linear`` (or ends with ``.Linear``);
- ``re:<regex>`` matches the module's fully-qualified name with ``re.fullmatch``;
- anything else is an ``fnmatch`` glob on the fully-qualified name (``encoder.layer.*.output.dense``).

``exclude`` wins over ``include``. A rule that matches no candidate is an error, so a typo
never silently quantizes (or prunes) everything.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from pared.errors import UsageError


def rule_matches(rule: str, name: str, module: nn.Module) -> bool:
    """True when ``rule`` selects the module called ``name``."""
    if rule.startswith("type:"):
        wanted = rule[5:]
        cls = type(module)
        return wanted in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
    if rule.startswith("re:"):
        try:
            return re.fullmatch(rule[3:], name) is not None
        except re.error as exc:
            raise UsageError(f"bad regular expression in rule {rule!r}: {exc}") from None
    return fnmatch.fnmatchcase(name, rule)


def select_modules(
    model: nn.Module,
    *,
    candidate: Callable[[str, nn.Module], bool],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` that ``candidate`` accepts, filtered by include/exclude rules.

    Args:
        model: the model to walk.
        candidate: which modules the technique can handle at all (e.g. ``isinstance(m, nn.Linear)``).
        include: rules; when given, only candidates matching at least one are kept.
        exclude: rules; candidates matching any are dropped.

    Returns:
        ``(qualified_name, module)`` pairs in model order.

    Raises:
        UsageError: a rule matches no candidate (the message lists the unmatched rules).
    """
    candidates = [(n, m) for n, m in model.named_modules() if candidate(n, m)]
    _require_all_match("include", include, candidates)
    _require_all_match("exclude", exclude, candidates)
    chosen = []
    for name, module in candidates:
        if include and not any(rule_matches(r, name, module) for r in include):
            continue
        if any(rule_matches(r, name, module) for r in exclude):
            continue
        chosen.append((name, module))
    return chosen


def _require_all_match(kind: str, rules: Iterable[str], candidates: list[tuple[str, nn.Module]]) -> None:
    unmatched = [r for r in rules if not any(rule_matches(r, n, m) for n, m in candidates)]
    if unmatched:
        raise UsageError(f"{kind} rule(s) matched no eligible layer: {unmatched}")
