"""Real people's dataset shapes (tests/data_fixtures.py writes them): each is recognised, converted with every row
accounted for, saved with its kind, previewed and encoded as training would, or refused with the reason."""

from __future__ import annotations

import json

import data_fixtures as fx
import pytest

from pipelines import data
from pipelines.errors import BadInput
from pipelines.training import encode

GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
WITH_TOOLS = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}<{{ m['role'] }}>"
              "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | "
              "tojson }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}</{{ m['role'] }}>\n{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return data.load_tokenizer(tiny_tokenizer_dir)  # a fresh one per test: the tests set its chat template


def opened(path, **kw):
    res = data.read_table(path, **kw)
    m = data.detect_mapping(res.df)
    assert m is not None, list(res.df.columns)
    return res, m, data.convert(res.df, m)


@pytest.mark.parametrize("writer", [w for w, e in fx.EXPECTED.items() if e], ids=lambda w: w.__name__)
def test_each_shape_is_recognised_and_every_row_accounted_for(tmp_path, writer):
    fmt, kind, usable, left_out = fx.EXPECTED[writer]
    _res, m, conv = opened(writer(tmp_path))
    assert (m.format, m.kind, len(conv.rows), conv.n_dropped) == (fmt, kind, usable, left_out), conv.summary()
    assert conv.total == usable + left_out
    for row in conv.rows:
        assert data.row_kind(row) in ({"preference": "preference", "text": "text"}.get(kind, "messages"),)


@pytest.mark.parametrize("writer", [w for w, e in fx.EXPECTED.items() if not e], ids=lambda w: w.__name__)
def test_media_datasets_are_refused_not_ignored(tmp_path, writer):
    res = data.read_table(writer(tmp_path))
    m = data.detect_mapping(res.df)
    with pytest.raises(BadInput, match="text models") as ei:
        data.convert(res.df, m)
    assert "Traceback" not in ei.value.message


def test_preference_pairs_keep_their_turns_and_can_become_sft(tmp_path):
    _res, _m, conv = opened(fx.sharegpt_preference(tmp_path))
    first, second = conv.rows[0], conv.rows[1]
    assert [x["role"] for x in first["prompt"]] == ["system", "user", "assistant", "user"]
    assert first["chosen"] == [{"role": "assistant", "content": "0."}]
    assert second["rejected"] == [{"role": "assistant", "content": "Maybe 3?"}]
    assert "preference pairs" in conv.summary()
    sft = data.chosen_as_sft(conv.rows)
    assert sft[1]["messages"][-1] == {"role": "assistant", "content": "2."} and len(sft) == 300
    # the full-conversation shape: the common start becomes the prompt
    _res, _m, conv = opened(fx.messages_preference(tmp_path))
    assert conv.rows[2] == {"prompt": [{"role": "user", "content": "Say 2 in French."}],
                            "chosen": [{"role": "assistant", "content": "deux"}],
                            "rejected": [{"role": "assistant", "content": "I don't know."}]}
    _res, _m, conv = opened(fx.alpaca_preference(tmp_path))
    assert conv.dropped == {"have the same chosen and rejected answer": [5]}


def test_tool_calls_become_openai_tool_turns(tmp_path, tok):
    _res, m, conv = opened(fx.sharegpt_tools(tmp_path))
    assert m.tools == "tools" and conv.tool_rows == 6
    row = conv.rows[0]
    assert [x["role"] for x in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"] == [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert row["tools"] == fx.TOOLS
    assert conv.dropped == {"have a function_call that is not JSON with a name": [6]}
    # a template with a tool format: the calls are in the text, and the trained part holds them
    tok.chat_template = WITH_TOOLS
    ids, labels = encode.encode_conversation(tok, row["messages"], tools=row["tools"])
    text = tok.decode(ids)
    assert "CALL get_weather" in text and "Tools:" in text
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != encode.IGNORE])
    assert "CALL get_weather" in trained and "temp_c" not in trained
    # one without (Gemma's): refused with the reason, never trained without the calls
    tok.chat_template = GEMMA_LIKE
    with pytest.raises(encode.NoToolFormat, match="no tool format"):
        encode.encode_conversation(tok, row["messages"], tools=row["tools"])


