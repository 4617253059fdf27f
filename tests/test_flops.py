"""The one FLOPs count (`fastinst_hf.utils.flops`): dense and deformable convolutions, the paper's unit."""

import torch
from torchvision.ops import DeformConv2d

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
