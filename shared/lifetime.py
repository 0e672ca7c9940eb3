"""A service started by a launcher ends with it, however the launcher ends.

``termtune run``/``up`` start every service as a process of its own session (a Ctrl-C on
the terminal reaches the launcher only, which then stops them in order). If the launcher is
killed outright (``kill -9``, the OOM killer), nothing would stop them: each service asks
the Linux kernel for a SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), the signal it
already handles as a graceful stop. Elsewhere, and in deployments, this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

#: set by the launcher to its own pid in every service's environment
PARENT_ENV = "TERMTUNE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def end_with_launcher() -> bool:
    """SIGTERM this process when the launcher named in the environment dies; whether armed."""
    launcher = os.environ.get(PARENT_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("cannot follow the launcher's life: prctl errno %d", ctypes.get_errno())
        return False
    if os.getppid() != int(launcher):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
    return True
