"""Stalled run: a run that says it is running but has sent nothing for a while."""

from __future__ import annotations

import dataclasses

from ._base import AlertChange, ChangeLog, Detector, fmt

#: A quarter of an hour of silence. The hook sends every few seconds; checkpoint saves and
#: evaluation passes of small and medium jobs take minutes, not a quarter hour.
STALL_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class StalledRunParams:
    """Settings of :class:`StalledRunDetector`."""

    timeout_s: float = STALL_TIMEOUT_S

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError("stalled: timeout_s must be > 0")


class StalledRunDetector(Detector):
    """Time-based, key ``run``: driven by :meth:`check`, not by points.

    Call ``check`` periodically (and after each ingest, so the alert resolves as soon as data
    comes back) with the server's clock and the time the run's last point was *received*
    (not the job's clock, which may be skewed).

        det = StalledRunDetector(StalledRunParams(timeout_s=600))
        det.check(state, now=time.time(), last_seen=run.last_seen, status="running", last_step=1200)
    """

    name = "stalled"
    Params = StalledRunParams
    KEY = "run"

    def accepts(self, series: str) -> bool:
        return False

    def point(self, state, series, step, value, log) -> None:  # pragma: no cover - accepts nothing
        pass

    def check(
        self, state: dict, now: float, last_seen: float | None, status: str, last_step: int | None = None
    ) -> list[AlertChange]:
        log = ChangeLog()
        silent = None if last_seen is None else now - last_seen
        stalled = status == "running" and silent is not None and silent > self.params.timeout_s
        if stalled:
            if not self.is_open(state, self.KEY):  # one open change, not one per check
                since = f"since step {last_step}" if last_step is not None else "yet"
                self.hold(
                    state,
                    log,
                    self.KEY,
                    last_step,
                    "warning",
                    silent,
                    f"The run has sent no data {since}: nothing for {_duration(silent)} while it is "
                    f"marked running. The timeout is {_duration(self.params.timeout_s)}.",
                    {"silent_s": silent, "timeout_s": self.params.timeout_s, "last_seen": last_seen, "status": status},
                )
        elif self.is_open(state, self.KEY):
            self.clear(state, log, self.KEY, last_step, 1)
        return log.changes


def _duration(seconds: float) -> str:
    """Seconds as a person says them: "45 s", "12 min", "3.5 h"."""
    if seconds < 120:
        return f"{fmt(round(seconds))} s"
    if seconds < 7200:
        return f"{fmt(round(seconds / 60, 1))} min"
    return f"{fmt(round(seconds / 3600, 1))} h"
