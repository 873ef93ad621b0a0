"""``pared search``: multi-objective search over recipes with Optuna (see docs/search.md).

Example:
    >>> from pared.search import SearchSpec, search
    >>> result = search(SearchSpec(model="digits", out="out/search", trials=20,
    ...                            constraints=("metric_drop <= 0.5",)))
    >>> [t["recipe"] for t in result["trials"] if t["pareto"]]

A technique joins the search with ``pared.search.space.register_space`` (no edit here).
"""

from __future__ import annotations

import pared.recipe  # noqa: F401 - registers every technique config the spaces build
import pared.search.techniques  # noqa: F401 - the built-in techniques' spaces
from pared.search.space import ModelInfo, register_space, registered_spaces
from pared.search.study import SearchSpec, search

__all__ = ["ModelInfo", "SearchSpec", "register_space", "registered_spaces", "search"]
