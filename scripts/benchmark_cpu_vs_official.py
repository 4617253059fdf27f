"""CPU timing of our FastInst, measured exactly like the official-parity tool's `bench_official.py` times the
official model, so that the two JSON files can be compared side by side (run both back to back on the same idle
machine and compare ratios; shared machines drift by up to ~30 % between runs).

Method (identical to bench_official.py; does not import detectron2):
  * torch.set_num_threads(2); model.eval(); everything under torch.no_grad().
  * random weights from `fastinst_hf.releases.variant_config(...)` (timing does not depend on the values).
  * input: a 480x640 RGB photo (skimage astronaut, rows 64:448, PIL-bilinear resized to 480x640), resized to the
    variant's test size with detectron2's ResizeShortestEdge rule and PIL bilinear on uint8, OUTSIDE the timed
    region (upstream's "full" excludes resizing too).
  * "full"    = what the official `model([{"image", "height", "width"}])` does: normalise + zero-pad to /32 (plain
                tensor ops, as inside the official model), forward, then the official instance post-processing at
                480x640 (`FastInstImageProcessorPil.instance_inference`, threshold 0: top-100 (query, class) pairs,
                mask upsampling, sigmoid, threshold, mask scores).
  * "network" = model forward on the padded, normalised tensor (prepared outside).
  * stages    = backbone / pixel decoder / query proposal + transformer decoder + heads, each timed alone.
  * 3 warm-up calls, then 10 timed calls (time.perf_counter); report the median (and min/max).

Keys as in bench_official.py: d1 = fastinst-d1-r50, d3 = fastinst-d3-r50-vd-dcn, d3_r50 = fastinst-d3-r50.

usage: python scripts/benchmark_cpu_vs_official.py [--json OUT] [--runs 10] [--warmup 3] [--threads 2]
                                                  [--image FILE] [d1] [d3] [d3_r50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.image_processing_fastinst import get_fastinst_output_image_size
from fastinst_hf.image_processing_pil_fastinst import FastInstImageProcessorPil
from fastinst_hf.releases import variant_config

CONFIGS = {
    "d1": ("fastinst-d1-r50", "D1 R50 ppm-fpn x1 576"),
    "d3": ("fastinst-d3-r50-vd-dcn", "D3 R50-vd-DCN ppm-fpn x3 640"),
    "d3_r50": ("fastinst-d3-r50", "D3 R50 ppm-fpn x3 640 (no DCN, reference)"),
}
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def load_image(path=None):
    """The official tool's `astronaut_480x640`: skimage astronaut, rows 64:448, PIL bilinear resize to 480x640.

    Without scikit-image, pass `--image` with a fixture's `input_image_rgb_uint8.npy` (the same 480x640 image in the
    `d1_r50vd_dcn_full` fixture) or any RGB image file.
    """
    from PIL import Image

    if path:
        if str(path).endswith(".npy"):
            return np.load(path), f"{path} (npy, RGB uint8)"
        return np.asarray(Image.open(path).convert("RGB")), str(path)
    import skimage.data

    img = skimage.data.astronaut()[64:448]
    img = np.asarray(Image.fromarray(img).resize((640, 480), Image.BILINEAR))
    return img, "skimage.data.astronaut(), rows 64:448, PIL bilinear resize"


def resize_like_detectron2(img, shortest_edge, longest_edge):
    """ResizeShortestEdge: same output size rule, PIL bilinear on uint8; float32 CHW 0-255."""
    from PIL import Image

    h, w = get_fastinst_output_image_size(img.shape[0], img.shape[1], shortest_edge, longest_edge)
    resized = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1))


def normalise_and_pad(chw, size_divisibility=32):
    """What the official model does before the backbone: (x - mean) / std, zero pad bottom/right to /32."""
    x = (chw - PIXEL_MEAN) / PIXEL_STD
    h, w = x.shape[-2:]
    return F.pad(
        x,
        (0, -(-w // size_divisibility) * size_divisibility - w, 0, -(-h // size_divisibility) * size_divisibility - h),
    )[None]


def timeit(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000.0)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "runs_ms": ts}


def decoder_stage(base, multi_scale):
    """The part of `FastInstModel.forward` after the pixel decoder (query proposal, dual-path decoder, heads):
    the counterpart of the official `sem_seg_head.predictor(multi_scale, None)`."""
    proposal_map, pixel_map = multi_scale[1], multi_scale[2]
    proposal_position = F.interpolate(
        base.position_embedding, size=proposal_map.shape[-2:], mode="bilinear", align_corners=False
    )
    pixel_position = F.interpolate(
        base.position_embedding, size=pixel_map.shape[-2:], mode="bilinear", align_corners=False
    )
    queries, query_position, _, _ = base.query_proposal(proposal_map, proposal_position)
    return base.decoder(
        queries,
        pixel_map.flatten(2).transpose(1, 2),
        query_position,
        pixel_position.flatten(2).transpose(1, 2),
        tuple(pixel_map.shape[-2:]),
        predict_all_classes=False,
    )


def bench(key, warmup, runs, image=None, config=None):
    """Times one variant of `CONFIGS` (or `config`, e.g. a tiny one for the smoke test) as bench_official.py."""
    variant, label = CONFIGS[key]
    config = variant_config(variant) if config is None else config
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(config).eval()
    base = model.model
    processor = FastInstImageProcessorPil()
    img, img_desc = load_image(image)
    chw = torch.from_numpy(resize_like_detectron2(img, config.test_shortest_edge, config.test_longest_edge))
    resized_hw = tuple(chw.shape[1:])
    x = normalise_and_pad(chw)
    target = [(img.shape[0], img.shape[1])]

    def full():
        outputs = model(normalise_and_pad(chw))
        return processor.instance_inference(outputs, threshold=0.0, target_sizes=target, image_sizes=[resized_hw])

    res = {
        "label": label,
        "variant": variant,
        "image": img_desc,
        "model_input_hw": list(resized_hw),
        "padded_hw": list(x.shape[-2:]),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    with torch.no_grad():
        feats = tuple(base.backbone(x).feature_maps[-3:])
        ms = base.pixel_decoder(feats)
        res["full"] = timeit(full, warmup, runs)
        res["network"] = timeit(lambda: model(x), warmup, runs)
        res["stage_backbone"] = timeit(lambda: base.backbone(x), warmup, runs)
        res["stage_pixel_decoder"] = timeit(lambda: base.pixel_decoder(feats), warmup, runs)
        res["stage_transformer_decoder"] = timeit(lambda: decoder_stage(base, ms), warmup, runs)
    print(
        f"{label}: input {res['model_input_hw']} pad {res['padded_hw']} params {res['params_M']:.2f}M  "
        f"full {res['full']['median_ms']:.0f} ms  network {res['network']['median_ms']:.0f} ms  "
        f"[backbone {res['stage_backbone']['median_ms']:.0f} / pixel dec "
        f"{res['stage_pixel_decoder']['median_ms']:.0f} / transformer dec "
        f"{res['stage_transformer_decoder']['median_ms']:.0f}]",
        flush=True,
    )
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description="CPU timing of our FastInst, same method as bench_official.py")
    ap.add_argument("--json", default=None, help="write the results here (same shape as bench_official.py's)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", help="RGB image file or .npy (default: skimage astronaut, as bench_official.py)")
    ap.add_argument("which", nargs="*", default=["d1", "d3", "d3_r50"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = {
        "implementation": "fastinst_hf",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor(),
        "cpu_count": os.cpu_count(),
        "results": {},
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    except OSError:  # no /proc (not Linux)
        models = []
    # Some CPUs (e.g. many ARM ones) have no "model name" line either.
    out["cpu_model"] = models[0] if models else "unknown CPU"
    try:
        out["loadavg_before"] = os.getloadavg()
    except OSError:
        pass
    for k in a.which:
        out["results"][k] = bench(k, a.warmup, a.runs, a.image)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
