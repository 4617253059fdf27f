"""`predict` on videos, URLs and bad video inputs, with the embedded model on a clip of moving synthetic shapes."""

import contextlib
import errno
import io
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from fastinst_hf.cli import main
from fastinst_hf.data.coco import encode_mask
from fastinst_hf.data.synthetic import moving_shapes_frames
from fastinst_hf.evaluation.coco_evaluator import CocoMaskEvaluator
from fastinst_hf.inference import sources
from fastinst_hf.inference.predictor import Predictor, segment_video
from fastinst_hf.inference.sources import VideoSource
from fastinst_hf.inference.video import VideoWriter

FRAMES, FPS, SIZE = 16, 8, (256, 256)  # the embedded model's training image size


def write_clip(path: Path, frames: int = FRAMES, size=SIZE, seed: int = 0) -> list:
    """Write the moving-shapes clip (H.264) and return its `(image, masks, labels)` frames."""
    clip = list(moving_shapes_frames(frames, size, seed=seed))
    with VideoWriter(path, FPS, size[1], size[0]) as writer:
        for image, _, _ in clip:
            writer.write(image)
    return clip


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def video_info(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(decoded frame count, frame rate, (height, width)) of a video file: decoding all of it proves it plays."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return len(frames), float(stream.average_rate), frames[0].shape[:2] if frames else (0, 0)


def predict(*args) -> int:
    return main(["predict", *map(str, args), "--device", "cpu"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder / "clip.mp4", write_clip(folder / "clip.mp4")


@pytest.fixture(scope="module")
def video_run(clip):
    """The clip through `predict --track`: the output folder."""
    out = clip[0].parent / "out"
    assert predict(clip[0], "--output", out, "--track") == 0
    return out


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range requests (as every real web server; FFmpeg seeks to an MP4's moov atom)."""

    def send_head(self):
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first, _, last = spec.removeprefix("bytes=").partition("-")
        first, last = int(first or 0), min(int(last) if last else size - 1, size - 1)
        handle = path.open("rb")
        handle.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.range_left = last - first + 1
        return handle

    def copyfile(self, source, outputfile):
        left = getattr(self, "range_left", None)
        while left is None or left > 0:
            chunk = source.read(65536 if left is None else min(65536, left))
            if not chunk:
                return
            outputfile.write(chunk)
            left = None if left is None else left - len(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(clip):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(clip[0].parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_overlay_and_jsonl_have_the_frames_rate_and_size_of_the_input(video_run):
    assert video_info(video_run / "clip_overlay.mp4") == (FRAMES, FPS, SIZE)
    lines = read_lines(video_run / "clip.jsonl")
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["time"] for line in lines] == pytest.approx([i / FPS for i in range(FRAMES)])
    instance = lines[0]["instances"][0]
    assert set(instance) == {"id", "label_id", "label", "score", "bbox", "area", "segmentation", "track_id"}


def mask_ap(records_per_frame: list[list[dict]], clip) -> float:
    """COCO mask AP of per-frame instance records against the clip's visible masks."""
    images = [{"id": i + 1, "height": SIZE[0], "width": SIZE[1]} for i in range(len(clip))]
    annotations = []
    for index, (_, masks, labels) in enumerate(clip):
        for mask, label in zip(masks, labels):
            rle = encode_mask(mask)
            area, bbox = float(mask_util.area(rle)), [float(v) for v in mask_util.toBbox(rle)]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1, "iscrowd": 0}
                | {"segmentation": rle, "area": area, "bbox": bbox}
            )
    categories = [{"id": k + 1, "name": str(k)} for k in range(3)]
    evaluator = CocoMaskEvaluator({"images": images, "annotations": annotations, "categories": categories}, {0: 1})
    evaluator.label_to_category_id = {k: k + 1 for k in range(3)}
    for index, records in enumerate(records_per_frame):
        encoded = {
            "counts": [r["segmentation"]["counts"] for r in records],
            "labels": [r["label_id"] for r in records],
            "scores": [r["score"] for r in records],
            "height": SIZE[0],
            "width": SIZE[1],
        }
        evaluator.add_encoded(index + 1, encoded)
    return evaluator.compute()["AP"]


def test_per_frame_ap_is_close_to_the_ap_of_the_same_frames_as_png_images(clip, video_run, tmp_path):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for index, (image, _, _) in enumerate(clip[1]):
        Image.fromarray(image).save(frames_dir / f"{index:03d}.png")
    assert predict(frames_dir, "--output", tmp_path / "png_out") == 0
    png = [json.loads((tmp_path / "png_out" / f"{i:03d}.json").read_text())["instances"] for i in range(FRAMES)]
    video = [line["instances"] for line in read_lines(video_run / "clip.jsonl")]
    video_ap, png_ap = mask_ap(video, clip[1]), mask_ap(png, clip[1])
    assert png_ap > 50, png_ap  # the model finds the shapes: the comparison means something
    assert abs(video_ap - png_ap) <= 5, (video_ap, png_ap)  # H.264's loss costs little


def test_tracking_keeps_one_id_per_object(clip, video_run):
    lines = read_lines(video_run / "clip.jsonl")
    ids_per_object: dict[int, list] = {}
    for line, (_, masks, _) in zip(lines, clip[1]):
        predicted = [r["segmentation"] for r in line["instances"]]
        truth = [encode_mask(mask) for mask in masks]
        ious = np.asarray(mask_util.iou(truth, predicted, [0] * len(predicted))).reshape(len(truth), -1)
        for index, row in enumerate(ious):
            if row.size and row.max() >= 0.5:
                ids_per_object.setdefault(index, []).append(line["instances"][int(row.argmax())]["track_id"])
    assert len(ids_per_object) == 3
    for index, ids in ids_per_object.items():
        assert len(ids) >= 0.8 * FRAMES, (index, ids)
        most = max(set(ids) - {None}, key=ids.count)
        assert ids.count(most) >= 0.9 * len(ids), (index, ids)
    assert len({max(set(ids) - {None}, key=ids.count) for ids in ids_per_object.values()}) == 3
    assert video_info(video_run / "clip_overlay.mp4")[0] == FRAMES


def test_the_clip_served_over_http_gives_the_same_results(clip, video_run, http_root, tmp_path):
    assert predict(f"{http_root}/clip.mp4", "--output", tmp_path, "--track") == 0
    over_http, from_file = read_lines(tmp_path / "clip.jsonl"), read_lines(video_run / "clip.jsonl")
    assert [line["instances"] for line in over_http] == [line["instances"] for line in from_file]
    assert video_info(tmp_path / "clip_overlay.mp4") == (FRAMES, FPS, SIZE)


def test_segment_video_yields_frame_results(clip):
    results = list(segment_video(clip[0], device="cpu", vid_stride=5))
    assert [r.frame for r in results] == [0, 5, 10, 15]
    assert [r.time for r in results] == pytest.approx([0, 5 / FPS, 10 / FPS, 15 / FPS])
    assert results[0].image.shape == (*SIZE, 3) and results[0].overlay.size == SIZE[::-1]
    assert results[0].instances and "track_id" not in results[0].instances[0]
    assert set(results[0].timings) == {"preprocess", "inference", "postprocess"}


def test_ctrl_c_leaves_a_playable_overlay_with_as_many_frames_as_jsonl_lines(tmp_path, capsys):
    write_clip(tmp_path / "long.mp4", frames=400, size=(64, 64))
    jsonl = tmp_path / "out" / "long.jsonl"

    def press_ctrl_c():  # as a terminal does: SIGINT to the process, KeyboardInterrupt in its main thread
        deadline = time.monotonic() + 120
        while not (jsonl.is_file() and jsonl.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    assert predict(tmp_path / "long.mp4", "--output", tmp_path / "out") == 130
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "interrupted: wrote 1 of 1 input(s)" in stderr
    lines = read_lines(jsonl)
    frames, _, size = video_info(tmp_path / "out" / "long_overlay.mp4")
    assert 2 <= len(lines) == frames < 400 and size == (64, 64)


def silent_server() -> socket.socket:
    """A TCP port that accepts connections and never answers (a stalled stream)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, clip):
    """One `predict` run over every bad video input and a good image: `(exit status, stderr, output folder)`."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text.mp4").write_text("not a video")
    full = clip[0].read_bytes()
    (root / "cut.mp4").write_bytes(full[: len(full) // 2])  # moov at the end: nothing decodes
    write_clip(root / "whole.mkv", frames=12, size=(64, 64))
    (root / "short.mkv").write_bytes((root / "whole.mkv").read_bytes()[:-2000])  # MKV decodes up to the cut
    with av.open(str(root / "zero.mkv"), "w") as container:  # a video stream with no frame
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 64
        container.start_encoding()
    Image.fromarray(clip[1][0][0]).save(root / "good.png")
    listener = silent_server()
    names = ["text.mp4", "cut.mp4", "short.mkv", "zero.mkv", "good.png"]
    inputs = [root / name for name in names]
    inputs += ["http://127.0.0.1:9/nothing.mp4", f"http://127.0.0.1:{listener.getsockname()[1]}/stall.mp4"]
    inputs += ["webcam:57"]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as stderr:
        patch.setattr(sources, "OPEN_TIMEOUT_S", 1.0)
        patch.setattr(sources, "READ_TIMEOUT_S", 1.0)
        code = predict(*inputs, "--output", root / "out")
    listener.close()
    return code, stderr.getvalue(), root / "out"


BAD_CASES = {
    "not a video": ("text.mp4", "cannot read video"),
    "truncated mp4": ("cut.mp4", "cannot read video"),
    "zero frames": ("zero.mkv", "no frames"),
    "unreachable url": ("127.0.0.1:9/nothing.mp4", "Connection refused"),
    "stalled stream": ("stall.mp4", "cannot read video"),
    "no webcam": ("webcam:57", "no webcam"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_video_input_is_named_on_one_line_and_the_others_are_done(bad_run, case):
    code, stderr, out = bad_run
    name, message = BAD_CASES[case]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ") and name in line]
    assert code == 1 and "Traceback" not in stderr
    assert any(message in line for line in lines if not line.startswith("error: 7 of")), stderr
    assert (out / "good.json").is_file() and (out / "good_overlay.png").is_file()
    assert not (out / f"{Path(name).stem}.jsonl").exists()


def test_truncated_clip_keeps_the_decoded_frames_with_one_warning(bad_run):
    code, stderr, out = bad_run
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "short.mkv" in warnings[0], stderr
    lines = read_lines(out / "short.jsonl")
    assert 1 <= len(lines) < 12 and video_info(out / "short_overlay.mp4")[0] == len(lines)


def test_full_disk_ends_with_one_line_and_a_finalised_overlay(clip, tmp_path, monkeypatch, capsys):
    real_write = VideoWriter.write

    def write(self, rgb):
        if self.frames == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, rgb)

    monkeypatch.setattr(VideoWriter, "write", write)
    assert predict(clip[0], "--output", tmp_path) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "cannot write" in stderr and "No space left on device" in stderr
    assert len(read_lines(tmp_path / "clip.jsonl")) == video_info(tmp_path / "clip_overlay.mp4")[0] == 3


def test_predictor_predict_image_matches_its_stream_of_an_image(tmp_path, clip):
    Image.fromarray(clip[1][0][0]).save(tmp_path / "frame.png")
    predictor = Predictor(device="cpu")
    (streamed,) = list(predictor.stream(tmp_path / "frame.png"))
    direct = predictor.predict_image(Image.open(tmp_path / "frame.png"))
    assert streamed.instances == direct.instances and (streamed.frame, streamed.time) == (0, 0.0)


@pytest.mark.slow  # two processes, each importing torch and loading the model: a minute on a loaded 2-core machine
def test_accelerate_launch_shares_the_inputs_between_processes(clip, tmp_path):
    for index in range(3):
        Image.fromarray(clip[1][index * 5][0]).save(tmp_path / f"frame{index}.png")
    inputs = [str(tmp_path / f"frame{index}.png") for index in range(3)] + [str(clip[0])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    env["ACCELERATE_USE_CPU"] = "1"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastinst_hf.cli", "predict", *inputs]
    done = subprocess.run(
        [*launch, "--output", str(tmp_path / "shared"), "--device", "cpu"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("process: 1 of 2") == 1 and done.stdout.count("process: 2 of 2") == 1, done.stdout
    for name in inputs:  # each input done by one process
        assert sum(line.startswith(f"{name}:") for line in done.stdout.splitlines()) == 1, done.stdout
    assert predict(*inputs, "--output", tmp_path / "single") == 0
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == single
    for name in single:
        if name.endswith(".json"):
            shared, alone = (json.loads((tmp_path / d / name).read_text()) for d in ("shared", "single"))
            assert shared["instances"] == alone["instances"], name
        elif name.endswith(".jsonl"):
            shared, alone = (read_lines(tmp_path / d / name) for d in ("shared", "single"))
            assert [line["instances"] for line in shared] == [line["instances"] for line in alone], name


def test_benchmark_video_prints_end_to_end_next_to_model_only_fps(tmp_path, capsys):
    argv = ["benchmark", "--video", "--video-frames", "3", "--runs", "2", "--device", "cpu"]
    assert main([*argv, "--json", str(tmp_path / "video.json")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"end-to-end [\d.]+ frames/s .* model-only [\d.]+ frames/s .* end-to-end / model-only", printed)
    result = json.loads((tmp_path / "video.json").read_text())
    assert result["frames"] == 3 and result["ratio"] > 0 and result["runtime"] == "eager"


def test_video_strip_script_writes_the_tracked_overlays_side_by_side(tmp_path, monkeypatch):
    script = Path(__file__).parents[1] / "scripts" / "video_strip.py"
    argv = [str(script), "--output", str(tmp_path / "strip.png"), "--frames", "4", "--step", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert Image.open(tmp_path / "strip.png").size == (2 * SIZE[1] + 6, SIZE[0])  # frames 1 and 3


class FakeCamera(VideoSource):
    """A live source that delivers 30 frames at once, far faster than the model takes them."""

    def __init__(self):
        self.live, self.rate, self.frames, self.error = True, Fraction(30), 0, None
        self.clip = [image for image, _, _ in moving_shapes_frames(30, (64, 64))]

    def __iter__(self):
        for index, image in enumerate(self.clip):
            yield index, index / 30, image

    def close(self):
        pass


def test_a_live_source_gives_the_model_the_newest_frame_and_counts_the_dropped_ones():
    predictor = Predictor(device="cpu")
    frames = [result.frame for result in predictor.stream(FakeCamera())]
    assert frames == sorted(set(frames)) and frames[-1] == 29 and len(frames) < 30
    assert predictor.dropped == 30 - len(frames)
