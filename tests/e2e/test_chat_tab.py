"""Browser test of the Chat tab on the embedded default model: a streamed answer with its speed, stop mid-answer,
the template in use, an empty message refused, compare mode answering one prompt twice side by side, and the
model's process killed mid-answer: the chat says so, keeps the conversation, and answers the next message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    proc, url = start_studio(tmp_path_factory.mktemp("e2e-chat") / "ws")
    yield url
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio, browser):
    pg = new_page(browser, studio, "Chat", timeout_ms=90_000, height=1500)
    yield pg
    pg.close()


def set_slider(page, elem_id, value):
    page.locator(f"#{elem_id} input[type=number]").fill(str(value))
    page.locator(f"#{elem_id} input[type=number]").press("Enter")


def test_chat_streams_an_answer(page, tmp_path):
    import re

    from playwright.sync_api import expect

    expect(page.locator("#chat-model input")).to_have_value(re.compile("gemma-3-270m"))
    set_slider(page, "chat-max-new", 24)
    page.locator("#chat-input textarea").fill("Name three colours.")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text("tok/s")
    expect(page.locator("#chat-speed")).to_contain_text("first token")
    bot = page.locator("#chat-bot")
    expect(bot).to_contain_text("Name three colours.")
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(r"\b\d+ tokens .*(done|length limit)"))
    page.screenshot(path=str(tmp_path / "chat-tab.png"), full_page=True)
    # the default seed is random: regenerating samples again, and the line under the answer names the seed used
    first = re.search(r"seed (\d+)", page.locator("#chat-speed").inner_text()).group(1)
    page.locator("#chat-regen").click()
    # the seed is shown once the answer is complete: wait for the regenerated one, with another seed
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(rf"\d+ tokens .*seed (?!{first}\b)\d+"))


def test_stop_mid_answer(page):
    from playwright.sync_api import expect

    set_slider(page, "chat-max-new", 2000)
    page.locator("#chat-clear").click()  # so that "tokens" below is this answer's, not the last one's
    expect(page.locator("#chat-speed")).not_to_contain_text("tokens")
    page.locator("#chat-input textarea").fill("Continue this list: 1, 2, 3, 4, 5,")  # a base model goes on and on
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text("tokens")
    page.locator("#chat-stop").click()
    expect(page.locator("#chat-speed")).to_contain_text("stopped")


def test_empty_message_and_template(page):
    from playwright.sync_api import expect

    page.locator("#chat-input textarea").fill("   ")
    page.locator("#chat-send").click()
    expect(page.locator(".toast-body").filter(has_text="Type a message first").first).to_be_visible()
    page.get_by_text("Chat template in use").click()
    page.locator("#chat-template-btn").click()
    # the embedded model is a base model: plain lines, and the reason said whole (not cut at "<start_of_turn>")
    expect(page.locator("#chat-template-source")).to_contain_text("plain fallback (a base model")
    expect(page.locator("#chat-template-source")).to_contain_text("<start_of_turn>, but a base model never learned")
    expect(page.locator("#chat-template")).to_contain_text("Assistant:")


def test_compare_side_by_side(page):
    from playwright.sync_api import expect

    set_slider(page, "chat-max-new", 12)
    page.get_by_text("Compare two models on one prompt").click()
    page.locator("#compare-prompt textarea").fill("The capital of France is")
    page.locator("#compare-run").click()
    for side in ("a", "b"):  # both answered (a base model may end its answer before the limit)
        expect(page.locator(f"#compare-speed-{side}")).to_contain_text(re.compile(r"\b\d+ tokens .*(done|length limit)"))
    expect(page.locator("#compare-a")).to_contain_text("The capital of France is")
    expect(page.locator("#compare-b")).to_contain_text("The capital of France is")


@pytest.mark.heavy  # the worker's side: tests/pipelines/test_serving.py (a native crash mid answer)
def test_the_model_process_killed_mid_answer(page, studio):
    import os
    import re
    import signal

    import requests
    from playwright.sync_api import expect

    page.locator("#chat-clear").click()
    # greedy: with a random seed the base model ended its answer to the list below after 4-12 tokens for 4 of 8 seeds
    # (seen on CI: "done" before the kill); greedily it repeats the 1,400-token list, far past the kill
    set_slider(page, "chat-temperature", 0)
    set_slider(page, "chat-max-new", 8)
    page.locator("#chat-input textarea").fill("Say one word.")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(r"\d+ tokens .*(done|length limit)"))
    set_slider(page, "chat-max-new", 2000)
    # A long list: the base model goes on repeating it (a story it ends after a dozen tokens). The kill must land once
    # the answer streams: a worker that dies before its first token is restarted and asked again without a word.
    story = "Continue this list: " + ", ".join(str(i) for i in range(1, 300)) + ","
    page.locator("#chat-input textarea").fill(story)
    page.locator("#chat-send").click()
    # this answer, streaming (the last answer's line says "done")
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(r"\b\d+ tokens(?!.*(done|limit))"))
    pid = requests.get(studio + "/api/model/current", timeout=10).json()["model"]["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    expect(page.locator("#chat-speed")).to_contain_text("The model process crashed: signal 9 (SIGKILL)")
    expect(page.locator("#chat-input textarea")).to_have_value(story)  # back in the box, to send again
    bot = page.locator("#chat-bot")
    expect(bot).to_contain_text("Say one word.")  # the conversation before it is kept
    assert requests.get(studio + "/api/model/health", timeout=10).json()["status"] == "ok"
    set_slider(page, "chat-max-new", 6)
    page.locator("#chat-send").click()
    expect(page.locator("#chat-speed")).to_contain_text(re.compile(r"\d+ tokens .*(done|length limit)"))
    expect(bot).to_contain_text("Continue this list: 1, 2, 3")
    new_pid = requests.get(studio + "/api/model/current", timeout=10).json()["model"]["worker"]["pid"]
    assert new_pid != pid


def test_conversations_import_one_after_another(page, tmp_path):
    """Each imported conversation replaces the chat, and the file box empties for the next file; a file that is not
    a conversation is refused with a warning and leaves the chat as it was."""
    import json

    from playwright.sync_api import expect

    files = {}
    for name, words in (("one.json", "apples"), ("two.json", "pears")):
        msgs = [{"role": "user", "content": f"tell me about {words}"}, {"role": "assistant", "content": f"{words}!"}]
        files[name] = tmp_path / name
        files[name].write_text(json.dumps({"messages": msgs}))
    files["bad.json"] = tmp_path / "bad.json"
    files["bad.json"].write_text("{not json")
    box = page.locator("#chat-import input[type=file]")
    bot = page.locator("#chat-bot")
    for name, shown in (("one.json", "apples"), ("two.json", "pears"), ("bad.json", None), ("one.json", "apples")):
        box.set_input_files(str(files[name]))
        if shown:
            expect(bot).to_contain_text(f"tell me about {shown}")
        else:  # a warning; the conversation stays in view, not hidden under 'Error'
            expect(page.locator(".toast-body").filter(has_text="Not valid JSON").last).to_be_visible()
            expect(bot).to_contain_text("tell me about pears")
            expect(bot.get_by_text("Error", exact=True)).to_have_count(0)
        expect(box).to_have_count(1)  # emptied again: ready for the next file
