"""The default corpus: English text that ships with every CPython, so a demo needs no network.

``pydoc_data.topics`` holds the interpreter's ``help()`` topics (about 80 of them, several hundred KB
of prose about Python with code examples). Each topic is one document.
"""

from __future__ import annotations

import re
import sys

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
