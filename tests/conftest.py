import os

# One thread per process: the suite runs on 2 cores and starts multi-process trainings, where more threads only
# oversubscribe the cores (tens of times slower). Set before torch starts its thread pool; inherited by subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import ResNetConfig  # noqa: E402

from fastinst_hf import FastInstConfig, FastInstResNetVdConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("d1_r50slim_small", "d3_r50slim_small")
# A tiny ResNet-vd backbone with deformable convolutions in its last three stages.
TINY_RESNET_VD = FastInstResNetVdConfig(
    stem_width=8,
    embedding_size=16,
    hidden_sizes=[32, 64, 128, 256],
    depths=[1, 1, 1, 1],
    deformable_stages=[False, True, True, True],
    out_features=["stage2", "stage3", "stage4"],
)

# detectron2 normalisation of the official models (RGB, 0-255).
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def load_eval_fixture(variant: str) -> dict:
    """`outputs_eval.pt` of a fixture with `instances.pred_masks` unpacked to a bool tensor."""
    outputs = torch.load(FIXTURES / variant / "outputs_eval.pt", weights_only=True)
    shape = tuple(outputs.pop("instances.pred_masks_shape").tolist())
    packed = outputs.pop("instances.pred_masks_packed").numpy()
    bits = np.unpackbits(packed)[: int(np.prod(shape))]
    outputs["instances.pred_masks"] = torch.from_numpy(bits.reshape(shape).astype(bool))
    return outputs


def load_train_fixture(variant: str) -> dict:
    return torch.load(FIXTURES / variant / "outputs_train_loss.pt", weights_only=True)


def fixture_model_input(variant: str) -> torch.Tensor:
    """The resized, unnormalised RGB input [3, H, W] (0-255) the official model received."""
    return torch.from_numpy(np.load(FIXTURES / variant / "model_input_chw_float32.npy"))


def fixture_pixel_values(variant: str) -> torch.Tensor:
    """Normalised and zero-padded (bottom/right, to a multiple of 32) input [1, 3, H, W], as upstream."""
    image = (fixture_model_input(variant) - PIXEL_MEAN) / PIXEL_STD
    height, width = image.shape[-2:]
    padded = torch.zeros(3, -(-height // 32) * 32, -(-width // 32) * 32)
    padded[:, :height, :width] = image
    return padded[None]


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


def tiny_config(**overrides):
    """A FastInst config small enough to run in milliseconds (ResNet with 16-128 channels, 10 queries)."""
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    settings = dict(
        backbone_config=backbone,
        hidden_dim=32,
        pixel_decoder_channels=32,
        mask_dim=32,
        group_norm_groups=8,
        num_queries=10,
        num_attention_heads=4,
        dim_feedforward=64,
        decoder_layers=1,
        test_shortest_edge=64,
        test_longest_edge=96,
        id2label={0: "circle", 1: "square"},
    )
    return FastInstConfig(**{**settings, **overrides})


def two_layer_config(**overrides):
    """A tiny FastInst with two decoder layers, auxiliary queries and three labels (deep supervision, training)."""
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    settings = dict(
        backbone_config=backbone,
        pixel_decoder_channels=32,
        hidden_dim=32,
        mask_dim=32,
        group_norm_groups=8,
        num_attention_heads=4,
        dim_feedforward=64,
        decoder_layers=2,
        num_queries=20,
        num_auxiliary_queries=4,
        id2label={0: "a", 1: "b", 2: "c"},
        train_num_points=64,
    )
    return FastInstConfig(**{**settings, **overrides})
