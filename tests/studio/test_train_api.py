"""The Train stage through the Gradio API: YAML of the form, pre-flight, start a short run on the tiny llama, follow
it to the end through train_runs, and clear errors for bad settings."""

from __future__ import annotations

import time

import pytest

from studio_helpers import launch

pytestmark = pytest.mark.slow


def form(ctx_base: str, **over):
    from pipelines.training import TrainConfig
    from studio.handlers.train import form_values

    cfg = TrainConfig(base_model=ctx_base, dataset="api-set", max_steps=4, batch_size=2, max_length=64, save_every=2,
                      learning_rate=1e-3)
    for k, v in over.items():
        setattr(cfg, k, v)
    return form_values(cfg)


def test_train_through_gradio_client(tmp_path_factory, tiny_llama_dir):
    from gradio_client import Client

    from pipelines import data

    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    try:
        rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} ok"}]}
                for i in range(12)]
        data.save_dataset(ctx.ws, "api-set", rows, {"source": "test"}, val_ratio=0.2)
        c = Client(url, verbose=False)
        yaml_text, command = c.predict(*form(str(tiny_llama_dir)), api_name="/train_yaml")
        assert "max_steps: 4" in yaml_text and command.startswith("mactuner train")
        pre = c.predict(*form(str(tiny_llama_dir)), api_name="/train_check")
        assert "10 usable training conversations" in pre and "Steps**: 4" in pre
        with pytest.raises(Exception, match="learning rate"):
            c.predict(*form(str(tiny_llama_dir), learning_rate=0.0), api_name="/train_check")
        with pytest.raises(Exception, match="nope"):
            c.predict(*form(str(tiny_llama_dir), dataset="nope"), api_name="/train_check")
        msg, _ = c.predict("api-run", *form(str(tiny_llama_dir)), api_name="/train_start")
        assert "api-run" in msg
        t0 = time.time()
        while time.time() - t0 < 180:
            run = {r["name"]: r for r in c.predict(api_name="/train_runs")}["api-run"]
            if run["state"] in ("finished", "failed"):
                break
            time.sleep(1)
        assert run["state"] == "finished", run
        assert run["step"] == 4 and run["final_loss"] is not None
        assert (ctx.ws.runs / "api-run" / "adapter" / "adapter_config.json").exists()
        with pytest.raises(Exception):
            c.predict("no-such-run", api_name="/train_stop")
    finally:
        demo.close()
