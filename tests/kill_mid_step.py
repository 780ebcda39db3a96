"""Test hook for tests/test_e2e_cpu.py, imported by every verl process through VERL_USE_EXTERNAL_MODULES.

The training worker SIGKILLs itself inside an actor update, right after the optimizer step that takes the EMA step
count to POPO_TEST_KILL_AT_EMA_STEP and before the siamese follows it: a worker lost mid-step, at the same point on
every run (a timer would land anywhere). Before dying it writes the time to POPO_TEST_KILL_STAMP.
"""

import os
import signal
import time

from popo_verl.import_hooks import when_imported

_AT = os.environ.get("POPO_TEST_KILL_AT_EMA_STEP")


def _patch() -> None:
    from popo_verl.siamese_ema import SiameseEma

    after = SiameseEma.after_optimizer_step

    def dying_after_optimizer_step(self, grad_norm, lr):
        if self.ema_steps == int(_AT):
            with open(os.environ["POPO_TEST_KILL_STAMP"], "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return after(self, grad_norm, lr)

    SiameseEma.after_optimizer_step = dying_after_optimizer_step


if _AT:
    when_imported("popo_verl.siamese_ema", _patch)
