"""The Train tab's run monitor: follows a run folder (metrics.jsonl from a byte offset, status.json, the log's tail)
and draws what it holds - status line, progress bar with ETA, loss / learning-rate / speed charts, log tail,
checkpoint picker, the finished run's verdict, and whether Stop applies.

`follow` streams a `MonitorView` (one field per monitor component) per change; `MonitorState` is what one follower
has seen so far. The run folder is the truth: a refreshed page or a second tab re-attaches by reading it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pipelines import runs
from pipelines.follow import JobUpdate
from pipelines.training import verdict as tverdict
from pipelines.workspace import human_bytes

from .common import JOB_BADGES, progress_bar_html

PREFERENCE_CURVES = (("rewards/margins", "reward margin"), ("rewards/accuracies", "preference accuracy"))
LOG_LINES = 18  # the monitor's log tail
MARKERS_UP_TO = 30  # points per curve drawn with markers
RATE_WINDOW = 20  # the ETA's rate: seconds per step over the last rows
NO_RUN = "No run yet: set up a run on the left and start it."


class MonitorView(NamedTuple):
    """What the monitor shows, one field per component (the tab wires a MonitorView of its components)."""

    status: Any  # markdown: run, state, reason, latest figures, checkpoints, adapter
    progress: Any  # html: the bar with step / total and the ETA
    loss: Any  # the charts (gr.update() when no row is new)
    learning_rate: Any
    tokens_per_s: Any
    log: Any  # the log's last LOG_LINES lines
    checkpoint: Any  # the checkpoint picker (only when the list changed: a picked one stays picked)
    verdict: Any  # markdown of a finished run's verdict
    verdict_chart: Any
    stop: Any  # the Stop button, enabled for a queued or running run


def apply_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    """`rows` with the metric rows `new` appended; a resume marker first drops the rows after the step resumed
    from (they are trained again)."""
    for r in new:
        if r.get("event") == "resume":
            rows = [x for x in rows if x.get("step", 0) <= r.get("step", 0)]
        elif "step" in r:
            rows.append(r)
    return rows


@dataclass
class MonitorState:
    """What one follower of a run has seen: the metric rows, the step the current trainer process resumed from
    (the ETA counts its steps only), the log tail, and what was sent last (so what did not change is not sent
    again: the checkpoint list, the state the verdict was read for, whether the charts were drawn once)."""

    rows: list[dict] = field(default_factory=list)
    since: int = 0
    log: list[str] = field(default_factory=list)
    checkpoints: list[str] | None = None
    verdict_for: str | None = None
    charts_drawn: bool = False

    def take(self, up: JobUpdate) -> None:
        """Add a follower's update: new metric rows and log lines."""
        self.rows = apply_rows(list(self.rows), up.rows)
        for r in up.rows:
            if r.get("event") == "resume":
                self.since = int(r.get("step") or 0)
        if up.log:
            self.log = (self.log + up.log.splitlines())[-LOG_LINES:]

    def view(self, run: runs.RunDir, st: runs.RunStatus, rows_changed: bool) -> MonitorView:
        """The monitor for `run` with status `st`: the charts only when rows changed (or never drawn), the
        checkpoint picker only when its list changed, the verdict once per state."""
        checkpoint = gr.update()
        if st.checkpoints != self.checkpoints:
            self.checkpoints = st.checkpoints
            checkpoint = gr.update(choices=st.checkpoints, value=st.checkpoints[-1] if st.checkpoints else None)
        charts = figures(self.rows) if rows_changed or not self.charts_drawn else (gr.update(),) * 3
        self.charts_drawn = True
        verdict, verdict_chart = gr.update(), gr.update()
        if self.verdict_for != st.state:
            self.verdict_for = st.state
            verdict, verdict_chart = verdict_view(run, st)
        return MonitorView(status_md(run, st, self.rows), progress_html(st, self.rows, self.since), *charts,
                           "\n".join(self.log), checkpoint, verdict, verdict_chart, stop_button(st))


def no_run(message: str = NO_RUN) -> MonitorView:
    """The monitor with no run to show, and why."""
    return MonitorView(message, "", *figures([]), "", gr.update(choices=[]), "", gr.update(visible=False),
                       stop_button(None))


def stop_button(st: runs.RunStatus | None):
    """Stop is for a run that is queued or running (a stopping one has its request already)."""
    return gr.update(interactive=st is not None and st.state in ("queued", "running"))


# --------------------------------------------------------------------------------------------------- drawing


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


def figures(rows: list[dict]) -> tuple[go.Figure, go.Figure, go.Figure]:
    """(loss, learning rate, tokens per second) charts of the metric rows; an empty one says so."""
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


def duration_text(seconds: float) -> str:
    """A duration as people read it: "40 s", "12 min", "2 h 05 min"."""
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
        caption += f" · ETA {duration_text(rate * (total - step))}" if rate and total else " · ETA estimating…"
    return progress_bar_html(frac, caption)


def status_md(run: runs.RunDir, st: runs.RunStatus, rows: list[dict]) -> str:
    """The run's name and state, its reason, the latest loss / speed / memory, checkpoints and adapter."""
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


def verdict_figure(v: dict | None):
    """The verdict as a chart: base vs tuned bars (SFT: validation loss and each held-out prompt's similarity to the
    reference; DPO / ORPO: preference accuracy and margin). Hidden when there is no verdict to draw."""
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
