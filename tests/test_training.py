"""Trainer: parameter groups, schedules, a 2-process CPU run, exact resume, atomic checkpoints, bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastinst_hf import FastInstConfig, FastInstForInstanceSegmentation
from fastinst_hf.cli import main as cli_main
from fastinst_hf.data.synthetic import make_shapes_dataset, split_coco
from fastinst_hf.image_processing_fastinst import FastInstImageProcessor
from fastinst_hf.training import loop
from fastinst_hf.training.checkpoints import latest_checkpoint, save_final_model
from fastinst_hf.training.metrics_log import MetricsLog
from fastinst_hf.training.model_init import CLASS_HEAD_KEY_PARTS, accelerator_kwargs_handlers, build_model, init_config
from fastinst_hf.training.optim import build_param_groups, build_scheduler


def main(argv: list[str]) -> int:
    return cli_main(["train", *argv])


REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "backbone_config": {
        "model_type": "resnet",
        "embedding_size": 8,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "layer_type": "bottleneck",
        "out_features": ["stage2", "stage3", "stage4"],
    },
    "hidden_dim": 32,
    "pixel_decoder_channels": 32,
    "mask_dim": 32,
    "group_norm_groups": 8,
    "num_attention_heads": 4,
    "dim_feedforward": 64,
    "decoder_layers": 1,
    "num_queries": 10,
    "num_auxiliary_queries": 2,
    "train_num_points": 256,
    "test_shortest_edge": 128,
    "test_longest_edge": 160,
}
LABELS = {0: "ellipse", 1: "rectangle", 2: "triangle"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 shapes images of 128x128 split 6 train / 2 val, and the tiny config as a JSON file."""
    root = tmp_path_factory.mktemp("train_shapes")
    train_json, val_json = split_coco(make_shapes_dataset(root, 8, image_size=(128, 128), seed=3), 0.25, seed=0)
    config_json = root / "tiny_config.json"
    config_json.write_text(json.dumps(TINY_CONFIG))
    return {"train": train_json, "val": val_json, "images": root / "images", "config": config_json}


@pytest.fixture(autouse=True)
def single_thread_and_fresh_accelerate():
    # Two intra-op threads on a shared 2-core machine make tiny ops ~100x slower; accelerate keeps singletons
    # between in-process runs.
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _args(data, output_dir, *extra):
    return [
        "--train-json", str(data["train"]), "--train-images", str(data["images"]),
        "--output-dir", str(output_dir), "--config-json", str(data["config"]),
        "--train-short-edges", "128", "--train-max-size", "160", "--crop-prob", "0",
        "--num-workers", "0", "--log-every", "1", "--eval-every", "0", *extra,
    ]  # fmt: skip


def _records(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _tiny_model(labels=LABELS):
    return build_model("config", TINY_CONFIG, labels, log=lambda message: None)


def test_param_groups_follow_upstream():
    model = _tiny_model()
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(by_param) == len(trainable) == sum(len(g["params"]) for g in groups)
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            group = by_param[id(param)]
            assert group["lr"] == pytest.approx(1e-5 if "backbone" in name else 1e-4), f"{name}.{param_name}"
            no_decay = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.Embedding))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), f"{name}.{param_name}"
    assert by_param[id(model.model.position_embedding)]["weight_decay"] == 0.05
    embedding = model.model.query_proposal.auxiliary_query_features.weight
    assert by_param[id(embedding)]["weight_decay"] == 0.0
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules()) and any(
        isinstance(m, nn.LayerNorm) for m in model.modules()
    )
    # Backbone BN is frozen (buffers), so the backbone has weights but no norm parameters.
    assert {g["name"] for g in groups} == {"backbone/decay", "head/decay", "head/no_decay"}


def test_schedules():
    def lrs(schedule, **kwargs):
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = build_scheduler(optimizer, schedule, max_steps=100, **kwargs)
        values = []
        for _ in range(100):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    step = lrs("step", lr_steps=(0.889, 0.963))
    assert step[88] == 1.0 and step[89] == pytest.approx(0.1) and step[96] == pytest.approx(0.01)
    warm = lrs("step", warmup_steps=10)
    assert warm[0] == 0.0 and warm[5] == pytest.approx(0.5) and warm[10] == 1.0
    poly = lrs("poly", poly_power=0.9)
    assert poly[0] == 1.0 and poly[50] == pytest.approx(0.5**0.9) and poly[99] < 0.02


