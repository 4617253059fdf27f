"""The command line starts at once: `--help` of the tool and of every command in a fresh process, without torch."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastinst_hf.cli.main import COMMANDS
from fastinst_hf.cli.options import VARIANT_NAMES

ROOT = Path(__file__).resolve().parents[1]
HELP_SECONDS = 3.0  # generous: about 0.3 s on an idle machine, and the CI machine is shared
HEAVY = ("torch", "transformers", "numpy")


def console_script() -> tuple[str, str]:
    """(module, function) of the `fastinst-hf` entry point declared in pyproject.toml."""
    # tomllib is Python 3.11+; the project supports 3.10
    entry = re.search(r'^fastinst-hf = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return entry.group(1), entry.group(2)


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )


def help_run(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run the console script's function with `args` as a fresh process would (what the installed script does), then
    print the heavy modules it imported; returns (seconds, process)."""
    module, function = console_script()
    code = (
        "import sys\n"
        f"from {module} import {function}\n"
        f"try:\n    {function}()\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    start = time.perf_counter()
    process = run_python(code, *args)
    return time.perf_counter() - start, process


def test_help_is_instant_and_imports_no_heavy_module():
    seconds, process = help_run("--help")
    assert process.returncode == 0, process.stderr
    assert all(name in process.stdout for name in COMMANDS)
    assert process.stdout.strip().endswith("imported: []"), process.stdout
    assert seconds < HELP_SECONDS


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_is_instant_and_imports_no_heavy_module(command):
    seconds, process = help_run(command, "--help")
    assert process.returncode == 0, process.stderr
    assert f"usage: fastinst-hf {command}" in process.stdout
    assert process.stdout.strip().endswith("imported: []"), f"`{command} --help` imports {process.stdout[-80:]}"
    assert seconds < HELP_SECONDS


def test_version_names_torch_and_transformers():
    module, function = console_script()
    process = run_python(f"import sys; from {module} import {function}; sys.exit({function}())", "--version")
    assert process.returncode == 0 and "(torch " in process.stdout and ", transformers " in process.stdout


def test_import_registers_the_auto_classes_and_the_console_script_defers_it():
    eager = run_python(
        "import fastinst_hf\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print('fastinst' in CONFIG_MAPPING)\n"
    )
    assert eager.stdout.split() == ["True"], eager.stderr
    module, _ = console_script()
    lazy = run_python(
        f"import sys, {module}, fastinst_hf\n"
        "print('torch' in sys.modules)\n"
        "config = fastinst_hf.FastInstConfig  # the first use of a model name registers the model\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('fastinst')) is config)\n"
    )
    assert lazy.stdout.split() == ["False", "True"], lazy.stderr


def test_light_copies_of_names_match_their_sources():
    from fastinst_hf import VARIANTS
    from fastinst_hf.cli.evaluate import IOU_TYPES
    from fastinst_hf.evaluation import coco_evaluator

    assert sorted(VARIANT_NAMES) == sorted(VARIANTS)
    assert IOU_TYPES == coco_evaluator.IOU_TYPES
