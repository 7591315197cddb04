"""A new process sending to a run the server already has points of: a resume.

A job restarted from a checkpoint attaches to the same run id (``run=``) and logs from the
checkpoint's step, often lower than the last step the run reached. The sender learns that
last step from the reply to its first ``PUT /runs/{id}`` and compares it with the first step
this process sends; nothing is asked of the user. A resume is said once (a warning) and
marked by a ``restart`` event at the step it starts at. The server keeps the first value of
each (series, step) (ingest is idempotent), so the points the resumed job logs again at steps
the run already has would be ignored under their own names: they are kept next to the first
ones as ``restart/<step>/<name>`` (``restart/250/loss``), and the steps after the old last
step continue the usual series. Inside one process, steps going down are a mistake, not a
resume: the monitor warns once (``Monitor.log``).
"""

from __future__ import annotations

import logging
import os
import time

from .core.wire import MAX_NAME_LENGTH

logger = logging.getLogger("stethoscope")

#: Prefix of the series that keep a resumed job's points at steps the run already has.
RESTART_PREFIX = "restart"

_UNKNOWN = object()


class Resume:
    """Sender-thread state: is this process resuming its run, and from which step?"""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.prior_last_step = _UNKNOWN  # the run's last step before this process sent anything
        self.span = None  # None: not decided yet; False: not a resume; (first step, prior last step)
        self._event = None

    def run_found(self, reply) -> None:
        """The reply to a ``PUT /runs/{id}``: only the first one tells what came before us."""
        if self.prior_last_step is _UNKNOWN:
            self.prior_last_step = reply.get("last_step") if isinstance(reply, dict) else None

    def points(self, body: dict) -> tuple[dict, dict | None]:
        """A points body as it must be sent, and the ``restart`` event to send before it (once)."""
        if self.span is None:
            self._decide(body)
        if not self.span or self.span[0] > self.span[1]:
            return body, self._event
        first, prior = self.span
        prefix = f"{RESTART_PREFIX}/{first}/"
        out = []
        for ser in body["series"]:
            again = {i for i, step in enumerate(ser["steps"]) if first <= step <= prior}
            if not again or len(prefix) + len(ser["name"]) > MAX_NAME_LENGTH:
                out.append(ser)  # nothing replayed (or no room for the prefix: the server keeps the first)
                continue
            new = [i for i in range(len(ser["steps"])) if i not in again]
            for name, idx in ((ser["name"], new), (prefix + ser["name"], sorted(again))):
                if idx:
                    cols = {k: [ser[k][i] for i in idx] for k in ("steps", "values", "walls") if k in ser}
                    out.append({**ser, "name": name, **cols})
        return {**body, "series": out}, self._event

    def event_sent(self) -> None:
        self._event = None

    def _decide(self, body: dict) -> None:
        prior = self.prior_last_step
        first = min((s for ser in body["series"] for s in ser["steps"]), default=None)
        if prior is _UNKNOWN or prior is None or first is None:
            self.span = False  # a new run (or one without points yet): nothing to resume
            return
        self.span = (first, prior)
        kept = (
            f"; its points at steps {first}-{prior} are kept as {RESTART_PREFIX}/{first}/<name>, "
            f"the first ones stay under their names"
            if first <= prior
            else ""
        )
        logger.warning(
            "stethoscope: run %s resumes at step %d (it had reached step %d)%s", self.run_id, first, prior, kept
        )
        self._event = {
            "key": f"restart-{first}-{os.getpid()}-{time.time_ns()}",
            "step": first,
            "kind": "restart",
            "message": f"resumed at step {first} after step {prior}",
            "info": {"resumed_at": first, "previous_last_step": prior},
            "wall": time.time(),
        }
