"""Finding and reading the images named on the command line."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from .errors import InputError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def collect_image_paths(sources: Sequence[str]) -> list[Path]:
    """Expand every SOURCE (image file, folder, or glob pattern) into image paths, in order, without opening them.

    A folder contributes its files with an image extension (not recursive), sorted by name; a glob pattern its
    matches with an image extension (`**` recurses). An explicitly named file is taken whatever its extension.
    Raises `InputError` for a missing file, a folder without images or a pattern without image matches.
    """
    paths: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(entry for entry in path.iterdir() if entry.is_file() and is_image_name(entry.name))
            if not found:
                raise InputError(f"no images in folder {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(source):
            found = sorted(
                Path(match)
                for match in glob.glob(os.path.expanduser(source), recursive=True)
                if os.path.isfile(match) and is_image_name(match)
            )
            if not found:
                raise InputError(f"no images match the pattern {source!r}")
        else:
            raise InputError(f"input not found: {source}")
        paths.extend(found)
    return paths


def load_image(path: Path) -> Image.Image:
    """The image at `path` as an RGB PIL image, EXIF orientation applied; raises `OSError` naming an unreadable file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
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
