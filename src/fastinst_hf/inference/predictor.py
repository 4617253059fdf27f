"""The one predictor: every source (image, video file, URL, webcam) goes source -> preprocess -> runtime -> the
processor's `post_process_instance_segmentation` -> `FrameResult`s.

For videos, decoding + preprocessing run in a thread ahead of the model (a bounded queue, so memory does not grow
with the video); for live sources the model takes the newest frame and the frames it could not keep up with are
dropped and counted (`Predictor.dropped`).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from ..utils.device import select_device, synchronize
from ..utils.errors import InputError
from ..utils.images import load_image
from ..utils.packed_masks import PackedMasks
from ..utils.visualize import draw_instances
from .loading import load_model_and_processor
from .precision import choose_precision
from .resolve import cache_root
from .runtimes import AUTO, BF16_WEIGHTS, RUNTIMES, build_runtime, default_runtime, runtime_unavailable
from .sources import Source, VideoSource, collect_sources

MASK_THRESHOLD = 0.5
# Decoded + preprocessed frames waiting for the model (files); live sources keep only the newest one.
FRAME_QUEUE = 4


@dataclass
class FrameResult:
    """One segmented frame (an image is frame 0 at time 0.0). `masks` `(N, H, W)` bool (bit-packed), `labels` and
    `scores` `(N,)` by descending score, `track_ids` `(N,)` (None without tracking), `timings` in ms."""

    frame: int
    time: float
    image: np.ndarray
    masks: PackedMasks
    labels: list[int]
    scores: list[float]
    timings: dict[str, float]
    id2label: dict[int, str] = field(repr=False, default_factory=dict)
    track_ids: list[int | None] | None = None

    @cached_property
    def instances(self) -> list[dict]:
        """The image JSON's instance records (+ `track_id` when tracked)."""
        records = instances_to_records(self.masks, self.labels, self.scores, self.id2label)
        if self.track_ids is not None:
            for record, track_id in zip(records, self.track_ids):
                record["track_id"] = track_id
        return records

    @cached_property
    def overlay(self) -> Image.Image:
        """The frame with its instances drawn (track ids and one colour per track when tracked)."""
        image = Image.fromarray(self.image)
        return draw_instances(image, self.masks, self.labels, self.scores, self.id2label, track_ids=self.track_ids)


def choose_runtime(runtime: str, precision: str, device: torch.device) -> tuple[str, str]:
    """The runtime name for `runtime` ("auto" or a name) at `precision`, and the precision's one-line reason."""
    dtype, note = choose_precision("fp32" if precision == "auto" and runtime != AUTO else precision, device)
    if dtype == torch.float32:
        return (default_runtime(device) if runtime == AUTO else runtime), note
    if runtime not in (AUTO, BF16_WEIGHTS):
        raise InputError(f"--precision {precision}: bfloat16 weights run with --runtime {AUTO} or {BF16_WEIGHTS}")
    return BF16_WEIGHTS, note


