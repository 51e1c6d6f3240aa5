"""Atomic, all-or-nothing writes that never follow a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_agent import files
from guest_agent.errors import WriteFailed
from guest_agent.files import FileSpec
from tests.conftest import snapshot


def specs() -> list[FileSpec]:
    return [
        FileSpec("/run/peerpod/apf.json", b"{}\n", 0o600),
        FileSpec("/run/peerpod/initdata.digest", b"ab" * 32, 0o644),
    ]


def test_writes_with_modes_and_creates_dirs(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the mode must not depend on the umask
    try:
        files.apply(specs(), root=str(tmp_path))
    finally:
        os.umask(old)
    assert (tmp_path / "run/peerpod/apf.json").read_bytes() == b"{}\n"
    assert (tmp_path / "run/peerpod/apf.json").stat().st_mode & 0o7777 == 0o600
    assert (tmp_path / "run/peerpod/initdata.digest").stat().st_mode & 0o7777 == 0o644
    assert (tmp_path / "run/peerpod").stat().st_mode & 0o7777 == 0o755
    assert sorted(os.listdir(tmp_path / "run/peerpod")) == ["apf.json", "initdata.digest"]  # no temp files left


def test_replaces_existing_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "run/peerpod/apf.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    files.apply(specs(), root=str(tmp_path))
    assert target.read_bytes() == b"{}\n"
    assert target.stat().st_ino != inode  # renamed over, never truncated in place


def test_symlink_at_target_is_refused_and_nothing_written(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "run/peerpod"
    d.mkdir(parents=True)
    (d / "initdata.digest").symlink_to(victim)
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="symlink"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before  # apf.json (staged first) was rolled back too
    assert victim.read_bytes() == b"precious"


def test_symlink_in_a_parent_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/peerpod").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="symlink"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before
    assert os.listdir(elsewhere) == []


def test_directory_at_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run/peerpod/initdata.digest").mkdir(parents=True)
    with pytest.raises(WriteFailed, match="not a regular file"):
        files.apply(specs(), root=str(tmp_path))
    assert not (tmp_path / "run/peerpod/apf.json").exists()


def test_io_error_midway_leaves_nothing(tmp_path: Path) -> None:
    """A failure while staging the second file removes the first file's temp file."""
    (tmp_path / "run/peerpod").mkdir(parents=True)
    (tmp_path / "run/other").write_bytes(b"a file where a directory is needed")
    bad = [*specs(), FileSpec("/run/other/x", b"x")]
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed):
        files.apply(bad, root=str(tmp_path))
    assert snapshot(tmp_path) == before


def test_write_atomic_single_file(tmp_path: Path) -> None:
    files.write_atomic("/run/guest-agent/timeline.json", b"{}", root=str(tmp_path), mode=0o644)
    assert (tmp_path / "run/guest-agent/timeline.json").read_bytes() == b"{}"
