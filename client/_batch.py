"""Batches: records of the training loop gathered into the column bodies the server ingests.

The sender thread adds each record to a :class:`Batch` and, about once a second, takes the
batch apart into spool entries; a body too large for the server is cut in halves
(:func:`split_batch`, also used by ``stethoscope sync``).
"""

from __future__ import annotations

import time

from .core.wire import MAX_POINTS_PER_BATCH, encode_values

#: The series that counts records lost (the queue or the disk was full).
DROPPED = "stethoscope/dropped"


def split_batch(kind: str, body: dict) -> tuple[dict, dict] | None:
    """Two halves of a points or events body (for a 413); None when it is one item already."""
    if kind == "events":
        events = body["events"]
        return (
            None
            if len(events) < 2
            else ({"events": events[: len(events) // 2]}, {"events": events[len(events) // 2 :]})
        )
    series = body["series"]
    if len(series) > 1:
        return {"series": series[: len(series) // 2]}, {"series": series[len(series) // 2 :]}
    if not series or len(series[0]["steps"]) < 2:
        return None
    s, half = series[0], len(series[0]["steps"]) // 2
    cut = [{k: (v[:half] if i == 0 else v[half:]) if isinstance(v, list) else v for k, v in s.items()} for i in (0, 1)]
    return {"series": [cut[0]]}, {"series": [cut[1]]}


def records_in(kind: str, body) -> int:
    """How many ``put`` records a spool entry stood for: its steps, for points."""
    if kind == "points":  # the drop count is our bookkeeping, not a record of the job's
        return len({step for s in body["series"] if s["name"] != DROPPED for step in s["steps"]})
    return len(body.get("events", ())) or 1


class Batch:
    """Records gathered into per-series columns (steps, values, walls)."""

    def __init__(self, finish_values):
        self.finish_values = finish_values
        self.series: dict[str, tuple[list, list, list]] = {}
        self.events: list[dict] = []
        self.statuses: list[str] = []
        self.points = 0
        self.last_step = None

    def add(self, rec):
        """Take one record of the training loop. For points, returns ``(step, names, values)``:
        the step's host floats, which the hook's own detectors read (``_watch``); else None."""
        kind = rec[0]
        if kind == "points":
            _, step, wall, names, ops, packed, ready, host_names, host_values = rec
            if packed is not None:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copy was queued by the loop
                values = self.finish_values(names, ops, packed)
                if None in values:  # series not sent at this step (a rank that agrees: _ranks)
                    kept = [(n, v) for n, v in zip(names, values) if v is not None]
                    names, values = tuple(n for n, _ in kept), [v for _, v in kept]
                self._add_points(names, step, values, wall)
                names, values = (*names, *host_names), (*values, *host_values)
            else:
                names, values = host_names, host_values
            self._add_points(host_names, step, host_values, wall)
            self.last_step = step
            return step, names, values
        if kind == "event":
            self.events.append(rec[1])
        elif kind == "status":
            self.statuses.append(rec[1])
        return None

    def set_point(self, name: str, step: int, value: float) -> None:
        """``add_point``, replacing the value when the series' last point is at ``step``."""
        col = self.series.get(name)
        if col is not None and col[0] and col[0][-1] == step:
            col[1][-1] = value
        else:
            self.add_point(name, step, value)

    def _add_points(self, names, step: int, values, wall: float) -> None:
        """``add_point`` for one record's points (one step, one wall time): the loop inlined."""
        series = self.series
        for name, v in zip(names, values):
            col = series.get(name)
            if col is None:
                col = series[name] = ([], [], [])
            col[0].append(step)
            col[1].append(v)
            col[2].append(wall)
        self.points += min(len(names), len(values))

    def add_point(self, name: str, step: int, value: float, wall: float | None = None) -> None:
        col = self.series.get(name)
        if col is None:
            col = self.series[name] = ([], [], [])
        col[0].append(step)
        col[1].append(value)
        col[2].append(wall if wall is not None else time.time())
        self.points += 1

    def take(self):
        """Yield spool entries in the order they must reach the server, and empty the batch."""
        if self.series:
            chunk, n = [], 0
            for name, (steps, values, walls) in self.series.items():
                for i in range(0, len(steps), MAX_POINTS_PER_BATCH):
                    s = {
                        "name": name,
                        "steps": steps[i : i + MAX_POINTS_PER_BATCH],
                        "values": encode_values(values[i : i + MAX_POINTS_PER_BATCH]),
                        "walls": walls[i : i + MAX_POINTS_PER_BATCH],
                    }
                    if n + len(s["steps"]) > MAX_POINTS_PER_BATCH and chunk:
                        yield "points", {"series": chunk}
                        chunk, n = [], 0
                    chunk.append(s)
                    n += len(s["steps"])
            if chunk:
                yield "points", {"series": chunk}
        if self.events:
            yield "events", {"events": self.events}
        for status in self.statuses:
            yield "status", {"status": status}
        self.series, self.events, self.statuses, self.points = {}, [], [], 0
