"""Stop signals, for one worker and for the launcher of several.

SIGINT (Ctrl-C), SIGTERM and SIGHUP all raise `Stopped` in the main thread: a worker then
marks its running trial FAIL ("interrupted") and exits 128 + the signal's number (130, 143,
129). The launcher starts its workers in their own sessions, so a terminal's Ctrl-C or hang-up
reaches only the launcher; it passes exactly one SIGTERM to each worker, waits for them to close
their trials, and kills any that do not within the grace period (their trials are then found
"worker lost" by the next run). A second signal to the launcher kills the workers at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_SECONDS = 120.0


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(exc: BaseException) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerGroup:
    """Worker processes started together and stopped together."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.procs: list[subprocess.Popen] = []
        self.grace = grace
        self._hurry = False

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.stop()

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        self.procs.append(subprocess.Popen(argv, env=env, start_new_session=True,
                                           preexec_fn=_stop_with_parent))

    def wait(self) -> list[int]:
        return [proc.wait() for proc in self.procs]

    def stop(self) -> None:
        """One SIGTERM to each running worker; wait for all (a second signal: kill them)."""
        previous = {s: signal.signal(s, self._kill_now) for s in STOP_SIGNALS}
        try:
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while any(p.poll() is None for p in self.procs):
                if self._hurry or time.monotonic() > deadline:
                    self._kill_all()
                time.sleep(0.1)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _kill_now(self, signum: int, frame) -> None:
        self._hurry = True

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
