#!/usr/bin/env python
"""The README's strip of tracked overlay frames: the synthetic moving-shapes clip through `segment_video(...,
track=True)` with the embedded model, every `--step`-th overlay from frame 1 side by side (each tag starts with its
track id; ByteTrack confirms a new track on its second frame, so frame 0 has none).

    python scripts/video_strip.py --output docs/video_tracks.png [--frames 32 --step 10]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastinst_hf.benchmarks.video import synthetic_clip
from fastinst_hf.inference.predictor import segment_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--frames", type=int, default=32, help="clip length")
    parser.add_argument("--step", type=int, default=10, help="keep every step-th overlay")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        clip = synthetic_clip(Path(workdir) / "clip.mp4", args.frames)
        overlays = [
            np.asarray(r.overlay) for r in segment_video(clip, device="cpu", track=True) if r.frame % args.step == 1
        ]
    gap = np.full((overlays[0].shape[0], 6, 3), 255, dtype=np.uint8)
    strip = np.concatenate([part for overlay in overlays for part in (overlay, gap)][:-1], axis=1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(args.output)
    print(f"wrote {args.output}: frames {', '.join(str(i) for i in range(1, args.frames, args.step))}")


if __name__ == "__main__":
    main()
