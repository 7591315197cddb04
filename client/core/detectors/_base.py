"""What every detector shares: the alert change, the episode lifecycle, robust statistics.

Standard library only: this module runs inside the server on ingest and inside training
jobs offline. Everything a detector keeps between calls lives in the plain ``state`` dict it
is handed, so the server can save it as JSON next to the points in one transaction.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left, bisect_right, insort
from typing import Any, ClassVar, Iterable

from ..wire import encode_value

#: Severities, mildest first. An episode keeps the worst severity it reached.
SEVERITIES = ("info", "warning", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_rank(severity: str | None) -> int:
    """How bad ``severity`` is: 0 for ``info`` and up in :data:`SEVERITIES` order.

    The one ordering of severities: episodes, the server's escalation check and the
    dashboard's run health all compare with it. Anything that is not a severity (``None``,
    an unknown name) ranks -1, below ``info``.
    """
    return _RANK.get(severity, -1)  # type: ignore[arg-type]


#: Actions an :class:`AlertChange` carries.
OPEN, UPDATE, RESOLVE = "open", "update", "resolve"

#: 1.4826 * MAD estimates the standard deviation of normal data (1 / Phi^-1(3/4)); it puts a
#: robust z-score on the same scale as the mean/std rules of OLMo-core and Lightning.
MAD_TO_SIGMA = 1.4826


@dataclasses.dataclass(frozen=True)
class AlertChange:
    """One change to one alert: ``open`` a new episode, ``update`` it, or ``resolve`` it.

    ``(detector, key)`` names the episode; at most one is open at a time, and
    ``(detector, key, start_step)`` names it for good: an ``open`` change for an episode that
    was resolved moments ago (within the detector's ``rejoin_steps``) carries the old
    ``start_step`` and continues it. ``start_step`` is where the condition first held,
    ``peak_step`` where it was worst. ``end_step`` is the last step at which it held while the
    alert is open, and the step at which it cleared once resolved. ``message``, ``severity``
    and ``evidence`` are those of the peak; ``first`` keeps the first detection
    (``{"step", "severity", "message", "evidence"}``: the step at which it was raised, what it
    said then). ``cause`` names the root episode that explains this one
    (``{"detector", "key", "start_step"}``), None for a root: a consequence belongs to its
    root's incident and is not paged on its own. ``evidence`` is JSON-safe (non-finite
    numbers encoded as in :mod:`stethoscope.core.wire`).
    """

    action: str
    detector: str
    key: str
    severity: str
    start_step: int
    peak_step: int
    end_step: int
    message: str
    evidence: dict
    first: dict | None = None
    cause: dict | None = None

    @property
    def status(self) -> str:
        """The alert's status after this change: ``open`` or ``resolved``."""
        return "resolved" if self.action == RESOLVE else "open"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["status"] = self.status
        return d


def json_safe(evidence: dict) -> dict:
    """Evidence with every float encoded as it travels on the wire (NaN -> "NaN", ...)."""
    out = {}
    for k, v in evidence.items():
        if isinstance(v, float):
            out[k] = encode_value(v)
        elif isinstance(v, dict):
            out[k] = json_safe(v)
        else:
            out[k] = v
    return out


def finite(x: float) -> bool:
    return x - x == 0.0


def mean(xs: list) -> float:
    return sum(xs) / len(xs)


def median(xs: list) -> float:
    s = sorted(xs)
    n = len(s)
    h = n // 2
    return s[h] if n % 2 else 0.5 * (s[h - 1] + s[h])


def median_mad(xs: list) -> tuple[float, float]:
    """Median and median absolute deviation of a non-empty list; see :func:`median_mad_sorted`."""
    return median_mad_sorted(sorted(xs), xs)


def median_sorted(s: list) -> float:
    """:func:`median` of a list already sorted (as ``sorted`` gives it)."""
    n = len(s)
    h = n // 2
    return s[h] if n % 2 else 0.5 * (s[h - 1] + s[h])


