"""A corpus of real English sentences taken from Python standard-library docstrings.

The MiniLM task needs natural sentences that nobody on this project wrote and that ship with every
Python install, so the corpus needs no download. Sentences come from ``inspect.getdoc`` of a fixed,
sorted list of standard-library modules and of their public classes and functions. Code examples,
argument lists and anything code-like are dropped. The corpus is identical across runs and machines
with the same Python minor version; docstrings change between minor versions, so the cache file name
carries the version.

The first ``N_EVAL`` sentences (in a fixed hash order) are the evaluation set, the next ``N_CALIB``
the calibration set. ``train_sentences()`` (for distillation and recovery fine-tuning) is the rest,
plus sentences from ``TRAIN_MODULES``, the language reference text in ``pydoc_data.topics``, and
the docstrings of every standard-library source file and of the installed torch package, read with
``ast`` (nothing is imported or run); it never contains an evaluation or calibration sentence.
Distilling on the first ~2,000 of these alone overfitted: a 3-layer student reached cosine 0.987
on training sentences against 0.941 on held-out ones.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from pared.atomic import atomic_write_text
from pared.tasks.base import cache_dir

N_EVAL = 512
N_CALIB = 128
CORPUS_VERSION = 1  # bump when the extraction rules change, so stale caches are not reused
TRAIN_VERSION = 2  # the same for the training split alone

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

# Sources used only for the training split. They are kept out of MODULES so that adding them left
# the evaluation and calibration sentences (and every figure measured on them) unchanged.
# Deprecated modules (cgi, mailcap, ...) and ones that need tkinter or a C extension stay out.
TRAIN_MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "asyncio.base_events", "asyncio.futures", "asyncio.locks", "asyncio.protocols",
            "asyncio.queues", "asyncio.subprocess", "asyncio.transports", "bz2", "code", "codeop",
            "collections.abc", "colorsys", "compileall", "concurrent.futures.process",
            "concurrent.futures.thread", "contextvars", "copyreg", "email.charset",
            "email.feedparser", "email.generator", "email.header", "email.headerregistry",
            "email.policy", "filecmp", "fileinput", "fnmatch", "graphlib", "hashlib", "html",
            "http.cookies", "importlib.abc", "importlib.metadata", "importlib.resources",
            "importlib.util", "io", "itertools", "json.decoder", "json.encoder", "keyword",
            "linecache", "locale", "logging.config", "lzma", "modulefinder",
            "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.process",
            "multiprocessing.queues", "multiprocessing.shared_memory",
            "multiprocessing.synchronize", "netrc", "pkgutil", "plistlib", "py_compile",
            "pyclbr", "pydoc", "quopri", "rlcompleter", "runpy", "signal", "site", "stat",
            "stringprep", "struct", "symtable", "sysconfig", "tabnanny", "tomllib", "types",
            "unittest.loader", "unittest.result", "unittest.runner", "unittest.suite",
            "urllib.error", "urllib.robotparser", "wsgiref.handlers", "wsgiref.simple_server",
            "wsgiref.util", "wsgiref.validate", "xml.dom.pulldom", "xml.etree.ElementTree",
            "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client",
            "xmlrpc.server", "zipapp", "zipimport", "zoneinfo",
        ]
    )
)  # fmt: skip

# Source trees whose docstrings join the training split only, read with ``ast``. Tests, IDLE, GUI
# toolkits, demos and third-party site-packages are left out of the standard library walk.
_SKIPPED_SOURCE_DIRS = frozenset(
    {"idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages",
     "__pycache__", "_internal"}
)  # fmt: skip
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

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


def train_sentences() -> list[str]:
    """Training sentences: disjoint from ``eval_sentences()`` and ``calib_sentences()``.

    Returns:
        About 18,000 sentences on CPython 3.11 with torch 2.13, in a fixed order.
    """
    held_out = set(sentences()[: N_EVAL + N_CALIB])
    train = list(_cached_sentences(str(_cache_file("train"))))
    assert not held_out & set(train), "training sentences overlap the evaluation or calibration set"
    return train


def build_train_sentences() -> list[str]:
    """The training split from scratch: the corpus after its held-out sentences, then the new
    sentences of ``TRAIN_MODULES`` and ``pydoc_data.topics`` in hash order (no cache involved)."""
    base = sentences()
    held_out = set(base[: N_EVAL + N_CALIB])
    found: set[str] = set()
    for doc in _train_only_texts():
        found.update(s for s in _split_sentences(doc) if is_prose(s))
    extra = sorted(found - set(base), key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    return [s for s in base[N_EVAL + N_CALIB :] + extra if s not in held_out]


def _train_only_texts() -> list[str]:
    from pydoc_data.topics import topics  # the language reference's prose, shipped with CPython

    docs = [doc for name in TRAIN_MODULES for doc in _docstrings(importlib.import_module(name))]
    docs += [topics[key] for key in sorted(topics)]
    for root in _training_source_roots():
        docs += _source_docstrings(root)
    return docs


def _training_source_roots() -> list[Path]:
    """The standard library's directory and the installed torch package's directory."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin is not None:
        roots.append(Path(spec.origin).parent)
    return roots


def _source_docstrings(root: Path) -> list[str]:
    """Docstrings of every module, class and function under ``root``, parsed, never imported."""
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        dirs = path.relative_to(root).parts[:-1]
        if any(d in _SKIPPED_SOURCE_DIRS or d.startswith("test") for d in dirs):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (OSError, SyntaxError, ValueError):
            continue  # an unreadable or non-3.x file is simply not part of the corpus
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
                docs.append(doc)
    return docs


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


def _cache_file(split: str = "") -> Path:
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not split:
        return cache_dir() / f"corpus_v{CORPUS_VERSION}_py{minor}.json"
    # The training split also reads torch's docstrings, so its version names the file too.
    return cache_dir() / f"corpus_{split}_v{TRAIN_VERSION}_py{minor}_torch{_torch_version()}.json"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch").replace("+", "_")
    except importlib.metadata.PackageNotFoundError:
        return "none"


@lru_cache(maxsize=8)
def _cached_sentences(path_str: str) -> tuple[str, ...]:
    # Keyed by path so a changed PARED_CACHE_DIR (tests) builds into its own file.
    path = Path(path_str)
    loaded = _load(path)
    if loaded is not None:
        return tuple(loaded)
    built = build_train_sentences() if path.name.startswith("corpus_train") else build_sentences()
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
