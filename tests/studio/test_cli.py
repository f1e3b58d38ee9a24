"""`mactuner studio` refuses to expose the studio without a login, and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.studio_cmd import check_exposure

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host,share,auth,no_auth,expect", [
    ("127.0.0.1", False, None, False, None),
    ("localhost", False, None, False, None),
    ("::1", False, None, False, None),
    ("127.0.0.2", False, None, False, None),
    ("0.0.0.0", False, None, False, "exposes the studio"),
    ("192.168.1.5", False, None, False, "exposes the studio"),
    ("0.0.0.0", False, "ana:pw", False, None),
    ("0.0.0.0", False, None, True, None),
    ("127.0.0.1", True, None, False, "public link"),
    ("127.0.0.1", True, "ana:pw", False, None),
    ("127.0.0.1", True, None, True, None),
    ("127.0.0.1", False, "ana", False, "USER:PASS"),
    ("127.0.0.1", False, ":pw", False, "USER:PASS"),
])
def test_check_exposure(host, share, auth, no_auth, expect):
    why = check_exposure(host, share, auth, no_auth)
    assert (why is None) if expect is None else (expect in why)


@pytest.mark.parametrize("args,text", [
    (["--share"], "public link"),
    (["--host", "0.0.0.0"], "exposes the studio"),
    (["--auth", "nopassword"], "USER:PASS"),
    (["--max-upload-mb", "0"], "max-upload-mb"),
])
def test_studio_refuses_before_starting(args, text, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "studio", "--root", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "models").exists()  # refused before touching the workspace


def test_device_subcommand_prints_profile():
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "device"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and '"kind"' in r.stdout and '"train_dtype"' in r.stdout
