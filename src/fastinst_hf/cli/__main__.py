"""`python -m fastinst_hf.cli ...`, also what `accelerate launch -m fastinst_hf.cli train ...` runs."""

import sys

from .main import main

sys.exit(main())
