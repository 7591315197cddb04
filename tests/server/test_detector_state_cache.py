"""The detector runner's cache of decoded states, on both databases: a state kept is used only
when the text read in the transaction is the text kept (another writer's state is seen), a
rolled-back transaction leaves nothing changed in it, a state that is not strict JSON is
refused and not kept, and what is stored is what a runner without the cache stores."""

from __future__ import annotations

import json
import math
import random
import struct

import orjson
import pytest

from stethoscope_server.alerting.detector_runner import DetectorRunner
from stethoscope_server.store import SeriesBatch, Store, migrate
from stethoscope_server.store import detector_states as _states
from stethoscope_server.store.db import make_engine

NAMES = ["loss", "grad/norm", "lr", "eval/loss", "logits/max_abs"]
STEPS = 20
#: Loss spikes (steps) so that alerts open, update and resolve along the way.
SPIKES = {63, 64, 65, 130, 171}


def _batch(i: int) -> list[SeriesBatch]:
    steps = list(range(i * STEPS, (i + 1) * STEPS))
    out = []
    for n in NAMES:
        vals = [2.0 / (1.0 + 1e-3 * s) + 0.01 * math.sin(s) + (1e-5 * s if n == "lr" else 0.0) for s in steps]
        if n == "loss":
            vals = [40.0 if s in SPIKES else v for s, v in zip(steps, vals)]
        out.append(SeriesBatch(n, steps, vals, [0.0] * len(steps)))
    return out


@pytest.fixture
def engine(settings):
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings)
    yield engine
    engine.dispose()


def _store(engine, settings, cache_runs: int = 256) -> tuple[Store, DetectorRunner]:
    runner = DetectorRunner(settings, state_cache_runs=cache_runs)
    return Store(engine, on_points=runner), runner


def _texts(store: Store, run_id: str) -> dict[str, str]:
    with store.reading() as conn:
        return dict(_states.load_state_texts(conn, run_id))


def _alerts(store: Store, run_id: str) -> list[tuple]:
    with store.reading() as conn:
        rows = conn.exec_driver_sql(
            "SELECT detector, key, status, severity, start_step, peak_step, end_step, message "
            f"FROM alerts WHERE run_id = '{run_id}' ORDER BY id"
        ).all()
    return [tuple(r) for r in rows]


def _same(a, b) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def _control(engine, settings, batches: int) -> tuple[dict[str, str], list[tuple]]:
    """What a runner that keeps nothing stores for the batches, on run ``control``."""
    store, runner = _store(engine, settings, cache_runs=0)
    store.upsert_run("control", "p")
    for i in range(batches):
        store.ingest("control", _batch(i))
    assert runner.errors == 0 and not runner._states
    return _texts(store, "control"), _alerts(store, "control")


def test_kept_states_store_what_a_fresh_decode_stores(engine, settings, monkeypatch):
    store, runner = _store(engine, settings)
    store.upsert_run("r", "p")
    decoded = []
    decode = _states.decode_state
    monkeypatch.setattr(_states, "decode_state", lambda text: decoded.append(text) or decode(text))
    for i in range(10):
        store.ingest("r", _batch(i))
        # What is kept is the stored text's decoding exactly, types included.
        kept = runner._states["r"]
        assert kept and all(_same(obj, orjson.loads(text)) for text, obj in kept.values())
        assert {d: t for d, (t, _) in kept.items()} == _texts(store, "r")
    assert runner.errors == 0
    assert decoded == []  # every state came from the cache (each is saved at every batch)
    texts, alerts = _control(engine, settings, 10)
    assert _texts(store, "r") == texts and _alerts(store, "r") == alerts
    assert {a[2] for a in alerts} == {"resolved"} and len(alerts) >= 2  # the spikes did alert


def test_another_writers_state_is_seen(engine, settings):
    """Two app instances on one database take turns on a run: each sees the other's writes."""
    a, runner_a = _store(engine, settings)
    b, runner_b = _store(engine, settings)
    a.upsert_run("r", "p")
    for i in range(10):
        (a if i % 3 != 1 else b).ingest("r", _batch(i))
    assert runner_a.errors == runner_b.errors == 0
    texts, alerts = _control(engine, settings, 10)
    assert _texts(a, "r") == texts and _alerts(a, "r") == alerts


def test_a_rolled_back_transaction_leaves_no_changed_state(engine, settings):
    store, runner = _store(engine, settings)
    store.upsert_run("r", "p")
    for i in range(3):
        store.ingest("r", _batch(i))
    assert "r" in runner._states
    # Batch 3 through the detectors in a transaction that rolls back (after-commit callbacks
    # are not run): the states they changed must not be used again.
    with pytest.raises(RuntimeError), store._begin_write() as conn:
        hooks: list = []
        new = [(b.name, b.steps, b.values) for b in _batch(3)]
        runner(conn, "r", 1, new, hooks)
        assert hooks and runner.errors == 0
        raise RuntimeError("rolled back")
    for i in range(3, 10):
        store.ingest("r", _batch(i))
    texts, alerts = _control(engine, settings, 10)
    assert _texts(store, "r") == texts and _alerts(store, "r") == alerts


