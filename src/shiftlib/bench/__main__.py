"""``python -m shiftlib.bench`` (or ``torchrun --nproc-per-node P -m shiftlib.bench``)."""

import sys

from shiftlib.bench.cli import main

sys.exit(main())
