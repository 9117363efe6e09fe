"""Stopping a run gracefully: the first SIGTERM / SIGINT finishes the step and saves; a second exits at once.

Preemptible TPU VMs and job schedulers send SIGTERM before they take the machine away;
`loop.Run` checks `StopSignals.received` after every step and between evaluation batches
(on every process together). Before the run is armed (resuming, the first evaluation) there
is nothing to save, so a signal raises `Interrupted` there and the command exits at once.
"""

from __future__ import annotations

import os
import signal
from typing import Optional


class Interrupted(KeyboardInterrupt):
    """A stop signal when there was nothing to save; the CLI turns it into one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """A context manager that records the first SIGTERM / SIGINT instead of dying on it (once armed)."""

    def __init__(self):
        self.received: Optional[int] = None
        self.armed = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def arm(self) -> None:
        """From now on a signal is recorded (the run saves and stops) instead of interrupting."""
        self.armed = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum)
        if self.received is not None:
            print(f"\nsecond {name}: exiting now without saving", flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{name} received: finishing this step and saving a checkpoint (send it again to exit at once)",
              flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
