"""Writing files so that a crash never leaves a half-written one in place: the one place of glm_ext
that stages, syncs and renames.

* :func:`write_file_atomically`: a file written through a temporary sibling, synced, renamed over the
  target (readers see the old content or the new, never a mix);
* :func:`staged_directory`: a directory assembled under a temporary sibling name, synced, then moved
  onto the target by :func:`replace_directory` (an old directory there moves aside first and is
  removed only once the new one is in place);
* :func:`fsync_path`: flushes a file, or a directory entry (so that a rename survives a power loss).

Temporary names start with ``.`` and end with ``.tmp``, so whoever owns a directory can recognise
leftovers of a crashed writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "replace_directory", "staged_directory", "write_file_atomically"]

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """Flushes a file or directory entry to disk (directories: so that a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes ``path`` through a temporary sibling that replaces it once complete and synced."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Renames the complete ``staging`` directory to ``target``, replacing an old one there.

    A directory cannot be renamed over a non-empty one, so the old one first moves aside (a crash
    between the two renames leaves both complete copies next to ``target``).
    """
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        os.rename(target, retired)
        os.rename(staging, target)
        fsync_path(target.parent)
        shutil.rmtree(retired)
    else:
        os.rename(staging, target)
        fsync_path(target.parent)


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``target`` to fill; when the block succeeds its files are
    synced and it replaces ``target`` (:func:`replace_directory`); when it fails it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        yield staging
        for path in sorted(staging.rglob("*"), reverse=True):  # files before the directories holding them
            fsync_path(path)
        fsync_path(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
