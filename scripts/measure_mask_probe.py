"""First-call CPU time of the exact mask upsampling on new image sizes: tiled path with its probe vs the dense path.

`iter_binary_masks` probes each new (logits, resized, output) size once before it takes the tiled path. This measures,
for 20 photo sizes (each new to the process) and several numbers of kept masks, back to back in one process:
(a) the first call (probe + tiled path, or the dense path where the probe is not worth it), (b) the dense path alone
(the official resizing of every mask, as where the probe fails), (c) a repeated call (size already probed).

    python scripts/measure_mask_probe.py [--masks 1 3 4 10 30] [--repeats 3] [--threads 1] [--sizes 20]

Masks are Gaussian blobs in logit space at the stride-8 size of the test-time input (short side 640, long side at
most 853, padded to a multiple of 32), resized back to the photo size. Times are the minimum over `--repeats`.
"""

import argparse
import time

import torch

from fastinst_hf import mask_resizing_fastinst as mask_resizing
from fastinst_hf.image_processing_fastinst import get_fastinst_output_image_size, get_padded_size

SIZES = [
    (480, 640), (640, 480), (720, 1280), (1080, 1920), (600, 800), (375, 500), (500, 375), (427, 640), (640, 427),
    (1024, 768), (333, 500), (512, 512), (768, 1024), (900, 1600), (1536, 2048), (240, 320), (1200, 1600),
    (350, 620), (801, 1203), (2048, 1536),
]  # fmt: skip


def blob_logits(masks: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """`(masks, *size)` logits: one Gaussian blob per mask (about +6 inside, -6 outside) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(size[0]).view(1, -1, 1).float()
    xs = torch.arange(size[1]).view(1, 1, -1).float()
    centres = torch.rand(masks, 2, generator=generator) * torch.tensor(size)
    sigmas = 1 + 0.1 * min(size) * torch.rand(masks, 1, 1, generator=generator)
    distance2 = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2
    return 12 * torch.exp(-distance2 / (2 * sigmas**2)) - 6 + 0.5 * torch.randn(masks, *size, generator=generator)


def milliseconds(function, repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(image_size: tuple[int, int], masks: int, repeats: int) -> dict:
    resized = get_fastinst_output_image_size(*image_size, 640, 853)
    padded = get_padded_size([resized], 32)
    logits = blob_logits(masks, (padded[0] // 8, padded[1] // 8))

    def tiled_or_dense():
        for _ in mask_resizing.iter_binary_masks(logits, resized, image_size, 0.5):
            pass

    sizes = (tuple(logits.shape[-2:]), resized, image_size)

    def dense_only():
        mask_resizing._PROBED[sizes] = None  # as if the probe had failed: the dense path

    first = milliseconds(tiled_or_dense, repeats, before=mask_resizing._PROBED.clear)
    dense_ms = milliseconds(tiled_or_dense, repeats, before=dense_only)
    mask_resizing._PROBED.clear()
    tiled_or_dense()  # the probe's answer is now remembered (where it ran)
    repeated = milliseconds(tiled_or_dense, repeats)
    probed = mask_resizing._PROBED.get(sizes) is not None
    return {"first": first, "dense": dense_ms, "repeated": repeated, "tiled": probed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 3, 4, 10, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, default=len(SIZES), help="use the first N of the 20 sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    worst = {"tiled": 0.0, "dense": 0.0}
    print(f"{'image':>10} {'masks':>5} {'first ms':>9} {'dense ms':>9} {'repeat ms':>9} {'first/dense':>11} path")
    for image_size in SIZES[: args.sizes]:
        for masks in args.masks:
            row = measure(image_size, masks, args.repeats)
            ratio = row["first"] / row["dense"]
            path = "tiled" if row["tiled"] else "dense"
            worst[path] = max(worst[path], ratio)
            print(
                f"{image_size[0]:>4}x{image_size[1]:<5} {masks:>5} {row['first']:>9.1f} {row['dense']:>9.1f} "
                f"{row['repeated']:>9.1f} {ratio:>11.2f} {path}",
                flush=True,
            )
    # Where the probe does not run, the first call is the dense path itself: its ratio only shows the timing noise.
    print(f"worst first/dense: {worst['tiled']:.2f} where the probe ran, {worst['dense']:.2f} (noise) elsewhere")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
