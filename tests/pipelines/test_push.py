"""Publishing an export to the Hub (pipelines/export/push.py) against the local Hub stand-in (tests/fakehub.py):
the real huggingface_hub client creates the repository, pre-uploads, sends LFS objects and commits over HTTP, and
the files are downloaded back with hf_hub_download and compared by sha256. The card's front matter and body, a
second push that updates (no second repository, nothing re-sent), each error message, the job (the token never in
its folder) and `mactuner push`.

The Xet upload protocol is switched off (HF_HUB_DISABLE_XET): its chunk store is not faked, the LFS protocol is.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where fakehub.py lives
from export_fixtures import BASE_ID, make_export  # noqa: E402
from fakehub import FakeHub  # noqa: E402

from pipelines.errors import BadInput, Conflict, NotFound, Unauthorized, Unavailable  # noqa: E402
from pipelines import jobs  # noqa: E402
from pipelines.export import push as hp  # noqa: E402

TOKEN = "hf_ana_write_0123456789"
READ_TOKEN = "hf_reader_0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN, user="ana", orgs=("team",)) as h:
        h.add_user(READ_TOKEN, "reader", role="read")
        h.add_repo("bob/taken", {"README.md": b"# bob's\n"})
        h.add_repo("team/locked", {"README.md": b"# locked\n"}, writers={"carol"})
        yield h


@pytest.fixture(autouse=True)
def hf_env(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(hub, repo_id: str, path: str, tmp_path) -> bytes:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, path, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "dl")).read_bytes()


def _local_files(folder: Path, adapter: Path) -> dict[str, bytes]:
    """What a push of everything should put in the repository (but README.md and the rewritten adapter config)."""
    out = {str(p.relative_to(folder / "merged")): p.read_bytes() for p in (folder / "merged").iterdir()
           if p.name not in ("README.md", "mactuner.json")}
    out.update({p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".gguf", ".Modelfile")})
    out.update({f"adapter/{p.name}": p.read_bytes() for p in adapter.iterdir()
                if p.name not in ("README.md", "mactuner.json", "adapter_config.json")})
    return out


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------------------- round trip


def test_push_everything_round_trip(workspace, hub, tmp_path):
    folder = make_export(workspace)
    adapter = workspace.runs / "tiny-run" / "adapter"
    seen = []
    r = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token=TOKEN,
                progress=lambda f, m, **k: seen.append((f, m, k)))
    assert (r.repo_id, r.created, r.private, r.changed) == ("ana/tiny", True, True, True)
    assert r.what == ["adapter", "merged", "gguf"] and r.commit == hub.repos["ana/tiny"].sha
    repo = hub.repos["ana/tiny"]
    assert repo.private is True  # private by default
    expected = _local_files(folder, adapter)
    assert set(repo.files) == set(expected) | {".gitattributes", "README.md", "adapter/adapter_config.json"}
    for path, data in expected.items():  # every file arrives intact, downloaded back through the Hub's API
        assert _sha(_download(hub, "ana/tiny", path, tmp_path)) == _sha(data), path
    cfg = json.loads(_download(hub, "ana/tiny", "adapter/adapter_config.json", tmp_path))
    local = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg == {**local, "base_model_name_or_path": BASE_ID}  # the Hub id, not /home/ana/...
    assert {"tiny-f16.gguf", "tiny-Q8_0.gguf", "model.safetensors", "adapter/adapter_model.safetensors"} <= repo.lfs
    assert len(hub.uploads) == 4 and set(hub.uploads) == {_sha(expected[p]) for p in repo.lfs}
    assert not any(b"/home/ana" in data for data in repo.files.values())  # no local path left the machine
    # progress: files and bytes, never backwards, to the end
    fracs = [f for f, _m, _k in seen]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0
    counts = [k for _f, _m, k in seen if k]
    assert counts[-1]["files_done"] == counts[-1]["files_total"] == len(repo.files) - 1
    assert counts[-1]["bytes_done"] == counts[-1]["bytes_total"] > 60_000
    assert any("Uploading tiny-Q8_0.gguf" in m for _f, m, _k in seen)
    (record,) = hp.pushes(workspace, "tiny")
    assert record["repo_id"] == "ana/tiny" and record["commit"] == r.commit
    assert TOKEN not in (folder / hp.PUSHES_FILE).read_text()
    assert hp.available(workspace, "tiny")["last_repo"] == "ana/tiny"


def test_card_metadata_and_body_render(workspace, hub):
    from huggingface_hub import ModelCard
    from markdown_it import MarkdownIt

    make_export(workspace)
    hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token=TOKEN)
    assert any(r.path == "/api/validate-yaml" and r.status == 200 for r in hub.requests)  # the client checked it
    card = ModelCard.load("ana/tiny", token=TOKEN)  # downloaded from the Hub and parsed by huggingface_hub
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"mactuner", "lora", "peft", "merged", "gguf"} <= set(card.data.tags)
    text = card.text
    for want in ("chat (version 1): 90 training and 10 validation rows", "Final training loss: 1.2345",
                 "Best validation loss: 1.5000", "Did the fine-tune help? better", "| rank | 8 |",
                 "### tiny-Q8_0.gguf (Q8_0", "| fine-tune survived | ✅ pass |", "| Q8_0 |", "| HF (merged) |",
                 "ollama run hf.co/ana/tiny:Q8_0", "llama-cli -hf ana/tiny:Q8_0",
                 "hf download ana/tiny tiny-Q8_0.gguf tiny-Q8_0.Modelfile",
                 'AutoModelForCausalLM.from_pretrained("ana/tiny")', 'subfolder="adapter"', "`model.safetensors`"):
        assert want in text, want
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert html.count("<table>") >= 4 and "<h2>GGUF validation</h2>" in html and "<h3>tiny-f16.gguf" in html


def test_gguf_only_public_push_under_the_token_user(workspace, hub):
    from huggingface_hub import ModelCard

    make_export(workspace, merged=False)
    assert hp.available(workspace, "tiny")["parts"] == ["adapter", "gguf"]
    r = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="tiny-gguf", what=["gguf"],
                                          ggufs=["tiny-Q8_0.gguf"], private=False), token=TOKEN)
    assert r.repo_id == "ana/tiny-gguf" and r.private is False and hub.repos["ana/tiny-gguf"].private is False
    assert set(hub.repos["ana/tiny-gguf"].files) == {".gitattributes", "README.md", "tiny-Q8_0.gguf",
                                                     "tiny-Q8_0.Modelfile"}
    card = ModelCard.load("ana/tiny-gguf", token=TOKEN)
    assert card.data.library_name == "gguf" and card.data.base_model == BASE_ID
    assert "tiny-f16" not in card.text and "PeftModel" not in card.text


def test_export_of_a_downloaded_hf_model(workspace, hub, tmp_path):
    from huggingface_hub import ModelCard

    folder = make_export(workspace, merged=False)
    snapshot = tmp_path / "hf" / "hub" / "models--org--src" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    man = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**man, "source": str(snapshot), "base_model": None}))
    assert hp.available(workspace, "tiny")["parts"] == ["gguf"]  # no adapter, nothing merged: GGUFs only
    hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/src-gguf"), token=TOKEN)
    card = ModelCard.load("ana/src-gguf", token=TOKEN)
    assert card.data.base_model == "org/src" and card.data.library_name == "gguf"
    assert "A GGUF export of [org/src]" in card.text and "## Training" not in card.text
    assert str(tmp_path) not in card.text


# ---------------------------------------------------------------------------------------------- second push


def test_second_push_updates_the_same_repo(workspace, hub):
    folder = make_export(workspace)
    first = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny", what=["gguf"]), token=TOKEN)
    repo = hub.repos["ana/tiny"]
    uploads = list(hub.uploads)
    assert len(repo.commits) == 2 and len(uploads) == 2  # "initial commit", then the push
    # the Q8_0 GGUF is validated again and fails a check; then everything is pushed
    val = json.loads((folder / "tiny-Q8_0.validation.json").read_text())
    val["items"][-1].update(ok=False, detail="lost on 3 of 4 prompts")
    (folder / "tiny-Q8_0.validation.json").write_text(json.dumps(val))
    second = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token=TOKEN)
    assert not second.created and second.changed and second.repo_id == first.repo_id
    assert list(hub.repos) == ["bob/taken", "team/locked", "ana/tiny"]  # no second repository
    assert len(repo.commits) == 3 and second.commit == repo.sha != first.commit
    assert len(hub.uploads) == 4 and hub.uploads[:2] == uploads  # the GGUFs were not sent again
    unchanged = {f["path"] for f in second.files if f["unchanged"]}
    assert {"tiny-f16.gguf", "tiny-Q8_0.gguf", "tiny-f16.Modelfile"} <= unchanged
    assert "README.md" not in unchanged and "| fine-tune survived | ❌ fail |" in repo.files["README.md"].decode()
    assert "model.safetensors" in repo.files and "already there" in second.message
    # the same export once more: nothing to commit
    third = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token=TOKEN)
    assert not third.changed and "Nothing changed" in third.message
    assert len(repo.commits) == 3 and third.commit == second.commit and len(hub.uploads) == 4
    assert [p["changed"] for p in hp.pushes(workspace, "tiny")] == [True, True, False]


def test_adapter_moves_to_a_subfolder_beside_a_merged_model(workspace, hub):
    make_export(workspace)
    hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny", what=["adapter"]), token=TOKEN)
    repo = hub.repos["ana/tiny"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(repo.files)  # PeftModel.from_pretrained(repo)
    r = hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny", what=["merged"]), token=TOKEN)
    assert r.deleted == ["adapter_config.json", "adapter_model.safetensors"] and r.what == ["adapter", "merged"]
    assert "adapter_config.json" not in repo.files and "adapter/adapter_config.json" in repo.files
    assert "config.json" in repo.files and repo.commits[-1]["deleted"] == r.deleted
    assert len(hub.uploads) == 2  # the adapter's weights were known to the Hub: only the merged model went up


# --------------------------------------------------------------------------------------------------- errors


def test_bad_token_is_refused_clearly(workspace, hub):
    make_export(workspace)
    with pytest.raises(Unauthorized, match=r"The Hub refused the token \(401\).*write access"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token="hf_wrong")
    with pytest.raises(Unauthorized, match="read-only"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="reader/tiny"), token=READ_TOKEN)
    with pytest.raises(Unauthorized, match="needs a Hub access token"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"))
    assert "ana/tiny" not in hub.repos and "reader/tiny" not in hub.repos


def test_token_from_hf_token(workspace, hub, monkeypatch):
    make_export(workspace)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/env", what=["gguf"])).created


def test_no_network_is_unavailable(workspace, monkeypatch):
    make_export(workspace)
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"Cannot reach the Hub at http://127\.0\.0\.1:\d+ .*no network"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/tiny"), token=TOKEN)
    assert time.monotonic() - t0 < 5
    assert hp.pushes(workspace, "tiny") == []


@pytest.mark.parametrize("repo_id", ["bob/new-model", "bob/taken"])
def test_someone_elses_namespace(workspace, hub, repo_id):
    make_export(workspace)
    with pytest.raises(Unauthorized, match=rf"The repo '{repo_id}' belongs to 'bob'; your token is for 'ana' "
                                           r"\(member of team\)\. Push to 'ana/"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id=repo_id), token=TOKEN)
    assert "bob/new-model" not in hub.repos and set(hub.repos["bob/taken"].files) == {"README.md"}
    assert hub.uploads == []


def test_a_taken_name_you_cannot_write(workspace, hub):
    make_export(workspace)
    with pytest.raises(Conflict, match=r"'team/locked' already exists and your token \(ana\) cannot write to it: "
                                       "the name is taken"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="team/locked"), token=TOKEN)
    assert set(hub.repos["team/locked"].files) == {"README.md"}


def test_bad_requests(workspace, hub):
    make_export(workspace, merged=False)
    with pytest.raises(NotFound, match="There is no export 'nope'"):
        hp.push(workspace, hp.PushRequest(export="nope", repo_id="ana/x"), token=TOKEN)
    with pytest.raises(BadInput, match="has no merged model to push"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/x", what=["merged"]), token=TOKEN)
    with pytest.raises(BadInput, match="Unknown part"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/x", what=["weights"]), token=TOKEN)
    with pytest.raises(BadInput, match="not a valid Hub model id"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/bad name"), token=TOKEN)
    with pytest.raises(BadInput, match="Not a GGUF of 'tiny'"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id="ana/x", ggufs=["other.gguf"]), token=TOKEN)
    with pytest.raises(BadInput, match="Enter the Hub repository"):
        hp.push(workspace, hp.PushRequest(export="tiny", repo_id=" "), token=TOKEN)
    assert [r for r in hub.requests] == []  # refused before any request


# ------------------------------------------------------------------------------------------------ job and CLI


def test_push_job_keeps_the_token_out_of_its_folder(workspace, hub):
    make_export(workspace)
    job = hp.start(workspace, hp.PushRequest(export="tiny", repo_id="ana/job", what=["gguf"]), token=TOKEN)
    final = jobs.wait(hp.queue(workspace).job(job), timeout=120)
    assert final.state == "finished", hp.queue(workspace).job(job).log_tail()
    assert final.result["repo_id"] == "ana/job" and final.extra["files_done"] == final.extra["files_total"] == 5
    assert set(hub.repos["ana/job"].files) >= {"tiny-f16.gguf", "tiny-Q8_0.gguf", "README.md"}
    assert hub.auth_seen() >= {f"Bearer {TOKEN}"}
    for p in (workspace.exports / ".pushes").rglob("*"):
        if p.is_file():
            assert TOKEN not in p.read_text(errors="replace"), p
    failed = hp.start(workspace, hp.PushRequest(export="tiny", repo_id="bob/job", what=["gguf"]), token=TOKEN)
    st = jobs.wait(hp.queue(workspace).job(failed), timeout=120)
    assert st.state == "failed" and "belongs to 'bob'" in st.reason


def test_cancelled_push_commits_nothing(workspace, hub):
    make_export(workspace)
    hub.upload_delay = 30.0
    job = hp.start(workspace, hp.PushRequest(export="tiny", repo_id="ana/slow", what=["gguf"]), token=TOKEN)
    t0 = time.time()
    while not any(r.method == "PUT" for r in hub.requests) and time.time() - t0 < 60:
        time.sleep(0.1)
    st = hp.status(workspace, job)
    assert st.state == "running" and "Uploading tiny-f16.gguf" in st.message and st.extra["bytes_total"] > 0
    assert hp.cancel(workspace, job).state == "cancelled"
    assert [c["summary"] for c in hub.repos["ana/slow"].commits] == ["initial commit"]
    assert hp.pushes(workspace, "tiny") == []


def _cli(*args, env_extra: dict, root: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "push", *args, "--root", str(root)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_push(workspace, hub):
    make_export(workspace)
    r = _cli("tiny", "ana/cli", "--what", "gguf,adapter", "--public", env_extra={"HF_TOKEN": TOKEN},
             root=workspace.root)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["repo_id"] == "ana/cli" and out["what"] == ["adapter", "gguf"] and out["private"] is False
    assert "Uploading tiny-Q8_0.gguf" in r.stderr and "100.0%" in r.stderr
    assert "adapter_model.safetensors" in hub.repos["ana/cli"].files
    r = _cli("tiny", "ana/cli", env_extra={"HF_TOKEN": "hf_wrong"}, root=workspace.root)
    assert r.returncode == 1 and "refused the token" in r.stderr and "Traceback" not in r.stderr
