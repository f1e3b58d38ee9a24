"""The studio as a client sees it: the REST API (/api/model/...) and the Gradio API (gradio_client), against an
app launched in this process on a free port (gradio's own tests do the same with prevent_thread_lock=True).

The default model is the real embedded GGUF; other models are the tiny ones built in conftest.py; the Hub is
tests/fakehub.py, reached through HF_ENDPOINT.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakehub import FakeHub  # noqa: E402

from studio_helpers import free_port, launch, wait_loaded  # noqa: E402

from pipelines import models  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "hf_studio_test_token"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    demo, url, ctx = launch(tmp_path_factory)
    wait_loaded(url)
    yield url, ctx
    demo.close()
    for name in ctx.registry.names():
        ctx.registry.unload(name)


@pytest.fixture(scope="module")
def hub():
    from safetensors.numpy import save
    import numpy as np

    with FakeHub(token=TOKEN) as h:
        st = save({"w": np.zeros((3, 4), np.float32)})
        cfg = b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'
        h.add_repo("org/tiny", {"config.json": cfg, "model.safetensors": st}, downloads=7, likes=3, license="mit")
        h.add_repo("org/gated", {"config.json": cfg, "model.safetensors": st}, gated="manual")
        yield h


@pytest.fixture
def online(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hub


# ------------------------------------------------------------------------------------------------ REST


def test_health_docs_and_default_model(studio):
    url, _ = studio
    health = requests.get(f"{url}/api/model/health").json()
    assert health["status"] == "ok" and health["device"] in ("cpu", "cuda", "mps")
    assert health["current_model"] == models.DEFAULT_NAME
    cur = requests.get(f"{url}/api/model/current").json()
    assert cur["model"]["backend"] == "llama.cpp" and cur["model"]["architecture"] == "gemma3"
    assert cur["model"]["dtype"] == "Q4_K_M" and 250e6 < cur["model"]["n_params"] < 300e6
    assert requests.get(f"{url}/docs").status_code == 200
    paths = requests.get(f"{url}/openapi.json").json()["paths"]
    for p in ("/api/model/health", "/api/model/current", "/api/model/local-models", "/api/model/info/{model_id}",
              "/api/model/download", "/api/model/load", "/api/model/unload"):
        assert p in paths, p
    assert "requestBody" in paths["/api/model/load"]["post"]


def test_local_models_lists_default(studio):
    url, _ = studio
    rows = requests.get(f"{url}/api/model/local-models").json()["models"]
    default = [r for r in rows if r["name"] == models.DEFAULT_NAME]
    assert default and default[0]["status"] == "ready" and default[0]["size"] > 200e6


@pytest.mark.parametrize("body,status,text", [
    ({"path": ""}, 400, "Enter a model folder"),
    ({"path": "/definitely/not/here"}, 404, "no such file or folder"),
    ({}, 400, "path: Field required"),
    ({"path": 3}, 400, "path"),
])
def test_load_bad_input(studio, body, status, text):
    url, _ = studio
    r = requests.post(f"{url}/api/model/load", json=body)
    assert r.status_code == status and text in r.json()["error"]


def test_load_not_json(studio):
    url, _ = studio
    r = requests.post(f"{url}/api/model/load", data=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_load_variants(studio, model_variants):
    url, _ = studio
    r = requests.post(f"{url}/api/model/load", json={"path": str(model_variants.no_config())})
    assert r.status_code == 400 and "config.json" in r.json()["error"]
    r = requests.post(f"{url}/api/model/load", json={"path": str(model_variants.fake_gguf())})
    assert r.status_code == 400 and "not a GGUF" in r.json()["error"]


def test_load_tiny_then_unload_then_default_again(studio, tiny_llama_dir):
    url, _ = studio
    r = requests.post(f"{url}/api/model/load", json={"path": str(tiny_llama_dir)})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["backend"] == "transformers"
    assert requests.get(f"{url}/api/model/current").json()["model"]["architecture"] == "LlamaForCausalLM"
    r = requests.post(f"{url}/api/model/unload")
    assert r.status_code == 200 and r.json()["unloaded"] == tiny_llama_dir.name
    assert requests.get(f"{url}/api/model/current").json()["loaded"] is False
    r = requests.post(f"{url}/api/model/unload")
    assert r.status_code == 404 and "No model is loaded" in r.json()["error"]
    r = requests.post(f"{url}/api/model/load-default")
    assert r.status_code == 200 and r.json()["model"]["name"] == models.DEFAULT_NAME


def test_load_while_loading_is_409(studio, tiny_llama_dir):
    url, ctx = studio
    with ctx.registry._load_lock:  # a load in progress
        r = requests.post(f"{url}/api/model/load", json={"path": str(tiny_llama_dir)})
    assert r.status_code == 409 and "being loaded" in r.json()["error"]


def test_hub_info_and_errors(studio, online):
    url, _ = studio
    r = requests.get(f"{url}/api/model/info/org/tiny")
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["id"], info["downloads"], info["likes"], info["license"], info["parameters"]) == ("org/tiny", 7, 3, "mit", 12)
    assert {f["name"] for f in info["files"]} == {"config.json", "model.safetensors"}
    assert any(req.path.startswith("/api/models/org/tiny") for req in online.requests)
    assert requests.get(f"{url}/api/model/info/org/missing").status_code == 404
    r = requests.get(f"{url}/api/model/info/bad id!")
    assert r.status_code == 400 and "not a valid Hub model id" in r.json()["error"]
    r = requests.post(f"{url}/api/model/download", json={"model_id": "org/gated"})
    assert r.status_code == 401 and "gated" in r.json()["error"]
    r = requests.post(f"{url}/api/model/download", json={"model_id": "org/gated", "access_token": TOKEN})
    assert r.status_code == 200 and Path(r.json()["path"], "model.safetensors").exists()


def test_hub_unreachable_is_503(studio, monkeypatch):
    url, _ = studio
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    r = requests.get(f"{url}/api/model/info/org/tiny", timeout=60)
    assert r.status_code == 503 and "Cannot reach the Hub" in r.json()["error"]


# ------------------------------------------------------------------------------------------ Gradio API


def test_gradio_client_endpoints(studio, tiny_llama_dir):
    from gradio_client import Client

    url, _ = studio
    client = Client(url, verbose=False)
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    for name in ("/model_info", "/model_download", "/model_load", "/model_load_default", "/model_unload",
                 "/model_list", "/model_current", "/device_profile", "/memory_estimate", "/model_info_json"):
        assert name in names, name
    prof = client.predict(api_name="/device_profile")
    assert prof["kind"] in ("cpu", "cuda", "mps") and prof["train_dtype"] in ("float32", "bfloat16", "float16")
    md, msg = client.predict(api_name="/model_load_default")
    assert "gemma3" in md and "Loaded" in msg
    est = client.predict(512, 4, 16, False, api_name="/memory_estimate")
    modes = [r["mode"] for r in est["rows"]]
    assert modes[0].startswith("Inference (GGUF Q4_K_M)") and "recommended batch size" in est["advice"]
    mlx_rows = {r["mode"]: r for r in est["rows"] if r["mode"].startswith("MLX LoRA")}  # mlx[cpu] is installed
    assert any("4-bit base" in m for m in mlx_rows) and any("8-bit base" in m for m in mlx_rows)
    assert "MLX:" in est["advice"] and "backend mlx" in est["advice"]
    with pytest.raises(Exception, match="no such file or folder"):
        client.predict("/nope/nowhere", False, api_name="/model_load")
    md, msg = client.predict(str(tiny_llama_dir), False, api_name="/model_load")
    assert "LlamaForCausalLM" in md
    cur = client.predict(api_name="/model_current")
    assert cur["model"]["backend"] == "transformers"
    table = client.predict(api_name="/model_list")
    assert models.DEFAULT_NAME in str(table)
    md, msg = client.predict(api_name="/model_unload")
    assert "No model is loaded" in md and "Unloaded" in msg
    client.predict(api_name="/model_load_default")


# ------------------------------------------------------------------------------------------------ auth


def test_auth_protects_rest(tmp_path_factory):
    demo, url, ctx = launch(tmp_path_factory, auth=("ana", "s3cret"))
    try:
        wait_loaded(url, auth=("ana", "s3cret"))
        r = requests.get(f"{url}/api/model/current")
        assert r.status_code == 401 and "Authentication required" in r.json()["error"]
        assert requests.get(f"{url}/api/model/current", auth=("ana", "wrong")).status_code == 401
        hdr = {"Authorization": "Basic " + base64.b64encode(b"ana:s3cret").decode()}
        assert requests.get(f"{url}/api/model/current", headers=hdr).json()["loaded"] is True
    finally:
        demo.close()
        ctx.registry.unload()
