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
    """Records gathered into per-series columns (steps, values, walls).

    ``add`` keeps a record's points as a row and returns at once (it runs for every training
    step); the rows become columns when the columns are read (``series``, ``take``,
    ``set_point``, ``add_point``), a run of records with the same names at a time: one
    transposition per run instead of a dictionary lookup and three appends per point. The
    columns are the same, in the same order."""

    def __init__(self, finish_values):
        self.finish_values = finish_values
        self._series: dict[str, tuple[list, list, list]] = {}
        self._rows: list[tuple] = []  # (step, wall, names, values) not yet in the columns
        self.events: list[dict] = []
        self.statuses: list[str] = []
        self.points = 0
        self.last_step = None

    @property
    def series(self) -> dict[str, tuple[list, list, list]]:
        """Series name -> (steps, values, walls), in the order the names first came."""
        if self._rows:
            self._columns()
        return self._series

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
                self.points += min(len(names), len(values))
                names, values = (*names, *host_names), (*values, *host_values)
            else:
                names, values = host_names, host_values
            self.points += min(len(host_names), len(host_values))
            self._rows.append((step, wall, names, values))
            self.last_step = step
            return step, names, values
        if kind == "event":
            self.events.append(rec[1])
        elif kind == "status":
            self.statuses.append(rec[1])
        return None

    def _columns(self) -> None:
        """Move the rows into the columns, in order."""
        rows, self._rows = self._rows, []
        series = self._series
        i, n = 0, len(rows)
        while i < n:
            names = rows[i][2]
            k = len(names)
            j = i + 1
            if k == len(rows[i][3]) and len(set(names)) == k:
                # A run of rows with these names (each name once, a value for each).
                while j < n and rows[j][2] == names and len(rows[j][3]) == k:
                    j += 1
            # else a run of this row alone: a name twice (its points in record order), or
            # values that do not match the names (as many points as the shorter has)
            run = rows[i:j]
            steps = [r[0] for r in run]
            walls = [r[1] for r in run]
            for name, values in zip(names, zip(*[r[3] for r in run])):
                col = series.get(name)
                if col is None:
                    col = series[name] = ([], [], [])
                col[0].extend(steps)
                col[1].extend(values)
                col[2].extend(walls)
            i = j

    def set_point(self, name: str, step: int, value: float) -> None:
        """``add_point``, replacing the value when the series' last point is at ``step``."""
        col = self.series.get(name)
        if col is not None and col[0] and col[0][-1] == step:
            col[1][-1] = value
        else:
            self.add_point(name, step, value)

    def add_point(self, name: str, step: int, value: float, wall: float | None = None) -> None:
        series = self.series
        col = series.get(name)
        if col is None:
            col = series[name] = ([], [], [])
        col[0].append(step)
        col[1].append(value)
        col[2].append(wall if wall is not None else time.time())
        self.points += 1

    def take(self):
        """Yield spool entries in the order they must reach the server, and empty the batch."""
        series = self.series
        if series:
            chunk, n = [], 0
            for name, (steps, values, walls) in series.items():
                for i in range(0, len(steps), MAX_POINTS_PER_BATCH):
                    column = values[i : i + MAX_POINTS_PER_BATCH]
                    total = sum(column, 0.0)  # finite: every value is (encode_values would keep them all)
                    s = {
                        "name": name,
                        "steps": steps[i : i + MAX_POINTS_PER_BATCH],
                        "values": column if total - total == 0.0 else encode_values(column),
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
        self._series, self.events, self.statuses, self.points = {}, [], [], 0
