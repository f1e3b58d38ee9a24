"""The Export tab's "Publish to the Hub" handlers, called directly against the local Hub stand-in: the form offers
only what the picked export has, the push runs as a job followed with a progress bar to its link, the token field
is emptied and the token is in no file, a second push of the export goes to the same repository, and errors come
back as one message."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gradio as gr
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from export_fixtures import make_export  # noqa: E402
from fakehub import FakeHub  # noqa: E402

TOKEN = "hf_ana_studio_0123456789"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub(token=TOKEN, user="ana") as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the job's process reads it; its chunk store is not faked
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield h


@pytest.fixture
def ctx(workspace):
    from pipelines.serving.registry import ModelRegistry
    from studio.handlers.common import Context

    make_export(workspace)
    make_export(workspace, name="ggufs-only", run="other-run", merged=False)
    return Context(workspace, ModelRegistry(), prepare_hf=False)


def _follow(ctx, job, timeout=120):
    from studio.handlers.push import PushHandlers

    push = PushHandlers(ctx)
    t0 = time.time()
    while time.time() - t0 < timeout:
        job_id, bar, status = push.poll(job)
        if "running" not in status:
            return job_id, bar, status
        time.sleep(0.2)
    raise AssertionError(status)


def test_form_offers_what_the_export_has(ctx):
    from studio.handlers.push import PushHandlers

    push = PushHandlers(ctx)
    parts, ggufs, repo, note = push.form("ggufs-only")
    assert parts["choices"] == [("LoRA adapter", "adapter"), ("GGUF files", "gguf")]
    assert parts["value"] == ["adapter", "gguf"]
    assert ggufs["choices"] == ["ggufs-only-f16.gguf", "ggufs-only-Q8_0.gguf"] and ggufs["visible"] is True
    assert repo["value"] == "" and repo["placeholder"] == "your-name/ggufs-only"
    assert "Not pushed yet" in note and "private" in note
    parts, *_rest, note = push.form(None)
    assert parts["choices"] == [] and "Pick an export" in note


def test_push_from_the_export_tab(ctx, hub, workspace):
    from studio.handlers.push import PushHandlers

    push = PushHandlers(ctx)
    assert push.poll(None) == (None, "", "")
    msg, job, token_field = push.start("tiny", "ana/studio", TOKEN, False, ["gguf", "merged"], ["tiny-Q8_0.gguf"])
    assert "Pushing **tiny** (merged model, GGUF files) to `ana/studio`" in msg and job and token_field == ""
    job_id, bar, status = _follow(ctx, job)
    assert job_id == job and "✅ finished" in status and "Created private repository ana/studio" in status
    assert f"]({hub.url}/ana/studio)" in status and 'width:100.0%' in bar
    files = set(hub.repos["ana/studio"].files)
    assert {"tiny-Q8_0.gguf", "model.safetensors", "README.md"} <= files and "tiny-f16.gguf" not in files
    for p in workspace.root.rglob("*"):  # the token went to the job in its environment only
        if p.is_file() and p.stat().st_size < 1_000_000:
            assert TOKEN.encode() not in p.read_bytes(), p
    # the form now proposes the same repository: a second push updates it
    _parts, _ggufs, repo, note = push.form("tiny")
    assert repo["value"] == "ana/studio" and "Last pushed to [ana/studio]" in note
    _msg, job2, _t = push.start("tiny", repo["value"], TOKEN, False, ["gguf"], ["tiny-Q8_0.gguf", "tiny-f16.gguf"])
    _id, _bar, status = _follow(ctx, job2)
    assert "Updated private repository ana/studio" in status and len(hub.repos) == 1
    assert "tiny-f16.gguf" in hub.repos["ana/studio"].files


def test_push_errors_are_one_message(ctx, hub):
    from studio.handlers.push import PushHandlers

    push = PushHandlers(ctx)
    with pytest.raises(gr.Error, match="Tick what to push"):
        push.start("tiny", "ana/x", TOKEN, False, [], [])
    with pytest.raises(gr.Error, match="has no merged model to push"):
        push.start("ggufs-only", "ana/x", TOKEN, False, ["merged"], [])
    with pytest.raises(gr.Error, match="Enter the Hub repository"):
        push.start("tiny", "", TOKEN, False, ["gguf"], ["tiny-Q8_0.gguf"])
    with pytest.raises(gr.Error, match="needs a Hub access token"):
        push.start("tiny", "ana/x", "", False, ["gguf"], ["tiny-Q8_0.gguf"])
    _msg, job, _t = push.start("tiny", "ana/x", "hf_wrong", False, ["gguf"], ["tiny-Q8_0.gguf"])
    _id, bar, status = _follow(ctx, job)
    assert "❌ failed" in status and "refused the token" in status and "Traceback" not in status


def test_a_remote_studio_wants_the_token_typed(workspace, hub, monkeypatch):
    from pipelines.serving.registry import ModelRegistry
    from pipelines.workspace import Workspace
    from studio.handlers.push import PushHandlers
    from studio.handlers.common import Context

    if "confined" not in Workspace.__dataclass_fields__:
        pytest.skip("this workspace has no confined mode")
    make_export(workspace)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the server's own token
    remote = Context(Workspace.open(workspace.root, confined=True), ModelRegistry(), prepare_hf=False)
    remote_push = PushHandlers(remote)
    with pytest.raises(gr.Error, match="Type your Hub access token"):
        remote_push.start("tiny", "ana/x", "", False, ["gguf"], ["tiny-Q8_0.gguf"])
    assert hub.requests == [] and not (workspace.exports / ".pushes").exists()


def test_the_section_is_in_the_export_tab(workspace):
    from pipelines.serving.registry import ModelRegistry
    from studio.app import build_app
    from studio.handlers.common import Context

    demo = build_app(Context(workspace, ModelRegistry(), prepare_hf=False))
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"push-section", "push-repo", "push-token", "push-parts", "push-ggufs", "push-start"} <= ids
    token = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "push-token")
    assert token.type == "password"
    assert "export_push" in {d.api_name for d in demo.fns.values()}
