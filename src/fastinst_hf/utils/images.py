"""Finding and reading the images named on the command line."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def collect_image_paths(sources: Sequence[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Expand every SOURCE (image file, folder, or glob pattern) into image paths, in order, without opening them.

    A folder contributes its files with an image extension (one of `extensions`; not recursive), sorted by name; a
    glob pattern its matches with such an extension (`**` recurses, not into symlinked folders). An explicitly named file is taken
    whatever its extension. A file reached twice (same real path) is listed once, where it first appears.
    Raises `InputError` for a missing file, a folder without images or a pattern without image matches.
    """
    paths: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(
                entry for entry in path.iterdir() if entry.is_file() and entry.name.lower().endswith(extensions)
            )
            if not found:
                raise InputError(f"no images in folder {source} (looked for {', '.join(extensions)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(source):
            found = sorted(
                match
                for match in expand_pattern(source)
                if match.is_file() and str(match).lower().endswith(extensions) and not match.name.startswith(".")
            )
            if not found:
                raise InputError(f"no images match the pattern {source!r} (looked for {', '.join(extensions)})")
        else:
            raise InputError(f"input not found: {source}")
        paths.extend(found)
    # The same file reached twice (two sources, or a symlink) is segmented once.
    unique = {os.path.realpath(path): path for path in reversed(paths)}
    return [path for path in paths if unique[os.path.realpath(path)] is path]


def expand_pattern(pattern: str) -> Iterator[Path]:
    """Matches of a glob pattern (`**` recurses) without following symlinks to folders while recursing: a link to
    a parent folder would otherwise make the walk endless."""
    parts = Path(os.path.expanduser(pattern)).parts
    first_magic = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path()
    # pathlib's `**` does not descend into symlinked folders (Python 3.13: recurse_symlinks=False, the default).
    return root.glob(str(Path(*parts[first_magic:])))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit grayscale (PIL modes "I;16*", and "I" as 16-bit PNGs may open) is scaled with
    `round(x / 257)` as the image processor scales uint16 arrays; `convert("RGB")` would clip it to white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """The image at `path` as an RGB PIL image, EXIF orientation applied; raises `OSError` naming an unreadable file."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {one_line(error)}") from error


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems per image; a repeated stem (same name in two folders) gets `-2`, `-3`, ... appended."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems
