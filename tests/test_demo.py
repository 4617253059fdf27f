"""The Gradio demo app: served in a subprocess, called with gradio_client and loaded in headless chromium; the Space
folder's app."""

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastinst_hf
from fastinst_hf.cli import main

gradio = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="the demo extra (gradio_client) is not installed")

from fastinst_hf.demo.app import MAX_IMAGE_PIXELS, open_upload  # noqa: E402
from fastinst_hf.demo.card import DEMO_MODEL_WARNING, card_facts  # noqa: E402
from fastinst_hf.hub.model_card import render_model_card  # noqa: E402
from fastinst_hf.utils.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not serve {url} within {STARTUP_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`fastinst-hf demo` on a free port of 127.0.0.1 (one process for the module: gradio starts slowly)."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastinst_hf.cli", "demo", "--device", "cpu", "--port", str(port)]
    with log.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def predicted_records(source: Path, tmp_path: Path, threshold: float) -> list[dict]:
    """The instance records `fastinst-hf predict` writes for the image `source`."""
    out = tmp_path / f"predict_{source.stem}_{threshold}"
    assert main(["predict", str(source), "--device", "cpu", "--threshold", str(threshold), "--output", str(out)]) == 0
    return json.loads((out / f"{source.stem}.json").read_text())["instances"]


def assert_same_instances(served: list[dict], predicted: list[dict]) -> None:
    assert [r["label"] for r in served] == [r["label"] for r in predicted]
    for a, b in zip(served, predicted):
        assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"] and a["area"] == b["area"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


@pytest.mark.parametrize("index, threshold", [(0, 0.5), (1, 0.3)])
def test_image_endpoint_finds_the_instances_of_predict(client, tmp_path, index, threshold):
    path = Path(fastinst_hf.DEMO_IMAGES[index])
    overlay, table, summary, records = client.predict(
        gradio_client.handle_file(str(path)), threshold, api_name="/segment_image"
    )
    predicted = predicted_records(path, tmp_path, threshold)
    assert predicted, "the embedded model finds shapes in its demo images"
    assert_same_instances(records, predicted)
    assert [row[1] for row in table["data"]] == [r["label"] for r in predicted]
    assert [row[4] for row in table["data"]] == [r["area"] for r in predicted]
    assert f"{len(predicted)} instance(s)" in summary and all(s in summary for s in ("preprocess", "inference", " ms"))
    assert Image.open(overlay).size == Image.open(path).size


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 6-frame clip of the demo images (each twice), written with the project's VideoWriter."""
    from fastinst_hf.inference.video import VideoWriter

    path = tmp_path_factory.mktemp("clip") / "shapes.mp4"
    with VideoWriter(path, 10, 256, 256) as writer:
        for image in fastinst_hf.DEMO_IMAGES:
            for _ in range(2):
                writer.write(np.asarray(Image.open(image).convert("RGB")))
    return path


@pytest.mark.parametrize("track", [True, False])
def test_video_endpoint_finds_the_instances_of_predict(client, clip, tmp_path, track):
    video, lines, summary = client.predict(gradio_client.handle_file(str(clip)), 0.5, track, api_name="/segment_video")
    served = [json.loads(line) for line in Path(lines).read_text().splitlines()]
    out = tmp_path / "predict"
    argv = ["predict", str(clip), "--device", "cpu", "--output", str(out), *(["--track"] if track else [])]
    assert main(argv) == 0
    predicted = [json.loads(line) for line in (out / "shapes.jsonl").read_text().splitlines()]
    assert [f["frame"] for f in served] == [f["frame"] for f in predicted] == list(range(6))
    for a, b in zip(served, predicted):
        assert_same_instances(a["instances"], b["instances"])
        assert [r.get("track_id") for r in a["instances"]] == [r.get("track_id") for r in b["instances"]]
    assert all("track_id" in r for f in served for r in f["instances"]) == track
    assert summary.startswith(f"6 frame(s), tracking {'on' if track else 'off'}")
    import av

    with av.open(video) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 256, 256)
        assert sum(1 for _ in container.decode(stream)) == 6


