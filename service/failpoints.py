"""Failpoints: named places where this process can be made to die, to prove recovery.

`GENSERVE_FAILPOINTS="name[,name...]"`, read once at import, arms them; a process that
reaches an armed failpoint kills itself with SIGKILL, as a crash or the OOM killer would,
with no cleanup and nothing flushed. Unarmed, a failpoint costs one set lookup. The
fault-injection suite (tests/faults) uses them where a signal sent from outside cannot
land at the exact moment, such as between a commit and the publish that follows it.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger("genserve.failpoints")

# Every failpoint in the code, and where it is.
KNOWN = {
    "submit.before_publish": "the API, after a job's row commits and before it is published",
}
ARMED = frozenset(name for name in os.environ.get("GENSERVE_FAILPOINTS", "").split(",") if name)
if ARMED - KNOWN.keys():
    raise RuntimeError(f"unknown failpoints {sorted(ARMED - KNOWN.keys())}; known: {sorted(KNOWN)}")


def reach(name: str) -> None:
    """Die here if `name` is armed."""
    if name in ARMED:
        logger.error("failpoint %s reached: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
