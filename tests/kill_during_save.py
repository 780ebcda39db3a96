"""Test hook for tests/test_e2e_cpu.py, imported by every verl process through VERL_USE_EXTERNAL_MODULES.

When the worker writes the first POPO file of the checkpoint named by POPO_TEST_KILL_IN_SAVE (`global_step_N`),
after verl's shards of that checkpoint are complete, it writes half of it and exits with os._exit: no exception,
no cleanup, what SIGKILL or a lost node leaves behind, at the same point on every run.
"""

import io
import os

from popo_verl import checkpoint

_STEP = os.environ.get("POPO_TEST_KILL_IN_SAVE")
_atomic_write = checkpoint._atomic_write


def _dying_write(path, write):
    if not _STEP or f"{os.sep}{_STEP}{os.sep}" not in path:
        return _atomic_write(path, write)

    def half_then_exit(f):
        buf = io.BytesIO()
        write(buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os._exit(17)

    return _atomic_write(path, half_then_exit)


checkpoint._atomic_write = _dying_write
