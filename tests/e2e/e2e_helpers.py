"""Helpers for the browser tests: Chromium's path and flags, and a page on a studio started by studio_process."""

from __future__ import annotations

from pathlib import Path

from studio_process import ROOT, free_port, start_studio, stop_studio  # noqa: F401 - the tests import them here

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def new_page(browser, url: str, tab: str | None = None, timeout_ms: int = 60_000, width: int = 1400, height: int = 1600):
    """A page on the studio (optionally with one tab opened), with a generous default timeout for CPU work."""
    pg = browser.new_page(viewport={"width": width, "height": height})
    pg.set_default_timeout(timeout_ms)
    pg.goto(url)
    if tab:
        pg.get_by_role("tab", name=tab).click()
    return pg
