"""A light one-shot result for publisher confirms.

`concurrent.futures.Future` builds a Condition per instance and takes it on every call; at tens
of thousands of confirmed publishes per second that is a measurable share of the publisher's
CPU. `Confirmation` keeps the part of the Future API the bus uses (result, exception, done,
cancel, add_done_callback; set_running_or_notify_cancel, set_result, set_exception for the I/O
thread) on one lock that doubles as the "settled" signal.
"""

from __future__ import annotations

from _thread import allocate_lock
from collections.abc import Callable
from concurrent.futures import CancelledError

_PENDING, _RUNNING, _CANCELLED, _DONE = 0, 1, 2, 3


class Confirmation:
    __slots__ = ("_callbacks", "_exc", "_guard", "_settled", "_state")

    def __init__(self) -> None:
        self._state = _PENDING
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Confirmation], object]] = []
        self._guard = allocate_lock()  # protects state changes and the callback list
        self._settled = allocate_lock()  # held until the result is in
        self._settled.acquire()

    # ---- the waiting side ------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> None:
        """Wait until settled; raise its exception, CancelledError or TimeoutError."""
        if self._state < _CANCELLED:
            got = self._settled.acquire(True, -1 if timeout is None else max(timeout, 0.0))
            if not got:
                raise TimeoutError("not confirmed in time")
            self._settled.release()  # let other waiters through
        if self._state == _CANCELLED:
            raise CancelledError
        if self._exc is not None:
            raise self._exc

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except CancelledError:
            raise
        except TimeoutError:
            raise
        except BaseException as exc:
            return exc
        return None

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def cancel(self) -> bool:
        """Cancel if not yet handed to the broker; True if it is (now) cancelled."""
        with self._guard:
            if self._state in (_RUNNING, _DONE):
                return False
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._settled.release()
        self._run_callbacks()
        return True

    def add_done_callback(self, fn: Callable[[Confirmation], object]) -> None:
        with self._guard:
            if self._state < _CANCELLED:
                self._callbacks.append(fn)
                return
        fn(self)

    # ---- the settling side -----------------------------------------------------------------

    def set_running_or_notify_cancel(self) -> bool:
        with self._guard:
            if self._state == _CANCELLED:
                return False
            self._state = _RUNNING
            return True

    def set_result(self, _result: None = None) -> None:
        self._settle(None)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(exc)

    def _settle(self, exc: BaseException | None) -> None:
        with self._guard:
            if self._state >= _CANCELLED:
                return
            self._exc = exc
            self._state = _DONE
            self._settled.release()
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        with self._guard:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a caller's callback must not break the I/O thread
                pass
