"""The journey bar over the tabs: each stage with what is done and what comes next, and the quick start."""

from __future__ import annotations

import gradio as gr

from ..handlers.common import Context
from ..handlers.journey import JourneyHandlers, PageOpen, QuickStartView, Started


def build(ctx: Context) -> dict:
    with gr.Row(elem_id="journey-row"):
        journey = gr.Markdown(elem_id="journey", scale=5)
        with gr.Column(scale=1, min_width=220):
            qs_btn = gr.Button("⚡ Quick start: fine-tune on the sample", variant="primary", elem_id="quick-start")
            gr.Markdown("<small>A short LoRA run of the embedded model on the bundled sample (a few minutes on a "
                        "laptop CPU), then the chat opens with it.</small>")
    qs_status = gr.HTML(elem_id="quick-start-status")
    timer = gr.Timer(2.0, active=False)
    return {"journey": journey, "button": qs_btn, "status": qs_status, "timer": timer}


def wire(ctx: Context, demo: gr.Blocks, parts: dict, tabs: gr.Tabs, chat: dict, train: dict) -> None:
    """Events that reach into other tabs (called once every tab is built)."""
    journey, status, timer = parts["journey"], parts["status"], parts["timer"]
    handlers = JourneyHandlers(ctx)
    parts["button"].click(handlers.start, None, Started(status=status, timer=timer, train_run=train["run"]),
                          api_name="quick_start")
    progress = QuickStartView(status=status, timer=timer, tabs=tabs, model=chat["model"], adapter=chat["adapter"],
                              adapter_b=chat["adapter_b"], note=chat["note"], message=chat["message"], journey=journey)
    timer.tick(handlers.poll, None, progress, api_visibility="private", show_progress="hidden")
    demo.load(handlers.on_load, None, PageOpen(journey=journey, status=status, timer=timer), api_visibility="private")
    refresh = gr.Timer(10.0)
    refresh.tick(handlers.journey, None, journey, api_visibility="private", show_progress="hidden")
