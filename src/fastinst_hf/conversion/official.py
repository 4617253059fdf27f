"""Convert official FastInst checkpoints (detectron2 `.pth`) to `FastInstForInstanceSegmentation`.

Every official key is either mapped to one of ours or is one of the two copies of the criterion's class-weight
buffer (derived from the config here); anything else, and any of our keys left without a value, is an error that
lists the keys.
"""

import re
import zipfile
from pathlib import Path

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError

from ..configuration_fastinst import FastInstConfig
from ..configuration_fastinst_resnet_vd import FastInstResNetVdConfig
from ..hub.model_card import render_model_card
from ..hub.push import push_model_to_hub
from ..image_processing_fastinst import image_processor_for_config
from ..modeling_fastinst import FastInstForInstanceSegmentation
from ..releases import OFFICIAL_RELEASE_URL, VARIANTS, coco_labels, variant_config
from ..utils.errors import InputError, one_line
from ..utils.files import atomic_write_text

DROPPED_KEYS = ("criterion.empty_weight", "sem_seg_head.predictor.criterion.empty_weight")

# detectron2 + add_fastinst_config defaults of the keys the conversion reads (used when a config file omits them).
_DETECTRON2_DEFAULTS = {
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.RESNETS.DEFORM_MODULATED": False,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 80,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 256,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 256,
    "MODEL.SEM_SEG_HEAD.NORM": "GN",
    "MODEL.FASTINST.HIDDEN_DIM": 256,
    "MODEL.FASTINST.NUM_OBJECT_QUERIES": 100,
    "MODEL.FASTINST.NUM_AUX_QUERIES": 8,
    "MODEL.FASTINST.NHEADS": 8,
    "MODEL.FASTINST.DIM_FEEDFORWARD": 1024,
    "MODEL.FASTINST.DEC_LAYERS": 10,
    "MODEL.FASTINST.PRE_NORM": False,
    "MODEL.FASTINST.DROPOUT": 0.0,
    "MODEL.FASTINST.DEEP_SUPERVISION": True,
    "MODEL.FASTINST.CLASS_WEIGHT": 2.0,
    "MODEL.FASTINST.MASK_WEIGHT": 5.0,
    "MODEL.FASTINST.DICE_WEIGHT": 5.0,
    "MODEL.FASTINST.LOCATION_WEIGHT": 1000.0,
    "MODEL.FASTINST.PROPOSAL_WEIGHT": 20.0,
    "MODEL.FASTINST.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.FASTINST.TRAIN_NUM_POINTS": 12544,
    "MODEL.FASTINST.OVERSAMPLE_RATIO": 3.0,
    "MODEL.FASTINST.IMPORTANCE_SAMPLE_RATIO": 0.75,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.FORMAT": "BGR",
    "TEST.DETECTIONS_PER_IMAGE": 100,
}


class CheckpointConversionError(InputError):
    """A checkpoint or config that cannot be converted; the message says which file, key and shapes."""


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_detectron2_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Flat `{"MODEL.FASTINST.DEC_LAYERS": 3, ...}` view of a detectron2 YAML, following `_BASE_` relative to each
    file (an upstream config file) or reading a full `cfg.dump()` as is. `_chain`: the files that include this one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CheckpointConversionError(f"{path} is not valid YAML text: {one_line(error)}") from error
    if not isinstance(tree, dict):
        raise CheckpointConversionError(f"{path} is not a detectron2 config (expected a YAML mapping)")
    base = tree.pop("_BASE_", None)
    flat = {}
    if base is not None:
        if not isinstance(base, str) or not base:
            raise CheckpointConversionError(f"{path}: _BASE_ must be a file name, got {base!r}")
        base_path = path.parent / base
        chain = (*_chain, path.resolve())
        if base_path.resolve() in chain:
            raise CheckpointConversionError(
                f"{path}: the _BASE_ chain loops back to {base_path} ({' -> '.join(p.name for p in chain)})"
            )
        if not base_path.is_file():
            raise CheckpointConversionError(f"{path}: _BASE_ names {base_path}, which is not a file")
        flat = read_detectron2_config(base_path, chain)
    flat.update(_flatten(tree))
    return flat


