"""Resolve a model name given on the command line to a local folder written by `save_pretrained`.

A name is one of:

- `None` or `"default"` (`DEFAULT_NAME`): the small demo model embedded in the package (`fastinst_hf.DEFAULT_MODEL`,
  trained on synthetic shapes); a local folder called `default` is passed as `./default`;
- an existing local folder holding a FastInst `config.json`;
- an official release name from `VARIANTS` (e.g. `fastinst-d1-r50`): the checkpoint is downloaded from the official
  GitHub release into `~/.cache/fastinst_hf/<variant>/` (`FASTINST_HF_CACHE` overrides the root), converted once
  into `<variant>/converted/`, and that folder is reused afterwards;
- anything else: a Hugging Face Hub repo id, fetched with `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .. import DEFAULT_MODEL, DEMO_IMAGES, releases
from ..configuration_fastinst import FastInstConfig
from ..conversion.official import (
    CheckpointConversionError,
    convert_checkpoint,
    official_checkpoint_url,
    save_converted,
)
from ..releases import VARIANTS
from ..utils.errors import InputError
from ..utils.files import atomic_path

DEFAULT_NAME = "default"
DEFAULT_MODEL_DIR = Path(DEFAULT_MODEL)
DEMO_IMAGE_DIR = Path(DEMO_IMAGES[0]).parent


class ModelResolutionError(InputError):
    """A model name that cannot be turned into a usable local FastInst folder; the message says why and what to do."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the converted-checkpoint cache: `cache_dir`, else `$FASTINST_HF_CACHE`, else `~/.cache/fastinst_hf`."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("FASTINST_HF_CACHE"):
        return Path(os.environ["FASTINST_HF_CACHE"])
    return Path.home() / ".cache" / "fastinst_hf"


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return `path` if it is a folder with a FastInst `config.json`, else raise `ModelResolutionError`."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ModelResolutionError(f"model folder not found: {path}")
    if not config_file.is_file():
        raise ModelResolutionError(
            f"{path} is not a model folder: it has no config.json (expected a folder written by save_pretrained "
            "or `fastinst-hf convert`)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ModelResolutionError(f"{config_file} is not a valid JSON config: {error}") from error
    if model_type != FastInstConfig.model_type:
        raise ModelResolutionError(
            f"{path} is not a FastInst model: config.json has model_type {model_type!r}, expected "
            f"{FastInstConfig.model_type!r}"
        )
    return path


def _looks_like_path(name: str) -> bool:
    # Hub repo ids are "name" or "owner/name"; anything with a path prefix or more separators is meant as a folder.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def variant_config(variant: str) -> FastInstConfig:
    """Architecture of an official release (a separate function so that tests can substitute a small one)."""
    return releases.variant_config(variant)


def download_file(url: str, destination: Path, timeout: float = 60.0) -> Path:
    """Download `url` to `destination` atomically (a partial file never takes the final name), with a progress bar."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as partial:
        with open(partial, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, leave=False) as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
    return destination


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it exists and is empty (a failed first download must not leave an empty cache folder)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def fetch_official_model(
    variant: str,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    config: FastInstConfig | None = None,
) -> Path:
    """Download (once) and convert (once) an official release checkpoint; return the converted folder.

    Args:
        variant: a name from `VARIANTS`; it names the cache folder.
        cache_dir: cache root (see `cache_root`).
        url: checkpoint address, defaults to the official release URL of `variant`.
        config: architecture to convert into, defaults to `variant_config(variant)`.
    """
    variant_dir = cache_root(cache_dir) / variant
    converted_dir = variant_dir / "converted"
    if (converted_dir / "config.json").is_file():
        return check_model_dir(converted_dir)
    if variant not in VARIANTS:
        raise ModelResolutionError(f"unknown FastInst variant {variant!r}; choose one of {sorted(VARIANTS)}")
    url = url or official_checkpoint_url(variant)
    checkpoint = variant_dir / VARIANTS[variant]["checkpoint"]
    if not checkpoint.is_file():
        try:
            download_file(url, checkpoint)
        except (urllib.error.URLError, OSError) as error:
            remove_if_empty(variant_dir)
            raise ModelResolutionError(
                f"could not download the official {variant} checkpoint from {url} ({error}). Without network access, "
                f"download that file by other means, then run `fastinst-hf convert --checkpoint FILE --variant "
                f"{variant} --output-dir DIR` and pass `--model DIR`."
            ) from error
    try:
        model = convert_checkpoint(checkpoint, config=config if config is not None else variant_config(variant))
    except CheckpointConversionError as error:
        # A broken download must not be reused: the next call downloads it again.
        checkpoint.unlink()
        remove_if_empty(variant_dir)
        raise ModelResolutionError(f"the downloaded {variant} checkpoint could not be converted: {error}") from error
    # Convert into a temporary folder and rename it, so that an interrupted run never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(dir=variant_dir, prefix=".converted-"))
    try:
        save_converted(model, staging)
        staging.rename(converted_dir)
    except OSError:
        # Another process finished the same conversion first: keep its folder.
        if not (converted_dir / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return check_model_dir(converted_dir)


def fetch_hub_model(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local snapshot of a Hub repo (from the Hugging Face cache when offline and already downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir)
    except HFValidationError as error:
        raise ModelResolutionError(
            f"{repo_id!r} is neither a local folder, nor an official variant ({', '.join(sorted(VARIANTS))}), nor a "
            f"valid Hub repo id: {error}"
        ) from error
    except (OSError, ValueError) as error:
        # huggingface_hub's HTTP, offline-mode and not-found errors are OSError or ValueError subclasses.
        raise ModelResolutionError(
            f"could not load {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). It is not a "
            f"local folder nor an official variant ({', '.join(sorted(VARIANTS))}); check the name, the network, and "
            "that HF_HUB_OFFLINE is unset, or pass a local folder."
        ) from error
    return check_model_dir(path)


def resolve_model(name: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local folder of the model called `name` (see the module docstring); raises `ModelResolutionError`."""
    if name is None or name == DEFAULT_NAME:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelResolutionError(
                f"the embedded default model is missing from this installation ({DEFAULT_MODEL_DIR}); pass --model"
            )
        return check_model_dir(DEFAULT_MODEL_DIR)
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.exists():
        return check_model_dir(path)
    if name in VARIANTS:
        return fetch_official_model(name, cache_dir)
    if _looks_like_path(name):
        raise ModelResolutionError(f"model folder not found: {path}")
    return fetch_hub_model(name)
