"""Browser test of the Train tab on the tiny llama: pre-flight, start, reload the page mid-run and see it re-attach
(the form shows the run's settings again), stop (a checkpoint is saved; Stop is enabled only while a run is queued
or running), resume from it and watch the run finish; a second start while one runs is queued; no trainer that
ended is left as a zombie of the studio."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from pipelines import data
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("e2e-train") / "ws"
    ws = Workspace.open(root)
    rows = [{"messages": [{"role": "user", "content": f"question {i} about the sea"},
                          {"role": "assistant", "content": f"answer {i}: the sea is wide and deep"}]} for i in range(40)]
    data.save_dataset(ws, "tiny-set", rows, {"source": "test"}, val_ratio=0.1)
    proc, url = start_studio(root)
    yield url, root, proc
    stop_studio(proc)


@pytest.fixture(scope="module")
def page(studio, browser):
    pg = new_page(browser, studio[0], "Train", timeout_ms=120_000, width=1500)
    yield pg
    pg.close()


def fill(page, eid, value):
    box = page.locator(f"#{eid} input, #{eid} textarea").first
    box.fill(str(value))
    box.press("Enter") if eid in ("train-base-model", "train-dataset") else box.blur()


def set_form(page, base, steps, name):
    from playwright.sync_api import expect

    fill(page, "train-base-model", base)
    fill(page, "train-dataset", "tiny-set")
    fill(page, "train-max-steps", steps)
    fill(page, "train-batch-size", 2)
    fill(page, "train-max-length", 64)
    fill(page, "train-learning-rate", 0.001)
    page.get_by_text("More settings").click()
    expect(value_of(page, "train-save-every")).to_be_visible()
    fill_until_yaml_holds(page, {"train-save-every": 20, "train-run-name": name}, ["save_every: 20"])


def fill_until_yaml_holds(page, fields: dict, wanted: list[str]) -> None:
    """Type `fields` ({element id: value}), make the YAML from the form and wait for each of `wanted` in it. The
    More settings fields mount when the accordion first opens, and a value typed while they mount can be reset to
    the default (seen in CI): then they are typed again, up to three times."""
    from playwright.sync_api import expect

    if not page.locator("#train-yaml-btn").is_visible():
        page.get_by_text("Config as YAML / command line").click()
    for attempt in range(3):
        for eid, value in fields.items():
            fill(page, eid, value)
        page.locator("#train-yaml-btn").click()
        try:
            for text in wanted:
                expect(page.locator("#train-yaml")).to_contain_text(text, timeout=15_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    for eid, value in fields.items():
        expect(value_of(page, eid)).to_have_value(str(value))


def value_of(page, eid):
    return page.locator(f"#{eid} input, #{eid} textarea").first


def assert_reaped(studio_pid: int, pids: list[int], timeout: float = 60.0) -> None:
    """The trainers in `pids` have ended and the studio waited on them: none is left as its <defunct> child."""
    import psutil

    studio = psutil.Process(studio_pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = {c.pid: c for c in studio.children()}
        if not set(pids) & set(kids):
            return
        time.sleep(0.2)
    left = {}
    for pid in set(pids) & set(kids):
        try:
            left[pid] = kids[pid].status()
        except psutil.Error:
            left[pid] = "gone"
    raise AssertionError(f"trainer processes still children of the studio: {left}")


def test_preflight_start_reload_stop_resume(page, studio, tiny_llama_dir):
    from playwright.sync_api import expect

    url, root, proc = studio
    expect(page.locator("#train-stop")).to_be_disabled()  # nothing to stop yet
    set_form(page, str(tiny_llama_dir), 3000, "long-run")
    page.locator("#train-check").click()
    expect(page.locator("#train-preflight")).to_contain_text("36 usable training conversations")
    expect(page.locator("#train-preflight")).to_contain_text("fits")
    # will it export? the tiny tokenizer's byte-level pre-tokenizer is in no converter table: said before training
    expect(page.locator("#train-preflight")).to_contain_text("does not recognise this tokenizer's BPE pre-tokenizer")
    page.locator("#train-start").click()
    expect(page.locator("#train-action")).to_contain_text("Started")
    expect(page.locator("#train-status")).to_contain_text("running")
    expect(page.locator("#train-stop")).to_be_enabled()
    expect(page.locator("#train-status")).to_contain_text("loss")
    # a second run while this one trains is queued, not dropped
    fill(page, "train-run-name", "second-run")
    page.locator("#train-start").click()
    expect(page.locator("#train-action")).to_contain_text("queued")
    # reload: the page re-attaches to the running job from the run folder
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-run input")).to_have_value("long-run")
    expect(page.locator("#train-status")).to_contain_text("running")
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+ / 3000"))
    expect(page.locator("#train-progress")).not_to_contain_text(re.compile(r"NaN|nan|ETA 0"))
    # ... and the form shows that run's settings again (from its config.yaml), not the defaults
    expect(value_of(page, "train-max-steps")).to_have_value("3000")
    expect(value_of(page, "train-batch-size")).to_have_value("2")
    expect(value_of(page, "train-max-length")).to_have_value("64")
    page.get_by_text("More settings").click()  # closed again on the fresh page
    expect(value_of(page, "train-save-every")).to_have_value("20")
    expect(value_of(page, "train-dataset")).to_have_value("tiny-set")
    expect(value_of(page, "train-base-model")).to_have_value(str(tiny_llama_dir))
    first_pid = json.loads((root / "runs" / "long-run" / "status.json").read_text())["pid"]
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=120_000)
    expect(page.locator("#train-stop")).to_be_disabled()  # the selected run is over
    ckpts = sorted((root / "runs" / "long-run" / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists()
    # the queued run starts by itself once the first one ends; stop it too
    page.locator("#train-run input").fill("second-run")
    page.locator("#train-run input").press("Enter")
    expect(page.locator("#train-status")).to_contain_text("running")
    expect(page.locator("#train-stop")).to_be_enabled()
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=120_000)
    # resume the first one from its checkpoint
    page.locator("#train-run input").fill("long-run")
    page.locator("#train-run input").press("Enter")
    # the monitor now follows long-run: its status and its own latest checkpoint (not second-run's step-1, which
    # the picker holds until long-run's first update lands)
    expect(page.locator("#train-status")).to_contain_text("long-run")
    expect(page.locator("#train-ckpt input")).to_have_value(ckpts[-1].name)
    page.locator("#train-resume").click()
    expect(page.locator("#train-status")).to_contain_text("running")
    status = json.loads((root / "runs" / "long-run" / "status.json").read_text())
    assert status["resume_from"].endswith(ckpts[-1].name)
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=120_000)
    expect(page.locator("#train-stop")).to_be_disabled()
    expect(page.locator("#train-history")).to_contain_text("long-run")
    # the studio started the first trainer and the resumed one (the second run was started by the first trainer)
    assert_reaped(proc.pid, [first_pid, status["pid"]])


def test_bad_settings_are_explained(page, tiny_llama_dir):
    from playwright.sync_api import expect

    page.reload()
    page.get_by_role("tab", name="Train").click()
    # the page load fills the form from the latest run first (waiting for it keeps it from overwriting the typing)
    expect(value_of(page, "train-max-steps")).to_have_value("3000")
    set_form(page, str(tiny_llama_dir), 10, "")
    fill(page, "train-learning-rate", 0)
    page.locator("#train-check").click()
    expect(page.locator(".toast-body").filter(has_text="learning rate").first).to_be_visible()
    # said in the pre-flight text too, not hidden under a red 'Error'
    expect(page.locator("#train-preflight")).to_contain_text("learning rate")
    run_before = value_of(page, "train-run").input_value()
    page.locator("#train-start").click()  # refused: the message under the buttons, the run picker kept
    expect(page.locator("#train-action")).to_contain_text("learning rate")
    expect(value_of(page, "train-run")).to_have_value(run_before)
    for eid in ("train-preflight", "train-action", "train-run"):
        expect(page.locator(f"#{eid}").get_by_text("Error", exact=True)).to_have_count(0)
    fill(page, "train-learning-rate", 0.001)
    expect(page.locator("#train-preflight")).not_to_contain_text("learning rate")  # that check no longer applies
    fill(page, "train-dataset", "no-such-set")
    page.locator("#train-check").click()
    expect(page.locator(".toast-body").filter(has_text="no-such-set").first).to_be_visible()
    expect(page.locator("#train-preflight")).to_contain_text("no-such-set")


def test_config_yamls_load_one_after_another(page, tmp_path):
    """Each uploaded config fills the form and empties the file box for the next; a broken one leaves the form as it
    was with a warning, no 'Error' painted over the fields, and the box takes the next file."""
    from playwright.sync_api import expect

    configs = {"a.yaml": "max_steps: 7\nlearning_rate: 0.0005\n", "b.yaml": "max_steps: 11\nlearning_rate: 0.0003\n",
               "broken.yaml": "base_model: [unclosed\n  : : :\n", "keys.yaml": "learning_rat: 3\n",
               "empty.yaml": "# to fill in\n"}
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(value_of(page, "train-max-steps")).to_have_value("3000")  # the page load's fill is done
    page.get_by_text("Config as YAML / command line").click()
    box = page.locator("#train-yaml-file input[type=file]")
    refusals = {"broken.yaml": "not valid YAML", "keys.yaml": "learning_rat", "empty.yaml": "holds no settings"}
    for name, steps in (("a.yaml", "7"), ("b.yaml", "11"), ("broken.yaml", "11"), ("keys.yaml", "11"),
                        ("empty.yaml", "11"), ("a.yaml", "7")):
        box.set_input_files(str(tmp_path / name))
        toast = refusals.get(name, name)
        expect(page.locator(".toast-body").filter(has_text=toast).last).to_be_visible()
        expect(value_of(page, "train-max-steps")).to_have_value(steps)
        expect(box).to_have_count(1)  # emptied again: ready for the next file
        expect(page.locator("#train-max-steps").get_by_text("Error", exact=True)).to_have_count(0)
        for close in page.locator(".toast-close").all():
            close.click()
