"""Running as a Hugging Face Space (pipelines.space) and a studio reachable from elsewhere (a confined workspace):
what the Space's environment is taken to mean, where the files go, who is let in (the OAuth allow-list as a unit),
the ZeroGPU training refusal, and typed paths confined to the workspace and the HF cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipelines import space
from pipelines.errors import BadInput, NotFound
from pipelines.workspace import Workspace

OAUTH = {"OAUTH_CLIENT_ID": "id", "OAUTH_CLIENT_SECRET": "secret", "OAUTH_SCOPES": "openid profile",
         "OPENID_PROVIDER_URL": "https://huggingface.co"}


def space_env(tmp_path, **over) -> dict:
    env = {"SYSTEM": "spaces", "SPACE_ID": "Ann/mactuner", "SPACE_AUTHOR_NAME": "Ann",
           "SPACE_HOST": "ann-mactuner.hf.space", "MACTUNER_SPACE_DATA": str(tmp_path / "data")}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_detect_a_space_and_its_storage(tmp_path):
    assert space.detect({}) is None and space.detect({"PATH": "/bin"}) is None
    env = space_env(tmp_path)
    sp = space.detect(env)
    assert sp.id == "Ann/mactuner" and sp.owner == "Ann" and sp.host == "ann-mactuner.hf.space"
    assert not sp.persistent and sp.workspace is None  # no storage mounted: the default, lost at a restart
    assert "lost when the Space restarts" in space.storage_note(sp)
    assert space.setup_storage(sp, dict(env)) is None
    (tmp_path / "data").mkdir()
    sp = space.detect(env)
    assert sp.persistent and sp.workspace == tmp_path / "data" / "mactuner" and space.storage_note(sp) is None
    out = dict(env)
    assert space.setup_storage(sp, out) == tmp_path / "data" / "mactuner"
    assert out["MACTUNER_HOME"] == str(tmp_path / "data" / "mactuner")
    assert out["HF_HOME"] == str(tmp_path / "data" / ".huggingface")
    kept = dict(env, MACTUNER_HOME="/elsewhere", HF_HOME="/hf")  # what the owner set wins
    assert space.setup_storage(sp, kept) == Path("/elsewhere") and kept["HF_HOME"] == "/hf"
    assert space.detect(dict(env, SPACE_HOST="a.hf.space, custom.example.org")).host == "a.hf.space"


def test_login_policy_never_starts_open_without_being_told(tmp_path):
    env = space_env(tmp_path)
    with pytest.raises(space.SpaceConfigError, match="MACTUNER_PASSWORD.*MACTUNER_OPEN"):
        space.login_policy(space.detect(env), env)
    env_oauth = dict(env, **OAUTH)
    login = space.login_policy(space.detect(env_oauth), env_oauth)
    assert login.mode == "oauth" and login.allowed == {"ann"}
    pw = dict(env_oauth, MACTUNER_PASSWORD="s3cret")  # a password secret wins over Hugging Face login
    login = space.login_policy(space.detect(pw), pw)
    assert (login.mode, login.user, login.password) == ("password", "Ann", "s3cret") and "s3cret" not in repr(login)
    login = space.login_policy(space.detect(pw), dict(pw, MACTUNER_USER="bob"))
    assert login.user == "bob"
    opened = dict(env_oauth, MACTUNER_OPEN="1")
    assert space.login_policy(space.detect(opened), opened).mode == "open"
    assert space.login_policy(space.detect(dict(env, MACTUNER_OPEN="true")), dict(env, MACTUNER_OPEN="true")).mode \
        == "open"
    no_system = {k: v for k, v in env_oauth.items() if k != "SYSTEM"}  # not really a Space: no Hugging Face login
    with pytest.raises(space.SpaceConfigError):
        space.login_policy(space.detect(no_system), no_system)


def test_the_oauth_allow_list():
    """Only the owner and the listed users (or members of listed organisations) get in; names are compared as the
    Hub does, case-insensitively."""
    env = dict(space_env(Path("/nonexistent")), **OAUTH, MACTUNER_ALLOWED_USERS="bob, Carol;my-org")
    login = space.login_policy(space.detect(env), env)
    assert login.allowed == {"ann", "bob", "carol", "my-org"}
    assert login.admits("Ann") and login.admits("ann") and login.admits("BOB") and login.admits("carol")
    assert not login.admits("mallory") and not login.admits("") and not login.admits(None)
    assert login.admits("dave", ["other", "My-Org"]) and not login.admits("dave", ["other"])
    assert not space.Login("password", "Ann", "x").admits("Ann")  # only Hugging Face login admits by name
    userinfo = {"preferred_username": "dave", "name": "Dave D.", "orgs": [{"preferred_username": "my-org"}]}
    assert space.hub_identity(userinfo) == ("dave", ("my-org",))
    assert space.hub_identity({"name": "erin", "orgs": [{"name": "x"}], "type": "user"}) == ("erin", ("x",))
    assert space.hub_identity({}) == (None, ())


def test_zero_gpu_refuses_training_with_the_reason(monkeypatch, workspace):
    from pipelines.training import TrainConfig, validate

    assert space.training_refusal({}) is None
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    why = space.training_refusal()
    assert "ZeroGPU" in why and "paid GPU" in why
    with pytest.raises(BadInput, match="not available on ZeroGPU"):  # the Train tab, its API and the CLI
        validate(TrainConfig(base_model="default", dataset="x"), workspace)


# ----------------------------------------------------------------------------------------- confined workspace


@pytest.fixture
def confined(tmp_path):
    return Workspace.open(tmp_path / "ws", confined=True)


def test_check_path_confines_to_the_workspace_and_the_hf_cache(confined, tmp_path):
    from pipelines.workspace import hf_cache

    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    assert Workspace.open(tmp_path / "ws").check_path(outside) == outside  # unconfined: as typed
    for bad in (str(outside), "/etc/passwd", "../secret.txt", "models/../../secret.txt", "~/x"):
        with pytest.raises(BadInput, match="outside the workspace"):
            confined.check_path(bad)
    assert confined.check_path("models/m") == confined.models / "m"
    assert confined.check_path(str(confined.exports / "e")) == confined.exports / "e"
    assert confined.check_path(str(hf_cache() / "models--a--b")) == hf_cache() / "models--a--b"
    link = confined.models / "link"  # a link inside pointing outside is outside
    link.symlink_to(tmp_path)
    with pytest.raises(BadInput):
        confined.check_path(str(link / "secret.txt"))
    assert confined == Workspace.open(tmp_path / "ws")  # the same workspace, only stricter


def test_model_paths_are_confined(confined, tmp_path, tiny_llama_dir):
    from pipelines import models

    outside = tmp_path / "outside-model"
    shutil.copytree(tiny_llama_dir, outside)
    assert models.resolve_source(str(outside), Workspace.open(confined.root)) == outside.resolve()
    for typed in (str(outside), str(tmp_path / "nothing-here"), "../outside-model", "~"):
        with pytest.raises(BadInput, match="outside the workspace"):  # the same answer, there or not
            models.resolve_source(typed, confined)
    inside = confined.models / "tiny"
    shutil.copytree(tiny_llama_dir, inside)
    assert models.resolve_source("tiny", confined) == inside
    assert models.resolve_source(str(inside), confined) == inside
    assert models.resolve_source("models/tiny", confined) == inside
    with pytest.raises(NotFound):
        models.resolve_source(str(confined.models / "nope"), confined)
    with pytest.raises(NotFound):  # a folder of the process's working directory is not looked at
        models.resolve_source("pipelines", confined)
    from pipelines import data
    from pipelines.training import TrainConfig, validate  # the Train tab's base model goes through it too

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    data.save_dataset(confined, "chat", rows, {"source": "test"}, val_ratio=0.0)
    with pytest.raises(BadInput, match="outside the workspace"):
        validate(TrainConfig(base_model=str(outside), dataset="chat"), confined)
    assert validate(TrainConfig(base_model="tiny", dataset="chat", max_length=64), confined).base_model == str(inside)


def test_export_rag_and_adapter_paths_are_confined(confined, tmp_path, tiny_llama_dir):
    from pipelines import adapters, rag
    from pipelines.export import ExportRequest, plan_export
    from pipelines.export import job as export_job
    from pipelines.serving.registry import ModelRegistry

    outside = tmp_path / "outside-model"
    shutil.copytree(tiny_llama_dir, outside)
    with pytest.raises(BadInput, match="outside the workspace"):
        plan_export(confined, ExportRequest(source=str(outside), outtypes=["f16"]))
    with pytest.raises(BadInput, match="outside the workspace"):
        plan_export(confined, ExportRequest(source=str(confined.runs / "r"), base_model=str(outside),
                                            outtypes=["f16"]))
    for step, args in (("convert", {"hf_dir": str(outside)}), ("merge", {"source": str(outside)}),
                       ("validate", {"gguf": "/etc/passwd"}), ("run", {"source": "/etc", "outtypes": ["f16"]}),
                       ("merge", {"source": "x", "base_model": str(outside)})):
        with pytest.raises((BadInput, NotFound)) as e:
            export_job.start(confined, step, args)
        assert "outside the workspace" in str(e.value) or "Nothing at" in str(e.value), (step, e.value)
    assert not (confined.exports / ".jobs").exists() or not any((confined.exports / ".jobs").iterdir())
    with pytest.raises(BadInput, match="outside the workspace"):
        rag.create(confined, "kb", str(outside))
    with pytest.raises(BadInput, match="outside the workspace"):
        adapters.open_adapter(confined, ModelRegistry(), str(outside))


def test_unconfined_paths_are_unchanged(workspace, tmp_path, tiny_llama_dir):
    from pipelines import models

    assert not workspace.confined
    assert models.resolve_source(str(tiny_llama_dir), workspace) == Path(tiny_llama_dir).resolve()
    assert os.fspath(workspace.check_path("~/x")) == os.path.expanduser("~/x")
