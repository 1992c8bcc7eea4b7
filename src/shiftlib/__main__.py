"""``python -m shiftlib`` (and ``torchrun -m shiftlib``): the ``shiftlib`` command."""

from shiftlib.cli import main

raise SystemExit(main())
