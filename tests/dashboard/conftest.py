"""Fixtures of the dashboard tests: one real tiny training per session, a real headless
Chromium (Debian's, through Playwright), pages that fail the test on any console error."""

from __future__ import annotations

import os
from pathlib import Path

import _dash_training as _training
import pytest

CHROMIUM = os.environ.get("STETHOSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="session")
def training() -> _training.Training:
    return _training.train()


@pytest.fixture(scope="session")
def training_b() -> _training.Training:
    """The same recipe with another seed: a second run worth comparing."""
    return _training.train(seed=1)


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (make chromium installs Debian's)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Everything the page said on its console, and its uncaught errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def on_message(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)
        elif msg.type == "warning":
            self.warnings.append(msg.text)


@pytest.fixture
def page(browser):
    """A fresh page (1400 px wide); the test fails if the page logged an error."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    console = Console()
    pg.on("console", console.on_message)
    pg.on("pageerror", lambda err: console.errors.append(f"uncaught: {err}"))
    pg.console = console
    yield pg
    ctx.close()
    assert console.errors == [], f"console errors: {console.errors}"
