"""Timeouts and waits, written once: the default timeout, a deadline, and the one poll loop
every host-side wait of the package uses."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from ._checks import check_timeout

__all__ = [
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT",
    "default_timeout",
    "Deadline",
    "poll_until",
    "process_alive",
]

TIMEOUT_ENV = "EPLB_PYNCCL_TIMEOUT"
DEFAULT_TIMEOUT = 600.0

T = TypeVar("T")


def default_timeout() -> float:
    """``$EPLB_PYNCCL_TIMEOUT`` (checked like any timeout, the message naming the variable),
    else :data:`DEFAULT_TIMEOUT`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    return check_timeout(raw, env=TIMEOUT_ENV)


class Deadline:
    """``timeout`` seconds from now on the monotonic clock (``at``)."""

    __slots__ = ("at",)

    def __init__(self, timeout: float) -> None:
        self.at = time.monotonic() + float(timeout)

    def remaining(self) -> float:
        """Seconds left, 0.0 once passed."""
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() > self.at

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3g} s)"


def poll_until(
    cond: Callable[[], T],
    deadline: Deadline | float,
    on_timeout: Callable[[], object],
    *,
    cap: float = 1e-3,
    spin: float = 0.0,
) -> T:
    """Call ``cond()`` until it returns something truthy, and return that.

    Between calls: ``spin`` seconds of bare yields (``sleep(0)``) first, then sleeps from 10 us
    doubling up to ``cap``. Once ``deadline`` (a :class:`Deadline` or a ``time.monotonic()``
    value) has passed with ``cond()`` still falsy, ``on_timeout()`` is called; it is expected to
    raise (a TimeoutError is raised if it does not). ``cond`` may raise to end the wait.
    """
    at = deadline.at if isinstance(deadline, Deadline) else float(deadline)
    spin_until = time.perf_counter() + spin if spin > 0 else 0.0
    delay = 1e-5
    while True:
        r = cond()
        if r:
            return r
        if time.monotonic() > at:
            on_timeout()
            raise TimeoutError("the wait passed its deadline")
        if spin_until and time.perf_counter() < spin_until:
            time.sleep(0)
            continue
        time.sleep(delay)
        delay = min(delay * 2, cap)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) runs; a zombie, exited but not reaped, does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
