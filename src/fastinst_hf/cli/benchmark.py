"""`fastinst-hf benchmark`: runtimes and precisions side by side (interleaved runs), batch throughput, and optionally
the official code, peer models and a training step; a Markdown table on stdout and everything in `--json`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..inference.runtimes import RUNTIMES
from ..utils.arguments import HelpFormatter
from ..utils.errors import InputError, one_line
from .options import VARIANT_NAMES, add_device_argument

if TYPE_CHECKING:
    import numpy as np

    from ..benchmarks.runtimes import BenchmarkOptions

# What `--runtimes` / `--peers` accept; the defaults and peers are copies of `benchmarks.runtimes`' (which imports
# torch), kept in step by a test.
RUNTIME_NAMES = tuple(RUNTIMES)  # the one runtime factory's names (a module without torch)
DEFAULT_RUNTIME_NAMES = (
    "eager",
    "unfolded",
    "folded+channels_last",
    "onnxruntime",
    "bf16+channels_last",
    "bf16-weights",
)
PEER_NAMES = ("mask2former", "yolo11s-seg", "yolo11m-seg", "rfdetr-seg-nano", "rfdetr-seg-small")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "benchmark",
        help="time runtimes and precisions side by side",
        description="Times every chosen runtime on one image with the official protocol (random weights of a "
        "released variant, 480x640 image, top-100 instances), interleaved A,B,A,B; prints a Markdown table.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--variant", default="fastinst-d1-r50", choices=VARIANT_NAMES, help="random weights")
    parser.add_argument("--model", default=None, help="time this trained model instead of random --variant weights")
    parser.add_argument("--image", default=None, help="image file (default: a bundled demo image at 480x640)")
    add_device_argument(parser)
    parser.add_argument(
        "--runtimes",
        type=_names,
        default=DEFAULT_RUNTIME_NAMES,
        help=f"any of {', '.join(RUNTIME_NAMES)}; the openvino-int8 ones calibrate on the benchmark image and 7 random "
        "tensors of its size (enough to time int8; its accuracy is measured by scripts/check_reduced_precision.py)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (every runtime once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch-sizes", type=lambda t: tuple(map(int, _names(t))), default=(1, 4, 8))
    parser.add_argument("--throughput-runtimes", type=_names, default=("eager", "folded+channels_last"))
    parser.add_argument("--official-root", default=None, help="PARITY_ROOT of shared/tools/official_parity")
    parser.add_argument("--official-tools", default=None, help="folder of bench_official.py")
    parser.add_argument("--peers", type=_names, default=(), help=f"optional extras: {', '.join(PEER_NAMES)}")
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="also time one training step (batch 2, 512px; with --official-root also the official trainer's step)",
    )
    parser.add_argument(
        "--train-profile",
        action="store_true",
        help="with --train-step: one more step per side under torch.profiler, time per op category",
    )
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without bf16 units (emulated)")
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="time in this process as started (default: in a child process whose idle OpenMP threads sleep, "
        "OMP_WAIT_POLICY=PASSIVE, as every official worker's; needed because the policy is read when torch loads)",
    )
    parser.add_argument("--json", default=None, help="write the full result here")
    parser.add_argument("--table-from", default=None, help="only print the table of a saved --json result")
    parser.add_argument(
        "--video",
        nargs="?",
        const="",
        default=None,
        metavar="CLIP",
        help="instead: end-to-end video frames/s (predict's decode + model + overlay + H.264 + JSONL) next to "
        "model-only frames/s on the same frames, with --model (default: the embedded model) and predict's default "
        "runtime; CLIP defaults to a synthetic clip of --video-frames frames",
    )
    parser.add_argument("--video-frames", type=int, default=60, help="frames of the synthetic --video clip")
    parser.set_defaults(run=run)


def run_video(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarks.video import format_video_result, run_video_benchmark
    from ..inference.predictor import Predictor
    from ..utils.files import atomic_write_text

    clip = Path(args.video) if args.video else None
    if clip is not None and not clip.is_file():
        raise InputError(f"--video: no such file {clip}")
    if args.video_frames < 1:
        raise InputError(f"--video-frames must be >= 1, got {args.video_frames}")
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor(args.model, args.device)
    result = run_video_benchmark(predictor, clip, args.video_frames, rounds=max(1, args.runs // 2))
    result["model"] = str(predictor.model_dir)
    print(f"model: {result['model']}")
    print(format_video_result(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.video is not None:
        return run_video(args)
    if args.table_from:
        from ..benchmarks.runtimes import format_table

        try:
            result = json.loads(Path(args.table_from).read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"--table-from {args.table_from}: {error}") from error
        print(format_table(result))
        return 0
    _options(args)  # bad options fail here, before any child process starts
    from ..benchmarks.timing import threads_are_passive

    if not args.no_isolation and not threads_are_passive():
        return _run_in_passive_child(args)
    return _benchmark(args)


def _run_in_passive_child(args: argparse.Namespace) -> int:
    """Runs this benchmark in a child process started with `PASSIVE_THREADS`; prints its output (stderr too, through
    this process's, so that an error line reaches whoever reads ours)."""
    from ..benchmarks.timing import isolated_environment

    arguments = json.dumps({key: value for key, value in vars(args).items() if key != "run"})
    command = [sys.executable, "-c", "import sys; from fastinst_hf.cli.benchmark import child_main; child_main()"]
    child = subprocess.run([*command, arguments], env=isolated_environment(), capture_output=True, text=True)
    print(child.stdout, end="")
    print(child.stderr, end="", file=sys.stderr)
    return child.returncode


def child_main() -> None:
    """Entry of `_run_in_passive_child`: the parsed arguments as JSON in argv[1]; exits with `run`'s status."""
    args = argparse.Namespace(**json.loads(sys.argv[1]))
    try:
        status = _benchmark(args)
    except InputError as error:
        print(f"fastinst-hf benchmark: error: {one_line(error)}", file=sys.stderr)
        status = 2
    sys.exit(status)


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from .. import FastInstForInstanceSegmentation
    from ..benchmarks.runtimes import format_table, run_benchmark
    from ..image_processing_fastinst import FastInstImageProcessor
    from ..inference.loading import load_model_and_processor
    from ..releases import variant_config
    from ..utils.device import select_device
    from ..utils.files import atomic_write_text

    options = _options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if args.model:
        model, processor, _ = load_model_and_processor(args.model, device)
    else:
        torch.manual_seed(0)
        model, processor = FastInstForInstanceSegmentation(variant_config(args.variant)), None
    processor = processor or FastInstImageProcessor()
    result = run_benchmark(model, processor, _image(args.image), device, options)
    result["model"] = args.model or f"{args.variant} (random weights)"
    result["variant"] = None if args.model else args.variant
    print(f"model: {result['model']}")
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


def _options(args: argparse.Namespace) -> BenchmarkOptions:
    if args.runs < 1 or args.warmup < 0:
        raise InputError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    if args.train_profile and not args.train_step:
        raise InputError("--train-profile profiles the training step: add --train-step")
    unknown = [name for name in (*args.runtimes, *args.throughput_runtimes) if name not in RUNTIME_NAMES]
    if unknown:
        raise InputError(f"--runtimes: unknown {unknown}; choose from {', '.join(RUNTIME_NAMES)}")
    if [peer for peer in args.peers if peer not in PEER_NAMES]:
        raise InputError(f"--peers: choose from {', '.join(PEER_NAMES)}, got {', '.join(args.peers)}")
    if bool(args.official_root) != bool(args.official_tools):
        raise InputError("--official-root and --official-tools go together")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        raise InputError(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    from ..benchmarks.runtimes import BenchmarkOptions

    return BenchmarkOptions(
        runtimes=args.runtimes,
        runs=args.runs,
        warmup=args.warmup,
        batch_sizes=args.batch_sizes,
        throughput_runtimes=args.throughput_runtimes,
        official_root=args.official_root,
        official_tools=args.official_tools,
        peers=args.peers,
        train_step=args.train_step,
        train_profile=args.train_profile,
        force_bf16=args.force_bf16,
    )


def _image(path: str | None) -> np.ndarray:
    """`--image` as `(H, W, 3)` uint8, or the first bundled demo image resized to 480x640 (the protocol's size)."""
    import numpy as np

    from ..inference.resolve import DEMO_IMAGE_DIR
    from ..utils.images import load_image

    if path is None:
        demos = sorted(DEMO_IMAGE_DIR.glob("*.png"))
        if not demos:
            raise InputError(f"no bundled demo image in {DEMO_IMAGE_DIR}; pass --image")
        return np.asarray(load_image(demos[0]).convert("RGB").resize((640, 480)))
    if not Path(path).is_file():
        raise InputError(f"--image: file not found: {path}")
    try:
        return np.asarray(load_image(Path(path)).convert("RGB"))
    except OSError as error:
        raise InputError(str(error)) from error
