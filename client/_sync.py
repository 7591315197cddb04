"""``stethoscope sync``: upload spooled runs to a server, in order, resumably.

Safe to run twice or to interrupt: the spool's cursor records what the server took, and
the server stores each (run, series, step) once, so a resent batch adds nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ._batch import split_batch
from ._spool import Spool, find_spools
from ._transport import Backoff, HttpTransport, NotFound, Rejected, TryLater

#: Attempts per request before ``sync`` gives up (the spool keeps its place for next time).
SYNC_ATTEMPTS = 8


class Progress:
    """A one-line text progress bar on stderr (only when it is a terminal, unless forced)."""

    def __init__(self, total_bytes: int, stream=None, force: bool = False):
        self.total = max(1, total_bytes)
        self.done = 0
        self.points = 0
        self.stream = stream or sys.stderr
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self._last = 0.0

    def update(self, nbytes: int, points: int, final: bool = False) -> None:
        self.done += nbytes
        self.points += points
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.1):
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r[{bar:<30}] {frac * 100:5.1f}%  {self.points} points")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def pending_bytes(spool: Spool) -> int:
    seg, off = spool._cursor
    total = 0
    for s in spool.segments():
        if s >= seg:
            total += spool._seg_path(s).stat().st_size - (off if s == seg else 0)
    return total


def sync(path, server: str, progress_stream=None, force_progress: bool = False, sleep=time.sleep) -> tuple[int, int]:
    """Upload every spool at or under ``path``; returns (runs uploaded, points sent).

    Raises ``RuntimeError`` when the server stays unreachable or refuses a run.
    """
    transport = HttpTransport(server)
    spools = []
    for p in find_spools(Path(path)):
        if Spool.in_use(p):
            print(f"stethoscope: skipping {p}: a running job is still writing it", file=sys.stderr)
            continue
        spools.append(Spool(p))
    progress = Progress(sum(pending_bytes(s) for s in spools), progress_stream, force_progress)
    runs = points = 0
    try:
        for spool in spools:
            meta = spool.run_meta()
            run_id = meta.pop("run_id")
            base = f"/api/v1/runs/{run_id}"
            _retry(lambda base=base, meta=meta: transport.request("PUT", base, meta), sleep)
            while True:
                before = pending_bytes(spool)
                entry = spool.peek()
                if entry is None:
                    break
                kind, body = entry
                method, suffix = {
                    "points": ("POST", "/points"),
                    "events": ("POST", "/events"),
                    "status": ("PATCH", ""),
                }[kind]
                try:
                    _send(transport, method, base + suffix, kind, body, sleep)
                except Rejected as exc:
                    print(f"stethoscope: the server refused a batch of run {run_id} ({exc}); skipped", file=sys.stderr)
                spool.ack()
                n = sum(len(s["steps"]) for s in body["series"]) if kind == "points" else 0
                points += n
                progress.update(before - pending_bytes(spool), n)
            spool.skip_torn_tail()
            if spool.skipped:
                print(
                    f"stethoscope: {spool.skipped} entr{'y' if spool.skipped == 1 else 'ies'} of run {run_id} in "
                    f"{spool.path} were cut short while being written (the job was killed, or its disk "
                    f"filled) and are skipped; the rest is uploaded",
                    file=sys.stderr,
                )
            runs += 1
            spool.close(remove_if_empty=True)
        progress.update(0, 0, final=True)
    finally:
        transport.close()
        for s in spools:
            s.close(remove_if_empty=False)
    return runs, points


def _send(transport, method: str, path: str, kind: str, body, sleep) -> None:
    """One spool entry; a batch too large for the server (413) goes in halves."""
    try:
        _retry(lambda: transport.request(method, path, body, compress=kind == "points"), sleep)
    except Rejected as exc:
        halves = split_batch(kind, body) if exc.status == 413 and kind in ("points", "events") else None
        if halves is None:
            raise
        for half in halves:
            _send(transport, method, path, kind, half, sleep)


def _retry(fn, sleep):
    backoff = Backoff()
    for attempt in range(SYNC_ATTEMPTS):
        try:
            return fn()
        except Rejected as exc:
            if exc.status in (401, 403):  # stop: the spool keeps its place for a run with a good token
                raise RuntimeError(
                    f"the server refused the token ({exc}); set STETHOSCOPE_TOKEN to a token with the ingest scope"
                ) from None
            raise
        except NotFound:
            raise RuntimeError("the server has no such run (it should have been created first)") from None
        except TryLater as exc:
            if attempt == SYNC_ATTEMPTS - 1:
                raise RuntimeError(f"server unreachable: {exc}") from None
            sleep(backoff.next_delay(exc.retry_after))
