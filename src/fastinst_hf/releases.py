"""The official FastInst releases: the five COCO variants, where their checkpoints are and the COCO class names."""

from .configuration_fastinst import FastInstConfig, default_resnet_config
from .configuration_fastinst_resnet_vd import FastInstResNetVdConfig

# The 80 COCO "thing" classes in the contiguous order used by detectron2 and the official checkpoints.
COCO_THING_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


# The official COCO releases (github.com/junjiehe96/FastInst, release v0.1.0), with their val2017 mask AP.
OFFICIAL_RELEASE_URL = "https://github.com/junjiehe96/FastInst/releases/download/v0.1.0/"
VARIANTS = {
    "fastinst-d1-r50": dict(
        backbone="r50",
        decoder_layers=1,
        test_size=(576, 777),
        coco_val_ap=34.9,
        checkpoint="fastinst_R50_ppm-fpn_x1_576_34.9.pth",
        upstream_config="fastinst_R50_ppm-fpn_x1_576.yaml",
    ),
    "fastinst-d3-r50": dict(
        backbone="r50",
        decoder_layers=3,
        test_size=(640, 853),
        coco_val_ap=37.9,
        checkpoint="fastinst_R50_ppm-fpn_x3_640_37.9.pth",
        upstream_config="fastinst_R50_ppm-fpn_x3_640.yaml",
    ),
    "fastinst-d3-r101": dict(
        backbone="r101",
        decoder_layers=3,
        test_size=(640, 853),
        coco_val_ap=38.9,
        checkpoint="fastinst_R101_ppm-fpn_x3_640_38.9.pth",
        upstream_config="fastinst_R101_ppm-fpn_x3_640.yaml",
    ),
    "fastinst-d1-r50-vd-dcn": dict(
        backbone="r50-vd-dcn",
        decoder_layers=1,
        test_size=(576, 777),
        coco_val_ap=37.4,
        checkpoint="fastinst_R50-vd-dcn_ppm-fpn_x1_576_37.4.pth",
        upstream_config="fastinst_R50-vd-dcn_ppm-fpn_x1_576.yaml",
    ),
    "fastinst-d3-r50-vd-dcn": dict(
        backbone="r50-vd-dcn",
        decoder_layers=3,
        test_size=(640, 853),
        coco_val_ap=40.1,
        checkpoint="fastinst_R50-vd-dcn_ppm-fpn_x3_640_40.1.pth",
        upstream_config="fastinst_R50-vd-dcn_ppm-fpn_x3_640.yaml",
    ),
}


def coco_labels() -> dict:
    """`id2label` and `label2id` of the 80 COCO classes, as `FastInstConfig` keywords."""
    return {
        "id2label": dict(enumerate(COCO_THING_CLASSES)),
        "label2id": {n: i for i, n in enumerate(COCO_THING_CLASSES)},
    }


def variant_config(name: str, **kwargs) -> FastInstConfig:
    """Configuration of one of the five released COCO models (see `VARIANTS`), e.g. `"fastinst-d1-r50"`, with the
    COCO class names; `kwargs` override any setting."""
    if name not in VARIANTS:
        raise ValueError(f"unknown FastInst variant {name!r}; choose one of {sorted(VARIANTS)}")
    variant = VARIANTS[name]
    if variant["backbone"] == "r50-vd-dcn":
        backbone_config = FastInstResNetVdConfig(out_features=["stage2", "stage3", "stage4"])
    else:
        backbone_config = default_resnet_config(101 if variant["backbone"] == "r101" else 50)
    params = dict(
        backbone_config=backbone_config,
        decoder_layers=variant["decoder_layers"],
        test_shortest_edge=variant["test_size"][0],
        test_longest_edge=variant["test_size"][1],
    )
    if "num_labels" not in kwargs and "id2label" not in kwargs:
        params.update(coco_labels())
    params.update(kwargs)
    return FastInstConfig(**params)


__all__ = ["COCO_THING_CLASSES", "OFFICIAL_RELEASE_URL", "VARIANTS", "coco_labels", "variant_config"]
