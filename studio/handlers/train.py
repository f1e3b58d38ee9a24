"""Train tab handlers: the config form ⇄ TrainConfig (and YAML), pre-flight (data, memory, time), launch / stop /
resume, the run lists, and the monitor (train_monitor.py draws it) that follows a run folder.

`TrainHandlers(ctx)`: the tab wires its bound methods. The form's values travel in `FIELDS` order (TrainConfig's
fields: the tab generates the form from them). The run folder is the truth: a refreshed page or a second tab
re-attaches by reading it again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, AsyncIterator, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from pipelines import data as pdata
from pipelines import models, runs
from pipelines.errors import BadInput, MacTunerError
from pipelines.training import (BACKENDS, BASE_BITS, DTYPES, METHODS, OBJECTIVES, SCHEDULERS, TrainConfig, check_data,
                                plan_training)
from pipelines.workspace import human_bytes

from .common import Context, Followers, keep_last_good, refused_on_page, stream, ui_errors
from .train_monitor import MonitorState, MonitorView, apply_rows, duration_text, no_run

log = logging.getLogger("mactuner.studio")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
CHOICES = {"method": list(METHODS), "objective": list(OBJECTIVES), "scheduler": list(SCHEDULERS),
           "dtype": list(DTYPES), "backend": list(BACKENDS), "base_bits": list(BASE_BITS)}
RUN_COLUMNS = ["name", "state", "dataset", "method", "step", "total_steps", "final_loss", "best_eval_loss",
               "duration", "reason"]
FOLLOWERS = Followers()  # one monitor per page: a newer one (another run picked, Start, a reload) ends the older


class YamlView(NamedTuple):
    yaml: str
    command: str


class StartView(NamedTuple):
    message: str
    run: Any  # the run picker, on the new run


class RunLists(NamedTuple):
    """Every list of the tab, read again: runs (picker, history table, overlay choices), datasets, base models."""

    run: Any
    history: pd.DataFrame
    overlay: Any
    dataset: Any
    base_model: Any


def base_model_choices(ctx: Context) -> list[str]:
    rows = models.list_local_models(ctx.ws)
    return ["default"] + [r["path"] for r in rows if r["format"] == "hf-safetensors" and r["source"] != "embedded"]


def dataset_choices(ctx: Context) -> list[str]:
    return sorted({d["name"] for d in pdata.list_datasets(ctx.ws)})


def config_from(values: list) -> TrainConfig:
    """Form values (in FIELDS order) -> TrainConfig; BadInput names a bad field."""
    d = dict(zip(FIELDS, values))
    tm = d.get("target_modules")
    if isinstance(tm, str) and "," in tm:
        d["target_modules"] = [t.strip() for t in tm.split(",") if t.strip()]
    for k, v in list(d.items()):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise BadInput(f"'{k}' is empty: give it a value.")
    return TrainConfig.from_dict(d)


def form_values(cfg: TrainConfig) -> list:
    d = cfg.to_dict()
    if isinstance(d["target_modules"], list):
        d["target_modules"] = ", ".join(d["target_modules"])
    return [d[f] for f in FIELDS]


@ui_errors
def to_yaml(*values) -> YamlView:
    cfg = config_from(list(values))
    return YamlView(cfg.to_yaml(), "mactuner train CONFIG.yaml   # the same command the studio runs for you")


@refused_on_page(lambda message: [gr.skip()] * len(FIELDS))
def from_yaml(path: str | None, request: gr.Request = None):
    """The form's values from an uploaded config YAML (a page-only event). A file that is not a valid config leaves
    the form as it was, with a warning toast: an error would paint 'Error' over every field of the form."""
    if not path:
        raise BadInput("Choose a YAML config file.")
    cfg = TrainConfig.from_yaml(Path(path), allow_empty=False)
    gr.Info(f"Loaded {Path(path).name} into the form.")  # the file box is emptied next, ready for another file
    return form_values(cfg)


def run_choices(ctx: Context) -> list[str]:
    return [r["name"] for r in runs.list_runs(ctx.ws)]


def default_run(ctx: Context) -> str | None:
    active = runs.active_run(ctx.ws)
    if active is not None:
        return active.name
    names = run_choices(ctx)
    return names[0] if names else None


def runs_table(ctx: Context) -> pd.DataFrame:
    rows = runs.list_runs(ctx.ws)
    for r in rows:
        r["duration"] = f"{r['duration'] / 60:.1f} min" if r.get("duration") else ""
        for k in ("final_loss", "best_eval_loss"):
            r[k] = round(r[k], 4) if isinstance(r.get(k), (int, float)) else r.get(k)
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


class TrainHandlers:
    """The Train tab's events, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @refused_on_page(lambda message: f"⚠️ {message}")
    def preflight(self, request: gr.Request, *values) -> str:
        """Check the config and the data as the trainer will, and estimate steps, memory and time before
        starting. On the page refused settings are said in the pre-flight text (and a warning toast) instead of an
        'Error' over it; through the API they are an error. (`request` comes first: Gradio passes it by position.)"""
        plan = plan_training(config_from(list(values)), self.ctx.ws)
        cfg, mem = plan.config, plan.memory
        est = mem.estimate
        backend = "MLX" if plan.backend == "mlx" else "PyTorch"
        lines = [f"**Backend**: {backend} — {plan.backend_reason}",
                 f"**Data**: {plan.usable:,} usable training conversations of {plan.train_rows:,}"
                 f" · {plan.validation_rows:,} validation · {plan.label_tokens:,} trained tokens per epoch",
                 plan.note,
                 f"**Steps**: {plan.total_steps:,} ({plan.steps_per_epoch:,} per epoch at batch {cfg.batch_size} × "
                 f"accumulation {cfg.grad_accum}" + (f", {plan.items:,} packed sequences" if cfg.packing else "") + ")",
                 f"**Memory** ({mem.mode}, {mem.dtype}): about {human_bytes(est.total)} of "
                 f"{human_bytes(mem.available)} {mem.pool} available — {'fits' if mem.fits else 'does NOT fit'}"
                 + (f"; largest batch that fits: {mem.recommended_batch}" if mem.recommended_batch
                    else "; even batch 1 does not fit: shorten max length"),
                 f"**Precision**: {mem.precision}" if mem.precision else ""]
        if plan.seconds is not None:
            lines.append(f"**Time**: roughly {duration_text(plan.seconds)} on this CPU (from a matmul probe; the "
                         "live ETA is measured once training runs)")
        if plan.export:
            marks = {True: "✅", False: "⚠️", None: "–"}
            lines.append("**Export** (GGUF for llama.cpp / Ollama / LM Studio):\n" + "\n".join(
                f"- {marks[c.ok]} {c.name}: {c.detail}" for c in plan.export))
        return "\n\n".join(x for x in lines if x)

    @keep_last_good(StartView)
    def start(self, request: gr.Request, run_name: str, *values) -> StartView:
        """Launch a run of the form's config. Refused on the page: the message under the buttons, the run picker
        left as it was (keep_last_good); through the API, an error."""
        cfg = config_from(list(values))
        check_data(cfg, self.ctx.ws)  # the same clear messages before anything is written
        run = runs.launch(self.ctx.ws, cfg, name=(run_name or "").strip() or None)
        msg = (f"Started **{run.name}**." if run.status().active else
               f"**{run.name}** is queued: it starts when the running job ends (one training job at a time).")
        return StartView(msg, gr.update(choices=run_choices(self.ctx), value=run.name))

    @ui_errors
    def stop(self, selected: str) -> str:
        if not selected:
            raise BadInput("Select a run to stop.")
        st = runs.stop(runs.get_run(self.ctx.ws, selected))
        return f"{selected}: {st.state} — {st.reason or ''}"

    @ui_errors
    def resume(self, selected: str, checkpoint: str | None) -> str:
        if not selected:
            raise BadInput("Select a run to resume.")
        run = runs.resume(self.ctx.ws, runs.get_run(self.ctx.ws, selected), checkpoint or None)
        return f"Resuming **{run.name}** from {checkpoint or 'its latest checkpoint'}."

    @ui_errors
    def load_run_config(self, selected: str) -> list:
        """Put a past run's settings back into the form (to tweak and start again)."""
        if not selected:
            raise BadInput("Select a run first.")
        return form_values(runs.get_run(self.ctx.ws, selected).config())

    def pick_run(self):
        """A page (re)load: the run picker on the running or latest run."""
        return gr.update(choices=run_choices(self.ctx), value=default_run(self.ctx))

    def run_settings(self, selected: str | None) -> list:
        """A page (re)load: the picked run's settings in the form (from its config.yaml), so a reload keeps what was
        set up; with no run (or an unreadable config) the form keeps its values."""
        if selected:
            try:
                return form_values(runs.get_run(self.ctx.ws, selected).config())
            except MacTunerError as e:  # a broken config.yaml: the form keeps its values, the monitor shows the run
                log.warning("run %s: its settings cannot be shown in the form (%s)", selected, e)
        return [gr.update() for _ in FIELDS]

    def history(self) -> pd.DataFrame:
        return runs_table(self.ctx)

    def refresh_lists(self, selected: str | None) -> RunLists:
        names = run_choices(self.ctx)
        sel = selected if selected in names else default_run(self.ctx)
        return RunLists(gr.update(choices=names, value=sel), runs_table(self.ctx), gr.update(choices=names),
                        gr.update(choices=dataset_choices(self.ctx)), gr.update(choices=base_model_choices(self.ctx)))

    @ui_errors
    async def follow(self, selected: str | None, request: gr.Request = None) -> AsyncIterator[MonitorView]:
        """Stream the selected run's monitor: a first view with everything so far, then one as each step, log line
        or state change lands (pipelines.follow reads the run folder from byte offsets), ending with the run. This
        page's newer follower (another run picked, Start, a reload) or a closed page ends the older one. An async
        generator: nothing holds a thread while the run is quiet."""
        stop = FOLLOWERS.start(request)  # first: picking no run (or a deleted one) ends the previous follower too
        if not selected:
            yield no_run()
            return
        try:
            run = runs.get_run(self.ctx.ws, selected)
        except Exception as e:  # noqa: BLE001 - a deleted run folder: say so
            yield no_run(f"Run '{selected}' is not available ({e}).")
            return
        state = MonitorState()
        async for up in stream(runs.follow(run, stop=stop, idle=True)):
            state.take(up)
            yield state.view(run, up.status, rows_changed=bool(up.rows))

    @ui_errors
    async def follow_api(self, run_name: str) -> AsyncIterator[dict]:
        """Watch a run from a script: one dict per change (its status, the new metric rows, the new log text,
        "final" on the last), ending with the run (or when the script goes)."""
        if not run_name:
            raise BadInput("Name the run to follow.")
        async for up in stream(runs.follow(runs.get_run(self.ctx.ws, run_name), idle=True)):
            yield up.to_dict()

    @ui_errors
    def overlay(self, names: list[str]) -> go.Figure:
        fig = go.Figure()
        for name in names or []:
            rows, _ = runs.read_metrics(runs.get_run(self.ctx.ws, name), 0)
            rows = apply_rows([], rows)
            if rows:
                fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r.get("loss") for r in rows], mode="lines",
                                         name=name))
        fig.update_layout(title="Training loss by run", height=300, xaxis_title="step", yaxis_title="loss",
                          margin=dict(l=40, r=10, t=40, b=30))
        return fig
