"""The Train stage through the Gradio API: YAML of the form, pre-flight, start a short run on the tiny llama, follow
it to the end through train_runs, and clear errors for bad settings. Also the Train handlers called directly: the
form after a page load, the Stop button's state, and what the monitor shows at step 0, 1 and 2."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from studio_helpers import launch

from pipelines import runs


def form(ctx_base: str, **over):
    from pipelines.training import TrainConfig
    from studio.handlers.train import form_values

    cfg = TrainConfig(base_model=ctx_base, dataset="api-set", max_steps=4, batch_size=2, max_length=64, save_every=2,
                      learning_rate=1e-3)
    for k, v in over.items():
        setattr(cfg, k, v)
    return form_values(cfg)


@pytest.mark.slow
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
        assert re.search(r"\*\*Time\*\*: roughly \d+ s on this CPU", pre), pre  # seconds, not "0 min"
        with pytest.raises(Exception, match="learning rate"):
            c.predict(*form(str(tiny_llama_dir), learning_rate=0.0), api_name="/train_check")
        with pytest.raises(Exception, match="nope"):
            c.predict(*form(str(tiny_llama_dir), dataset="nope"), api_name="/train_check")
        msg, _ = c.predict("api-run", *form(str(tiny_llama_dir)), api_name="/train_start")
        assert "api-run" in msg
        # watch it from the script: /train_follow streams one update per change, each new step as it lands
        updates = list(c.submit("api-run", api_name="/train_follow"))
        steps = [r["step"] for u in updates for r in u["rows"] if "step" in r]
        assert steps == [1, 2, 3, 4], steps  # every step once, in order: read from byte offsets, never again
        assert updates[-1]["final"] and updates[-1]["status"]["state"] == "finished"
        assert not any(u["final"] for u in updates[:-1])
        log = "".join(u["log"] for u in updates)
        assert log.count("\n") >= 3 and "finished:" in log  # the log streams too, to its last line
        with pytest.raises(Exception, match="no-such-run"):
            c.submit("no-such-run", api_name="/train_follow").result()
        run = {r["name"]: r for r in c.predict(api_name="/train_runs")}["api-run"]
        assert run["state"] == "finished", run
        assert run["step"] == 4 and run["final_loss"] is not None
        assert (ctx.ws.runs / "api-run" / "adapter" / "adapter_config.json").exists()
        with pytest.raises(Exception):
            c.predict("no-such-run", api_name="/train_stop")
    finally:
        demo.close()


# ------------------------------------------------------------------------------------ handlers, called directly


@pytest.fixture
def ctx(workspace):
    from pipelines.serving import registry
    from studio.handlers.common import Context

    return Context(workspace, registry.ModelRegistry(), prepare_hf=False)


def fake_run(ws, name, state, created, **cfg_over):
    """A run folder as the trainer leaves it (config.yaml, status.json); "running" points at this live process."""
    import psutil

    from pipelines.training import TrainConfig

    d = ws.runs / name
    d.mkdir(parents=True)
    cfg = TrainConfig(**{"base_model": "/models/tiny", "dataset": "my-set", "dataset_version": 2, **cfg_over})
    cfg.to_yaml(d / "config.yaml")
    st = {"state": state, "created": created, "reason": None, "started": created}
    if state in ("running", "stopping"):
        st.update(pid=os.getpid(), create_time=psutil.Process().create_time())
    (d / "status.json").write_text(json.dumps(st))
    return cfg


def page_load(ctx):
    """What a page (re)load shows: the picked run, then the form's values from its settings."""
    from studio.handlers.train import TrainHandlers

    handlers = TrainHandlers(ctx)
    sel = handlers.pick_run()
    return sel, handlers.run_settings(sel["value"])


def test_page_load_shows_the_latest_runs_settings(ctx):
    from studio.handlers import train as ht

    sel, values = page_load(ctx)  # no run yet: the form keeps what it shows (its defaults)
    assert sel["value"] is None and all("value" not in v for v in values)
    fake_run(ctx.ws, "older", "finished", 1.0, max_steps=11)
    cfg = fake_run(ctx.ws, "latest", "finished", 2.0, max_steps=77, learning_rate=3e-4, rank=4, packing=True,
                   target_modules=["q_proj", "v_proj"])
    sel, values = page_load(ctx)
    assert sel["value"] == "latest" and sel["choices"] == ["latest", "older"]
    assert values == ht.form_values(cfg)
    form = dict(zip(ht.FIELDS, values))
    assert form["max_steps"] == 77 and form["rank"] == 4 and form["packing"] is True
    assert form["target_modules"] == "q_proj, v_proj" and form["dataset"] == "my-set"
    fake_run(ctx.ws, "training", "running", 0.5, max_steps=5000)  # a running run wins over a newer finished one
    sel, values = page_load(ctx)
    assert sel["value"] == "training" and dict(zip(ht.FIELDS, values))["max_steps"] == 5000
    (ctx.ws.runs / "training" / "config.yaml").write_text("max_steps: [oops\n")  # unreadable: form untouched
    sel, values = page_load(ctx)
    assert sel["value"] == "training" and all("value" not in v for v in values)


def monitor_now(ctx, selected):
    """The first view a monitor opened now on `selected` streams (what a page picking that run shows)."""
    import asyncio

    from studio.handlers.train import TrainHandlers

    async def first():
        follower = TrainHandlers(ctx).follow(selected)
        try:
            return await anext(follower)
        finally:
            await follower.aclose()

    return asyncio.run(first())


