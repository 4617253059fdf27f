"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves the old one intact."""

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


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


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder that exists and is writable or can be created; raises `InputError` naming `option`
    otherwise. Nothing is created: a run that fails before writing leaves no empty folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {path} cannot be created: {existing} is not a folder")
    try:  # a real write: permission bits do not tell for root, read-only mounts or /proc
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(
            f"{option} {path} is not writable: cannot create a file in {existing} ({error.strerror})"
        ) from error
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a file that can be written (its folder exists or can be created); raises `InputError` naming
    `option` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder (expected a file name)")
    check_output_folder(path.absolute().parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {path} is not writable")
    return path
