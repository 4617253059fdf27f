"""The COCO mask AP `evaluate` module: `evaluate.load(METRIC_PATH)`."""

from pathlib import Path

METRIC_PATH = str(Path(__file__).with_name("coco_mask_ap.py"))

__all__ = ["METRIC_PATH"]
