"""A corpus of real English sentences taken from Python standard-library docstrings.

The MiniLM task needs natural sentences that nobody on this project wrote and that ship with every
Python install, so the corpus needs no download. Sentences come from ``inspect.getdoc`` of a fixed,
sorted list of standard-library modules and of their public classes and functions. Code examples,
argument lists and anything code-like are dropped. The corpus is identical across runs and machines
with the same Python minor version; docstrings change between minor versions, so the cache file name
carries the version.

The first ``N_EVAL`` sentences (in a fixed hash order) are the evaluation set, the next ``N_CALIB``
the calibration set.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from pared.atomic import atomic_write_text
from pared.tasks.base import cache_dir

N_EVAL = 512
N_CALIB = 128
CORPUS_VERSION = 1  # bump when the extraction rules change, so stale caches are not reused

# Pure-Python modules present in every CPython build and free of import side effects
# (no "this" or "antigravity"); optional C-backed ones such as sqlite3 or tkinter are left out
# because their absence on some builds would change the corpus.
MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc", "argparse", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks",
            "base64", "bisect", "calendar", "cmd", "codecs", "collections", "concurrent.futures",
            "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
            "difflib", "dis", "doctest", "email.message", "email.parser", "email.utils", "enum",
            "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
            "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
            "inspect", "ipaddress", "json", "logging", "logging.handlers", "mailbox", "mimetypes",
            "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
            "pickle", "pickletools", "platform", "poplib", "pprint", "profile", "pstats", "queue",
            "random", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
            "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
            "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
            "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
            "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
        ]
    )
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Characters and patterns that mark code, markup or references rather than prose.
_CODE_LIKE = re.compile(r">>>|[{}\[\]=<>|\\_*#`@~^$%;]|::|\.\.|\(\)|\w\.\w|\w\(|\s-\w|^\W")


def sentences() -> list[str]:
    """All corpus sentences in their fixed order (built on first use, then read from the cache).

    Returns:
        At least ``N_EVAL + N_CALIB`` distinct sentences.
    """
    return list(_cached_sentences(str(_cache_file())))


def eval_sentences() -> list[str]:
    """The ``N_EVAL`` evaluation sentences."""
    return sentences()[:N_EVAL]


def calib_sentences() -> list[str]:
    """The ``N_CALIB`` calibration sentences, disjoint from ``eval_sentences()``."""
    calib = sentences()[N_EVAL : N_EVAL + N_CALIB]
    assert not set(calib) & set(eval_sentences()), "calibration and eval sentences overlap"
    return calib


def build_sentences() -> list[str]:
    """Extract, filter, deduplicate and order the corpus from docstrings (no cache involved)."""
    found: set[str] = set()
    for name in MODULES:
        for doc in _docstrings(importlib.import_module(name)):
            found.update(s for s in _split_sentences(doc) if is_prose(s))
    # Hash order mixes modules into both splits without depending on set iteration order.
    ordered = sorted(found, key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    if len(ordered) < N_EVAL + N_CALIB:
        raise RuntimeError(f"corpus has only {len(ordered)} sentences; add modules to MODULES")
    return ordered


def is_prose(sentence: str) -> bool:
    """True for a 6..40-word sentence of mostly letters with nothing code-like in it."""
    words = sentence.split()
    if not 6 <= len(words) <= 40 or _CODE_LIKE.search(sentence):
        return False
    if not (sentence[0].isupper() and sentence[-1] in ".!?"):
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters / sum(not c.isspace() for c in sentence) >= 0.85


def _cache_file() -> Path:
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / f"corpus_v{CORPUS_VERSION}_py{minor}.json"


@lru_cache(maxsize=4)
def _cached_sentences(path_str: str) -> tuple[str, ...]:
    # Keyed by path so a changed PARED_CACHE_DIR (tests) builds into its own file.
    path = Path(path_str)
    loaded = _load(path)
    if loaded is not None:
        return tuple(loaded)
    built = build_sentences()
    atomic_write_text(path, json.dumps(built, ensure_ascii=False, indent=0))
    return tuple(built)


def _load(path: Path) -> list[str] | None:
    """The cached list, or None when missing or unreadable (then it is rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, list) and len(data) >= N_EVAL + N_CALIB
    return data if ok and all(isinstance(s, str) for s in data) else None


def _docstrings(module: ModuleType) -> list[str]:
    """The module's docstring, then those of its own public classes and functions by name."""
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        own = getattr(obj, "__module__", None) == module.__name__
        if not name.startswith("_") and own and (inspect.isclass(obj) or inspect.isfunction(obj)):
            docs.append(inspect.getdoc(obj) or "")
    return docs


def _split_sentences(doc: str) -> list[str]:
    """Sentences of the prose paragraphs of a dedented docstring."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        # Indented lines are code samples or argument tables, not running text.
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        out.extend(" ".join(s.split()) for s in _SENTENCE_END.split(text) if s.strip())
    return out
