"""A periodic job in a daemon thread: the webhook outbox and the stalled-run check use it."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("stethoscope.server")


class Periodic:
    """Calls ``job()`` every ``interval`` seconds until stopped; ``wake()`` calls it sooner.

    ``job`` returns true when it has more to do at once (a full batch), false to wait. An
    exception is logged and counted in ``errors``; the thread goes on.

        outbox = Periodic("webhook-outbox", 1.0, deliver_due)
        outbox.start(); ...; outbox.wake(); ...; outbox.stop()
    """

    def __init__(self, name: str, interval: float, job: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.job = job
        self.errors = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"stethoscope-{self.name}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the job runs: a wake() that comes while it runs is not lost.
            self._wake.clear()
            more = False
            try:
                more = bool(self.job())
            except Exception:
                self.errors += 1
                log.exception("%s failed; trying again in %.1f s", self.name, self.interval)
            if not more:
                self._wake.wait(self.interval)
