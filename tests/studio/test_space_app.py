"""A Space-shaped run: the app file (app.py) started as a process with the environment a Hugging Face Space sets
(SYSTEM=spaces, SPACE_ID, SPACE_AUTHOR_NAME, SPACE_HOST, GRADIO_SERVER_PORT) and a temp folder standing in for the
persistent storage at /data (MACTUNER_SPACE_DATA). The studio serves on the given port, refuses anonymous calls
(Gradio API, /api, /v1), lets the password secret in, keeps its workspace across a restart, and shows a run that was
killed mid-training as interrupted with a resumable checkpoint. Also: it refuses to start without a login, warns
when it runs open and without storage, and admits only the owner through Hugging Face login (a signed session
cookie stands in for the sign-in, which cannot reach huggingface.co here). `-m slow`: a fresh venv from
requirements.txt alone runs it too."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from studio_process import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-space"


def space_env(tmp_path: Path, port: int, **extra) -> dict:
    """The environment of a Space (owner "ann"), with its storage at tmp_path/data and a home of its own."""
    drop = {"MACTUNER_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "GRADIO_TEMP_DIR", "SPACES_ZERO_GPU",
            "MACTUNER_PASSWORD", "MACTUNER_OPEN", "MACTUNER_ALLOWED_USERS", "PYTEST_CURRENT_TEST"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("OAUTH_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    converter = Path(sys.prefix) / "mactuner-converter"
    env.update(SYSTEM="spaces", SPACE_ID="ann/mactuner", SPACE_AUTHOR_NAME="ann", SPACE_REPO_NAME="mactuner",
               SPACE_HOST="ann-mactuner.hf.space", GRADIO_SERVER_PORT=str(port), HOME=str(home),
               MACTUNER_SPACE_DATA=str(tmp_path / "data"), HF_HUB_OFFLINE="1",
               MACTUNER_STUDIO_ARGS="--no-default --no-prepare-hf", PYTHONUNBUFFERED="1")
    if converter.is_dir():
        env["MACTUNER_CONVERTER"] = str(converter)  # what app.py would install at a first start (no download here)
    env.update(extra)
    return env


def start_space(tmp_path: Path, env: dict, python: str = sys.executable, name: str = "space"):
    """Start `python app.py` as the Space does, in a session of its own; (process, url, log path)."""
    log_path = tmp_path / f"{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([python, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}"
    t0 = time.time()
    while time.time() - t0 < 180:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}: " + log_path.read_text()[-3000:])
        try:
            requests.get(url + "/", timeout=2)
            if "MacTuner studio on" in log_path.read_text():  # printed once launch() returned
                return proc, url, log_path
        except requests.RequestException:
            pass
        time.sleep(0.3)
    kill_group(proc)
    pytest.fail("app.py did not start: " + log_path.read_text()[-3000:])


def kill_group(proc) -> None:
    """Kill -9 the studio and every process of its session, as a stopped Space kills its container."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def assert_anonymous_refused(url: str) -> None:
    assert requests.get(f"{url}/config", timeout=10).status_code == 401
    assert requests.get(f"{url}/gradio_api/info", timeout=10).status_code == 401
    r = requests.post(f"{url}/gradio_api/call/train_runs", json={"data": []}, timeout=10)
    assert r.status_code == 401, r.text
    r = requests.get(f"{url}/api/model/health", timeout=10)
    assert r.status_code == 401 and "Authentication required" in r.json()["error"]
    r = requests.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(f"{url}/v1/chat/completions", json={"model": "default", "messages": []}, timeout=10)
    assert r.status_code == 401


def train_form(**over) -> list:
    from pipelines.training import TrainConfig
    from studio.handlers.train import form_values

    cfg = TrainConfig(base_model="tiny", dataset="space-set", max_steps=400, batch_size=2, max_length=64,
                      save_every=5, keep_last=2, eval_every=0, learning_rate=1e-3, threads=1)
    for k, v in over.items():
        setattr(cfg, k, v)
    return form_values(cfg)


