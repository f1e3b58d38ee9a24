"""The journey bar over the tabs: each stage with what is done and what comes next, and the quick start."""

from __future__ import annotations

import gradio as gr

from ..handlers import common as h
from ..handlers import journey as hj


def build(ctx: h.Context) -> dict:
    with gr.Row(elem_id="journey-row"):
        journey = gr.Markdown(elem_id="journey", scale=5)
        with gr.Column(scale=1, min_width=220):
            qs_btn = gr.Button("⚡ Quick start: fine-tune on the sample", variant="primary", elem_id="quick-start")
            gr.Markdown("<small>A short LoRA run of the embedded model on the bundled sample (a few minutes on a "
                        "laptop CPU), then the chat opens with it.</small>")
    qs_status = gr.HTML(elem_id="quick-start-status")
    timer = gr.Timer(2.0, active=False)
    return {"journey": journey, "button": qs_btn, "status": qs_status, "timer": timer}


def wire(ctx: h.Context, demo: gr.Blocks, parts: dict, tabs: gr.Tabs, chat: dict) -> None:
    """Events that reach into other tabs (called once every tab is built)."""
    journey, status, timer = parts["journey"], parts["status"], parts["timer"]
    parts["button"].click(h.bind(hj.start, ctx), None, [status, timer], api_name="quick_start")
    outs = [status, timer, tabs, chat["model"], chat["adapter"], chat["adapter_b"], chat["note"], chat["message"],
            journey]
    timer.tick(h.bind(hj.poll, ctx), None, outs, api_visibility="private", show_progress="hidden")
    demo.load(h.bind(hj.on_load, ctx), None, [journey, status, timer], api_visibility="private")
    refresh = gr.Timer(10.0)
    refresh.tick(h.bind(hj.journey_md, ctx), None, journey, api_visibility="private", show_progress="hidden")
