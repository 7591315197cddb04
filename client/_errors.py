"""Swallowing our own failures so they never reach the training loop.

Every place where the hook could fail because of its own code (a bug) runs inside
``swallowed(where)`` (the per-step paths of ``Monitor.log`` and its optimizer hook inside
``try``/``except Exception`` calling ``report(where, exc)``: the same, without a context
manager's calls). The exception is logged once per place and counted; tests register a
listener (see ``tests/client/conftest.py``) that turns each one into a failure, the way
sentry-python's ``capture_internal_exceptions`` works with its test fixture.

Expected trouble (a server that is down, a full disk) is not an internal error: the sender
handles it with retries and the spool and logs it at debug level.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger("stethoscope")

_listeners: list[Callable[[str, BaseException], None]] = []
_seen: set[str] = set()
_lock = threading.Lock()
count = 0


def add_listener(fn: Callable[[str, BaseException], None]) -> None:
    """Call ``fn(where, exc)`` for every swallowed internal error (used by tests)."""
    _listeners.append(fn)


def remove_listener(fn: Callable[[str, BaseException], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def report(where: str, exc: BaseException) -> None:
    """Record an internal error that was swallowed at ``where``."""
    global count
    with _lock:
        count += 1
        first = where not in _seen
        _seen.add(where)
    try:
        if first:
            logger.warning("stethoscope: internal error in %s (training continues): %r", where, exc, exc_info=exc)
        else:
            logger.debug("stethoscope: internal error in %s: %r", where, exc)
        for fn in list(_listeners):
            fn(where, exc)
    except Exception:  # a broken logging handler must not break the job either
        pass


class swallowed:  # noqa: N801 - used like the contextmanager function it replaced
    """Run a block; an ``Exception`` from it is reported and dropped, never raised.

    A class, not ``@contextmanager``: the hook enters it a few times per training step, and a
    generator-based context manager costs several times more per use."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self):
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        if tp is not None and issubclass(tp, Exception):
            report(self.where, exc)
            return True
        return False
