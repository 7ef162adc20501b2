"""Stopping a training loop cleanly on SIGTERM / SIGINT: a flag the loop checks after each
step (it then saves a checkpoint and returns).  A second SIGINT aborts at once."""
from __future__ import annotations

import signal
import sys


class StopFlag:
    """While entered, SIGTERM / SIGINT set :attr:`requested` (the signal's name) instead of
    stopping the process.  A second SIGINT raises KeyboardInterrupt at once (abort without
    saving), through the handler that was installed before, if any."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the name of the signal that asked to stop
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            # Second Ctrl-C: abort now, through the caller's handler if it has one (the CLI's
            # defers the raise out of imports and finalisers, where it would be lost or fatal).
            old = self._old.get(signum)
            if callable(old) and old is not signal.default_int_handler:
                return old(signum, frame)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            print(f"\n{self.requested}: saving a checkpoint after this step "
                  f"{'(Ctrl-C again to abort)' if signum == signal.SIGINT else ''}",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
