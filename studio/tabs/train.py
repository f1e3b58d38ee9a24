"""Train tab: LoRA/QLoRA settings (device-aware defaults, YAML in and out), pre-flight estimate, launch, and a
monitor that re-attaches to the run folder: live charts, progress with ETA, log tail, stop, resume, history."""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

import gradio as gr

from pipelines import runs
from pipelines.training import TrainConfig

from .. import fields
from ..handlers.common import Context
from ..handlers.train import (CHOICES, FIELDS, RUN_COLUMNS, RunLists, StartView, TrainHandlers, YamlView,
                              base_model_choices, dataset_choices, default_run, from_yaml, run_choices, runs_table,
                              to_yaml)
from ..handlers.train_monitor import MonitorView
from ..handlers.train_multi import MultiCommandsView, MultiMachineHandlers

HELP = TrainConfig.help()
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
BASIC = ["base_model", "dataset", "dataset_version", "method", "backend", "base_bits", "objective", "rank", "alpha",
         "dropout", "target_modules", "epochs", "max_steps", "learning_rate", "scheduler", "warmup_steps", "batch_size",
         "grad_accum", "max_length"]


def _widget(name: str, ctx: Context):
    label, info, default = name.replace("_", " ").capitalize(), HELP[name], DEFAULTS[name]
    eid = f"train-{name.replace('_', '-')}"
    if name == "base_model":
        return gr.Dropdown(base_model_choices(ctx), value="default", allow_custom_value=True, label=label, info=info,
                           elem_id=eid)
    if name == "dataset":
        return gr.Dropdown(dataset_choices(ctx), value=None, allow_custom_value=True, label=label, info=info,
                           elem_id=eid)
    if name in CHOICES:
        return gr.Dropdown(CHOICES[name], value=default, label=label, info=info, elem_id=eid)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label, info=info, elem_id=eid)
    if isinstance(default, int):
        return fields.Number(value=default, precision=0, label=label, info=info, elem_id=eid)
    if isinstance(default, float):
        return fields.Number(value=default, label=label, info=info, elem_id=eid)
    return gr.Textbox(value=str(default), label=label, info=info, elem_id=eid)