def test_a_group_that_runs_again_without_a_failed_job_keeps_no_changed_state(engine, settings, db_url):
    """SQLite's group commit: a job that fails rolls its group back, and the others run again."""
    if not db_url.startswith("sqlite"):
        pytest.skip("group commit is SQLite's")
    from stethoscope_server.store.errors import NotFound
    from stethoscope_server.store.group_commit import _Job

    store, runner = _store(engine, settings)
    store.upsert_run("r", "p")
    for i in range(3):
        store.ingest("r", _batch(i))
    group = [_Job(("r", _batch(3))), _Job(("missing", _batch(0)))]
    store._ingest_group._run(group)
    assert isinstance(group[1].error, NotFound) and group[0].error is None
    for i in range(4, 10):
        store.ingest("r", _batch(i))
    assert runner.errors == 0
    texts, alerts = _control(engine, settings, 10)
    assert _texts(store, "r") == texts and _alerts(store, "r") == alerts


def test_a_state_not_strict_json_is_refused_and_not_kept(engine, settings, monkeypatch):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            _states.encode_states({"loss_spike": {"w": [1.0, bad]}})
    store, runner = _store(engine, settings)
    store.upsert_run("r", "p")
    for i in range(3):
        store.ingest("r", _batch(i))
    before = _texts(store, "r")
    from stethoscope.core.detectors import DetectorSet

    feed = DetectorSet.feed

    def poisoned(self, state, routed):
        changes = feed(self, state, routed)
        state["loss_spike"]["poison"] = math.inf
        return changes

    monkeypatch.setattr(DetectorSet, "feed", poisoned)
    result = store.ingest("r", _batch(3))
    assert result.inserted == STEPS * len(NAMES) and runner.errors == 1  # points stored, no detection
    assert _texts(store, "r") == before and "r" not in runner._states
    monkeypatch.setattr(DetectorSet, "feed", feed)
    store.ingest("r", _batch(4))
    assert "poison" not in _texts(store, "r")["loss_spike"]


def test_kept_runs_are_bounded_least_recently_used_first(engine, settings):
    store, runner = _store(engine, settings, cache_runs=2)
    for r in ("a", "b", "c"):
        store.upsert_run(r, "p")
    for r in ("a", "b", "a", "c"):
        store.ingest(r, _batch(0 if r != "a" or "a" not in runner._states else 1))
    assert list(runner._states) == ["a", "c"]


def _random_value(rng, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:  # any finite float, every exponent alike
        while True:
            x = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
            if x - x == 0.0:
                return x
    if kind == 1:  # floats where the spellings of json and orjson part
        return rng.choice([1.0, -1.0]) * rng.random() * 10.0 ** rng.randrange(-12, 18)
    if kind == 2:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64, -(2**70), rng.getrandbits(40), 0.0, -0.0, 1e16])
    if kind == 3:
        return "".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0x3000)])) for _ in range(5))
    if kind == 4:
        return rng.choice([None, True, False, "0.00001", "e-5", "", "\x7f", "\u00e9"])
    if kind == 5:
        return rng.choice(["loss", "grad/norm", "eval/loss"])
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {_random_value(rng, 3) if rng.random() < 0.9 else "k": _random_value(rng, depth + 1) for _ in range(4)}


def test_states_are_encoded_as_json_dumps_writes_them():
    """orjson writes most states; where its text could differ, json does: the text is
    ``json.dumps``'s, and a NaN or an infinity is refused, wherever it is."""
    rng = random.Random(7)
    fast = 0
    for _ in range(3000):
        st = {"seen": {"loss": rng.randrange(10**6)}, "v": _random_value(rng), "w": _random_value(rng, 1)}
        want = json.dumps(st, allow_nan=False, separators=(",", ":"))
        assert _states.encode_states({"d": st}) == {"d": want}, st
        try:
            fast += orjson.dumps(st) == want.encode()  # orjson's text would do
        except TypeError:
            pass
        for bad in (math.nan, math.inf, -math.inf):
            st["w"] = [st["w"], {"x": bad}]
            with pytest.raises(ValueError):
                _states.encode_states({"d": st})
    assert fast > 500
    # A state of floats typical of detectors (windows of losses): the same text.
    window = [2.0 / (1 + 1e-3 * s) + 1e-9 * s for s in range(128)]
    st = {"w": window, "lr": [1e-3, 1e-5, 3e-7, 2.5e-10], "n": -0.0, "big": 2**80}
    assert _states.encode_states({"d": st})["d"] == json.dumps(st, allow_nan=False, separators=(",", ":"))
