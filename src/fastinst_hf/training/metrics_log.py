"""The run's metrics: one JSONL row per logged step and evaluation, the same as CSV, and a plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..evaluation.coco_evaluator import METRIC_NAMES
from ..utils.files import atomic_write_text

MAIN_LOSS_TERMS = ("loss_ce", "loss_mask", "loss_dice", "loss_proposal")
CSV_COLUMNS = (
    ("step", "epoch", "loss")
    + MAIN_LOSS_TERMS
    + ("loss_aux", "lr", "lr_backbone", "steps_per_s", "elapsed_s")
    + METRIC_NAMES
    + ("ms_per_image",)
)


class MetricsLog:
    """`metrics.jsonl` (every value) and `metrics.csv` (`CSV_COLUMNS`) in the run folder, plus `metrics.png`.

    On resume, rows after the resumed step (written by the interrupted job after its last checkpoint) are dropped
    so that both files describe one consistent run.
    """

    def __init__(self, output_dir: Path, resume_step: int | None):
        self.jsonl = output_dir / "metrics.jsonl"
        self.csv = output_dir / "metrics.csv"
        self.png = output_dir / "metrics.png"
        self.records: list[dict] = []
        if resume_step is not None and self.jsonl.is_file():
            lines = self.jsonl.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= resume_step]
        atomic_write_text(self.jsonl, "".join(self._json_line(r) for r in self.records), sync=True)
        rows = [self._csv_row(r) for r in self.records]
        atomic_write_text(self.csv, ",".join(CSV_COLUMNS) + "\n" + "".join(rows))

    @staticmethod
    def _json_line(record: dict) -> str:
        # json.dumps writes NaN/Infinity bare, which is not JSON (e.g. COCO's APl is NaN without large objects).
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        return json.dumps(finite, allow_nan=False) + "\n"

    @staticmethod
    def _csv_row(record: dict) -> str:
        values = []
        for column in CSV_COLUMNS:
            value = record.get(column)
            if isinstance(value, float):
                values.append(f"{value:.6g}" if math.isfinite(value) else "")
            else:
                values.append("" if value is None else str(value))
        return ",".join(values) + "\n"

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(self._json_line(record))
        with open(self.csv, "a", encoding="utf-8") as f:
            f.write(self._csv_row(record))

    def plot(self) -> None:
        """Loss curves (total and main terms, log scale) and, when evaluated, mask AP against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if "AP" in r]
        if not train and not evals:
            return
        fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
        ax = axes[0][0]
        for key in ("loss",) + MAIN_LOSS_TERMS:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key, linewidth=2 if key == "loss" else 1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("training loss (weighted terms)")
        ax.legend(fontsize=8)
        if evals:
            ax = axes[0][1]
            for key in ("AP", "AP50", "AP75"):
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
            ax.set_xlabel("step")
            ax.set_title("validation mask AP (%)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = self.png.with_name(f".{self.png.stem}.tmp-{os.getpid()}.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)


def mean_losses(loss_sums: dict[str, torch.Tensor], count: int, accelerator) -> dict[str, float]:
    """Average the summed per-micro-batch losses over micro-batches and processes; adds `loss` and `loss_aux`."""
    names = sorted(loss_sums)
    values = torch.stack([loss_sums[name] for name in names]) / count
    values = accelerator.reduce(values, reduction="mean").tolist()
    losses = dict(zip(names, values))
    losses["loss"] = sum(values)
    losses["loss_aux"] = sum(v for k, v in zip(names, values) if k not in MAIN_LOSS_TERMS)
    return losses
