"""pipelines/chat.py on the tiny models: streaming on both backends (against direct llama.cpp / generate calls),
seeds, stopping, stop strings, history trimming, the template sandbox, LoRA adapters, the per-model lock and the
conversation JSON. Everything runs on CPU in well under a minute."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from tiny_models import make_adapter

from pipelines import chat, models
from pipelines.chat import ChatParams, stream_chat
from pipelines.errors import BadInput, Conflict, NotFound
from pipelines.serving import llamacpp

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
HELLO = [{"role": "user", "content": "hello world what is the model"}]
MALICIOUS = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


def one_line_error(excinfo, cls, *needles):
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.strip() and "\n" not in msg.strip() and "Traceback" not in msg
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    return msg


def write_gguf(path: Path, template: str | None, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A tiny llama GGUF like conftest's, with a chosen chat template (None: none) and extra control tokens."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", *extra_tokens] + [f"<0x{b:02X}>" for b in range(256)]
    types = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (2 + len(extra_tokens))
             + [gguf.TokenType.BYTE] * 256)
    for word in "hello world the a is of to and in you what how model".split():
        tokens.append("\u2581" + word)
        types.append(gguf.TokenType.NORMAL)
    n_vocab, n_embd, n_ff = len(tokens), 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if template is not None:
        w.add_chat_template(template)

    def rand(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    rand("output.weight", n_vocab, n_embd)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, np.float32))
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        rand(f"blk.0.{t}.weight", n_embd, n_embd)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, np.float32))
    rand("blk.0.ffn_gate.weight", n_ff, n_embd)
    rand("blk.0.ffn_up.weight", n_ff, n_embd)
    rand("blk.0.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------------- fixtures


def load_gguf(path: Path, n_ctx: int):
    """models.load_gguf with one llama.cpp thread in its worker: a tiny model gains nothing from more, and on a
    busy machine spinning thread barriers make it many times slower."""
    return models.load_gguf(path, n_ctx=n_ctx, threads=1)


_DIRECT: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_direct_llamas():
    yield
    while _DIRECT:
        _DIRECT.popitem()[1].close()


def direct_llama(lm):
    """llama.cpp loaded in this process the way the worker loads it (the comparison for the worker's answers)."""
    key = (lm.model_path, lm.details["n_ctx"])
    if key not in _DIRECT:
        _DIRECT[key] = llamacpp.open_llama(lm.model_path, n_ctx=lm.details["n_ctx"], n_threads=1)
    return _DIRECT[key]


@pytest.fixture(scope="module")
def gguf_lm(tiny_gguf):
    lm = load_gguf(tiny_gguf, n_ctx=512)
    yield lm
    lm.backend.close()


@pytest.fixture(scope="module")
def small_gguf_lm(tiny_gguf):
    lm = load_gguf(tiny_gguf, n_ctx=128)
    yield lm
    lm.backend.close()


@pytest.fixture(scope="module")
def hf_lm(tiny_llama_dir):
    return models.load_hf(tiny_llama_dir)


@pytest.fixture
def fresh_hf_lm(tiny_llama_dir):
    """A private copy of the tiny llama (adapter tests wrap its model)."""
    return models.load_hf(tiny_llama_dir)


@pytest.fixture(params=["llama.cpp", "transformers"])
def any_lm(request, gguf_lm, hf_lm):
    return gguf_lm if request.param == "llama.cpp" else hf_lm


def collect(chunks):
    chunks = list(chunks)
    assert chunks and chunks[-1].finish_reason is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks


def direct(lm, prompt: chat.RenderedPrompt, max_new: int) -> tuple[str, int]:
    """The same prompt ids, greedy, straight through llama.cpp or model.generate: (text, answer tokens)."""
    if lm.backend_kind == "llama.cpp":
        out = direct_llama(lm).create_completion(prompt=prompt.token_ids, max_tokens=max_new, temperature=0.0,
                                                 repeat_penalty=1.0)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]
    import torch

    ids = torch.tensor([prompt.token_ids])
    eos, tok = lm.backend.eos_ids(), lm.backend.tokenizer
    with torch.no_grad():
        out = lm.backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                        do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in eos]
    return tok.decode(new, skip_special_tokens=True), len(new)


