"""Continual-learning metrics: against a direct computation from the definitions, on hand-made
and random series, and on a real class-incremental run streamed by the hook (both databases)."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

from stethoscope.core.wire import decode_value
from stethoscope_server.store import continual as C

TOL, POINTS = 0.05, 3  # the recovery rule's defaults (stability_gap detector)


# -- the reference: the definitions of DESIGN.md / De Lange et al., written out directly ---------


def reference(acc: dict, switches: list, windows=(10, 100)) -> dict:
    """Series min_acc, wc_acc, wf<w> as {step: value}, by brute force at every evaluation step.

    ``switches``: [(step, task)], each a new task. A task is learned at the next switch; its
    minimum is over evaluations from then on; WF^w takes every pair i < j of a task's
    evaluations with j - i < w.
    """
    learned = {t: switches[i + 1][0] for i, (_, t) in enumerate(switches[:-1])}

    def current(step):
        cur = [t for s, t in switches if s <= step]
        return cur[-1] if cur else None

    # Largest drop ending at each evaluation, over the w - 1 evaluations before it.
    drops = {
        w: {
            t: [max([0.0] + [v[i] - v[j] for i in range(max(0, j - w + 1), j)]) for j in range(len(v))]
            for t, pts in acc.items()
            for v in [[x for _, x in pts]]
        }
        for w in windows
    }
    out = {name: {} for name in ("min_acc", "wc_acc", *(f"wf{w}" for w in windows))}
    for step in sorted({s for pts in acc.values() for s, _ in pts}):
        cur = current(step)
        k = len({t for s, t in switches if s <= step})
        mins = []
        for t, at in learned.items():
            after = [v for s, v in acc.get(t, []) if at <= s <= step]
            if at <= step and t != cur and after:
                mins.append(min(after))
        min_acc = sum(mins) / len(mins) if mins else None
        if min_acc is not None:
            out["min_acc"][step] = min_acc
        now = [v for s, v in acc.get(cur, []) if s <= step]
        if now and k == 1:
            out["wc_acc"][step] = now[-1]
        elif now and min_acc is not None:
            out["wc_acc"][step] = (1 / k) * now[-1] + (1 - 1 / k) * min_acc
        for w in windows:
            per_task = [
                max(drops[w][t][: sum(1 for s, _ in pts if s <= step)])
                for t, pts in acc.items()
                if any(s <= step for s, _ in pts)
            ]
            out[f"wf{w}"][step] = sum(per_task) / len(per_task)
    return out


def reference_gaps(acc: dict, switches: list) -> dict:
    """{(switch step, task): (gap, recovery steps or None)} for every previous task."""
    out = {}
    for i, (s, new) in enumerate(switches):
        end = switches[i + 1][0] if i + 1 < len(switches) else math.inf
        for t, pts in acc.items():
            before = [v for st, v in pts if st < s]
            during = [(st, v) for st, v in pts if s <= st < end]
            if t == new or not before or not during:
                continue
            pre = before[-1]
            low = min(v for _, v in during)
            at = next(j for j, (_, v) in enumerate(during) if v == low)
            if low >= pre - TOL:
                out[(s, t)] = (pre - low, 0)
                continue
            rec = None
            for j in range(at + 1, len(during) - POINTS + 1):
                if all(v >= pre - TOL for _, v in during[j : j + POINTS]):
                    rec = during[j][0] - s
                    break
            out[(s, t)] = (pre - low, rec)
    return out


def assert_matches(summary: C.Summary, acc: dict, switches: list) -> None:
    ref = reference(acc, switches)
    for name, want in ref.items():
        steps, values = summary.series[f"continual/{name}"]
        assert steps == sorted(want), name
        assert values == pytest.approx([want[s] for s in steps], abs=1e-12), name
    got = {(sw["step"], p["task"]): (p["gap"], p["recovery_steps"]) for sw in summary.switches for p in sw["previous"]}
    want_gaps = reference_gaps(acc, switches)
    assert got.keys() == want_gaps.keys()
    for key, (gap, rec) in want_gaps.items():
        assert got[key][0] == pytest.approx(gap, abs=1e-12) and got[key][1] == rec, key


# -- pure functions ------------------------------------------------------------------------


def test_a_small_run_by_hand():
    acc = {"a": [(0, 0.5), (1, 0.9), (2, 0.4), (3, 0.6), (4, 0.8)], "b": [(2, 0.1), (3, 0.5), (4, 0.7)]}
    s = C.compute(acc, [C.Switch(0, "a"), C.Switch(2, "b")], windows=(2, 10))
    # Step 4: task b current (k = 2); a learned at step 2, its minimum since then 0.4.
    assert s.current == {
        "step": 4,
        "task": "b",
        "k": 2,
        "acc": 0.7,
        "min_acc": 0.4,
        "wc_acc": pytest.approx(0.5 * 0.7 + 0.5 * 0.4),
        "wf2": pytest.approx(0.25),
        "wf10": pytest.approx(0.25),
    }
    # WF^2 of a: largest drop between neighbours, 0.9 -> 0.4; b never drops.
    assert s.series["continual/wf2"] == ([0, 1, 2, 3, 4], pytest.approx([0.0, 0.0, 0.25, 0.25, 0.25]))
    assert s.series["continual/min_acc"] == ([2, 3, 4], [0.4, 0.4, 0.4])
    assert s.series["continual/wc_acc"][0] == [0, 1, 2, 3, 4]  # k = 1 before step 2: the current accuracy
    [first, second] = s.switches
    assert first["previous"] == [] and first["gap"] is None
    assert second["from_task"] == "a" and second["gap"] == pytest.approx(0.5) and second["gap_task"] == "a"
    assert second["previous"][0] | {"gap": 0} == {
        "task": "a",
        "pre_step": 1,
        "pre_acc": 0.9,
        "min_acc": 0.4,
        "min_step": 2,
        "gap": 0,
        "recovered": False,
        "recovered_step": None,
        "recovery_steps": None,
    }
    assert s.tasks == ["a", "b"]


@pytest.mark.parametrize("seed", range(8))
def test_random_runs_match_the_definitions(seed):
    rng = random.Random(seed)
    n_tasks, length = rng.randint(1, 5), rng.randint(20, 150)
    starts = sorted(rng.sample(range(1, length), n_tasks - 1))
    switches = [(0, "t0")] + [(s, f"t{i + 1}") for i, s in enumerate(starts)]
    every = rng.choice([1, 1, 2, 3])
    acc = {}
    for s, t in switches:
        level = 0.0
        for step in range(s, length, every):
            if rng.random() < 0.1:
                continue  # a missed evaluation
            level = min(1.0, max(0.0, level + rng.uniform(-0.3, 0.35)))
            acc.setdefault(t, []).append((step, round(level, 3)))
    summary = C.compute(acc, [C.Switch(s, t) for s, t in switches])
    assert_matches(summary, acc, switches)


def test_switch_repeats_and_non_finite_values():
    assert C.segments([C.Switch(0, "a"), C.Switch(5, "a"), C.Switch(9, "b"), C.Switch(9, "c")]) == [
        C.Switch(0, "a"),
        C.Switch(9, "c"),
    ]
    acc = {"a": [(0, 0.9), (1, math.nan), (2, 0.8)], "c": [(1, math.inf), (2, 0.3)]}
    s = C.compute(acc, [C.Switch(0, "a"), C.Switch(2, "c")])
    assert s.series["continual/min_acc"] == ([2], [0.8])
    assert C.switches_from_events(
        [
            {"kind": "task_switch", "step": 3, "info": {"task": 1}},
            {"kind": "note", "step": 1, "info": {"task": 0}},
            {"kind": "task_switch", "step": 0, "info": {"task": 0}},
        ]
    ) == [C.Switch(0, "0"), C.Switch(3, "1")]


def test_downsampling_keeps_the_bottom_of_a_gap():
    steps = list(range(1000))
    values = [1.0] * 1000
    values[537] = 0.02
    s, v, down = C.downsample(steps, values, 50)
    assert down and len(s) <= 50 and 537 in s and min(v) == 0.02
    assert C.downsample(steps[:10], values[:10], 50) == (steps[:10], values[:10], False)


# -- through the API -------------------------------------------------------------------------


def test_the_summary_route(client, live_server):
    assert client.get("/runs/nope/continual").status_code == 404
    assert client.put("/runs/r1", json={"project": "p"}).status_code == 201
    empty = client.get("/runs/r1/continual").json()
    assert (
        empty["switches"] == []
        and empty["current"]["min_acc"] is None
        and empty["series"]["continual/min_acc"]["steps"] == []
    )
    # Points alone (no events): the switches come from the continual/task series.
    series = [
        {"name": "continual/task", "steps": [0, 3], "values": [0, 1]},
        {"name": "eval/acc/0", "steps": [0, 1, 2, 3, 4, 5], "values": [0.5, 0.9, 0.95, 0.2, "NaN", 0.93]},
        {"name": "eval/acc/1", "steps": [3, 4, 5], "values": [0.3, 0.6, 0.8]},
    ]
    assert client.post("/runs/r1/points", json={"series": series}).status_code == 200
    body = client.get("/runs/r1/continual").json()
    assert [(s["step"], s["task"], s["gap"]) for s in body["switches"]] == [
        (0, "0", None),
        (3, "1", pytest.approx(0.75)),
    ]
    assert body["current"]["min_acc"] == 0.2 and body["current"]["wc_acc"] == pytest.approx(0.5 * 0.8 + 0.5 * 0.2)
    # Events, when there are any, name the tasks.
    r = client.post(
        "/runs/r1/events",
        json={
            "events": [
                {"key": "k0", "step": 0, "kind": "task_switch", "info": {"task": 0}},
                {"key": "k1", "step": 4, "kind": "task_switch", "info": {"task": 1}},
            ]
        },
    )
    assert r.status_code == 200
    assert [s["step"] for s in client.get("/runs/r1/continual").json()["switches"]] == [0, 4]
    import httpx

    assert "/api/v1/runs/{run_id}/continual" in httpx.get(live_server.url + "/openapi.json").json()["paths"]


def _training_module():
    path = Path(__file__).parents[1] / "client" / "_continual_training.py"
    spec = importlib.util.spec_from_file_location("_continual_training", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_real_class_incremental_run_shows_the_gap_and_the_alerts_follow_it(live_server, client, tmp_path):
    import stethoscope

    T = _training_module()
    model = T.model_for(0)
    mon = stethoscope.attach(model, None, run="ci-er", project="continual", server=live_server.url, spool_dir=tmp_path)
    res = T.class_incremental(seed=0, mon=mon)
    mon.close()
    assert mon.dropped == 0 and mon.collector_errors == 0

    # What the server stored, read back raw.
    acc = {}
    for t in range(T.TASKS):
        body = client.get(f"/runs/ci-er/series/eval/acc/{t}", params={"max_points": 100000}).json()
        acc[str(t)] = [(s, decode_value(v)) for s, v in zip(body["steps"], body["values"])]
    assert acc.keys() == res.acc.keys()
    for t, pts in res.acc.items():  # as the evaluator measured them
        assert [s for s, _ in acc[t]] == [s for s, _ in pts] and [v for _, v in acc[t]] == pytest.approx(
            [v for _, v in pts]
        )
    assert len(acc["0"]) == T.TASKS * T.STEPS_PER_TASK  # every step, from the first task on
    switches = [
        (e["step"], str(e["info"]["task"]))
        for e in client.get("/runs/ci-er/events", params={"kind": "task_switch"}).json()
    ]
    assert switches == res.switches == [(i * T.STEPS_PER_TASK, str(i)) for i in range(T.TASKS)]

    body = client.get("/runs/ci-er/continual", params={"max_points": 100000}).json()
    summary = C.Summary(
        body["tasks"],
        body["switches"],
        body["current"],
        {n: (s["steps"], s["values"]) for n, s in body["series"].items()},
    )
    assert_matches(summary, acc, switches)

    # The stability gap is there: at every switch some previous task falls by at least 0.2 and
    # comes back within 0.05 of where it was, within 60 steps.
    for sw in body["switches"][1:]:
        assert sw["gap"] >= 0.2 and 0 < sw["recovery_steps"] <= 60, sw
    cur = body["current"]
    assert cur["task"] == "3" and cur["k"] == 4 and cur["wc_acc"] < cur["acc"]
    assert cur["min_acc"] < 0.5 < cur["acc"]  # the worst case is far below the task-end view
    assert cur["wf10"] > 0.1 and cur["wf100"] >= cur["wf10"]

    # One alert per gap larger than the detector's 0.1, opened after its switch and resolved
    # at the recovery, with the same gap and recovery time as the summary.
    gaps = {(sw["step"], p["task"]): p for sw in body["switches"] for p in sw["previous"] if p["gap"] > 0.1}
    alerts = [a for a in client.get("/runs/ci-er/alerts").json() if a["detector"] == "stability_gap"]
    assert len(gaps) >= T.TASKS - 1
    assert sorted((a["evidence"]["switch_step"], a["key"]) for a in alerts) == sorted(gaps)
    for a in alerts:
        p = gaps[(a["evidence"]["switch_step"], a["key"])]
        assert a["status"] == "resolved"
        assert a["evidence"]["switch_step"] <= a["start_step"] <= p["min_step"]
        assert a["evidence"]["gap"] == pytest.approx(p["gap"]) and a["evidence"]["min_step"] == p["min_step"]
        assert a["evidence"]["recovery_steps"] == p["recovery_steps"]
        assert a["end_step"] == p["recovered_step"] == a["evidence"]["switch_step"] + p["recovery_steps"]
