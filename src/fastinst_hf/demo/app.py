"""The Gradio demo: an image tab, a video tab and a webcam tab, all run by the project's one `Predictor`.

`build_app(model)` returns the `gr.Blocks`; `fastinst-hf demo` and the Space's `app.py` launch it. Bad input (a file
that is no image, an image over `MAX_IMAGE_PIXELS`, an unreadable clip) becomes a `gr.Error`: a message in the page,
and the app goes on serving. The model runs one request at a time (a lock): on a CPU, two at once would only share
its cores.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import gradio as gr
from PIL import Image

from .. import DEMO_IMAGES
from ..inference.predictor import Predictor
from ..inference.sources import VideoSource
from ..inference.video import VideoOutputs
from ..utils.errors import InputError, one_line
from ..utils.images import load_image
from .card import card_facts

MAX_IMAGE_PIXELS = 40_000_000  # a 8000 x 5000 photo; larger ones are refused (memory of the masks and the overlay)
MAX_VIDEO_FRAMES = 900  # the video tab segments at most this many frames of a clip (30 s at 30 fps)
TABLE_HEADERS = ["id", "label", "score", "box (x, y, w, h)", "area"]
STAGES = ("preprocess", "inference", "postprocess")
FPS_WINDOW_S = 2.0  # the webcam's achieved frames/s is counted over the last seconds (at least the last 2 frames)
KEPT_WEBCAM_SESSIONS = 64  # browser sessions whose webcam frame times are kept
KEPT_VIDEO_JOBS = 8  # output folders of the last video requests kept (gradio copies each into its cache)


def stage_line(timings: dict) -> str:
    """'preprocess 3.1 ms · inference 20.4 ms · postprocess 1.2 ms'."""
    return " · ".join(f"{stage} {timings[stage]:.1f} ms" for stage in STAGES if stage in timings)


def instance_rows(instances: list[dict]) -> list[list]:
    """The table rows of instance records: id, label, score, box, area."""
    return [
        [r["id"], r["label"], round(r["score"], 3), ", ".join(f"{v:.0f}" for v in r["bbox"]), r["area"]]
        for r in instances
    ]


def open_upload(path: str | None) -> Image.Image:
    """The uploaded image as RGB; `InputError` for no file, a file that is no image, or one over the size limit."""
    if not path:
        raise InputError("no image: upload one or pick an example")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{Path(path).name} is not a readable image: {one_line(error)}") from error
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{Path(path).name} is {width} x {height} pixels, more than this demo's limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: scale it down"
        )
    try:
        return load_image(Path(path))
    except OSError as error:
        raise InputError(one_line(error)) from error


class DemoRunner:
    """The handlers of the page around one `Predictor`; each request sets the threshold (and tracking) it asks for
    under the lock."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.lock = threading.Lock()
        self.video_jobs: deque[Path] = deque()
        self.webcam_times: dict[str, deque[float]] = {}

    def configure(self, threshold: float, track: bool = False) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {threshold}")
        self.predictor.threshold = float(threshold)
        self.predictor.track = bool(track)

    def image(self, path: str | None, threshold: float):
        """Image tab: (overlay, table rows, stage times, instance records)."""
        try:
            image = open_upload(path)
            with self.lock:
                self.configure(threshold)
                result = self.predictor.predict_image(image)
                overlay = result.overlay
        except InputError as error:
            raise gr.Error(one_line(error)) from error
        except (RuntimeError, ValueError) as error:  # e.g. out of memory: the next request may fit
            raise gr.Error(f"could not segment the image: {one_line(error)}") from error
        summary = f"{len(result.instances)} instance(s) · {stage_line(result.timings)}"
        return overlay, instance_rows(result.instances), summary, result.instances

    def video(self, path: str | None, threshold: float, track: bool, progress=gr.Progress()):  # noqa: B008 (gradio injects it)
        """Video tab: (overlay video, per-frame instances JSONL, summary), the files `fastinst-hf predict` writes
        for a video."""
        if not path:
            raise gr.Error("no video: upload a clip")
        stem = self._job_folder() / Path(path).stem
        try:
            with self.lock:
                self.configure(threshold, track)
                outputs, timings = self._segment_video(VideoSource(path), stem, progress)
        except (OSError, RuntimeError, ValueError) as error:  # unreadable clip (InputError is a ValueError), OOM
            raise gr.Error(f"could not segment the clip {Path(path).name}: {one_line(error)}") from error
        frames = outputs.written
        mean = {stage: sum(t[stage] for t in timings) / frames for stage in STAGES}
        summary = (
            f"{frames} frame(s), tracking {'on' if track else 'off'}"
            f"{f' (the first {MAX_VIDEO_FRAMES})' if frames == MAX_VIDEO_FRAMES else ''} · mean {stage_line(mean)}"
        )
        return str(outputs.video_path), str(outputs.jsonl_path), summary

    def _job_folder(self) -> Path:
        """A new temporary folder for a video's outputs; the oldest beyond `KEPT_VIDEO_JOBS` are removed, so that a
        long-running app does not fill the disk."""
        folder = Path(tempfile.mkdtemp(prefix="fastinst_demo_"))
        with self.lock:
            self.video_jobs.append(folder)
            while len(self.video_jobs) > KEPT_VIDEO_JOBS:
                shutil.rmtree(self.video_jobs.popleft(), ignore_errors=True)
        return folder

    def _segment_video(self, video: VideoSource, stem: Path, progress) -> tuple[VideoOutputs, list[dict]]:
        """Segment up to `MAX_VIDEO_FRAMES` frames of `video` into `<stem>_overlay.mp4` + `<stem>.jsonl`; returns
        the finished outputs and the frames' stage times."""
        total = min(video.frames, MAX_VIDEO_FRAMES) or None
        outputs, timings = None, []
        results = self.predictor.stream(video)
        try:
            for result in results:
                if outputs is None:
                    height, width = result.image.shape[:2]
                    outputs = VideoOutputs(stem, video.rate, width, height)
                outputs.put(result)
                timings.append(result.timings)
                progress((len(timings), total), desc="segmenting", unit="frames")
                if len(timings) == MAX_VIDEO_FRAMES:
                    break
        finally:
            results.close()
            video.close()
            if outputs is not None:
                outputs.close()
        return outputs, timings

    def webcam(self, frame, threshold: float, request: gr.Request = None):
        """Webcam tab: one streamed frame (RGB array) -> (overlay, achieved-fps line). The completion times are
        kept per browser session (gradio's session hash)."""
        if frame is None:
            return None, "waiting for the camera"
        with self.lock:
            self.configure(threshold)
            result = self.predictor.predict_image(Image.fromarray(frame))
            overlay = result.overlay
        achieved = self._frame_done(request.session_hash if request is not None else "")
        line = f"achieved {achieved:.1f} frames/s · {len(result.instances)} instance(s) · {stage_line(result.timings)}"
        return overlay, line

    def _frame_done(self, session: str) -> float:
        """Record a finished frame of `session`; returns its frames/s over the last `FPS_WINDOW_S` (at least the
        last two frames, for a model slower than the window)."""
        now = time.perf_counter()
        with self.lock:
            done = self.webcam_times.pop(session, None) or deque()
            self.webcam_times[session] = done  # most recent session last
            while len(self.webcam_times) > KEPT_WEBCAM_SESSIONS:
                self.webcam_times.pop(next(iter(self.webcam_times)))
        done.append(now)
        while len(done) > 2 and now - done[0] > FPS_WINDOW_S:
            done.popleft()
        return (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0


def build_app(model=None, device: str = "auto", predictor: Predictor | None = None) -> gr.Blocks:
    """The demo page for `model` (a name or folder as `--model` takes; None: the embedded demo model)."""
    predictor = predictor or Predictor(model, device=device)
    runner = DemoRunner(predictor)
    with gr.Blocks(title="FastInst instance segmentation") as app:
        gr.Markdown(
            "# FastInst: real-time instance segmentation\n" + card_facts(predictor.model_dir, predictor.model.config)
        )
        with gr.Tab("Image"):
            image_tab(runner)
        with gr.Tab("Video"):
            video_tab(runner)
        with gr.Tab("Webcam"):
            webcam_tab(runner)
    return app


def threshold_slider() -> gr.Slider:
    return gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="score threshold")