# -------------------------------------------------------------------------------------------- streaming


def test_stream_matches_the_direct_call(any_lm):
    params = ChatParams(max_new_tokens=24, **GREEDY)
    text, chunks = collect(stream_chat(any_lm, HELLO, params))
    prompt = chat.build_prompt(any_lm, HELLO, params)
    want_text, want_tokens = direct(any_lm, prompt, 24)
    assert text == want_text and text
    last = chunks[-1]
    assert last.n_tokens == want_tokens and last.finish_reason in ("stop", "length")
    assert last.finish_reason == ("length" if want_tokens >= 24 else "stop")
    assert last.prompt_tokens == len(prompt.token_ids)
    assert last.seed is None  # greedy
    counts = [c.n_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] >= 1
    assert 0 < last.ttft_s <= last.elapsed_s and last.tokens_per_s > 0
    assert all(c.text for c in chunks[:-1])


def test_prompt_rendering_and_bos(gguf_lm, hf_lm):
    g = chat.build_prompt(gguf_lm, HELLO, ChatParams(system_prompt="be brief"))
    assert g.text == "system: be brief\nuser: hello world what is the model\nassistant:"
    bos = gguf_lm.backend.worker.token_bos()
    assert g.token_ids[0] == bos and g.token_ids[1] != bos
    assert g.template_source.startswith("GGUF metadata")
    h = chat.build_prompt(hf_lm, HELLO, ChatParams())
    assert h.text == "<s>user: hello world what is the model</s>\n<s>assistant:"
    assert h.token_ids[:2] != [1, 1] and h.token_ids[0] == hf_lm.backend.tokenizer.bos_token_id  # no double BOS
    tpl, src = chat.chat_template_of(hf_lm)
    assert tpl == hf_lm.backend.tokenizer.chat_template and "tokenizer" in src


def test_seeded_sampling_is_reproducible(any_lm):
    def answer(seed):
        return chat.chat(any_lm, HELLO, ChatParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                                   max_new_tokens=16))

    a = answer(7)
    chat.chat(any_lm, [{"role": "user", "content": "how to train a model"}], ChatParams(max_new_tokens=4))
    b, c = answer(7), answer(8)
    assert a.text == b.text and a.seed == b.seed == 7
    assert c.text != a.text
    r = chat.chat(any_lm, HELLO, ChatParams(temperature=1.0, max_new_tokens=2))
    assert isinstance(r.seed, int)  # a fresh seed, reported


def test_stop_before_the_first_token(any_lm):
    ev = threading.Event()
    ev.set()
    t = time.perf_counter()
    chunks = list(stream_chat(any_lm, HELLO, ChatParams(max_new_tokens=200), stop=ev))
    assert time.perf_counter() - t < 2
    assert len(chunks) == 1 and chunks[0].finish_reason == "stopped"
    assert chunks[0].text == "" and chunks[0].n_tokens == 0
    assert chat.model_lock(any_lm).acquire(timeout=5)
    chat.model_lock(any_lm).release()


def test_stop_mid_stream(any_lm):
    ev = threading.Event()
    full = chat.chat(any_lm, HELLO, ChatParams(max_new_tokens=60, **GREEDY))
    assert full.n_tokens > 5
    chunks = []
    for c in stream_chat(any_lm, HELLO, ChatParams(max_new_tokens=60, **GREEDY), stop=ev):
        chunks.append(c)
        if len(chunks) == 2:
            ev.set()
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stopped"
    assert full.text.startswith(text) and len(text) < len(full.text)
    assert chunks[-1].n_tokens < full.n_tokens
    assert chat.model_lock(any_lm).acquire(timeout=5)  # the generation thread let go of the model
    chat.model_lock(any_lm).release()


