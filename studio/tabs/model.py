"""Model tab: the current model, device profile, Hub info/download, local models, memory estimate."""

from __future__ import annotations

import gradio as gr

from ..handlers import common as h
from ..handlers import model as hm


def build(ctx: h.Context) -> dict:
    with gr.Tab("Model", id="model"):
        with gr.Row():
            with gr.Column(scale=3):
                current = gr.Markdown(hm.current_md(ctx), elem_id="current-model")
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
            local_table = gr.Dataframe(value=hm.local_models_table(ctx), headers=hm.LOCAL_COLUMNS, interactive=False,
                                       label="On this machine (click a row to pick it)", elem_id="local-models")

        with gr.Accordion("Memory estimate and batch-size advice", open=True):
            with gr.Row():
                seq = gr.Slider(64, 8192, value=512, step=64, label="Sequence length (tokens)")
                batch = gr.Slider(1, 64, value=4, step=1, label="Batch size")
                rank = gr.Slider(4, 256, value=16, step=4, label="LoRA rank")
                ckpt = gr.Checkbox(label="Gradient checkpointing", value=False)
            est_table = gr.Dataframe(headers=hm.ESTIMATE_COLUMNS, interactive=False, elem_id="estimate-table")
            advice = gr.Markdown(elem_id="estimate-advice")

    est_inputs = [seq, batch, rank, ckpt]
    estimate = h.bind(hm.memory_estimate, ctx)
    estimate.__name__ = "refresh_estimate"  # private UI events; "memory_estimate" is the public JSON endpoint

    def after_load(ev):
        return ev.then(estimate, est_inputs, [est_table, advice], api_visibility="private").then(
            h.bind(hm.local_models_table, ctx), None, local_table, api_visibility="private")

    after_load(default_btn.click(h.bind(hm.load_default, ctx), None, [current, status], api_name="model_load_default"))
    after_load(load_btn.click(h.bind(hm.load_local, ctx), [local_path, trust], [current, status], api_name="model_load"))
    after_load(dl_btn.click(h.bind(hm.download_and_load, ctx), [hub_id, hub_token], [current, status],
                            api_name="model_download"))
    unload_btn.click(h.bind(hm.unload, ctx), None, [current, status], api_name="model_unload").then(
        estimate, est_inputs, [est_table, advice], api_visibility="private")
    prep_btn.click(h.bind(hm.prepare_default_hf, ctx), None, [current, status], api_name="model_prepare_default_hf")
    info_btn.click(hm.hub_info, [hub_id, hub_token], [hub_md, hub_files], api_name="model_info")
    hub_id.submit(hm.hub_info, [hub_id, hub_token], [hub_md, hub_files], api_visibility="private")
    refresh_btn.click(h.bind(hm.local_models_table, ctx), None, local_table, api_name="model_list")
    local_table.select(hm.pick_local, local_table, local_path, api_visibility="private")
    for c in est_inputs:
        c.change(estimate, est_inputs, [est_table, advice], api_visibility="private")

    return {"current": current, "device": device, "est_inputs": est_inputs, "est_outputs": [est_table, advice],
            "estimate": estimate}


def register_api(ctx: h.Context) -> None:
    """API-only endpoints (no button): JSON views for scripts. gr.api reads type hints, hence the closures.
    Called at the Blocks level (not inside gr.Tabs)."""

    def model_current() -> dict:
        """The current model's description, whether one is loading, and the default model's training copy."""
        return hm.current_model(ctx)

    def device_profile() -> dict:
        """This machine's device profile: kind, memory, cores, dtypes, QLoRA support."""
        return hm.device_profile()

    def model_info_json(model_id: str, access_token: str = "") -> dict:
        """Hub info of a model as JSON (no download)."""
        return h.ui_errors(hm.hub_info_api)(model_id, access_token)

    gr.api(model_current, api_name="model_current")
    gr.api(device_profile, api_name="device_profile")
    gr.api(model_info_json, api_name="model_info_json")

    def memory_estimate(seq_len: int = 512, batch_size: int = 4, lora_rank: int = 16,
                        gradient_checkpointing: bool = False) -> dict:
        """Memory estimate (inference, LoRA, QLoRA) and batch advice for the current model."""
        table, advice = h.ui_errors(hm.memory_estimate)(ctx, seq_len, batch_size, lora_rank, gradient_checkpointing)
        return {"rows": table.to_dict(orient="records"), "advice": advice}

    gr.api(memory_estimate, api_name="memory_estimate")
