"""The journey bar and the quick start: where the user is (model → data → train → chat → export) and one click that
fine-tunes the embedded model on the sample through the Train stage's machinery, then opens the chat with it.

`JourneyHandlers(ctx)`: the app wires its bound methods; they return named views of what they change.
"""

from __future__ import annotations

import html
from typing import Any, NamedTuple

import gradio as gr

from pipelines import adapters, quickstart, runs
from pipelines.errors import MacTunerError

from .chat import adapter_choices, adapter_menu, model_choices
from .common import Context, SessionState, ui_errors, unchanged
from .train import run_choices
from .train_monitor import progress_html

_opened = SessionState()  # per page: the quick-start run whose adapter the chat was opened with


class Started(NamedTuple):
    status: str  # html: the quick start's line, with its progress bar
    timer: Any  # the timer that polls it, started
    train_run: Any  # the Train tab's run picker, on the new run: its monitor follows it


class QuickStartView(NamedTuple):
    """The quick start's progress; when its run has finished, the Chat tab opened on its adapter."""

    status: str
    timer: Any
    tabs: Any  # the Chat tab selected
    model: Any  # the chat's model menu, adapter menus, note and message box
    adapter: Any
    adapter_b: Any
    note: Any
    message: Any
    journey: Any


class PageOpen(NamedTuple):
    journey: str
    status: str
    timer: Any


def journey_md(ctx: Context) -> str:
    steps = quickstart.journey(ctx.ws, ctx.registry)
    nxt = next((s for s in steps if not s.done), None)
    cells = [f"{'✅' if s.done else ('👉' if s is nxt else '⬜')} **{i}. {s.name}** <small>{s.detail}</small>"
             for i, s in enumerate(steps, 1)]
    hint = {"Model": "load a model in the **Model** tab (the embedded default loads by itself).",
            "Data": "open your data in the **Data** tab, or press **Quick start** to try the whole journey on the "
                    "sample first.",
            "Train": "train an adapter in the **Train** tab, or press **Quick start** (a few minutes on a laptop "
                     "CPU).",
            "Chat": "in the **Chat** tab, pick a run's adapter in the Adapter menu and talk to your fine-tune.",
            "Export": "turn your fine-tune into a GGUF for llama.cpp, Ollama or LM Studio in the **Export** tab."}
    if nxt is not None and nxt.name == "Data" and steps[2].done:  # the quick start trained on the sample
        hint["Data"] = ("train on your own data: open it in the **Data** tab - or turn the fine-tune you have into a "
                        "GGUF in the **Export** tab.")
    tail = f"\n\n**Next:** {hint[nxt.name]}" if nxt else "\n\nEvery stage done: export again or train another run."
    return " → ".join(cells) + tail


def _busy(st: runs.RunStatus | None) -> bool:
    return st is not None and (st.active or st.state == "queued")


def _status(run: runs.RunDir | None) -> tuple[str, runs.RunStatus | None]:
    if run is None:
        return "", None
    st = run.status()
    rows, _ = runs.read_metrics(run)
    if _busy(st):
        return f"<b>Quick start</b> · run <b>{html.escape(run.name)}</b> " + progress_html(st, rows), st
    reason = html.escape(st.reason or "")
    if st.state == "finished":
        return f"✅ <b>Quick start</b> finished: run <b>{html.escape(run.name)}</b> ({reason}).", st
    return (f"⚠️ <b>Quick start</b> run <b>{html.escape(run.name)}</b> is {html.escape(st.state)}: "
            f"{reason or 'see the Train tab'}."), st


class JourneyHandlers:
    """The journey bar's and the quick start's events, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def journey(self) -> str:
        return journey_md(self.ctx)

    @ui_errors
    def start(self, progress=gr.Progress()) -> Started:
        """Start the quick-start run (preparing the HF copy and the sample dataset first when needed)."""
        run = quickstart.start(self.ctx.ws, progress=lambda f, m: progress(f, desc=m))
        text, _ = _status(run)
        return Started(text, gr.Timer(active=True), gr.update(choices=run_choices(self.ctx), value=run.name))

    def poll(self, request: gr.Request) -> QuickStartView:
        """Progress of the newest quick-start run; when it has finished (and this page has not opened it yet), the
        chat opens with its adapter on the default model, a question of the sample in the message box. The adapter
        answers on the embedded GGUF as a LoRA GGUF (llama.cpp) when it can (adapters.open_adapter)."""
        ctx = self.ctx
        run = quickstart.latest(ctx.ws)
        text, st = _status(run)
        if run is None or _busy(st):  # nothing new on the journey until it ends (its own timer refreshes it)
            return unchanged(QuickStartView, status=text, timer=gr.Timer(active=run is not None))
        if st.state != "finished" or _opened.get(request) == run.name or not run.adapter_dir.exists():
            return unchanged(QuickStartView, status=text, timer=gr.Timer(active=False), journey=journey_md(ctx))
        _opened.set(request, run.name)  # once per page, whatever happens next
        try:
            lm, name, note = adapters.open_adapter(ctx.ws, ctx.registry, str(run.path), current=True)
        except MacTunerError as e:
            return unchanged(QuickStartView, status=f"{text}<br>⚠️ The chat could not open the adapter: "
                                                    f"{html.escape(str(e))}",
                             timer=gr.Timer(active=False), journey=journey_md(ctx))
        said = (f"✅ Fine-tuned: **{lm.name}** + adapter **{name}** (the quick-start run). "
                f"{note[0].upper() + note[1:]}. Ask it something like the sample's questions." if note else
                f"✅ Fine-tuned: **{lm.name}** + adapter **{name}**.")
        return QuickStartView(text, gr.Timer(active=False), gr.Tabs(selected="chat"),
                              gr.update(choices=model_choices(ctx), value=lm.name),
                              gr.update(choices=adapter_menu(ctx, lm.name), value=name),
                              gr.update(choices=adapter_choices(ctx, lm.name)), said, quickstart.QUESTION,
                              journey_md(ctx))

    def on_load(self, request: gr.Request) -> PageOpen:
        """A fresh page: the journey, and the quick start's progress when one runs (the timer re-attaches). A run
        that finished before this page opened does not move the page to the Chat tab."""
        run = quickstart.latest(self.ctx.ws)
        text, st = _status(run)
        active = run is not None and _busy(st)
        if run is not None and not active:
            _opened.set(request, run.name)
        return PageOpen(journey_md(self.ctx), text, gr.Timer(active=active))