def median_mad_sorted(s: list, xs: list, clean: bool = False) -> tuple[float, float]:
    """Median and median absolute deviation of a non-empty list.

    The deviations of the sorted values from their median are two sorted runs (``m - x`` left
    of the median, falling; ``x - m`` right of it, rising), so their median is picked from the
    runs by a binary search instead of building and sorting a second list: the same floats
    (``m - x`` is exactly ``abs(x - m)`` in IEEE arithmetic), a third of the time on the loss
    spike detector's window of 128, which it takes at every step.
    ``s`` is ``sorted(xs)``. ``clean``: the caller knows ``s`` holds no NaN (a copy
    :class:`SortedWindows` kept); then its two ends tell whether every value is finite,
    without summing them all.
    """
    n = len(s)
    h = n // 2
    m = s[h] if n % 2 else 0.5 * (s[h - 1] + s[h])
    if clean and s[0] - s[0] == 0.0 and s[-1] - s[-1] == 0.0:
        pass  # every value finite (a sum of them may overflow: the search is exact all the same)
    else:
        total = sum(s)
        if total - total != 0.0:  # NaN or inf among them (sorting is then no order): the plain way
            return m, median([abs(x - m) for x in xs])
    p = bisect_right(s, m)  # left run: L[i] = m - s[p - 1 - i]; right run: R[j] = s[p + j] - m
    k = h if n % 2 else h - 1  # the median deviation is the k-th smallest (and the next, n even)
    # a = how many of the k + 1 smallest deviations are in the left run: the first a at which
    # L[a] is no longer below the right run's (k - a)-th.
    lo, hi = max(0, k + 1 - (n - p)), min(k + 1, p)
    while lo < hi:
        a = (lo + hi) // 2
        if m - s[p - 1 - a] < s[p + k - a] - m:
            lo = a + 1
        else:
            hi = a
    a, b = lo, k + 1 - lo
    kth = max(m - s[p - a] if a > 0 else 0.0, s[p + b - 1] - m if b > 0 else 0.0)
    # + 0.0: a deviation of -0.0 (m = -0.0, x = 0.0) is the 0.0 that abs() gives
    if n % 2:
        return m, kth + 0.0
    nxt = min(m - s[p - 1 - a] if a < p else math.inf, s[p + b] - m if b < n - p else math.inf)
    return m, 0.5 * (kth + nxt) + 0.0


def series_list(state: dict, field: str, series: str) -> list:
    """``state[field][series]``, a list, made empty where missing. (get, not setdefault: that
    builds both defaults at every point.)"""
    by_series = state.get(field)
    if by_series is None:
        by_series = state[field] = {}
    s = by_series.get(series)
    if s is None:
        s = by_series[series] = []
    return s


def push(window: list, x: float, size: int) -> None:
    """Append to a fixed-size window kept as a plain list (oldest first)."""
    window.append(x)
    if len(window) > size:
        del window[: len(window) - size]


class SortedWindows:
    """Sorted copies of fixed-size windows that live in a detector's state, kept up to date as
    :func:`push` appends to them, so that a rolling median or MAD costs a binary insertion and
    removal a point instead of sorting the whole window.

    The copy is ``sorted(window)`` exactly, ties included: ``sorted`` is stable, so equal
    values (0.0 and -0.0) sit in window order; a new value goes after its equals
    (``insort``) and the value leaving the window, the oldest, is the first of its equals
    (``bisect_left``). Copies are kept outside the state (the state stays the JSON it was),
    by the window list's identity: each entry holds its list, so the identity is not reused
    while the entry lives; a window the copy does not match (another list, a length that
    differs: a state loaded from JSON, a window cleared) is sorted afresh. A window holding a
    NaN (no order) is never kept: it is sorted afresh each time, as before. At most
    ``limit`` windows are kept (then all are dropped, and rebuilt as they are used): the
    server loads a run's state afresh for each request, so its windows are new lists each
    time and the copies pay off within a batch only; the old ones (each holding its window
    alive) are dropped by that limit, a few hundred KB per detector at most.
    """

    __slots__ = ("_copies", "limit")

    def __init__(self, limit: int = 256) -> None:
        self._copies: dict[int, tuple[list, list]] = {}
        self.limit = limit

    def push(self, window: list, x: float, size: int) -> list:
        """:func:`push` ``x`` onto ``window``; return ``sorted(window)`` after it (not to be
        changed by the caller)."""
        entry = self._copies.get(id(window))
        if entry is not None and entry[0] is window and x == x:
            s = entry[1]
            n = len(window)
            if len(s) == n:
                window.append(x)
                insort(s, x)
                if n == size:  # full: the oldest leaves (the usual case)
                    del s[bisect_left(s, window[0])]
                    del window[0]
                elif n > size:
                    extra = n + 1 - size
                    for old in window[:extra]:
                        del s[bisect_left(s, old)]
                    del window[:extra]
                return s
        push(window, x, size)
        return self._fresh(window)

    def sorted(self, window: list) -> list:
        """``sorted(window)``, from the kept copy when it matches (not to be changed)."""
        entry = self._copies.get(id(window))
        if entry is not None and entry[0] is window and len(entry[1]) == len(window):
            return entry[1]
        return self._fresh(window)

    def sorted_clean(self, window: list) -> tuple[list, bool]:
        """:meth:`sorted`, and whether that is a copy kept (then it holds no NaN)."""
        entry = self._copies.get(id(window))
        if entry is not None and entry[0] is window and len(entry[1]) == len(window):
            return entry[1], True
        s = self._fresh(window)
        entry = self._copies.get(id(window))
        return s, entry is not None and entry[1] is s

    def _fresh(self, window: list) -> list:
        s = sorted(window)
        copies = self._copies
        copies.pop(id(window), None)
        total = sum(s)
        if total != total:  # a NaN: sorting is no order there, so no copy can be kept
            return s
        if len(copies) >= self.limit:
            copies.clear()
        copies[id(window)] = (window, s)
        return s


