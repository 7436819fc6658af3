"""Ctrl-C during training lands between steps, never inside a checkpoint save.

Python raises KeyboardInterrupt wherever the main thread happens to be. In the training
loop that is often inside Orbax's save call (the demo saves every two steps), and an
exception there can leave Orbax's background commit waiting on state the main thread
never finished setting up: the run then hangs in its own clean-up instead of exiting.
So while the loop runs, the first SIGINT only asks it to stop: the loop checks
`requested()` before each step and raises KeyboardInterrupt there, where the checkpoint
in flight is a complete one that the clean-up can wait for. A second SIGINT interrupts
at once, for a step that never ends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def at_step_boundaries() -> Iterator[Callable[[], bool]]:
    """Yields `requested()`: True once Ctrl-C was pressed. Outside the main thread (where
    Python delivers no signals) it changes nothing and `requested()` stays False."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def ask_to_stop(signum, frame):
        pressed.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once
        logging.warning("interrupted: stopping before the next step (Ctrl-C again to stop now)")

    signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
