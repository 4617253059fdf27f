"""End-to-end video frames/s (what `predict` does on a clip) next to model-only frames/s on the same frames.

- end-to-end: decode (thread) -> preprocess + network + post-processing -> overlay drawing, H.264 encoding and JSONL
  (thread), from opening the clip to the finalised MP4;
- model-only: preprocess + network + post-processing of the same frames, decoded beforehand, one after the other.
Both run `rounds` times alternately (machine-load drifts hit both alike); the best round of each is reported.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..data.synthetic import moving_shapes_frames
from ..inference.sources import VideoSource
from ..inference.video import VideoOutputs, VideoWriter


def synthetic_clip(path: Path, frames: int, size: tuple[int, int] = (256, 256), fps: int = 30) -> Path:
    """The moving-shapes clip the tests use (the embedded model's training distribution), H.264."""
    with VideoWriter(path, fps, size[1], size[0]) as writer:
        for image, _, _ in moving_shapes_frames(frames, size):
            writer.write(image)
    return path


def end_to_end_seconds(predictor, clip: Path, output_stem: Path) -> tuple[float, int]:
    """Seconds for `predict`'s path over `clip` into `<output_stem>_overlay.mp4` + `.jsonl`, and the frame count."""
    start = time.perf_counter()
    video = VideoSource(str(clip))
    outputs = None
    for result in predictor.stream(video):
        if outputs is None:
            outputs = VideoOutputs(output_stem, video.rate, result.image.shape[1], result.image.shape[0])
        outputs.put(result)
    outputs.close()
    return time.perf_counter() - start, outputs.written


def model_only_seconds(predictor, frames: list) -> float:
    start = time.perf_counter()
    for rgb in frames:
        predictor.predict_frame(rgb)
    return time.perf_counter() - start


def run_video_benchmark(predictor, clip: Path | None = None, frames: int = 60, rounds: int = 2) -> dict:
    """Frames/s end-to-end and model-only on `clip` (default: a synthetic clip of `frames` frames)."""
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        clip = clip or synthetic_clip(workdir / "clip.mp4", frames)
        decoded = [rgb for _, _, rgb in VideoSource(str(clip))]
        predictor.predict_frame(decoded[0])  # warm-up (first-call allocations)
        end_to_end, model_only = [], []
        for _ in range(rounds):
            seconds, count = end_to_end_seconds(predictor, clip, workdir / "out")
            end_to_end.append(count / seconds)
            model_only.append(len(decoded) / model_only_seconds(predictor, decoded))
    height, width = decoded[0].shape[:2]
    best_end_to_end, best_model_only = max(end_to_end), max(model_only)
    return {
        "clip": str(clip) if clip.parent != workdir else f"synthetic moving shapes ({len(decoded)} frames)",
        "frames": len(decoded),
        "size_hw": [height, width],
        "runtime": predictor.runtime_name,
        "device": str(predictor.device),
        "end_to_end_fps": end_to_end,
        "model_only_fps": model_only,
        "ratio": best_end_to_end / best_model_only,
    }


def format_video_result(result: dict) -> str:
    return (
        f"video: {result['clip']}, {result['frames']} frames {result['size_hw'][1]}x{result['size_hw'][0]}, "
        f"runtime {result['runtime']} on {result['device']}\n"
        f"end-to-end {max(result['end_to_end_fps']):.2f} frames/s (decode + model + overlay + H.264 + JSONL) | "
        f"model-only {max(result['model_only_fps']):.2f} frames/s (preprocess + network + post-processing) | "
        f"end-to-end / model-only {result['ratio']:.2f}"
    )
