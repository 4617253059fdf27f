"""Bad and unusual inputs across the command line and the Python API.

Each CLI case builds its inputs (small, generated here), runs `fastinst-hf` in-process and checks the exit status,
that a failure is one line `fastinst-hf CMD: error: ...` naming what was wrong (no traceback), that no partial or
temporary file is left, and that the good inputs of the same call were still processed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file

from fastinst_hf import FastInstForInstanceSegmentation, FastInstImageProcessor
from fastinst_hf.cli import main
from fastinst_hf.conversion.official import save_converted
from fastinst_hf.inference.resolve import ModelResolutionError, fetch_official_model
from fastinst_hf.utils.images import collect_image_paths, load_image

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------------------------------
# Shared inputs: a tiny model, a few images, a tiny COCO dataset
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """20 queries: more than the 12 stride-16 cells of a 3x10000 strip resized to the test size (1x96, padded 32x96)."""
    torch.manual_seed(0)
    return save_converted(
        FastInstForInstanceSegmentation(tiny_config(num_queries=20)), tmp_path_factory.mktemp("tiny") / "model"
    )


def random_image(size_hw=(40, 56), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size_hw, 3), dtype=np.uint8)).convert(mode)


def polygon(x, y, size=10) -> list[float]:
    return [x, y, x + size, y, x + size, y + size, x, y + size]


def coco(images=2, annotations=None, categories=None) -> dict:
    """A COCO dict of `images` 40x56 images `img{i}.png` with one square each (or the given annotations)."""
    image_entries = [{"id": i + 1, "file_name": f"img{i}.png", "height": 40, "width": 56} for i in range(images)]
    if annotations is None:
        annotations = [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": [polygon(5, 5)], "bbox": [5, 5, 10, 10]}
            for i in range(images)
        ]
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}] if categories is None else categories
    return {"images": image_entries, "annotations": annotations, "categories": categories}


class Env:
    """A case's working folder: helpers that write inputs into it."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model

    def image(self, name: str, image: Image.Image | None = None, **save) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (image if image is not None else random_image(seed=len(name))).save(path, **save)
        return str(path)

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def dataset(self, data: dict | str, images: int = 2) -> list[str]:
        """`--coco-json FILE --images DIR` arguments for `data` (a dict or raw JSON text) and `images` images."""
        for i in range(images):
            self.image(f"data/img{i}.png", random_image(seed=i))
        (self.root / "data").mkdir(exist_ok=True)
        text = data if isinstance(data, (str, bytes)) else json.dumps(data)
        return [self.file("data/coco.json", text), str(self.root / "data")]

    def model_variant(self, edit: Callable[[Path], None]) -> str:
        folder = self.root / "model"
        shutil.copytree(self.model, folder)
        edit(folder)
        return str(folder)


def edit_weights(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        save_file(change(weights), folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def with_nan(weights: dict) -> dict:
    key = next(k for k in weights if k.endswith("class_predictor.layers.2.weight"))
    weights[key][0, 0] = float("nan")
    return weights


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 4096)


def edit_processor(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        settings.update(changes)
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))

    return edit


