"""Hardening (issue 12): inputs that used to hang or burn the server are stopped with one clear message, and
errors a user should never see are plain BadInput messages. Each hanging case runs in a thread with a time bound on
the test itself.
"""

from __future__ import annotations

import threading
import time

import pytest

from pipelines import templates
from pipelines.errors import BadInput

NESTED = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
NESTED_LIST = "{% set x = range(99999) | list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}"
HUGE_RANGE = "{% for i in range(10**9) %}{{ i }}{% endfor %}"
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def within(seconds, fn, *args, **kwargs):
    """fn(*args) in a thread; its exception or result, failing the test when it takes longer than `seconds`."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    box["seconds"] = time.monotonic() - t0
    return box


@pytest.fixture
def short_bound(monkeypatch):
    monkeypatch.setattr(templates, "MAX_TEMPLATE_SECONDS", 1.0)


@pytest.mark.parametrize("template", [NESTED, NESTED_LIST])
def test_endless_template_is_stopped_in_chat_rendering(short_bound, template):
    box = within(15, templates.render_template, template, MSGS)
    assert isinstance(box.get("error"), BadInput), box
    assert "took more than 1 s" in str(box["error"])


def test_template_output_is_bounded(monkeypatch):
    monkeypatch.setattr(templates, "MAX_TEMPLATE_OUTPUT", 100_000)
    box = within(15, templates.render_template, "{% for i in range(99999) %}{{ 'xx' }}{% endfor %}", MSGS)
    assert isinstance(box.get("error"), BadInput) and "more than 100,000 characters" in str(box["error"])


def test_huge_range_is_a_clear_message():
    with pytest.raises(BadInput, match="loop too far"):
        templates.render_template(HUGE_RANGE, MSGS)


def test_a_normal_render_is_not_slowed_and_the_bound_goes_away():
    big = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello " * 20} for i in range(2000)]
    t0 = time.monotonic()
    templates.render_template(templates.GEMMA_CHAT_TEMPLATE, big, bos_token="<bos>")
    assert time.monotonic() - t0 < 2
    assert not templates._BOUNDED  # nothing left armed once rendering is over
    time.sleep(0.3)  # a bound that has ended never fires later
    assert templates.render_template(templates.PLAIN_CHAT_TEMPLATE, MSGS).startswith("User: hi")


@pytest.fixture
def tok(tiny_tokenizer_dir):
    from pipelines import data

    return data.load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("template", [NESTED, HUGE_RANGE])
def test_data_preview_and_train_check_stop_a_bad_template(short_bound, tok, template):
    """The Data tab's preview and the train check render through transformers (data.assistant_spans)."""
    from pipelines import data
    from pipelines.training import encode

    tok.chat_template = template
    box = within(15, data.preview_example, MSGS, tok)
    assert isinstance(box.get("error"), BadInput), box
    assert ("took more than 1 s" if template == NESTED else "loop too far") in str(box["error"])
    box = within(15, encode.encode_conversation, tok, MSGS)
    assert isinstance(box.get("error"), BadInput), box


# ------------------------------------------------------------------------------------------- long histories


def test_a_huge_history_is_trimmed_before_it_is_rendered(tiny_llama_dir, monkeypatch):
    """100k messages (what a 10 MB import holds): the turn costs what fits the window, not the whole history."""
    from pipelines import chat, models
    from pipelines.chat import prompt
    from pipelines.serving import backend

    lm = models.load_hf(tiny_llama_dir)
    msgs = []
    for i in range(50_000):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "an answer"}]
    msgs.append({"role": "user", "content": "and the last one"})
    rendered = []
    real = backend.render_template  # every backend renders through serving/backend.py
    monkeypatch.setattr(backend, "render_template", lambda t, m, *a, **k: rendered.append(len(m)) or real(t, m, *a, **k))
    box = within(20, chat.build_prompt, lm, msgs, chat.ChatParams(max_new_tokens=16))
    assert "error" not in box, box
    p = box["result"]
    assert p.dropped > 99_000 and p.messages[-1]["content"] == "and the last one"
    assert max(rendered) < 2 * 128 * prompt.MAX_CHARS_PER_TOKEN // len("question 1")  # only what could fit
    assert box["seconds"] < 5


# ------------------------------------------------------------------------------------------------ deep JSON

DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize("name,text", [("deep.json", '[{"a": ' + DEEP + "}]"), ("deep.jsonl", '{"a": ' + DEEP + "}\n")])
def test_deeply_nested_json_upload_is_refused_plainly(tmp_path, name, text):
    from pipelines.data import read_table

    (tmp_path / name).write_text(text)
    with pytest.raises(BadInput, match="nested too deeply"):
        read_table(tmp_path / name)


def test_deeply_nested_conversation_import_is_refused_plainly():
    from pipelines.chat.conversation import import_conversation

    with pytest.raises(BadInput, match="nested too deeply"):
        import_conversation('{"messages": ' + DEEP + "}")


# ------------------------------------------------------------------------------------ headerless CSV


def test_one_column_csv_says_its_first_line_was_the_header_and_can_be_read_as_data(tmp_path):
    from pipelines.data import read_table

    f = tmp_path / "lines.csv"
    f.write_text("hello there\nsecond row\nthird\n")
    r = read_table(f)
    assert list(r.df.columns) == ["hello there"] and len(r.df) == 2
    assert any("'hello there'" in w and "taken as the column name" in w for w in r.warnings)
    r = read_table(f, header=False)
    assert list(r.df.columns) == ["text"] and r.df["text"].tolist() == ["hello there", "second row", "third"]
    assert not any("column name" in w for w in r.warnings)
    (tmp_path / "two.csv").write_text("a,b\nc,d\n")
    r = read_table(tmp_path / "two.csv", header=False)
    assert list(r.df.columns) == ["column_1", "column_2"] and len(r.df) == 2
