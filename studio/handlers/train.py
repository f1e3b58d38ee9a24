"""Train tab handlers: the config form ⇄ TrainConfig (and YAML), pre-flight (data, memory, time), launch / stop /
resume, and the monitor that follows a run folder (metrics.jsonl read from a byte offset, status.json, log tail).

The run folder is the truth: a refreshed page or a second tab re-attaches by reading it again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from pipelines import data as pdata
from pipelines import models, runs
from pipelines.errors import BadInput, MacTunerError
from pipelines.training import (BACKENDS, BASE_BITS, DTYPES, METHODS, OBJECTIVES, SCHEDULERS, TrainConfig, check_data,
                                plan_training)
from pipelines.training import verdict as tverdict
from pipelines.workspace import human_bytes

from .common import JOB_BADGES, Context, Followers, progress_bar_html, stream, ui_errors

log = logging.getLogger("mactuner.studio")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
CHOICES = {"method": list(METHODS), "objective": list(OBJECTIVES), "scheduler": list(SCHEDULERS),
           "dtype": list(DTYPES), "backend": list(BACKENDS), "base_bits": list(BASE_BITS)}
PREFERENCE_CURVES = (("rewards/margins", "reward margin"), ("rewards/accuracies", "preference accuracy"))
LOG_LINES = 18  # the monitor's log tail
MARKERS_UP_TO = 30  # points per curve drawn with markers
RATE_WINDOW = 20  # the ETA's rate: seconds per step over the last rows
RUN_COLUMNS = ["name", "state", "dataset", "method", "step", "total_steps", "final_loss", "best_eval_loss",
               "duration", "reason"]


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
def to_yaml(*values):
    cfg = config_from(list(values))
    return cfg.to_yaml(), "mactuner train CONFIG.yaml   # the same command the studio runs for you"


@ui_errors
def from_yaml(path: str | None):
    if not path:
        raise BadInput("Choose a YAML config file.")
    cfg = TrainConfig.from_yaml(Path(path))
    return form_values(cfg)


@ui_errors
def preflight(ctx: Context, *values):
    """Check the config and the data as the trainer will, and estimate steps, memory and time before starting."""
    plan = plan_training(config_from(list(values)), ctx.ws)
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
        lines.append(f"**Time**: roughly {plan.seconds / 60:.0f} min on this CPU (from a matmul probe; the live ETA "
                     "is measured once training runs)")
    if plan.export:
        marks = {True: "✅", False: "⚠️", None: "–"}
        lines.append("**Export** (GGUF for llama.cpp / Ollama / LM Studio):\n" + "\n".join(
            f"- {marks[c.ok]} {c.name}: {c.detail}" for c in plan.export))
    return "\n\n".join(x for x in lines if x)


@ui_errors
def start(ctx: Context, run_name: str, *values):
    cfg = config_from(list(values))
    check_data(cfg, ctx.ws)  # the same clear messages before anything is written
    run = runs.launch(ctx.ws, cfg, name=(run_name or "").strip() or None)
    msg = (f"Started **{run.name}**." if run.status().active else
           f"**{run.name}** is queued: it starts when the running job ends (one training job at a time).")
    return msg, gr.update(choices=run_choices(ctx), value=run.name)


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


def refresh_lists(ctx: Context, selected: str | None):
    names = run_choices(ctx)
    sel = selected if selected in names else default_run(ctx)
    return (gr.update(choices=names, value=sel), runs_table(ctx), gr.update(choices=names),
            gr.update(choices=dataset_choices(ctx)), gr.update(choices=base_model_choices(ctx)))


def _apply_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    for r in new:
        if r.get("event") == "resume":  # rows after a resume marker restart from step N+1
            rows = [x for x in rows if x.get("step", 0) <= r.get("step", 0)]
        elif "step" in r:
            rows.append(r)
    return rows


def _mode(n: int) -> str:
    """Markers while a curve has few points: one point drawn as a line alone is invisible."""
    return "lines+markers" if n <= MARKERS_UP_TO else "lines"


def _preference_traces(fig: go.Figure, df: pd.DataFrame, mode: str) -> bool:
    """DPO / ORPO rows: the reward margin and the preference accuracy (train, and on the validation split at eval
    steps) on the loss chart's right axis. True when any was drawn."""
    drawn = False
    for key, name in PREFERENCE_CURVES:
        for col, label, how in ((key, name, mode), (f"eval_{key}", f"eval {name}", "lines+markers")):
            if col in df and df[col].notna().any():
                part = df[df[col].notna()]
                fig.add_trace(go.Scatter(x=part["step"], y=part[col], mode=how, name=label, yaxis="y2",
                                         line=dict(dash="dot")))
                drawn = True
    if drawn:
        fig.update_layout(yaxis2=dict(title="margin · accuracy", overlaying="y", side="right", showgrid=False))
    return drawn


