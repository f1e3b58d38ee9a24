"""pipelines/serving/mlx.py on the tiny llama: an HF folder answered by mlx-lm gives the HF backend's greedy answer
token for token, with a PEFT adapter (the torch-made one of the chat tests, and one the MLX trainer made) on and off
per answer; seeds, stopping and stop strings behave as on the other backends; which backend a load picks (MLX only
when asked, here on Linux) and what it refuses."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_chat import GREEDY, HELLO, collect, one_line_error
from tiny_models import make_adapter

from pipelines import chat, models
from pipelines.chat import ChatParams, stream_chat
from pipelines.errors import BadInput, NotFound
from pipelines.serving import mlx as mlx_serving

pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def mlx_lm(tiny_llama_dir):
    lm = mlx_serving.load_mlx(tiny_llama_dir)
    yield lm
    lm.backend.close()


def load_hf_float32(path):
    """The HF backend's model in float32, as MLX computes on a CPU (this CPU would infer in bf16)."""
    import torch

    lm = models.load_hf(path)
    lm.backend.model.to(torch.float32)
    return lm


@pytest.fixture(scope="module")
def torch_lm(tiny_llama_dir):
    return load_hf_float32(tiny_llama_dir)


def test_greedy_answer_equals_the_hf_backends(mlx_lm, torch_lm):
    params = ChatParams(max_new_tokens=24, **GREEDY)
    text, chunks = collect(stream_chat(mlx_lm, HELLO, params))
    want = chat.chat(torch_lm, HELLO, params)
    assert text == want.text and text
    last = chunks[-1]
    assert (last.n_tokens, last.finish_reason) == (want.n_tokens, want.finish_reason)
    assert last.prompt_tokens == want.prompt_tokens  # the same template, tokenizer and BOS rule
    assert mlx_lm.backend_kind == "mlx" and mlx_lm.describe()["compute"] == "MLX on the CPU"
    counts = [c.n_tokens for c in chunks]
    assert counts == sorted(counts) and all(c.text for c in chunks[:-1]) and last.tokens_per_s > 0


def test_seed_temperature_and_penalty(mlx_lm):
    def answer(seed, top_k=0, **kw):
        return chat.chat(mlx_lm, HELLO, ChatParams(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, seed=seed,
                                                   max_new_tokens=16, repetition_penalty=1.0, **kw)).text

    a = answer(7)
    assert answer(7) == a and answer(8) != a
    assert answer(7, top_k=1) == chat.chat(mlx_lm, HELLO, ChatParams(max_new_tokens=16, **GREEDY)).text

def test_penalties_as_on_the_hf_backend(mlx_lm, torch_lm):
    """The penalties work as llama.cpp's on every backend (answer tokens only, the last 64): with them on, the MLX
    and the HF backends still give the same greedy answer - and a different one from without them."""
    plain = chat.chat(mlx_lm, HELLO, ChatParams(max_new_tokens=40, **GREEDY)).text
    penalized = ChatParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.5,
                           presence_penalty=0.3)
    mine = chat.chat(mlx_lm, HELLO, penalized).text
    assert mine != plain and mine == chat.chat(torch_lm, HELLO, penalized).text


def test_stops_and_stop_strings(mlx_lm):
    full = chat.chat(mlx_lm, HELLO, ChatParams(max_new_tokens=40, **GREEDY))
    ev, chunks = threading.Event(), []
    for c in stream_chat(mlx_lm, HELLO, ChatParams(max_new_tokens=40, **GREEDY), stop=ev):
        chunks.append(c)
        if len(chunks) == 2:
            ev.set()
    assert chunks[-1].finish_reason == "stopped" and full.text.startswith("".join(c.text for c in chunks))
    assert chat.model_lock(mlx_lm).acquire(timeout=5)  # the generation thread let go of the model
    chat.model_lock(mlx_lm).release()
    needle = next(full.text[i:i + 2] for i in range(3, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2])
    text, chunks = collect(stream_chat(mlx_lm, HELLO, ChatParams(max_new_tokens=40, stop=[needle], **GREEDY)))
    assert text == full.text[:full.text.find(needle)] and chunks[-1].finish_reason == "stop"


