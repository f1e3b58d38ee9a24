"""A Hub that accepts the connection and never answers (issue 23): every Hub call has a connect and a read timeout,
so a push ends with a clear message instead of hanging - in this process, as a job and from `mactuner push` - and
Cancel still ends a push that is waiting for it. The silent Hub is a listening socket nobody reads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from export_fixtures import make_export  # noqa: E402

from pipelines import jobs  # noqa: E402
from pipelines.errors import Unavailable  # noqa: E402
from pipelines.export import push as hp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hardening import within  # noqa: E402

TOKEN = "hf_ana_write_0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_hub(monkeypatch):
    """HF_ENDPOINT at a socket that accepts connections (the kernel's backlog) and never answers."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield url


def test_a_silent_hub_ends_the_push_with_a_message(workspace, silent_hub, monkeypatch):
    make_export(workspace)
    monkeypatch.setenv("MACTUNER_HUB_TIMEOUT", "2")
    box = within(60, hp.push, workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), TOKEN)
    err = box.get("error")
    assert isinstance(err, Unavailable), box
    assert f"The Hub at {silent_hub} did not answer within 2 s (ReadTimeout)" in err.message
    assert "push again later" in err.message and box["seconds"] < 30
    assert hp.pushes(workspace, "tiny") == []


def test_a_silent_hub_fails_the_push_job(workspace, silent_hub, monkeypatch):
    make_export(workspace)
    monkeypatch.setenv("MACTUNER_HUB_TIMEOUT", "2")  # the job's process reads it from its environment
    job = hp.start(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny", what=["gguf"]), token=TOKEN)
    final = jobs.wait(hp.queue(workspace).job(job), timeout=90)
    assert final.state == "failed" and "did not answer within 2 s" in final.reason, final


def test_cancel_ends_a_push_waiting_on_a_silent_hub(workspace, silent_hub, monkeypatch):
    make_export(workspace)
    monkeypatch.setenv("MACTUNER_HUB_TIMEOUT", "120")
    job = hp.start(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny", what=["gguf"]), token=TOKEN)
    t0 = time.time()
    while "Checking the token" not in (hp.status(workspace, job).message or "") and time.time() - t0 < 60:
        time.sleep(0.1)
    time.sleep(0.5)  # in the call to the Hub now
    t0 = time.monotonic()
    assert hp.cancel(workspace, job).state == "cancelled"
    assert time.monotonic() - t0 < 15 and hp.pushes(workspace, "tiny") == []


def test_the_cli_push_to_a_silent_hub_is_one_line(workspace, silent_hub):
    import os

    make_export(workspace)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_TOKEN=TOKEN, MACTUNER_HUB_TIMEOUT="2", HF_ENDPOINT=silent_hub)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "push", "tiny", "ana/tiny", "--root",
                        str(workspace.root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "mactuner: The Hub at" in r.stderr and "did not answer within 2 s" in r.stderr


def test_hub_info_on_a_silent_hub_is_a_message(silent_hub, monkeypatch):
    from huggingface_hub import constants

    from pipelines.hub import hub_info

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    with pytest.raises(Unavailable, match="did not answer in time about 'org/model'"):
        hub_info("org/model")
