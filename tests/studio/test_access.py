"""Who may use the studio (studio.access): the failed-login limiter, the client behind a Space's proxy, Hugging Face
login checked on the session and on tokens (a stand-in whoami), the banner's warnings, and - against a launched
studio - failed logins rate-limited on Gradio's /login and on the API, and typed paths confined to the workspace."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import requests
from studio_helpers import launch

from pipelines.space import Login, Space
from studio.access import Access, AccessGuard, LoginLimiter, client_key, sign_in_page


def test_limiter_counts_failures_per_client_in_a_window():
    lim = LoginLimiter(max_failures=3, window=0.5)
    for _ in range(3):
        assert lim.retry_after("a") == 0
        lim.failed("a")
    assert lim.retry_after("a") >= 1 and lim.retry_after("b") == 0  # per client
    time.sleep(0.6)
    assert lim.retry_after("a") == 0  # the window passed
    lim.failed("a")
    lim.failed("a")
    lim.succeeded("a")  # a successful login clears the count
    lim.failed("a")
    lim.failed("a")
    assert lim.retry_after("a") == 0
    small = LoginLimiter(max_failures=1, window=60, max_clients=3)
    for k in "abcde":
        small.failed(k)
    assert len(small._fails) <= 3  # bounded however many addresses fail


def test_client_key_behind_the_space_proxy():
    scope = {"client": ("10.0.0.9", 5000), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4")]}
    assert client_key(scope) == "10.0.0.9"  # not behind a proxy: the header is whatever the client sent
    assert client_key(scope, trust_proxy=True) == "1.2.3.4"  # the proxy's own entry, not the client's claim
    assert client_key({"client": None, "headers": []}) == "?"


def _request(headers=None, session=None, client="1.2.3.4"):
    return SimpleNamespace(headers=headers or {}, cookies={}, session=session,
                           scope={"client": (client, 1), "headers": []})


def test_oauth_session_and_tokens_admit_only_the_allowed():
    login = Login("oauth", allowed=frozenset({"ann", "team"}))
    seen = []

    def whoami(token):
        seen.append(token)
        if token == "hf_ann":
            return {"name": "Ann", "type": "user", "orgs": []}
        if token == "hf_dave":
            return {"name": "dave", "orgs": [{"name": "team"}]}
        if token == "hf_eve":
            return {"name": "eve", "orgs": []}
        raise ValueError("401 invalid token")

    acc = Access(login=login, whoami=whoami)
    assert acc.mode == "oauth"
    info = {"userinfo": {"preferred_username": "ann"}, "expires_at": time.time() + 60}
    assert acc.user(_request(session={"oauth_info": info})) == "ann"
    assert acc.session_user(_request(session={"oauth_info": {"userinfo": {"preferred_username": "eve"}}})) == \
        ("eve", False)
    expired = dict(info, expires_at=time.time() - 1)
    assert acc.user(_request(session={"oauth_info": expired})) is None
    assert acc.user(_request(session={})) is None and asyncio.run(acc.gradio_dependency(_request(session={}))) is None
    assert acc.user(_request({"authorization": "Bearer hf_ann"}, session={})) == "Ann"
    assert acc.user(_request({"authorization": "Bearer hf_dave"}, session={})) == "dave"  # a member of "team"
    assert acc.user(_request({"authorization": "Bearer hf_ann"}, session={})) == "Ann"
    assert seen.count("hf_ann") == 1  # asked of the Hub once, then remembered
    for _ in range(5):  # someone else's token, or a made-up one: refused, and counted as failed logins
        assert acc.user(_request({"authorization": "Bearer hf_eve"}, session={}, client="9.9.9.9")) is None
    assert acc.throttled(_request(client="9.9.9.9")) > 0 and acc.throttled(_request(client="1.2.3.4")) == 0


def test_password_access_on_the_api():
    import base64

    acc = Access(users={"ann": "s3cret"}, limiter=LoginLimiter(max_failures=2, window=60))
    basic = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    assert acc.user(_request({"authorization": basic})) == "ann"
    assert acc.user(_request({"authorization": "Bearer ann:s3cret"})) == "ann"
    assert acc.user(_request({"authorization": "Bearer ann:nope"})) is None
    assert acc.user(_request({"authorization": "Basic !!!"})) is None  # counted for the empty user name
    assert acc.user(_request({"authorization": basic})) == "ann"  # one failure of ann's so far: still in
    assert acc.user(_request({"authorization": "Bearer ann:nope"})) is None
    assert acc.user(_request({"authorization": "Bearer ann:again"})) is None
    assert acc.user(_request({"authorization": basic})) is None  # over the limit: even the right password waits
    assert acc.user(_request()) is None and Access().user(_request()) == ""


def test_sign_in_page():
    status, body = sign_in_page(None)
    assert status == 200 and b"/login/huggingface" in body
    status, body = sign_in_page("<eve>")
    assert status == 403 and b"&lt;eve&gt;" in body and b"/logout" in body


def test_banner_says_what_is_exposed_and_what_is_lost(tmp_path):
    from studio.app import notices

    sp = Space("ann/m", "ann", "ann-m.hf.space", tmp_path, persistent=False, zero_gpu=True, oauth=True)
    text = notices("this Space at ann-m.hf.space", Access(), sp)
    assert "Reachable without a login" in text and "MACTUNER_OPEN" in text
    assert "lost when the Space restarts" in text and "ZeroGPU" in text
    assert "Reachable without" not in notices("host 0.0.0.0", Access(users={"a": "b"}), None)
    assert notices(None, Access(), None) == ""
    assert "--auth USER:PASS" in notices("a public share link", Access(), None)


def test_banner_and_login_button_in_the_layout(workspace, monkeypatch):
    import gradio as gr
    import gradio.oauth

    monkeypatch.setenv("SYSTEM", "spaces")  # a LoginButton makes the app attach Gradio's OAuth routes: a Space's
    monkeypatch.setenv("SPACE_ID", "ann/m")
    for var, value in (("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "s"), ("OAUTH_SCOPES", "openid profile"),
                       ("OPENID_PROVIDER_URL", "http://127.0.0.1:9")):
        monkeypatch.setattr(gradio.oauth, var, value)
    from pipelines.serving.registry import ModelRegistry
    from studio.app import build_app
    from studio.handlers.common import Context

    ctx = Context(workspace, ModelRegistry(), prepare_hf=False)
    demo = build_app(ctx, banner="⚠️ careful", login_button=True)
    (banner,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "banner"]
    assert banner.value == "⚠️ careful" and banner.visible
    assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
    plain = build_app(ctx)
    assert not any(isinstance(b, gr.LoginButton) for b in plain.blocks.values())
    assert [b for b in plain.blocks.values() if getattr(b, "elem_id", None) == "banner"][0].visible is False


def _guard(app) -> AccessGuard:
    node = app.middleware_stack
    while node is not None and not isinstance(node, AccessGuard):
        node = getattr(node, "app", None)
    assert node is not None
    return node


def test_failed_logins_are_rate_limited(tmp_path_factory):
    demo, url, _ctx = launch(tmp_path_factory, auth=("ann", "s3cret"), load_default=False)
    try:
        assert requests.get(f"{url}/config", timeout=10).status_code == 401  # anonymous: nothing
        ok = requests.post(f"{url}/login", data={"username": "ann", "password": "s3cret"}, timeout=10)
        assert ok.status_code == 200
        for _ in range(5):
            r = requests.post(f"{url}/login", data={"username": "ann", "password": "guess"}, timeout=10)
            assert r.status_code == 400
        r = requests.post(f"{url}/login", data={"username": "ann", "password": "s3cret"}, timeout=10)
        assert r.status_code == 429 and "try again in" in r.json()["detail"] and int(r.headers["retry-after"]) > 0
        # counted per address and user name: behind a share link everybody has one address, and one visitor's
        # guesses must not lock the others out
        r = requests.post(f"{url}/login", data={"username": "bob", "password": "guess"}, timeout=10)
        assert r.status_code == 400
        r = requests.get(f"{url}/api/model/health", auth=("ann", "s3cret"), timeout=10)
        assert r.status_code == 429 and "Too many failed logins" in r.json()["error"]
        r = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer ann:s3cret"}, timeout=10)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_failed_logins"
        assert ok.cookies and requests.get(f"{url}/config", cookies=ok.cookies, timeout=10).status_code == 200
        guard = _guard(demo.server_app)
        guard.access.limiter.succeeded("127.0.0.1|ann")  # the window passed
        for _ in range(5):
            assert requests.get(f"{url}/api/model/health", auth=("ann", "x"), timeout=10).status_code == 401
        assert requests.get(f"{url}/api/model/health", auth=("ann", "s3cret"), timeout=10).status_code == 429
        guard.access.limiter.succeeded("127.0.0.1|ann")
        assert requests.get(f"{url}/api/model/health", auth=("ann", "s3cret"), timeout=10).status_code == 200
    finally:
        demo.close()


def test_paths_are_confined_when_reachable_from_elsewhere(tmp_path_factory, tmp_path, tiny_llama_dir):
    import dataclasses
    import shutil

    from gradio_client import Client
    from studio_helpers import free_port

    from pipelines.serving import registry
    from pipelines.workspace import Workspace
    from studio.app import serve
    from studio.handlers.common import Context

    ws = Workspace.open(tmp_path_factory.mktemp("studio") / "ws", confined=True)  # as serve makes it off loopback
    shutil.copytree(tiny_llama_dir, ws.models / "tiny")
    ctx = Context(ws, registry.ModelRegistry(), prepare_hf=False)
    demo, url = serve(port=free_port(), block=False, ctx=ctx, load_default=False)
    try:
        outside = tmp_path / "outside"
        shutil.copytree(tiny_llama_dir, outside)
        for path in (str(outside), "/etc", "../../outside"):
            r = requests.post(f"{url}/api/model/load", json={"path": path}, timeout=30)
            assert r.status_code == 400 and "outside the workspace" in r.json()["error"], (path, r.text)
        r = requests.post(f"{url}/api/model/load", json={"path": "tiny"}, timeout=120)
        assert r.status_code == 200, r.text
        c = Client(url, verbose=False)
        with pytest.raises(Exception, match="outside the workspace"):
            c.predict(str(outside), False, api_name="/model_load")
        with pytest.raises(Exception, match="outside the workspace"):
            c.predict("tiny", str(outside), "x", api_name="/chat_attach_adapter")
        with pytest.raises(Exception, match="outside the workspace"):
            c.predict(str(outside), "", "", ["f16"], [], api_name="/export_check")
        with pytest.raises(Exception, match="outside the workspace"):
            c.predict("kb", str(outside), 200, 40, api_name="/rag_create")
        secret = tmp_path / "secret.csv"
        secret.write_text("prompt,completion\nmy,secret\n")
        # An upload is a file sent to the studio, never a path of the host: Gradio refuses a FileData naming one
        # (raw HTTP: gradio_client would upload the file from the caller's side).
        r = requests.post(f"{url}/gradio_api/call/data_open", timeout=30, json={"data": [
            {"path": str(secret), "meta": {"_type": "gradio.FileData"}}, None, "auto", "auto", True]})
        events = requests.get(f"{url}/gradio_api/call/data_open/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in events and "secret" not in events
        assert not (ws.datasets / ".uploads").exists() or not any((ws.datasets / ".uploads").iterdir())
        assert not dataclasses.replace(ws, confined=False).confined
    finally:
        demo.close()
        for name in ctx.registry.names():
            ctx.registry.unload(name)


def test_zero_gpu_wraps_only_where_it_is(monkeypatch):
    """On ZeroGPU hardware an HF model's answer runs inside @spaces.GPU; elsewhere, and for GGUF models, as is."""
    import sys
    import types

    from studio import zerogpu

    def answer(*a):
        yield "x"

    assert zerogpu.gpu(answer) is answer  # not ZeroGPU: `spaces` is never imported
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # ZeroGPU said, `spaces` missing: a warning, no GPU
    assert zerogpu.gpu(answer) is answer
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda fn: calls.append(duration) or ("on-gpu", fn))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    wrapped = zerogpu.gpu(answer)
    assert wrapped == ("on-gpu", answer) and calls == [zerogpu.DURATION]
    hf, gguf = SimpleNamespace(backend_kind="transformers"), SimpleNamespace(backend_kind="llama.cpp")
    assert zerogpu.for_model(hf, answer, wrapped) is wrapped and zerogpu.for_model(gguf, answer, wrapped) is answer
