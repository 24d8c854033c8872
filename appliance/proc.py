"""Child processes that never outlive the thread that started them."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the child when its parent thread dies, so a
    crashed ferrymand leaves no qemu, qemu-nbd or nbdkit behind."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
