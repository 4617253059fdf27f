"""The `fastinst-hf` command line, model-name resolution, overlays and the stage benchmark."""

import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_config
from PIL import Image

import fastinst_hf
from fastinst_hf import FastInstForInstanceSegmentation
from fastinst_hf.cli import main
from fastinst_hf.conversion.official import config_from_detectron2, save_converted
from fastinst_hf.data.synthetic import make_shapes_dataset
from fastinst_hf.inference import resolve as hub_models
from fastinst_hf.inference.predictor import Predictor
from fastinst_hf.inference.resolve import DEFAULT_MODEL_DIR, DEMO_IMAGE_DIR, ModelResolutionError, resolve_model
from fastinst_hf.modeling_fastinst import FastInstFoldingConv2d
from fastinst_hf.utils.arguments import default_num_workers
from fastinst_hf.utils.device import synchronize
from fastinst_hf.utils.images import load_image
from fastinst_hf.utils.visualize import draw_instances, mask_contour

FIXTURE = Path(__file__).parent / "fixtures" / "d1_r50slim_small"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised FastInst small enough to run in milliseconds, saved with its image processor."""
    torch.manual_seed(0)
    config = tiny_config()
    return save_converted(FastInstForInstanceSegmentation(config), tmp_path_factory.mktemp("tiny") / "model")


def _write_image(path: Path, seed: int, size=(72, 96)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_image(folder / "a.png", 0)
    _write_image(folder / "b.jpg", 1)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _predict(*args) -> int:
    return main(["predict", *map(str, args), "--device", "cpu"])


def test_predict_file_writes_overlay_and_json_with_valid_rle(tiny_model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    image_path = image_dir / "a.png"
    assert _predict(image_path, "--model", tiny_model_dir, "--threshold", 0.0, "--output", out) == 0
    stdout = capsys.readouterr().out
    assert "preprocess" in stdout and "inference" in stdout and "postprocess" in stdout and " ms" in stdout

    overlay = Image.open(out / "a_overlay.png")
    assert overlay.size == (96, 72) and overlay.mode == "RGB"
    record = json.loads((out / "a.json").read_text())
    assert record["image"] == str(image_path) and (record["height"], record["width"]) == (72, 96)
    assert record["instances"], "threshold 0 keeps every non-empty mask of the random model"

    result = Predictor(tiny_model_dir, device="cpu", threshold=0.0).predict_image(load_image(image_path))
    masks, labels, scores = result.masks, result.labels, result.scores
    assert len(record["instances"]) == len(masks)
    for instance, mask, label, score in zip(record["instances"], masks, labels, scores):
        rle = instance["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [72, 96]
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(decoded, mask)
        ys, xs = np.nonzero(mask)
        assert instance["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert instance["area"] == mask.sum()
        assert instance["label_id"] == label and instance["label"] == ("circle", "square")[label]
        assert instance["score"] == pytest.approx(score, abs=1e-6)


def test_predict_names_a_missing_graph_runtime_package_before_loading_the_model(
    image_dir, tmp_path, capsys, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else find_spec(name))
    out = tmp_path / "out"
    assert (
        _predict(image_dir / "a.png", "--model", tmp_path / "no_model", "--output", out, "--runtime", "openvino") == 2
    )
    assert "--runtime openvino: the package openvino is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_predict_default_runtime_folds_norms_and_finds_the_eager_instances(tiny_model_dir, image_dir, tmp_path):
    outputs = {}
    for runtime in ("auto", "eager"):
        out = tmp_path / runtime
        argv = (image_dir / "a.png", "--model", tiny_model_dir, "--threshold", 0.0, "--output", out)
        assert _predict(*argv, "--runtime", runtime, "--device", "cpu") == 0
        outputs[runtime] = json.loads((out / "a.json").read_text())["instances"]
    assert len(outputs["auto"]) > 0
    assert [i["label_id"] for i in outputs["auto"]] == [i["label_id"] for i in outputs["eager"]]
    for folded, eager in zip(outputs["auto"], outputs["eager"]):
        assert folded["score"] == pytest.approx(eager["score"], abs=1e-5)
        assert abs(folded["area"] - eager["area"]) <= 0.001 * eager["area"] + 2


def test_predict_default_runtime_is_the_model_folding_and_fusing_itself(tiny_model_dir):
    predictor = Predictor(tiny_model_dir, device="cpu")
    assert predictor.runtime_name == "eager"
    model = predictor.runtime.model
    convs = [m for m in model.modules() if isinstance(m, FastInstFoldingConv2d)]
    probe = torch.zeros(1)
    with torch.inference_mode():
        assert convs and all(conv.runs_onednn(probe) for conv in convs)  # folded, on oneDNN
        assert any(conv.fuses_relu(probe) for conv in convs)


@pytest.mark.slow  # an ONNX export: minutes on a loaded 2-core machine
def test_predict_with_the_graph_runtimes_finds_the_same_instances(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINST_HF_CACHE", str(tmp_path / "cache"))
    outputs = {}
    for runtime in ("auto", "onnxruntime", "openvino"):
        out = tmp_path / runtime
        argv = (image_dir / "a.png", "--model", tiny_model_dir, "--threshold", 0.0, "--output", out)
        assert _predict(*argv, "--runtime", runtime, "--device", "cpu") == 0
        outputs[runtime] = json.loads((out / "a.json").read_text())["instances"]
    for runtime in ("onnxruntime", "openvino"):
        assert [i["label_id"] for i in outputs[runtime]] == [i["label_id"] for i in outputs["auto"]]
        for ours, reference in zip(outputs[runtime], outputs["auto"]):
            assert ours["score"] == pytest.approx(reference["score"], abs=1e-4)
            assert abs(ours["area"] - reference["area"]) <= 0.01 * reference["area"] + 2
    # Both graph runtimes ran the one cached export.
    assert len(list((tmp_path / "cache" / "onnx").glob("*/model.onnx"))) == 1


def test_predict_directory_and_glob(tiny_model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "from_dir"
    assert _predict(image_dir, "--model", tiny_model_dir, "--output", out, "--max-instances", 2) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_overlay.png", "b.json", "b_overlay.png"]
    assert all(len(json.loads((out / f).read_text())["instances"]) <= 2 for f in ("a.json", "b.json"))

    out = tmp_path / "from_glob"
    assert _predict(str(image_dir / "*.png"), "--model", tiny_model_dir, "--output", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_overlay.png"]
    assert "wrote 1 overlay(s)" in capsys.readouterr().out


def test_predict_corrupt_image_is_named_and_the_others_are_processed(tiny_model_dir, image_dir, tmp_path, capsys):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    assert _predict(image_dir, "--model", tiny_model_dir, "--output", out) == 1
    stderr = capsys.readouterr().err
    assert "cannot read image" in stderr and "broken.png" in stderr and "1 of 3 image(s) could not be read" in stderr
    assert (out / "a_overlay.png").is_file() and (out / "b.json").is_file() and not (out / "broken.json").exists()


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda tmp: tmp / "missing.png", "input not found"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images in folder"),
        (lambda tmp: str(tmp / "*.nothing"), "no images match the pattern"),
    ],
    ids=["missing-file", "empty-folder", "glob-without-images"],
)
def test_predict_bad_sources(tiny_model_dir, tmp_path, capsys, make_source, message):
    assert _predict(make_source(tmp_path), "--model", tiny_model_dir, "--output", tmp_path / "out") == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("fastinst-hf predict: error: ") and message in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_predict_wrong_model_folders(image_dir, tmp_path, capsys):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    assert _predict(image_dir, "--model", no_config) == 2
    assert "has no config.json" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    assert _predict(image_dir, "--model", other) == 2
    stderr = capsys.readouterr().err
    assert "is not a FastInst model" in stderr and "mask2former" in stderr

    assert _predict(image_dir, "--model", tmp_path / "does_not_exist") == 2
    assert "model folder not found" in capsys.readouterr().err


def test_predict_with_the_embedded_default_model_finds_the_demo_shapes(tmp_path):
    out = tmp_path / "out"
    assert _predict(DEMO_IMAGE_DIR, "--output", out) == 0
    # The demo images are held-out samples of the training distribution; the ground truth is bundled beside them.
    coco = json.loads((DEMO_IMAGE_DIR / "annotations.json").read_text())
    best_ious = []
    for image in coco["images"]:
        record = json.loads((out / f"{Path(image['file_name']).stem}.json").read_text())
        assert record["model"] == str(DEFAULT_MODEL_DIR)
        truth = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        height, width = record["height"], record["width"]
        truth_rles = [
            mask_util.merge(mask_util.frPyObjects(a["segmentation"], height, width))
            if isinstance(a["segmentation"], list)
            else a["segmentation"]
            for a in truth
        ]
        predicted = [inst["segmentation"] for inst in record["instances"]]
        assert predicted, f"the default model finds nothing on its demo image {image['file_name']}"
        best_ious += np.asarray(mask_util.iou(truth_rles, predicted, [0] * len(predicted))).max(axis=1).tolist()
    # 11 shapes; the model merges the two touching triangles of shapes_1.png into one mask (its card says so).
    assert len(best_ious) == 11 and np.mean(np.asarray(best_ious) >= 0.5) >= 0.7, best_ious


def test_overlay_draws_fill_contour_and_tag():
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    mask = np.zeros((1, 40, 60), dtype=bool)
    mask[0, 20:35, 30:55] = True
    overlay = np.asarray(draw_instances(image, mask, [0], [0.9], {0: "circle"}))
    assert overlay[27, 42].any() and not overlay[38, 5].any()  # filled inside, untouched outside
    contour = mask_contour(mask[0])
    assert contour[20, 40] and not contour[27, 42]
    assert not np.array_equal(overlay[20:24, 30:50], np.broadcast_to(overlay[27, 42], (4, 20, 3)))  # the tag


def test_evaluate_prints_the_ap_table(tiny_model_dir, tmp_path, capsys):
    coco_json = make_shapes_dataset(tmp_path / "data", num_images=2, image_size=(64, 64), num_classes=2, seed=3)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--coco-json",
                str(coco_json),
                "--images",
                str(tmp_path / "data" / "images"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "AP50" in stdout and "ms/img" in stdout and "2 images" in stdout
    assert main(["evaluate", "--coco-json", str(tmp_path / "nope.json"), "--images", str(tmp_path)]) == 2
    assert "--coco-json: file not found" in capsys.readouterr().err


def test_convert_command(tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert", "--checkpoint", str(FIXTURE / "model_state_dict.pt"), "--config", str(FIXTURE / "config.yaml")]
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "converted" in capsys.readouterr().out
    assert (
        main(
            [
                "convert",
                "--checkpoint",
                str(tmp_path / "nope.pth"),
                "--variant",
                "fastinst-d1-r50",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )


def test_train_command_validates_then_trains(monkeypatch, tmp_path):
    import fastinst_hf.training.loop

    seen = []
    monkeypatch.setattr(fastinst_hf.training.loop, "train", seen.append)
    (tmp_path / "t.json").write_text("{}")
    argv = ["train", "--train-json", str(tmp_path / "t.json"), "--train-images", str(tmp_path)]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    assert len(seen) == 1 and seen[0].max_steps == 3 and seen[0].config_overrides == {}


def test_benchmark_times_runtimes_side_by_side(tiny_model_dir, image_dir, tmp_path, capsys):
    from fastinst_hf.inference.levers import cpu_supports_bf16

    argv = ["benchmark", "--model", str(tiny_model_dir), "--image", str(image_dir / "a.png"), "--device", "cpu"]
    argv += ["--runtimes", "eager,folded,bf16+channels_last", "--throughput-runtimes", "eager,folded"]
    out = tmp_path / "bench.json"
    assert main([*argv, "--runs", "2", "--warmup", "0", "--batch-sizes", "1,2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| fastinst_hf eager |" in table and "| fastinst_hf folded |" in table and "| batch 2 |" in table
    result = json.loads(out.read_text())
    assert result["model_input_hw"] == [64, 85] and result["padded_hw"] == [64, 96]
    assert set(result["runtimes"]["eager"]) == {"network", "postprocess", "full"}
    assert len(result["runtimes"]["folded"]["full"]["runs_ms"]) == 2
    assert set(result["throughput"]) == {"1", "2"} and set(result["throughput"]["2"]) == {"eager", "folded"}
    # Without bf16 units, bf16 is skipped with the reason (emulated bf16 is slower than fp32).
    assert ("bf16+channels_last" in result["runtimes"]) == cpu_supports_bf16()
    assert ("bf16+channels_last" in result["skipped"]) != cpu_supports_bf16()
    assert main(["benchmark", "--table-from", str(out)]) == 0
    assert capsys.readouterr().out.strip() == table.split("\n", 1)[1].strip()
    assert main([*argv[:-4], "--runtimes", "eager,tensorrt"]) == 2
    assert "unknown ['tensorrt']" in capsys.readouterr().err


def test_synchronize_waits_for_cuda_devices_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", calls.append)
    synchronize(torch.device("cpu"))
    synchronize(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_export_writes_an_onnx_model_that_matches(tmp_path, capsys):
    import onnxruntime

    from fastinst_hf import FastInstForInstanceSegmentation
    from fastinst_hf.inference.resolve import resolve_model

    output = tmp_path / "default.onnx"
    assert main(["export", "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = FastInstForInstanceSegmentation.from_pretrained(resolve_model(None)).eval()
    pixel_values = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        expected = model(pixel_values).masks_queries_logits.numpy()
    session = onnxruntime.InferenceSession(str(output))
    _, masks = session.run(None, {"pixel_values": pixel_values.numpy()})
    np.testing.assert_allclose(masks, expected, atol=1e-3, rtol=1e-3)
    assert main(["export", "--output", str(output), "--height", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_official_variant_is_downloaded_and_converted_once(tmp_path, monkeypatch):
    """The variant route with the fixture checkpoint served from a file:// URL and the fixture's small architecture."""
    monkeypatch.setattr(hub_models, "official_checkpoint_url", lambda name: (FIXTURE / "model_state_dict.pt").as_uri())
    monkeypatch.setattr(hub_models, "variant_config", lambda name: config_from_detectron2(FIXTURE / "config.yaml"))
    monkeypatch.setenv("FASTINST_HF_CACHE", str(tmp_path / "cache"))
    folder = resolve_model("fastinst-d1-r50")
    assert folder == tmp_path / "cache" / "fastinst-d1-r50" / "converted"
    assert (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file()
    assert (folder.parent / "fastinst_R50_ppm-fpn_x1_576_34.9.pth").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(hub_models, "download_file", no_download)
    assert resolve_model("fastinst-d1-r50") == folder
    model = FastInstForInstanceSegmentation.from_pretrained(folder)
    assert model.config.hidden_dim == 64


def test_official_variant_offline_error_names_the_url_and_the_manual_route(tmp_path, monkeypatch, image_dir, capsys):
    url = (tmp_path / "unreachable" / "fastinst_R50_ppm-fpn_x1_576_34.9.pth").as_uri()
    monkeypatch.setattr(hub_models, "official_checkpoint_url", lambda name: url)
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("fastinst-d1-r50", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert url in message
    assert "fastinst-hf convert --checkpoint FILE --variant fastinst-d1-r50 --output-dir DIR" in message
    assert "--model DIR" in message

    monkeypatch.setenv("FASTINST_HF_CACHE", str(tmp_path / "cache"))
    assert _predict(image_dir, "--model", "fastinst-d1-r50") == 2
    assert "could not download the official fastinst-d1-r50 checkpoint" in capsys.readouterr().err


def test_unknown_hub_repo_offline_gives_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1, so this never reaches the network.
    with pytest.raises(ModelResolutionError, match="could not load 'nobody/no-such-fastinst' from the Hugging Face"):
        resolve_model("nobody/no-such-fastinst")


@pytest.mark.parametrize("command", ["predict", "evaluate", "benchmark", "convert", "train", "export", "info"])
def test_command_help_names_the_command_and_states_defaults_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith(f"usage: fastinst-hf {command} ")
    assert "(default: None)" not in text and "(default: False)" not in text
    options = text.split(" options: ", 1)[1]
    assert all(entry.count("(default") <= 1 for entry in options.split(" --")), "an option states its default twice"
    if "--device" in text:
        assert "--device {auto,cpu,cuda} where the model runs" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"fastinst-hf {fastinst_hf.__version__} (torch ")


def test_train_num_workers_default_fits_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 4


def test_default_model_name_and_constant_point_to_the_embedded_model():
    assert resolve_model("default") == resolve_model(None) == DEFAULT_MODEL_DIR == Path(fastinst_hf.DEFAULT_MODEL)
    assert [Path(p).parent for p in fastinst_hf.DEMO_IMAGES] == [DEMO_IMAGE_DIR] * 3
    assert all(Path(p).is_file() for p in fastinst_hf.DEMO_IMAGES)
