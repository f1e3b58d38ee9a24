"""The OpenAI-compatible API on the studio's own port, driven with the official `openai` client: model names, chat
and text completions streamed and not, the same answers as the Chat tab's pipeline, errors in OpenAI's shape, the
studio's login, a run's adapter and an exported GGUF by name, and a model worker killed mid-answer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from studio_helpers import launch, wait_loaded
from tiny_models import make_adapter, text_only_copy

from pipelines import chat, models
from pipelines import device as devicemod

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "Say hello to the studio."}]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_llama_dir, tiny_gguf):
    demo, url, ctx = launch(tmp_path_factory)
    wait_loaded(url)
    # a finished run (its adapter for the tiny llama) and an export (a GGUF), as the Train and Export stages leave them
    from pipelines.training import TrainConfig

    run = ctx.ws.runs / "r1"
    run.mkdir()
    TrainConfig(base_model=str(tiny_llama_dir), dataset="x").to_yaml(run / "config.yaml")
    make_adapter(tiny_llama_dir, run / "adapter", seed=3)
    (ctx.ws.exports / "e1").mkdir()
    shutil.copy(tiny_gguf, ctx.ws.exports / "e1" / "tiny-f16.gguf")
    yield url, ctx
    demo.close()


@pytest.fixture(scope="module")
def client(studio):
    import openai

    return openai.OpenAI(base_url=studio[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_loaded_default_runs_and_exports(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == models.DEFAULT_NAME
    assert {"default", "run:r1", "export:e1/tiny-f16.gguf"} <= set(ids)


def test_chat_streamed_and_not_gives_the_pipelines_answer(client, studio):
    _url, ctx = studio
    lm = ctx.registry.get(models.DEFAULT_NAME)
    want = chat.chat(lm, HI, chat.ChatParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12)).text
    r = client.chat.completions.create(model="default", messages=HI, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason == "length"
    parts, usage, roles = [], None, []
    for chunk in client.chat.completions.create(model=models.DEFAULT_NAME, messages=HI, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            roles.append(chunk.choices[0].delta.role)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == want and roles[0] == "assistant" and usage.completion_tokens == 12


def test_sampling_parameters_and_seed(client):
    def ask(seed):
        return client.chat.completions.create(
            model="default", messages=HI, max_tokens=10, temperature=1.0, top_p=0.9, seed=seed, stop=["\n\n"],
            extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}).choices[0].message.content

    assert ask(5) == ask(5)


def test_openai_defaults_and_penalties(client, studio):
    """A request that leaves a setting out gets OpenAI's default - no repetition penalty - and frequency_penalty /
    presence_penalty are honoured (the same answer as the pipeline given them) or refused with a 400 naming them."""
    import openai

    from pipelines.serving import openai as v1

    p = v1.chat_request({"model": "default", "messages": HI}).params
    assert (p.temperature, p.top_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1, 1, 1, 0, 0)
    lm = studio[1].registry.get(models.DEFAULT_NAME)
    story = [{"role": "user", "content": "Write a long list of fruits."}]

    def pipeline(**kw):
        return chat.chat(lm, story, chat.ChatParams(temperature=0, max_new_tokens=40, **kw)).text

    def api(**kw):
        return client.chat.completions.create(model="default", messages=story, max_tokens=40, temperature=0,
                                              **kw).choices[0].message.content

    plain = api()
    assert plain == pipeline(repetition_penalty=1.0) != pipeline(repetition_penalty=1.1)
    penalized = api(frequency_penalty=1.5, presence_penalty=0.5)
    assert penalized == pipeline(repetition_penalty=1.0, frequency_penalty=1.5, presence_penalty=0.5) != plain
    for bad in ({"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"presence_penalty": "high"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=HI, **bad)
        (name,) = bad
        assert e.value.body["param"] == name and name in e.value.body["message"]


def test_text_completion(client):
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert text == r.choices[0].text


def test_errors_come_back_in_openai_shape(client, studio):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert e.value.body["code"] == "model_not_found" and "GET /v1/models" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=HI, temperature=9)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "word " * 6000}])
    assert e.value.body["code"] == "context_length_exceeded" and "4096" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=HI, n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[{"role": "robot", "content": "x"}])
    assert "robot" in e.value.body["message"]
    url = studio[0]
    r = requests.post(url + "/v1/chat/completions", data="model=default", timeout=10,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["error"]["message"].startswith("Send the request body as JSON")
    r = requests.post(url + "/v1/chat/completions", data="{nope", timeout=10, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_run_adapter_and_an_exported_gguf_by_name(client, studio, tiny_llama_dir):
    _url, ctx = studio
    current = ctx.registry.current().name
    r = client.chat.completions.create(model="run:r1", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                       temperature=0)
    assert r.model == "run:r1" and r.usage.completion_tokens >= 1
    base = next(ctx.registry.get(n) for n in ctx.registry.names()
                if ctx.registry.get(n).model_path == str(tiny_llama_dir.resolve()))
    assert [a.name for a in chat.list_adapters(base)] == ["r1"]
    want = chat.chat(base, [{"role": "user", "content": "hello"}],
                     chat.ChatParams(temperature=0, max_new_tokens=5, adapter="r1")).text
    assert r.choices[0].message.content == want
    r = client.chat.completions.create(model="export:e1/tiny-f16.gguf", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert ctx.registry.current().name == current  # loaded beside; the Chat tab's model stays
    assert "export:e1/tiny-f16.gguf" in [m.id for m in client.models.list().data if m.mactuner["loaded"]]


@pytest.fixture(scope="module")
def run_and_its_gguf(studio, spm_llama_dir, tmp_path_factory):
    """A run (an adapter on a tiny llama whose tokenizer llama.cpp reads) and its export - merged, then an f32
    GGUF - as the Train and Export stages leave them: (run model id, export model id). While it is in use, HF models
    load in float32 like the GGUF: on a CPU with native bf16 they would answer in bfloat16, whose rounding moves
    the near ties of a random model."""
    import dataclasses

    from pipelines import export
    from pipelines.training import TrainConfig

    base = text_only_copy(spm_llama_dir, tmp_path_factory.mktemp("spm-base") / "tiny-spm-llama")
    ws = studio[1].ws
    run = ws.runs / "spm-run"
    run.mkdir()
    TrainConfig(base_model=str(base), dataset="x").to_yaml(run / "config.yaml")
    make_adapter(base, run / "adapter", seed=5)
    result = export.export(ws, export.ExportRequest(source=str(run / "adapter"), name="spm", outtypes=["f32"],
                                                    quants=[], validate=False))
    (gguf,) = result.ggufs
    with pytest.MonkeyPatch.context() as mp:
        f32 = dataclasses.replace(devicemod.profile(), infer_dtype="float32")
        mp.setattr(devicemod, "profile", lambda refresh=False: f32)
        yield "run:spm-run", f"export:spm/{Path(gguf).name}"


@pytest.mark.parametrize("settings", [{}, {"frequency_penalty": 1.0, "presence_penalty": 0.5,
                                           "extra_body": {"repetition_penalty": 1.3}}])
def test_a_run_and_its_gguf_answer_the_same(client, run_and_its_gguf, settings):
    """At temperature 0 the same model answers the same through run: (transformers + PEFT) and through its exported
    float GGUF (llama.cpp) - with OpenAI's defaults, and with every penalty, which both backends apply alike."""
    run_id, gguf_id = run_and_its_gguf
    msgs = [{"role": "user", "content": "hello world, how are you"}]

    def ask(model):
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, **settings)
        return r.choices[0].message.content, r.usage.completion_tokens

    (hf_text, hf_n), (gguf_text, gguf_n) = ask(run_id), ask(gguf_id)
    assert hf_n >= 8 and len(hf_text) >= 8 and (hf_text, hf_n) == (gguf_text, gguf_n)


