"""Start `mactuner studio` in a subprocess on a free port, as a user does (`start_studio`), and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def stop_studio(proc) -> None:
    proc.terminate()
    proc.wait(20)
