"""Chat tab: stream answers, stop, regenerate, edit, export/import, adapters, and base-vs-tuned compare."""

from __future__ import annotations

import gradio as gr

from pipelines.chat import ChatParams

from .. import fields
from ..handlers.chat import (BASE, AdapterChoice, Attached, ChatHandlers, ChatView, CompareView, EditView,
                             ExtraModel, ModelMenus, ModelPick, OnDisk, TemplateView, adapter_menu, adapter_sources,
                             edit_last, gguf_files, import_, model_choices, stop)
from ..handlers.common import Context

FIELDS = {f.name: f for f in ChatParams.sampling_fields()}
ELEM_IDS = {"system_prompt": "chat-system", "max_new_tokens": "chat-max-new", "seed": "chat-seed",
            "stop": "chat-stop-strings"}


def sampling_widget(f, prefix: str = "chat"):
    """The form widget of one ChatParams field: a slider from its range, text for the system prompt and stop
    strings, a number for the seed (-1: random; gr.Number shows None as 0, which would be a fixed seed)."""
    md = f.metadata
    elem_id = ELEM_IDS.get(f.name, f"chat-{f.name.replace('_', '-')}").replace("chat-", f"{prefix}-", 1)
    if "range" in md:
        lo, hi, step = md["range"]
        return fields.Slider(lo, hi, value=f.default, step=step, label=md["label"], info=md["help"], elem_id=elem_id)
    if f.name == "seed":
        return fields.Number(label=md["label"], value=-1, precision=0, info=md["help"], elem_id=elem_id)
    if f.name == "system_prompt":
        return gr.Textbox(label=md["label"], lines=3, info=md["help"], elem_id=elem_id)
    return gr.Textbox(label=md["label"], info=md["help"], elem_id=elem_id)



