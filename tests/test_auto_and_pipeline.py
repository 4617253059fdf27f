"""Auto classes, `pipeline("image-segmentation")` and `trust_remote_code` loading of a saved folder."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import FIXTURES, load_eval_fixture
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForInstanceSegmentation,
    pipeline,
)

import fastinst_hf
from fastinst_hf.conversion.official import convert_checkpoint, save_converted
from fastinst_hf.releases import COCO_THING_CLASSES

VARIANT = "d1_r50slim_small"


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """The d1 fixture's official weights converted and saved with their processor, as a user's Hub repo would be."""
    folder = tmp_path_factory.mktemp("fastinst-d1-slim")
    model = convert_checkpoint(
        FIXTURES / VARIANT / "model_state_dict.pt", config_file=FIXTURES / VARIANT / "config.yaml"
    )
    save_converted(model, folder)
    return folder


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.load(FIXTURES / VARIANT / "input_image_rgb_uint8.npy"))


def test_auto_classes_resolve(converted_dir):
    assert isinstance(AutoConfig.from_pretrained(converted_dir), fastinst_hf.FastInstConfig)
    assert isinstance(AutoModel.from_pretrained(converted_dir), fastinst_hf.FastInstModel)
    for auto_class in (AutoModelForInstanceSegmentation, AutoModelForImageSegmentation):
        assert isinstance(auto_class.from_pretrained(converted_dir), fastinst_hf.FastInstForInstanceSegmentation)
    processor = AutoImageProcessor.from_pretrained(converted_dir)
    assert isinstance(processor, fastinst_hf.FastInstImageProcessor)
    assert processor.size["shortest_edge"] == 256 and processor.size["longest_edge"] == 400
    pil = AutoImageProcessor.from_pretrained(converted_dir, backend="pil")
    assert isinstance(pil, fastinst_hf.FastInstImageProcessorPil)


def test_saved_folder_carries_code_and_auto_map(converted_dir):
    auto_map = json.loads((converted_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageSegmentation"] == "modeling_fastinst.FastInstForInstanceSegmentation"
    assert auto_map["AutoModelForInstanceSegmentation"] == "modeling_fastinst.FastInstForInstanceSegmentation"
    processor_map = json.loads((converted_dir / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map["AutoImageProcessor"] == {
        "torchvision": "image_processing_fastinst.FastInstImageProcessor",
        "pil": "image_processing_pil_fastinst.FastInstImageProcessorPil",
    }
    for name in (
        "configuration_fastinst.py",
        "configuration_fastinst_resnet_vd.py",
        "modeling_fastinst.py",
        "loss_fastinst.py",
        "modeling_fastinst_resnet_vd.py",
        "image_processing_fastinst.py",
        "image_processing_pil_fastinst.py",
        "mask_resizing_fastinst.py",
    ):
        assert (converted_dir / name).is_file(), name


def test_pipeline_instance_subtask_matches_official_instances(converted_dir, image, tmp_path):
    # The PIL backend resizes exactly as the official PIL-based preprocessing (the torchvision one is off by up to
    # one gray level, which these random fixture weights amplify).
    processor = AutoImageProcessor.from_pretrained(converted_dir, backend="pil")
    segmenter = pipeline(
        "image-segmentation", model=str(converted_dir), image_processor=processor, trust_remote_code=False
    )
    results = segmenter(image, subtask="instance", threshold=0.0)
    assert results and all(set(r) == {"score", "label", "mask"} for r in results)
    assert all(r["mask"].size == image.size and r["mask"].mode == "L" for r in results)
    # The best-scoring instance is painted last, so its full mask survives; compare it with the official one.
    official = load_eval_fixture(VARIANT)
    best = int(official["instances.scores"].argmax())
    top = max(results, key=lambda r: r["score"])
    assert abs(top["score"] - official["instances.scores"][best].item()) < 1e-4
    label = official["instances.pred_classes"][best].item()
    assert top["label"] == COCO_THING_CLASSES[label]
    ours, theirs = np.array(top["mask"]) > 0, official["instances.pred_masks"][best].numpy()
    assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.999

    # A file path and a list of images give the same answers.
    path = tmp_path / "image.png"
    image.save(path)
    from_path = segmenter(str(path), subtask="instance", threshold=0.0)
    assert [r["score"] for r in from_path] == pytest.approx([r["score"] for r in results], abs=1e-4)
    batch = segmenter([image, image], subtask="instance", threshold=0.0)
    assert len(batch) == 2 and len(batch[1]) == len(results)


def test_pipeline_instance_threshold_and_default_subtask(converted_dir, image):
    segmenter = pipeline("image-segmentation", model=str(converted_dir), trust_remote_code=False)
    instance = segmenter(image, subtask="instance", threshold=0.0)
    # The pipeline's default threshold (0.9) keeps exactly the instances scoring at least 0.9.
    expected = [r["score"] for r in instance if r["score"] >= 0.9]
    assert [r["score"] for r in segmenter(image, subtask="instance")] == pytest.approx(expected)
    assert [r["score"] for r in segmenter(image, subtask="instance", threshold=0.1)] == pytest.approx(
        [r["score"] for r in instance if r["score"] >= 0.1]
    )
    # Without a subtask the pipeline asks for panoptic results first, as for Mask2Former.
    default = segmenter(image, threshold=0.1)
    panoptic = segmenter(image, subtask="panoptic", threshold=0.1)
    assert [r["score"] for r in default] == pytest.approx([r["score"] for r in panoptic]) and default


def test_pipeline_semantic_and_panoptic_subtasks(converted_dir, image):
    segmenter = pipeline("image-segmentation", model=str(converted_dir), trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(converted_dir)
    model = AutoModelForImageSegmentation.from_pretrained(converted_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    target = [image.size[::-1]]
    semantic = segmenter(image, subtask="semantic")
    (classes,) = processor.post_process_semantic_segmentation(outputs, target_sizes=target)
    assert [r["label"] for r in semantic] == [model.config.id2label[int(k)] for k in classes.unique()]
    assert all(r["score"] is None and r["mask"].size == image.size for r in semantic)
    panoptic = segmenter(image, subtask="panoptic", threshold=0.1, overlap_mask_area_threshold=0.8)
    (expected,) = processor.post_process_panoptic_segmentation(outputs, threshold=0.1, target_sizes=target)
    assert [r["score"] for r in panoptic] == pytest.approx([s["score"] for s in expected["segments_info"]])
    assert panoptic and all(r["mask"].size == image.size for r in panoptic)
    # Panoptic segments do not overlap.
    masks = np.stack([np.array(r["mask"]) > 0 for r in panoptic])
    assert masks.sum(0).max() == 1


def test_trust_remote_code_without_the_package(converted_dir, image, tmp_path):
    """A process where `import fastinst_hf` and the training / evaluation dependencies fail loads the folder from its
    own code files, predicts, saves and reloads (what `trainer.save_model()` does); training then asks for scipy."""
    image_path = tmp_path / "image.png"
    image.save(image_path)
    script = textwrap.dedent(
        f"""
        import sys
        # any import of these now fails, and transformers sees them as absent
        for name in ("fastinst_hf", "scipy", "accelerate", "datasets", "evaluate", "pycocotools", "faster_coco_eval"):
            sys.modules[name] = None
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation, pipeline
        from PIL import Image
        folder, copy = {str(converted_dir)!r}, {str(tmp_path / "copy")!r}
        universal = AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        universal.save_pretrained(copy)
        processor.save_pretrained(copy)
        assert AutoImageProcessor.from_pretrained(copy, trust_remote_code=True).to_dict() == processor.to_dict()
        AutoModelForUniversalSegmentation.from_pretrained(copy, trust_remote_code=True)
        inputs = processor(images=Image.open({str(image_path)!r}), return_tensors="pt")
        masks = [torch.ones(1, *inputs["pixel_values"].shape[-2:])]
        try:
            universal.train()(**inputs, mask_labels=masks, class_labels=[torch.zeros(1, dtype=torch.long)])
            raise AssertionError("training ran without scipy")
        except ImportError as error:
            assert "scipy" in str(error), error
        model = AutoModelForImageSegmentation.from_pretrained(folder, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        assert type(processor).__name__ == "FastInstImageProcessor", type(processor)
        pil = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
        assert type(pil).__name__ == "FastInstImageProcessorPil", type(pil)
        segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
        results = segmenter(Image.open({str(image_path)!r}), subtask="instance", threshold=0.0)
        assert segmenter(Image.open({str(image_path)!r}), subtask="panoptic", threshold=0.1)
        assert segmenter(Image.open({str(image_path)!r}), subtask="semantic")
        print(len(results), max(r["score"] for r in results))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    count, best = completed.stdout.split()[-2:]
    in_process = pipeline("image-segmentation", model=str(converted_dir))(image, subtask="instance", threshold=0.0)
    assert int(count) == len(in_process)
    assert float(best) == pytest.approx(max(r["score"] for r in in_process), abs=1e-5)