def check_config_types(cfg: dict, path: str | Path) -> None:
    """Every key the conversion reads has the type of its detectron2 default (an int may stand for a float; a list
    of numbers or booleans stays one); raises `CheckpointConversionError` naming the file and key."""
    for key, default in _DETECTRON2_DEFAULTS.items():
        value = cfg[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, list):
            item_type = (bool,) if isinstance(default[0], bool) else (int, float)
            ok = isinstance(value, list) and all(isinstance(item, item_type) for item in value)
            ok = ok and (isinstance(default[0], bool) or not any(isinstance(item, bool) for item in value))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            expected = f"a list of {type(default[0]).__name__}" if isinstance(default, list) else type(default).__name__
            raise CheckpointConversionError(f"{path}: {key} must be {expected} (like {default!r}), got {value!r}")


def config_from_detectron2(path: str | Path) -> FastInstConfig:
    """A [`FastInstConfig`] equal to the official model that a detectron2 config file builds."""
    cfg = dict(_DETECTRON2_DEFAULTS)
    cfg.update(read_detectron2_config(path))
    check_config_types(cfg, path)

    def unsupported(key, expected):
        raise CheckpointConversionError(f"{path}: {key}={cfg[key]!r} is not supported (expected {expected})")

    if cfg["MODEL.FASTINST.PRE_NORM"]:
        unsupported("MODEL.FASTINST.PRE_NORM", "False: the official models are post-norm")
    if cfg["MODEL.SEM_SEG_HEAD.NORM"] != "GN":
        unsupported("MODEL.SEM_SEG_HEAD.NORM", '"GN"')
    if cfg["MODEL.RESNETS.NORM"] != "FrozenBN":
        unsupported("MODEL.RESNETS.NORM", '"FrozenBN"')
    if cfg["MODEL.RESNETS.RES5_DILATION"] != 1:
        unsupported("MODEL.RESNETS.RES5_DILATION", "1")
    if [float(x) for x in cfg["MODEL.PIXEL_MEAN"]] != [123.675, 116.28, 103.53] or cfg["INPUT.FORMAT"] != "RGB":
        raise CheckpointConversionError(
            f"{path}: expected RGB input with MODEL.PIXEL_MEAN [123.675, 116.28, 103.53] as in every official FastInst "
            f"config, got INPUT.FORMAT={cfg['INPUT.FORMAT']!r}, MODEL.PIXEL_MEAN={cfg['MODEL.PIXEL_MEAN']}"
        )

    backbone_name = cfg["MODEL.BACKBONE.NAME"]
    deformable = [bool(x) for x in cfg["MODEL.RESNETS.DEFORM_ON_PER_STAGE"]]
    if backbone_name == "build_resnet_vd_backbone":
        if cfg["MODEL.RESNETS.DEPTH"] != 50:
            unsupported("MODEL.RESNETS.DEPTH", "50 with build_resnet_vd_backbone")
        if cfg["MODEL.RESNETS.DEFORM_MODULATED"]:
            unsupported("MODEL.RESNETS.DEFORM_MODULATED", "False (DCNv1)")
        backbone_config = FastInstResNetVdConfig(
            deformable_stages=deformable, out_features=["stage2", "stage3", "stage4"]
        )
    elif backbone_name == "build_resnet_backbone":
        if any(deformable):
            unsupported("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "all False with build_resnet_backbone")
        depth = cfg["MODEL.RESNETS.DEPTH"]
        if depth not in (50, 101):
            unsupported("MODEL.RESNETS.DEPTH", "50 or 101")
        width = cfg["MODEL.RESNETS.WIDTH_PER_GROUP"] * cfg["MODEL.RESNETS.NUM_GROUPS"]
        res2_out = cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"]
        if cfg["MODEL.RESNETS.NUM_GROUPS"] != 1 or res2_out != 4 * width:
            raise CheckpointConversionError(
                f"{path}: only plain bottlenecks with RES2_OUT_CHANNELS = 4 x WIDTH_PER_GROUP and NUM_GROUPS 1 are "
                f"supported, got {res2_out}, {cfg['MODEL.RESNETS.WIDTH_PER_GROUP']}, {cfg['MODEL.RESNETS.NUM_GROUPS']}"
            )
        from transformers import ResNetConfig

        backbone_config = ResNetConfig(
            embedding_size=cfg["MODEL.RESNETS.STEM_OUT_CHANNELS"],
            hidden_sizes=[res2_out * 2**i for i in range(4)],
            depths=[3, 4, 23 if depth == 101 else 6, 3],
            layer_type="bottleneck",
            downsample_in_first_stage=False,
            downsample_in_bottleneck=bool(cfg["MODEL.RESNETS.STRIDE_IN_1X1"]),
            out_features=["stage2", "stage3", "stage4"],
        )
    else:
        unsupported("MODEL.BACKBONE.NAME", "build_resnet_backbone or build_resnet_vd_backbone")

    num_queries = cfg["MODEL.FASTINST.NUM_OBJECT_QUERIES"]
    try:
        return _fastinst_config(cfg, backbone_config, num_queries)
    except (StrictDataclassError, ValueError, TypeError, ArithmeticError) as error:
        raise CheckpointConversionError(f"{path}: the values make no FastInst config: {one_line(error)}") from error


def _fastinst_config(cfg: dict, backbone_config, num_queries: int) -> FastInstConfig:
    return FastInstConfig(
        backbone_config=backbone_config,
        pixel_decoder_channels=cfg["MODEL.SEM_SEG_HEAD.CONVS_DIM"],
        hidden_dim=cfg["MODEL.FASTINST.HIDDEN_DIM"],
        mask_dim=cfg["MODEL.SEM_SEG_HEAD.MASK_DIM"],
        num_queries=num_queries,
        num_auxiliary_queries=cfg["MODEL.FASTINST.NUM_AUX_QUERIES"],
        num_attention_heads=cfg["MODEL.FASTINST.NHEADS"],
        dim_feedforward=cfg["MODEL.FASTINST.DIM_FEEDFORWARD"],
        decoder_layers=cfg["MODEL.FASTINST.DEC_LAYERS"],
        position_embedding_size=int(round(num_queries**0.5)),
        dropout=float(cfg["MODEL.FASTINST.DROPOUT"]),
        class_weight=float(cfg["MODEL.FASTINST.CLASS_WEIGHT"]),
        mask_weight=float(cfg["MODEL.FASTINST.MASK_WEIGHT"]),
        dice_weight=float(cfg["MODEL.FASTINST.DICE_WEIGHT"]),
        location_weight=float(cfg["MODEL.FASTINST.LOCATION_WEIGHT"]),
        proposal_weight=float(cfg["MODEL.FASTINST.PROPOSAL_WEIGHT"]),
        no_object_weight=float(cfg["MODEL.FASTINST.NO_OBJECT_WEIGHT"]),
        train_num_points=cfg["MODEL.FASTINST.TRAIN_NUM_POINTS"],
        oversample_ratio=float(cfg["MODEL.FASTINST.OVERSAMPLE_RATIO"]),
        importance_sample_ratio=float(cfg["MODEL.FASTINST.IMPORTANCE_SAMPLE_RATIO"]),
        use_auxiliary_loss=bool(cfg["MODEL.FASTINST.DEEP_SUPERVISION"]),
        test_shortest_edge=cfg["INPUT.MIN_SIZE_TEST"],
        test_longest_edge=cfg["INPUT.MAX_SIZE_TEST"],
        num_detections=cfg["TEST.DETECTIONS_PER_IMAGE"],
        **_labels_kwargs(cfg["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]),
    )


def _labels_kwargs(num_classes: int) -> dict:
    if num_classes == 80:
        return coco_labels()
    return {"id2label": {i: f"class_{i}" for i in range(num_classes)}}


# ---------------------------------------------------------------------------------------------------------------------
# State dict
# ---------------------------------------------------------------------------------------------------------------------
_PREDICTOR = r"sem_seg_head\.predictor\."
_KEY_RULES = [
    # detectron2 ResNet (R50 / R101) -> transformers ResNetBackbone
    (r"backbone\.stem\.conv1\.weight", r"model.backbone.embedder.embedder.convolution.weight"),
    (r"backbone\.stem\.conv1\.norm\.(\w+)", r"model.backbone.embedder.embedder.normalization.\1"),
    (
        r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: (
            f"model.backbone.encoder.stages.{int(m[1]) - 2}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight"
        ),
    ),
    (
        r"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)",
        lambda m: (
            f"model.backbone.encoder.stages.{int(m[1]) - 2}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}"
        ),
    ),
    (
        r"backbone\.res(\d)\.(\d+)\.shortcut\.weight",
        lambda m: f"model.backbone.encoder.stages.{int(m[1]) - 2}.layers.{m[2]}.shortcut.convolution.weight",
    ),
    (
        r"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)",
        lambda m: f"model.backbone.encoder.stages.{int(m[1]) - 2}.layers.{m[2]}.shortcut.normalization.{m[3]}",
    ),
    # ResNet-vd-DCN keeps the official (timm) names
    (r"backbone\.((?:conv1|bn1|layer\d)\..+)", r"model.backbone.\1"),
    # PPM-FPN pixel decoder
    (
        r"sem_seg_head\.pixel_decoder\.adapter_(\d)\.weight",
        lambda m: f"model.pixel_decoder.lateral_convs.{int(m[1]) - 1}.conv.weight",
    ),
    (
        r"sem_seg_head\.pixel_decoder\.adapter_(\d)\.norm\.(\w+)",
        lambda m: f"model.pixel_decoder.lateral_convs.{int(m[1]) - 1}.norm.{m[2]}",
    ),
    (
        r"sem_seg_head\.pixel_decoder\.layer_(\d)\.weight",
        lambda m: f"model.pixel_decoder.output_convs.{int(m[1]) - 1}.conv.weight",
    ),
    (
        r"sem_seg_head\.pixel_decoder\.layer_(\d)\.norm\.(\w+)",
        lambda m: f"model.pixel_decoder.output_convs.{int(m[1]) - 1}.norm.{m[2]}",
    ),
    (r"sem_seg_head\.pixel_decoder\.ppm\.stages\.(\d+)\.1\.(\w+)", r"model.pixel_decoder.ppm.stages.\1.conv.\2"),
    (r"sem_seg_head\.pixel_decoder\.ppm\.bottleneck\.(\w+)", r"model.pixel_decoder.ppm.bottleneck.\1"),
    # positional embedding, query proposal and auxiliary queries
    (_PREDICTOR + r"meta_pos_embed", r"model.position_embedding"),
    (_PREDICTOR + r"empty_query_features\.weight", r"model.query_proposal.auxiliary_query_features.weight"),
    (_PREDICTOR + r"empty_query_pos_embed\.weight", r"model.query_proposal.auxiliary_query_position_embeddings.weight"),
    (_PREDICTOR + r"query_proposal\.conv_proposal_cls_logits\.0\.(\w+)", r"model.query_proposal.conv.\1"),
    (_PREDICTOR + r"query_proposal\.conv_proposal_cls_logits\.2\.(\w+)", r"model.query_proposal.classifier.\1"),
    # dual-path decoder layers
    (
        _PREDICTOR + r"transformer_mask_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
        r"model.decoder.layers.\1.pixel_cross_attention.attention.\2",
    ),
    (
        _PREDICTOR + r"transformer_mask_cross_attention_layers\.(\d+)\.norm\.(\w+)",
        r"model.decoder.layers.\1.pixel_cross_attention.norm.\2",
    ),
    (
        _PREDICTOR + r"transformer_mask_ffn_layers\.(\d+)\.linear(\d)\.(\w+)",
        r"model.decoder.layers.\1.pixel_feed_forward.fc\2.\3",
    ),
    (
        _PREDICTOR + r"transformer_mask_ffn_layers\.(\d+)\.norm\.(\w+)",
        r"model.decoder.layers.\1.pixel_feed_forward.norm.\2",
    ),
    (
        _PREDICTOR + r"transformer_query_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
        r"model.decoder.layers.\1.query_cross_attention.attention.\2",
    ),
    (
        _PREDICTOR + r"transformer_query_cross_attention_layers\.(\d+)\.norm\.(\w+)",
        r"model.decoder.layers.\1.query_cross_attention.norm.\2",
    ),
    (
        _PREDICTOR + r"transformer_query_self_attention_layers\.(\d+)\.self_attn\.(.+)",
        r"model.decoder.layers.\1.query_self_attention.attention.\2",
    ),
    (
        _PREDICTOR + r"transformer_query_self_attention_layers\.(\d+)\.norm\.(\w+)",
        r"model.decoder.layers.\1.query_self_attention.norm.\2",
    ),
    (
        _PREDICTOR + r"transformer_query_ffn_layers\.(\d+)\.linear(\d)\.(\w+)",
        r"model.decoder.layers.\1.query_feed_forward.fc\2.\3",
    ),
    (
        _PREDICTOR + r"transformer_query_ffn_layers\.(\d+)\.norm\.(\w+)",
        r"model.decoder.layers.\1.query_feed_forward.norm.\2",
    ),
    # prediction heads
    (_PREDICTOR + r"decoder_query_norm_layers\.(\d+)\.(\w+)", r"model.decoder.prediction_heads.\1.query_norm.\2"),
    (
        _PREDICTOR + r"class_embed_layers\.(\d+)\.layers\.(\d)\.(\w+)",
        r"model.decoder.prediction_heads.\1.class_predictor.layers.\2.\3",
    ),
    (
        _PREDICTOR + r"mask_embed_layers\.(\d+)\.layers\.(\d)\.(\w+)",
        r"model.decoder.prediction_heads.\1.mask_embedder.layers.\2.\3",
    ),
    (_PREDICTOR + r"mask_features_layers\.(\d+)\.(\w+)", r"model.decoder.prediction_heads.\1.pixel_projection.\2"),
]
_COMPILED_RULES = [(re.compile(pattern), target) for pattern, target in _KEY_RULES]


def apply_rules(key: str, rules) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target(match) if callable(target) else match.expand(target)
    return None


def rename_official_key(key: str) -> str | None:
    """Our name of an official state-dict key, or None if no rule maps it."""
    return apply_rules(key, _COMPILED_RULES)


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint: a detectron2 checkpoint dict (weights under `"model"`) or a bare
    state dict, read with `torch.load(weights_only=True)` (no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointConversionError(
            f"{path} is not a PyTorch checkpoint (expected a torch.save zip archive such as the official "
            "fastinst_*.pth release files); detectron2 .pkl files are not supported"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointConversionError(f"could not read {path} (truncated or corrupted download?): {error}") from error
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointConversionError(
            f"{path} holds no state dict (expected a dict of tensors, or one under 'model')"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointConversionError(f"{path}: these entries are not tensors: {not_tensors[:10]}")
    return state_dict


def convert_state_dict(
    official: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename the official keys to ours and check them against `expected` (our model's state dict): every key must be
    mapped, every expected key filled, and every shape equal, else a `CheckpointConversionError` lists the offenders."""
    converted, unmapped = {}, []
    for key, value in official.items():
        if key in DROPPED_KEYS:
            continue
        new_key = rename_official_key(key)
        if new_key is None:
            unmapped.append(key)
        else:
            converted[new_key] = value
    return check_state_dict(converted, expected, source, unmapped)


def check_state_dict(
    converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, unmapped: list[str] = ()
) -> dict[str, torch.Tensor]:
    """`converted` if its keys and shapes are exactly those of `expected` (a model's state dict), else a
    `CheckpointConversionError` listing the offending keys (and the source keys that had no mapping)."""
    unexpected = sorted(k for k in converted if k not in expected)
    missing = sorted(k for k in expected if k not in converted)
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in converted
        if k in expected and converted[k].shape != expected[k].shape
    ]
    problems = [
        f"{title} ({len(keys)}): {keys[:10]}" + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        for title, keys in (
            ("official keys with no mapping", list(unmapped)),
            ("mapped keys the model does not have", unexpected),
            ("model keys the checkpoint does not provide", missing),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointConversionError(f"{source} does not match the model configuration:\n  " + "\n  ".join(problems))
    return converted


def convert_checkpoint(
    checkpoint: str | Path,
    config: FastInstConfig | None = None,
    config_file: str | Path | None = None,
    variant: str | None = None,
):
    """Build a `FastInstForInstanceSegmentation` holding the weights of an official checkpoint.

    The architecture comes from exactly one of `config`, `config_file` (an upstream YAML or a detectron2 dump) or
    `variant` (a name from `VARIANTS`).
    """
    if sum(x is not None for x in (config, config_file, variant)) != 1:
        raise ValueError("give exactly one of config, config_file or variant")
    if config_file is not None:
        config = config_from_detectron2(config_file)
    elif variant is not None:
        config = variant_config(variant)
    official = load_official_checkpoint(checkpoint)
    try:
        model = FastInstForInstanceSegmentation(config)
    except (ValueError, TypeError, ArithmeticError, RuntimeError) as error:
        source = config_file or variant or "config"
        raise CheckpointConversionError(f"{source}: the config makes no model: {one_line(error)}") from error
    state_dict = convert_state_dict(official, model.state_dict(), source=str(checkpoint))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def official_checkpoint_url(variant: str) -> str:
    """Download address of an official release checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FastInst variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return OFFICIAL_RELEASE_URL + VARIANTS[variant]["checkpoint"]


def save_converted(model, output_dir: str | Path, push_to_hub: str | None = None, variant: str | None = None) -> Path:
    """Write `model`, its image processor and a model card to `output_dir`; with `push_to_hub` (a repo id) also push
    them to the Hub. `variant` names the official release the weights come from, for the model card."""
    output_dir = Path(output_dir)
    config = model.config
    processor = image_processor_for_config(config)
    num_values = sum(t.numel() for t in model.state_dict().values())
    model_card = render_model_card(config, push_to_hub or output_dir.name, variant=variant, num_values=num_values)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    atomic_write_text(output_dir / "README.md", model_card)
    if push_to_hub:
        push_model_to_hub(model, processor, push_to_hub, model_card=model_card)
    return output_dir