def test_loss_weight_zero_and_content_parts(tmp_path, tok):
    _res, _m, conv = opened(fx.content_parts(tmp_path))
    msgs = conv.rows[1]["messages"]
    assert msgs[0] == {"role": "system", "content": "You are terse."}
    assert msgs[2] == {"role": "assistant", "content": "A bad first try.", "loss_weight": 0.0}
    assert msgs[4]["content"] == "Blue."
    tok.chat_template = GEMMA_LIKE
    ids, labels = encode.encode_conversation(tok, msgs)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != encode.IGNORE])
    assert "Blue." in trained and "bad first try" not in trained
    pv = data.preview_example(conv.rows[1], tok)  # the preview marks what training trains
    assert pv.trained_tokens == sum(lab != encode.IGNORE for lab in labels)


def test_kto_undesirable_rows_are_never_targets(tmp_path, tok):
    _res, _m, conv = opened(fx.kto(tmp_path))
    assert conv.undesirable == 4 and "4 labelled undesirable" in conv.summary()
    tok.chat_template = GEMMA_LIKE
    enc = encode.encode_split(tok, conv.rows, 128, True)
    assert len(enc.examples) == 6 and enc.undesirable == 4
    bad = next(r for r in conv.rows if r["label"] is False)
    assert data.preview_example(bad, tok).trained_tokens == 0


def test_placeholders_detected_and_filled(tmp_path):
    _res, _m, conv = opened(fx.identity(tmp_path))
    assert conv.placeholders == {"name": 2, "author": 1}
    assert "{{name}} in 2 rows" in conv.summary()
    values = data.parse_placeholder_values("name=MacTuner, author = Ann Lee")
    filled = data.fill_placeholders(conv.rows, values)
    assert filled[0]["messages"][-1]["content"] == "I am MacTuner, an assistant made by Ann Lee."
    assert conv.rows[0]["messages"][-1]["content"].startswith("I am {{name}}")  # the original is untouched
    with pytest.raises(BadInput, match="name=value"):
        data.parse_placeholder_values("name MacTuner")


def test_saved_dataset_records_kind_and_what_was_left_out(workspace, tmp_path):
    res, m, conv = opened(fx.alpaca_preference(tmp_path))
    v = data.save_dataset(workspace, "pref", conv.rows, data.build_meta(res, m, None, conv), val_ratio=0)
    meta = json.loads((v.path / "meta.json").read_text())
    assert meta["kind"] == "preference" and meta["conversion"]["rows_in"] == 6
    assert meta["conversion"]["dropped"] == {"have the same chosen and rejected answer": {"count": 1,
                                                                                       "first_rows": [5]}}
    assert data.list_datasets(workspace)[0]["kind"] == "preference"
    with pytest.raises(BadInput, match="preference"):  # SFT training does not take preference rows as chats
        encode.read_rows(v.path / "train.jsonl")


def test_long_plain_text_is_cut_into_windows_not_truncated(tok):
    text = " ".join(f"word{i}" for i in range(400))
    enc = encode.encode_split(tok, [{"text": text}], 64, True)
    total = len(encode.encode_text(tok, text)[0])
    assert len(enc.examples) == -(-total // 64) and sum(len(ids) for ids, _ in enc.examples) == total
    assert "cut into" in enc.note("train", 64)


def test_korean_cp949_is_read_as_korean(tmp_path):
    res, _m, conv = opened(fx.korean_cp949(tmp_path))
    assert res.encoding in ("cp949", "euc-kr")
    assert conv.rows[0]["messages"] == [{"role": "user", "content": fx.KOREAN[0][0]},
                                        {"role": "assistant", "content": fx.KOREAN[0][1]}]


def test_reasoning_and_tool_call_parts(tmp_path):
    """LLaMA-Factory v1 content parts: reasoning kept as <think>...</think> before the answer, tool_call parts as
    OpenAI tool calls, an unknown part type counted and named."""
    _res, m, conv = opened(fx.reasoning_tools(tmp_path))
    assert m.tools == "tools"
    msgs = conv.rows[0]["messages"]
    assert [x["role"] for x in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "c0"}}
    assert msgs[1]["content"].startswith("<think>\nI should call the weather tool.\n</think>")
    assert msgs[3]["content"] == "<think>\n20 degrees.\n</think>\n\nIt is 20 degrees."
    assert "unknown type (hologram)" in conv.summary()


def test_v1_preference_files(tmp_path):
    _res, m, conv = opened(fx.v1_preference(tmp_path))
    assert (m.chosen, m.rejected) == ("chosen_messages", "rejected_messages")
    row = conv.rows[0]
    assert [x["content"] for x in row["prompt"]] == ["Translate casa"]
    assert row["chosen"][0]["content"] == "CASA" and row["rejected"][0]["content"] == "?"