def image_tab(runner: DemoRunner) -> None:
    with gr.Row():
        with gr.Column() as examples_column:
            upload = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"], height=360)
            threshold = threshold_slider()
            button = gr.Button("Segment", variant="primary")
        with gr.Column():
            overlay = gr.Image(type="pil", label="overlay", elem_id="image-overlay", format="png", height=360)
            summary = gr.Markdown(elem_id="image-summary")
    table = gr.Dataframe(headers=TABLE_HEADERS, label="instances", interactive=False)
    with gr.Accordion("instance records (JSON, as `fastinst-hf predict` writes them)", open=False):
        records = gr.JSON(label="instances")
    outputs = [overlay, table, summary, records]
    with examples_column:
        gr.Examples(
            [[path, 0.5] for path in DEMO_IMAGES],
            inputs=[upload, threshold],
            outputs=outputs,
            fn=runner.image,
            run_on_click=True,
            cache_examples=False,
            label="bundled examples (synthetic shapes): click one to segment it",
            elem_id="image-examples",
        )
    button.click(runner.image, [upload, threshold], outputs, api_name="segment_image")


def video_tab(runner: DemoRunner) -> None:
    with gr.Row():
        with gr.Column():
            upload = gr.Video(label="clip", sources=["upload"])
            threshold = threshold_slider()
            track = gr.Checkbox(value=True, label="track instances across frames (track ids)")
            button = gr.Button("Segment the clip", variant="primary")
        with gr.Column():
            overlay = gr.Video(label="overlay", elem_id="video-overlay")
            summary = gr.Markdown()
            records = gr.File(label="per-frame instances (JSON)")
    button.click(runner.video, [upload, threshold, track], [overlay, records, summary], api_name="segment_video")


def webcam_tab(runner: DemoRunner) -> None:
    gr.Markdown(
        "Each camera frame is segmented as it comes; while the model is busy only the newest frame waits, the others "
        "are dropped, not queued, so the overlay stays live."
    )
    with gr.Row():
        camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="camera")
        overlay = gr.Image(type="pil", label="overlay")
    threshold = threshold_slider()
    rate = gr.Markdown()
    # trigger_mode "always_last": while a frame is being segmented, only the newest frame waits (the others are
    # dropped), so the overlay follows the camera instead of a growing queue.
    camera.stream(
        runner.webcam,
        [camera, threshold],
        [overlay, rate],
        stream_every=0.05,
        trigger_mode="always_last",
        concurrency_limit=1,
        api_name="segment_webcam_frame",
    )