def _figures(rows: list[dict]):
    df = pd.DataFrame(rows)
    loss, lr, tps = go.Figure(), go.Figure(), go.Figure()
    pref = False
    if not df.empty:
        mode = _mode(len(df))
        if "loss" in df:
            loss.add_trace(go.Scatter(x=df["step"], y=df["loss"], mode=mode, name="train loss"))
        if "eval_loss" in df and df["eval_loss"].notna().any():
            ev = df[df["eval_loss"].notna()]
            loss.add_trace(go.Scatter(x=ev["step"], y=ev["eval_loss"], mode="lines+markers", name="eval loss"))
        pref = _preference_traces(loss, df, mode)
        if "learning_rate" in df:
            lr.add_trace(go.Scatter(x=df["step"], y=df["learning_rate"], mode=mode, name="learning rate"))
        if "tokens_per_s" in df:
            tps.add_trace(go.Scatter(x=df["step"], y=df["tokens_per_s"], mode=mode, name="tokens/s"))
    loss_title = "Loss, reward margin and preference accuracy" if pref else "Loss"
    for fig, title in ((loss, loss_title), (lr, "Learning rate"), (tps, "Tokens per second")):
        fig.update_layout(title=title, height=260, margin=dict(l=40, r=10, t=40, b=30), xaxis_title="step")
        if not fig.data:
            fig.add_annotation(text="no steps yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    if pref:
        loss.update_layout(margin=dict(l=40, r=60, t=40, b=30))  # room for the right axis
    return loss, lr, tps


def _duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _seconds_per_step(rows: list[dict], since: int = 0) -> float | None:
    """Seconds per step from the recent rows of the current trainer process (rows after step `since`, the last
    resume): None until two of its steps are done (the first one's elapsed time holds the model load)."""
    seg = [r for r in rows[-RATE_WINDOW:] if r.get("step", 0) > since and isinstance(r.get("elapsed"), (int, float))]
    if len(seg) < 2:
        return None
    steps, secs = seg[-1]["step"] - seg[0]["step"], seg[-1]["elapsed"] - seg[0]["elapsed"]
    rate = secs / steps if steps > 0 else math.nan
    return rate if math.isfinite(rate) and rate > 0 else None


def progress_html(st: runs.RunStatus, rows: list[dict], since: int = 0) -> str:
    """The bar and its caption: step / total, and while running the ETA from the measured rate ("estimating…"
    until two steps of this trainer process are done)."""
    last = rows[-1] if rows else {}
    step = last.get("step") or st.step or 0
    total = last.get("total_steps") or st.total_steps or 0
    frac = min(1.0, step / total) if total else 0.0
    caption = f"step {step} / {total or '?'} ({100 * frac:.0f}%)"
    state = st.state
    if state == "queued":
        caption += " · queued: it starts when the running job ends"
    elif state == "running" and not rows:
        caption += " · starting: loading the model and the data… · ETA estimating…"
    elif state == "running" and total and step >= total:
        caption += " · finishing: saving the adapter…"
    elif state == "running":
        rate = _seconds_per_step(rows, since)
        caption += f" · ETA {_duration_text(rate * (total - step))}" if rate and total else " · ETA estimating…"
    return progress_bar_html(frac, caption)


def _status_md(run: runs.RunDir, st: runs.RunStatus, rows: list[dict]) -> str:
    badge = JOB_BADGES.get(st.state, st.state)
    last = rows[-1] if rows else {}
    bits = [f"### {run.name} — {badge}"]
    if st.reason:
        bits.append(st.reason)
    if last:
        figs = [f"loss {last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else "loss —"]
        if last.get("tokens_per_s"):
            figs.append(f"{last['tokens_per_s']:.0f} tok/s")
        if last.get("peak_memory"):
            figs.append(f"peak memory {human_bytes(last['peak_memory'])}")
        if last.get("device_peak_memory"):  # CUDA's allocator, or MLX's (Metal buffers live outside RSS)
            figs.append(f"device peak {human_bytes(last['device_peak_memory'])}")
        bits.append(" · ".join(figs))
    if st.checkpoints:
        bits.append("Checkpoints: " + ", ".join(st.checkpoints))
    if run.adapter_dir.exists():
        bits.append(f"Adapter: `{run.adapter_dir}` (open it in the Chat tab)")
    return "\n\n".join(bits)


def stop_button(st: runs.RunStatus | None):
    """Stop is for a run that is queued or running (a stopping one has its request already)."""
    return gr.update(interactive=st is not None and st.state in ("queued", "running"))


def _no_run(message: str, cache: dict | None = None) -> tuple:
    return (cache or {}, message, "", *_figures([]), "", gr.update(choices=[]), "", gr.update(visible=False),
            stop_button(None))


def _monitor(run: runs.RunDir, st: runs.RunStatus, cache: dict, rows_changed: bool = True) -> tuple:
    """The monitor's outputs for `run` with status `st` and what `cache` holds (rows, log lines); the charts and the
    checkpoint picker only when they changed (a picked checkpoint stays picked while the run trains)."""
    ckpts = st.checkpoints
    ck = gr.update()
    if ckpts != cache.get("ckpts"):
        cache["ckpts"] = ckpts
        ck = gr.update(choices=ckpts, value=ckpts[-1] if ckpts else None)
    figs = _figures(cache["rows"]) if rows_changed else (gr.update(),) * 3
    return (cache, _status_md(run, st, cache["rows"]), progress_html(st, cache["rows"], cache.get("since", 0)),
            *figs, "\n".join(cache.get("log") or []), ck, *_verdict_once(run, st, cache), stop_button(st))


def _verdict_once(run: runs.RunDir, st: runs.RunStatus, cache: dict) -> tuple:
    """The verdict's markdown and chart, read once per state (not at every step of a running run)."""
    key = st.state
    if cache.get("verdict_for") == key:
        return gr.update(), gr.update()
    cache["verdict_for"] = key
    return verdict_view(run, st)


def _take_rows(cache: dict, new: list[dict]) -> None:
    cache["rows"] = _apply_rows(list(cache["rows"]), new)
    for r in new:
        if r.get("event") == "resume":  # the ETA's rate counts the resumed process's steps only
            cache["since"] = int(r.get("step") or 0)


def poll(ctx: Context, selected: str | None, cache: dict | None):
    """One look at the selected run: new metric rows since the last offset, status, progress, charts, log tail, and
    whether Stop applies (`follow` streams the same outputs as the run changes)."""
    cache = dict(cache or {})
    if not selected:
        return _no_run("No run yet: set up a run on the left and start it.", cache)
    try:
        run = runs.get_run(ctx.ws, selected)
    except Exception as e:  # noqa: BLE001 - a deleted run folder: say so
        return _no_run(f"Run '{selected}' is not available ({e}).")
    if cache.get("run") != selected:
        cache = {"run": selected, "offset": 0, "rows": [], "since": 0}
    new, cache["offset"] = runs.read_metrics(run, cache["offset"])
    _take_rows(cache, new)
    cache["log"] = run.log_tail(LOG_LINES).splitlines()
    cache.pop("ckpts", None)
    cache.pop("verdict_for", None)
    return _monitor(run, run.status(), cache)


FOLLOWERS = Followers()


@ui_errors
async def follow(ctx: Context, selected: str | None, request: gr.Request = None):
    """Stream the selected run's monitor: a first update with everything so far, then one as each step, log line
    or state change lands (pipelines.follow reads the run folder from byte offsets), ending with the run. This
    browser's newer follower (another run picked, Start, a reload) or a closed page ends the older one. An async
    generator: nothing holds a thread while the run is quiet."""
    stop = FOLLOWERS.start(request)  # first: picking no run (or a deleted one) ends the previous follower too
    if not selected:
        yield _no_run("No run yet: set up a run on the left and start it.")
        return
    try:
        run = runs.get_run(ctx.ws, selected)
    except Exception as e:  # noqa: BLE001 - a deleted run folder: say so
        yield _no_run(f"Run '{selected}' is not available ({e}).")
        return
    cache = {"run": selected, "rows": [], "since": 0, "log": []}
    async for up in stream(runs.follow(run, stop=stop, idle=True)):
        _take_rows(cache, up.rows)
        if up.log:
            cache["log"] = (cache["log"] + up.log.splitlines())[-LOG_LINES:]
        yield _monitor(run, up.status, cache, rows_changed=bool(up.rows) or "shown" not in cache)
        cache["shown"] = True


@ui_errors
async def follow_api(ctx: Context, run_name: str):
    """Watch a run from a script: one dict per change (its status, the new metric rows, the new log text,
    "final" on the last), ending with the run (or when the script goes)."""
    if not run_name:
        raise BadInput("Name the run to follow.")
    async for up in stream(runs.follow(runs.get_run(ctx.ws, run_name), idle=True)):
        yield up.to_dict()


def verdict_figure(v: dict | None):
    """The verdict as a chart: base vs tuned bars (SFT: validation loss and each held-out prompt's similarity to the
    reference; DPO / ORPO: preference accuracy and margin). Hidden when there is no verdict to draw."""
    from plotly.subplots import make_subplots  # noqa: PLC0415

    if not v or v.get("error") or "base" not in v:
        return gr.update(visible=False)
    b, t = v["base"], v["tuned"]
    if v.get("kind") == "preference":
        left, right = ("preference accuracy", b["accuracy"], t["accuracy"]), ("log-prob margin", b["margin"], t["margin"])
        xs = [["pairs"], ["pairs"]]
        pairs = [([left[1]], [left[2]]), ([right[1]], [right[2]])]
        titles = (left[0], right[0])
    else:
        prompts = v.get("prompts") or []
        xs = [["validation"], [f"prompt {i + 1}" for i in range(len(prompts))]]
        pairs = [([b["loss"]], [t["loss"]]),
                 ([r["base_similarity"] for r in prompts], [r["tuned_similarity"] for r in prompts])]
        titles = ("validation loss (lower is better)", "similarity to the reference (higher is better)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, (x, (base_y, tuned_y)) in enumerate(zip(xs, pairs), start=1):
        fig.add_bar(x=x, y=base_y, name="base", marker_color="#9ca3af", showlegend=col == 1, row=1, col=col)
        fig.add_bar(x=x, y=tuned_y, name="tuned", marker_color="#f97316", showlegend=col == 1, row=1, col=col)
    fig.update_layout(title="Base vs tuned", barmode="group", height=260, margin=dict(l=40, r=10, t=60, b=30))
    return gr.update(value=fig, visible=True)


def verdict_view(run: runs.RunDir, st: runs.RunStatus) -> tuple:
    """(markdown, chart) of a finished run's verdict (runs/<run>/verdict.json, written by the trainer)."""
    if st.state != "finished":
        return "", gr.update(visible=False)
    v = tverdict.read_verdict(run.path)
    return tverdict.verdict_markdown(v), verdict_figure(v)


@ui_errors
def stop(ctx: Context, selected: str):
    if not selected:
        raise BadInput("Select a run to stop.")
    st = runs.stop(runs.get_run(ctx.ws, selected))
    return f"{selected}: {st.state} — {st.reason or ''}"


@ui_errors
def resume(ctx: Context, selected: str, checkpoint: str | None):
    if not selected:
        raise BadInput("Select a run to resume.")
    run = runs.resume(ctx.ws, runs.get_run(ctx.ws, selected), checkpoint or None)
    return f"Resuming **{run.name}** from {checkpoint or 'its latest checkpoint'}."


@ui_errors
def load_run_config(ctx: Context, selected: str):
    """Put a past run's settings back into the form (to tweak and start again)."""
    if not selected:
        raise BadInput("Select a run first.")
    return form_values(runs.get_run(ctx.ws, selected).config())


def on_load(ctx: Context):
    """A page (re)load: select the running or latest run and show its settings in the form (from its config.yaml),
    so a reload keeps what was set up; with no run (or an unreadable config) the form keeps its values."""
    sel = default_run(ctx)
    values = [gr.update() for _ in FIELDS]
    if sel:
        try:
            values = form_values(runs.get_run(ctx.ws, sel).config())
        except MacTunerError as e:  # a broken config.yaml: the form keeps its values, the monitor shows the run
            log.warning("run %s: its settings cannot be shown in the form (%s)", sel, e)
    return gr.update(choices=run_choices(ctx), value=sel), *values


@ui_errors
def overlay(ctx: Context, names: list[str]):
    fig = go.Figure()
    for name in names or []:
        rows, _ = runs.read_metrics(runs.get_run(ctx.ws, name), 0)
        rows = _apply_rows([], rows)
        if rows:
            fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r.get("loss") for r in rows], mode="lines",
                                     name=name))
    fig.update_layout(title="Training loss by run", height=300, xaxis_title="step", yaxis_title="loss",
                      margin=dict(l=40, r=10, t=40, b=30))
    return fig
