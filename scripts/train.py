#!/usr/bin/env python
"""Train FastInst on a COCO-format dataset; options: `python scripts/train.py --help`.

Single process:  python scripts/train.py --train-json ... --train-images ... --output-dir runs/x
Data-parallel:   accelerate launch scripts/train.py ...   (CPU only: see fastinst_hf/training/loop.py)
"""

import sys

from fastinst_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
