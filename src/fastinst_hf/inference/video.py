"""Writing videos: H.264 MP4 (yuv420p, playable everywhere) through PyAV, and the per-video outputs of `predict`
(`<stem>_overlay.mp4` + `<stem>.jsonl`) written by a thread as frames finish."""

from __future__ import annotations

import json
import queue
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np

# Frames waiting for the encoder thread (drawn overlays are the memory that counts).
ENCODE_QUEUE = 4


class VideoWriter:
    """`with VideoWriter(path, fps, width, height) as writer: writer.write(rgb)` for `(height, width, 3)` uint8 RGB
    frames. yuv420p needs even sizes: an odd width or height is padded by one pixel (the edge repeated). Closing
    flushes the encoder and finalises the file, so it plays whatever stopped the writing."""

    def __init__(self, path: str | Path, fps: float | Fraction, width: int, height: int, crf: int = 23):
        import av

        self.path = Path(path)
        self.width, self.height = width, height
        self.container = av.open(str(self.path), mode="w")
        rate = Fraction(fps).limit_denominator(1001 * 1000)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"frame must be ({self.height}, {self.width}, 3), got {rgb.shape}")
        if self.width % 2 or self.height % 2:
            rgb = np.pad(rgb, ((0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
        frame.pts = self.frames
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoOutputs:
    """`<stem>_overlay.mp4` and `<stem>.jsonl` of one video, written by a thread from `FrameResult`s handed to
    `put`: the overlay frame is encoded, then its JSON line written and flushed, so every line's frame is in the
    video. `close` writes what is queued, flushes the encoder and finalises the MP4 (also after Ctrl-C).

    A write error (full disk) stops the writing; `close` then raises it as an `OSError` naming the file.
    """

    _END = object()

    def __init__(self, stem: Path, fps, width: int, height: int):
        self.video_path = stem.with_name(f"{stem.name}_overlay.mp4")
        self.jsonl_path = stem.with_name(f"{stem.name}.jsonl")
        self.writer = VideoWriter(self.video_path, fps, width, height)
        self.lines = self.jsonl_path.open("w", encoding="utf-8")
        self.written = 0
        self.error: OSError | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=ENCODE_QUEUE)
        self.thread = threading.Thread(target=self._run, name="fastinst-encode", daemon=True)
        self.thread.start()

    def put(self, result) -> None:
        """Queue a `FrameResult` (blocks while the encoder is `ENCODE_QUEUE` frames behind); raises the writer's
        error once it has one."""
        if self.error is not None:
            raise self.error
        self.queue.put(result)

    def _run(self) -> None:
        while (result := self.queue.get()) is not self._END:
            if self.error is not None:
                continue  # keep taking items so that `put` never blocks on a dead writer
            try:
                self.writer.write(np.asarray(result.overlay))
                self._write_line(result)
            except OSError as error:
                self.error = error

    def _write_line(self, result) -> None:
        record = {
            "frame": result.frame,
            "time": result.time,
            "timing_ms": {name: round(value, 3) for name, value in result.timings.items()},
            "instances": result.instances,
        }
        self.lines.write(json.dumps(record) + "\n")
        self.lines.flush()
        self.written += 1

    def close(self) -> None:
        self.queue.put(self._END)
        self.thread.join()
        try:
            self.lines.close()
            self.writer.close()
        except OSError as error:
            self.error = self.error or error
        if self.error is not None:
            raise self.error
