"""Stopping a run when the cluster asks: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they kill a job)
and SIGINT (Ctrl-C) request a stop; a second Ctrl-C stops at once.

The handler only records the request: the training loop reads it at the end of each step (``StopRequests.requested``),
all processes agree on it with that step's sums, write a checkpoint together and exit with
``mmalign.errors.RunStopped.exit_code``. DataLoader workers ignore these signals (``ignore_stop_signals``): the
process that owns them decides when they end.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    """While entered, the stop signals set ``signal`` (the first one's name) instead of ending the process; a SIGINT
    after any request raises ``KeyboardInterrupt`` at once. Leaving restores the handlers found on entry.

    Handlers can only be set from the main thread: entered from another one, it records nothing (signals keep their
    default effect)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """For DataLoader workers (``worker_init_fn``): the stop signals leave them running until their owner ends them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
