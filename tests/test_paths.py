"""Output file names are safe whatever an id says, and writes land atomically inside the out dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch_engine.store.files import output_relpath, safe_stem, write_atomic


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
