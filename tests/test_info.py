"""`fastinst-hf info`: parameters, FLOPs at the test size (the shared `count_flops`), classes, backbone, origin."""

import re

import pytest
import torch
from conftest import tiny_config

import fastinst_hf.cli.info as info
from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.cli import main
from fastinst_hf.conversion.official import save_converted
from fastinst_hf.releases import variant_config
from fastinst_hf.utils.flops import count_flops, paper_gflops


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return FastInstForInstanceSegmentation(tiny_config()).eval()


def test_info_of_a_folder(tiny_model, tmp_path, capsys):
    folder = save_converted(tiny_model, tmp_path / "model")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    fields = dict(re.findall(r"^([\w ]+):\s+(.*)$", out, re.MULTILINE))
    assert fields["weights"] == f"local folder {folder}"
    parameters = sum(p.numel() for p in tiny_model.parameters())
    assert fields["parameters"] == f"{parameters / 1e6:.2f} M"
    # The test size of tiny_config is 64 / 96: a 480x640 image becomes 64x85, padded to 64x96.
    assert info.test_input_size(tiny_model.config) == (64, 96)
    expected = paper_gflops(count_flops(tiny_model, {"pixel_values": torch.zeros(1, 3, 64, 96)}))
    assert fields["FLOPs"].startswith(f"{expected:.1f} GFLOPs") and "input 64x96" in fields["FLOPs"]
    assert fields["classes"].startswith(f"{tiny_model.config.num_labels} (")
    assert fields["backbone"].startswith("ResNet-10 (basic blocks")


def test_info_of_the_default_model_names_its_origin(capsys):
    assert main(["info"]) == 0
    assert "the demo model bundled with the package" in capsys.readouterr().out


@pytest.mark.parametrize(
    "variant, name",
    [("fastinst-d1-r50", "ResNet-50"), ("fastinst-d3-r101", "ResNet-101"), ("fastinst-d3-r50-vd-dcn", "ResNet-50-vd")],
)
def test_backbone_names_of_the_variants(variant, name):
    text = info.backbone_name(variant_config(variant).backbone_config)
    assert text.startswith(f"{name} ") or text.startswith(f"{name}-DCN")


def test_variants_table_lists_the_five_beside_the_paper(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(info, "random_variant", lambda name: tiny_model)  # full-size models take minutes on a CPU
    assert main(["info", "--variant", "all"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fastinst-")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(info.VARIANT_NAMES)
    paper = {row.split(" | ")[0][2:]: row.rstrip(" |").split(" | ")[-1] for row in rows}
    assert paper == {name: str(info.PAPER_GFLOPS.get(name, "-")) for name in info.VARIANT_NAMES}
