"""The one FLOPs count (`fastinst_hf.utils.flops`): dense and deformable convolutions, the paper's unit."""

import torch
from conftest import tiny_config
from torchvision.ops import DeformConv2d

from fastinst_hf import FastInstForInstanceSegmentation, modeling_fastinst
from fastinst_hf.utils.flops import count_flops, paper_gflops


class _Deformable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = DeformConv2d(3, 8, 3, padding=1)

    def forward(self, pixel_values):
        batch, _, height, width = pixel_values.shape
        return self.conv(pixel_values, torch.zeros(batch, 18, height, width))


def test_dense_and_deformable_convolutions_count_two_flops_per_multiply_add():
    multiply_adds = 2 * 8 * 10 * 12 * 3 * 3 * 3  # batch 2, 8 outputs at 10x12, 3 channels x 3x3 kernel
    pixel_values = torch.randn(2, 3, 10, 12)
    assert count_flops(torch.nn.Conv2d(3, 8, 3, padding=1), {"input": pixel_values}) == 2 * multiply_adds
    assert count_flops(_Deformable(), {"pixel_values": pixel_values}) == 2 * multiply_adds


def test_paper_unit_counts_a_multiply_add_once():
    assert paper_gflops(99_200_000_000) == 49.6


def test_the_model_counts_the_same_with_its_onednn_inference_ops(monkeypatch):
    """In eval mode on CPU the model runs oneDNN's fused ops, which the counter does not know: it must see aten."""
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    inputs = {"pixel_values": torch.randn(1, 3, 64, 96)}
    with torch.inference_mode():
        counted = count_flops(model, inputs)
        monkeypatch.setattr(modeling_fastinst, "onednn_applies", lambda hidden_state, weight: False)
        assert counted == count_flops(model, inputs) > 0
