"""Corpora of English text that ships with every CPython, so a demo needs no network.

The default corpus, ``pydoc_data.topics``, holds the interpreter's ``help()`` topics (about 80 of
them, several hundred KB of prose about Python with code examples); each topic is one document.
:func:`stdlib_docstrings` adds the docstrings of the standard library (about 1.7 MB).
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

DEFAULT_CORPUS_NAME = f"pydoc_data.topics (Python {sys.version.split()[0]})"

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


def default_corpus() -> list[str]:
    """The ``help()`` topics of this Python, one document per topic, in sorted topic order.

    Only whitespace is cleaned (trailing spaces, runs of blank lines, the ends), so code examples
    keep their indentation.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise RuntimeError(
            "the default corpus needs the standard library's pydoc_data package, which this Python "
            "lacks (some distributions split it out); pass text or jsonl sources instead"
        ) from error
    return [_clean(topics[name]) for name in sorted(topics)]


def _clean(text: str) -> str:
    return _BLANK_LINE_RUNS.sub("\n\n", _TRAILING_SPACE.sub("", text)).strip()


def stdlib_docstrings() -> list[tuple[str, str]]:
    """The docstrings of this Python's standard library, one document per module: ``(module path,
    text)`` in sorted path order, the text being the module's, classes' and functions' docstrings
    (``ast.get_docstring``, so indentation is cleaned) separated by blank lines.

    Read from the source files with ``ast`` (nothing is imported); tests, ``site-packages`` and files
    that do not parse are skipped. About 1.7 MB of English prose about Python in 3.11.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if {"site-packages", "test", "tests", "idle_test"} & set(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docstrings = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(_clean(d) for d in docstrings if d and d.strip())
        if text:
            documents.append((relative.as_posix(), text))
    return documents
