"""Kicking a vCPU thread out of KVM_RUN with a signal.

A blocked KVM_RUN (a halted guest waiting for an interrupt) returns only on a signal. The signal
needs a handler, or it would kill the process; Python's own C-level handler does, and it makes
the syscall fail with EINTR since Python installs handlers without SA_RESTART.
"""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGRTMIN + 1
_installed = False


def install() -> None:
    """Install the no-op handler; must run once in the main thread before vCPU threads start."""
    global _installed
    if _installed:
        return
    if threading.current_thread() is not threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise RuntimeError("vmcore.kvm.kick.install() must first be called from the main thread")
        _installed = True
        return
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    _installed = True


def kick(thread: threading.Thread) -> None:
    if thread.ident is not None and thread.is_alive():
        try:
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass
