#!/usr/bin/env python
"""Runtimes side by side, as `fastinst-hf benchmark`; options: `python scripts/benchmark.py --help`."""

import sys

from fastinst_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