def test_adapters_switched_per_answer_like_peft(tiny_llama_dir, torch_lm, tmp_path):
    """A torch-made PEFT adapter and an MLX-trained one (DoRA), each attached to the MLX model and to the HF model:
    the same greedy answers, and the base again with adapter None."""
    from test_train import tiny_cfg, write_dataset

    from pipelines.training import run_training
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    write_dataset(ws)
    run_training(tiny_cfg(tiny_llama_dir, backend="mlx", method="dora", max_steps=4, learning_rate=2e-2),
                 ws.runs / "d", None, ws=ws, log=lambda m: None)
    adapters = {"peft": make_adapter(tiny_llama_dir, tmp_path / "lora-a"), "dora": ws.runs / "d" / "adapter"}
    lm = mlx_serving.load_mlx(tiny_llama_dir)
    theirs = load_hf_float32(tiny_llama_dir)
    params = ChatParams(max_new_tokens=12, **GREEDY)
    base = chat.chat(lm, HELLO, params).text
    for name, folder in adapters.items():
        info = chat.attach_adapter(lm, folder, name)
        chat.attach_adapter(theirs, folder, name)
        assert info.rank in (4, 16)
    for name in adapters:
        mine = chat.chat(lm, HELLO, ChatParams(adapter=name, max_new_tokens=12, **GREEDY)).text
        assert mine == chat.chat(theirs, HELLO, ChatParams(adapter=name, max_new_tokens=12, **GREEDY)).text
        assert mine != base, name
    assert chat.chat(lm, HELLO, params).text == base
    with pytest.raises(NotFound):
        chat.chat(lm, HELLO, ChatParams(adapter="nope"))
    chat.detach_adapter(lm, "peft")
    assert [a.name for a in chat.list_adapters(lm)] == ["dora"] and chat.chat(lm, HELLO, params).text == base
    wrong = make_adapter(tiny_llama_dir, tmp_path / "wide", config_overrides={"hidden_size": 48})
    with pytest.raises(BadInput) as e:
        chat.attach_adapter(lm, wrong, "w")
    one_line_error(e, BadInput, "another base model", "q_proj")
    lm.backend.close()


def test_which_backend_answers_an_hf_folder(tiny_llama_dir, registry, monkeypatch, model_variants, tmp_path):
    assert mlx_serving.choose(tiny_llama_dir) == "torch"  # Linux: MLX only when asked
    assert mlx_serving.choose(tiny_llama_dir, "mlx") == "mlx"
    monkeypatch.setenv(mlx_serving.ENV, "mlx")
    assert mlx_serving.choose(tiny_llama_dir) == "mlx"
    lm = registry.load(str(tiny_llama_dir), name="tiny")
    assert lm.backend_kind == "mlx" and lm.describe()["backend"] == "mlx"
    monkeypatch.setenv(mlx_serving.ENV, "jax")
    with pytest.raises(BadInput) as e:
        mlx_serving.choose(tiny_llama_dir)
    one_line_error(e, BadInput, "MACTUNER_CHAT_BACKEND", "auto, torch or mlx")
    monkeypatch.delenv(mlx_serving.ENV)
    from pipelines import backend as backendmod

    monkeypatch.setattr(backendmod, "apple_silicon", lambda: True)  # a Mac: auto takes MLX where mlx-lm can
    assert mlx_serving.choose(tiny_llama_dir) == "mlx"
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "b")
    assert mlx_serving.choose(tmp_path / "b") == "torch"  # an architecture mlx-lm lacks stays on torch
    with pytest.raises(BadInput) as e:
        mlx_serving.load_mlx(Path(tmp_path / "b"))
    one_line_error(e, BadInput, "mlx-lm has no 'bloom'", "torch")
