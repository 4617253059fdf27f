"""`fastinst-hf predict`: segment images, videos, URLs and webcams through the one `Predictor`.

Per image `<stem>_overlay.png` and `<stem>.json`; per video, URL or webcam `<stem>_overlay.mp4` (H.264, the input's
frame rate / `--vid-stride` and size) and `<stem>.jsonl` (one line per processed frame, with `frame` and `time`),
both written as frames finish. Exit status 1 when some inputs could not be read or segmented: each is named, the
others are still processed (a truncated clip keeps the frames decoded before the damage, with a warning). The output
folder is checked before the model is loaded; a write error (read-only folder, full disk) ends the run with a one-line
error naming the file (the video written so far is finalised). Ctrl-C ends it with a one-line summary (exit 130): the
image files are complete (atomic writes) and a video's overlay is finalised with as many frames as JSONL lines. A
closed stdout (`... | head -1`) silences the progress lines, and the outputs are still written.

Under `accelerate launch -m fastinst_hf.cli predict ...` the inputs are shared out between the processes (each one
done once, the outputs those of a single process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..inference.runtimes import AUTO, RUNTIMES
from ..utils.arguments import HelpFormatter
from ..utils.errors import InputError, one_line
from ..utils.files import atomic_path, atomic_write_text, check_output_folder
from .options import add_device_argument, add_model_argument

DEFAULT_OUTPUT_DIR = "fastinst_predictions"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "predict",
        help="segment images, videos, URLs and webcams; writes overlays and JSON / JSONL",
        description="Segment images (<stem>_overlay.png + <stem>.json each) and videos, URLs and webcams "
        "(<stem>_overlay.mp4 + <stem>.jsonl each).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="image or video file, folder, quoted glob pattern, http(s):// or rtsp:// URL, or webcam:N (camera N)",
    )
    add_model_argument(parser)
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum instance score")
    add_device_argument(parser)
    parser.add_argument("--output", default=DEFAULT_OUTPUT_DIR, help="output folder")
    parser.add_argument("--max-instances", type=int, default=None, help="keep at most this many per image / frame")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per forward pass (results are those of batch size 1)"
    )
    parser.add_argument("--vid-stride", type=int, default=1, help="process every N-th frame of a video")
    parser.add_argument(
        "--track", action="store_true", help="persistent track_id per instance across video frames (ByteTrack)"
    )
    parser.add_argument(
        "--runtime",
        choices=(AUTO, *RUNTIMES),
        default=AUTO,
        help="how the network runs (the runtimes of `fastinst-hf benchmark`); auto: eager on the CPU "
        "(the model as loaded, which in eval mode folds its batch norms into oneDNN convolutions with their ReLUs "
        "fused, the fastest torch path there), folded on CUDA; onnxruntime / openvino (optional package): the model's ONNX graph on "
        "the CPU, exported once per model (about a minute) under the cache root ($FASTINST_HF_CACHE, else "
        "~/.cache/fastinst_hf)/onnx",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bfloat16 weights (backbone) where the device has bf16 units and that split passes the accuracy "
        "rule (README Speed), else float32; the choice is printed. An explicit --runtime keeps its own precision",
    )
    parser.set_defaults(run=run)


def validate(args: argparse.Namespace) -> None:
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be in [0, 1], got {args.threshold}")
    for option in ("max_instances", "batch_size", "vid_stride"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    from ..inference.predictor import Predictor
    from ..inference.sources import collect_sources
    from ..utils.images import unique_stems

    sources = collect_sources(args.sources)
    jobs = list(zip(sources, unique_stems([Path(source.name) for source in sources])))
    output_dir = check_output_folder(args.output, "--output")
    jobs, process, device = shard(jobs, args.device)
    predictor = Predictor(
        args.model, device or args.device, args.threshold, args.max_instances, args.track, args.runtime, args.precision
    )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output: cannot create {output_dir}: {error.strerror or one_line(error)}") from error
    echo(
        f"model: {predictor.model_dir}  device: {predictor.device}{process}  inputs: {len(jobs)}  output: {output_dir}"
        f"  runtime: {predictor.runtime_name} ({predictor.precision_note})"
    )

    tally = Tally()
    noun = "image(s)" if all(source.kind == "image" for source, _ in jobs) else "input(s)"
    progress = tqdm(total=len(jobs), unit="input", disable=len(jobs) < 2)
    try:
        for batch in batches(jobs, args.batch_size):
            if batch[0][0].kind == "image":
                predict_and_write_images(predictor, batch, output_dir, args, tally)
            else:
                predict_video(predictor, *batch[0], output_dir, args, tally)
            progress.update(len(batch))
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted: wrote {tally.written} of {len(jobs)} {noun} to {output_dir}", file=sys.stderr)
        return 130
    progress.close()
    echo(f"wrote {tally.written} overlay(s) and JSON file(s) to {output_dir}")
    if tally.failures:
        print(
            f"error: {len(tally.failures)} of {len(jobs)} {noun} could not be read or segmented: "
            f"{', '.join(tally.failures)}",
            file=sys.stderr,
        )
        return 1
    return 0


@dataclass
class Tally:
    """Inputs whose outputs are written (counted as soon as they are, for the Ctrl-C summary) and those that
    failed."""

    written: int = 0
    failures: list[str] = field(default_factory=list)


def shard(jobs: list, device_name: str) -> tuple[list, str, object]:
    """This process's share of `jobs` under `accelerate launch` (contiguous slices, each job in one process), a
    label for the header line, and the process's device (None outside accelerate)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return jobs, "", None
    from accelerate import PartialState

    state = PartialState(cpu=device_name == "cpu")
    with state.split_between_processes(jobs) as mine:
        mine = list(mine)
    label = f"  process: {state.process_index + 1} of {state.num_processes}"
    return mine, label, state.device if device_name == "auto" else None


