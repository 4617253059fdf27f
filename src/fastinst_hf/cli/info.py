"""`fastinst-hf info`: what a model is (the official `tools/analyze_model.py` facts): parameters, FLOPs at its test
size, input size, classes, backbone, and where its weights came from.

FLOPs are counted by `fastinst_hf.utils.flops.count_flops` (torch's counter) on one image of COCO's most common
shape, 480x640 (H x W), resized as the processor does at test time and padded to a multiple of 32; they are shown in
the paper's unit (`paper_gflops`: a multiply-add counts once, as detectron2's fvcore counts; the paper averages 100
COCO val images). `--variant NAME` builds an official architecture with random weights (nothing is downloaded);
`--variant all` prints the five variants as a Markdown table beside the paper's GFLOPs.
"""

from __future__ import annotations

import argparse
import os

from ..utils.arguments import HelpFormatter
from .options import VARIANT_NAMES

# The FastInst paper's GFLOPs (Table 1 / README model zoo); the R50-vd-DCN models have none.
PAPER_GFLOPS = {"fastinst-d1-r50": 49.6, "fastinst-d3-r50": 75.5, "fastinst-d3-r101": 112.9}
# The image a FLOPs count is taken on, before the test-time resize: COCO's most common size.
SAMPLE_HEIGHT, SAMPLE_WIDTH = 480, 640


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "info",
        description="Parameters, FLOPs at the test size, input size, classes, backbone and origin of a model.",
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="model folder, official variant name (downloaded and converted once), Hub repo id, or 'default' "
        "(the default): the demo model bundled with the package",
    )
    source.add_argument(
        "--variant",
        choices=(*VARIANT_NAMES, "all"),
        help="an official architecture with random weights (nothing downloaded); all: the five as a Markdown "
        "table with the paper's GFLOPs",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.variant == "all":
        print(variants_table())
        return 0
    model, origin = _load(args)
    print("\n".join(f"{key + ':':<15} {value}" for key, value in describe(model, origin).items()))
    return 0


def _load(args: argparse.Namespace):
    from ..inference.loading import load_model_and_processor

    if args.variant is not None:
        return random_variant(args.variant), f"random weights, the {args.variant} architecture (nothing downloaded)"
    model, _, model_dir = load_model_and_processor(args.model)
    return model, origin_of(args.model, model_dir)


def random_variant(name: str):
    """An official architecture with random weights (eval mode)."""
    import torch

    from .. import FastInstForInstanceSegmentation
    from ..releases import variant_config

    torch.manual_seed(0)
    return FastInstForInstanceSegmentation(variant_config(name)).eval()


def origin_of(name: str | None, model_dir) -> str:
    """Where the weights of the model called `name` (resolved to `model_dir`) came from."""
    from ..conversion.official import official_checkpoint_url
    from ..inference.resolve import DEFAULT_NAME, cache_root

    if name in (None, DEFAULT_NAME):
        return f"the demo model bundled with the package (trained on synthetic shapes): {model_dir}"
    if name in VARIANT_NAMES and not os.path.exists(name):
        return f"official release checkpoint {official_checkpoint_url(name)}, converted into {model_dir}"
    if os.path.exists(name):
        return f"local folder {model_dir}"
    return f"Hugging Face Hub repo {name} (snapshot {model_dir}; cache root of official models: {cache_root()})"


def test_input_size(config) -> tuple[int, int]:
    """(H, W) of the padded input the model gets for a SAMPLE_HEIGHT x SAMPLE_WIDTH image at its test size."""
    from ..image_processing_fastinst import get_fastinst_output_image_size

    height, width = get_fastinst_output_image_size(
        SAMPLE_HEIGHT, SAMPLE_WIDTH, config.test_shortest_edge, config.test_longest_edge
    )
    return -(-height // 32) * 32, -(-width // 32) * 32


def measure(model) -> dict:
    """Parameters and FLOPs (paper unit) of `model` at its test size."""
    import torch

    from ..utils.flops import count_flops, paper_gflops

    height, width = test_input_size(model.config)
    pixel_values = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    flops = count_flops(model, {"pixel_values": pixel_values})
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": (height, width),
        "gflops": paper_gflops(flops),
    }


def backbone_name(backbone_config) -> str:
    """E.g. "ResNet-50", "ResNet-50-vd-DCN (deformable stages 3, 4)"."""
    blocks = sum(backbone_config.depths)
    layer_type = getattr(backbone_config, "layer_type", "bottleneck")
    depth = (3 if layer_type == "bottleneck" else 2) * blocks + 2
    if backbone_config.model_type != "fastinst_resnet_vd":
        return f"ResNet-{depth} ({layer_type} blocks, transformers ResNetConfig)"
    stages = [str(i + 1) for i, on in enumerate(backbone_config.deformable_stages) if on]
    return f"ResNet-{depth}-vd" + (f"-DCN (deformable stages {', '.join(stages)})" if stages else "")


def describe(model, origin: str) -> dict[str, str]:
    config = model.config
    facts = measure(model)
    labels = [config.id2label[k] for k in sorted(config.id2label, key=int)]
    shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    height, width = facts["input"]
    return {
        "weights": origin,
        "backbone": backbone_name(config.backbone_config),
        "decoder": f"{config.decoder_layers} layer(s), {config.num_queries} queries, hidden size {config.hidden_dim}",
        "classes": f"{len(labels)} ({shown})",
        "test size": f"short side {config.test_shortest_edge}, long side <= {config.test_longest_edge}",
        "parameters": f"{facts['parameters'] / 1e6:.2f} M",
        "FLOPs": f"{facts['gflops']:.1f} GFLOPs (paper unit: multiply-add = 1) on a {SAMPLE_HEIGHT}x{SAMPLE_WIDTH} "
        f"image, input {height}x{width}",
    }


def variants_table() -> str:
    """The five official architectures (random weights): parameters and GFLOPs beside the paper's."""
    rows = [
        "| variant | backbone | parameters | input (H x W) | GFLOPs (ours) | GFLOPs (paper) |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANT_NAMES:
        model = random_variant(name)
        facts = measure(model)
        paper = PAPER_GFLOPS.get(name)
        rows.append(
            f"| {name} | {backbone_name(model.config.backbone_config).split(' (')[0]} | "
            f"{facts['parameters'] / 1e6:.2f} M | {facts['input'][0]} x {facts['input'][1]} | "
            f"{facts['gflops']:.1f} | {paper if paper is not None else '-'} |"
        )
        del model
    return "\n".join(rows)
