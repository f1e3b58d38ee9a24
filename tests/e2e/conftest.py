"""Browser-test fixtures: a headless Debian Chromium (never `playwright install`)."""

from __future__ import annotations

import pytest

from e2e_helpers import CHROMIUM_ARGS, CHROMIUM


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # expect() waits 5 s by default, whatever the page's timeout: CPU work here (a trainer importing torch, a
    # model loading) can take longer while the other tests run, so every expectation waits up to a minute.
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
