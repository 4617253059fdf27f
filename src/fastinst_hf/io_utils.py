"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one intact."""

import os
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