def test_stop_button_follows_the_selected_run(ctx):
    from studio.handlers.train_monitor import stop_button

    assert monitor_now(ctx, None).stop["interactive"] is False  # nothing to stop
    fake_run(ctx.ws, "done", "finished", 1.0)
    fake_run(ctx.ws, "live", "running", 2.0)
    assert monitor_now(ctx, "done").stop["interactive"] is False
    assert monitor_now(ctx, "live").stop["interactive"] is True
    assert monitor_now(ctx, "gone").stop["interactive"] is False
    assert stop_button(runs.RunStatus(state="queued"))["interactive"] is True
    for state in ("stopping", "stopped", "failed", "finished"):
        assert stop_button(runs.RunStatus(state=state))["interactive"] is False


def test_monitor_at_step_0_1_and_2(ctx):
    """No rate before two steps: the ETA says "estimating…" (never 0 s, NaN or a huge number); a one-point loss
    curve is drawn with a marker; empty charts say why they are empty."""
    from pipelines import runs
    from studio.handlers.train_monitor import figures, progress_html

    fake_run(ctx.ws, "r", "running", 1.0, max_steps=100)
    run = runs.get_run(ctx.ws, "r")
    out = monitor_now(ctx, "r")
    assert "step 0 / ?" in out.progress and "estimating" in out.progress and "starting" in out.progress
    assert not out.loss.data and out.loss.layout.annotations[0].text == "no steps yet"
    row = {"step": 1, "total_steps": 100, "loss": 2.5, "learning_rate": 1e-4, "tokens_per_s": 900.0, "elapsed": 41.0}
    run.append_metrics(row)  # step 1's elapsed time holds the model load: no rate from it
    out = monitor_now(ctx, "r")
    assert "step 1 / 100" in out.progress and "ETA estimating…" in out.progress
    assert not any(bad in out.progress for bad in ("0 s", "nan", "inf", " min", " h "))
    assert len(out.loss.data) == 1 and "markers" in out.loss.data[0].mode and list(out.loss.data[0].y) == [2.5]
    assert "loss 2.5000" in out.status and "nan" not in out.status
    run.append_metrics({**row, "step": 2, "loss": 2.4, "elapsed": 41.5})  # 0.5 s per step, 98 to go: 49 s
    assert "step 2 / 100" in (progress := monitor_now(ctx, "r").progress) and "ETA 49 s" in progress
    # a resumed run: the rate is measured on the new process's steps only
    run.append_metrics({"event": "resume", "step": 2})
    run.append_metrics({**row, "step": 3, "elapsed": 90.0})
    assert "step 3 / 100" in (progress := monitor_now(ctx, "r").progress) and "ETA estimating…" in progress
    run.append_metrics({**row, "step": 4, "elapsed": 91.0})
    assert "ETA 2 min" in monitor_now(ctx, "r").progress  # 1 s per step, 96 to go
    many = [{**row, "step": i, "elapsed": 40.0 + 60.0 * i} for i in range(1, 60)]  # long curves: lines alone
    assert figures(many)[0].data[0].mode == "lines"
    assert "ETA 41 min" in progress_html(runs.RunStatus(state="running"), many)
    assert "ETA" not in progress_html(runs.RunStatus(state="finished"), many)


def test_follow_streams_each_step_and_ends_with_the_run(ctx):
    """The monitor is an async generator: a first update with what is there, then each new step within about a
    second, and it ends with the run; the same browser starting a newer follower (or closing the page) ends the
    older, and picking no run ends it too."""
    import asyncio
    from types import SimpleNamespace

    from pipelines import runs
    from studio.handlers.train import TrainHandlers

    fake_run(ctx.ws, "r", "running", 1.0, max_steps=100)
    run = runs.get_run(ctx.ws, "r")
    run.log_path.write_text("loading\n")
    page = SimpleNamespace(session_hash="page-1")
    handlers = TrainHandlers(ctx)

    async def scenario():
        gen = handlers.follow("r", page)
        out = await anext(gen)
        assert "running" in out.status and "step 0 / ?" in out.progress and out.log == "loading"
        row = {"step": 1, "total_steps": 100, "loss": 2.5, "learning_rate": 1e-4, "tokens_per_s": 900.0,
               "elapsed": 4.0}
        run.append_metrics(row)
        with open(run.log_path, "a") as fh:
            fh.write("step 1 done\n")
        t0 = time.monotonic()
        out = await anext(gen)
        assert time.monotonic() - t0 < 1.5  # it lands within about a second
        assert "step 1 / 100" in out.progress and out.log == "loading\nstep 1 done" and list(out.loss.data[0].y) == [2.5]
        with open(run.log_path, "a") as fh:
            fh.write("a log line only\n")
        out = await anext(gen)  # no new row: the charts are left as they are, the log moves on
        assert out.loss == gr_skip() and out.log.endswith("a log line only")
        newer = handlers.follow("r", page)  # a reload / another run picked in the same page
        assert "step 1 / 100" in (await anext(newer)).progress  # the newer one starts with everything so far
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(gen), 3)  # the older one ends at its next tick
        other = handlers.follow("r", SimpleNamespace(session_hash="page-2"))  # a second tab follows as well
        await anext(other)
        nothing = handlers.follow(None, SimpleNamespace(session_hash="page-2"))  # that tab picks no run
        assert "No run yet" in (await anext(nothing)).status
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(other), 3)  # ... which ends its follower of "r"
        st = json.loads(run.status_path.read_text())
        run.status_path.write_text(json.dumps({**st, "state": "finished", "pid": None}))
        last = await asyncio.wait_for(anext(newer), 3)
        assert "finished" in last.status and last.stop["interactive"] is False
        with pytest.raises(StopAsyncIteration):
            await anext(newer)  # ends with the run

    asyncio.run(scenario())


def gr_skip():
    import gradio as gr

    return gr.update()
