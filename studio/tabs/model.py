"""Model tab: the current model, device profile, Hub info/download, local models, memory estimate."""

from __future__ import annotations

import gradio as gr

from .. import fields
from ..handlers.common import Context, ui_errors
from ..handlers.model import (ESTIMATE_COLUMNS, LOCAL_COLUMNS, Estimate, HubInfo, ModelHandlers, ModelStatus,
                              current_md, current_model, device_profile, hub_info, hub_info_api, local_models_table,
                              memory_estimate, pick_local)


def build(ctx: Context) -> dict:
    with gr.Tab("Model", id="model"):
        with gr.Row():
            with gr.Column(scale=3):
                current = gr.Markdown(current_md(ctx), elem_id="current-model")
                with gr.Row():
                    default_btn = gr.Button("Load default model (Gemma 3 270M)", variant="primary", elem_id="load-default")
                    unload_btn = gr.Button("Unload", elem_id="unload")
                    prep_btn = gr.Button("Prepare training copy", elem_id="prepare-hf")
                status = gr.Markdown(elem_id="model-status")
            with gr.Column(scale=2):
                device = gr.Markdown("### Device\nDetecting…", elem_id="device-profile")

        with gr.Accordion("Hugging Face Hub", open=True):
            with gr.Row():
                hub_id = gr.Textbox(label="Model id", placeholder="google/gemma-3-270m", scale=3, elem_id="hub-id")
                hub_token = gr.Textbox(label="Access token (optional; HF_TOKEN is used when empty)", type="password",
                                       scale=2, elem_id="hub-token")
            with gr.Row():
                info_btn = gr.Button("Get info (no download)", elem_id="hub-info-btn")
                dl_btn = gr.Button("Download and load", variant="primary", elem_id="hub-download-btn")
            hub_md = gr.Markdown(elem_id="hub-info")
            hub_files = gr.Dataframe(headers=["file", "size"], label="Files", interactive=False, visible=True,
                                     elem_id="hub-files", max_height=260)

        with gr.Accordion("Local models", open=True):
            with gr.Row():
                local_path = gr.Textbox(label="Model folder (config.json + safetensors) or .gguf file", scale=4,
                                        elem_id="local-path", placeholder="~/models/my-model or a name under the workspace's models/")
                trust = gr.Checkbox(label="Trust remote code", value=False, scale=1, elem_id="trust-remote-code")
            with gr.Row():
                load_btn = gr.Button("Load", variant="primary", elem_id="local-load")
                refresh_btn = gr.Button("Refresh list", elem_id="local-refresh")
            local_table = gr.Dataframe(value=local_models_table(ctx), headers=LOCAL_COLUMNS, interactive=False,
                                       label="On this machine (click a row to pick it)", elem_id="local-models")

        with gr.Accordion("Memory estimate and batch-size advice", open=True):
            with gr.Row():
                seq = fields.Slider(64, 8192, value=512, step=64, label="Sequence length (tokens)")
                batch = fields.Slider(1, 64, value=4, step=1, label="Batch size")
                rank = fields.Slider(4, 256, value=16, step=4, label="LoRA rank")
                ckpt = gr.Checkbox(label="Gradient checkpointing", value=False)
            est_table = gr.Dataframe(headers=ESTIMATE_COLUMNS, interactive=False, elem_id="estimate-table")
            advice = gr.Markdown(elem_id="estimate-advice")

    handlers = ModelHandlers(ctx)
    est_inputs = [seq, batch, rank, ckpt]
    estimate = dict(fn=handlers.refresh_estimate, inputs=est_inputs, outputs=Estimate(table=est_table, advice=advice),
                    api_visibility="private")
    loaded = ModelStatus(current=current, status=status)

    def after_load(ev):
        return ev.then(**estimate).then(handlers.local_models, None, local_table, api_visibility="private")

    after_load(default_btn.click(handlers.load_default, None, loaded, api_name="model_load_default"))
    after_load(load_btn.click(handlers.load_local, [local_path, trust], loaded, api_name="model_load"))
    after_load(dl_btn.click(handlers.download_and_load, [hub_id, hub_token], loaded, api_name="model_download"))
    unload_btn.click(handlers.unload, None, loaded, api_name="model_unload").then(**estimate)
    prep_btn.click(handlers.prepare_default_hf, None, loaded, api_name="model_prepare_default_hf")
    info = HubInfo(info=hub_md, files=hub_files)
    info_btn.click(hub_info, [hub_id, hub_token], info, api_name="model_info")
    hub_id.submit(hub_info, [hub_id, hub_token], info, api_visibility="private")
    refresh_btn.click(handlers.local_models, None, local_table, api_name="model_list")
    local_table.select(pick_local, local_table, local_path, api_visibility="private")
    for c in est_inputs:
        c.change(**estimate)

    return {"current": current, "device": device, "estimate": estimate}


def register_api(ctx: Context) -> None:
    """API-only endpoints (no button): JSON views for scripts. gr.api reads type hints, hence the closures.
    Called at the Blocks level (not inside gr.Tabs)."""

    def model_current() -> dict:
        """The current model's description, whether one is loading, and the default model's training copy."""
        return current_model(ctx)

    def device_profile_json() -> dict:
        """This machine's device profile: kind, memory, cores, dtypes, QLoRA support."""
        return device_profile()

    def model_info_json(model_id: str, access_token: str = "") -> dict:
        """Hub info of a model as JSON (no download)."""
        return ui_errors(hub_info_api)(model_id, access_token)

    gr.api(model_current, api_name="model_current")
    gr.api(device_profile_json, api_name="device_profile")
    gr.api(model_info_json, api_name="model_info_json")

    def memory_estimate_json(seq_len: int = 512, batch_size: int = 4, lora_rank: int = 16,
                             gradient_checkpointing: bool = False) -> dict:
        """Memory estimate (inference, LoRA, QLoRA) and batch advice for the current model."""
        table, advice = ui_errors(memory_estimate)(ctx, seq_len, batch_size, lora_rank, gradient_checkpointing)
        return {"rows": table.to_dict(orient="records"), "advice": advice}

    gr.api(memory_estimate_json, api_name="memory_estimate")
