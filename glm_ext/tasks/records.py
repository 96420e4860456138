"""Task files: JSON lines (one JSON object per line), read with errors that name the file, the
line and the field.

Every task reader goes through :func:`read_jsonl` and :meth:`Record.field`, so a missing file, an
empty file, a line that is not JSON, a missing field or a field of the wrong type is a
``ValueError`` (``FileNotFoundError`` for a missing file) saying ``FILE:LINE: field 'a.b' ...``.
Blank lines are skipped. A file whose first character is ``[`` is rejected with a hint (a JSON
array is not JSON lines).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["Record", "read_jsonl", "read_text"]

_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One JSON object of a task file and where it came from (``path``, 1-based ``line``)."""

    data: Mapping[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, message: str) -> ValueError:
        """A ValueError prefixed with ``FILE:LINE:``."""
        return ValueError(f"{self.where}: {message}")

    def field(self, *keys: str | int, kind: type | tuple[type, ...] | None = None) -> Any:
        """The value under ``keys`` (nested: ``field("target", "span1_text")``); raises a ValueError
        naming the file, line and dotted field when it is missing or not of ``kind``."""
        value: Any = self.data
        for depth, key in enumerate(keys):
            name = ".".join(str(k) for k in keys[: depth + 1])
            if isinstance(key, int):
                if not isinstance(value, list) or not -len(value) <= key < len(value):
                    raise self.error(f"field {name!r} is missing")
                value = value[key]
            else:
                if not isinstance(value, Mapping) or key not in value:
                    raise self.error(f"field {name!r} is missing")
                value = value[key]
        if kind is not None and not _is_kind(value, kind):
            name = ".".join(str(k) for k in keys)
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(f"field {name!r} must be {expected}, got {json.dumps(value)[:60]}")
        return value

    def has(self, *keys: str) -> bool:
        value: Any = self.data
        for key in keys:
            if not isinstance(value, Mapping) or key not in value:
                return False
            value = value[key]
        return True

    def child(self, data: Mapping[str, Any]) -> Record:
        """A nested object (a MultiRC question, a ReCoRD query) reported at this record's line."""
        return Record(data, self.path, self.line)


def _is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # JSON true/false is not an integer here
        return bool in kinds
    return isinstance(value, kinds)


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """The records of a JSON-lines file (see the module docstring for the errors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                raise ValueError(f"{path}:1: expected JSON lines (one object per line), got a JSON array")
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(data, path, number))
    if not records:
        raise ValueError(f"data file {path!r} holds no records (it is empty)")
    return records


def read_text(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file; an empty (or all-whitespace) file is a ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if not text.strip():
        raise ValueError(f"data file {path!r} holds no text (it is empty)")
    return text
