#!/usr/bin/env python
"""Convert an official FastInst checkpoint into a transformers folder (config.json + model.safetensors + processor).

    python scripts/convert_fastinst_to_hf.py --checkpoint fastinst_R50_ppm-fpn_x1_576_34.9.pth \
        --variant fastinst-d1-r50 --output-dir fastinst-d1-r50
    python scripts/convert_fastinst_to_hf.py --checkpoint model.pth --config configs/.../fastinst_R50_ppm-fpn_x3_640.yaml \
        --output-dir out --push-to-hub your-name/fastinst-d3-r50

Same as `fastinst-hf convert`.
"""

import sys

from fastinst_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