def test_closing_the_generator_releases_the_model(any_lm):
    gen = stream_chat(any_lm, HELLO, ChatParams(max_new_tokens=60, **GREEDY))
    next(gen)
    gen.close()
    assert chat.model_lock(any_lm).acquire(timeout=5)
    chat.model_lock(any_lm).release()


def test_stop_strings(any_lm):
    full = chat.chat(any_lm, HELLO, ChatParams(max_new_tokens=40, **GREEDY)).text
    assert len(full) > 8
    needle = full[4:7]
    if "\ufffd" in needle:  # byte-level noise from a random model: pick plain characters
        needle = next(full[i:i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    text, chunks = collect(stream_chat(any_lm, HELLO, ChatParams(max_new_tokens=40, stop=[needle], **GREEDY)))
    assert text == full[:full.find(needle)]
    assert chunks[-1].finish_reason == "stop"
    # a stop string that never appears changes nothing
    text2, _ = collect(stream_chat(any_lm, HELLO, ChatParams(max_new_tokens=40, stop="\u2603never", **GREEDY)))
    assert text2 == full


def test_penalties_work_as_in_llama_cpp():
    """transformers gets llama.cpp's penalties: only the answer's last tokens count (not the prompt), a positive logit
    is divided by the repetition penalty and a negative one multiplied, then count x frequency + presence is taken."""
    import torch

    from pipelines.serving.hf_generate import Penalties

    prompt = [5, 5, 5, 6]  # never penalized: it is the prompt
    answer = [1, 2, 2, 3, 3, 3]
    scores = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, 7.0, 8.0, 0.0]])
    out = Penalties(len(prompt), repetition=2.0, frequency=0.5, presence=0.25, window=5)(
        torch.tensor([prompt + answer]), scores.clone())
    # window 5: [2, 2, 3, 3, 3] (the answer's first token, 1, has left it)
    want = [1.0, 2.0, -2.0 * 2 - (2 * 0.5 + 0.25), 4.0 / 2 - (3 * 0.5 + 0.25), 0.5, 7.0, 8.0, 0.0]
    assert out.tolist() == [want]
    assert Penalties(len(prompt), 1.0, 0.0, 0.0)(torch.tensor([prompt]), scores.clone()).equal(scores)  # no answer yet


def test_frequency_and_presence_penalties_on_both_backends(any_lm):
    """Honoured by the GGUF's worker (as llama.cpp's own call does) and by transformers: a strong frequency penalty
    changes a greedy answer that repeats itself, deterministically."""
    plain = ChatParams(max_new_tokens=40, **GREEDY)
    penalized = ChatParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0, frequency_penalty=2.0,
                           presence_penalty=0.5)
    a, b = chat.chat(any_lm, HELLO, plain), chat.chat(any_lm, HELLO, penalized)
    assert b.text != a.text and chat.chat(any_lm, HELLO, penalized).text == b.text
    if any_lm.backend_kind == "llama.cpp":
        prompt = chat.build_prompt(any_lm, HELLO, penalized)
        out = direct_llama(any_lm).create_completion(prompt=prompt.token_ids, max_tokens=40, temperature=0.0,
                                                     repeat_penalty=1.0, frequency_penalty=2.0, presence_penalty=0.5)
        assert b.text == out["choices"][0]["text"]


def test_hold_back():
    assert chat.hold_back("abc\nUs", ["\nUser:"]) == 3
    assert chat.hold_back("abc", ["\nUser:"]) == 0
    assert chat.hold_back("ab\n", ["\nUser:", "b\nX"]) == 2


# ------------------------------------------------------------------------------------------------- history


def long_history(turns: int) -> list[dict]:
    msgs = []
    for i in range(turns):
        msgs.append({"role": "user", "content": ("first " if i == 0 else "") + "hello world"})
        msgs.append({"role": "assistant", "content": "the model is small"})
    msgs.append({"role": "user", "content": "and what is the model"})
    return msgs


