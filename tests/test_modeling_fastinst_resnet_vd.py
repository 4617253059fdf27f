"""Tests of the ResNet-vd-DCN backbone of the official R50-vd-DCN FastInst checkpoints.

The references are independent of the module under test: the official key list is rebuilt from the checkpoint
description (the upstream ResNet-vd-DCN backbone, `fastinst/modeling/backbone/resnet_vd.py`), the deformable convolution is checked against plain convolutions,
a hand-computed bilinear sample and a `grid_sample` implementation, and the whole backbone against a functional
ResNet-D written here from `torch.nn.functional` ops.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fastinst_hf.configuration_fastinst_resnet_vd import FastInstResNetVdConfig
from fastinst_hf.modeling_fastinst_resnet_vd import (
    FastInstResNetVdBackbone,
    FastInstResNetVdDeformConv2d,
    FastInstResNetVdPreTrainedModel,
)

TINY = dict(stem_width=8, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2])
ALL_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def official_r50_vd_dcn_shapes() -> dict[str, tuple[int, ...]]:
    """The official `backbone.*` keys (prefix stripped) and shapes of R50-vd-DCN, from the reference §6.2."""
    shapes = {}

    def bn(name, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (channels,)

    shapes["conv1.0.weight"] = (32, 3, 3, 3)
    bn("conv1.1", 32)
    shapes["conv1.3.weight"] = (32, 32, 3, 3)
    bn("conv1.4", 32)
    shapes["conv1.6.weight"] = (64, 32, 3, 3)
    bn("bn1", 64)
    in_channels = 64
    for layer, (planes, blocks, deformable) in enumerate(
        zip((64, 128, 256, 512), (3, 4, 6, 3), (False, False, True, True)), start=1
    ):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, in_channels, 1, 1)
            bn(f"{prefix}.bn1", planes)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{prefix}.bn2", planes)
            shapes[f"{prefix}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{prefix}.bn3", 4 * planes)
            if block == 0:
                shapes[f"{prefix}.downsample.1.weight"] = (4 * planes, in_channels, 1, 1)
                bn(f"{prefix}.downsample.2", 4 * planes)
            if deformable:
                shapes[f"{prefix}.conv2_offset.weight"] = (18, planes, 3, 3)
                shapes[f"{prefix}.conv2_offset.bias"] = (18,)
            in_channels = 4 * planes
    return shapes


def test_state_dict_matches_official_r50_vd_dcn():
    expected = official_r50_vd_dcn_shapes()
    assert len(expected) == 293  # the reference's backbone key count

    model = FastInstResNetVdBackbone(FastInstResNetVdConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == expected

    # Summed from the official shapes: 24,078,338 state-dict values, of which 53,248 are BN running statistics.
    # (With the rest of FastInst this gives the reference's 30.28M / 34.80M for D1 / D3.)
    assert sum(math.prod(shape) for shape in expected.values()) == 24_078_338
    assert sum(p.numel() for p in model.parameters()) == 24_078_338 - 53_248 == 24_025_090


def test_fresh_init_and_outputs():
    config = FastInstResNetVdConfig(**TINY, out_features=["stage2", "stage3", "stage4"])
    model = FastInstResNetVdBackbone(config).eval()
    for name, module in model.named_modules():
        if name.endswith("conv2_offset"):
            assert not module.weight.any() and not module.bias.any(), name
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any()
            assert not module.running_mean.any() and torch.equal(module.running_var, torch.ones_like(module.bias))
    assert model.layer3[0].conv2.weight.std() > 0  # the deformable weight is initialised too
    assert model.channels == [32, 64, 128]

    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outputs = model(pixel_values)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
    assert [tuple(f.shape) for f in outputs.feature_maps] == [(1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
    assert outputs.hidden_states is None
    assert len(as_tuple) == 2 and len(as_tuple[1]) == 5
    for a, b in zip(outputs.feature_maps, as_tuple[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FastInstResNetVdBackbone(FastInstResNetVdConfig(**TINY, out_features=["stage2", "stage3", "stage4"]))
    randomise(model)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = FastInstResNetVdBackbone.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, FastInstResNetVdPreTrainedModel)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(pixel_values).feature_maps, loaded(pixel_values).feature_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_from_pretrained_without_offsets_zero_initialises_them(tmp_path):
    """timm's `resnet50d` ImageNet weights have no `conv2_offset`: loading them must start from zero offsets."""
    torch.manual_seed(0)
    model = FastInstResNetVdBackbone(FastInstResNetVdConfig(**TINY))
    randomise(model)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "conv2_offset" not in k}, tmp_path / "model.safetensors")

    loaded = FastInstResNetVdBackbone.from_pretrained(tmp_path)
    for name, tensor in loaded.state_dict().items():
        if "conv2_offset" in name:
            assert not tensor.any(), name
        else:
            torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Deformable convolution (check A)


