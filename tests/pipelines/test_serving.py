"""Serving: GGUF models answer from worker processes that survive native crashes, with the llama.cpp settings this
CPU needs. The first test is the canary: the embedded default model (a quantized GGUF, the kind llama.cpp's AMX
kernel takes) loads and generates in a child process, so a machine with a broken kernel gets one clear failure
naming its CPU's features instead of a dead test run."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pipelines import device as devicemod
from pipelines.errors import BadInput
from pipelines.serving import client as clientmod
from pipelines.serving import llamacpp
from pipelines.serving.client import GGUFWorker, ModelCrashed

GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=0)
STORY = b"<start_of_turn>user\nTell me a long story about a dragon.<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory) -> Path:
    from pipelines import models
    from pipelines.workspace import Workspace

    return models.ensure_default_gguf(Workspace.open(tmp_path_factory.mktemp("serving") / "ws"))


@pytest.fixture
def gemma(default_gguf):
    w = GGUFWorker(default_gguf, n_ctx=1024)
    yield w
    w.close()


def answer(w: GGUFWorker, ids, max_tokens=12, **kw):
    """(text, the "end" item); notes (a restart on the way) are left out."""
    items = list(w.generate(ids, max_tokens=max_tokens, **{**GREEDY, **kw}))
    assert items[-1][0] == "end", items[-1]
    return "".join(i[1] for i in items if i[0] == "text"), items[-1]


def crash_mid_answer(w: GGUFWorker, sig: int) -> ModelCrashed:
    """Start a long answer, send `sig` to the worker once its first text arrived, return the error raised."""
    gen = w.generate(w.tokenize(STORY, add_bos=True, special=True), max_tokens=600, **GREEDY)
    first = next(gen)
    assert first[0] == "text"
    os.kill(w.pid, sig)
    with pytest.raises(ModelCrashed) as e:
        for _ in gen:
            pass
    return e.value


def test_canary_the_default_model_generates_in_a_child_process_on_this_cpu(default_gguf):
    w = GGUFWorker(default_gguf, n_ctx=512)
    try:
        text, end = answer(w, w.tokenize(STORY, add_bos=True, special=True), max_tokens=2)
        crashed = list(w.crashes)
    except ModelCrashed as e:
        text, end, crashed = "", None, [str(e)]
    finally:
        w.close()
    assert not crashed, ("llama.cpp crashed generating one token on this machine: " + str(crashed) + ". "
                         + llamacpp.describe() + f". CPU flags: {sorted(devicemod.cpu_flags())}")
    assert end[2] >= 1


def test_settings_follow_the_cpu_and_the_build():
    amx = {"amx_int8", "amx_tile", "avx512_bf16"}
    assert llamacpp.choose(amx, {"AMX_INT8": "1"}, {}).extra_bufts is False
    assert llamacpp.choose(amx, {"AVX512": "1"}, {}).extra_bufts is True  # built without AMX: keep the repack
    assert llamacpp.choose({"avx2"}, {"AMX_INT8": "1"}, {}).extra_bufts is True
    assert llamacpp.choose({"avx2"}, {}, {llamacpp.ENV: "off"}).extra_bufts is False
    assert llamacpp.choose(amx, {"AMX_INT8": "1"}, {llamacpp.ENV: "on"}).extra_bufts is True
    assert "crashes" in llamacpp.choose(amx, {"AMX_INT8": "1"}, {}).reason
    line = llamacpp.describe()
    assert "llama.cpp built with" in line and "extra buffer types" in line


def test_the_settings_reach_llama_cpp():
    lib = llamacpp.llama_cpp_module().llama_cpp
    assert lib.llama_model_default_params().use_extra_bufts is True
    with llamacpp.model_params(llamacpp.LlamaSettings(False, "test")):
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"), reason="x86 gcc")
def test_setup_builds_llama_cpp_without_amx_kernels_on_an_amx_cpu():
    """setup.sh passes AMX_OFF_CFLAGS where the CPU has AMX; with -march=native on such a CPU (here: a Sapphire
    Rapids target) they leave none of the AMX macros llama.cpp's AMX kernels are compiled under."""
    setup = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text()
    assert llamacpp.AMX_OFF_CFLAGS in setup
    macros = subprocess.run(["gcc", "-march=sapphirerapids", *llamacpp.AMX_OFF_CFLAGS.split(), "-dM", "-E", "-"],
                            input="", capture_output=True, text=True, check=True).stdout
    assert "__AVX512VNNI__" in macros and "__AMX_INT8__" not in macros and "__AMX_TILE__" not in macros
    plain = subprocess.run(["gcc", "-march=sapphirerapids", "-dM", "-E", "-"], input="", capture_output=True,
                           text=True, check=True).stdout
    assert "__AMX_INT8__" in plain  # (the check can fail)


