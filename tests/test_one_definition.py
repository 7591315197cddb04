"""Issue 15: each rule has one definition, which every part of the code uses.

These read the source: a second copy of a rule would keep working until the two drift apart,
so no behavioural test could catch it when it comes back.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "dashboard")


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def _where(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [name for name, text in _sources() if rx.search(text)]


def test_one_severity_order():
    from stethoscope.core.detectors import SEVERITIES, severity_rank

    assert sorted(SEVERITIES, key=severity_rank) == list(SEVERITIES)
    assert _where(r"enumerate\(SEVERITIES\)|\"critical\":\s*\d") == ["client/core/detectors/_base.py"]


def test_one_downsampling_bucket():
    assert _where(r"__slots__ = \(\"min_v\"") == ["server/store/extremes.py"]
    assert _where(r"min_v == self\.min_v|_better_min") == ["server/store/extremes.py"]


def test_one_non_finite_decoding():
    # A table from the wire strings to floats ends with -inf: {..., "-Infinity": -math.inf}.
    assert _where(r":\s*-math\.inf\s*\}") == ["client/core/wire.py"]


def test_one_placeholder_choice():
    from stethoscope_server.store.sql import placeholder

    assert (placeholder("postgresql"), placeholder("sqlite")) == ("%s", "?")
    assert _where(r"[\"']%s[\"'],? (if|else)|[\"']\?[\"'] (if|else)") == ["server/store/sql.py"]


def test_one_body_size_check():
    # The gate reads every request body within STETHOSCOPE_MAX_BODY_BYTES; routes do not count
    # it again (ingest holds the *decompressed* body to the limit, which the gate cannot see).
    assert all(name.startswith("server/auth/gate") for name in _where(r"content-length|request\.stream\(\)"))


def test_a_table_alias_means_one_table_everywhere():
    """``P`` was the projects table in six modules and the points table in one."""
    meaning: dict[str, set[str]] = {}
    for _name, text in _sources():
        assignments = re.findall(
            r"^\s*([A-Z][A-Z0-9_]*(?:\s*,\s*[A-Z][A-Z0-9_]*)*)\s*=\s*(.+\.__table__)\s*$", text, re.M
        )
        for names, models in assignments:
            tables = re.findall(r"(\w+)\.__table__", models)
            for alias, table in zip([n.strip() for n in names.split(",")], tables, strict=True):
                meaning.setdefault(alias, set()).add(table)
    assert meaning["P"] == {"Project"}
    assert {a: t for a, t in meaning.items() if len(t) > 1} == {}


def test_wire_schemas_take_their_value_sets_from_where_they_are_defined():
    assert _where(r"\"pending\", \"delivered\", \"failed\"") == ["server/store/webhooks.py"]
    assert _where(r"\"json\", \"slack\"") == ["server/alerting/outbox.py"]
    assert "server/api/alert_schemas.py" not in _where(r"\"open\", \"resolved\"")
