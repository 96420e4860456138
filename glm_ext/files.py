"""Writing files so that a crash never leaves a half-written one in place, and checking later that
they are still what was written: the one place of glm_ext that stages, syncs, renames and hashes.

* :func:`write_file_atomically`: a file written through a temporary sibling, synced, renamed over the
  target (readers see the old content or the new, never a mix);
* :func:`staged_files`: several files that appear together (each through a temporary sibling, all
  renamed once every one is complete);
* :func:`staged_directory`: a directory assembled under a temporary sibling name, synced, then moved
  onto the target by :func:`replace_directory` (an old directory there moves aside first and is
  removed only once the new one is in place); :func:`remove_directory` takes a directory out of
  sight with one rename before deleting it;
* :func:`fsync_path`: flushes a file, or a directory entry (so that a rename survives a power loss);
* :func:`write_manifest` / :func:`verify_manifest`: ``manifest.json``, the size and SHA-256 of each
  file of a directory, checked before the files are used (:class:`CorruptFileError` names the file).

Temporary names are ``.<target name>.<tag>.tmp`` (the tag has no dot), so whoever owns a directory
recognises the leftovers of a crashed writer and the file they were meant to become
(:func:`temporary_target`, :func:`remove_temporaries`). Files and directories end with the modes the
umask gives new files (``0o666`` / ``0o777`` masked), not the private modes of :mod:`tempfile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_FILE",
    "CorruptFileError",
    "fsync_path",
    "remove_directory",
    "remove_temporaries",
    "replace_directory",
    "sha256_file",
    "staged_directory",
    "staged_files",
    "temporary_target",
    "verify_manifest",
    "write_file_atomically",
    "write_manifest",
]

TEMP_SUFFIX = ".tmp"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "glm_ext manifest"
MANIFEST_VERSION = 1


class CorruptFileError(ValueError):
    """A file that is not what was written (checksum, size or format); the message names it."""


# --------------------------------------------------------------------------------------------
# Modes and syncing


def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting (not thread-safe, hence the last resort)
    os.umask(mask)
    return mask


def _give_normal_mode(path: str | os.PathLike | int, directory: bool = False) -> None:
    """The mode ``open``/``mkdir`` would have given (``tempfile`` creates 0600 files and 0700 directories)."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def fsync_path(path: Path) -> None:
    """Flushes a file or directory entry to disk (directories: so that a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(target: Path, tag: str | None = None) -> Path:
    return target.with_name(f".{target.name}.{tag or uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


# --------------------------------------------------------------------------------------------
# Files


def write_file_atomically(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Writes ``path`` through a temporary sibling that replaces it once complete and synced."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        _give_normal_mode(fd)
        with os.fdopen(fd, mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths`` to write; when the block succeeds they are synced and renamed
    onto ``paths`` in order, when it fails they are deleted (the targets stay as they were).

    A crash between the renames leaves a mix of new and old files: the caller orders ``paths`` so
    that the last one says what the others hold and lets readers check it (a token file's metadata).
    """
    paths = [Path(p) for p in paths]
    tag = uuid.uuid4().hex[:12]
    temps = [_temporary_name(path, tag) for path in paths]
    try:
        yield temps
        for temp in temps:
            fsync_path(temp)
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
        for parent in {path.parent for path in paths}:
            fsync_path(parent)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Directories


def remove_directory(path: Path) -> None:
    """Deletes a directory tree, first renaming it to a temporary name so that it vanishes from its
    name at once (a crash midway leaves a temporary for :func:`remove_temporaries`, never a
    half-deleted directory under the real name)."""
    retired = _temporary_name(path, f"old-{uuid.uuid4().hex[:8]}")
    os.rename(path, retired)
    fsync_path(path.parent)
    shutil.rmtree(retired)


def replace_directory(staging: Path, target: Path) -> None:
    """Renames the complete ``staging`` directory to ``target``, replacing an old one there.

    A directory cannot be renamed over a non-empty one, so the old one first moves aside to a
    temporary name (a crash between the two renames leaves both as temporaries next to ``target``).
    """
    if target.exists():
        retired = _temporary_name(target, f"old-{uuid.uuid4().hex[:8]}")
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
        _give_normal_mode(staging, directory=True)
        yield staging
        for path in sorted(staging.rglob("*"), reverse=True):  # files before the directories holding them
            fsync_path(path)
        fsync_path(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Leftovers of crashed writers


def temporary_target(name: str) -> str | None:
    """The name of the file or directory that the temporary ``name`` was to become (or retired
    from), or None when ``name`` is not one of this module's temporaries."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    target, dot, _tag = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return target if dot and target else None


def remove_temporaries(directory: Path, owned: Callable[[str], bool]) -> list[Path]:
    """Deletes the temporaries directly in ``directory`` whose target name ``owned`` accepts (only
    call it while no writer can be at work there). Returns what was removed."""
    removed = []
    for path in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
        target = temporary_target(path.name)
        if target is None or not owned(target):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(directory: Path, names: Iterable[str], metadata: dict[str, Any] | None = None) -> None:
    """Writes ``directory/manifest.json``: the size and SHA-256 of the files ``names`` (as they are
    now), and ``metadata`` (JSON values). Call it as the last step of filling a staged directory."""
    directory = Path(directory)
    files = {name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
             for name in names}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files, "metadata": metadata or {}}
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2)
        out.write("\n")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of ``directory`` (checked for form, not against the files), or None without one."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        valid = (
            manifest.get("format") == MANIFEST_FORMAT
            and manifest.get("version") == MANIFEST_VERSION
            and isinstance(manifest.get("metadata"), dict)
            and isinstance(manifest.get("files"), dict)
            and all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str) for entry in manifest["files"].values())
        )
    except (ValueError, AttributeError):  # not UTF-8 / not JSON / not an object
        valid = False
    if not valid:
        raise CorruptFileError(f"{path} is damaged (not a {MANIFEST_FORMAT} version {MANIFEST_VERSION})")
    return manifest


def verify_manifest(directory: Path, required: Iterable[str]) -> dict[str, Any] | None:
    """Checks every file that ``directory``'s manifest lists (size, then SHA-256), and that it lists
    all of ``required``. Raises :class:`CorruptFileError` naming the first file that differs;
    returns the manifest's metadata, or None when the directory has no manifest (nothing to check)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    files = manifest["files"]
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise CorruptFileError(f"{directory / MANIFEST_FILE} is damaged: it does not cover {', '.join(unlisted)}")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CorruptFileError(
                f"{path} is damaged: its contents differ from the checksum recorded when it was saved"
            )
    return manifest["metadata"]