# ---------------------------------------------------------------------------------------------- crashes


def test_a_native_crash_mid_answer_is_reported_and_the_next_answer_comes(gemma):
    ids = gemma.tokenize(b"Hello", add_bos=True)
    before = answer(gemma, ids)
    pid = gemma.pid
    err = crash_mid_answer(gemma, signal.SIGSEGV)
    assert "crashed: signal 11 (SIGSEGV)" in err.message and "send your message again" in err.message
    after = answer(gemma, ids)  # restarted, and answering
    if "extra buffer types off" in err.message:  # they were on: the restart turned them off (other kernels, so
        assert gemma.settings == llamacpp.SAFE    # the greedy answer may differ in a token)
        assert after[1][2] == before[1][2] == 12
    else:
        assert after == before
    assert gemma.pid != pid and gemma.state == "ready"
    assert gemma.crashes[-1]["how"] == "signal 11 (SIGSEGV)"


def test_kill_9_mid_answer_then_answered_with_the_same_settings(gemma):
    settings = gemma.settings
    err = crash_mid_answer(gemma, signal.SIGKILL)
    assert "signal 9 (SIGKILL)" in err.message
    ids = gemma.tokenize(b"Hello", add_bos=True)
    assert answer(gemma, ids)[1][2] >= 1
    assert gemma.settings == settings  # a kill is not a native crash: nothing to turn off


def test_a_worker_killed_while_idle_is_back_for_the_next_answer(gemma):
    ids = gemma.tokenize(b"Hello", add_bos=True)
    expected = answer(gemma, ids)
    os.kill(gemma.pid, signal.SIGKILL)
    items = list(gemma.generate(ids, max_tokens=12, **GREEDY))  # answered: sent before or after the restart
    assert "".join(i[1] for i in items if i[0] == "text") == expected[0]
    notes = [i[1] for i in items if i[0] == "note"]
    assert not notes or "signal 9 (SIGKILL)" in notes[0] and "answered after the reload" in notes[0]
    assert gemma.crashes[-1]["how"] == "signal 9 (SIGKILL)"


def test_a_worker_that_keeps_crashing_is_given_up_clearly(gemma, monkeypatch):
    monkeypatch.setattr(clientmod, "MAX_RESTARTS", 1)
    ids = gemma.tokenize(b"Hello", add_bos=True)
    for _ in range(2):
        answer(gemma, ids)
        os.kill(gemma.pid, signal.SIGKILL)
        t0 = time.time()
        while gemma.state == "ready" and time.time() - t0 < 10:
            time.sleep(0.05)
    with pytest.raises(ModelCrashed) as e:
        answer(gemma, ids)
    assert "keeps crashing" in e.value.message and "signal 9" in e.value.message


def test_stop_mid_answer_leaves_the_worker_ready(gemma):
    ids = gemma.tokenize(STORY, add_bos=True, special=True)
    seen = []
    items = list(gemma.generate(ids, max_tokens=400, **GREEDY, halted=lambda: len(seen) > 2 or seen.append(1)))
    assert items[-1][0] == "end" and items[-1][1] == "stopped" and items[-1][2] < 400
    gen = gemma.generate(ids, max_tokens=400, **GREEDY)
    next(gen)
    gen.close()  # leaving early stops the worker too, and the connection is clean for the next request
    assert answer(gemma, gemma.tokenize(b"Hello", add_bos=True))[1][2] >= 1


# --------------------------------------------------------------------------------------------- the model


def test_the_weights_live_in_the_worker_only(default_gguf):
    me = psutil.Process()
    before = me.memory_info().rss
    w = GGUFWorker(default_gguf, n_ctx=512)
    try:
        answer(w, w.tokenize(b"Hello", add_bos=True), max_tokens=2)
        studio_grew = me.memory_info().rss - before
        worker_rss = psutil.Process(w.pid).memory_info().rss
        size = default_gguf.stat().st_size
        assert worker_rss > size * 0.8  # the weights are there...
        assert studio_grew < size * 0.5  # ...and not here: the vocabulary only
    finally:
        pid = w.pid
        w.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_file_llama_cpp_refuses_is_a_clear_error_and_leaves_no_process(tmp_path, tiny_gguf):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    kids = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(BadInput) as e:
        GGUFWorker(bad, n_ctx=128, threads=1)
    assert "llama.cpp could not load cut.gguf" in e.value.message and "\n" not in e.value.message
    time.sleep(0.2)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in kids and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left