def test_history_is_trimmed_to_the_context(small_gguf_lm):
    n_ctx = chat.context_window(small_gguf_lm)
    assert n_ctx == 128  # llama.cpp rounds its context up to 256, llama-cpp-python's buffer stays at 128
    msgs = [{"role": "system", "content": "you are small"}] + long_history(12)
    params = ChatParams(max_new_tokens=16, **GREEDY)
    p = chat.build_prompt(small_gguf_lm, msgs, params)
    assert p.context_window == n_ctx and 0 < p.dropped < 24 and p.dropped % 2 == 0
    assert len(p.token_ids) + p.max_new_tokens + chat.LLAMA_UTF8_MARGIN <= n_ctx and p.max_new_tokens == 16
    assert p.messages[0] == {"role": "system", "content": "you are small"}  # the system prompt stays
    assert p.messages[1]["role"] == "user" and p.messages[-1]["content"] == "and what is the model"
    assert p.text.startswith("system: you are small\n")
    assert "first" not in p.text and "history trimmed" in p.notes[0]
    # as many turns as fit: one more would not
    one_more = [msgs[0]] + msgs[1 + p.dropped - 2:]
    tpl = chat.chat_template_of(small_gguf_lm)[0]
    assert len(chat.tokenize(small_gguf_lm, chat.render_template(tpl, one_more, True))) + 16 + 4 > n_ctx
    # a large max_new_tokens reserves half the window for trimming, then is lowered to what is left
    big = chat.build_prompt(small_gguf_lm, msgs, ChatParams(max_new_tokens=1000))
    assert big.dropped > p.dropped and len(big.token_ids) <= n_ctx // 2
    assert big.max_new_tokens == n_ctx - len(big.token_ids) - chat.LLAMA_UTF8_MARGIN
    assert any("answer limited" in n for n in big.notes)
    text, chunks = collect(stream_chat(small_gguf_lm, msgs, params))
    assert "history trimmed" in chunks[0].note and "history trimmed" in chunks[-1].note
    assert chunks[-1].finish_reason in ("stop", "length")


def test_answer_that_fills_the_context(small_gguf_lm):
    """Up to the last token of a small window, with random bytes that llama-cpp-python completes past max_tokens."""
    msgs = [{"role": "user", "content": "hello world " * 8}]
    p = chat.build_prompt(small_gguf_lm, msgs, ChatParams(max_new_tokens=1000))
    assert p.max_new_tokens == 128 - len(p.token_ids) - chat.LLAMA_UTF8_MARGIN
    for seed in range(4):
        r = chat.chat(small_gguf_lm, msgs, ChatParams(max_new_tokens=1000, temperature=1.5, top_k=0, top_p=1.0,
                                                      min_p=0.0, seed=seed))
        assert r.finish_reason in ("stop", "length") and r.n_tokens <= p.max_new_tokens + 3
        assert "answer limited" in r.note


def test_history_fits_without_trimming(gguf_lm):
    p = chat.build_prompt(gguf_lm, long_history(2), ChatParams(max_new_tokens=16))
    assert p.dropped == 0 and p.notes == []


def test_message_longer_than_the_context(small_gguf_lm, hf_lm):
    long = [{"role": "user", "content": "hello world " * 150}]
    with pytest.raises(BadInput) as e:
        list(stream_chat(small_gguf_lm, long, ChatParams()))
    one_line_error(e, chat.ContextTooLong, "at most 128 tokens", "context window", "shorten")
    with pytest.raises(BadInput) as e:  # the tiny llama has 128 positions
        chat.build_prompt(hf_lm, long, ChatParams(system_prompt="x"))
    one_line_error(e, chat.ContextTooLong, "system prompt", "context window")
    assert issubclass(chat.ContextTooLong, BadInput)  # a 400 like any bad input; /v1 names it