class Predictor:
    """FastInst on any source. `model`: None (the embedded default), a name, a folder (see `resolve_model`).

    `runtime`: a name of `runtimes.RUNTIMES` or "auto" (the fastest torch setup for the device and precision).
    `precision`: "auto" (bfloat16 weights where the device has bf16 units and that split passed the accuracy rule,
    else float32; see `precision.choose_precision`, whose reason is `precision_note`), "fp32" or "bf16". An explicit
    `runtime` keeps its own precision under "auto".
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        threshold: float = 0.5,
        max_instances: int | None = None,
        track: bool = False,
        runtime: str = AUTO,
        precision: str = "auto",
    ):
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        self.threshold, self.max_instances, self.track = threshold, max_instances, track
        if runtime != AUTO and runtime not in RUNTIMES:
            raise InputError(f"--runtime: unknown runtime {runtime!r}; expected {AUTO} or one of {', '.join(RUNTIMES)}")
        self.runtime_name, self.precision_note = choose_runtime(runtime, precision, self.device)
        if reason := runtime_unavailable(RUNTIMES[self.runtime_name], self.device):
            raise InputError(f"--runtime {self.runtime_name}: {reason}")
        if track and importlib.util.find_spec("trackers") is None:
            raise InputError("--track needs the trackers package: pip install 'fastinst-hf[track]'")
        self.model, self.processor, self.model_dir = load_model_and_processor(model, self.device)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.runtime = build_runtime(self.runtime_name, self.model, cache_root() / "onnx")
        self.dropped = 0

    def preprocess(self, image: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        """`pixel_values` `(1, 3, h, w)` and `pixel_mask` `(1, h, w)` of one RGB image."""
        return self.processor(images=[image], return_tensors="pt")

    def inference(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        with torch.inference_mode():
            return self.runtime(pixel_values=pixel_values.to(self.device), pixel_mask=pixel_mask.to(self.device))

    def postprocess(self, outputs, sizes: list[tuple[int, int]]) -> list[tuple[PackedMasks, list, list]]:
        """Per image of the batch (original `(H, W)` in `sizes`): bit-packed masks, labels, scores (processor's
        public post-processing: non-empty masks by descending score, at most `max_instances`)."""
        results = self.processor.post_process_instance_segmentation(
            outputs,
            threshold=self.threshold,
            mask_threshold=MASK_THRESHOLD,
            target_sizes=sizes,
            return_packed_masks=True,
        )
        kept = []
        for result, size in zip(results, sizes):
            info = result["segments_info"][: self.max_instances]
            masks = PackedMasks.from_packed(result["segmentation"][: self.max_instances], size)
            kept.append((masks, [s["label_id"] for s in info], [s["score"] for s in info]))
        return kept

    def predict_images(self, images: list[Image.Image]) -> list[FrameResult]:
        """Segment a list of RGB PIL images in one batch per padded input size, so that every result is the one it
        gets alone (a smaller image padded to a larger one's size would see other zeros). Stage times are per image
        (each batch's time shared equally by its images)."""
        start = time.perf_counter()
        inputs = [self.preprocess(image) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(inputs):
            groups.setdefault(tuple(item["pixel_values"].shape), []).append(index)
        preprocessed = time.perf_counter()
        outputs = {}
        for indices in groups.values():
            batch = {key: torch.cat([inputs[i][key] for i in indices]) for key in ("pixel_values", "pixel_mask")}
            outputs[tuple(indices)] = self.inference(**batch)
        synchronize(self.device)
        inferred = time.perf_counter()
        found = {}
        for indices, output in outputs.items():
            sizes = [(images[i].height, images[i].width) for i in indices]
            found.update(zip(indices, self.postprocess(output, sizes)))
        done = time.perf_counter()
        per_image = 1000 / max(len(images), 1)
        timings = {
            "preprocess": (preprocessed - start) * per_image,
            "inference": (inferred - preprocessed) * per_image,
            "postprocess": (done - inferred) * per_image,
        }
        return [
            FrameResult(0, 0.0, np.asarray(image), *found[index], dict(timings), self.id2label)
            for index, image in enumerate(images)
        ]

    def predict_image(self, image: Image.Image) -> FrameResult:
        return self.predict_images([image.convert("RGB")])[0]

    def stream(self, source: str | os.PathLike | Source | VideoSource, vid_stride: int = 1) -> Iterator[FrameResult]:
        """Results of every `vid_stride`-th frame of `source` (an image, video file, URL, `webcam:N`, or an opened
        `VideoSource`), in order. A live source yields the newest frame each time and counts the others in
        `self.dropped`."""
        if vid_stride < 1:
            raise ValueError(f"vid_stride must be >= 1, got {vid_stride}")
        if not isinstance(source, VideoSource):
            source = source if isinstance(source, Source) else collect_sources([str(source)])[0]
            if source.kind == "image":
                yield self.predict_image(load_image(Path(source.spec)))
                return
            source = VideoSource(source)
        with _Decoder(self, source, vid_stride) as frames:
            tracker = self._tracker(float(source.rate) / vid_stride) if self.track else None
            try:
                for index, frame_time, rgb, inputs, preprocess_ms in frames:
                    yield self._frame_result(index, frame_time, rgb, inputs, preprocess_ms, tracker)
            finally:
                self.dropped = frames.dropped

    def _tracker(self, fps: float):
        from .tracking import InstanceTracker

        return InstanceTracker(fps, self.threshold)

    def predict_frame(self, rgb: np.ndarray, frame: int = 0, frame_time: float = 0.0) -> FrameResult:
        """Segment one `(H, W, 3)` uint8 RGB video frame (preprocess + network + post-processing, untracked)."""
        start = time.perf_counter()
        inputs = self.preprocess(rgb)
        return self._frame_result(frame, frame_time, rgb, inputs, (time.perf_counter() - start) * 1000, None)

    def _frame_result(self, index, frame_time, rgb, inputs, preprocess_ms, tracker) -> FrameResult:
        start = time.perf_counter()
        outputs = self.inference(inputs["pixel_values"], inputs["pixel_mask"])
        synchronize(self.device)
        inferred = time.perf_counter()
        masks, labels, scores = self.postprocess(outputs, [rgb.shape[:2]])[0]
        track_ids = tracker.update(masks, scores) if tracker is not None else None
        timings = {
            "preprocess": preprocess_ms,
            "inference": (inferred - start) * 1000,
            "postprocess": (time.perf_counter() - inferred) * 1000,
        }
        return FrameResult(index, frame_time, rgb, masks, labels, scores, timings, self.id2label, track_ids)


class _Decoder:
    """Decodes and preprocesses a video's frames in a thread, ahead of the model. Iterating yields
    `(index, time, rgb, inputs, preprocess ms)`; a decoding error ends it early (see `VideoSource.error`), any other
    error of the thread is raised in the consumer. Leaving the `with` block stops the thread and closes the video."""

    _END = object()

    def __init__(self, predictor: Predictor, video: VideoSource, vid_stride: int):
        self.predictor, self.video, self.vid_stride = predictor, video, vid_stride
        self.queue: queue.Queue = queue.Queue(maxsize=1 if video.live else FRAME_QUEUE)
        self.stop = threading.Event()
        self.dropped = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fastinst-decode", daemon=True)

    def __enter__(self) -> _Decoder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a put on a full queue
            self._drain()
            self.thread.join(timeout=0.05)
        self.video.close()

    def _drain(self) -> None:
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        try:
            for index, frame_time, rgb in self.video:
                if self.stop.is_set():
                    return
                if index % self.vid_stride:
                    continue
                start = time.perf_counter()
                inputs = self.predictor.preprocess(rgb)
                self._put((index, frame_time, rgb, inputs, (time.perf_counter() - start) * 1000))
        except BaseException as error:  # handed to the consumer, which raises it
            self.error = error
        finally:
            self._put(self._END, final=True)

    def _put(self, item, final: bool = False) -> None:
        if self.video.live and not final:
            try:  # the model takes the newest frame: the one it has not taken yet is dropped
                self.queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item


def segment_video(source, model=None, vid_stride: int = 1, **predictor_kwargs) -> Iterator[FrameResult]:
    """`Predictor(model, **predictor_kwargs).stream(source, vid_stride)`: a generator of `FrameResult`s."""
    return Predictor(model, **predictor_kwargs).stream(source, vid_stride)


def instances_to_records(masks, labels, scores, id2label) -> list[dict]:
    """JSON records of instances: label id and name, score, COCO RLE (str counts), bbox [x, y, w, h] and area."""
    records = []
    for index, (mask, label, score) in enumerate(zip(masks, labels, scores)):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        records.append(
            {
                "id": index,
                "label_id": int(label),
                "label": id2label.get(int(label), str(int(label))),
                "score": round(float(score), 6),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "area": int(mask_util.area(rle)),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return records
