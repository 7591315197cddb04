"""Scoring the detectors on labelled runs: replay each run one step at a time, match alerts
to the labelled events, and sum up per detector and per incident.

Definitions (each figure in the report uses exactly these):

- episode: one ``(detector, key, start_step)``; raised at the step fed when it first opened.
  An ``open`` change of an episode that rejoins (same start_step) counts as another open.
- an episode detects an event of its detector when it is raised at a step in ``[lo, hi]``.
- lead: event step minus the raise step of the earliest episode detecting it (positive:
  early); ``lead_warning`` uses the step at which a detecting episode first was warning or
  critical.
- precision: root episodes (no ``cause``) that detect an event / all root episodes of that
  detector. Consequences (episodes with a ``cause``) are counted apart.
- false alerts: ``open`` changes at warning or critical on healthy runs, per 10,000 steps
  of healthy runs (info opens are counted apart).
- loud alert: an ``open`` change with no ``cause`` at warning or critical, or an ``update``
  that takes an episode with no ``cause`` from info to warning/critical (the server sends
  ``alert.escalated`` then). An incident is a labelled event; a loud alert belongs to the
  event of its own detector whose window holds it, else to any event whose window holds it
  (the nearest), else it is unmatched.
"""

from __future__ import annotations

import statistics

import _detector_scenarios as S

from stethoscope.core.detectors import DETECTORS, DetectorSet, severity_rank

LOUD = severity_rank("warning")


def replay(points, settings=None) -> list[tuple[int, object]]:
    """[(step fed, change)], feeding one step at a time as ``S.replay`` does."""
    log: list = []
    S.replay(S.Scenario("corpus", points, []), DetectorSet(settings), log=log)
    return log


def episodes(log) -> dict:
    """{(detector, key, start): {"raised", "warned", "opens", "cause", "severity", "loud": [steps]}}."""
    eps: dict = {}
    for step, c in log:
        ep = eps.setdefault(
            (c.detector, c.key, c.start_step),
            {"raised": step, "warned": None, "opens": 0, "cause": None, "severity": "info", "loud": []},
        )
        was = severity_rank(ep["severity"])
        if c.action == "open":
            ep["opens"] += 1
        if severity_rank(c.severity) >= LOUD and ep["warned"] is None:
            ep["warned"] = step
        if c.cause is None and severity_rank(c.severity) >= LOUD and (c.action == "open" or was < LOUD):
            ep["loud"].append(step)
        ep["cause"] = c.cause
        if severity_rank(c.severity) > was:
            ep["severity"] = c.severity
    return eps


def score_run(run, labels, log) -> dict:
    """Per-run facts: events with their detection, episodes, loud alerts by incident."""
    eps = episodes(log)
    events = []
    for e in labels.events:
        hits = [(k, ep) for k, ep in eps.items() if k[0] == e.detector and e.lo <= ep["raised"] <= e.hi]
        warned = [ep["warned"] for _, ep in hits if ep["warned"] is not None and ep["warned"] <= e.hi]
        events.append(
            {
                "detector": e.detector,
                "step": e.step,
                "tag": e.tag,
                "detected": bool(hits),
                "raised": min((ep["raised"] for _, ep in hits), default=None),
                "warned": min(warned, default=None),
                "episodes": len(hits),
                "opens": sum(ep["opens"] for _, ep in hits),
                "matched": [k for k, _ in hits],
                "loud": 0,
            }
        )
    matched = {k for ev in events for k in ev["matched"]}
    unmatched_loud = []
    for k, ep in eps.items():
        for step in ep["loud"]:
            holders = [ev for ev, e in zip(events, labels.events) if e.lo <= step <= e.hi]
            own = [ev for ev in holders if ev["detector"] == k[0]]
            pick = own or sorted(holders, key=lambda ev: abs(ev["step"] - step))
            if pick:
                pick[0]["loud"] += 1
            else:
                unmatched_loud.append((k[0], k[1], step))
    return {
        "run": run.name,
        "part": run.part,
        "healthy": run.healthy and not labels.events,
        "steps": labels.steps,
        "events": events,
        "episodes": {k: dict(ep, true=k in matched) for k, ep in eps.items()},
        "unmatched_loud": unmatched_loud,
        "notes": labels.notes,
    }


def _stats(xs):
    return {"median": statistics.median(xs), "worst": min(xs), "n": len(xs)} if xs else None