def test_concurrent_streams_are_all_answered_unmixed(client):
    # different from the first word: any two share only the template's header, whatever the order, so llama.cpp's
    # reuse of the previous request's prefix is the same for each and the greedy answers are exactly comparable
    prompts = [f"{w} is the word. Say it again." for w in ("Apple", "Brick", "Cloud", "Drum")]
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Zebra is the word."}],
                                   max_tokens=1)  # so that the first one, too, follows a chat prompt
    want = {p: client.chat.completions.create(model="default", messages=[{"role": "user", "content": p}],
                                              max_tokens=8, temperature=0).choices[0].message.content for p in prompts}
    got, errors = {}, []

    def one(p):
        try:
            got[p] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0,
                stream=True) if c.choices)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and got == want


@pytest.mark.parametrize("how", ["openai", "socket"])
def test_a_client_that_hangs_up_mid_stream_frees_the_model(client, studio, how):
    """A streaming client that disconnects mid-answer: the generation stops and lets go of the model at once, so the
    next request is answered promptly (it used to wait until the abandoned answer was garbage-collected)."""
    import socket

    url, ctx = studio
    lm = ctx.registry.get(models.DEFAULT_NAME)
    long = {"model": "default", "messages": [{"role": "user", "content": "Tell a very long story about a dragon."}],
            "max_tokens": 3000, "temperature": 0, "stream": True}
    if how == "openai":
        stream = client.chat.completions.create(**long)
        texts = (c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content)
        assert [next(texts) for _ in range(3)]
        stream.close()  # the client hangs up
    else:
        host, port = url.split("//")[1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        data = json.dumps(long).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        seen = b""
        while seen.count(b'"content"') < 4:
            got = sock.recv(4096)
            assert got, seen[:300]  # the studio closed the connection before the answer began
            seen += got
        sock.close()  # hung up, without reading the rest
    t0 = time.perf_counter()
    assert lm.lock.acquire(timeout=20), "the abandoned answer still holds the model"
    lm.lock.release()
    r = client.with_options(timeout=30).chat.completions.create(model="default", messages=HI, max_tokens=4,
                                                                temperature=0)
    assert r.usage.completion_tokens == 4 and time.perf_counter() - t0 < 20


def test_a_model_worker_killed_mid_answer(client, studio):
    import openai

    _url, ctx = studio
    worker = ctx.registry.get(models.DEFAULT_NAME).backend.worker
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Tell a long story."}],
                                            max_tokens=800, temperature=0, extra_body={"repetition_penalty": 1.0},
                                            stream=True)
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                os.kill(worker.pid, signal.SIGKILL)
    assert "crashed: signal 9 (SIGKILL)" in str(e.value)
    r = client.chat.completions.create(model="default", messages=HI, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4  # restarted and answering
    assert requests.get(studio[0] + "/api/model/health", timeout=10).json()["status"] == "ok"


def test_the_studio_login_guards_v1(tmp_path_factory):
    import openai

    demo, url, _ctx = launch(tmp_path_factory, auth=("ann", "s3cret"), load_default=False)
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert "USER:PASS" in e.value.body["message"]
        ids = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="ann:s3cret", max_retries=0).models.list().data]
        assert "default" in ids
        assert requests.get(url + "/v1/models", auth=("ann", "s3cret"), timeout=10).status_code == 200
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401
    finally:
        demo.close()
