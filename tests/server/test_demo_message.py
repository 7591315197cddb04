"""The demo's last line names dashboard pages a person can open, not JSON endpoints."""

from __future__ import annotations

import re

import httpx
import pytest

from stethoscope_server.demo import closing_message


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_demo_ends_with_the_alerts_page_not_a_json_url(live_server):
    msg = closing_message(live_server.url)
    assert "/api/" not in msg
    urls = re.findall(r"https?://\S+", msg)
    assert f"{live_server.url}/alerts?project=demo" in urls
    for url in urls:
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), url
