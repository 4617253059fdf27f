"""Atomic, resumable checkpoints (`accelerator.save_state` + trainer state) and the final model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.errors import InputError
from ..utils.files import atomic_write_text, swap_in_folder

if TYPE_CHECKING:
    from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# Settings that fix the data order / position semantics of a checkpoint; a resumed run must keep them.
RESUME_INVARIANTS = ("seed", "batch_size", "num_processes", "grad_accum", "max_steps")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint named by `output_dir/checkpoints/latest`, or None when there is none."""
    pointer = output_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    checkpoint = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not (checkpoint / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {checkpoint}, which is not a complete checkpoint")
    return checkpoint


def save_checkpoint(accelerator, output_dir: Path, trainer_state: dict, keep: int = 0) -> Path:
    """`accelerator.save_state` into `checkpoints/step_N` atomically; call on every process.

    Everything (model, optimiser, scheduler, per-process RNG states, `trainer_state.json`) is written into
    `checkpoints/.tmp_step_N` first; the main process then renames it to `step_N` and rewrites the `latest` pointer
    with an atomic replace. An interruption at any point leaves the previous checkpoint and `latest` valid.
    """
    root = output_dir / CHECKPOINTS
    name = f"step_{trainer_state['step']}"
    final, tmp = root / name, root / f".tmp_{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that crashed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2), sync=True)
        swap_in_folder(tmp, final)  # the same step may be saved again (e.g. a resumed run re-saving its end)
        atomic_write_text(root / LATEST, name + "\n", sync=True)
        if keep:
            done = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
            for old in done[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator, model: nn.Module, processor, output_dir: Path) -> Path:
    """`save_pretrained` of the model (safetensors) and the processor into `output_dir/final`, via a temp folder."""
    final_dir, tmp = output_dir / "final", output_dir / ".tmp_final"
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        swap_in_folder(tmp, final_dir)
        accelerator.print(f"saved the final model and processor to {final_dir}")
    accelerator.wait_for_everyone()
    return final_dir


def read_trainer_state(checkpoint: Path) -> dict:
    """The `trainer_state.json` of a checkpoint folder; raises `InputError` naming the file when it is unreadable or
    lacks the step, epoch, position in the epoch or the run settings."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--resume: cannot read {path}: {error}") from error
    ints = ("step", "epoch", "batches_in_epoch")
    if not (isinstance(state, dict) and all(isinstance(state.get(k), int) for k in ints)) or not isinstance(
        state.get("run"), dict
    ):
        raise InputError(f"--resume: {path} is not a trainer state (expected integers {', '.join(ints)} and 'run')")
    return state


def check_resume_compatible(saved: dict, current: dict, checkpoint: Path) -> None:
    changed = {k: (saved["run"].get(k), current[k]) for k in RESUME_INVARIANTS if saved["run"].get(k) != current[k]}
    if changed:
        details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise InputError(f"can not resume from {checkpoint}: settings that fix the data order changed ({details})")
