"""Graceful stop on SIGTERM / SIGINT: finish the current step, write a checkpoint, exit with :data:`EXIT_CODE`.

Clusters send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT. Inside :class:`StopOnSignal` either
signal only sets a flag that the loop reads between steps. A second Ctrl-C aborts at once (nothing saved).
"""

from __future__ import annotations

import signal
import sys
import threading

from twostep.core.errors import TwostepError

EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; the run saved its state and `--resume` continues it exactly
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(TwostepError):
    """Raised by a loop that stopped on a signal after saving; ``cli.main`` exits with :data:`EXIT_CODE`."""

    exit_code = EXIT_CODE


class StopOnSignal:
    """Context manager: while active, SIGTERM and SIGINT set :attr:`signal_name` instead of killing the process.

    Only the main thread can install handlers; elsewhere (a test runner's worker thread) it is inert.
    """

    def __init__(self, what: str = "run"):
        self.what = what
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"twostep: {self.signal_name} received; the {self.what} stops after the current step and saves its "
              "state" + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