def deform_conv(weight, x, offset, stride=1, padding=1):
    conv = FastInstResNetVdDeformConv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride, padding)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv(x, offset)


def shift(x, dy, dx, extra=0):
    """`out[..., i, j] = x[..., i + dy, j + dx]` (zero outside the image) for `i < height + extra`, `j < width + extra`."""
    height, width = x.shape[-2:]
    margin = max(abs(dy), abs(dx)) + extra
    padded = F.pad(x, (margin, margin, margin, margin))
    return padded[..., margin + dy : margin + dy + height + extra, margin + dx : margin + dx + width + extra]


@pytest.mark.parametrize("stride", [1, 2])
def test_deform_conv_zero_offset_is_conv2d(stride):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 11, 14), torch.randn(7, 5, 3, 3)
    expected = F.conv2d(x, weight, stride=stride, padding=1)
    offset = torch.zeros(2, 18, *expected.shape[-2:])
    torch.testing.assert_close(deform_conv(weight, x, offset, stride), expected, rtol=1e-5, atol=1e-5)


def test_deform_conv_integer_offsets():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 4, 10, 13), torch.randn(6, 4, 3, 3)

    # The same (dy, dx) on every tap: an unpadded convolution of the shifted zero-padded input (shifting
    # after padding, as the deformed taps at the border read image pixels, not the padding).
    dy, dx = 1, -2
    offset = torch.tensor([dy, dx], dtype=torch.float).repeat(9).view(1, 18, 1, 1).expand(2, 18, 10, 13)
    expected = F.conv2d(shift(x, dy - 1, dx - 1, extra=2), weight)
    torch.testing.assert_close(deform_conv(weight, x, offset), expected, rtol=1e-5, atol=1e-5)

    # A different (dy, dx) on each tap k (row-major): channels 2k, 2k+1 are (dy, dx) of tap k.
    tap_offsets = [(k % 3 - 1, 2 - k // 2) for k in range(9)]
    offset = torch.tensor(tap_offsets, dtype=torch.float).view(1, 18, 1, 1).expand(2, 18, 10, 13)
    expected = 0
    for k, (tap_dy, tap_dx) in enumerate(tap_offsets):
        ky, kx = divmod(k, 3)  # tap k reads x[y - 1 + ky + dy_k, x - 1 + kx + dx_k]
        tap_weight = weight[:, :, ky, kx, None, None]
        expected = expected + F.conv2d(shift(x, ky - 1 + tap_dy, kx - 1 + tap_dx), tap_weight)
    torch.testing.assert_close(deform_conv(weight, x, offset), expected, rtol=1e-5, atol=1e-5)


def bilinear_zero_outside(image, y, x):
    """Bilinear sample of `image` [C, H, W] at real (y, x), pixels outside the image count as zero."""
    height, width = image.shape[-2:]
    y0, x0 = math.floor(y), math.floor(x)
    value = torch.zeros(image.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                value += wy * wx * image[:, yy, xx].double()
    return value


def test_deform_conv_fractional_offsets_by_hand():
    torch.manual_seed(0)
    stride = 2
    x, weight = torch.randn(1, 3, 9, 12), torch.randn(4, 3, 3, 3)
    offset = torch.rand(1, 18, 5, 6) * 6 - 3  # up to 3 pixels in any direction, so some taps leave the image
    output = deform_conv(weight, x, offset, stride)
    # An inner pixel and two border pixels, where taps fall partly or wholly outside the image.
    for out_y, out_x in [(2, 3), (0, 0), (4, 5)]:
        expected = torch.zeros(4, dtype=torch.float64)
        for k in range(9):
            ky, kx = divmod(k, 3)
            y = out_y * stride - 1 + ky + offset[0, 2 * k, out_y, out_x].item()
            x_ = out_x * stride - 1 + kx + offset[0, 2 * k + 1, out_y, out_x].item()
            expected += weight[:, :, ky, kx].double() @ bilinear_zero_outside(x[0], y, x_)
        torch.testing.assert_close(output[0, :, out_y, out_x].double(), expected, rtol=1e-5, atol=1e-5)


def deform_conv_reference(x, weight, offset, stride=1, padding=1):
    """DCNv1 with `grid_sample` (bilinear, zeros outside, align_corners so that grid units are pixel centres)."""
    batch, _, height, width = x.shape
    out_h, out_w = offset.shape[-2:]
    kernel = weight.shape[-1]
    base_y = (torch.arange(out_h, dtype=x.dtype) * stride - padding).view(1, out_h, 1)
    base_x = (torch.arange(out_w, dtype=x.dtype) * stride - padding).view(1, 1, out_w)
    output = 0
    for k in range(kernel * kernel):
        ky, kx = divmod(k, kernel)
        y = base_y + ky + offset[:, 2 * k]
        x_ = base_x + kx + offset[:, 2 * k + 1]
        grid = torch.stack((2 * x_ / (width - 1) - 1, 2 * y / (height - 1) - 1), dim=-1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        output = output + torch.einsum("oc,bchw->bohw", weight[:, :, ky, kx], sampled)
    return output


def test_deform_conv_matches_grid_sample_reference_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 13, requires_grad=True)
    offset = (torch.randn(2, 18, 5, 7) * 2).requires_grad_()
    conv = FastInstResNetVdDeformConv2d(4, 6, 3, stride=2, padding=1)
    torch.nn.init.normal_(conv.weight)
    output = conv(x, offset)
    torch.testing.assert_close(output, deform_conv_reference(x, conv.weight, offset, stride=2), rtol=1e-5, atol=1e-5)

    output.square().sum().backward()
    for grad in (x.grad, conv.weight.grad, offset.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_deform_conv_runs_in_fp32_and_keeps_input_dtype():
    torch.manual_seed(0)
    x, offset = torch.randn(1, 4, 8, 8), torch.randn(1, 18, 8, 8)
    conv = FastInstResNetVdDeformConv2d(4, 4)
    expected = conv(x, offset)
    output = conv.to(torch.bfloat16)(x.bfloat16(), offset.bfloat16())
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=0.05, atol=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Whole backbone against a functional ResNet-D (check B)


def randomise(model):
    """Random weights, BN statistics and offset convolutions, so that every parameter matters."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif "conv2_offset" in name:
                tensor.normal_(0, 0.05)
            elif tensor.dim() == 1:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.normal_(0, 0.1)
            else:
                tensor.normal_(0, math.sqrt(2 / tensor[0].numel()))


def reference_backbone(state, x, config, plain_conv2=False):
    """
    ResNet-D with DCNv1 stages from `torch.nn.functional`, reading the timm-named state dict. With `plain_conv2`
    every 3x3 convolution is `F.conv2d` (a plain ResNet-D; what zero offsets must reproduce).
    """

    def bn(h, name):
        return F.batch_norm(
            h,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    h = F.relu(bn(F.conv2d(x, state["conv1.0.weight"], stride=2, padding=1), "conv1.1"))
    h = F.relu(bn(F.conv2d(h, state["conv1.3.weight"], padding=1), "conv1.4"))
    h = F.relu(bn(F.conv2d(h, state["conv1.6.weight"], padding=1), "bn1"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    outputs = [h]
    for layer, (depth, deformable) in enumerate(zip(config.depths, config.deformable_stages), start=1):
        for block in range(depth):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            shortcut = h
            if f"{p}.downsample.1.weight" in state:
                if stride > 1:
                    shortcut = F.avg_pool2d(shortcut, 2, stride, ceil_mode=True, count_include_pad=False)
                shortcut = bn(F.conv2d(shortcut, state[f"{p}.downsample.1.weight"]), f"{p}.downsample.2")
            h = F.relu(bn(F.conv2d(h, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            if deformable and not plain_conv2:
                offset = F.conv2d(h, state[f"{p}.conv2_offset.weight"], state[f"{p}.conv2_offset.bias"], stride, 1)
                h = deform_conv_reference(h, state[f"{p}.conv2.weight"], offset, stride)
            else:
                h = F.conv2d(h, state[f"{p}.conv2.weight"], stride=stride, padding=1)
            h = F.relu(bn(h, f"{p}.bn2"))
            h = F.relu(bn(F.conv2d(h, state[f"{p}.conv3.weight"]), f"{p}.bn3") + shortcut)
        outputs.append(h)
    return outputs


@pytest.mark.parametrize("zero_offsets", [True, False], ids=["zero-offsets", "random-offsets"])
def test_backbone_matches_functional_reference(zero_offsets):
    torch.manual_seed(0)
    config = FastInstResNetVdConfig(**TINY, deformable_stages=[False, True, True, True], out_features=ALL_STAGES)
    model = FastInstResNetVdBackbone(config)
    randomise(model)
    if zero_offsets:  # the deformable stages must then be a plain ResNet-D
        for name, tensor in model.state_dict().items():
            if "conv2_offset" in name:
                tensor.zero_()
    model.eval()
    # Odd sizes exercise the ceil-mode average pool of the shortcuts.
    pixel_values = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        outputs = model(pixel_values).feature_maps
        expected = reference_backbone(model.state_dict(), pixel_values, config, plain_conv2=zero_offsets)
    assert [tuple(o.shape[-2:]) for o in outputs] == [(18, 23), (18, 23), (9, 12), (5, 6), (3, 3)]
    # Random offsets send every stage through bilinear sampling, whose float32 rounding differs from the reference's
    # grid_sample and grows over the stages (about 3e-5 relative at the last one).
    tolerance = 1e-5 if zero_offsets else 1e-4
    for output, reference in zip(outputs, expected):
        scale = reference.abs().max()
        assert (output - reference).abs().max() <= tolerance * scale
