"""A circuit breaker in front of the store, so an outage costs a request at most one timeout.

Closed: every call goes through. After ``threshold`` consecutive failures, or at once after a
timeout (a hung Redis would otherwise cost every lookup its socket timeout), it opens: calls are
refused without touching the network for ``cooldown`` seconds. Then it lets exactly one call
through as a probe; success closes it, failure opens it for another cool-down.
"""

from __future__ import annotations

import threading
import time


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown: float = 5.0) -> None:
        if threshold < 1 or cooldown < 0:
            raise ValueError("threshold must be >= 1 and cooldown >= 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0  # 0.0: closed
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._open_until != 0.0

    def retry_in(self) -> float:
        """Seconds until :meth:`allow` may let a probe through (0 when closed or cooled down), so
        a background task can wait for the probe instead of being refused."""
        if self._open_until == 0.0:
            return 0.0
        return max(0.0, self._open_until - time.monotonic())

    def after_fork(self) -> None:
        """In a forked child: a probe the parent had in flight will never report back here,
        and the lock may be held by a thread that does not exist here."""
        self._lock = threading.Lock()
        self._probing = False

    def allow(self) -> bool:
        """Whether the next store call may go out (at most one probe at a time once open)."""
        if self._open_until == 0.0:
            return True
        if time.monotonic() < self._open_until:
            return False
        with self._lock:
            if self._probing:
                return False
            self._probing = True
            return True

    def cancel_probe(self) -> None:
        """The call :meth:`allow` let through was not sent after all (another breaker it needed
        refused): a probe it granted is given back, or the breaker would wait for it forever."""
        if self._probing:
            with self._lock:
                self._probing = False

    def succeeded(self) -> None:
        if self._failures or self._open_until:
            with self._lock:
                self._failures = 0
                self._open_until = 0.0
                self._probing = False

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._open_until or is_timeout(exc) or self._failures >= self.threshold:
                self._open_until = time.monotonic() + self.cooldown
