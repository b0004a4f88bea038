"""Output file names are safe whatever an id says, and writes land atomically inside the out dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from batch_engine.store.files import (
    output_relpath,
    remove_temp_files,
    replace_atomically,
    safe_stem,
    write_atomic,
)


@pytest.mark.parametrize("item_id", ["sku-1001", "a.b_c-9"])
def test_plain_ids_keep_their_name(item_id: str) -> None:
    """An id made of safe characters is used as the file stem unchanged."""
    assert safe_stem(item_id) == item_id


@pytest.mark.parametrize("item_id", ["../../etc/passwd", "a/b", "a b", "ünï", ".hidden", "C:\\x", ""])
def test_unsafe_ids_become_safe_and_distinct(item_id: str) -> None:
    """An id with separators, dots or non-ASCII becomes a plain stem with a hash of the original."""
    stem = safe_stem(item_id)
    assert stem
    assert "/" not in stem
    assert "\\" not in stem
    assert not stem.startswith(".")
    assert stem != safe_stem(item_id + "x")


def test_ids_that_clean_up_alike_get_different_files() -> None:
    """Two ids that clean up to the same text never share an output file."""
    assert output_relpath("a/b", 0, "png") != output_relpath("a_b", 0, "png")


def test_write_atomic_leaves_only_the_finished_file(tmp_path: Path) -> None:
    """A write leaves the complete file and no temporary file beside it."""
    path = write_atomic(tmp_path, "images/x-1.png", b"data")
    assert path.read_bytes() == b"data"
    assert [p.name for p in path.parent.iterdir()] == ["x-1.png"]


@pytest.mark.parametrize("relpath", ["../x", "/etc/x", "images/../../x", "a\\b", ""])
def test_write_atomic_refuses_paths_outside_the_out_dir(tmp_path: Path, relpath: str) -> None:
    """A relative path that could leave the out dir is refused before anything is written."""
    with pytest.raises(ValueError, match="outside the out dir"):
        write_atomic(tmp_path / "out", relpath, b"data")
    assert not (tmp_path / "out").exists()


def test_leftover_temporary_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A killed write's temporary files (and older versions' .report.yaml.<hex>.tmp) are removed; other
    files, folders and whatever a symlinked folder points at are left alone."""
    (tmp_path / ".tmp-report.yaml.0a1b2c3d").write_text("half")
    (tmp_path / ".report.yaml.0a1b2c3d.tmp").write_text("half")
    (tmp_path / ".results.jsonl.99999999.tmp").write_text("half")
    (tmp_path / "report.yaml").write_text("whole")
    (tmp_path / ".tmp-dir").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".tmp-keep").write_text("not ours")
    (tmp_path / "linked").symlink_to(elsewhere)
    assert remove_temp_files(tmp_path) == 3
    assert remove_temp_files(tmp_path / "linked") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-dir", "elsewhere", "linked", "report.yaml"]
    assert (elsewhere / ".tmp-keep").exists()


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """Outputs and reports are created 0666 less the umask, like any file the user writes."""
    old = os.umask(0o022)
    try:
        output = write_atomic(tmp_path, "images/x-1.png", b"data")
        with replace_atomically(tmp_path / "report.yaml") as stream:
            stream.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(output.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "report.yaml").stat().st_mode) == 0o644


def test_a_planted_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    """Writing a file whose name is a symlink replaces the link; the file it pointed at is untouched."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").symlink_to(target)
    with replace_atomically(tmp_path / "out" / "results.jsonl") as stream:
        stream.write("new\n")
    assert target.read_text() == "keep me"
    assert not (tmp_path / "out" / "results.jsonl").is_symlink()