def test_bad_uploads_get_a_message_and_the_app_keeps_serving(client, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.png"):
        client.predict(gradio_client.handle_file(str(not_an_image)), 0.5, api_name="/segment_image")
    with pytest.raises(gradio_client.exceptions.AppError, match="could not segment the clip notes.mp4: "):
        shutil.copy(not_an_image, tmp_path / "notes.mp4")
        client.predict(gradio_client.handle_file(str(tmp_path / "notes.mp4")), 0.5, True, api_name="/segment_video")
    _, _, summary, records = client.predict(
        gradio_client.handle_file(fastinst_hf.DEMO_IMAGES[0]), 0.5, api_name="/segment_image"
    )
    assert records and f"{len(records)} instance(s)" in summary


def test_a_huge_image_is_refused_with_its_size(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, MAX_IMAGE_PIXELS // 8000 + 1)).save(path)
    with pytest.raises(InputError, match=r"huge.png is 8000 x \d+ pixels, more than this demo's limit"):
        open_upload(str(path))


def test_card_facts_name_the_classes_and_warn_about_the_demo_model():
    config = fastinst_hf.FastInstConfig.from_pretrained(fastinst_hf.DEFAULT_MODEL)
    facts = card_facts(Path(fastinst_hf.DEFAULT_MODEL), config)
    assert DEMO_MODEL_WARNING in facts and "ellipse, rectangle, triangle" in facts
    assert "synthetic coloured shapes" in facts  # where the weights came from, from its model card


def test_card_facts_of_a_converted_model_name_its_official_release(tmp_path):
    config = fastinst_hf.FastInstConfig.from_pretrained(fastinst_hf.DEFAULT_MODEL)
    (tmp_path / "README.md").write_text(render_model_card(config, "me/fastinst-d3", variant="fastinst-d3-r50"))
    facts = card_facts(tmp_path, config)
    assert "official `fastinst-d3-r50` (COCO mask AP 37.9)" in facts
    assert "converted from the official release `fastinst_R50_ppm-fpn_x3_640_37.9.pth`" in facts
    assert DEMO_MODEL_WARNING not in facts


def test_webcam_frames_are_segmented_with_the_achieved_frame_rate():
    from fastinst_hf.demo.app import DemoRunner
    from fastinst_hf.inference.predictor import Predictor

    runner = DemoRunner(Predictor(None, device="cpu"))
    frame = np.asarray(Image.open(fastinst_hf.DEMO_IMAGES[0]).convert("RGB"))
    expected = runner.predictor.predict_image(Image.fromarray(frame)).instances
    for _ in range(3):
        overlay, line = runner.webcam(frame, 0.5)
    assert overlay.size == (256, 256) and f"{len(expected)} instance(s)" in line
    achieved = float(re.match(r"achieved (\d+\.\d) frames/s", line).group(1))
    assert achieved > 0 and len(runner.webcam_times[""]) >= 2  # the frames of the last FPS_WINDOW_S, at least 2


def test_video_outputs_of_old_requests_are_removed(monkeypatch):
    from fastinst_hf.demo import app

    monkeypatch.setattr(app, "KEPT_VIDEO_JOBS", 2)
    runner = app.DemoRunner(predictor=None)
    folders = [runner._job_folder() for _ in range(3)]
    assert [folder.is_dir() for folder in folders] == [False, True, True]
    for folder in folders[1:]:
        folder.rmdir()


def test_space_app_builds_the_app_with_the_embedded_model(monkeypatch):
    monkeypatch.setenv("FASTINST_MODEL", "default")
    spec = importlib.util.spec_from_file_location("space_app", REPO / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.app, gradio.Blocks)
    markdown = [block.value for block in module.app.blocks.values() if isinstance(block, gradio.Markdown)]
    assert any(DEMO_MODEL_WARNING in (text or "") for text in markdown)
    front_matter = (REPO / "spaces" / "README.md").read_text().split("---")[1]
    assert re.search(r"^sdk: gradio$", front_matter, re.MULTILINE) and "app_file: app.py" in front_matter


def wait_for_value(probe, timeout: float, what: str):
    """The first truthy value of `probe()`, polled until `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what} did not come within {timeout} s")


class Chromium:
    """Headless chromium driven through its DevTools protocol (one page, commands answered in order)."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 1500):
        from websockets.sync.client import connect

        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0"]
        command += [f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        log = profile.with_name("chromium.log")
        with log.open("w") as stream:  # a file, not a pipe: chromium never blocks on a full pipe
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stream)
        address = wait_for_value(lambda: re.search(r"ws://([^/]+)/", log.read_text()), 30, "chromium's DevTools")[1]
        pages = json.load(urllib.request.urlopen(f"http://{address}/json/list", timeout=10))
        page = next(p for p in pages if p["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.count = 0

    def call(self, method: str, **params) -> dict:
        self.count += 1
        self.socket.send(json.dumps({"id": self.count, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.count:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        return wait_for_value(lambda: self.evaluate(expression), timeout, f"the page's {expression!r}")

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


OVERLAY_IMG = "document.querySelector('#image-overlay img')"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (.ci/run installs it with apt)")
def test_browser_runs_the_image_example_and_shows_the_overlay(server, client, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=server)
        browser.wait_for("document.querySelector('#image-examples tbody tr') !== null")
        browser.evaluate("document.querySelector('#image-examples tbody tr').click()")
        browser.wait_for(f"{OVERLAY_IMG} && {OVERLAY_IMG}.complete && {OVERLAY_IMG}.naturalWidth > 0")
        summary = browser.wait_for("(document.querySelector('#image-summary') || {}).innerText")
        box = browser.evaluate(
            f"JSON.stringify(Object.assign({OVERLAY_IMG}.getBoundingClientRect().toJSON(), "
            f"{{fit: getComputedStyle({OVERLAY_IMG}).objectFit}}))"
        )
        shot = browser.screenshot()
    finally:
        browser.close()
    shot.save(tmp_path / "demo_screenshot.png")
    overlay_path, _, expected_summary, _ = client.predict(
        gradio_client.handle_file(fastinst_hf.DEMO_IMAGES[0]), 0.5, api_name="/segment_image"
    )
    assert summary.split(" · ")[0] == expected_summary.split(" · ")[0]  # "2 instance(s)"
    # The overlay as drawn in the page (centred in the img box by its object-fit) is the one the API returns.
    rect = json.loads(box)
    overlay = Image.open(overlay_path)
    scale = min(rect["width"] / overlay.width, rect["height"] / overlay.height)
    scale = min(scale, 1.0) if rect["fit"] in ("scale-down", "none") else scale
    width, height = round(overlay.width * scale), round(overlay.height * scale)
    left, top = rect["x"] + (rect["width"] - width) / 2, rect["y"] + (rect["height"] - height) / 2
    shown = shot.crop((round(left), round(top), round(left) + width, round(top) + height))
    expected = overlay.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    difference = np.abs(np.asarray(shown, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).mean()
    assert difference < 12, f"the page's overlay differs from the served one by {difference:.1f} per channel"