@pytest.mark.parametrize("msgs, needle", [
    ([{"role": "user", "content": "   "}], "empty"),
    ([], "end with a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user message"),
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 3}], "content must be text"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "only come first"),
    ("hello", "list of messages"),
    ([{"role": "user", "content": [{"type": "file", "path": "x.png"}]}], "text only"),
])
def test_bad_conversations(gguf_lm, msgs, needle):
    with pytest.raises(BadInput) as e:
        list(stream_chat(gguf_lm, msgs, ChatParams()))
    one_line_error(e, BadInput, needle)


def test_gradio_content_parts_are_accepted(gguf_lm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}],
              "metadata": None, "options": None}]
    assert chat.normalize_messages(parts) == [{"role": "user", "content": "hello world"}]
    assert chat.chat(gguf_lm, parts, ChatParams(max_new_tokens=3)).finish_reason in ("stop", "length")


@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -1, "temperature"), ("top_p", 0, "top_p"), ("top_k", -2, "top_k"), ("min_p", 1.0, "min_p"),
    ("repetition_penalty", 0, "repetition_penalty"), ("max_new_tokens", 0, "max_new_tokens"),
    ("seed", -5, "seed"), ("temperature", "hot", "number"), ("stop", [3], "stop strings"),
    ("frequency_penalty", 2.5, "frequency_penalty"), ("presence_penalty", -3, "presence_penalty"),
])
def test_bad_params(gguf_lm, field, value, needle):
    with pytest.raises(BadInput) as e:
        list(stream_chat(gguf_lm, HELLO, ChatParams(**{field: value})))
    one_line_error(e, BadInput, needle)


def test_params_help_and_defaults():
    h = ChatParams.help()
    assert set(h) == {"system_prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "frequency_penalty", "presence_penalty", "max_new_tokens", "stop", "seed", "adapter"}
    assert all(h.values())
    # OpenAI's two penalties are /v1's: the chat forms (and their Gradio API) keep their fields
    assert [f.name for f in ChatParams.sampling_fields()] == [
        "system_prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "stop",
        "seed"]
    p = ChatParams().validated()
    assert 0 < p.temperature <= 1 and p.max_new_tokens > 0 and p.seed is None and p.adapter is None
    assert ChatParams(stop="\n\n", seed="", adapter=" ").validated().stop == ["\n\n"]


# ------------------------------------------------------------------------------------------------ templates


def test_plain_fallback_for_models_without_a_template(fresh_hf_lm):
    fresh_hf_lm.backend.tokenizer.chat_template = None
    tpl, src = chat.chat_template_of(fresh_hf_lm)
    assert tpl == chat.PLAIN_CHAT_TEMPLATE and "plain fallback" in src
    p = chat.build_prompt(fresh_hf_lm, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                        {"role": "user", "content": "how?"}], ChatParams(system_prompt="Be nice."))
    assert p.text == "System: Be nice.\nUser: hi\nAssistant: yo\nUser: how?\nAssistant:"
    assert chat.PLAIN_STOP in p.stop
    assert chat.chat(fresh_hf_lm, HELLO, ChatParams(max_new_tokens=4)).finish_reason in ("stop", "length")


def test_plain_format_for_an_hf_base_with_gemma_tokens_but_no_template(fresh_hf_lm):
    """A base model's turn tokens were never trained (bench/sampling.py): plain lines, said why."""
    tok = fresh_hf_lm.backend.tokenizer
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tpl, src = chat.chat_template_of(fresh_hf_lm)
    assert tpl == chat.PLAIN_CHAT_TEMPLATE and "base model never learned" in src
    assert tok.convert_tokens_to_ids("<end_of_turn>") in fresh_hf_lm.backend.eos_ids()  # ends the turn in generate
    assert tok.eos_token_id in fresh_hf_lm.backend.eos_ids()


