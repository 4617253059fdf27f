"""Device selection and synchronisation for timing."""

import torch

from .errors import InputError


def select_device(name: str) -> torch.device:
    """`torch.device` for `--device` (`auto` picks CUDA when available); `InputError` if CUDA is asked but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so wall-clock times need it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
