"""CPU time of FastInst instance post-processing: upstream order vs `FastInstImageProcessor`.

Setting: one 480x640 image (padded input 480x640, mask logits 60x80; with `--resized`, the official benchmark's input
576x768, mask logits 72x96, masks resized back to 480x640), 100 queries, 80 classes, random but peaky logits so that
a realistic handful of instances pass `threshold=0.5`.

    python scripts/benchmark_postprocess.py [--repeats 10] [--threads 1] [--resized]

(a) upstream `FastInst.instance_inference` order: upsample all 100 masks to the padded size, crop, resize to the
    original size, then top-100 over the 100x80 class scores, mask scores, and finally the score threshold;
(b) `FastInstImageProcessor.instance_inference` (top-k and class-score threshold first, only the kept queries'
    masks are resized, on CPU only the tiles that can hold mask pixels);
(c) `FastInstImageProcessor.post_process_instance_segmentation` (b plus the painted segmentation map).
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch.nn import functional as F

from fastinst_hf.image_processing_fastinst import FastInstImageProcessor

HEIGHT, WIDTH, QUERIES, CLASSES, TOP_K = 480, 640, 100, 80, 100


def make_outputs(seed: int = 0, input_size: tuple[int, int] = (HEIGHT, WIDTH)) -> SimpleNamespace:
    """Peaky logits: ~15% of queries are confident in one class; each mask is a Gaussian blob in logit space."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, QUERIES, CLASSES + 1, generator=generator)
    confident = torch.randperm(QUERIES, generator=generator)[:15]
    labels = torch.randint(0, CLASSES, (15,), generator=generator)
    class_logits[0, confident, labels] += 9.0
    class_logits[0, :, CLASSES] += 3.0  # "no object" dominates the other queries
    height, width = input_size[0] // 8, input_size[1] // 8
    ys = torch.arange(height).view(1, -1, 1).float()
    xs = torch.arange(width).view(1, 1, -1).float()
    centres = torch.rand(QUERIES, 2, generator=generator) * torch.tensor([height, width])
    sigmas = 2 + 8 * torch.rand(QUERIES, 1, 1, generator=generator)
    distance2 = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2
    noise = 0.5 * torch.randn(QUERIES, height, width, generator=generator)
    mask_logits = 12 * torch.exp(-distance2 / (2 * sigmas**2)) - 6 + noise
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits[None])


def upstream_order(outputs, threshold: float) -> dict:
    """The official order (`FastInst.forward` + `sem_seg_postprocess` + `instance_inference`), then the threshold."""
    mask_logits = outputs.masks_queries_logits
    padded = (mask_logits.shape[-2] * 8, mask_logits.shape[-1] * 8)
    # The padded input is the resized image itself (a multiple of 32): nothing to crop.
    masks = F.interpolate(mask_logits, size=padded, mode="bilinear", align_corners=False)
    masks = F.interpolate(masks, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
    scores = outputs.class_queries_logits[0].softmax(-1)[:, :-1]
    class_scores, flat = scores.flatten().topk(TOP_K, sorted=False)
    queries = flat // CLASSES
    probs = masks[queries].sigmoid()
    binary = probs > 0.5
    final = class_scores * (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    keep = final >= threshold
    return {"scores": final[keep], "flat": flat[keep], "masks": binary[keep]}


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--resized", action="store_true", help="model input 576x768 (the official benchmark's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    input_size = (576, 768) if args.resized else (HEIGHT, WIDTH)
    outputs = make_outputs(input_size=input_size)
    processor = FastInstImageProcessor()
    # The model input is the image (resized): resized = padded input size, masks returned at the 480x640 image size.
    sizes = {"target_sizes": [(HEIGHT, WIDTH)], "image_sizes": [input_size]}

    # The processor must return exactly the instances of the upstream order.
    reference = upstream_order(outputs, args.threshold)
    (ours,) = processor.instance_inference(outputs, threshold=args.threshold, **sizes)
    ref_order = torch.argsort(reference["flat"])
    our_order = torch.argsort(ours["query_indices"] * CLASSES + ours["labels"])
    assert torch.equal(reference["flat"][ref_order], (ours["query_indices"] * CLASSES + ours["labels"])[our_order])
    torch.testing.assert_close(ours["scores"][our_order], reference["scores"][ref_order], rtol=1e-5, atol=0)
    assert torch.equal(ours["masks"][our_order], reference["masks"][ref_order])

    rows = [
        ("(a) upstream order (all 100 masks upsampled)", lambda: upstream_order(outputs, args.threshold)),
        (
            "(b) processor.instance_inference",
            lambda: processor.instance_inference(outputs, threshold=args.threshold, **sizes),
        ),
        (
            "(c) processor.post_process_instance_segmentation",
            lambda: processor.post_process_instance_segmentation(outputs, threshold=args.threshold, **sizes),
        ),
    ]
    results = [(name, median_ms(function, args.repeats)) for name, function in rows]
    kept_queries = ours["query_indices"].unique().numel()
    print(
        f"{HEIGHT}x{WIDTH} image (model input {input_size[0]}x{input_size[1]}), {QUERIES} queries x {CLASSES} classes, "
        f"top-{TOP_K}, threshold {args.threshold}: "
        f"{len(ours['scores'])} instances kept ({kept_queries} distinct queries); "
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'method':<52} {'median ms':>10} {'speed-up':>9}")
    for name, milliseconds in results:
        print(f"{name:<52} {milliseconds:>10.2f} {results[0][1] / milliseconds:>8.1f}x")


if __name__ == "__main__":
    main()
