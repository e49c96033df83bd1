"""A process that must not outlive the one that started it."""
from __future__ import annotations

import signal


def die_with_parent() -> None:
    """Linux sends this process SIGTERM when its parent (the thread that started it) dies, even by SIGKILL. Called in
    a child between fork and exec (only code that takes no lock runs there), or first thing in a child's main. Not
    Linux: nothing happens, and the child's own checks (a parent that changed) stop it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