def build(ctx: Context) -> dict:
    with gr.Tab("Chat", id="chat") as tab:
        with gr.Row():
            model_a = gr.Dropdown(model_choices(ctx), label="Model", scale=3, elem_id="chat-model",
                                  allow_custom_value=True)
            adapter_a = gr.Dropdown(adapter_menu(ctx, None), value=BASE, label="Adapter", scale=2,
                                    elem_id="chat-adapter", allow_custom_value=True,
                                    info="attached adapters, then every run's adapter and checkpoints")
            refresh = gr.Button("↻ Models", scale=1, elem_id="chat-refresh")
        model_note = gr.Markdown(elem_id="chat-model-note")
        with gr.Row():
            with gr.Column(scale=3):
                bot = fields.Chatbot(label="Conversation", height=420, elem_id="chat-bot", buttons=["copy"])
                msg = gr.Textbox(placeholder="Message… (Enter sends)", show_label=False, elem_id="chat-input")
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                    regen_btn = gr.Button("Regenerate", elem_id="chat-regen")
                    edit_btn = gr.Button("Edit last", elem_id="chat-edit")
                    clear_btn = gr.Button("Clear", elem_id="chat-clear")
                speed = gr.Markdown(elem_id="chat-speed")
                with gr.Row():
                    export_btn = gr.Button("Export conversation (JSON)", elem_id="chat-export")
                    export_file = fields.File(label="Exported", interactive=False, elem_id="chat-export-file",
                                              height=80)
                    import_file = fields.File(label="Import a conversation (JSON)", type="filepath",
                                              file_types=[".json"], elem_id="chat-import", height=80)
            with gr.Column(scale=2):
                system = sampling_widget(FIELDS["system_prompt"])
                with gr.Accordion("Sampling", open=True):
                    sampling_rest = [sampling_widget(f) for f in ChatParams.sampling_fields()
                                     if f.name != "system_prompt"]
                with gr.Accordion("Adapter (LoRA)", open=False):
                    adapter_path = gr.Dropdown(adapter_sources(ctx), value=None, allow_custom_value=True,
                                               label="Adapter folder (a run's adapter/ or checkpoints/step-N/)",
                                               elem_id="chat-adapter-path")
                    adapter_name = gr.Textbox(label="Name (optional)")
                    attach_btn = gr.Button("Attach to the model", elem_id="chat-attach")
                    adapter_msg = gr.Markdown()
                with gr.Accordion("Chat template in use", open=False):
                    template_btn = gr.Button("Show the template", elem_id="chat-template-btn")
                    template_src = gr.Markdown(elem_id="chat-template-source")
                    template_text = gr.Code(language="jinja2", interactive=False, elem_id="chat-template")

        with gr.Accordion("Compare two models on one prompt", open=False, elem_id="compare"):
            with gr.Row():
                model_b = gr.Dropdown(model_choices(ctx), label="Model B", elem_id="compare-model-b",
                                      allow_custom_value=True)
                adapter_b = gr.Dropdown([BASE], value=BASE, label="Adapter B", elem_id="compare-adapter-b",
                                        allow_custom_value=True)
            with gr.Row():
                extra_path = gr.Dropdown(gguf_files(ctx), value=None, allow_custom_value=True, scale=4,
                                         label="Load another model beside it (a .gguf in the workspace, or any "
                                               "GGUF file / HF folder path)", elem_id="compare-extra")
                extra_btn = gr.Button("Load for comparison", scale=1, elem_id="compare-load")
            compare_msg = gr.Markdown()
            cmp_prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
            with gr.Row():
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-run")
                cmp_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
            with gr.Row():
                with gr.Column():
                    bot_a = fields.Chatbot(label="A", height=300, elem_id="compare-a")
                    speed_a = gr.Markdown(elem_id="compare-speed-a")
                with gr.Column():
                    bot_b = fields.Chatbot(label="B", height=300, elem_id="compare-b")
                    speed_b = gr.Markdown(elem_id="compare-speed-b")

    sampling = [system, *sampling_rest]  # ChatParams.sampling_fields() order, as the handlers take them
    send_inputs = [msg, bot, model_a, adapter_a, *sampling]
    handlers = ChatHandlers(ctx)
    shown = ChatView(conversation=bot, message=msg, speed=speed)
    sent = send_btn.click(handlers.send, send_inputs, shown, api_name="chat_send")
    submitted = msg.submit(handlers.send, send_inputs, shown, api_visibility="private")
    regen = regen_btn.click(handlers.regenerate, [bot, model_a, adapter_a, *sampling], shown,
                            api_name="chat_regenerate")
    stop_btn.click(stop, None, None, api_name="chat_stop")
    edit_btn.click(edit_last, bot, EditView(conversation=bot, message=msg), api_name="chat_edit_last")
    clear_btn.click(lambda: ([], ""), None, [bot, speed], api_visibility="private")
    export_btn.click(handlers.export, [bot, model_a], export_file, api_name="chat_export")
    fields.empty_after(import_file.upload(import_, import_file, bot, api_name="chat_import"), import_file)
    template_btn.click(handlers.template_info, model_a, TemplateView(source=template_src, text=template_text),
                       api_name="chat_template")
    attach_btn.click(handlers.attach, [model_a, adapter_path, adapter_name],
                     Attached(adapter=adapter_a, adapter_b=adapter_b, message=adapter_msg),
                     api_name="chat_attach_adapter")
    menus = ModelMenus(model=model_a, model_b=model_b, adapter=adapter_a, adapter_b=adapter_b, note=model_note)
    refresh.click(handlers.refresh_models, [model_a, model_b, adapter_a], menus, api_visibility="private")
    tab.select(handlers.refresh_models, [model_a, model_b, adapter_a], menus, api_visibility="private")
    tab.select(handlers.on_disk, None, OnDisk(adapters=adapter_path, ggufs=extra_path), api_visibility="private")
    # .input (the user's choice), not .change: choosing an adapter on disk sets the model menu itself
    model_a.input(handlers.pick_model, model_a, ModelPick(adapter=adapter_a, note=model_note),
                  api_visibility="private")
    model_b.input(handlers.pick_model_b, model_b, adapter_b, api_visibility="private")
    adapter_a.input(handlers.choose_adapter, [model_a, adapter_a],
                    AdapterChoice(model=model_a, adapter=adapter_a, adapter_b=adapter_b, note=model_note),
                    api_name="chat_choose_adapter")
    extra_btn.click(handlers.load_extra, extra_path, ExtraModel(model=model_a, model_b=model_b, message=compare_msg),
                    api_name="chat_load_extra")
    cmp_btn.click(handlers.compare, [cmp_prompt, model_a, adapter_a, model_b, adapter_b, *sampling],
                  CompareView(a=bot_a, b=bot_b, speed_a=speed_a, speed_b=speed_b), api_name="chat_compare")
    cmp_stop.click(stop, None, None, api_visibility="private")
    return {"events": [sent, submitted, regen], "model": model_a, "model_b": model_b, "adapter": adapter_a,
            "adapter_b": adapter_b, "note": model_note, "message": msg}
