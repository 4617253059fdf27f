"""The README's Python example runs as written (embedded model, bundled image)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_on_the_embedded_model(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    torch.set_num_threads(1)
    exec(compile(blocks[0], f"{README}:python example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # One line per pipeline instance, e.g. "rectangle 0.97 (256, 256)", then the post-processing result.
    assert any(re.fullmatch(r"(ellipse|rectangle|triangle) [01]\.\d+ \(256, 256\)", line) for line in printed), printed
    assert "torch.Size([256, 256])" in printed[-1]
