"""ONNX export: onnxruntime reproduces the PyTorch outputs at several input sizes and batch sizes."""

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from test_modeling_fastinst import tiny_config

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.inference.onnx_export import OUTPUT_NAMES, export_onnx
from fastinst_hf.modeling_fastinst import adaptive_average_pooling_matrix


@pytest.mark.parametrize("size, pool", [(8, 1), (11, 2), (11, 3), (7, 6), (5, 6), (23, 6)])
def test_pooling_matrix_equals_adaptive_average_pooling(size, pool):
    x = torch.randn(2, 3, size, size + 3)
    rows = adaptive_average_pooling_matrix(size, pool, x)
    columns = adaptive_average_pooling_matrix(size + 3, pool, x)
    expected = F.adaptive_avg_pool2d(x, pool)
    torch.testing.assert_close(torch.einsum("ph,bchw,qw->bcpq", rows, x, columns), expected, rtol=1e-6, atol=1e-6)


def test_onnx_export_matches_pytorch_with_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    path = export_onnx(model, tmp_path / "fastinst.onnx", height=128, width=160)
    assert path.is_file() and not list(tmp_path.glob(".*"))  # no temporary file left
    session = onnxruntime.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for shape in [(1, 3, 128, 160), (2, 3, 192, 96), (1, 3, 96, 288)]:
        pixel_values = torch.randn(*shape)
        with torch.no_grad():
            expected = model(pixel_values)
        class_logits, mask_logits = session.run(None, {"pixel_values": pixel_values.numpy()})
        np.testing.assert_allclose(class_logits, expected.class_queries_logits.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(mask_logits, expected.masks_queries_logits.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, tmp_path / "bad.onnx", height=100, width=160)


def test_failed_onnx_save_leaves_no_file(tmp_path, monkeypatch):
    class FailingProgram:
        def save(self, destination):
            with open(destination, "wb") as file:
                file.write(b"truncated")
            raise RuntimeError("simulated failure while saving")

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: FailingProgram())
    model = FastInstForInstanceSegmentation(tiny_config()).eval()
    with pytest.raises(RuntimeError, match="simulated failure"):
        export_onnx(model, tmp_path / "out" / "fastinst.onnx", height=128, width=160)
    assert list((tmp_path / "out").iterdir()) == []


def test_onnx_export_of_the_deformable_backbone(tmp_path):
    """The R50-vd-DCN backbone exports to ONNX DeformConv (opset 19); onnxruntime runs it with non-zero offsets."""
    import onnx

    from fastinst_hf import FastInstResNetVdConfig

    backbone = FastInstResNetVdConfig(
        stem_width=8,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(0)
    model = FastInstForInstanceSegmentation(tiny_config(backbone_config=backbone)).eval()
    for name, module in model.named_modules():
        if name.endswith("conv2_offset"):
            torch.nn.init.normal_(module.weight, std=0.05)
            torch.nn.init.normal_(module.bias, std=0.5)
    path = export_onnx(model, tmp_path / "dcn.onnx", height=128, width=160)
    assert "DeformConv" in {node.op_type for node in onnx.load(str(path)).graph.node}
    session = onnxruntime.InferenceSession(str(path))
    pixel_values = torch.randn(2, 3, 192, 96)
    with torch.no_grad():
        expected = model(pixel_values)
    class_logits, mask_logits = session.run(None, {"pixel_values": pixel_values.numpy()})
    np.testing.assert_allclose(class_logits, expected.class_queries_logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(mask_logits, expected.masks_queries_logits.numpy(), atol=1e-4, rtol=1e-4)
