"""COCO loading/validation, augmentation, collation, the datasets route and the demo dataset generators."""

import io
import json
import random
import zipfile

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from fastinst_hf.data.collate import FastInstCollator
from fastinst_hf.data.datasets import CocoInstanceDataset, HFCocoInstanceDataset, coco_to_hf_dataset
from fastinst_hf.data.synthetic import (
    STARDIST_IMAGE_MEMBER,
    STARDIST_LABELS_MEMBER,
    load_stardist_nuclei,
    make_nuclei_dataset,
    make_shapes_dataset,
    split_coco,
)
from fastinst_hf.data.transforms import FastInstEvalTransform, FastInstTrainTransform

H, W = 20, 30


def _rect(y0, y1, x0, x1, h=H, w=W):
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _uncompressed_rle(mask):
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def coco_dir(tmp_path):
    """Two images: image 1 with polygon, compressed RLE, uncompressed RLE and crowd; image 2 without any."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(image_dir / name)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 9,
                "iscrowd": 0,
                "bbox": [2, 3, 8, 5],
                "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 5,
                "iscrowd": 0,
                "segmentation": _compressed_rle(_rect(0, 5, 20, 30)),
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 9,
                "iscrowd": 0,
                "segmentation": _uncompressed_rle(_rect(10, 20, 0, 4)),
            },
            {
                "id": 14,
                "image_id": 1,
                "category_id": 5,
                "iscrowd": 1,
                "segmentation": _uncompressed_rle(_rect(12, 18, 10, 20)),
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path, image_dir, coco


def test_polygon_rle_crowd_and_empty_images(coco_dir):
    path, image_dir, _ = coco_dir
    ds = CocoInstanceDataset(path, image_dir)
    assert ds.problems == [] and len(ds) == 1  # image 2 filtered
    assert ds.id2label == {0: "five", 1: "nine"} and ds.label_to_category_id == {0: 5, 1: 9}
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, H, W)
    assert item["mask_labels"].dtype == torch.bool and item["mask_labels"].shape == (3, H, W)  # crowd dropped
    assert item["class_labels"].tolist() == [1, 0, 1] and item["class_labels"].dtype == torch.int64
    assert item["image_id"] == 1 and item["orig_size"] == (H, W)
    polygon = item["mask_labels"][0].numpy()
    assert polygon.any() and not polygon[:3].any() and not polygon[9:].any() and not polygon[:, 11:].any()
    assert np.array_equal(item["mask_labels"][1].numpy(), _rect(0, 5, 20, 30))
    assert np.array_equal(item["mask_labels"][2].numpy(), _rect(10, 20, 0, 4))

    all_images = CocoInstanceDataset(path, image_dir, filter_empty=False)
    assert all_images.image_ids == [1, 2]
    empty = all_images[1]
    assert empty["mask_labels"].shape == (0, H, W) and empty["class_labels"].shape == (0,)


def _corrupt(case, coco, image_dir):
    ann = coco["annotations"][0]
    if case == "polygon":
        ann["segmentation"] = [[1, 1, 5, 5]]
        return "annotation id 11", "polygon with 4 coordinates"
    if case == "bbox":
        ann["bbox"] = [25, 3, 20, 5]
        return "annotation id 11", "outside the image"
    if case == "category":
        ann["category_id"] = 77
        return "annotation id 11", "unknown category id 77"
    if case == "image_id":
        ann["image_id"] = 404
        return "annotation id 11", "unknown image id"
    if case == "duplicate_id":
        coco["images"].append({"id": 1, "file_name": "b.png", "height": H, "width": W})
        return "image id 1", "duplicate image id \\(b.png skipped, a.png kept\\)"
    if case == "missing_file":
        (image_dir / "a.png").unlink()
        return "image id 1", "not found"
    if case == "unreadable":
        (image_dir / "a.png").write_bytes(b"not an image")
        return "image id 1", "unreadable"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["polygon", "bbox", "category", "image_id", "duplicate_id", "missing_file", "unreadable"]
)
def test_bad_annotations_skip_and_error(coco_dir, case):
    path, image_dir, coco = coco_dir
    where, what = _corrupt(case, coco, image_dir)
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=rf"(?s){path.name}.*{where}.*{what}"):
        CocoInstanceDataset(path, image_dir, on_bad_annotation="error")
    with pytest.warns(UserWarning, match=rf"(?s){path.name}.*{where}"):
        ds = CocoInstanceDataset(path, image_dir, filter_empty=False)
    assert len(ds.problems) == 1
    if where.startswith("annotation"):  # the other annotations of the image survive
        assert ds.records[0].annotation_ids == [12, 13]
    elif case == "duplicate_id":  # the first entry keeps the id and its annotations
        assert ds.image_ids == [1, 2] and ds.records[0].path.name == "a.png"
        assert ds.records[0].annotation_ids == [11, 12, 13]
    else:  # the image is dropped with its annotations
        assert ds.image_ids == [2]


def test_missing_and_malformed_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoInstanceDataset(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        CocoInstanceDataset(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="bad.json.*'categories'"):
        CocoInstanceDataset(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"name": "no id"}]}))
    with pytest.raises(ValueError, match="bad.json.*integer 'id'"):
        CocoInstanceDataset(bad, tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:5] = 255  # top rows as stored; EXIF orientation 6 displays them as the right columns
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    mask = _rect(0, W, H - 5, H, W, H)  # displayed image is W tall and H wide: its right 5 columns
    coco = {
        "images": [{"id": 1, "file_name": "rot.png", "height": W, "width": H}],
        "categories": [{"id": 1, "name": "top"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _compressed_rle(mask)}],
    }
    (tmp_path / "rot.json").write_text(json.dumps(coco))
    item = CocoInstanceDataset(tmp_path / "rot.json", tmp_path, on_bad_annotation="error")[0]
    assert item["image"].shape == (3, W, H) and item["orig_size"] == (W, H)
    assert torch.equal(item["image"][0] > 127, item["mask_labels"][0])


@pytest.mark.parametrize(
    "size, short_edge, max_size, expected",
    [
        ((480, 640), 640, 853, (640, 853)),
        ((333, 500), 640, 853, (568, 853)),
        ((100, 150), 33, 10**6, (33, 50)),  # rounds half up (floor would give 49)
        ((900, 300), 400, 10**6, (1200, 400)),
        ((1, 3001), 640, 853, (1, 853)),  # the short side would round to 0 pixels: kept at 1
    ],
)
def test_eval_transform_sizes_match_detectron2(size, short_edge, max_size, expected):
    image = np.zeros((*size, 3), np.uint8)
    masks = np.ones((1, *size), dtype=bool)
    out_image, out_masks, _ = FastInstEvalTransform(short_edge, max_size)(image, masks, np.array([0]))
    assert out_image.shape == (*expected, 3) and out_masks.shape == (1, *expected) and out_masks.all()


def _rect_sample(h=120, w=200):
    mask = _rect(30, 70, 50, 150, h, w)
    image = np.zeros((h, w, 3), np.uint8)
    image[mask] = 255
    return image, mask[None], np.array([0])


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_train_transform_keeps_masks_aligned(crop_prob):
    transform = FastInstTrainTransform(crop_prob=crop_prob, crop_size_range=(60, 110))
    for seed in range(12):
        image, masks, labels = transform(*_rect_sample(), random.Random(seed))
        assert masks.shape[1:] == image.shape[:2] and len(masks) == len(labels)
        if crop_prob == 0.0:
            assert min(image.shape[:2]) in FastInstTrainTransform().short_edges
        if not len(masks):  # the crop missed the rectangle: the instance must be gone
            assert crop_prob == 1.0
            continue
        mask = masks[0]
        ys, xs = np.nonzero(mask)
        assert mask.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # still a solid rectangle
        bright = image[..., 0] > 127
        assert (bright & mask).sum() / (bright | mask).sum() > 0.9


def test_train_transform_flip_and_crop_drop_empty_instances():
    image, mask, _ = _rect_sample()
    masks = np.stack([mask[0], _rect(0, 5, 0, 5, 120, 200)])  # second one sits in the top-left corner
    flips, dropped = 0, 0
    transform = FastInstTrainTransform(crop_prob=1.0, crop_size_range=(40, 40))
    for seed in range(30):
        out_image, out_masks, out_labels = transform(image, masks, np.array([0, 1]), random.Random(seed))
        assert all(m.any() for m in out_masks) and len(out_masks) == len(out_labels)
        dropped += 2 - len(out_masks)
    assert dropped > 0
    for seed in range(10):
        transform = FastInstTrainTransform(crop_prob=0.0)
        out_image, out_masks, _ = transform(image, masks, np.array([0, 1]), random.Random(seed))
        flips += bool(out_masks[1][:, -1].any())  # the corner box moved to the right edge
    assert 0 < flips < 10


def test_eval_transform_is_deterministic():
    image, masks, labels = _rect_sample(480, 640)
    out_image, out_masks, _ = FastInstEvalTransform()(image, masks, labels)
    assert out_image.shape[:2] == (640, 853) == out_masks.shape[1:]
    assert np.array_equal(out_masks[0], FastInstEvalTransform()(image, masks, labels)[1][0])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(out, num_images=6, image_size=(64, 80), seed=3), out / "images"


def test_augmentation_reproducible_per_seed_and_epoch(shapes):
    path, image_dir = shapes
    ds = CocoInstanceDataset(path, image_dir, transform=FastInstTrainTransform(), seed=7)
    first = [ds[i]["image"] for i in range(len(ds))]
    again = CocoInstanceDataset(path, image_dir, transform=FastInstTrainTransform(), seed=7)
    assert all(torch.equal(a, again[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert any(a.shape != ds[i]["image"].shape or not torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))


def test_collate_shapes_and_padding():
    items = []
    for (h, w), n in (((50, 70), 2), ((64, 40), 0)):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        masks[:, :10, :10] = True
        item = {"image": image, "mask_labels": masks, "class_labels": torch.arange(n), "image_id": h}
        items.append({**item, "orig_size": (h * 2, w * 2)})
    batch = FastInstCollator()(items)
    assert batch["pixel_values"].shape == (2, 3, 64, 96) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_mask"].dtype == torch.long and batch["pixel_mask"][0].sum() == 50 * 70
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"][0, :, :50, :70], (items[0]["image"].float() - mean) / std)
    assert batch["pixel_values"][0, :, 50:].abs().sum() == 0 and batch["pixel_values"][1, :, :, 40:].abs().sum() == 0
    assert [m.shape for m in batch["mask_labels"]] == [(2, 64, 96), (0, 64, 96)]
    assert batch["mask_labels"][0].dtype == torch.float32 and batch["mask_labels"][0].sum() == 2 * 100
    assert [c.dtype for c in batch["class_labels"]] == [torch.long, torch.long]
    assert batch["image_sizes"] == [(50, 70), (64, 40)] and batch["orig_sizes"] == [(100, 140), (128, 80)]
    assert batch["image_ids"] == [50, 64]
    assert FastInstCollator(size_divisor=1)(items)["pixel_values"].shape == (2, 3, 64, 70)


def test_datasets_route_matches_json_route(shapes, coco_dir, tmp_path):
    for path, image_dir in (shapes, coco_dir[:2]):
        hf = coco_to_hf_dataset(path, image_dir, cache_dir=tmp_path / "hf_cache")
        for transform in (None, FastInstTrainTransform()):
            ours = CocoInstanceDataset(path, image_dir, transform=transform, seed=1)
            theirs = HFCocoInstanceDataset(hf, transform=transform, seed=1)
            assert len(ours) == len(theirs) and theirs.id2label == ours.id2label
            for i in range(len(ours)):
                a, b = ours[i], theirs[i]
                assert a["image_id"] == b["image_id"] and a["orig_size"] == b["orig_size"]
                for key in ("image", "mask_labels", "class_labels"):
                    assert torch.equal(a[key], b[key]), key


def test_shapes_generator_round_trip(shapes):
    path, image_dir = shapes
    coco = json.loads(path.read_text())
    kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
    assert kinds == {"list", "dict"}
    ds = CocoInstanceDataset(path, image_dir, on_bad_annotation="error", filter_empty=False)
    assert ds.problems == [] and len(ds) == 6
    item = ds[0]
    assert item["mask_labels"].shape[1:] == (64, 80) and item["mask_labels"].flatten(1).any(1).all()
    # Visible parts of overlapping shapes never share a pixel.
    assert item["mask_labels"].sum(0).max() <= 1
    train, val = split_coco(path, val_fraction=0.34, seed=0)
    train_ids = {img["id"] for img in json.loads(train.read_text())["images"]}
    val_ids = {img["id"] for img in json.loads(val.read_text())["images"]}
    assert len(val_ids) == 2 and not train_ids & val_ids and train_ids | val_ids == set(range(1, 7))
    assert not list(path.parent.glob(".*tmp*")) and not list(image_dir.glob(".*tmp*"))


def _fake_stardist(tmp_path):
    """A 64x64 uint16 image + label map with the wheel's member layout (the real one is 512x512)."""
    labels = np.zeros((64, 64), np.uint16)
    labels[4:12, 4:12] = 3  # inside train tile (0, 0)
    labels[20:28, 12:20] = 7  # cut by the vertical border x=16 between two train tiles
    labels[40:44, 46:50] = 9  # cut by the train/val border x=48: 2 columns on the train side
    image = (labels > 0).astype(np.uint16) * 200 + 10
    wheel = tmp_path / "stardist-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, array in ((STARDIST_IMAGE_MEMBER, image), (STARDIST_LABELS_MEMBER, labels)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="TIFF")
            archive.writestr(member, buffer.getvalue())
    return wheel, image, labels


