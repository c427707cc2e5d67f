#!/usr/bin/env python
"""hf_gemact mlm training; see docs/TRAINING.md. Start with `accelerate launch` or plain python:

    accelerate launch train_scripts/run_mlm.py --output_dir OUT [flags]   (--help lists them)
"""

import sys
from pathlib import Path

try:
    from hf_gemact.training import main
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_gemact.training import main

if __name__ == "__main__":
    sys.exit(main("mlm"))
