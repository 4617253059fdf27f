"""The `fastinst-hf` console script.

`import fastinst_hf` registers the model with the transformers Auto classes, which imports torch and transformers
(seconds). Imported before the package, this module tells it to leave that to the first command that needs a model,
so `fastinst-hf --help` and `fastinst-hf COMMAND --help` answer at once (see `fastinst_hf/__init__.py`).
`python -m fastinst_hf.cli` (what `accelerate launch -m` needs) is the same command line without this shortcut.
"""

import sys


def main() -> int:
    from fastinst_hf.cli.main import main as run_command_line

    return run_command_line()


if __name__ == "__main__":
    sys.exit(main())
