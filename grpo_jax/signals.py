"""Stopping a run gracefully: the first SIGTERM / SIGINT finishes the step and saves; a second exits at once.

Preemptible TPU VMs and job schedulers send SIGTERM before they take the machine away;
`loop.Run` checks `StopSignals.received` after every step (on every process together).
"""

from __future__ import annotations

import os
import signal
from typing import Optional


class StopSignals:
    """A context manager that records the first SIGTERM / SIGINT instead of dying on it."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without saving", flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
