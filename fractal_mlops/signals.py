"""Ctrl-C and SIGTERM that never cut a record in half.

A worker turns SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt (workers.Stopped, which keeps
the signal's number for the exit code), which its trial loop catches to close the running trial
(MLflow run KILLED, Optuna trial FAIL "interrupted"). While a record is being written (a grid
point claimed but its run not yet started, a run being closed) an interrupt would leave the
trial RUNNING with nobody to close it, so there the signal is only noted, and
raised where the loop can handle it: when the hold is released, or by the next signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from fractal_mlops.errors import Stopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InterruptGuard:
    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._signum = signal.SIGINT

    def install(self) -> InterruptGuard:
        """Route the stop signals through this guard (call once, in the main thread)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self._signum = signum
        if self._depth:
            self._pending = True
            return
        raise Stopped(signum)

    def hold(self) -> None:
        """From now on a signal waits for `release()`; holds nest."""
        self._depth += 1

    def release(self, raise_pending: bool = True) -> None:
        """End one hold; the last one raises the interrupt that came meanwhile."""
        self._depth -= 1
        if raise_pending:
            self.raise_pending()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A hold for a block; a signal that came meanwhile waits for `raise_pending()`."""
        self.hold()
        try:
            yield
        finally:
            self.release(raise_pending=False)

    def raise_pending(self) -> None:
        if self._pending and not self._depth:
            self._pending = False
            raise Stopped(self._signum)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """A stop signal that comes during the block takes effect when it ends, through whatever
    handler was there (a KeyboardInterrupt, a guard's deferral, the default exit).

    Around SQLite writes: a KeyboardInterrupt inside one leaves its connection holding the
    database's write lock, and the process's next write (closing the run KILLED) then finds the
    database locked. Python runs signal handlers in the main thread only, so elsewhere this is
    a no-op (and no signal can land there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def exit_code(exc: BaseException) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
