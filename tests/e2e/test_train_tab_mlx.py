"""Browser test of the Train tab with backend mlx on the tiny llama (MLX's CPU build): the pre-flight names the
backend and the memory plan (a 4-bit base), the YAML carries the choice; a long run starts, is watched, stopped (a
checkpoint with the optimizer state), resumed and stopped again; a short one on a 4-bit base runs to its verdict."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_train_tab import fill, fill_until_yaml_holds, value_of

from e2e_helpers import CHROMIUM, new_page, start_studio, stop_studio

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]
pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from pipelines import data
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("e2e-train-mlx") / "ws"
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


def choose(page, eid: str, value) -> None:
    """Pick `value` in a dropdown; typed and confirmed again when a busy page dropped the first try."""
    from playwright.sync_api import expect

    box = page.locator(f"#{eid} input").first
    for _ in range(3):
        box.click()
        box.fill(str(value))
        box.press("Enter")
        try:
            expect(box).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            continue
    expect(box).to_have_value(str(value))


def logged(run: Path, text: str, timeout: float = 60.0) -> bool:
    """Whether `text` appears in the run's log.txt within `timeout` seconds (the trainer writes it as it goes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in (run / "log.txt").read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def set_form(page, base: str, steps: int, name: str, bits: int) -> None:
    from playwright.sync_api import expect

    fill(page, "train-base-model", base)
    fill(page, "train-dataset", "tiny-set")
    choose(page, "train-backend", "mlx")
    choose(page, "train-base-bits", bits)
    fill(page, "train-max-steps", steps)
    fill(page, "train-batch-size", 2)
    fill(page, "train-max-length", 64)
    fill(page, "train-learning-rate", 0.001)
    if not page.locator("#train-save-every").is_visible():
        page.get_by_text("More settings").click()
    expect(value_of(page, "train-save-every")).to_be_visible()
    fill_until_yaml_holds(page, {"train-save-every": 20, "train-run-name": name},
                          ["backend: mlx", f"base_bits: {bits}", "save_every: 20"])


def test_mlx_run_from_the_train_tab(page, studio, tiny_llama_dir):
    from playwright.sync_api import expect

    _url, root, _proc = studio
    set_form(page, str(tiny_llama_dir), 100000, "mlx-long", 0)  # MLX steps of the tiny llama are quick
    page.locator("#train-check").click()
    pre = page.locator("#train-preflight")
    expect(pre).to_contain_text("Backend: MLX")
    expect(pre).to_contain_text("MLX on the CPU")
    expect(pre).to_contain_text("Memory (lora, float32)")
    expect(pre).to_contain_text("fits")
    choose(page, "train-base-bits", 4)
    page.locator("#train-check").click()
    expect(pre).to_contain_text("Memory (lora, 4-bit base")
    expect(pre).to_contain_text("quantized to 4 bits by MLX")
    choose(page, "train-base-bits", 0)
    page.locator("#train-start").click()
    expect(page.locator("#train-action")).to_contain_text("Started")
    expect(page.locator("#train-status")).to_contain_text("running")
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+ / 100000"))
    run = root / "runs" / "mlx-long"
    assert logged(run, "with MLX")  # the log's first lines (the tab's 18-line tail moves on fast)
    expect(page.locator("#train-stop")).to_be_enabled()
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=120_000)
    ckpts = sorted(run.glob("checkpoints/step-*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists() and (ckpts[-1] / "optimizer.safetensors").exists()
    expect(page.locator("#train-ckpt input")).to_have_value(ckpts[-1].name)
    page.locator("#train-resume").click()
    expect(page.locator("#train-status")).to_contain_text("running")
    assert logged(run, f"Resumed from {ckpts[-1].name}")
    expect(page.locator("#train-stop")).to_be_enabled()
    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=120_000)

    set_form(page, str(tiny_llama_dir), 30, "mlx-short", 4)
    page.locator("#train-start").click()
    expect(page.locator("#train-action")).to_contain_text("Started")
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=180_000)
    expect(page.locator("#train-verdict")).to_contain_text("Verdict:", timeout=60_000)
    expect(page.locator("#train-verdict")).to_contain_text("validation loss")
    assert (root / "runs" / "mlx-short" / "adapter" / "adapter_model.safetensors").exists()