def wait_for(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_space_with_storage_password_and_restart(tmp_path, tiny_llama_dir):
    from gradio_client import Client

    data = tmp_path / "data"
    ws_root = data / "mactuner"
    (ws_root / "models").mkdir(parents=True)
    shutil.copytree(tiny_llama_dir, ws_root / "models" / "tiny")  # inside the workspace: a Space opens only that
    env = space_env(tmp_path, free_port(), MACTUNER_PASSWORD=PASSWORD)
    proc, url, log = start_space(tmp_path, env)
    trainer = None
    try:
        assert f"workspace {ws_root}" in log.read_text()
        assert (ws_root / "tmp" / "gradio").is_dir()  # Gradio's cache on the persistent storage too
        assert_anonymous_refused(url)
        r = requests.get(f"{url}/", headers={"Host": "ann-mactuner.hf.space"}, timeout=10)
        assert r.status_code == 200  # the Space's own host name is answered (the login page)
        assert requests.post(f"{url}/login", data={"username": "ann", "password": "nope"}, timeout=10) \
            .status_code == 400
        assert requests.get(f"{url}/api/model/health", auth=("ann", PASSWORD), timeout=10).status_code == 200
        c = Client(url, auth=("ann", PASSWORD), verbose=False)
        c.predict(api_name="/data_open_sample")
        msg, _ = c.predict("space-set", 0.2, 0, api_name="/data_save")
        assert "space-set" in msg
        msg, _ = c.predict("space-run", *train_form(), api_name="/train_start")
        assert "space-run" in msg
        run_dir = ws_root / "runs" / "space-run"
        wait_for(lambda: len(list((run_dir / "checkpoints").glob("step-*/COMPLETE"))) >= 2, 180,
                 "two checkpoints")
        trainer = json.loads((run_dir / "status.json").read_text())["supervisor_pid"]  # its process group
        kill_group(proc)  # the Space stops: its container goes, the trainer with it
        os.killpg(trainer, signal.SIGKILL)
        assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # nobody recorded an end

        env["GRADIO_SERVER_PORT"] = str(free_port())
        proc, url, log = start_space(tmp_path, env, name="space-restarted")
        assert_anonymous_refused(url)
        c = Client(url, auth=("ann", PASSWORD), verbose=False)
        assert [d["name"] for d in c.predict(api_name="/data_list")] == ["space-set"]
        run = {r["name"]: r for r in c.predict(api_name="/train_runs")}["space-run"]
        assert run["state"] == "interrupted", run
        assert run["checkpoints"] and "can be resumed" in run["reason"], run
        last = run["checkpoints"][-1]
        msg = c.predict("space-run", last, api_name="/train_resume")
        assert "Resuming" in msg and last in msg
        wait_for(lambda: any(r["name"] == "space-run" and r["state"] in ("running", "finished") and
                             (r["step"] or 0) > int(last.split("-")[1]) for r in c.predict(api_name="/train_runs")),
                 180, "the resumed run to go on past its checkpoint")
        c.predict("space-run", api_name="/train_stop")
        wait_for(lambda: {r["name"]: r for r in c.predict(api_name="/train_runs")}["space-run"]["state"]
                 in ("stopped", "finished"), 120, "the run to stop")
    finally:
        kill_group(proc)
        if trainer:
            try:
                os.killpg(trainer, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for st in (ws_root / "runs").glob("*/status.json"):  # a resumed trainer of the second studio
            pid = json.loads(st.read_text()).get("pid")
            if isinstance(pid, int):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def test_space_refuses_to_start_without_a_login(tmp_path):
    env = space_env(tmp_path, free_port())
    out = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "requires a login" in out.stderr and "MACTUNER_PASSWORD" in out.stderr and "MACTUNER_OPEN" in out.stderr


def test_space_open_without_storage_warns_and_confines(tmp_path):
    env = space_env(tmp_path, free_port(), MACTUNER_OPEN="1")  # no data folder: no persistent storage
    proc, url, log = start_space(tmp_path, env)
    try:
        assert f"workspace {tmp_path / 'home' / '.mactuner'}" in log.read_text()
        config = requests.get(f"{url}/config", timeout=10)
        assert config.status_code == 200  # the owner said open
        text = config.text
        assert "Reachable without a login" in text and "Storage is not persistent" in text
        assert "lost when the Space restarts" in text
        r = requests.post(f"{url}/api/model/load", json={"path": str(ROOT / "pipelines")}, timeout=30)
        assert r.status_code == 400 and "outside the workspace" in r.json()["error"]  # a Space: confined
    finally:
        kill_group(proc)


def _session_cookie(secret: str, username: str) -> str:
    """What Gradio's OAuth callback leaves in the browser for `username`: Starlette's signed session cookie."""
    from itsdangerous import TimestampSigner

    session = {"oauth_info": {"access_token": "hf_oauth_x", "expires_at": int(time.time()) + 3600,
                              "userinfo": {"preferred_username": username, "name": username}}}
    key = hashlib.sha256((secret + "-v4").encode()).hexdigest()
    return TimestampSigner(key).sign(base64.b64encode(json.dumps(session).encode())).decode()


def test_space_hugging_face_login_admits_only_the_owner(tmp_path):
    secret = "oauth-secret"
    env = space_env(tmp_path, free_port(), OAUTH_CLIENT_ID="client", OAUTH_CLIENT_SECRET=secret,
                    OAUTH_SCOPES="openid profile", OPENID_PROVIDER_URL="http://127.0.0.1:9")
    (tmp_path / "data").mkdir()
    proc, url, _log = start_space(tmp_path, env)
    try:
        page = requests.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "id='sign-in' href='/login/huggingface'" in page.text
        assert "gradio" not in page.text.lower()  # the sign-in page only, not the app
        assert_anonymous_refused(url)
        r = requests.get(f"{url}/api/model/health", headers={"Authorization": "Bearer hf_unknown"}, timeout=30)
        assert r.status_code == 401  # a token the Hub does not vouch for (offline here)
        owner = {"session": _session_cookie(secret, "Ann")}
        page = requests.get(f"{url}/", cookies=owner, timeout=10)
        assert page.status_code == 200 and "gradio" in page.text.lower() and "id='sign-in'" not in page.text
        assert requests.get(f"{url}/config", cookies=owner, timeout=10).status_code == 200
        assert requests.get(f"{url}/api/model/health", cookies=owner, timeout=10).status_code == 200
        assert requests.get(f"{url}/v1/models", cookies=owner, timeout=10).status_code == 200
        stranger = {"session": _session_cookie(secret, "eve")}
        page = requests.get(f"{url}/", cookies=stranger, timeout=10)
        assert page.status_code == 403 and "eve" in page.text and "/logout" in page.text
        assert requests.get(f"{url}/config", cookies=stranger, timeout=10).status_code == 401
        assert requests.get(f"{url}/api/model/health", cookies=stranger, timeout=10).status_code == 401
        forged = {"session": _session_cookie("another-secret", "Ann")}  # not signed by this Space
        assert requests.get(f"{url}/config", cookies=forged, timeout=10).status_code == 401
    finally:
        kill_group(proc)


@pytest.mark.slow
@pytest.mark.heavy  # 70-170 s: installs torch & co. into a new venv (tests/test_space_files.py checks the lists)
def test_a_fresh_venv_from_requirements_alone_runs_the_space(tmp_path):
    """What a Space installs, and nothing else: a new venv with `pip install -r requirements.txt` (pip's caches,
    and llama-cpp-python's wheel from scripts/setup.sh's cache when it was built here - else it compiles, ~7 min),
    then app.py serves and requires its login."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    cmd = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")]
    wheels = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mactuner" / "wheels"
    built = sorted(wheels.glob("llama-cpp-python-*/llama_cpp_python-*.whl"))
    if built:
        cmd += ["--find-links", str(built[-1].parent)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    env = space_env(tmp_path, free_port(), MACTUNER_PASSWORD=PASSWORD)
    env.pop("MACTUNER_CONVERTER", None)  # app.py installs the converter itself, as on a Space
    env.pop("PYTHONPATH", None)
    env["MACTUNER_STUDIO_ARGS"] = "--no-prepare-hf"  # the embedded default model loads, from the venv's packages
    (tmp_path / "data").mkdir()
    proc, url, log = start_space(tmp_path, env, python=py)
    try:
        assert_anonymous_refused(url)
        assert requests.get(f"{url}/api/model/health", auth=("ann", PASSWORD), timeout=10).status_code == 200
        wait_for(lambda: requests.get(f"{url}/api/model/current", auth=("ann", PASSWORD), timeout=10).json()
                 .get("loaded"), 300, "the embedded default model")
        r = requests.post(f"{url}/v1/chat/completions", auth=("ann", PASSWORD), timeout=300, json={
            "model": "default", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert (tmp_path / "home" / ".cache" / "mactuner").is_dir(), log.read_text()[-2000:]  # the converter
    finally:
        kill_group(proc)
