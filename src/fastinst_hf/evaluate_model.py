"""COCO mask AP and per-image inference time of a FastInst model on a COCO-format dataset.

Used by the trainer (`fastinst_hf.training`) for its periodic evaluation and by `scripts/evaluate.py`:

    python scripts/evaluate.py --model runs/x/final --coco-json val.json --images val_images/

It also runs under `accelerate launch` (the images are sharded over the processes and the results gathered).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .benchmark import synchronize
from .data import CocoInstanceDataset, FastInstCollator, FastInstEvalTransform
from .evaluation import METRIC_NAMES, CocoMaskEvaluator
from .image_processing_fastinst import FastInstImageProcessor


def processor_for_config(config) -> FastInstImageProcessor:
    """The image processor that matches a model config (test-time resize and number of detections)."""
    return FastInstImageProcessor(
        size={"shortest_edge": config.test_shortest_edge, "longest_edge": config.test_longest_edge},
        num_detections=config.num_detections,
    )


def build_eval_dataset(
    annotation_file: str | Path, image_dir: str | Path, processor: FastInstImageProcessor
) -> CocoInstanceDataset:
    """Every image of a COCO file (also those without annotations), resized as `processor` does at test time.

    The resize is the dataset's PIL resize (the official detectron2 one); the processor only post-processes.
    """
    size = processor.size
    return CocoInstanceDataset(
        annotation_file,
        image_dir,
        transform=FastInstEvalTransform(size.shortest_edge, size.longest_edge),
        filter_empty=False,
    )


def build_eval_dataloader(dataset: CocoInstanceDataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=FastInstCollator()
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor: FastInstImageProcessor,
    dataloader,
    evaluator: CocoMaskEvaluator,
    accelerator=None,
    threshold: float = 0.0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Run `model` over `dataloader` and return COCO mask AP plus timings.

    Args:
        model: a `FastInstForInstanceSegmentation` (unwrapped; it is put in eval mode and left there).
        processor: post-processes the outputs (`post_process_instance_segmentation`) to masks at the original size.
        dataloader: batches from `FastInstCollator` (prepared by `accelerator` when distributed, so that
            `evaluator.update` can drop the samples duplicated to even out the last batch).
        evaluator: a fresh or reset `CocoMaskEvaluator` (with the same `accelerator` to gather across processes).
        threshold: minimum final score of a kept instance; 0 keeps the top-`num_detections` pairs, as upstream.
        device: where to move the batch when `accelerator` is None (a prepared dataloader moves it itself).

    Returns:
        `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in percent, `"ms_per_image"` (forward + post-processing),
        `"model_ms_per_image"`, `"postprocess_ms_per_image"` (wall-clock, averaged over every image of every
        process at the dataloader's batch size) and `"num_images"` (evaluated images, without duplicates).
    """
    model.eval()
    evaluator.reset()
    device = accelerator.device if accelerator is not None else (device or next(model.parameters()).device)
    model_seconds = post_seconds = 0.0
    images_seen = 0
    for batch in dataloader:
        pixel_values = batch["pixel_values"].to(device)
        synchronize(device)
        start = time.perf_counter()
        outputs = model(pixel_values=pixel_values)
        synchronize(device)
        middle = time.perf_counter()
        predictions = processor.post_process_instance_segmentation(
            outputs,
            threshold=threshold,
            target_sizes=batch["orig_sizes"],
            image_sizes=batch["image_sizes"],
            return_binary_maps=True,
        )
        synchronize(device)
        end = time.perf_counter()
        model_seconds += middle - start
        post_seconds += end - middle
        images_seen += pixel_values.shape[0]
        evaluator.update(batch["image_ids"], predictions)
    totals = torch.tensor([model_seconds, post_seconds, float(images_seen)], dtype=torch.float64, device=device)
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    model_seconds, post_seconds, images_seen = totals.tolist()
    metrics = evaluator.compute()
    per_image = 1000.0 / max(images_seen, 1.0)
    metrics.update(
        ms_per_image=(model_seconds + post_seconds) * per_image,
        model_ms_per_image=model_seconds * per_image,
        postprocess_ms_per_image=post_seconds * per_image,
        num_images=float(len(evaluator.results)),
    )
    return metrics


def format_metrics(metrics: dict[str, float], batch_size: int = 1) -> str:
    """A two-line AP table with the per-image inference time beside it."""
    names = list(METRIC_NAMES) + ["ms/img", "model ms", "post ms"]
    values = [metrics[name] for name in METRIC_NAMES] + [
        metrics["ms_per_image"],
        metrics["model_ms_per_image"],
        metrics["postprocess_ms_per_image"],
    ]
    header = " | ".join(f"{name:>8}" for name in names)
    row = " | ".join("     nan" if math.isnan(v) else f"{v:8.2f}" for v in values)
    note = f"({int(metrics['num_images'])} images, batch size {batch_size}; ms = wall-clock per image)"
    return f"{header}\n{row}\n{note}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="COCO mask AP and per-image inference time of a saved FastInst model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (e.g. a run's final/)")
    parser.add_argument("--coco-json", required=True, help="COCO instances JSON with the ground truth")
    parser.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    parser.add_argument("--threshold", type=float, default=0.0, help="minimum instance score (0 = upstream)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = accelerate's choice (GPU if any)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="per process; upstream times batch size 1")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="autocast dtype for inference"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate import Accelerator

    from .modeling_fastinst import FastInstForInstanceSegmentation

    parser = build_parser()
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model: {model_dir} has no config.json (expected a folder written by save_pretrained)")
    if not Path(args.coco_json).is_file():
        parser.error(f"--coco-json: file not found: {args.coco_json}")
    if not Path(args.images).is_dir():
        parser.error(f"--images: folder not found: {args.images}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    model = FastInstForInstanceSegmentation.from_pretrained(model_dir)
    if (model_dir / "preprocessor_config.json").is_file():
        processor = FastInstImageProcessor.from_pretrained(model_dir)
    else:
        processor = processor_for_config(model.config)
        accelerator.print(f"{model_dir} has no preprocessor_config.json; using the config's test size {processor.size}")
    dataset = build_eval_dataset(args.coco_json, args.images, processor)
    if {int(k): v for k, v in model.config.id2label.items()} != dataset.id2label:
        accelerator.print(
            f"warning: the model's labels {model.config.id2label} differ from the dataset's {dataset.id2label}; "
            "predictions are mapped to category ids by label index"
        )
    model, dataloader = accelerator.prepare(model, build_eval_dataloader(dataset, args.batch_size, args.num_workers))
    evaluator = CocoMaskEvaluator(args.coco_json, dataset.label_to_category_id, accelerator=accelerator)
    metrics = evaluate(
        accelerator.unwrap_model(model), processor, dataloader, evaluator, accelerator, threshold=args.threshold
    )
    accelerator.print(f"model: {model_dir}  data: {args.coco_json}  device: {accelerator.device}")
    accelerator.print(format_metrics(metrics, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