class ChangeLog:
    """The changes one ``update`` call produces, at most one open/update per episode.

    A point that only extends an open episode replaces the pending change for it instead of
    adding one, so a batch of a thousand bad points yields one change, not a thousand.
    """

    __slots__ = ("changes", "_pending", "_resolved")

    def __init__(self) -> None:
        self.changes: list[AlertChange] = []
        self._pending: dict[tuple[str, str], int] = {}
        self._resolved: dict[tuple[str, str], int] = {}

    def add(self, change: AlertChange) -> None:
        k = (change.detector, change.key)
        i = self._pending.get(k)
        if change.action == RESOLVE:
            self._pending.pop(k, None)
            self._resolved[k] = len(self.changes)
            self.changes.append(change)
        elif change.action == OPEN and k in self._resolved:
            # Resolved and re-opened in one batch: if it is the same episode continuing
            # (``rejoin_steps``), the resolve never happened as far as anyone outside can tell.
            j = self._resolved.pop(k)
            old = self.changes[j]
            if old.start_step == change.start_step:
                self.changes[j] = dataclasses.replace(change, action=UPDATE)
                self._pending[k] = j
            else:
                self._pending[k] = len(self.changes)
                self.changes.append(change)
        elif i is not None and change.action == UPDATE:
            # Keep "open" if the episode opened in this same batch (an update after an update
            # is the change itself: no copy to make).
            was = self.changes[i].action
            self.changes[i] = change if was == UPDATE else dataclasses.replace(change, action=was)
        else:
            self._pending[k] = len(self.changes)
            self.changes.append(change)


