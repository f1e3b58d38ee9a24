"""pipelines/models.py with real local files: loading tiny HF folders and a tiny GGUF through the registry, the list
of local models, source resolution, and the error each bad input must give (a MacTunerError, no traceback)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import psutil
import pytest
from huggingface_hub.errors import HFValidationError

from pipelines import models
from pipelines.errors import BadInput, Conflict, MacTunerError, NotFound
from pipelines.models import DEFAULT_NAME, list_local_models, resolve_source
from pipelines.serving.registry import ModelRegistry

# The tiny llama: vocab 300, hidden 32, 2 layers, q/o 32x32, k/v 32x16, gate/up/down 32x64, untied lm_head.
TINY_LLAMA_PARAMS = 300 * 32 * 2 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3 + 32 * 2) + 32
assert TINY_LLAMA_PARAMS == 37_792


def assert_user_error(excinfo, cls=BadInput, *needles: str) -> str:
    """The error is exactly `cls`, reads as one plain line containing `needles`, and chains no traceback."""
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg == err.message and msg.strip()
    assert "Traceback" not in msg and 'File "' not in msg and "\n" not in msg.strip(), msg
    # a traceback printed for it would show no chained exception (raised fresh, or `raise ... from None`)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(err.__context__)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------ HF folder


def test_load_tiny_llama_folder(registry, tiny_llama_dir):
    lm = registry.load(str(tiny_llama_dir))
    assert registry.current() is lm and registry.names() == ["tiny-llama"]
    assert lm.name == "tiny-llama" and lm.model_path == str(tiny_llama_dir.resolve())
    assert lm.backend_kind == "transformers" and lm.format == "hf-safetensors"
    assert lm.architecture == "LlamaForCausalLM"
    assert lm.chat_template is True
    assert lm.context_length == 128
    assert lm.n_params == sum(p.numel() for p in lm.backend.model.parameters()) == TINY_LLAMA_PARAMS
    elem = next(lm.backend.model.parameters()).element_size()
    assert lm.dtype in ("float32", "bfloat16", "float16") and elem == {"float32": 4}.get(lm.dtype, 2)
    assert lm.memory_bytes >= TINY_LLAMA_PARAMS * elem > 0
    assert lm.device == models.devicemod.profile().kind
    assert lm.details == {"model_type": "llama", "hidden_size": 32, "layers": 2, "vocab_size": 300}
    assert lm.load_seconds >= 0 and lm.loaded_at > 0
    d = lm.describe()
    assert "model" not in d and "tokenizer" not in d and d["backend"] == "transformers" and d["memory"].endswith(("KB", "MB"))
    assert "path" not in d  # gradio_client would take a dict with a "path" key for a file to download


def test_describe_never_copies_the_model(registry, tiny_gguf, monkeypatch):
    """describe() runs on every poll of the Model tab and /api/model/current: a deep copy of the Llama object would
    load the whole GGUF again each time (its __setstate__ re-initialises it)."""
    lm = registry.load(str(tiny_gguf))
    for obj in (lm.backend, lm.backend.worker, lm.backend.worker.vocab):
        monkeypatch.setattr(type(obj), "__deepcopy__", lambda *_a: pytest.fail("describe() copied the model"),
                            raising=False)
        monkeypatch.setattr(type(obj), "__reduce_ex__", lambda *_a: pytest.fail("describe() copied the model"))
    d = lm.describe()
    assert d["backend"] == "llama.cpp" and d["details"] == lm.details and d["details"] is not lm.details


def test_loaded_tiny_llama_generates(registry, tiny_llama_dir):
    import torch

    lm = registry.load(str(tiny_llama_dir))
    tok, model = lm.backend.tokenizer, lm.backend.model
    enc = tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    prompt = enc["input_ids"]
    assert prompt[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(**enc.to(model.device), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[0, prompt.shape[1]:]
    assert new.numel() == 5 and int(new.max()) < 300
    assert isinstance(tok.decode(new), str)


def test_unload_releases_the_model(registry, tiny_llama_dir):
    lm = registry.load(str(tiny_llama_dir))
    report = registry.unload()
    assert report["unloaded"] == "tiny-llama"
    assert report["rss_before"] > 0 and report["rss_after"] > 0 and report["released"] >= 0
    assert registry.current() is None and registry.names() == []
    assert lm.backend is None  # the registry dropped its references
    with pytest.raises(NotFound) as e:
        registry.unload()
    assert_user_error(e, NotFound, "no model is loaded")
    with pytest.raises(NotFound):
        registry.unload("tiny-llama")


def test_loading_a_second_model_replaces_the_first(registry, tiny_llama_dir, model_variants):
    first = registry.load(str(tiny_llama_dir))
    second = registry.load(str(model_variants.pickle_only()))
    assert registry.current() is second and registry.names() == ["tiny-llama-pickle"]
    assert first.backend is None
    assert registry.get("tiny-llama") is None


def test_reloading_the_same_model_keeps_one_entry(registry, tiny_llama_dir):
    first = registry.load(str(tiny_llama_dir))
    second = registry.load(str(tiny_llama_dir))
    assert second is not first and registry.current() is second
    assert registry.names() == ["tiny-llama"] and first.backend is None


def test_load_with_explicit_name_and_progress(registry, tiny_llama_dir):
    seen = []
    lm = registry.load(str(tiny_llama_dir), name="my tiny", progress=lambda f, m: seen.append((f, m)))
    assert lm.name == "my tiny" and registry.current().name == "my tiny"
    assert seen[0][0] == 0.1 and seen[-1] == (1.0, "Loaded my tiny")


def test_pickle_only_folder_loads_with_weights_only(registry, model_variants, capfd):
    lm = registry.load(str(model_variants.pickle_only()))
    assert lm.format == "hf-pickle (weights only)"
    assert lm.n_params == TINY_LLAMA_PARAMS and lm.architecture == "LlamaForCausalLM"


def test_malicious_pickle_is_refused_and_never_run(registry, model_variants, capfd):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.malicious_pickle()))
    assert_user_error(e, BadInput, "pytorch_model.bin", "could run code", "safetensors")
    out, err = capfd.readouterr()
    assert model_variants.MALICIOUS_MARKER not in out + err
    assert registry.current() is None and registry.loading is None


# ---------------------------------------------------------------------------------------------------- GGUF


def test_tiny_gguf_runs_in_llama_cpp_directly(tiny_gguf):
    from pipelines.serving.llamacpp import open_llama

    llm = open_llama(tiny_gguf, n_ctx=256, n_threads=1)
    try:
        assert llm.n_vocab() == 304 and llm.token_bos() == 1 and llm.token_eos() == 2
        assert llm.metadata["general.architecture"] == "llama" and llm.metadata["llama.block_count"] == "2"
        out = llm.create_completion("hello world", max_tokens=6, temperature=0.0)
        assert out["usage"]["prompt_tokens"] > 0 and 1 <= out["usage"]["completion_tokens"] <= 6
        assert isinstance(out["choices"][0]["text"], str)
    finally:
        llm.close()


def test_load_tiny_gguf(registry, tiny_gguf):
    import gguf

    lm = registry.load(str(tiny_gguf))
    assert lm.backend_kind == "llama.cpp" and lm.format == "gguf"
    assert lm.name == "tiny-llama-gguf"  # general.name
    assert lm.architecture == "llama" and lm.dtype == "F32"
    assert lm.model_path == str(tiny_gguf.resolve())
    assert lm.context_length == 4096 and lm.details["n_ctx"] == 4096
    expected = sum(int(t.n_elements) for t in gguf.GGUFReader(tiny_gguf).tensors)
    assert lm.n_params == expected == 304 * 32 * 2 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3 + 32 * 2) + 32
    assert lm.memory_bytes >= tiny_gguf.stat().st_size
    assert lm.chat_template is True  # tokenizer.chat_template in the metadata
    ids = lm.backend.worker.tokenize(b"hello world", add_bos=True)
    out = list(lm.backend.worker.generate(ids, max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                 repeat_penalty=1.0, seed=0))
    assert out[-1][0] == "end" and 1 <= out[-1][2] <= 4
    shape = models.shape_of(lm)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size, shape.num_kv_heads) == (32, 2, 304, 2)
    worker = psutil.Process(lm.describe()["worker"]["pid"])  # the weights live in the worker process...
    assert worker.is_running() and worker.pid != os.getpid()
    registry.unload()
    assert registry.current() is None and lm.backend is None
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE  # ...and go with it


def test_gguf_replaces_hf_model(registry, tiny_llama_dir, tiny_gguf):
    hf = registry.load(str(tiny_llama_dir))
    g = registry.load(str(tiny_gguf))
    assert registry.names() == [g.name] and hf.backend is None


def test_text_file_renamed_gguf_is_refused(registry, model_variants):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.fake_gguf()))
    assert_user_error(e, BadInput, "model.gguf", "not a GGUF")


@pytest.mark.parametrize("fraction", [0.5, 0.05])
def test_truncated_gguf_is_refused_by_llama_cpp(registry, model_variants, fraction):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.truncated_gguf(fraction)))
    assert_user_error(e, BadInput, "llama.cpp could not load", "truncated.gguf")
    assert registry.current() is None


def test_gguf_with_unsupported_version_is_refused(registry, tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes()[:4096])
    data[4:8] = (7).to_bytes(4, "little")
    bad = tmp_path / "future.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(BadInput) as e:
        registry.load(str(bad))
    assert_user_error(e, BadInput, "version 7")


# ---------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("source", ["", "   ", "''"])
def test_empty_source(registry, workspace, source):
    with pytest.raises(BadInput) as e:
        registry.load(source, workspace)
    assert_user_error(e, BadInput, "enter a model folder")


def test_missing_absolute_path(registry, workspace, tmp_path):
    missing = tmp_path / "elsewhere" / "no-such-model"
    with pytest.raises(NotFound) as e:
        registry.load(str(missing), workspace)
    assert_user_error(e, NotFound, "no such file or folder", str(missing))


def test_missing_relative_name(registry, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFound) as e:
        registry.load("no-such-model", workspace)
    assert_user_error(e, NotFound, "no-such-model")


def test_hub_id_not_downloaded(registry, workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFound) as e:
        registry.load("some-org/some-model", workspace)
    assert_user_error(e, NotFound, "not downloaded yet")


@pytest.mark.parametrize("source", ["../secret", "./not-here"])
def test_relative_path_that_is_not_a_hub_id(registry, workspace, tmp_path, monkeypatch, source):
    (workspace.root / "secret").mkdir()  # outside models/: must not be found through models/../secret
    monkeypatch.chdir(tmp_path)
    try:
        registry.load(source, workspace)
    except MacTunerError as err:
        assert type(err) in (NotFound, BadInput)
        assert "\n" not in str(err)
    else:
        pytest.fail("loaded something outside the workspace's models/")


def test_folder_without_config(registry, model_variants):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.no_config()))
    assert_user_error(e, BadInput, "no config.json")


@pytest.mark.parametrize("mode", ["truncated", "garbage", "bad-header"])
def test_corrupt_safetensors(registry, model_variants, mode):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.corrupt_safetensors(mode)))
    assert_user_error(e, BadInput, "model.safetensors", "not a valid safetensors file")


def test_non_causal_model_names_its_architecture(registry, model_variants):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.non_causal()))
    assert_user_error(e, BadInput, "BertForMaskedLM", "not a causal language model")


def test_remote_code_needs_trust(registry, model_variants):
    with pytest.raises(BadInput) as e:
        registry.load(str(model_variants.remote_code()))
    assert_user_error(e, BadInput, "trust remote code", "auto_map")
    assert not model_variants.remote_code_ran()


def test_config_that_is_not_json(registry, tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad-config"
    shutil.copytree(tiny_llama_dir, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(BadInput) as e:
        registry.load(str(bad))
    assert_user_error(e, BadInput, "config.json", "not valid JSON")


def test_config_without_weights(registry, tmp_path, tiny_llama_dir):
    bare = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(BadInput) as e:
        registry.load(str(bare))
    assert_user_error(e, BadInput, "no weights")


def test_failed_load_leaves_the_current_model(registry, tiny_llama_dir, model_variants):
    lm = registry.load(str(tiny_llama_dir))
    with pytest.raises(BadInput):
        registry.load(str(model_variants.no_config()))
    assert registry.current() is lm and lm.backend is not None and registry.loading is None


# ------------------------------------------------------------------------------------- workspace & listing


def test_resolve_source_relative_to_workspace_models(workspace, tiny_llama_dir, tmp_path, monkeypatch):
    target = workspace.models / "team" / "tiny-llama"
    shutil.copytree(tiny_llama_dir, target)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("team/tiny-llama", workspace) == target
    assert resolve_source(" 'team/tiny-llama' ", workspace) == target
    assert resolve_source(str(tiny_llama_dir)) == tiny_llama_dir.resolve()


def test_load_by_name_under_workspace_models(registry, workspace, tiny_llama_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_llama_dir, workspace.models / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    lm = registry.load("tiny-llama", workspace)
    assert lm.model_path == str(workspace.models / "tiny-llama") and lm.backend_kind == "transformers"


def test_list_local_models(workspace, tiny_llama_dir, tiny_gguf, model_variants):
    shutil.copytree(tiny_llama_dir, workspace.models / "tiny-llama")
    shutil.copytree(model_variants.pickle_only(), workspace.models / "org" / "tiny-pickle")
    shutil.copy(tiny_gguf, workspace.models / "tiny.gguf")
    shutil.copytree(tiny_llama_dir, workspace.models / ".partial-download")  # hidden: skipped
    (workspace.models / "notes").mkdir()  # not a model: skipped
    rows = list_local_models(workspace)
    default = rows[0]
    assert default["name"] == DEFAULT_NAME and default["source"] == "embedded"
    assert default["format"] == "gguf (Q4_K_M)" and default["status"] == "assembled on first use"
    assert default["size"] is None
    by_name = {r["name"]: r for r in rows[1:]}
    assert set(by_name) == {"tiny-llama", "org/tiny-pickle", "tiny.gguf"}
    llama = by_name["tiny-llama"]
    assert llama["format"] == "hf-safetensors" and llama["source"] == "workspace" and llama["status"] == "ready"
    assert llama["path"] == str(workspace.models / "tiny-llama")
    assert llama["size"] > (tiny_llama_dir / "model.safetensors").stat().st_size
    assert by_name["org/tiny-pickle"]["format"] == "hf-pickle"
    assert by_name["tiny.gguf"]["format"] == "gguf" and by_name["tiny.gguf"]["size"] == tiny_gguf.stat().st_size


def test_list_local_models_of_an_empty_workspace(workspace):
    rows = list_local_models(workspace)
    assert [r["name"] for r in rows] == [DEFAULT_NAME]


# ---------------------------------------------------------------------------------------------- concurrency


def test_second_load_while_loading_is_a_conflict(registry, tiny_llama_dir, tiny_gguf, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_load_hf = models.load_hf

    def slow_load_hf(*args, **kwargs):
        started.set()
        assert release.wait(30), "test never released the first load"
        return real_load_hf(*args, **kwargs)

    monkeypatch.setattr(models, "load_hf", slow_load_hf)
    result: dict = {}

    def first():
        try:
            result["lm"] = registry.load(str(tiny_llama_dir))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=first, daemon=True)
    t.start()
    try:
        assert started.wait(30)
        assert registry.loading == "tiny-llama"
        with pytest.raises(Conflict) as e:
            registry.load(str(tiny_gguf))
        assert_user_error(e, Conflict, "tiny-llama", "being loaded")
        assert e.value.status == 409
    finally:
        release.set()
        t.join(60)
    assert "error" not in result, result.get("error")
    assert registry.current() is result["lm"] and registry.loading is None
    # the lock is free again: a later load goes through
    assert registry.load(str(tiny_gguf)).backend_kind == "llama.cpp"


# ------------------------------------------------------------------------------------ HF cache & isolation


def _fake_cached_snapshot(repo_id: str, files_from, sha: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out a model the way huggingface_hub's cache does: blobs/, snapshots/<sha>/ links, refs/main."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(files_from.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snap


def test_downloaded_hub_model_is_listed_and_resolved(registry, workspace, tiny_llama_dir, tmp_path, monkeypatch):
    snap = _fake_cached_snapshot("org/tiny-llama", tiny_llama_dir)
    rows = list_local_models(workspace)
    cached = [r for r in rows if r["source"] == "hf-cache"]
    assert [(r["name"], r["format"], r["path"]) for r in cached] == [("org/tiny-llama", "hf-safetensors", str(snap))]
    monkeypatch.chdir(tmp_path)
    assert resolve_source("org/tiny-llama", workspace) == snap
    lm = registry.load("org/tiny-llama", workspace)
    assert lm.name == snap.name and lm.architecture == "LlamaForCausalLM"
    assert list_local_models(workspace, include_cache=False)[1:] == []


def test_tests_never_touch_the_real_homes():
    from huggingface_hub import constants, get_token

    from pipelines.workspace import default_root

    real_hf, real_mt = Path.home() / ".cache" / "huggingface", Path.home() / ".mactuner"
    for p in (constants.HF_HOME, constants.HF_HUB_CACHE, constants.HF_TOKEN_PATH, os.environ["HF_HOME"]):
        assert not Path(p).resolve().is_relative_to(real_hf.resolve()), p
    assert default_root() != real_mt and not default_root().is_relative_to(real_mt)
    assert get_token() is None and "HF_TOKEN" not in os.environ
    assert constants.is_offline_mode()


def test_a_test_can_go_online_with_delenv(monkeypatch):
    from huggingface_hub import constants

    assert constants.is_offline_mode()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not constants.is_offline_mode()


def test_downloaded_gguf_repo_loads_by_its_id(registry, workspace, tiny_gguf, tmp_path, monkeypatch):
    src = tmp_path / "repo"
    src.mkdir()
    shutil.copy(tiny_gguf, src / "tiny-llama-F32.gguf")
    (src / "README.md").write_text("# tiny gguf\n")
    snap = _fake_cached_snapshot("org/tiny-gguf", src)
    row = next(r for r in list_local_models(workspace) if r["source"] == "hf-cache")
    assert (row["name"], row["format"], row["path"]) == ("org/tiny-gguf", "gguf", str(snap))
    monkeypatch.chdir(tmp_path)
    lm = registry.load("org/tiny-gguf", workspace)
    assert lm.backend_kind == "llama.cpp"