def test_nuclei_loader_and_tiles(tmp_path):
    wheel, image, labels = _fake_stardist(tmp_path)
    loaded_image, loaded_labels = load_stardist_nuclei(wheel)
    assert np.array_equal(loaded_image, image) and np.array_equal(loaded_labels, labels)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "extracted")
    assert np.array_equal(load_stardist_nuclei(tmp_path / "extracted")[1], labels)
    assert np.array_equal(load_stardist_nuclei(tmp_path / "extracted" / "stardist")[1], labels)

    train, val = make_nuclei_dataset(tmp_path / "nuclei", wheel, tile=16, min_area=10)
    train_coco, val_coco = json.loads(train.read_text()), json.loads(val.read_text())
    assert len(train_coco["images"]) == 12 and len(val_coco["images"]) == 4
    assert train_coco["categories"] == [{"id": 1, "name": "nucleus"}]
    # Nucleus 3 whole (64 px), nucleus 7 split 32/32; nucleus 9 keeps 8 px on the train side (dropped) and 8 in val.
    assert sorted(a["area"] for a in train_coco["annotations"]) == [32, 32, 64]
    assert val_coco["annotations"] == []
    for json_path in (train, val):
        ds = CocoInstanceDataset(json_path, tmp_path / "nuclei" / "images", on_bad_annotation="error")
        assert ds.problems == []
    _, val = make_nuclei_dataset(tmp_path / "n2", wheel, tile=16, min_area=8)
    assert [a["area"] for a in json.loads(val.read_text())["annotations"]] == [8]
