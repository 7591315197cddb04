"""docker-compose.yml stays in step with the settings (no Docker engine here to run it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from stethoscope_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_uses_known_settings_and_waits_for_postgres():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server = doc["services"]["server"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in doc["services"]["postgres"]
    env = server["environment"]
    fields = {f"STETHOSCOPE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    # the values themselves are valid settings
    s = Settings(**{k[len("STETHOSCOPE_") :].lower(): v for k, v in env.items()})
    assert s.database_url.startswith("postgresql+psycopg://") and s.port == 8765
    assert "stethoscope db upgrade" in (ROOT / "Dockerfile").read_text()
