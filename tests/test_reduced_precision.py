"""Reduced precision as users load it (`from_pretrained(dtype=torch.bfloat16)`), the fp32 split and the policy."""

import copy

import pytest
import torch
from PIL import Image
from transformers import pipeline

from fastinst_hf import DEFAULT_MODEL, FastInstForInstanceSegmentation
from fastinst_hf.image_processing_fastinst import FastInstImageProcessor
from fastinst_hf.inference import precision
from fastinst_hf.inference.precision import DEFAULT_SPLIT, apply_split, choose_precision
from fastinst_hf.inference.resolve import DEMO_IMAGE_DIR
from fastinst_hf.utils.errors import InputError


@pytest.fixture(scope="module")
def bf16_model():
    return FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16).eval()


def part_dtypes(model) -> dict[str, set]:
    dtypes = {}
    for name, tensor in model.named_parameters():
        dtypes.setdefault(name.split(".")[1], set()).add(tensor.dtype)
    return dtypes


def test_from_pretrained_bf16_keeps_all_but_the_backbone_in_float32(bf16_model):
    dtypes = part_dtypes(bf16_model)
    assert dtypes.pop("backbone") == {torch.bfloat16}
    assert set(dtypes) == {"pixel_decoder", "query_proposal", "decoder", "position_embedding"}
    assert all(found == {torch.float32} for found in dtypes.values())
    # The emulation the accuracy check uses gives the same model.
    fp32 = FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL).eval()
    emulated = apply_split(copy.deepcopy(fp32), torch.bfloat16, DEFAULT_SPLIT)
    pixel_values = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded, made = bf16_model(pixel_values), emulated(pixel_values)
    assert loaded.masks_queries_logits.dtype == torch.float32  # the heads are float32
    torch.testing.assert_close(loaded.masks_queries_logits, made.masks_queries_logits, rtol=1e-4, atol=1e-4)


def test_bf16_round_trip_through_the_pipeline(bf16_model):
    image = Image.open(sorted(DEMO_IMAGE_DIR.glob("*.png"))[0]).convert("RGB")
    processor = FastInstImageProcessor.from_pretrained(DEFAULT_MODEL)
    segmenter = pipeline("image-segmentation", model=bf16_model, image_processor=processor)
    results = segmenter(image, subtask="instance", threshold=0.5)
    reference = pipeline(
        "image-segmentation",
        model=FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL).eval(),
        image_processor=processor,
    )(image, subtask="instance", threshold=0.5)
    assert results and all(r["mask"].size == image.size for r in results)
    assert sorted(r["label"] for r in results) == sorted(r["label"] for r in reference)


def test_a_whole_bf16_model_runs_and_post_processes_in_float32():
    model = apply_split(FastInstForInstanceSegmentation.from_pretrained(DEFAULT_MODEL).eval(), torch.bfloat16, "none")
    assert {tensor.dtype for tensor in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 128, 160))  # float32 input: cast by the model
    assert outputs.masks_queries_logits.dtype == torch.bfloat16
    results = FastInstImageProcessor().post_process_instance_segmentation(
        outputs, target_sizes=[(128, 160)], image_sizes=[(128, 160)]
    )
    assert results[0]["segmentation"].shape == (128, 160)
    with pytest.raises(InputError, match="split must be one of"):
        apply_split(model, torch.bfloat16, "everything")


def test_choose_precision(monkeypatch):
    assert choose_precision("fp32") == (torch.float32, "float32 (asked for)")
    assert choose_precision("bf16")[0] == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    dtype, reason = choose_precision("auto", "cpu")
    assert dtype == torch.float32 and "no bf16 units" in reason
    assert "emulated" in choose_precision("bf16")[1]
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "DEFAULT_SPLIT_PASSES", False)
    dtype, reason = choose_precision("auto", "cpu")
    assert dtype == torch.float32 and "does not pass the accuracy rule" in reason
    monkeypatch.setattr(precision, "DEFAULT_SPLIT_PASSES", True)
    assert choose_precision("auto", "cpu")[0] == torch.bfloat16
    with pytest.raises(InputError, match="--precision must be one of"):
        choose_precision("int4")


def test_predictor_precision_choice_and_its_runtime():
    """`Predictor(precision=...)`: fp32 keeps predict's fastest float32 runtime, bf16 runs the bfloat16-weights
    runtime, auto is float32 while the default split has not passed the rule on both models; the reason is kept."""
    from fastinst_hf.inference.predictor import choose_runtime
    from fastinst_hf.inference.runtimes import BF16_WEIGHTS, default_runtime

    cpu = torch.device("cpu")
    assert choose_runtime("auto", "fp32", cpu)[0] == default_runtime(cpu)
    assert choose_runtime("eager", "auto", cpu) == ("eager", "float32 (asked for)")
    runtime, note = choose_runtime("auto", "bf16", cpu)
    assert runtime == BF16_WEIGHTS and "bfloat16" in note
    assert choose_runtime("auto", "auto", cpu)[0] == default_runtime(cpu)
    with pytest.raises(InputError, match="--precision bf16"):
        choose_runtime("eager", "bf16", cpu)


def test_predict_with_bf16_weights_prints_its_choice_and_finds_the_fp32_instances(tmp_path, capsys):
    import json

    from fastinst_hf.cli import main

    image = DEMO_IMAGE_DIR / "shapes_1.png"
    labels = {}
    for name in ("fp32", "bf16"):
        out = tmp_path / name
        assert main(["predict", str(image), "--output", str(out), "--device", "cpu", "--precision", name]) == 0
        labels[name] = sorted(i["label"] for i in json.loads((out / "shapes_1.json").read_text())["instances"])
    header = capsys.readouterr().out
    assert "runtime: eager (float32 (asked for))" in header and "runtime: bf16-weights (bfloat16" in header
    assert labels["bf16"] == labels["fp32"] and labels["fp32"]