def test_plain_format_for_a_gguf_base_with_gemma_tokens_but_no_template(tmp_path):
    path = write_gguf(tmp_path / "gemmaish.gguf", None, ("<start_of_turn>", "<end_of_turn>"))
    lm = load_gguf(path, n_ctx=256)
    try:
        tpl, src = chat.chat_template_of(lm)
        assert tpl == chat.PLAIN_CHAT_TEMPLATE and "<start_of_turn>" in src and "base model" in src
        p = chat.build_prompt(lm, HELLO, ChatParams(system_prompt="sys"))
        assert p.text == "System: sys\nUser: hello world what is the model\nAssistant:"
        assert p.token_ids[0] == 1 and chat.PLAIN_STOP in p.stop  # one BOS
        assert chat.chat(lm, HELLO, ChatParams(max_new_tokens=4)).finish_reason in ("stop", "length")
    finally:
        lm.backend.close()


def test_plain_fallback_for_a_gguf_without_any_template(tmp_path):
    lm = load_gguf(write_gguf(tmp_path / "base.gguf", None), n_ctx=256)
    try:
        assert chat.chat_template_of(lm)[0] == chat.PLAIN_CHAT_TEMPLATE
        p = chat.build_prompt(lm, HELLO, ChatParams())
        assert p.text == "User: hello world what is the model\nAssistant:" and p.token_ids[0] == 1
    finally:
        lm.backend.close()


