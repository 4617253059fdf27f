#!/usr/bin/env python
"""COCO mask AP and per-image inference time of a saved FastInst model.

    python scripts/evaluate_model.py --model runs/x/final --coco-json val.json --images val_images/ [--threshold 0] \
        [--device cpu]

Not named evaluate.py: Python puts scripts/ first on the import path, where that name would hide the `evaluate`
package that computes the AP.
"""

import sys

from fastinst_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
