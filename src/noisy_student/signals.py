"""A stop request as an exception: SIGTERM (what Kubernetes, Slurm and a Prefect
cancellation send) and SIGINT raise ``Stopped`` in the main thread, so that every ``with``
block and ``finally`` of the step runs as it unwinds: its MLflow records end KILLED, its
temporary files are removed and nothing half-written is published."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The process was asked to stop by signal ``signum``. A ``BaseException``, as
    ``KeyboardInterrupt`` is, so that no ``except Exception`` takes it for an error to
    recover from."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, the shell's convention (143 for SIGTERM)."""
        return 128 + self.signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # The cleanup runs once: a second signal (Slurm signals every process of a step, and
    # torchrun forwards the same signal to its ranks) must not cut it short. SIGKILL
    # still ends the process.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM or SIGINT raise ``Stopped`` (once); the handlers
    that were there before are restored after it. Outside the main thread, where Python
    cannot install handlers, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number in STOP_SIGNALS:
        signal.signal(number, _raise_stopped)
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
