"""Hardening against a launched studio (issue 12): a foreign web page cannot drive it (forged Origin / Host, as a
cross-site page or a DNS-rebinding page would send them), JSON routes want JSON, refusals are clear 403s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studio_helpers import launch  # noqa: E402

EVIL = "http://evil.example"


class StubBackend:
    """What the studio reads of a loaded model that never answers here (pipelines.serving.backend's protocol)."""

    kind = "transformers"
    adapters: dict = {}

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    yield url, ctx
    demo.close()


def _refused(r, word):
    assert r.status_code == 403, (r.status_code, r.text[:300])
    body = r.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert message.startswith("Refused") and word in message


@pytest.mark.parametrize("method,path", [
    ("GET", "/"), ("GET", "/config"), ("GET", "/api/model/current"), ("GET", "/api/model/health"),
    ("GET", "/v1/models"), ("POST", "/api/model/unload"), ("GET", "/gradio_api/info"),
])
def test_foreign_host_is_refused(studio, method, path):
    """DNS rebinding: the page's own name resolves to 127.0.0.1, so the request carries Host: evil.example."""
    url, _ = studio
    r = requests.request(method, url + path, headers={"Host": "evil.example"}, timeout=10)
    _refused(r, "evil.example")
    assert "loaded" not in r.text and "gemma" not in r.text.lower()


def test_v1_refusal_is_an_openai_error(studio):
    url, _ = studio
    r = requests.get(url + "/v1/models", headers={"Host": "evil.example:7860"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"


@pytest.mark.parametrize("path,kwargs", [
    ("/api/model/load", {"data": '{"path": "x"}', "headers": {"Content-Type": "text/plain"}}),
    ("/api/model/unload", {"headers": {"Content-Type": "text/plain"}}),
    ("/api/model/load-default", {}),
    ("/api/model/download", {"json": {"model_id": "org/model"}}),
    ("/gradio_api/upload", {"files": {"files": ("a.csv", b"a,b\n1,2\n")}}),
    ("/gradio_api/queue/join", {"json": {"fn_index": 0, "data": [], "session_hash": "abc"}}),
    ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}),
])
@pytest.mark.parametrize("origin", [EVIL, "null", "http://127.0.0.1:1"])
def test_foreign_origin_is_refused(studio, path, kwargs, origin):
    """A cross-site page's POST (text/plain needs no preflight; the browser still sends its Origin)."""
    url, ctx = studio
    headers = {**kwargs.get("headers", {}), "Origin": origin}
    r = requests.post(url + path, **{**kwargs, "headers": headers}, timeout=10)
    _refused(r, origin)
    assert ctx.registry.current() is None


def test_own_origin_and_no_origin_are_served(studio):
    url, _ = studio
    assert requests.get(url + "/api/model/current", timeout=10).json()["loaded"] is False
    assert requests.get(url.replace("127.0.0.1", "localhost") + "/api/model/health", timeout=10).status_code == 200
    r = requests.post(url + "/gradio_api/upload", files={"files": ("a.csv", b"a,b\n1,2\n")}, headers={"Origin": url},
                      timeout=10)
    assert r.status_code == 200, r.text
    r = requests.post(url + "/api/model/unload", headers={"Origin": url}, timeout=10)
    assert r.status_code == 404 and "No model" in r.json()["error"]


def test_json_routes_want_json(studio):
    url, _ = studio
    for path in ("/api/model/load", "/api/model/download"):
        r = requests.post(url + path, data='{"path": "x", "model_id": "x"}', headers={"Content-Type": "text/plain"},
                          timeout=10)
        assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = requests.post(url + "/v1/chat/completions", data='{"messages": []}', headers={"Content-Type": "text/plain"},
                      timeout=10)
    assert r.status_code == 415


def test_gradio_client_still_works(studio):
    from gradio_client import Client

    url, _ = studio
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert api["named_endpoints"]


def test_deeply_nested_json_bodies_are_400s(studio):
    url, _ = studio
    deep = "[" * 10_000 + "]" * 10_000
    r = requests.post(url + "/api/model/load", data='{"path": ' + deep + "}", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]
    r = requests.post(url + "/v1/chat/completions", data='{"messages": ' + deep + "}", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_an_unload_waiting_for_an_answer_blocks_no_reader(studio):
    """The unload waits (up to 30 s) for the answer in progress; health, the header, the model lists answer meanwhile."""
    import threading
    import time

    from pipelines.models import LoadedModel
    from studio.handlers import model as hm

    url, ctx = studio
    requests.get(url + "/api/model/health", timeout=60)  # the device profile (torch import) done once, beforehand
    lm = LoadedModel("fake", "/nowhere", "hf", "cpu", "float32", 1, 1, 128, "llama", True, 0.0, time.time(),
                     backend=StubBackend())
    with ctx.registry._lock:
        ctx.registry._models["fake"], ctx.registry._current = lm, "fake"
    lm.lock.acquire()  # an answer is running on it
    done = {}
    t = threading.Thread(target=lambda: done.update(r=requests.post(url + "/api/model/unload", timeout=60)))
    try:
        t.start()
        time.sleep(0.5)
        for path in ("/api/model/health", "/api/model/current", "/v1/models"):
            t0 = time.monotonic()
            assert requests.get(url + path, timeout=10).status_code == 200
            assert time.monotonic() - t0 < 3, path
        t0 = time.monotonic()
        assert "fake" in hm.header_md(ctx) and time.monotonic() - t0 < 3
        assert t.is_alive()  # still waiting for the answer
    finally:
        lm.lock.release()
        t.join(60)
    assert done["r"].status_code == 200 and ctx.registry.current() is None


# ------------------------------------------------------------------------------------------------------- CLI


def _studio_cli(*args, tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "studio", "--no-default", "--no-prepare-hf", *args],
                          capture_output=True, text=True, timeout=120, cwd=root, env={**__import__("os").environ,
                                                                                    "MACTUNER_HOME": str(tmp_path)})


def test_cli_root_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _studio_cli("--root", str(tmp_path / "afile"), tmp_path=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "is a file, not a folder" in r.stderr


def test_cli_port_in_use_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _studio_cli("--root", str(tmp_path / "ws"), "--port", str(port), tmp_path=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and f"port {port}" in r.stderr and "already in use" in r.stderr


# ------------------------------------------------------------------------------------- refused inputs, named


@pytest.fixture
def fake_model(studio):
    import time

    from pipelines.models import LoadedModel

    url, ctx = studio
    lm = LoadedModel("fake", "/nowhere", "hf", "cpu", "float32", 1, 1, 128, "llama", True, 0.0, time.time(),
                     backend=StubBackend())
    with ctx.registry._lock:
        ctx.registry._models["fake"], ctx.registry._current = lm, "fake"
    yield lm
    with ctx.registry._lock:
        ctx.registry._models.pop("fake", None)
        ctx.registry._current = None


@pytest.mark.parametrize("change,needle", [
    ({"param_11": "\\x"}, "Stop string '\\\\x' has a bad escape"),
    ({"param_5": "abc"}, "'Temperature' must be a number, not 'abc'"),
    ({"param_12": "seven"}, "must be a number, not 'seven'"),
    ({"history": [{"role": "wizard", "content": 3}]}, "chat history ('Conversation') is malformed"),
    ({"history": "nope"}, "chat history ('Conversation') is malformed"),
    ({"history": ["a", "b"]}, "chat history ('Conversation') is malformed"),
])
def test_refused_chat_inputs_name_the_field(studio, fake_model, change, needle):
    from gradio_client import Client

    url, _ = studio
    args = dict(message="hi", history=[], model_name="fake", adapter=None, param_4="", param_5=0.7, param_6=0.9,
                param_7=40, param_8=0.05, param_9=1.1, param_10=16, param_11="", param_12=-1)
    with pytest.raises(Exception) as e:
        Client(url, verbose=False).predict(**{**args, **change}, api_name="/chat_send")
    assert needle in str(e.value) and "verbose error reporting" not in str(e.value)


def test_one_column_csv_without_header_keeps_its_first_row(studio, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = studio
    f = tmp_path / "lines.csv"
    f.write_text("hello there\nsecond row\nthird row\n")
    c = Client(url, verbose=False)
    out = c.predict(handle_file(str(f)), None, "auto", "auto", True, api_name="/data_open")
    text = " ".join(str(x) for x in out)
    assert "2 rows" in text and "was taken as the column name" in text and "First line is a header" in text
    out = c.predict(handle_file(str(f)), None, "auto", "auto", False, api_name="/data_open")
    text = " ".join(str(x) for x in out)
    assert "3 rows" in text and "hello there" in text and "was taken as the column name" not in text


def test_user_errors_are_one_log_line_without_traceback(tmp_path):
    """`mactuner studio` logs a refused input as one line; tracebacks are kept for bugs."""
    from gradio_client import Client
    from studio_process import start_studio, stop_studio

    proc, url = start_studio(tmp_path / "ws", args=["--no-default"])
    try:
        requests.post(url + "/api/model/load", json={"path": "/nowhere/at/all"}, timeout=10)
        c = Client(url, verbose=False)
        for args, api in ((("/nowhere/either", False), "/model_load"), ((), "/data_clean_normalize")):
            with pytest.raises(Exception):
                c.predict(*args, api_name=api)
        with pytest.raises(Exception, match="must be a number"):
            c.predict(1, "lots", 0, api_name="/data_clean_length")
    finally:
        stop_studio(proc)
    log = (tmp_path / "studio.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "refused" in line]
    assert any("/nowhere/at/all" in line for line in lines), log[-3000:]
    assert any("/nowhere/either" in line for line in lines) and any("Load a file first" in line for line in lines)
    assert any("must be a number" in line for line in lines)


# ------------------------------------------------------------------------------------ files stay in the workspace


def test_uploads_and_served_files_stay_in_the_workspace(studio, tmp_path):
    import tempfile

    from gradio_client import Client

    url, ctx = studio
    system_gradio = Path(tempfile.gettempdir()) / "gradio"
    before = set(system_gradio.rglob("*")) if system_gradio.exists() else set()
    loose = set(Path(tempfile.gettempdir()).glob("conversation-*.json"))
    r = requests.post(url + "/gradio_api/upload", files={"files": ("data.csv", b"a,b\n1,2\n")}, timeout=10)
    uploaded = Path(r.json()[0])
    assert uploaded.is_file() and uploaded.resolve().is_relative_to(ctx.ws.root / "tmp" / "gradio")
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    Client(url, verbose=False, download_files=str(tmp_path)).predict(history, None, api_name="/chat_export")
    made = list((ctx.ws.root / "tmp" / "handouts" / "chat").glob("conversation-*.json"))
    assert len(made) == 1 and '"hello"' in made[0].read_text()
    cached = [p for p in (ctx.ws.root / "tmp" / "gradio").rglob("conversation-*.json")]
    assert cached  # the copy Gradio served
    after = set(system_gradio.rglob("*")) if system_gradio.exists() else set()
    assert after <= before, sorted(map(str, after - before))[:5]
    assert set(Path(tempfile.gettempdir()).glob("conversation-*.json")) <= loose


def test_gradio_cache_is_cleaned_by_age():
    from pipelines.serving import registry
    from pipelines.workspace import Workspace
    from studio.app import build_app
    from studio.handlers.common import Context

    ws = Workspace.open(Path(__import__("tempfile").mkdtemp()) / "ws")
    demo = build_app(Context(ws, registry.ModelRegistry(), prepare_hf=False))
    assert demo.delete_cache == (3600, 86400)


def test_guard_hosts_from_the_start_options(monkeypatch):
    from studio import guard

    monkeypatch.setenv("MACTUNER_ALLOWED_HOSTS", "studio.example.com, Other.Example:8443")
    monkeypatch.setenv("SPACE_HOST", "me-mactuner.hf.space")
    g = guard.HostOriginGuard(None, guard.allowed_hosts("myhost.lan"))

    def scope(host, origin=None):
        headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
        return {"type": "http", "headers": headers}

    for host in ("127.0.0.1:7860", "[::1]:7860", "localhost:7860", "192.168.1.5:7860", "myhost.lan:7860",
                 "studio.example.com", "other.example:8443", "me-mactuner.hf.space"):
        assert g.refusal(scope(host)) is None, host
    for host in ("evil.example", "localhost.evil.example", "", "127.0.0.1.evil.example:7860"):
        assert g.refusal(scope(host)), host
    assert g.refusal(scope("127.0.0.1:7860", "http://127.0.0.1:7860")) is None
    assert g.refusal(scope("127.0.0.1:7860", "https://studio.example.com")) is None  # behind a reverse proxy
    for origin in ("http://127.0.0.1:3000", "http://localhost:7860", "null", "http://evil.example", "file://"):
        assert g.refusal(scope("127.0.0.1:7860", origin)), origin


def test_old_cache_entries_of_earlier_studios_are_swept(tmp_path, monkeypatch):
    import os
    import time

    from pipelines.workspace import Workspace
    from studio import app

    ws = Workspace.open(tmp_path / "ws")
    cache = ws.tmp / "gradio"
    (cache / "old").mkdir(parents=True)
    (cache / "old" / "f.csv").write_text("x")
    (cache / "new").mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(cache / "old", (two_days_ago, two_days_ago))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(app, "_OUR_GRADIO_TEMP", None)
    app._gradio_cache_in(ws)
    assert not (cache / "old").exists() and (cache / "new").is_dir()
    assert os.environ["GRADIO_TEMP_DIR"] == str(cache)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "mine"))  # one the user chose is kept
    app._gradio_cache_in(ws)
    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "mine")
