"""Atomic writes: the old file survives a failed write, and new files get the usual permissions."""

import os
import stat

import pytest

from fastinst_hf.utils.files import atomic_path, atomic_write_text


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_written_file_follows_the_umask_and_keeps_the_suffix(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "overlay.png") as temporary:
            assert temporary.suffix == ".png" and temporary.parent == tmp_path
            temporary.write_bytes(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "overlay.png").stat().st_mode) == 0o644
