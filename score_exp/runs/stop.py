"""Bounded stops: SIGTERM and SIGINT end every command within seconds, wherever it is.

Lightning's SIGTERM handler only raises a flag that its loops look at between batches; a batch
that takes minutes (``depth.steps: 100000000``) would keep a killed process computing for as
long. :func:`install` puts a handler in front of the signals: it lets the previous one (and
Lightning's, which calls it) do its graceful part, and arms an alarm: if the process is still
running ``grace`` seconds later, :class:`Stopped` is raised in the main thread, between two
Python operations of whatever loop is running. A training run then still records itself as
``interrupted`` (``score-train`` catches it like any interruption) and resumes from its last
checkpoint when re-run; a reader (``score-eval``, ``score-sample``) simply stops.

A second signal while the grace runs stops at once.

A rank of a data-parallel run can also end because a *peer* ended (its node died, it crashed, it
was stopped): :func:`peer_lost` tells that error apart, so that the rank records it as the
peer's news, never as its own failure.
"""

from __future__ import annotations

import re
import signal
import threading

#: Seconds a training run has, after SIGTERM or SIGINT, to reach Lightning's next stop point
#: (the end of a batch: ``last.ckpt`` reflects it) before it is stopped where it is.
TRAIN_GRACE_S = 10.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when a stop signal's grace has run out."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_state: dict = {"received": None, "grace": 0.0}


def received() -> int | None:
    """The stop signal this process received (``signal.SIGTERM``, ``signal.SIGINT``), or None."""
    return _state["received"]


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_alarm(signum, frame) -> None:
    raise Stopped(_state["received"] or signal.SIGTERM)


def install(grace: float) -> None:
    """Bound every stop of this process to ``grace`` seconds (0: stop at once).

    Only in the main thread (signal handlers live there); a no-op elsewhere. The handler that
    was installed before (Python's KeyboardInterrupt for SIGINT) is replaced for SIGINT (its
    graceful part is this module's) and kept behind ours for SIGTERM. SIGINT stops at once (a
    :class:`Stopped` is a ``KeyboardInterrupt``); SIGTERM first raises Lightning's flag.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _state.update(received=None, grace=float(grace))
    signal.signal(signal.SIGALRM, _on_alarm)
    for signum in SIGNALS:
        previous = signal.getsignal(signum)
        signal.signal(signum, _handler(previous if signum == signal.SIGTERM else None))


def _handler(previous):
    def handle(signum, frame) -> None:
        first = _state["received"] is None
        _state["received"] = signum
        if not first or _state["grace"] <= 0 or signum == signal.SIGINT:
            raise Stopped(signum)  # Ctrl-C: at once, as Python's own KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, _state["grace"])  # then _on_alarm raises
        if callable(previous):
            previous(signum, frame)  # Lightning's SIGTERM flag: a graceful stop at a batch end

    return handle


def disarm() -> None:
    """Cancel a pending alarm (the command ended within its grace)."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def exit_stopped(prog: str, what: str = "") -> None:
    """Say in one line that ``prog`` was stopped (and ``what`` that means), exit ``128 + signum``
    as a process killed by that signal would (143 for SIGTERM, 130 for SIGINT)."""
    import sys

    signum = received() or signal.SIGTERM
    print(f"{prog}: stopped by {name(signum)}{'; ' + what if what else ''}", file=sys.stderr)
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- a lost peer

#: What a collective raises on a rank whose peer process is gone (gloo, NCCL).
PEER_LOST = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|remote process exited|NCCL communicator was "
    r"aborted",
    re.IGNORECASE,
)


def peer_lost(error: BaseException | None) -> bool:
    """True when ``error`` (or one it was raised from) says a peer rank is gone: that rank's
    news, not this one's own error."""
    for _ in range(8):
        if error is None or PEER_LOST.search(str(error)):
            return error is not None
        error = error.__cause__ or error.__context__
    return False


def peer_lost_message(error: BaseException) -> str:
    """A rank's one-line account of an error that :func:`peer_lost` recognises."""
    first = (str(error).splitlines() or [""])[0][:200]
    return (f"a peer rank was lost ({type(error).__name__}: {first}); that rank's own log "
            "(train_rank<N>.log, or Slurm's output) says why it ended")  # fmt: skip
