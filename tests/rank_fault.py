"""A rank of ``shiftlib generate`` that fails mid-generation: ``python rank_fault.py raise|kill STEP -- ARGS...``.

Launched once per rank (by torchrun, or by the test with torchrun's environment variables). Rank 1 fails when
the engine reaches step STEP: it raises, or kills itself with SIGKILL; every other rank runs the command as is.
"""

import os
import signal
import sys

from shiftlib.cli import main
from shiftlib.engine.engine import Engine

how, at_step, args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
if int(os.environ["RANK"]) == 1:
    step, steps = Engine.step, [0]

    def failing_step(self):
        steps[0] += 1
        if steps[0] == at_step:
            print(f"rank 1 fails at step {at_step}", file=sys.stderr, flush=True)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {at_step}")
        return step(self)

    Engine.step = failing_step
sys.exit(main(args))
