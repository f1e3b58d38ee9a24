"""The Hub functions of pipelines/hub.py against a local fake Hub (tests/fakehub.py).

huggingface_hub is not mocked: the real client makes real HTTP requests to FakeHub, found through HF_ENDPOINT
(`hub_endpoint()` reads it at call time and passes it as `endpoint=`).

huggingface_hub reads several settings once, when it is imported (constants.ENDPOINT, HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE...), and another test may have imported it before this module runs. Setting the env vars is then too
late, so the `hf_env` fixture also patches the module attributes that are read at call time:
  - constants.HF_HUB_CACHE: snapshot_download's default cache_dir. `download()` is called without cache_dir here,
    and `resolve_source()` cannot be given one, so both must land in / look in the per-test tmp cache;
  - constants.ENDPOINT and HUGGINGFACE_CO_URL_TEMPLATE (kept consistent: hf_hub_url swaps the ENDPOINT prefix of
    the template for `endpoint=`) point at a closed local port. A request that does not get the endpoint from
    `hub_endpoint()` therefore fails here at once instead of reaching huggingface.co (huggingface_hub itself
    fetches an "agent harnesses" registry from constants.ENDPOINT once per process; that fails harmlessly);
  - constants.HF_HOME / AGENT_HARNESSES_PATH: nothing is read from or written to the real ~/.cache/huggingface;
  - constants.HF_HUB_OFFLINE: False, whatever the environment (or conftest's autouse `hf_offline`) says.
Every test asserts on `hub.requests` that the fake Hub was really the one answering.

"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where fakehub.py lives
from fakehub import FakeHub  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402

from pipelines import hub as hubapi  # noqa: E402
from pipelines import models  # noqa: E402
from pipelines.errors import BadInput, NotFound, Unauthorized, Unavailable  # noqa: E402

TOKEN = "hf_test_0123456789abcdef"
# A real safetensors file: 3*4 + 5 = 17 parameters.
TINY_ST = st_save({"w": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)})
CONFIG = b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'
GITATTR = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # every real Hub repo has one


@pytest.fixture(scope="module")
def hub():
    with FakeHub(token=TOKEN) as h:
        h.add_repo("org/tiny", {
            ".gitattributes": GITATTR, "README.md": b"# tiny\n", "config.json": CONFIG,
            "model.safetensors": TINY_ST, "pytorch_model.bin": b"\x80pickle" * 10, "tokenizer.json": b'{"v": 1}',
        }, downloads=1234, likes=56, license="mit", pipeline_tag="text-generation", library_name="transformers",
            last_modified="2024-05-01T12:00:00.000Z")
        h.add_repo("org/summary", {"config.json": CONFIG, "model.safetensors": TINY_ST},
                   safetensors={"parameters": {"F32": 270_000_000}, "total": 270_000_000})
        h.add_repo("org/complete", {"config.json": CONFIG, "model.safetensors": TINY_ST, "tokenizer.json": b"{}"})
        h.add_repo("org/gated", {"config.json": CONFIG, "model.safetensors": TINY_ST}, gated="manual",
                   license="gemma", safetensors={"parameters": {"BF16": 17}, "total": 17})
        h.add_repo("org/ggufs", {"README.md": b"# q\n", "model-Q4_K_M.gguf": b"GGUF\x03\0\0\0" + b"4" * 64,
                                 "model-Q8_0.gguf": b"GGUF\x03\0\0\0" + b"8" * 64}, library_name="gguf")
        h.add_repo("org/noweights", {"README.md": b"# nothing\n", "config.json": CONFIG})
        yield h


@pytest.fixture(autouse=True)
def hf_env(hub, tmp_path, monkeypatch):
    """Point huggingface_hub at the fake Hub and at a per-test cache; no token. Returns the cache dir."""
    from huggingface_hub import constants

    home, cache = tmp_path / "hf", tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    sinkhole = _closed_port_url()
    monkeypatch.setattr(constants, "ENDPOINT", sinkhole)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", sinkhole + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.requests.clear()
    hub.delays.clear()
    return cache


def _files_requested(hub, repo_id):
    return {r.file for r in hub.requests if r.repo == repo_id}


def _closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------------------------------- hub_info


def test_hub_info_public_repo(hub):
    info = hubapi.hub_info("org/tiny")
    assert (info.id, info.author, info.downloads, info.likes) == ("org/tiny", "org", 1234, 56)
    assert info.license == "mit" and info.gated is False
    assert (info.pipeline_tag, info.library) == ("text-generation", "transformers")
    assert info.last_modified == "2024-05-01T12:00:00+00:00"
    assert info.sha == hub.repos["org/tiny"].sha
    sizes = {f["name"]: f["size"] for f in info.files}
    assert sizes == {n: len(b) for n, b in hub.repos["org/tiny"].files.items()}
    assert info.total_size == sum(sizes.values())
    assert info.weight_format == "safetensors" and info.warnings == []
    # No `safetensors` summary in the API answer: the count comes from the file header, read with a Range request.
    assert info.parameters == 17
    assert any(r.range == "bytes=0-100000" and r.file == "model.safetensors" for r in hub.requests)
    info_calls = [r for r in hub.requests if r.path == "/api/models/org/tiny"]
    assert info_calls and info_calls[0].query.get("blobs") == ["true"] and info_calls[0].authorization is None
    assert hub.downloaded("org/tiny") == set()  # nothing downloaded, only the header was read


def test_hub_info_parameters_from_api_summary(hub):
    info = hubapi.hub_info("org/summary")
    assert info.parameters == 270_000_000
    assert not any(r.range for r in hub.requests)  # the summary is enough: no header read


def test_hub_info_not_found(hub):
    with pytest.raises(NotFound, match=r"'org/missing' was not found on the Hub"):
        hubapi.hub_info("org/missing")
    with pytest.raises(NotFound, match="not found"):  # with a valid token the Hub answers 404 instead of 401
        hubapi.hub_info("org/missing", token=TOKEN)
    assert [r.status for r in hub.requests if r.path == "/api/models/org/missing"] == [401, 404]


@pytest.mark.parametrize("bad", ["", "   ", "a/b/c", "bad id!", "org/name with space", "../etc"])
def test_hub_info_bad_ids(hub, bad):
    with pytest.raises(BadInput):
        hubapi.hub_info(bad)
    assert hub.requests == []  # rejected before any request


def test_validate_model_id_strips_and_explains():
    assert hubapi.validate_model_id("  org/tiny \n") == "org/tiny"
    with pytest.raises(BadInput, match="Enter a model id"):
        hubapi.validate_model_id("")
    with pytest.raises(BadInput, match="'a/b/c' is not a valid Hub model id"):
        hubapi.validate_model_id("a/b/c")


def test_gated_without_token_info_warns_and_download_refused(hub):
    info = hubapi.hub_info("org/gated")
    assert info.gated == "manual" and info.license == "gemma" and info.parameters == 17
    assert any("Gated model" in w for w in info.warnings)
    with pytest.raises(Unauthorized, match="'org/gated' is gated"):
        hubapi.download("org/gated")
    assert hub.downloaded("org/gated") == set()
    assert any(r.status == 401 and r.file for r in hub.requests)  # the file request was refused (GatedRepo)
    assert hub.auth_seen() == {None}


def test_gated_with_token_argument(hub, hf_env):
    info = hubapi.hub_info("org/gated", token=f"  {TOKEN}  ")  # the token field may carry spaces
    assert info.warnings == []
    path = hubapi.download("org/gated", token=TOKEN)
    assert path.is_relative_to(hf_env)
    assert (path / "model.safetensors").read_bytes() == TINY_ST
    assert hub.downloaded("org/gated") == {"config.json", "model.safetensors"}
    hub_calls = [r for r in hub.requests if not r.path.startswith("/cdn/")]
    assert hub_calls and all(r.authorization == f"Bearer {TOKEN}" for r in hub_calls)
    # LFS files come from the "CDN" (another host): the token must not be sent there.
    cdn_calls = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn_calls and all(r.authorization is None for r in cdn_calls)


def test_gated_with_token_from_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = hubapi.download("org/gated")
    assert (path / "config.json").read_bytes() == CONFIG
    assert f"Bearer {TOKEN}" in hub.auth_seen()


def test_wrong_token_is_unauthorized(hub):
    with pytest.raises(Unauthorized, match="token is invalid"):
        hubapi.hub_info("org/tiny", token="hf_wrong")
    with pytest.raises(Unauthorized):
        hubapi.download("org/gated", token="hf_wrong")
    assert hub.auth_seen() == {"Bearer hf_wrong"}
    assert hub.downloaded("org/gated") == set()


# ------------------------------------------------------------------------------------------------- no network


def test_unreachable_hub_is_unavailable(monkeypatch):
    url = _closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"Cannot reach the Hub at http://127\.0\.0\.1:\d+"):
        hubapi.hub_info("org/tiny")
    with pytest.raises(Unavailable, match="Cannot reach the Hub"):
        hubapi.download("org/tiny")
    assert time.monotonic() - t0 < 5


def test_hub_lost_during_download_is_unavailable(monkeypatch):
    with FakeHub() as lone:
        lone.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": TINY_ST})
        monkeypatch.setenv("HF_ENDPOINT", lone.url)

        def progress(fraction, message):  # download() reports 0.0 between hub_info and snapshot_download
            if fraction == 0.0 and lone._server is not None:
                lone.stop()

        with pytest.raises(Unavailable, match="Cannot reach the Hub"):
            hubapi.download("org/tiny", progress=progress)
    # the Hub answered hub_info, then vanished before snapshot_download's first request
    assert lone.requests and not any("/revision/" in r.path for r in lone.requests)
    assert lone.downloaded("org/tiny") == set()


def test_silent_hub_gives_up_within_seconds(monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub's knob for metadata requests; read at import, hence the attribute patch as well
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    outcome = []

    def call():
        try:
            hubapi.hub_info("org/tiny")
        except Exception as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(3)
    finished = not t.is_alive()
    srv.close()  # resets the pending connection, which frees the thread if it was still waiting
    t.join(2)
    assert finished, "hub_info was still waiting after 3 s"
    assert isinstance(outcome[0], Unavailable)


# --------------------------------------------------------------------------------------------------- download


def test_download_safetensors_only_allowed_files(hub, hf_env):
    path = hubapi.download("org/tiny")
    assert path == hf_env / "models--org--tiny" / "snapshots" / hub.repos["org/tiny"].sha
    expected = {"README.md", "config.json", "model.safetensors", "tokenizer.json"}
    assert {p.name for p in path.iterdir()} == expected
    for name in expected:
        assert (path / name).read_bytes() == hub.repos["org/tiny"].files[name]
    assert hub.downloaded("org/tiny") == expected
    # the pickle twin and .gitattributes were never even asked for
    assert {"pytorch_model.bin", ".gitattributes"}.isdisjoint(_files_requested(hub, "org/tiny"))


def test_download_progress_ends_at_one(hub):
    seen = []
    hubapi.download("org/tiny", progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and "Downloading org/tiny" in seen[0][1]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert any(0.0 < f for f in fractions[1:-1]) and any(" B / " in m for _, m in seen[1:-1])  # byte bars reported
    assert seen[-1] == (1.0, "Downloaded org/tiny")


def test_download_progress_never_goes_back(hub):
    hub.delays["model.safetensors"] = 0.3  # the weights start after the small files are done, as on a real link
    fractions = []
    hubapi.download("org/tiny", progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions), fractions
    assert fractions.index(1.0) >= len(fractions) - 3, f"1.0 reported before the end: {fractions}"


def test_download_several_gguf_needs_a_choice(hub):
    with pytest.raises(BadInput, match="several GGUF files; choose one: model-Q4_K_M.gguf, model-Q8_0.gguf"):
        hubapi.download("org/ggufs")
    assert hub.downloaded("org/ggufs") == set()
    with pytest.raises(NotFound, match="'nope.gguf' is not a file of this repository"):
        hubapi.download("org/ggufs", gguf_file="nope.gguf")


def test_download_chosen_gguf_only(hub, tmp_path):
    cache = tmp_path / "explicit-cache"
    path = hubapi.download("org/ggufs", gguf_file="model-Q4_K_M.gguf", cache_dir=str(cache))
    assert path.is_relative_to(cache)
    assert (path / "model-Q4_K_M.gguf").read_bytes() == hub.repos["org/ggufs"].files["model-Q4_K_M.gguf"]
    assert not (path / "model-Q8_0.gguf").exists()
    assert hub.downloaded("org/ggufs") == {"model-Q4_K_M.gguf", "README.md"}


def test_repo_without_weights(hub):
    info = hubapi.hub_info("org/noweights")
    assert info.weight_format == "none" and any("No weight files" in w for w in info.warnings)
    assert info.parameters is None
    with pytest.raises(BadInput, match="no model weights"):
        hubapi.download("org/noweights")
    assert hub.downloaded("org/noweights") == set()


def test_download_patterns():
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]
    assert "*.safetensors" in hubapi._download_patterns(names, None)
    assert "*.bin" not in hubapi._download_patterns(names, None)
    assert "*.bin" in hubapi._download_patterns(["config.json", "pytorch_model.bin"], None)
    assert hubapi._download_patterns(["a.gguf", "config.json"], None)[0] == "a.gguf"
    with pytest.raises(BadInput):
        hubapi._download_patterns(["README.md"], None)


# ---------------------------------------------------------------------------------------------- resolve_source


def test_resolve_source_finds_complete_download(hub, hf_env):
    with pytest.raises(NotFound, match="not downloaded yet"):
        models.resolve_source("org/complete")
    path = hubapi.download("org/complete")
    n = len(hub.requests)
    assert models.resolve_source("org/complete") == path
    assert path.is_relative_to(hf_env)
    assert len(hub.requests) == n  # local_files_only: no request


def test_resolve_source_after_filtered_download(hub):
    path = hubapi.download("org/tiny")
    assert models.resolve_source("org/tiny") == path
