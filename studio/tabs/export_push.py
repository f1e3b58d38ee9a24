"""The Export tab's "Publish to the Hub" section: push the picked export's adapter, merged model and/or GGUF files
to a Hub model repository (private unless ticked public), followed with its own progress bar. Handlers:
studio/handlers/push.py; the work: pipelines/export/push.py."""

from __future__ import annotations

import gradio as gr

from pipelines.export.push import PushRequest

from .. import fields
from ..handlers.common import Context
from ..handlers.push import PushForm, PushHandlers, PushMonitor, PushStarted

HELP = PushRequest.help()


def build(ctx: Context, pick: gr.Dropdown, timer: gr.Timer, tab: gr.Tab) -> None:
    """The section (under the exports list) and its events; `pick` is the export picker it publishes."""
    with gr.Accordion("Publish to the Hub", open=False, elem_id="push-section"):
        note = gr.Markdown("Pick an export above to publish it.", elem_id="push-note")
        with gr.Row():
            repo = gr.Textbox(label="Hub repository", info=HELP["repo_id"], scale=3, elem_id="push-repo")
            token = gr.Textbox(label="Access token (write)", type="password", scale=2, elem_id="push-token",
                               info="Empty: HF_TOKEN (or your `hf auth login`). Never written to disk.")
        with gr.Row():
            parts = fields.CheckboxGroup([], label="What to push", info=HELP["what"], elem_id="push-parts")
            ggufs = fields.CheckboxGroup([], label="GGUF files", visible=False, elem_id="push-ggufs")
        public = gr.Checkbox(value=False, label="Public (new repositories only; default private)",
                             elem_id="push-public")
        with gr.Row():
            push_btn = gr.Button("Push to the Hub", variant="primary", elem_id="push-start")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="push-cancel")
        msg = gr.Markdown(elem_id="push-msg")
        bar = gr.HTML(elem_id="push-progress")
        status = gr.Markdown(elem_id="push-status")
        job = gr.Textbox(visible=False, elem_id="push-job-id")

    handlers = PushHandlers(ctx)
    pick.change(handlers.form, pick, PushForm(parts=parts, ggufs=ggufs, repo=repo, note=note),
                api_visibility="private")
    # preprocess=False: the two checkbox groups are filled per export by page events, so a script's values (the
    # README's "gguf", a GGUF's file name) would be refused as "not in the list of choices"; the handler checks them
    push_btn.click(handlers.start, [pick, repo, token, public, parts, ggufs],
                   PushStarted(message=msg, job=job, token=token), api_name="export_push", preprocess=False)
    cancel_btn.click(handlers.cancel, job, msg, api_visibility="private")
    monitor = PushMonitor(job=job, progress=bar, status=status)
    timer.tick(handlers.poll, job, monitor, api_visibility="private", show_progress="hidden")
    tab.select(handlers.poll, job, monitor, api_visibility="private")
