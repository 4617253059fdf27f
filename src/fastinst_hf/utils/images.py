"""Finding and reading the images named on the command line."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
