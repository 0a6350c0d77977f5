"""Atomic outputs: a folder appears whole or not at all, and a failure leaves the disk as it was."""
import pytest

from edgeloop.io import atomic_dir


def test_a_failed_stage_leaves_no_folder_and_no_parents_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("the stage failed")
    assert not (tmp_path / "kept" / "new").exists() and (tmp_path / "kept").is_dir()
    assert list((tmp_path / "kept").iterdir()) == []


def test_success_renames_into_place_and_overwrite_replaces(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("one")
    assert (out / "f").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "f").write_text("two")
            raise RuntimeError("failed")
    assert (out / "f").read_text() == "one" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "f").write_text("two")
    assert (out / "f").read_text() == "two" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
