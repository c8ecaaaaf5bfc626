"""SIGINT/SIGTERM as a stop request that the training loop honours at the next step boundary.

A preempted or Ctrl-C'd run must save its state before it exits, and it can only do that between steps:
in the middle of a backward pass, or with the ranks of a data-parallel job at different places, there is
no consistent state to save. So the handler only raises a flag.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries, so a stop always saves first.

    A second signal while stopping raises KeyboardInterrupt, so an impatient Ctrl-C twice still stops a run
    that hangs while saving.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("got %s: stopping after this step and saving", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle the signals inside the block (only possible on the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)
