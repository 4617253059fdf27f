"""Official checkpoint conversion: the CLI, config files, and the errors a user can hit."""

import json

import pytest
import torch
from conftest import FIXTURES, fixture_pixel_values

from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.cli import main as cli_main
from fastinst_hf.conversion.official import (
    CheckpointConversionError,
    config_from_detectron2,
    convert_checkpoint,
    load_official_checkpoint,
    official_checkpoint_url,
    rename_official_key,
)
from fastinst_hf.releases import variant_config


def main(argv: list[str]) -> int:
    return cli_main(["convert", *argv])


D1 = FIXTURES / "d1_r50slim_small"
D3 = FIXTURES / "d3_r50slim_small"


def test_cli_writes_a_loadable_folder(tmp_path, capsys):
    # A detectron2 checkpoint keeps the weights under "model", next to training state.
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": load_official_checkpoint(D1 / "model_state_dict.pt"), "iteration": 7}, checkpoint)
    out = tmp_path / "converted"
    assert main(["--checkpoint", str(checkpoint), "--config", str(D1 / "config.yaml"), "--output-dir", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "fastinst" and config["decoder_layers"] == 1 and config["hidden_dim"] == 64
    loaded = FastInstForInstanceSegmentation.from_pretrained(out).eval()
    reference = convert_checkpoint(D1 / "model_state_dict.pt", config_file=D1 / "config.yaml")
    with torch.no_grad():
        expected = reference(fixture_pixel_values("d1_r50slim_small"))
        actual = loaded(fixture_pixel_values("d1_r50slim_small"))
    # Same weights; only float rounding may differ (loaded tensors have another memory alignment, so other kernels).
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, rtol=1e-5, atol=1e-5)


def test_every_official_key_is_mapped_or_dropped():
    state_dict = load_official_checkpoint(D3 / "model_state_dict.pt")
    unmapped = sorted(k for k in state_dict if rename_official_key(k) is None)
    assert unmapped == ["criterion.empty_weight", "sem_seg_head.predictor.criterion.empty_weight"]


def test_upstream_config_file_with_base(tmp_path):
    """An upstream config is a short file over `_BASE_`; the result equals the named preset."""
    (tmp_path / "Base.yaml").write_text(
        "MODEL:\n  BACKBONE:\n    NAME: build_resnet_backbone\n  PIXEL_MEAN: [123.675, 116.280, 103.530]\n"
        "  PIXEL_STD: [58.395, 57.120, 57.375]\n  RESNETS:\n    DEPTH: 50\n    STRIDE_IN_1X1: False\n"
        "  SEM_SEG_HEAD:\n    NUM_CLASSES: 80\n  FASTINST:\n    DEC_LAYERS: 1\nINPUT:\n  FORMAT: RGB\n"
        "  MIN_SIZE_TEST: 640\n  MAX_SIZE_TEST: 853\n"
    )
    child = tmp_path / "sub" / "fastinst_R50-vd-dcn_ppm-fpn_x3_640.yaml"
    child.parent.mkdir()
    child.write_text(
        "_BASE_: ../Base.yaml\nMODEL:\n  BACKBONE:\n    NAME: build_resnet_vd_backbone\n  RESNETS:\n"
        "    DEFORM_ON_PER_STAGE: [False, False, True, True]\n  FASTINST:\n    DEC_LAYERS: 3\n"
    )
    config = config_from_detectron2(child)
    preset = variant_config("fastinst-d3-r50-vd-dcn")
    assert config.to_diff_dict() == preset.to_diff_dict()


def test_fixture_config_dump_is_read_as_is():
    config = config_from_detectron2(D3 / "config.yaml")
    assert (config.decoder_layers, config.hidden_dim, config.num_attention_heads, config.dim_feedforward) == (
        3,
        64,
        4,
        128,
    )
    assert config.backbone_config.embedding_size == 16 and config.backbone_config.hidden_sizes == [64, 128, 256, 512]
    assert (config.test_shortest_edge, config.test_longest_edge) == (256, 400)


def test_mismatched_config_names_keys_and_shapes():
    with pytest.raises(CheckpointConversionError) as error:
        convert_checkpoint(D1 / "model_state_dict.pt", config_file=D3 / "config.yaml")
    message = str(error.value)
    assert "model keys the checkpoint does not provide" in message and "model.decoder.layers.1." in message
    stem = r"model.backbone.embedder.embedder.convolution.weight: checkpoint \(16, 3, 7, 7\) vs model \(64, 3, 7, 7\)"
    with pytest.raises(CheckpointConversionError, match=r"shape mismatches \(359\): \['" + stem + ".* and 349 more"):
        convert_checkpoint(D1 / "model_state_dict.pt", variant="fastinst-d1-r50")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    state_dict = load_official_checkpoint(D1 / "model_state_dict.pt")
    state_dict["sem_seg_head.some_new_layer.weight"] = torch.zeros(1)
    del state_dict["sem_seg_head.predictor.meta_pos_embed"]
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointConversionError) as error:
        convert_checkpoint(path, config_file=D1 / "config.yaml")
    assert "sem_seg_head.some_new_layer.weight" in str(error.value)
    assert "model.position_embedding" in str(error.value)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_official_checkpoint(tmp_path / "absent.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointConversionError, match="not a PyTorch checkpoint"):
        load_official_checkpoint(text)
    truncated = tmp_path / "truncated.pth"
    data = (D1 / "model_state_dict.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2] + data[-2000:])
    with pytest.raises(CheckpointConversionError, match="truncated or corrupted"):
        load_official_checkpoint(truncated)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(CheckpointConversionError, match="no state dict"):
        load_official_checkpoint(empty)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("MODEL: [unclosed")
    with pytest.raises(CheckpointConversionError, match="not valid YAML"):
        config_from_detectron2(bad_yaml)
    bgr = tmp_path / "bgr.yaml"
    bgr.write_text("INPUT:\n  FORMAT: BGR\n")
    with pytest.raises(CheckpointConversionError, match="RGB"):
        config_from_detectron2(bgr)


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    code = main(
        ["--checkpoint", str(tmp_path / "x.pth"), "--variant", "fastinst-d1-r50", "--output-dir", str(tmp_path)]
    )
    assert code == 2 and "--checkpoint: file not found" in capsys.readouterr().err


def test_release_urls():
    assert official_checkpoint_url("fastinst-d3-r50-vd-dcn") == (
        "https://github.com/junjiehe96/FastInst/releases/download/v0.1.0/fastinst_R50-vd-dcn_ppm-fpn_x3_640_40.1.pth"
    )
    with pytest.raises(ValueError, match="unknown FastInst variant"):
        official_checkpoint_url("fastinst-d9")


def test_torchvision_imagenet_backbone_weights_load_exactly(tmp_path):
    """A torchvision ResNet-50 state dict (here random) lands in the R50 backbone: same features as torchvision's."""
    import torchvision

    from fastinst_hf import FastInstModel
    from fastinst_hf.conversion.imagenet import load_imagenet_backbone

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    for module in resnet.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    model = FastInstModel(variant_config("fastinst-d1-r50")).eval()
    model.set_batch_norm_folding(False)  # op for op as torchvision's, so that "exactly" means the weights
    load_imagenet_backbone(model, path)
    image = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        features = model.backbone(image).feature_maps
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(image))))
        expected = []
        for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
            x = stage(x)
            expected.append(x)
    for ours, theirs in zip(features, expected[1:]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(CheckpointConversionError, match="shape mismatches"):
        load_imagenet_backbone(model, wrong)
    vd = FastInstModel(variant_config("fastinst-d1-r50-vd-dcn"))
    with pytest.raises(ValueError, match="timm resnet50d"):
        load_imagenet_backbone(vd, "torchvision")


def test_timm_resnet_d_weights_load_into_the_vd_backbone(tmp_path):
    """timm's resnet50d names are the vd backbone's; the deformable offsets, absent from ImageNet weights, are zero."""
    from fastinst_hf import FastInstModel
    from fastinst_hf.conversion.imagenet import load_imagenet_backbone

    model = FastInstModel(variant_config("fastinst-d1-r50-vd-dcn"))
    state = {k: v.clone().normal_() for k, v in model.backbone.state_dict().items() if "conv2_offset" not in k}
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "resnet50d.pth"
    torch.save(state, path)
    load_imagenet_backbone(model, path)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    offsets = [v for k, v in loaded.items() if "conv2_offset" in k]
    assert len(offsets) == 2 * (6 + 3) and all(not v.any() for v in offsets)
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointConversionError, match=r"model keys the checkpoint does not provide \(1\)"):
        load_imagenet_backbone(model, path)
