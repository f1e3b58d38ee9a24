"""Browser-test fixtures: a headless Debian Chromium (never `playwright install`)."""

from __future__ import annotations

import pytest

from e2e_helpers import CHROMIUM_ARGS, CHROMIUM


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