def test_class_heads_reinitialised_for_new_labels(tmp_path, capsys):
    saved = _tiny_model()
    saved.save_pretrained(tmp_path / "saved")
    same = build_model(str(tmp_path / "saved"), {}, LABELS)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0)

    new = build_model(str(tmp_path / "saved"), {}, {0: "nucleus"})
    assert "re-initialising the class heads" in capsys.readouterr().out
    assert new.config.id2label == {0: "nucleus"} and new.config.label2id == {"nucleus": 0}
    assert new.model.query_proposal.classifier.out_channels == 2
    assert new.model.decoder.prediction_heads[0].class_predictor.layers[2].out_features == 2
    new_state = new.state_dict()
    for key, value in saved.state_dict().items():
        if not any(part in key for part in CLASS_HEAD_KEY_PARTS):
            torch.testing.assert_close(new_state[key], value, rtol=0, atol=0)


def test_two_process_cpu_run(data, tmp_path):
    output_dir = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "scripts/train.py"),
        *_args(data, output_dir, "--batch-size", "1", "--max-steps", "2", "--save-every", "1",
               "--val-json", str(data["val"]), "--val-images", str(data["images"])),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    info = json.loads((output_dir / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert info["total_batch_size"] == 2
    assert latest_checkpoint(output_dir).name == "step_2"
    assert sorted(p.name for p in (output_dir / "checkpoints/step_2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    records = _records(output_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["num_images"] == 2 and "AP" in records[-1] and records[-1]["ms_per_image"] > 0
    model = FastInstForInstanceSegmentation.from_pretrained(output_dir / "final")
    assert model.config.id2label == LABELS
    processor = FastInstImageProcessor.from_pretrained(output_dir / "final")
    assert processor.size.shortest_edge == 128 and processor.size.longest_edge == 160
    assert (output_dir / "metrics.png").stat().st_size > 0


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    # 6 images, batch 2, 2 micro-batches per step: 3 batches per epoch, so step 2 stops mid-epoch (epoch 1).
    common = ["--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--save-every", "0", "--seed", "7"]
    full, split = tmp_path / "full", tmp_path / "split"
    main(_args(data, full, *common))
    main(_args(data, split, *common, "--stop-at-step", "2"))
    state = json.loads((split / "checkpoints/step_2/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (2, 1, 1)
    assert not (split / "final").exists()
    main(_args(data, split, *common, "--resume"))

    full_records, split_records = _records(full), _records(split)
    assert [r["step"] for r in split_records] == [1, 2, 3, 4]
    for a, b in zip(full_records, split_records):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_proposal", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    full_weights = load_file(full / "final/model.safetensors")
    split_weights = load_file(split / "final/model.safetensors")
    assert full_weights.keys() == split_weights.keys()
    for key, value in full_weights.items():
        torch.testing.assert_close(split_weights[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_interrupted_save_keeps_last_checkpoint(data, tmp_path, monkeypatch):
    from accelerate import Accelerator

    output_dir = tmp_path / "run"
    original = Accelerator.save_state
    calls = []

    def failing_save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # a crash in the middle of writing the second checkpoint
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"truncated")
            raise RuntimeError("simulated crash during save")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    args = _args(data, output_dir, "--batch-size", "2", "--max-steps", "3", "--save-every", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    assert latest_checkpoint(output_dir).name == "step_1"
    assert not (output_dir / "checkpoints/step_2").exists()
    assert json.loads((output_dir / "checkpoints/step_1/trainer_state.json").read_text())["step"] == 1

    # Resuming uses step_1, cleans the partial save and finishes; the final push goes through the mocked Hub API.
    monkeypatch.setattr(Accelerator, "save_state", original)
    pushed = []

    def fake_push(model, processor, repo_id, model_card, private):
        pushed.append((repo_id, type(model).__name__, type(processor).__name__, "3 steps" in model_card))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(loop, "push_model_to_hub", fake_push)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main(args + ["--resume", "--push-to-hub", "me/fastinst-shapes"])
    assert [r["step"] for r in _records(output_dir)] == [1, 2, 3]
    assert latest_checkpoint(output_dir).name == "step_3"
    assert not list((output_dir / "checkpoints").glob(".tmp_*"))
    assert pushed == [("me/fastinst-shapes", "FastInstForInstanceSegmentation", "FastInstImageProcessor", True)]


def _reject_constant(name):
    raise ValueError(f"not JSON: {name}")


def test_metrics_files_write_non_finite_values_as_null(tmp_path):
    log = MetricsLog(tmp_path, None)
    losses = {"loss": 2.5, "loss_ce": float("inf"), "loss_mask": 1.0, "loss_dice": 1.0, "loss_proposal": 0.5}
    log.append({"step": 1, "epoch": 0, **losses})
    log.append({"step": 2, "epoch": 0, "AP": 10.0, "AP50": 20.0, "AP75": 5.0, "APl": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_reject_constant) for line in lines]
    assert records[0]["loss_ce"] is None and records[1]["APl"] is None and records[1]["AP"] == 10.0
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    first, second = (dict(zip(columns, row.split(","))) for row in rows)
    assert first["loss_ce"] == "" and first["loss"] == "2.5"
    assert second["APl"] == "" and second["AP"] == "10"
    # A resumed log reads the nulls back and rewrites valid files.
    MetricsLog(tmp_path, resume_step=2).plot()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=_reject_constant) for line in lines] == records


class _SingleProcessAccelerator:
    is_main_process = True

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        pass

    def wait_for_everyone(self):
        pass


def test_interrupted_final_save_keeps_the_previous_model(tmp_path, monkeypatch):
    accelerator, model, processor = _SingleProcessAccelerator(), _tiny_model(), FastInstImageProcessor()
    final_dir = save_final_model(accelerator, model, processor, tmp_path)
    original_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name == ".tmp_final":
            raise OSError("simulated crash while moving the new model in")
        return original_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_final_model(accelerator, model, processor, tmp_path)
    # The previous model is still complete, in final/ or moved aside next to it.
    kept = [d for d in (final_dir, tmp_path / ".old_final") if (d / "model.safetensors").is_file()]
    assert kept and FastInstForInstanceSegmentation.from_pretrained(kept[0]).config.num_labels == len(LABELS)

    monkeypatch.setattr(os, "replace", original_replace)
    save_final_model(accelerator, model, processor, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (final_dir / "model.safetensors").is_file() and (final_dir / "preprocessor_config.json").is_file()


def test_ddp_looks_for_unused_parameters_only_without_auxiliary_loss(tmp_path):
    from accelerate.utils import DistributedDataParallelKwargs

    assert accelerator_kwargs_handlers(init_config("config", {})) == []
    FastInstConfig(use_auxiliary_loss=False).save_pretrained(tmp_path)
    for config in (init_config("config", {"use_auxiliary_loss": False}), init_config(str(tmp_path), {})):
        (handler,) = accelerator_kwargs_handlers(config)
        assert isinstance(handler, DistributedDataParallelKwargs) and handler.find_unused_parameters


@pytest.mark.parametrize(
    "change, message",
    [
        (("--train-json", "missing.json"), "--train-json: file not found: missing.json"),
        (("--train-images", "no_such_dir"), "--train-images: folder not found: no_such_dir"),
        (("--val-json", "missing_val.json", "--val-images", "."), "--val-json: file not found: missing_val.json"),
        (("--init", "no_such_model"), "--init: 'no_such_model' is neither"),
        (("--config-json", "{not json"), "--config-json: not valid JSON"),
        (("--max-steps", "0"), "--max-steps must be >= 1"),
        (("--resume", "no_checkpoint_here"), "--resume: no_checkpoint_here is not a checkpoint folder"),
        (("--backbone-weights", "no_such.pth"), "--backbone-weights: file not found: no_such.pth"),
    ],
)
def test_bad_inputs_exit_with_message(data, tmp_path, capsys, change, message):
    args = _args(data, tmp_path / "run")
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("fastinst-hf train: error: ") and message in stderr


def test_existing_run_needs_resume(data, tmp_path, capsys):
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/checkpoints/latest").write_text("step_1\n")
    assert main(_args(data, tmp_path / "run")) == 2
    assert "already holds a run with checkpoints: pass --resume" in capsys.readouterr().err


def test_bad_inputs_from_the_command_line(tmp_path):
    command = [sys.executable, str(REPO / "scripts/train.py"), "--train-json", str(tmp_path / "nope.json"),
               "--train-images", str(tmp_path), "--output-dir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"--train-json: file not found: {tmp_path / 'nope.json'}" in result.stderr


def test_mixed_precision_defaults_to_the_launchers_flag():
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; an explicit "no" default would
    override it and train in float32 silently."""
    code = (
        "from accelerate import Accelerator\n"
        "from fastinst_hf.cli.train import add_arguments\n"
        "import argparse\n"
        "parser = argparse.ArgumentParser(); add_arguments(parser)\n"
        "args = parser.parse_args(['--train-json', 'x', '--train-images', 'y', '--output-dir', 'z'])\n"
        "print(args.mixed_precision, Accelerator(mixed_precision=args.mixed_precision, cpu=True).mixed_precision)\n"
    )
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["None", "bf16"]
