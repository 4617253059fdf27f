"""ONNX export of FastInst (upstream issues #29, #31), through `torch.onnx.export(..., dynamo=True)`.

The exported graph takes `pixel_values` [B, 3, H, W] (normalised, H and W multiples of 32, both dynamic) and returns
`class_queries_logits` [B, Q, K+1] and `masks_queries_logits` [B, Q, H/8, W/8]; the instance post-processing stays in
Python (`FastInstImageProcessor.post_process_instance_segmentation` accepts the two arrays). The R50-vd-DCN variants
need the ONNX `DeformConv` operator (opset 19) and a runtime that implements it.
"""

import math
from pathlib import Path

import torch
from torch import nn

from ..utils.errors import InputError
from ..utils.files import atomic_path

OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits")


class FastInstOnnxWrapper(nn.Module):
    """Returns the two prediction tensors as a plain tuple (what an ONNX graph can output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values, return_dict=True)
        return outputs.class_queries_logits, outputs.masks_queries_logits


def export_onnx(model, path: str | Path, height: int = 640, width: int = 864, dynamic: bool = True) -> Path:
    """Export `model` (a `FastInstForInstanceSegmentation` or `FastInstModel`) to `path`.

    `height`/`width` give the example input (multiples of 32). With `dynamic`, batch size, height and width are
    dynamic (multiples of 32, at least the size that holds `num_queries` stride-16 cells). The file is written to a
    temporary name first and renamed, so an interrupted export never leaves a truncated model behind, and a failed
    one leaves no temporary file either.
    """
    if height % 32 or width % 32:
        raise InputError(f"height and width must be multiples of 32, got {height}x{width}")
    path = Path(path)
    wrapper = FastInstOnnxWrapper(model).eval()
    # A batch of 2: an example dimension of size 1 would be specialised to 1.
    example = torch.zeros(2 if dynamic else 1, 3, height, width, dtype=next(model.parameters()).dtype)
    dynamic_shapes = None
    if dynamic:
        # The stride-16 map needs at least num_queries cells: a side of at least ceil(sqrt(num_queries)) cells.
        min_blocks = math.ceil(math.ceil(math.sqrt(model.config.num_queries)) / 2)
        if height < 32 * min_blocks or width < 32 * min_blocks:
            raise InputError(
                f"the example input (--height, --width) must be at least {32 * min_blocks}x{32 * min_blocks}"
            )
        rows = torch.export.Dim("rows", min=min_blocks, max=256)
        columns = torch.export.Dim("columns", min=min_blocks, max=256)
        batch = torch.export.Dim("batch", min=1, max=64)
        dynamic_shapes = {"pixel_values": {0: batch, 2: 32 * rows, 3: 32 * columns}}
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=["pixel_values"],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=dynamic_shapes,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        program.save(str(temporary))
    return path