def summarize(results: list[dict]) -> dict:
    """Per-detector and per-incident figures over some runs, and the done-when criteria."""
    healthy_steps = sum(r["steps"] for r in results if r["healthy"])
    detectors = {}
    for name in DETECTORS:
        evs = [ev for r in results for ev in r["events"] if ev["detector"] == name]
        det = [ev for ev in evs if ev["detected"]]
        roots = [ep for r in results for k, ep in r["episodes"].items() if k[0] == name and ep["cause"] is None]
        cons = [ep for r in results for k, ep in r["episodes"].items() if k[0] == name and ep["cause"] is not None]
        healthy_eps = [ep for r in results if r["healthy"] for k, ep in r["episodes"].items() if k[0] == name]
        false_loud = sum(ep["opens"] for ep in healthy_eps if ep["warned"] is not None)
        false_info = sum(ep["opens"] for ep in healthy_eps if ep["warned"] is None)
        detectors[name] = {
            "events": len(evs),
            "recall": round(len(det) / len(evs), 3) if evs else None,
            "precision": round(sum(ep["true"] for ep in roots) / len(roots), 3) if roots else None,
            "root_episodes": len(roots),
            "consequence_episodes": len(cons),
            "lead_steps": _stats([ev["step"] - ev["raised"] for ev in det]),
            "lead_warning_steps": _stats([ev["step"] - ev["warned"] for ev in det if ev["warned"] is not None]),
            "false_alerts_per_10k_healthy_steps": round(1e4 * false_loud / healthy_steps, 2) if healthy_steps else None,
            "info_opens_per_10k_healthy_steps": round(1e4 * false_info / healthy_steps, 2) if healthy_steps else None,
            "episodes_per_detected_event": round(statistics.mean(ev["episodes"] for ev in det), 2) if det else None,
            "opens_per_detected_event": round(statistics.mean(ev["opens"] for ev in det), 2) if det else None,
        }
    incidents = [ev for r in results for ev in r["events"]]
    louds = [ev["loud"] for ev in incidents]
    healthy_loud = [(r["run"], d, s) for r in results if r["healthy"] for d, _, s in r["unmatched_loud"]]
    other_loud = [(r["run"], d, s) for r in results if not r["healthy"] for d, _, s in r["unmatched_loud"]]
    incident = {
        "incidents": len(incidents),
        "loud_per_incident_mean": round(statistics.mean(louds), 2) if louds else None,
        "loud_per_incident_max": max(louds, default=None),
        "incidents_with_no_loud_alert": sum(n == 0 for n in louds),
        "incidents_with_more_than_one": sum(n > 1 for n in louds),
        "loud_alerts_on_healthy_runs": len(healthy_loud),
        "loud_alerts_outside_incidents_on_other_runs": len(other_loud),
    }
    return {
        "runs": len(results),
        "healthy_runs": sum(r["healthy"] for r in results),
        "healthy_steps": healthy_steps,
        "detectors": detectors,
        "incidents": incident,
        "done_when": done_when(results, incident),
    }


def done_when(results: list[dict], incident: dict) -> dict:
    noisy = sorted(
        {r["run"] for r in results if r["healthy"] for ep in r["episodes"].values() if ep["warned"] is not None}
    )
    spikes = [ev for r in results for ev in r["events"] if ev["detector"] == "loss_spike"]
    late = [ev for ev in spikes if ev["raised"] is None or ev["raised"] > ev["step"] + 2]
    gradual = [ev for r in results for ev in r["events"] if ev["detector"] == "divergence" and ev["tag"] == "gradual"]
    leads = [ev["step"] - ev["warned"] if ev["warned"] is not None else None for ev in gradual]
    known = [x for x in leads if x is not None]
    # an undetected divergence counts as lead 0 (warned at the NaN at best) in the median
    med = statistics.median([x if x is not None else 0 for x in leads]) if leads else None
    eos = [ev for r in results for ev in r["events"] if ev["detector"] == "edge_of_stability"]
    eos_late = [ev for ev in eos if ev["raised"] is None or ev["raised"] > ev["step"] + 100]
    return {
        "healthy_runs_silent": {"ok": not noisy, "runs_with_warning_or_critical": noisy},
        "at_most_one_loud_alert_per_incident": {
            "ok": (incident["loud_per_incident_max"] or 0) <= 1,
            "max": incident["loud_per_incident_max"],
            "incidents_with_more_than_one": incident["incidents_with_more_than_one"],
        },
        "loss_jumps_caught_within_2_steps": {
            "ok": not late,
            "caught": len(spikes) - len(late),
            "jumps": len(spikes),
        },
        "median_gradual_divergence_lead_ge_30": {
            "ok": med is not None and med >= 30,
            "median_lead_warning": med,
            "worst": min(known, default=None),
            "undetected": leads.count(None),
            "divergences": len(gradual),
        },
        "lambda_max_crossing_flagged_within_100_steps": {
            "ok": bool(eos) and not eos_late,
            "flagged": len(eos) - len(eos_late),
            "crossings": len(eos),
            "delays": [ev["raised"] - ev["step"] if ev["raised"] is not None else None for ev in eos],
        },
    }
