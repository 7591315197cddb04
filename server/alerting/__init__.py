"""Wiring of alerting into a server worker: detector runner, webhook outbox, stalled-run check.

alerting = Alerting(settings)
store = alerting.make_store(engine)   # Store whose ingest runs the detectors
alerting.start()                      # background threads: outbox, stalled-run check
...
alerting.stop()
"""

from __future__ import annotations

from sqlalchemy import Engine

from ..ops.background import Periodic
from ..settings import Settings
from ..store import Store
from .detector_runner import DetectorRunner
from .outbox import Outbox


class Alerting:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner = DetectorRunner(settings)
        self.outbox: Outbox | None = None
        self.stall_check: Periodic | None = None

    def make_store(self, engine: Engine) -> Store:
        store = Store(engine, on_points=self.runner if self.settings.detectors_enabled else None)
        self.outbox = Outbox(store, self.settings)
        self.outbox.watch(engine)
        self.runner.wake_outbox = self.outbox.wake_on_commit

        def check() -> bool:
            self.runner.check_stalled(store)
            return False

        self.stall_check = Periodic("stalled-run-check", self.settings.stall_check_s, check)
        return store

    def start(self) -> None:
        self.outbox.start()
        if self.settings.detectors_enabled:
            self.stall_check.start()

    def stop(self) -> None:
        self.stall_check.stop()
        self.outbox.stop()

    @property
    def errors(self) -> int:
        """Internal failures swallowed so far (logged); tests expect none."""
        return self.runner.errors + self.outbox.errors + self.stall_check.errors