@pytest.mark.parametrize("template", [
    MALICIOUS,
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ messages.__class__ }}",
    "{% set ns = namespace(__class__=1) %}x",
    "{{ 'a' * 100000000 }}",
])
def test_sandbox_refuses_templates_that_reach_python(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as e:
        chat.render_template(template, HELLO)
    one_line_error(e, BadInput, "sandbox")
    assert not (tmp_path / "PWNED").exists()


def test_template_helpers_and_errors():
    assert chat.render_template("{{ strftime_now('%Y') }}", []) == time.strftime("%Y")
    assert chat.render_template("{{ messages | tojson }}", [{"role": "user", "content": "é"}]) == \
        '[{"role": "user", "content": "é"}]'
    assert chat.render_template("{% generation %}A{% endgeneration %}", []) == "A"
    with pytest.raises(BadInput) as e:
        chat.render_template("{{ raise_exception('System role not supported') }}", HELLO)
    one_line_error(e, BadInput, "System role not supported")
    with pytest.raises(BadInput) as e:
        chat.render_template("{% for %}", HELLO)
    one_line_error(e, BadInput, "not valid Jinja")


def test_malicious_template_in_gguf_metadata(tmp_path):
    lm = load_gguf(write_gguf(tmp_path / "evil.gguf", MALICIOUS), n_ctx=128)
    try:
        assert chat.chat_template_of(lm)[0] == MALICIOUS
        with pytest.raises(BadInput) as e:
            list(stream_chat(lm, HELLO, ChatParams()))
        one_line_error(e, BadInput, "sandbox", "not run")
    finally:
        lm.backend.close()


def test_malicious_template_in_a_tokenizer(fresh_hf_lm):
    fresh_hf_lm.backend.tokenizer.chat_template = MALICIOUS
    with pytest.raises(BadInput) as e:
        chat.chat(fresh_hf_lm, HELLO, ChatParams())
    one_line_error(e, BadInput, "sandbox")


# ------------------------------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapters") / "lora-a")


def test_adapter_on_and_off(fresh_hf_lm, adapter_dir, tmp_path):
    lm = fresh_hf_lm
    params = ChatParams(max_new_tokens=12, **GREEDY)
    base = chat.chat(lm, HELLO, params).text
    info = chat.attach_adapter(lm, adapter_dir, "a")
    assert info.name == "a" and info.rank == 4 and info.target_modules == ["q_proj", "v_proj"]
    assert info.warnings == []  # adapter_config names the tiny llama's folder
    assert type(lm.backend.model).__name__ == "PeftModel"
    with_a = chat.chat(lm, HELLO, ChatParams(adapter="a", max_new_tokens=12, **GREEDY)).text
    assert with_a != base
    assert chat.chat(lm, HELLO, params).text == base  # adapter=None: the base model again, not reloaded
    # a second adapter with other weights, switched per answer
    other = make_adapter(Path(lm.model_path), tmp_path / "lora-b", seed=1)
    chat.attach_adapter(lm, other, "b")
    with_b = chat.chat(lm, HELLO, ChatParams(adapter="b", max_new_tokens=12, **GREEDY)).text
    assert with_b not in (base, with_a)
    assert chat.chat(lm, HELLO, ChatParams(adapter="a", max_new_tokens=12, **GREEDY)).text == with_a
    assert [a.name for a in chat.list_adapters(lm)] == ["a", "b"]
    with pytest.raises(Conflict):
        chat.attach_adapter(lm, other, "b")
    with pytest.raises(NotFound) as e:
        chat.chat(lm, HELLO, ChatParams(adapter="c"))
    one_line_error(e, NotFound, "no adapter named 'c'")
    chat.detach_adapter(lm, "b")
    chat.detach_adapter(lm, "a")
    assert type(lm.backend.model).__name__ == "LlamaForCausalLM" and chat.list_adapters(lm) == []
    assert chat.chat(lm, HELLO, params).text == base


def test_adapter_for_another_base_is_refused(fresh_hf_lm, tiny_llama_dir, tmp_path):
    wrong = make_adapter(tiny_llama_dir, tmp_path / "wide", config_overrides={"hidden_size": 48})
    with pytest.raises(BadInput) as e:
        chat.attach_adapter(fresh_hf_lm, wrong, "w")
    one_line_error(e, BadInput, "different base model", "q_proj", "48")
    assert type(fresh_hf_lm.backend.model).__name__ == "LlamaForCausalLM"  # untouched


def test_adapter_naming_another_base_with_matching_shapes_warns(fresh_hf_lm, adapter_dir, tmp_path):
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(adapter_dir, renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    info = chat.attach_adapter(fresh_hf_lm, renamed)
    assert info.name == "renamed" and "someone/other-model" in info.warnings[0]


def test_adapter_folder_problems(fresh_hf_lm, gguf_lm, adapter_dir, tmp_path):
    import shutil

    gone = tmp_path / "deleted-checkpoint"
    shutil.copytree(adapter_dir, gone)
    shutil.rmtree(gone)
    with pytest.raises(NotFound) as e:
        chat.attach_adapter(fresh_hf_lm, gone, "x")
    one_line_error(e, NotFound, "deleted")
    with pytest.raises(BadInput) as e:  # a GGUF model takes a LoRA GGUF (tests/pipelines/test_serving_lora.py)
        chat.attach_adapter(gguf_lm, adapter_dir, "x")
    one_line_error(e, BadInput, "LoRA GGUF", "not a PEFT folder", "Adapter menu")
    with pytest.raises(NotFound) as e:
        list(stream_chat(gguf_lm, HELLO, ChatParams(adapter="x")))
    one_line_error(e, NotFound, "no adapter named 'x'")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput) as e:
        chat.attach_adapter(fresh_hf_lm, empty)
    one_line_error(e, BadInput, "adapter_config.json")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(BadInput) as e:
        chat.attach_adapter(fresh_hf_lm, pickled)
    one_line_error(e, BadInput, "pickle", "safetensors")
    with pytest.raises(BadInput):
        chat.attach_adapter(fresh_hf_lm, adapter_dir, "bad name!")
    with pytest.raises(NotFound):
        chat.detach_adapter(fresh_hf_lm, "nothing")


# --------------------------------------------------------------------------------------------- concurrency


def test_two_threads_on_one_model_both_answer(any_lm, monkeypatch):
    lm = any_lm
    params = ChatParams(max_new_tokens=16, **GREEDY)
    expected = chat.chat(lm, HELLO, params).text
    active, peak = [0], [0]
    guard = threading.Lock()

    def enter():
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)  # long enough for the other thread to arrive meanwhile

    def leave():
        with guard:
            active[0] -= 1

    if lm.backend_kind == "llama.cpp":
        real = lm.backend.worker.generate

        def tracked(*a, **k):  # the worker client's generate() streams while it is iterated
            enter()
            try:
                yield from real(*a, **k)
            finally:
                leave()

        monkeypatch.setattr(lm.backend.worker, "generate", tracked)
    else:
        real = lm.backend.model.generate

        def tracked(*a, **k):
            enter()
            try:
                return real(*a, **k)
            finally:
                leave()

        monkeypatch.setattr(lm.backend.model, "generate", tracked)
    results: dict[int, list] = {}

    def run(i):
        results[i] = list(stream_chat(lm, HELLO, params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2
    for chunks in results.values():
        assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason in ("stop", "length")
    assert peak[0] == 1  # never two generations at once
    notes = [c.note or "" for chunks in results.values() for c in chunks]
    assert any("waiting" in n for n in notes)


def test_stop_while_waiting_for_the_model(gguf_lm):
    lock = chat.model_lock(gguf_lm)
    lock.acquire()
    try:
        ev = threading.Event()
        gen = stream_chat(gguf_lm, HELLO, ChatParams(), stop=ev)
        first = next(gen)
        assert "waiting" in first.note and first.finish_reason is None
        ev.set()
        rest = list(gen)
        assert rest[-1].finish_reason == "stopped" and rest[-1].n_tokens == 0
    finally:
        lock.release()


def test_unloaded_model(tiny_gguf):
    lm = load_gguf(tiny_gguf, n_ctx=128)
    lm.backend.close()
    lm.backend = None
    with pytest.raises(NotFound):
        list(stream_chat(lm, HELLO))


# ------------------------------------------------------------------------------------------- conversation JSON


def test_conversation_json_round_trip():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo \"there\"\n"},
            {"role": "assistant", "content": "hi"}]
    text = chat.export_conversation(msgs, model="tiny", params=ChatParams(seed=3))
    doc = json.loads(text)
    assert doc["format"] == "mactuner.chat" and doc["version"] == 1 and doc["model"] == "tiny"
    assert doc["params"]["seed"] == 3
    assert chat.import_conversation(text) == msgs
    assert chat.import_conversation(text.encode()) == msgs
    assert chat.import_conversation(json.dumps(msgs)) == msgs  # a bare list too
    gradio = [{"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None}]
    assert json.loads(chat.export_conversation(gradio))["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("data, needle", [
    ("{not json", "not valid json"),
    ("", "empty"),
    ('{"a": 1}', "no 'messages'"),
    ('{"format": "other", "messages": []}', "not a mactuner conversation"),
    ('"text"', "list of messages"),
    ('[{"role": "robot", "content": "x"}]', "message 1: role 'robot'"),
    ('[{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]', "message 2: content must be a string"),
    ('[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]', "only come first"),
    ('[["user", "x"]]', "message 1 must be an object"),
    (b"\xff\xfe\x00bad", "not utf-8"),
    (b"[" + b" " * (chat.MAX_IMPORT_BYTES + 1) + b"]", "larger than"),
])
def test_bad_conversation_imports(data, needle):
    with pytest.raises(BadInput) as e:
        chat.import_conversation(data)
    one_line_error(e, BadInput, needle)


def test_stop_strings_from_the_form_keep_non_ascii_text():
    """Escapes are read (\\n, \\t); text in any script passes as typed; a bad escape names the string."""
    fields = [f.name for f in ChatParams.sampling_fields()]

    def stops(text):
        values = [None] * len(fields)
        values[fields.index("stop")] = text
        return ChatParams.from_form(values, None).stop

    assert stops("é\\n, 終わり,\\tx, ,") == ["é\n", " 終わり", "\tx"]
    with pytest.raises(BadInput, match="bad escape"):
        stops("fin\\x")
