"""Helpers of the browser tests (tests/dashboard is on sys.path under pytest)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save a PNG under artifacts/dashboard/ (gitignored); docs/ holds the current copies."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