class Detector:
    """Base class. A subclass sets ``name`` and ``Params`` and implements ``accepts``/``point``.

    ``update(state, points)`` reads ``(series, step, value)`` points for one run, keeps what
    it needs in ``state`` (a JSON dict it owns, bounded in size) and returns alert changes.
    Points of one series come in step order; a point at a step not after the last one seen
    for its series is ignored, so feeding a batch twice changes nothing.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    #: The order of the points of one step: None, as they come; else a function of the series
    #: name, and :meth:`feed` takes a batch's points by (step, step_rank(series)) (stable).
    step_rank: ClassVar[Any] = None

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()
        self._sorted = SortedWindows()  # sorted copies of the rolling windows in states

    # -- what subclasses implement ---------------------------------------------------------
    def accepts(self, series: str) -> bool:
        raise NotImplementedError

    def point(self, state: dict, series: str, step: int, value: float, log: ChangeLog) -> None:
        raise NotImplementedError

    # -- driver ----------------------------------------------------------------------------
    def update(self, state: dict, points: Iterable[tuple[str, int, float]]) -> list[AlertChange]:
        """Feed ``(series, step, value)`` points; return the alert changes they caused."""
        return self.feed(state, [pt for pt in points if self.accepts(pt[0])])

    def feed(self, state: dict, points: Iterable[tuple[str, int, float]]) -> list[AlertChange]:
        """:meth:`update` for points already known to be accepted (the engine routes them)."""
        log = ChangeLog()
        if self.step_rank is not None:
            points = sorted(points, key=self._step_key())
        seen = state.get("seen")
        if seen is None:  # not setdefault: that makes a dict at every call (the hook calls per step)
            seen = state["seen"] = {}
        point, last_of = self.point, seen.get
        for series, step, value in points:
            last = last_of(series)
            if last is not None and step <= last:
                continue
            seen[series] = step
            point(state, series, step, float(value), log)
        return log.changes

    def step_points(self, state: dict, step: int, names: tuple, values, idx: tuple, log: ChangeLog) -> None:
        """What :meth:`feed` does with the points ``(names[i], step, values[i])``, ``i`` in
        ``idx`` (in feeding order), of one step, logging to ``log``: :meth:`DetectorSet.feed_step`
        (the hook's path) calls it for a detector that keeps :meth:`feed`, without building
        the points. A detector may override it to take a step's points in one go."""
        seen = state.get("seen")
        if seen is None:
            seen = state["seen"] = {}
        point = self.point
        for i in idx:
            name = names[i]
            last = seen.get(name)
            if last is not None and step <= last:
                continue
            seen[name] = step
            point(state, name, step, float(values[i]), log)

    def _step_key(self):
        """The sort key of :meth:`feed`'s order: ``(step, step_rank(series))``, each series'
        rank worked out once a call."""
        rank, ranks = self.step_rank, {}

        def key(pt):
            r = ranks.get(pt[0])
            if r is None:
                r = ranks[pt[0]] = rank(pt[0])
            return pt[1], r

        return key

    # -- episode lifecycle -----------------------------------------------------------------
    def hold(
        self,
        state: dict,
        log: ChangeLog,
        key: str,
        step: int,
        severity: str,
        score: float,
        message: str,
        evidence: dict,
        start: int | None = None,
    ) -> None:
        """The condition for episode ``key`` holds at ``step``: open, escalate or extend it.

        ``start`` backdates a new episode to where its condition began (after a patience).
        """
        eps = state.get("episodes")
        if eps is None:  # not setdefault: that makes a dict at every call
            eps = state["episodes"] = {}
        ep = eps.get(key)
        if ep is None:
            closed = state.get("closed", {}).pop(key, None)
            if closed is not None and step - closed["resolved"] <= self.rejoin_steps:
                # Back within ``rejoin_steps`` of its resolution: the same episode goes on.
                del closed["resolved"]
                ep = eps[key] = closed
            else:
                evidence = json_safe(evidence)
                ep = eps[key] = {
                    "severity": severity,
                    "start": step if start is None else start,
                    "peak": step,
                    "end": step,
                    "score": _json_score(score),
                    "message": message,
                    "evidence": evidence,
                    "clear": 0,
                }
                if step - ep["start"] < self.min_steps:
                    ep["quiet"] = True  # not an alert until it has held for min_steps
                    return
                ep["first"] = {"step": step, "severity": severity, "message": message, "evidence": evidence}
                if self.delay_steps > 0:
                    # An alert, told once the delay has passed since its condition began.
                    ep["held"] = ep["start"]
                else:
                    log.add(self._change(OPEN, key, ep))
                return
            action = OPEN
        elif ep.get("quiet"):
            action = OPEN if step - ep["start"] >= self.min_steps else None
        elif "held" in ep:
            action = OPEN if self._release(ep, step) else None
        else:
            action = UPDATE
        ep["end"] = step
        ep["clear"] = 0
        if "cleared_at" in ep:
            del ep["cleared_at"]
        if "clear_step" in ep:
            del ep["clear_step"]
        rank, was = _RANK.get(severity, -1), _RANK.get(ep["severity"], -1)
        if rank > was or (rank == was and _json_score(score) > ep["score"]):
            ep.update(
                severity=severity, peak=step, score=_json_score(score), message=message, evidence=json_safe(evidence)
            )
        if action is None:
            return
        if ep.pop("quiet", False):
            ep["first"] = {"step": step, "severity": severity, "message": message, "evidence": json_safe(evidence)}
        log.add(self._change(action, key, ep))

    def _release(self, ep: dict, step: int) -> bool:
        """Whether a held episode's delay is over at ``step`` (then it is held no more)."""
        if step - ep["held"] < self.delay_steps:
            return False
        del ep["held"]
        return True

    @property
    def delay_steps(self) -> int:
        """Steps an alert waits after its first detection before it is told (the detector's
        ``delay_steps`` setting; 0 when it has none): long enough for a root cause that shows
        at the same time (a divergence behind a loss jump) to claim it as its consequence, so
        the incident is paged once, by its cause. It is told even if it has cleared by then."""
        return getattr(self.params, "delay_steps", 0)

    @property
    def min_steps(self) -> int:
        """Steps a condition must hold, from its start, before its episode is an alert (the
        detector's ``min_steps`` setting; 0 when it has none). Until then the episode is quiet:
        it emits nothing, and it is dropped without a trace if the condition clears."""
        return getattr(self.params, "min_steps", 0)

    @property
    def rejoin_steps(self) -> int:
        """Steps after a resolution within which the condition coming back continues the same
        episode (the detector's ``rejoin_steps`` setting; 0 when it has none)."""
        return getattr(self.params, "rejoin_steps", 0)

    def clear(self, state: dict, log: ChangeLog, key: str, step: int, needed: int) -> None:
        """The condition for ``key`` does not hold at ``step``; resolve after ``needed`` such steps.

        Steps, not points: a detector fed by several series sees each step more than once.
        """
        eps = state.get("episodes")
        ep = eps.get(key) if eps else None
        if ep is None:
            return
        if ep.get("quiet"):  # never became an alert: nothing to resolve
            del eps[key]
            return
        if "held" in ep and self._release(ep, step):
            log.add(self._change(OPEN, key, ep))
        if ep["clear"] == 0:
            ep["cleared_at"] = step
        elif ep.get("clear_step") == step:
            return
        ep["clear_step"] = step
        ep["clear"] += 1
        if ep["clear"] >= needed and "held" not in ep:  # resolving waits until it has been told
            ep["end"] = ep.pop("cleared_at")
            ep.pop("clear_step", None)
            del eps[key]
            log.add(self._change(RESOLVE, key, ep))
            if self.rejoin_steps > 0:
                # Kept (one per key) so that the condition coming back soon continues it.
                ep["clear"] = 0
                ep["resolved"] = step
                state.setdefault("closed", {})[key] = ep

    def keep(self, state: dict, key: str, log: ChangeLog | None = None, step: int | None = None) -> None:
        """Neither held nor cleared: restart the count of clear points without extending.
        (With ``log`` and ``step``, an alert whose delay has passed is told now.)"""
        ep = state["episodes"][key]
        if log is not None and "held" in ep and self._release(ep, step):
            log.add(self._change(OPEN, key, ep))
        ep["clear"] = 0
        ep.pop("cleared_at", None)
        ep.pop("clear_step", None)

    def is_open(self, state: dict, key: str) -> bool:
        return key in state.get("episodes", ())

    def _change(self, action: str, key: str, ep: dict) -> AlertChange:
        return episode_change(action, self.name, key, ep)


def episode_change(action: str, detector: str, key: str, ep: dict) -> AlertChange:
    """The change ``action`` of episode ``key`` of ``detector``, as its state ``ep`` stands."""
    return AlertChange(
        action,
        detector,
        key,
        ep["severity"],
        ep["start"],
        ep["peak"],
        ep["end"],
        ep["message"],
        ep["evidence"],
        ep.get("first"),
        ep.get("cause"),
    )


def _json_score(x: float) -> float:
    """Scores are compared to find the peak; +inf would not survive JSON, so cap it."""
    if x != x:
        return 0.0
    return max(-1e300, min(1e300, x))


def sentence(text: str) -> str:
    """``text`` with a capital first letter: an alert message starts with a plain sentence
    (what happened, at which step), then the evidence."""
    return text[:1].upper() + text[1:]


def fmt(x: float) -> str:
    """A number as a person reads it in a one-line message."""
    if not finite(x):
        return str(encode_value(x))
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"
