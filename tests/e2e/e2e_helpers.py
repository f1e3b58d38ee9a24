"""Helpers for the browser tests: start `mactuner studio` in a subprocess on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(root: Path, env_extra: dict | None = None, args: list[str] | None = None):
    """Start `mactuner studio` on a free port; return (process, url). The log is root.parent/studio.log."""
    port = free_port()
    log = open(root.parent / "studio.log", "w")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(root.parent / "hf"), MACTUNER_HOME=str(root))
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "studio", "--root", str(root), "--port", str(port),
                             "--no-prepare-hf", *(args or [])], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 90:
        try:
            urllib.request.urlopen(url + "/api/model/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("studio did not start: " + (root.parent / "studio.log").read_text()[-2000:])




def new_page(browser, url: str, tab: str | None = None, timeout_ms: int = 60_000, width: int = 1400, height: int = 1600):
    """A page on the studio (optionally with one tab opened), with a generous default timeout for CPU work."""
    pg = browser.new_page(viewport={"width": width, "height": height})
    pg.set_default_timeout(timeout_ms)
    pg.goto(url)
    if tab:
        pg.get_by_role("tab", name=tab).click()
    return pg


def stop_studio(proc) -> None:
    proc.terminate()
    proc.wait(20)
