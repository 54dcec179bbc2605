"""Ctrl-C for the commands a person runs, whatever state the parent left SIGINT in.

Python turns SIGINT into KeyboardInterrupt only if the process starts with
SIGINT at its default: started with SIGINT ignored (what a non-interactive
shell does to `command &`, and so to everything a script or CI job started
that way runs) or blocked, it keeps it so, and Ctrl-C or `kill -INT` does
nothing.  The daemons set their own SIGINT handlers, so they stop either
way; the client and the demo call `interruptible()` first, so that they stop
too instead of carrying on beside daemons that did.
"""

from __future__ import annotations

import signal
import threading


def interruptible() -> bool:
    """Make SIGINT raise KeyboardInterrupt in this process even if it was inherited
    ignored or blocked; True if either had to be undone.  Only the main thread can
    set handlers: anywhere else (a command invoked in a thread) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return False
    changed = False
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        changed = True
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT,))
        changed = True
    return changed
