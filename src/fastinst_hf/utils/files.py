"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one intact."""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix, so writers that pick a format from it still work); when the
    block succeeds it is renamed to `path`, otherwise deleted. Files get the usual permissions (umask)."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_bytes(path: str | os.PathLike, payload: bytes, sync: bool = False) -> Path:
    """Write `payload` to `path` atomically; `sync` also flushes it to disk before the rename."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(payload)
            if sync:
                file.flush()
                os.fsync(file.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, sync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), sync=sync)


def swap_in_folder(new: Path, target: Path) -> None:
    """Rename the folder `new` to `target`, replacing an existing `target`.

    The old `target` is moved aside and deleted only after the rename, so a crash at any point leaves a complete
    folder at `target` or at `.old_<name>` next to it; deleting `target` first could leave none.
    """
    old = target.with_name(f".old_{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)  # left over by an earlier interrupted swap; `target` is complete
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)  # also one left over when a crash came right after moving it aside
