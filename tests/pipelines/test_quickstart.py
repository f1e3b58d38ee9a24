"""pipelines/quickstart.py: the sample saved once as its dataset, the run launched through the Train stage's
machinery (a run like any other, in the run history), its adapter answering in the chat; the journey's steps.
The default model's HF copy is stood in for by the tiny llama (copied where the studio keeps the copy)."""

from __future__ import annotations

import shutil

import pytest

from pipelines import adapters, chat, data, jobs, models, quickstart, runs
from pipelines.serving.registry import ModelRegistry


class _NoModel:
    def current(self):
        return None

    def names(self):
        return []

    def get(self, name):
        return None


def test_sample_dataset_saved_once(workspace):
    assert quickstart.ensure_dataset(workspace) == quickstart.DATASET
    first = [d for d in data.list_datasets(workspace) if d["name"] == quickstart.DATASET]
    assert len(first) == 1
    quickstart.ensure_dataset(workspace)
    again = [d for d in data.list_datasets(workspace) if d["name"] == quickstart.DATASET]
    assert again == first  # no second version


def test_journey_on_an_empty_workspace(workspace):
    steps = quickstart.journey(workspace, _NoModel())
    assert [s.name for s in steps] == ["Model", "Data", "Train", "Chat", "Export"]
    assert not any(s.done for s in steps)
    assert steps[2].detail == "no run yet"


@pytest.mark.slow
def test_quick_start_trains_a_run_the_chat_answers_with(workspace, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, models.default_hf_path(workspace))
    said = []
    run = quickstart.start(workspace, progress=lambda f, m: said.append(m))
    assert run.name == "quick-start"
    assert any("sample dataset" in m for m in said)
    st = jobs.wait(run, timeout=600)
    assert st.state == "finished", st
    listed = runs.list_runs(workspace)
    assert [r["name"] for r in listed] == ["quick-start"]
    assert listed[0]["dataset"].startswith(quickstart.DATASET)
    cfg = run.config()
    assert (cfg.rank, cfg.epochs, cfg.learning_rate) == (quickstart.SETTINGS["rank"], quickstart.SETTINGS["epochs"],
                                                         quickstart.SETTINGS["learning_rate"])
    assert quickstart.latest(workspace).name == "quick-start"

    reg = ModelRegistry()
    try:
        lm, name, note = adapters.open_adapter(workspace, reg, str(run.path), current=True)
        assert lm.name == models.DEFAULT_HF_NAME  # named after what it is, not "hf"
        assert note and "loaded" in note
        steps = {s.name: s for s in quickstart.journey(workspace, reg)}
        assert steps["Train"].done and steps["Chat"].done and not steps["Export"].done
        p = chat.ChatParams(max_new_tokens=4, temperature=0.0, adapter=name)
        chunks = list(chat.stream_chat(lm, [{"role": "user", "content": quickstart.QUESTION}], p))
        assert chunks[-1].n_tokens >= 1
    finally:
        for n in reg.names():
            reg.unload(n)

    # A second quick start is a new run beside the first.
    second = quickstart.start(workspace)
    assert second.name == "quick-start-2"
    runs.stop(second)
    assert jobs.wait(second, timeout=300).state in ("stopped", "finished")