def batches(jobs: list, batch_size: int) -> list[list]:
    """Consecutive images in batches of `batch_size`; each video alone."""
    groups: list[list] = []
    for job in jobs:
        if job[0].kind == "image" and groups and groups[-1][0][0].kind == "image" and len(groups[-1]) < batch_size:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def predict_and_write_images(predictor, batch, output_dir: Path, args, tally: Tally) -> None:
    """Read, segment and write the `(source, stem)` image pairs of `batch`. Unreadable or unsegmentable images are
    named on stderr and added to the tally's failures."""
    from ..utils.images import load_image

    loaded = []
    for source, stem in batch:
        try:
            loaded.append((source, stem, load_image(Path(source.spec))))
        except OSError as error:
            tally.failures.append(source.spec)
            tqdm.write(f"error: {error}", file=sys.stderr)
    if not loaded:
        return
    try:
        results = predictor.predict_images([image for _, _, image in loaded])
    except (ValueError, RuntimeError) as error:  # e.g. out of memory on a huge image: the next batch may fit
        tally.failures.extend(source.spec for source, _, _ in loaded)
        names = ", ".join(source.spec for source, _, _ in loaded)
        tqdm.write(f"error: cannot segment {names}: {one_line(error)}", file=sys.stderr)
        return
    for (source, stem, image), result in zip(loaded, results):
        write_image_outputs(predictor, image, source.spec, output_dir / stem, result, args.threshold)
        tally.written += 1  # counted at once: a Ctrl-C while printing must not leave written files out of the summary
        timings = result.timings
        echo(
            f"{source.spec}: {len(result.instances)} instances | preprocess {timings['preprocess']:.1f} ms | "
            f"inference {timings['inference']:.1f} ms | postprocess {timings['postprocess']:.1f} ms"
        )


def write_image_outputs(predictor, image, name: str, output_stem: Path, result, threshold: float) -> dict:
    """Write `<output_stem>_overlay.png` and `<output_stem>.json` atomically; returns the JSON record. A write error
    becomes an `InputError` naming the file."""
    record = {
        "image": name,
        "width": image.width,
        "height": image.height,
        "model": str(predictor.model_dir),
        "threshold": threshold,
        "timing_ms": {name: round(value, 3) for name, value in result.timings.items()},
        "instances": result.instances,
    }
    overlay_path = output_stem.with_name(f"{output_stem.name}_overlay.png")
    json_path = output_stem.with_name(f"{output_stem.name}.json")
    target = overlay_path
    try:
        with atomic_path(overlay_path) as temporary:
            result.overlay.save(temporary, format="PNG")
        target = json_path
        atomic_write_text(json_path, json.dumps(record, indent=1))
    except OSError as error:
        raise InputError(f"cannot write {target}: {error.strerror or one_line(error)}") from error
    return record


def predict_video(predictor, source, stem: str, output_dir: Path, args, tally: Tally) -> None:
    """Segment one video / URL / webcam into `<stem>_overlay.mp4` + `<stem>.jsonl` (created at the first frame, and
    counted as written then). A source that cannot be opened or decoded is named and added to the failures."""
    from ..inference.sources import VideoSource

    try:
        video = VideoSource(source)
    except InputError as error:
        tally.failures.append(source.spec)
        tqdm.write(f"error: {error}", file=sys.stderr)
        return
    total = video.frames and -(-video.frames // args.vid_stride)
    progress = tqdm(total=total or None, unit="frame", desc=source.name, leave=False, disable=None)
    results = predictor.stream(video, args.vid_stride)
    outputs, start = None, time.perf_counter()
    try:
        for result in results:
            if outputs is None:
                outputs = open_video_outputs(output_dir / stem, video, result, args.vid_stride)
                tally.written += 1
            outputs.put(result)
            progress.update(1)
    except InputError as error:  # nothing decodable (the thread's error)
        tally.failures.append(source.spec)
        tqdm.write(f"error: {error}", file=sys.stderr)
        return
    finally:
        results.close()
        progress.close()
        close_video_outputs(outputs)
    report_video(source, video, outputs, predictor.dropped, time.perf_counter() - start)


def open_video_outputs(stem: Path, video, result, vid_stride: int):
    from ..inference.video import VideoOutputs

    height, width = result.image.shape[:2]
    try:
        return VideoOutputs(stem, video.rate / vid_stride, width, height)
    except OSError as error:
        raise InputError(f"cannot write {stem}_overlay.mp4: {error.strerror or one_line(error)}") from error


def close_video_outputs(outputs) -> None:
    """Finalise the overlay and the JSONL; a write error (full disk) becomes an `InputError` naming the file."""
    if outputs is None:
        return
    try:
        outputs.close()
    except OSError as error:
        raise InputError(f"cannot write {outputs.video_path}: {error.strerror or one_line(error)}") from error


def report_video(source, video, outputs, dropped: int, seconds: float) -> None:
    frames = outputs.written if outputs else 0
    if video.error:
        tqdm.write(f"warning: {source.spec}: decoding stopped after {frames} frame(s): {video.error}", file=sys.stderr)
    extra = f" | dropped {dropped} frame(s) the model could not keep up with" if video.live else ""
    echo(f"{source.spec}: {frames} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):.1f} frames/s){extra}")


def echo(text: str) -> None:
    """Print a progress line on stdout; once stdout is closed (`| head -1`), send it and later lines nowhere."""
    try:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so that the final flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