def build(ctx: Context) -> dict:
    with gr.Tab("Train", id="train") as tab:
        widgets: dict = {}
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("#### Set up a run")
                with gr.Group():
                    for name in BASIC:
                        widgets[name] = _widget(name, ctx)
                with gr.Accordion("More settings", open=False):
                    for name in FIELDS:
                        if name not in BASIC:
                            widgets[name] = _widget(name, ctx)
                run_name = gr.Textbox(label="Run name (optional)", elem_id="train-run-name")
                with gr.Row():
                    check_btn = gr.Button("Check data and estimate", elem_id="train-check")
                    start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                preflight = gr.Markdown(elem_id="train-preflight")
                with gr.Accordion("Config as YAML / command line", open=False):
                    yaml_btn = gr.Button("Show YAML", elem_id="train-yaml-btn")
                    yaml_text = gr.Code(language="yaml", interactive=False, elem_id="train-yaml")
                    command = gr.Textbox(label="Command", interactive=False)
                    yaml_file = fields.File(label="Load a config YAML into the form", type="filepath",
                                            file_types=[".yaml", ".yml"], height=80, elem_id="train-yaml-file")
                with gr.Accordion("Train on several machines", open=False, elem_id="train-multi"):
                    with gr.Row():
                        machines = fields.Number(2, precision=0, minimum=2, label="Machines", elem_id="train-machines")
                        per_machine = fields.Number(1, precision=0, minimum=1, label="Processes per machine (GPUs)")
                        head = gr.Textbox("HEAD_IP", label="Head address (reachable by all)")
                        port = fields.Number(29500, precision=0, label="Port")
                    accelerators = gr.Textbox("", label="SkyPilot accelerators (e.g. L4:1; empty: CPUs)")
                    multi_btn = gr.Button("Show the commands", elem_id="train-multi-btn")
                    multi_md = gr.Markdown(elem_id="train-multi-commands")
                    multi_sky = gr.Code(language="yaml", interactive=False, label="SkyPilot task",
                                        elem_id="train-multi-skypilot")
            with gr.Column(scale=3):
                gr.Markdown("#### Monitor")
                with gr.Row():
                    run_sel = gr.Dropdown(run_choices(ctx), value=default_run(ctx), label="Run", scale=3,
                                          elem_id="train-run", allow_custom_value=True)
                    stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", scale=1, elem_id="train-stop",
                                         interactive=False)  # the monitor enables it for a queued or running run
                with gr.Row():
                    ckpt = gr.Dropdown([], label="Checkpoint", scale=2, elem_id="train-ckpt", allow_custom_value=True)
                    resume_btn = gr.Button("Resume from checkpoint", scale=1, elem_id="train-resume")
                    reuse_btn = gr.Button("Copy settings to the form", scale=1, elem_id="train-reuse")
                action = gr.Markdown(elem_id="train-action")
                status = gr.Markdown(elem_id="train-status")
                progress = gr.HTML(elem_id="train-progress")
                verdict = gr.Markdown(elem_id="train-verdict")
                verdict_plot = gr.Plot(elem_id="train-verdict-plot", visible=False)
                loss_plot = gr.Plot(elem_id="train-loss")
                with gr.Row():
                    lr_plot = gr.Plot(elem_id="train-lr")
                    tps_plot = gr.Plot(elem_id="train-tps")
                log = gr.Code(label="Log (tail)", language=None, interactive=False, elem_id="train-log", max_lines=18)
        with gr.Accordion("Run history", open=True):
            history = gr.Dataframe(runs_table(ctx), headers=RUN_COLUMNS, interactive=False, elem_id="train-history")
            with gr.Row():
                overlay_sel = gr.Dropdown(run_choices(ctx), multiselect=True, allow_custom_value=True,
                                          label="Overlay loss curves of", scale=3, elem_id="train-overlay-sel")
                overlay_btn = gr.Button("Overlay", scale=1, elem_id="train-overlay")
            overlay_plot = gr.Plot(elem_id="train-overlay-plot")
        history_timer = gr.Timer(5.0)  # inside the Tab: a component made outside it would join gr.Tabs as a tab

    handlers, multi = TrainHandlers(ctx), MultiMachineHandlers(ctx)
    form = [widgets[n] for n in FIELDS]  # TrainConfig's fields, in the order the handlers take and give them
    monitor = MonitorView(status=status, progress=progress, loss=loss_plot, learning_rate=lr_plot,
                          tokens_per_s=tps_plot, log=log, checkpoint=ckpt, verdict=verdict,
                          verdict_chart=verdict_plot, stop=stop_btn)
    lists = RunLists(run=run_sel, history=history, overlay=overlay_sel, dataset=widgets["dataset"],
                     base_model=widgets["base_model"])
    # the monitor streams: a generator follows the selected run's folder until the run ends (a newer one of this
    # page, or closing it, ends the older); no concurrency limit, so every tab and browser follows at once
    follow = dict(fn=handlers.follow, inputs=run_sel, outputs=monitor, api_visibility="private",
                  show_progress="hidden", concurrency_limit=None, trigger_mode="multiple")
    history_timer.tick(handlers.history, None, history, api_visibility="private", show_progress="hidden")
    run_sel.change(**follow)
    tab.select(handlers.refresh_lists, run_sel, lists, api_visibility="private")
    # a page (re)load: the running or latest run, its settings in the form, and the monitor on it
    gr.on(None, handlers.pick_run, None, run_sel, api_visibility="private", show_progress="hidden").then(
        handlers.run_settings, run_sel, form, api_visibility="private", show_progress="hidden").then(**follow)
    check_btn.click(handlers.preflight, form, preflight, api_name="train_check")
    # a check speaks of the settings it was made for: once any of them changes (typed, loaded), it is taken away
    # (in the page alone: js with no fn, so typing sends the server nothing, and it runs before a later click's check)
    gr.on([w.change for w in form], None, None, preflight, js="() => ''", api_visibility="private",
          show_progress="hidden")
    start_btn.click(handlers.start, [run_name, *form], StartView(message=action, run=run_sel),
                    api_name="train_start").then(
        handlers.refresh_lists, run_sel, lists, api_visibility="private")  # the new run: run_sel.change
    stop_btn.click(handlers.stop, run_sel, action, api_name="train_stop").then(**follow)
    resume_btn.click(handlers.resume, [run_sel, ckpt], action, api_name="train_resume").then(**follow)
    reuse_btn.click(handlers.load_run_config, run_sel, form, api_name="train_run_config")
    yaml_btn.click(to_yaml, form, YamlView(yaml=yaml_text, command=command), api_name="train_yaml")
    fields.empty_after(yaml_file.upload(from_yaml, yaml_file, form, api_visibility="private"), yaml_file)
    multi_btn.click(multi.multi_commands, [run_name, machines, per_machine, head, port, accelerators, *form],
                    MultiCommandsView(commands=multi_md, skypilot=multi_sky), api_name="train_multi_commands")
    overlay_btn.click(handlers.overlay, overlay_sel, overlay_plot, api_name="train_overlay")
    return {"run": run_sel}


def register_api(ctx: Context) -> None:
    handlers = TrainHandlers(ctx)

    def train_runs() -> list[dict]:
        """All runs with state, steps, losses, duration."""
        # "run_path", not "path": gradio_client would take a dict with a "path" key for a file to download
        return [{("run_path" if k == "path" else k): v for k, v in r.items()} for r in runs.list_runs(ctx.ws)]

    gr.api(train_runs, api_name="train_runs")

    async def train_follow(run_name: str) -> AsyncIterator[dict]:
        """Stream a run as it trains: one dict per change (status, the new metric rows, the new log text; "final"
        on the last), ending with the run. From a script: `for up in Client(url).submit(name,
        api_name="/train_follow"): ...`."""
        async for up in handlers.follow_api(run_name):
            yield up

    gr.api(train_follow, api_name="train_follow", concurrency_limit=None)
