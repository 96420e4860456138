"""glm_ext.files: atomic writes, syncing, modes, leftovers of crashed writers and manifests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from glm_ext import files
from glm_ext.files import (
    CorruptFileError,
    fsync_path,
    remove_directory,
    remove_temporaries,
    staged_directory,
    staged_files,
    temporary_target,
    verify_manifest,
    write_file_atomically,
    write_manifest,
)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def identity(path_or_fd) -> tuple[int, int]:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return st.st_dev, st.st_ino


@pytest.fixture
def synced(monkeypatch):
    """The (device, inode) of every file descriptor passed to os.fsync (then really synced)."""
    calls = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        calls.append(identity(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


# ----- write_file_atomically ---------------------------------------------------------------------


def test_the_target_keeps_its_old_content_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "state"
    target.write_text("old")
    seen = []

    def write(file):
        file.write("new, ")
        file.flush()
        seen.append((identity(file.fileno()) == identity(target), target.read_text()))
        file.write("complete")

    write_file_atomically(target, write)
    assert seen == [(False, "old")]  # written elsewhere, the target untouched meanwhile
    assert target.read_text() == "new, complete" and names(tmp_path) == ["state"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-00000002\n")

    def write(file):
        file.write("step-000")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(target, write)
    assert target.read_text() == "step-00000002\n" and names(tmp_path) == ["latest"]


def test_write_file_atomically_syncs_the_file_and_its_directory(tmp_path, synced):
    target = tmp_path / "state"
    write_file_atomically(target, lambda f: f.write("data"))
    assert identity(target) in synced and identity(tmp_path) in synced


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_fsync_path_syncs_that_path(tmp_path, synced, kind):
    path = tmp_path / "x"
    path.write_text("data") if kind == "file" else path.mkdir()
    fsync_path(path)
    assert synced == [identity(path)]


@pytest.mark.parametrize("mask, file_mode, dir_mode",
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_files_and_directories_get_the_umasks_modes(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    write_file_atomically(tmp_path / "file", lambda f: f.write("x"))
    with staged_directory(tmp_path / "dir") as staging:
        (staging / "inner").write_text("x")
    with staged_files([tmp_path / "a", tmp_path / "b"]) as (a, b):
        a.write_text("a")
        b.write_text("b")
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == dir_mode
    for name in ("dir/inner", "a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name


# ----- staged_files, staged_directory, remove_directory -------------------------------------------


def test_staged_files_appear_together_or_not_at_all(tmp_path, synced):
    paths = [tmp_path / "t.bin", tmp_path / "t.json"]
    paths[1].write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_files(paths) as temps:
        temps[0].write_text("new bin")
        raise RuntimeError("boom")
    assert names(tmp_path) == ["t.json"] and paths[1].read_text() == "old"
    with staged_files(paths) as temps:
        for temp, path, text in zip(temps, paths, ("new bin", "new json")):
            assert temporary_target(temp.name) == path.name
            temp.write_text(text)
    assert [p.read_text() for p in paths] == ["new bin", "new json"] and names(tmp_path) == ["t.bin", "t.json"]
    assert {identity(p) for p in paths} | {identity(tmp_path)} <= set(synced)


def test_staged_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with staged_directory(target) as staging:
        (staging / "w").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_directory(target) as staging:
        (staging / "w").write_text("half")
        raise RuntimeError("boom")
    assert (target / "w").read_text() == "old" and names(tmp_path) == ["ckpt"]
    with staged_directory(target) as staging:
        (staging / "w").write_text("new")
    assert (target / "w").read_text() == "new" and names(tmp_path) == ["ckpt"]


def test_remove_directory_renames_it_away_first(tmp_path, monkeypatch):
    (tmp_path / "step-1" / "model").mkdir(parents=True)
    (tmp_path / "step-1" / "model" / "w").write_text("x")

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # killed while deleting

    monkeypatch.setattr(files.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        remove_directory(tmp_path / "step-1")
    (leftover,) = names(tmp_path)
    assert temporary_target(leftover) == "step-1"  # gone from its name at once; a temporary remains
    monkeypatch.undo()
    assert remove_temporaries(tmp_path, lambda target: target == "step-1") == [tmp_path / leftover]
    assert names(tmp_path) == []


# ----- leftovers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, target", [
    (".latest.k2x9_abc.tmp", "latest"),
    (".train_config.json.a1b2c3.tmp", "train_config.json"),
    (".step-00000004.old-1a2b3c4d.tmp", "step-00000004"),
    (".tokens.bin.0123456789ab.tmp", "tokens.bin"),
    ("latest", None),
    (".hidden", None),
    (".tmp", None),
    ("..tmp", None),
    ("notes.tmp", None),
])
def test_temporary_target(name, target):
    assert temporary_target(name) == target


def test_remove_temporaries_removes_only_owned_temporaries(tmp_path):
    for name in (".latest.abc.tmp", ".other.abc.tmp", "latest", ".hidden"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".step-00000002.xyz.tmp").mkdir()
    (tmp_path / ".step-00000002.xyz.tmp" / "w").write_text("x")
    removed = remove_temporaries(tmp_path, lambda target: target in ("latest", "step-00000002"))
    assert sorted(p.name for p in removed) == [".latest.abc.tmp", ".step-00000002.xyz.tmp"]
    assert names(tmp_path) == [".hidden", ".other.abc.tmp", "latest"]
    assert remove_temporaries(tmp_path / "missing", lambda target: True) == []


# ----- manifests --------------------------------------------------------------------------------


def test_manifest_catches_any_changed_byte_and_names_the_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "b.json").write_text('{"x": 1}')
    write_manifest(tmp_path, ["a.bin", "b.json"], {"tokenizer_sha256": "cafe"})
    assert verify_manifest(tmp_path, required=["a.bin"]) == {"tokenizer_sha256": "cafe"}
    for offset in (0, 1234, 2559):
        data = bytearray((tmp_path / "a.bin").read_bytes())
        data[offset] ^= 0x80
        (tmp_path / "a.bin").write_bytes(bytes(data))
        with pytest.raises(CorruptFileError, match=r"a.bin is damaged"):
            verify_manifest(tmp_path, required=[])
        data[offset] ^= 0x80
        (tmp_path / "a.bin").write_bytes(bytes(data))
    (tmp_path / "b.json").write_text('{"x": 1} ')
    with pytest.raises(CorruptFileError, match=r"b.json is damaged"):
        verify_manifest(tmp_path, required=[])
    (tmp_path / "b.json").unlink()
    with pytest.raises(CorruptFileError, match=r"b.json is missing"):
        verify_manifest(tmp_path, required=[])
    with pytest.raises(CorruptFileError, match=r"manifest.json is damaged: it does not cover c.txt"):
        verify_manifest(tmp_path, required=["c.txt"])
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptFileError, match=r"manifest.json is damaged"):
        verify_manifest(tmp_path, required=[])
    (tmp_path / "manifest.json").unlink()
    assert verify_manifest(tmp_path, required=["a.bin"]) is None  # nothing recorded, nothing to check
