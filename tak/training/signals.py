"""Stopping a run cleanly. SIGINT (Ctrl-C) and SIGTERM (torchrun forwarding a Ctrl-C, a scheduler preempting the
job) that arrive while the loop trains are held until the step under way is done; the loop then writes its
checkpoint and raises ``TrainingInterrupted``. A second signal acts at once, as it would without this."""
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal once its checkpoint was written: started again, it continues from there."""


class HeldSignals:
    """In ``with HeldSignals(notice) as held:``, ``held.requested`` (the signal's name, or None) tells whether SIGINT
    or SIGTERM arrived. The first one is held and ``notice(name)`` called; a second one puts the previous handlers
    back and is delivered to them. Signals the process ignores stay ignored. Outside the main thread nothing is held,
    since Python runs signal handlers in the main thread only."""

    def __init__(self, notice=None):
        self.notice, self.requested, self._previous = notice, None, {}

    def __enter__(self) -> "HeldSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # None: a handler not set from Python
                    self._previous[sig] = signal.signal(sig, self._hold)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _hold(self, signum, frame) -> None:
        if self.requested is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name
        if self.notice is not None:
            self.notice(self.requested)
