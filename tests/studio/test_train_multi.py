"""The Train tab's "Train on several machines": the handler turns the form's settings into the torchrun and
accelerate commands and a SkyPilot task for N machines; bad fields are one-line errors; the accordion is wired."""

from __future__ import annotations

import json

import gradio as gr
import pytest
import yaml


def _form(ws, model_dir) -> list:
    from studio.handlers import train as ht

    d = ws.datasets / "chat" / "v1"
    d.mkdir(parents=True)
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (d / "train.jsonl").write_text(json.dumps(row) + "\n")
    return ht.form_values(ht.TrainConfig(base_model=str(model_dir), dataset="chat", max_steps=4))


def test_commands_from_the_form(workspace, tiny_llama_dir):
    from pipelines.serving.registry import ModelRegistry
    from studio.handlers.common import Context
    from studio.handlers.train_multi import MultiMachineHandlers

    multi = MultiMachineHandlers(Context(workspace, ModelRegistry(), prepare_hf=False))
    form = _form(workspace, tiny_llama_dir)
    md, sky = multi.multi_commands("big-run", 4, 2, "10.0.0.7", 29501, "A100:2", *form)
    assert "--nnodes 4" in md and "--rdzv-endpoint 10.0.0.7:29501" in md and "--rdzv-id big-run" in md
    assert f"{workspace.root}/big-run.yaml" in md and "--machine_rank 3" in md and "num_processes: 8" in md
    task = yaml.safe_load(sky)
    assert task["num_nodes"] == 4 and task["resources"] == {"accelerators": "A100:2"}
    assert "--nproc-per-node 2" in task["run"] and "--name big-run" in task["run"]
    md, _sky = multi.multi_commands("", 2, 1, "", None, "", *form)  # defaults: a dated name, HEAD_IP, 29500
    assert "HEAD_IP:29500" in md and "-chat" in md
    with pytest.raises(gr.Error, match="between 2 and 1024"):
        multi.multi_commands("x", 1, 1, "h", 29500, "", *form)
    with pytest.raises(gr.Error, match="whole number"):
        multi.multi_commands("x", "two", 1, "h", 29500, "", *form)


def test_the_accordion_is_in_the_train_tab(workspace):
    from pipelines.serving.registry import ModelRegistry
    from studio.app import build_app
    from studio.handlers import common as h

    app = build_app(h.Context(workspace, ModelRegistry(), prepare_hf=False))
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"train-multi", "train-machines", "train-multi-btn", "train-multi-commands", "train-multi-skypilot"} <= ids
    assert any(getattr(d, "api_name", None) == "train_multi_commands" for d in app.fns.values())