def with_model(build: Callable[[Env], list[str]], edit: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    """`build`'s command line with `--model` (or train's `--init`) set to a copy of the tiny model changed by `edit`."""

    def args(env: Env) -> list[str]:
        argv = build(env)
        return [*argv, "--init" if argv[0] == "train" else "--model", env.model_variant(edit)]

    return args


FIXTURE_YAML = Path(__file__).parent / "fixtures" / "d1_r50slim_small" / "config.yaml"
FIXTURE_CHECKPOINT = FIXTURE_YAML.with_name("model_state_dict.pt")


def convert_yaml(files: dict[str, str | bytes], main_file: str = "main.yaml") -> Callable[[Env], list[str]]:
    """`convert --config` of YAML files written into the case folder (`files`: name -> text)."""

    def build(env: Env) -> list[str]:
        for name, text in files.items():
            env.file(f"yaml/{name}", text)
        config = str(env.root / "yaml" / main_file)
        output = str(env.root / "converted")
        return ["convert", "--checkpoint", str(FIXTURE_CHECKPOINT), "--config", config, "--output-dir", output]

    return build


def fixture_yaml(old: str, new: str) -> str:
    text = FIXTURE_YAML.read_text()
    assert old in text
    return text.replace(old, new)


def exif_rotated(env: Env, name: str) -> str:
    image = random_image((40, 56))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed 40 wide, 56 high
    return env.image(name, image, exif=exif)


def animated_gif(env: Env, name: str) -> str:
    frames = [random_image(seed=s).convert("P") for s in range(3)]
    path = env.root / name
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return str(path)


def symlink_loop(env: Env) -> str:
    env.image("loop/a.png")
    env.image("loop/sub/b.png")
    os.symlink("..", env.root / "loop/sub/up")
    os.symlink("a.png", env.root / "loop/same.png")
    return str(env.root / "loop/**/*.png")


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """`args(env)` gives the command line (without `--model`/`--device` for predict, added by `run_case`)."""

    name: str
    args: Callable[[Env], list[str]]
    code: int
    message: str = ""  # must appear in the one-line error (code 2) or on stderr (code 1)
    written: tuple[str, ...] = ()  # stems predict must have written (overlay + JSON each)
    model: Callable[[Env], str] | None = None  # a model folder other than the tiny one


def predict(*sources: Callable[[Env], str] | str, options: tuple = ()) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        paths = [source(env) if callable(source) else source for source in sources]
        return ["predict", *paths, "--output", str(env.root / "out"), "--threshold", "0", *options]

    return build


def img(name: str, size_hw=(40, 56), mode="RGB", **save) -> Callable[[Env], str]:
    return lambda env: env.image(name, random_image(size_hw, mode, seed=len(name)), **save)


def raw(name: str, content: bytes | str) -> Callable[[Env], str]:
    return lambda env: env.file(name, content)


def uint16_png(env: Env) -> str:
    return env.image("gray16.png", Image.fromarray(np.full((40, 56), 50000, dtype=np.uint16)))


def evaluate(
    data: dict | str | bytes | None = None, images: int = 2, options: tuple = ()
) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        json_file, folder = env.dataset(coco() if data is None else data, images)
        return ["evaluate", "--coco-json", json_file, "--images", folder, "--model", str(env.model), *options]

    return build


def train(data: dict | str | bytes | None = None, options: tuple = ()) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        json_file, folder = env.dataset(coco() if data is None else data)
        config = json.dumps({"num_queries": 10, "test_shortest_edge": 64, "test_longest_edge": 96})
        return [
            "train",
            "--train-json",
            json_file,
            "--train-images",
            folder,
            "--output-dir",
            str(env.root / "run"),
            "--config-json",
            config,
            "--num-workers",
            "0",
            "--max-steps",
            "1",
            *options,
        ]

    return build


def export(*options: str | Callable[[Env], str]) -> Callable[[Env], list[str]]:
    return lambda env: ["export", "--model", str(env.model), *(o(env) if callable(o) else o for o in options)]


def convert(*options: str | Callable[[Env], str]) -> Callable[[Env], list[str]]:
    return lambda env: ["convert", "--variant", "fastinst-d1-r50", *(o(env) if callable(o) else o for o in options)]


BAD_POLYGON = {"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]], "bbox": [1, 1, 4, 4]}
GOOD = img("good.png")

CASES = [
    # predict: sources
    Case("missing file", predict("nowhere.png"), 2, "input not found"),
    Case("empty folder", predict(lambda env: str((env.root / "empty").mkdir() or env.root / "empty")), 2, "no images"),
    Case("glob without matches", predict(lambda env: str(env.root / "*.png")), 2, "no images match"),
    Case("glob through a symlink loop", predict(symlink_loop), 0, written=("a", "b")),
    Case("same file twice", predict(GOOD, lambda env: str(env.root / "good.png")), 0, written=("good",)),
    Case("same name in two folders", predict(img("x/a.png"), img("y/a.png")), 0, written=("a", "a-2")),
    Case("corrupt PNG among good", predict(GOOD, raw("bad.png", b"\x89PNG\r\n\x1a\nxx")), 1, "bad.png", ("good",)),
    Case("empty file", predict(raw("zero.jpg", b""), GOOD), 1, "zero.jpg", ("good",)),
    Case("text named .jpg", predict(raw("text.jpg", "hello"), GOOD), 1, "text.jpg", ("good",)),
    Case(
        "truncated JPEG",
        predict(lambda env: env.file("cut.jpg", Path(env.image("full.jpg")).read_bytes()[:200]), GOOD),
        1,
        "cut.jpg",
        ("good",),
    ),
    # predict: unusual images that must be segmented
    Case("3x10000 strip", predict(img("wide.png", (3, 10000)), GOOD), 0, written=("wide", "good")),
    Case("10000x3 strip", predict(img("tall.png", (10000, 3)), GOOD), 0, written=("tall", "good")),
    Case("8.3:1 banner", predict(img("banner.png", (60, 498))), 0, written=("banner",)),
    Case("1x1 image", predict(img("dot.png", (1, 1))), 0, written=("dot",)),
    Case("2000x2000 image", predict(img("big.png", (2000, 2000))), 0, written=("big",)),
    Case("16-bit grayscale PNG", predict(uint16_png), 0, written=("gray16",)),
    Case("8-bit grayscale", predict(img("gray.png", mode="L")), 0, written=("gray",)),
    Case("1-bit image", predict(img("bits.png", mode="1")), 0, written=("bits",)),
    Case("RGBA PNG", predict(img("rgba.png", mode="RGBA")), 0, written=("rgba",)),
    Case("gray + alpha", predict(img("la.png", mode="LA")), 0, written=("la",)),
    Case("palette PNG", predict(img("pal.png", mode="P")), 0, written=("pal",)),
    Case("CMYK JPEG", predict(img("cmyk.jpg", mode="CMYK")), 0, written=("cmyk",)),
    Case("EXIF-rotated JPEG", predict(lambda env: exif_rotated(env, "rot.jpg")), 0, written=("rot",)),
    Case("animated GIF", predict(lambda env: animated_gif(env, "anim.gif")), 0, written=("anim",)),
    Case("TIFF", predict(img("t.tif")), 0, written=("t",)),
    Case("WebP", predict(img("w.webp")), 0, written=("w",)),
    Case("upper-case extension", predict(img("UP.PNG")), 0, written=("UP",)),
    Case(
        "batch of mixed sizes",
        predict(GOOD, img("b.png", (30, 30)), img("c.png", (40, 56)), options=("--batch-size", "2")),
        0,
        written=("good", "b", "c"),
    ),
    Case(
        "batch with a corrupt image",
        predict(GOOD, raw("bad.png", b"nope"), img("c.png"), options=("--batch-size", "3")),
        1,
        "bad.png",
        ("good", "c"),
    ),
    # predict: options and output
    Case("--threshold 5", predict(GOOD, options=("--threshold", "5")), 2, "--threshold must be in [0, 1]"),
    Case("--threshold -0.1", predict(GOOD, options=("--threshold", "-0.1")), 2, "--threshold"),
    Case("--max-instances 0", predict(GOOD, options=("--max-instances", "0")), 2, "--max-instances"),
    Case("--batch-size 0", predict(GOOD, options=("--batch-size", "0")), 2, "--batch-size must be >= 1"),
    Case(
        "--output is a file",
        lambda env: [*predict(GOOD)(env)[:-4], "--output", env.file("out", "x")],
        2,
        "is not a folder",
    ),
    Case(
        "--output under a file",
        lambda env: [*predict(GOOD)(env)[:-4], "--output", env.file("f", "x") + "/out"],
        2,
        "cannot be created",
    ),
    Case(
        "--output not writable",
        lambda env: [*predict(GOOD)(env)[:-4], "--output", "/proc/fastinst-out"],
        2,
        "not writable",
    ),
    # predict: model folders
    Case("--model missing", predict(GOOD), 2, "model folder not found", model=lambda env: str(env.root / "none")),
    Case(
        "--model without config",
        predict(GOOD),
        2,
        "no config.json",
        model=lambda env: env.file("m/x.txt", "") and str(env.root / "m"),
    ),
    Case(
        "config.json not JSON",
        predict(GOOD),
        2,
        "not a valid JSON config",
        model=lambda env: env.model_variant(lambda f: (f / "config.json").write_text("{")),
    ),
    Case(
        "config.json of another model",
        predict(GOOD),
        2,
        "not a FastInst model",
        model=lambda env: env.model_variant(edit_config(model_type="bert")),
    ),
    Case(
        "config.json with wrong shapes",
        predict(GOOD),
        2,
        "could not load the model",
        model=lambda env: env.model_variant(edit_config(hidden_dim=48)),
    ),
    Case(
        "label count not matching weights",
        predict(GOOD),
        2,
        "do not match its config.json",
        model=lambda env: env.model_variant(
            edit_config(id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
        ),
    ),
    Case(
        "truncated model.safetensors",
        predict(GOOD),
        2,
        "model/model.safetensors is not a complete safetensors file",
        model=lambda env: env.model_variant(truncate),
    ),
    Case(
        "garbage model.safetensors",
        predict(GOOD),
        2,
        "model/model.safetensors is not a complete safetensors file",
        model=lambda env: env.model_variant(garbage_weights),
    ),
    Case(
        "invalid size in preprocessor_config.json",
        predict(GOOD),
        2,
        "model/preprocessor_config.json: the image processor settings are unusable",
        model=lambda env: env.model_variant(edit_processor(size={"shortest_edge": -5})),
    ),
    Case(
        "no weights file",
        predict(GOOD),
        2,
        "could not load the model",
        model=lambda env: env.model_variant(lambda f: (f / "model.safetensors").unlink()),
    ),
    Case(
        "NaN in the weights",
        predict(GOOD),
        2,
        "NaN or Inf",
        model=lambda env: env.model_variant(edit_weights(with_nan)),
    ),
    Case(
        "missing keys",
        predict(GOOD),
        2,
        "they would be random",
        model=lambda env: env.model_variant(
            edit_weights(lambda w: {k: v for k, v in w.items() if "mask_embed" not in k})
        ),
    ),
    # evaluate
    Case("evaluate: good data", evaluate(), 0),
    Case("evaluate: Boundary AP", evaluate(options=("--iou-type", "boundary")), 0),
    Case("evaluate: a polygon of 2 points", evaluate(coco(annotations=[*coco()["annotations"], BAD_POLYGON])), 0),
    Case("evaluate: malformed JSON", evaluate("{not json"), 2, "not valid JSON"),
    Case("evaluate: JSON list", evaluate("[]"), 2, "expected a JSON object"),
    Case("evaluate: entries not objects", evaluate({**coco(), "images": [1, 2]}), 2, "must be a JSON object"),
    Case("evaluate: no categories", evaluate(coco(categories=[])), 2, "'categories' is empty"),
    Case("evaluate: no images", evaluate(coco(images=0)), 2, "no image was readable"),
    Case("evaluate: all images missing", evaluate(coco(), images=0), 2, "no image was readable"),
    Case("evaluate: no annotations", evaluate(coco(annotations=[])), 2, "no usable annotation"),
    Case("evaluate: only unusable annotations", evaluate(coco(annotations=[BAD_POLYGON])), 2, "no usable annotation"),
    Case("evaluate: --threshold 5", evaluate(options=("--threshold", "5")), 2, "--threshold must be in [0, 1]"),
    Case("evaluate: --batch-size 0", evaluate(options=("--batch-size", "0")), 2, "--batch-size"),
    Case("evaluate: binary JSON", evaluate(bytes(range(256)) * 4), 2, "data/coco.json: not a JSON text file"),
    Case(
        "evaluate: truncated weights",
        with_model(evaluate(), truncate),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case(
        "evaluate: garbage weights",
        with_model(evaluate(), garbage_weights),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case("evaluate: --num-workers -1", evaluate(options=("--num-workers", "-1")), 2, "--num-workers must be >= 0"),
    Case(
        "evaluate: missing JSON",
        lambda env: ["evaluate", "--coco-json", "none.json", "--images", str(env.root)],
        2,
        "file not found",
    ),
    # train (every refusal leaves no run folder)
    Case("train: --lr -1", train(options=("--lr", "-1")), 2, "--lr must be > 0"),
    Case("train: --lr nan", train(options=("--lr", "nan")), 2, "--lr must be a finite number"),
    Case("train: --batch-size 0", train(options=("--batch-size", "0")), 2, "--batch-size must be >= 1"),
    Case("train: --max-steps 0", train(options=("--max-steps", "0")), 2, "--max-steps"),
    Case(
        "train: --output-dir is a file",
        lambda env: [*train()(env), "--output-dir", env.file("runfile", "x")],
        2,
        "is not a folder",
    ),
    Case("train: malformed JSON", train("{"), 2, "not valid JSON"),
    Case("train: no categories", train(coco(categories=[])), 2, "'categories' is empty"),
    Case("train: no images", train(coco(images=0)), 2, "no readable image"),
    Case("train: no annotations", train(coco(annotations=[])), 2, "no readable image with a usable annotation"),
    Case("train: only unusable annotations", train(coco(annotations=[BAD_POLYGON])), 2, "usable annotation"),
    Case(
        "train: reversed crop range",
        train(options=("--crop-size-range", "600", "384")),
        2,
        "--crop-size-range MIN MAX must have MIN <= MAX, got 600 384",
    ),
    Case("train: short edge 0", train(options=("--train-short-edges", "0", "512")), 2, "--train-short-edges must be"),
    Case("train: crop short edge 0", train(options=("--crop-resize-short-edges", "0")), 2, "--crop-resize-short-edges"),
    Case("train: crop size 0", train(options=("--crop-size-range", "0", "10")), 2, "--crop-size-range must be"),
    Case("train: --train-max-size 0", train(options=("--train-max-size", "0")), 2, "--train-max-size must be"),
    Case(
        "train: --config-json value of the wrong type",
        train(options=("--config-json", '{"num_queries": "ten"}')),
        2,
        "--config-json: Validation error for field 'num_queries'",
    ),
    Case(
        "train: --config-json unknown field",
        train(options=("--config-json", '{"num_querys": 5}')),
        2,
        "'num_querys' is not a FastInstConfig field (did you mean 'num_queries'?)",
    ),
    Case(
        "train: --config-json that makes no model",
        train(options=("--config-json", '{"num_attention_heads": 0}')),
        2,
        "--config-json",
    ),
    Case(
        "train: --config-json with 0 queries",
        train(options=("--config-json", '{"num_queries": 0}')),
        2,
        "--config-json: num_queries=0 (expected >= 1)",
    ),
    Case(
        "train: --config-json with test size 0",
        train(options=("--config-json", '{"test_shortest_edge": 0}')),
        2,
        "test_shortest_edge=0 (expected >= 1)",
    ),
    Case(
        "train: binary --train-json",
        train(bytes(range(256)) * 4),
        2,
        "data/coco.json: not a JSON text file",
    ),
    Case(
        "train: --config-json binary file",
        lambda env: [*train()(env), "--config-json", env.file("c.json", b"\xff\xfe\x00")],
        2,
        "--config-json: cannot read",
    ),
    Case(
        "train: --config-json missing file",
        train(options=("--config-json", "nowhere.json")),
        2,
        "--config-json: file not found",
    ),
    Case(
        "train: --init with truncated weights",
        with_model(train(options=("--config-json", "{}")), truncate),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case(
        "train: --init with missing weights",
        with_model(
            train(options=("--config-json", "{}")),
            edit_weights(lambda w: {k: v for k, v in w.items() if "mask_embed" not in k}),
        ),
        2,
        "they would be random",
    ),
    Case(
        "train: --init with broken config.json",
        with_model(train(options=("--config-json", "{}")), edit_config(hidden_dim="wide")),
        2,
        "--init",
    ),
    Case("train: --seed -1", train(options=("--seed", "-1")), 2, "--seed must be in [0, 4294967295]"),
    Case("train: --lr-gamma 0", train(options=("--lr-gamma", "0")), 2, "--lr-gamma"),
    Case("train: --poly-power nan", train(options=("--poly-power", "nan")), 2, "--poly-power must be a finite"),
    Case("train: --clip-grad -1", train(options=("--clip-grad", "-1")), 2, "--clip-grad must be > 0"),
    Case("train: --lr-steps 1.5", train(options=("--lr-steps", "0.5", "1.5")), 2, "--lr-steps are fractions"),
    Case("train: --push-to-hub 'a b'", train(options=("--push-to-hub", "a b")), 2, "--push-to-hub: 'a b' is not"),
    Case("train: --backbone-weights missing", train(options=("--backbone-weights", "no.pth")), 2, "file not found"),
    Case(
        "train: --backbone-weights garbage",
        lambda env: [*train()(env), "--backbone-weights", env.file("bb.pth", b"junk")],
        2,
        "bb.pth",
    ),
    Case(
        "train: --resume folder with a broken trainer state",
        lambda env: [*train()(env), "--resume", str(Path(env.file("ckpt/trainer_state.json", "{")).parent)],
        2,
        "trainer_state.json",
    ),
    # export
    Case("export: --output is a folder", export("--output", lambda env: str(env.root)), 2, "is a folder"),
    Case(
        "export: --output under a file",
        export("--output", lambda env: env.file("f", "x") + "/m.onnx"),
        2,
        "is not a folder",
    ),
    Case(
        "export: garbage weights",
        with_model(export("--output", "m.onnx"), garbage_weights),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case(
        "export: truncated weights",
        with_model(export("--output", "m.onnx"), truncate),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case(
        "benchmark: truncated weights",
        with_model(lambda env: ["benchmark", "--runs", "1", "--warmup", "0"], truncate),
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case(
        "info: garbage weights",
        lambda env: ["info", env.model_variant(garbage_weights)],
        2,
        "model/model.safetensors is not a complete safetensors file",
    ),
    Case("export: --height -32", export("--height", "-32", "--output", "m.onnx"), 2, "--height must be a positive"),
    Case("export: --width 33", export("--width", "33", "--output", "m.onnx"), 2, "--width must be a positive"),
    # convert
    Case("convert: missing checkpoint", convert("--checkpoint", "none.pth", "--output-dir", "o"), 2, "not found"),
    Case(
        "convert: garbage checkpoint",
        convert(
            "--checkpoint", lambda env: env.file("c.pth", b"junk"), "--output-dir", lambda env: str(env.root / "conv")
        ),
        2,
        "not a PyTorch checkpoint",
    ),
    Case(
        "convert: _BASE_ loop",
        convert_yaml({"main.yaml": "_BASE_: base.yaml\n", "base.yaml": "_BASE_: main.yaml\n"}),
        2,
        "the _BASE_ chain loops back to",
    ),
    Case(
        "convert: _BASE_ names itself",
        convert_yaml({"main.yaml": "_BASE_: main.yaml\n"}),
        2,
        "main.yaml: the _BASE_ chain loops back to",
    ),
    Case(
        "convert: missing _BASE_",
        convert_yaml({"main.yaml": "_BASE_: nowhere.yaml\n"}),
        2,
        "main.yaml: _BASE_ names",
    ),
    Case("convert: _BASE_ a list", convert_yaml({"main.yaml": "_BASE_: [a.yaml]\n"}), 2, "_BASE_ must be a file name"),
    Case(
        "convert: numeric field as text",
        convert_yaml({"main.yaml": fixture_yaml("DEC_LAYERS: 1", "DEC_LAYERS: three")}),
        2,
        "main.yaml: MODEL.FASTINST.DEC_LAYERS must be int (like 10), got 'three'",
    ),
    Case(
        "convert: float field as text",
        convert_yaml({"main.yaml": fixture_yaml("DROPOUT: 0.0", "DROPOUT: none")}),
        2,
        "MODEL.FASTINST.DROPOUT must be float",
    ),
    Case(
        "convert: empty numeric field",
        convert_yaml({"main.yaml": fixture_yaml("NHEADS: 4", "NHEADS:")}),
        2,
        "MODEL.FASTINST.NHEADS must be int",
    ),
    Case(
        "convert: boolean list as text",
        convert_yaml({"main.yaml": "MODEL:\n  RESNETS:\n    DEFORM_ON_PER_STAGE: [yes, no, maybe, no]\n"}),
        2,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE must be a list of bool",
    ),
    Case(
        "convert: 0 attention heads",
        convert_yaml({"main.yaml": fixture_yaml("NHEADS: 4", "NHEADS: 0")}),
        2,
        "main.yaml",
    ),
    Case("convert: binary YAML", convert_yaml({"main.yaml": b"\xff\xfe\x00\x01"}), 2, "not valid YAML text"),
    Case("convert: YAML list", convert_yaml({"main.yaml": "- 1\n- 2\n"}), 2, "expected a YAML mapping"),
    Case(
        "convert: --push-to-hub 'a b'",
        convert("--checkpoint", str(FIXTURE_CHECKPOINT), "--output-dir", "o", "--push-to-hub", "a b"),
        2,
        "--push-to-hub: 'a b' is not",
    ),
    Case(
        "convert: --output-dir is a file",
        convert("--checkpoint", lambda env: env.file("c.pth", b"junk"), "--output-dir", lambda env: env.file("o", "x")),
        2,
        "is not a folder",
    ),
]


def leftovers(root: Path) -> list[Path]:
    """Temporary files of atomic writes left anywhere under `root`."""
    return [path for path in root.rglob("*") if ".tmp" in path.name or path.name.startswith((".converted", ".old_"))]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path, tiny_model)
    argv = case.args(env)
    if argv[0] == "predict":
        argv += ["--model", case.model(env) if case.model else str(tiny_model), "--device", "cpu"]
    if "/proc/fastinst-out" in argv and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    before = set(tmp_path.rglob("*"))

    code = main(argv)

    stderr = capsys.readouterr().err
    assert code == case.code, stderr
    assert "Traceback" not in stderr
    if case.code == 2:
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert errors == [stderr.strip().splitlines()[-1]], stderr
        assert errors[0].startswith(f"fastinst-hf {argv[0]}: error: ") and case.message in errors[0]
        # Refused before any work: nothing new but the inputs (no run folder, no empty output folder).
        assert set(tmp_path.rglob("*")) == before
    else:
        assert case.message in stderr
    for stem in case.written:
        record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == (record["width"], record["height"])
        for instance in record["instances"]:
            assert instance["segmentation"]["size"] == [record["height"], record["width"]]
    if case.written:
        assert len(list((tmp_path / "out").iterdir())) == 2 * len(case.written)
    assert not leftovers(tmp_path)


def test_table_is_large_enough():
    assert len(CASES) + len(API_CASES) >= 60


# --------------------------------------------------------------------------------------------------
# Outcomes that need more than the table: images' content, write errors, signals, batching
# --------------------------------------------------------------------------------------------------


def test_wide_and_tall_images_are_segmented_at_their_size(tiny_model, tmp_path, capsys):
    env = Env(tmp_path, tiny_model)
    sources = [env.image("wide.png", random_image((3, 10000))), env.image("tall.png", random_image((10000, 3)))]
    assert (
        main(
            [
                "predict",
                *sources,
                "--model",
                str(tiny_model),
                "--output",
                str(tmp_path / "out"),
                "--threshold",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for stem, size in (("wide", [3, 10000]), ("tall", [10000, 3])):
        record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert [record["height"], record["width"]] == size
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size == (size[1], size[0])
        assert all(instance["segmentation"]["size"] == size for instance in record["instances"])


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    expected = np.rint(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g.png"))[..., 0], expected)
    processor = FastInstImageProcessor(size={"shortest_edge": 40, "longest_edge": 56})
    from_file = processor(images=Image.open(tmp_path / "g.png"), return_tensors="pt")["pixel_values"]
    from_array = processor(images=np.repeat(expected[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_file, from_array)


def test_evaluation_scores_only_the_annotations_it_uses(tiny_model, tmp_path, capsys):
    env = Env(tmp_path, tiny_model)
    good = evaluate()(env)
    assert main(good + ["--device", "cpu"]) == 0
    clean = capsys.readouterr().out
    with_bad = evaluate(coco(annotations=[*coco()["annotations"], BAD_POLYGON]))(Env(tmp_path / "b", tiny_model))
    assert main(with_bad + ["--device", "cpu"]) == 0
    dirty = capsys.readouterr().out
    assert "scored 2 annotation(s); 1 unusable one(s) left out" in dirty
    assert "scored 2 annotation(s); 0 unusable" in clean
    assert ap_values(dirty) == ap_values(clean)


def ap_values(stdout: str) -> list[str]:
    """The AP, AP50, ... columns of `fastinst-hf evaluate`'s table."""
    return [line for line in stdout.splitlines() if "|" in line][1].split("|")[:6]


def test_write_error_names_the_file_and_leaves_no_partial_file(tiny_model, tmp_path, capsys, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    source = Env(tmp_path, tiny_model).image("a.png")
    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "out"
    code = main(["predict", source, "--model", str(tiny_model), "--output", str(out), "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"fastinst-hf predict: error: cannot write {out / 'a_overlay.png'}: No space left on device"
    )
    assert list(out.iterdir()) == []


def test_batched_predictions_equal_batch_size_1(tiny_model, tmp_path, capsys):
    env = Env(tmp_path, tiny_model)
    sources = [
        env.image(f"{i}.png", random_image(size, seed=i))
        for i, size in enumerate([(40, 56), (40, 56), (30, 30), (40, 56), (64, 20)])
    ]
    records = {}
    for batch_size in ("1", "3"):
        out = tmp_path / f"out{batch_size}"
        argv = ["predict", *sources, "--model", str(tiny_model), "--output", str(out), "--threshold", "0"]
        assert main([*argv, "--device", "cpu", "--batch-size", batch_size]) == 0
        records[batch_size] = [json.loads((out / f"{i}.json").read_text()) for i in range(len(sources))]
    for single, batched in zip(records["1"], records["3"]):
        assert single["instances"], "threshold 0 keeps the random model's non-empty masks"
        assert len(single["instances"]) == len(batched["instances"])
        for a, b in zip(single["instances"], batched["instances"]):
            assert (a["label_id"], a["segmentation"]) == (b["label_id"], b["segmentation"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def _spawn_predict(tiny_model: Path, tmp_path: Path, count: int) -> subprocess.Popen:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(count):
        random_image((64, 96), seed=i).save(folder / f"{i:03d}.png")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [
        sys.executable,
        "-m",
        "fastinst_hf.cli",
        "predict",
        str(folder),
        "--model",
        str(tiny_model),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_closed_stdout_ends_cleanly_and_still_writes(tiny_model, tmp_path):
    process = _spawn_predict(tiny_model, tmp_path, 5)
    assert process.stdout.readline().startswith("model: ")
    process.stdout.close()  # as `| head -1`
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert len(list((tmp_path / "out").glob("*.json"))) == 5


def test_ctrl_c_ends_with_a_summary_and_intact_files(tiny_model, tmp_path):
    process = _spawn_predict(tiny_model, tmp_path, 200)
    process.stdout.readline()
    process.stdout.readline()  # one image written
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = stderr.strip().splitlines()[-1]
    written = int(summary.split("wrote ")[1].split(" of ")[0])
    assert summary == f"interrupted: wrote {written} of 200 image(s) to {tmp_path / 'out'}"
    jsons = sorted((tmp_path / "out").glob("*.json"))
    assert 1 <= len(jsons) == written == len(list((tmp_path / "out").glob("*_overlay.png")))
    for path in jsons:
        json.loads(path.read_text())
        Image.open(path.with_name(f"{path.stem}_overlay.png")).load()
    assert not leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------------


def processor_outcome(image) -> Callable[[], object]:
    return lambda: FastInstImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})(images=image)


API_CASES = [
    (
        "PIL mode F",
        processor_outcome(Image.fromarray(np.zeros((8, 8), np.float32))),
        ValueError,
        "no defined value range",
    ),
    (
        "PIL mode I beyond 16 bits",
        processor_outcome(Image.fromarray(np.full((8, 8), 70000, np.int32))),
        ValueError,
        "no defined",
    ),
    ("int32 array", processor_outcome(np.zeros((8, 8, 3), np.int32)), ValueError, "expected dtype uint8"),
    ("5-channel array", processor_outcome(np.zeros((8, 8, 5), np.uint8)), ValueError, "channels"),
    ("4-D array", processor_outcome(np.zeros((1, 8, 8, 3), np.uint8)), ValueError, "expected shape"),
    ("a number", processor_outcome(12), TypeError, "single or a list"),
]


@pytest.mark.parametrize("name, call, error, message", API_CASES, ids=[case[0] for case in API_CASES])
def test_processor_rejects(name, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_processor_reads_mode_i_in_16_bit_range_as_16_bit():
    values = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000
    processor = FastInstImageProcessor(size={"shortest_edge": 8, "longest_edge": 8})
    from_i = processor(images=Image.fromarray(values), return_tensors="pt")["pixel_values"]
    from_16 = processor(images=values.astype(np.uint16), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_i, from_16)


@pytest.mark.parametrize("size_hw", [(3, 10000), (10000, 3), (1, 1), (16, 16)])
def test_model_and_pipeline_segment_extreme_sizes(tiny_model, size_hw):
    from transformers import pipeline

    model = FastInstForInstanceSegmentation.from_pretrained(tiny_model).eval()
    processor = FastInstImageProcessor.from_pretrained(tiny_model)
    image = random_image(size_hw)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    result = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[size_hw])[0]
    assert tuple(result["segmentation"].shape) == size_hw
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor, subtask="instance")
    for instance in segmenter(image, threshold=0.0):
        assert instance["mask"].size == image.size


def test_from_pretrained_warns_about_non_finite_weights(tiny_model, tmp_path, caplog):
    folder = Env(tmp_path, tiny_model).model_variant(edit_weights(with_nan))
    with caplog.at_level(logging.WARNING, logger="fastinst_hf.modeling_fastinst"):
        FastInstForInstanceSegmentation.from_pretrained(folder)
    assert "hold NaN or Inf values" in caplog.text and "class_predictor" in caplog.text


def test_glob_does_not_follow_folder_symlinks(tmp_path):
    env = Env(tmp_path, tmp_path)
    pattern = symlink_loop(env)
    assert collect_image_paths([pattern]) == [tmp_path / "loop/a.png", tmp_path / "loop/sub/b.png"]


def test_failed_variant_download_leaves_no_cache_folder(tmp_path):
    with pytest.raises(ModelResolutionError, match="could not download"):
        fetch_official_model("fastinst-d1-r50", cache_dir=tmp_path, url=(tmp_path / "missing.pth").as_uri())
    assert list(tmp_path.iterdir()) == []
