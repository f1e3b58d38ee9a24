"""Data tab: load a file, map it to chat format, clean it (undoable), explore it, save a dataset version."""

from __future__ import annotations

import gradio as gr

from pipelines import data as pdata

from .. import fields
from ..handlers.common import Context
from ..handlers.data import (DATASET_COLUMNS, PREVIEW_ROWS, ROLES, SAVE_AS, TEXT_MODES, ColumnsView, DataHandlers,
                             DataSession, DataView, ExploreView, PageLoad, SaveView, datasets_table, workspace_files)


def build(ctx: Context, max_upload_mb: int = 500) -> dict:
    with gr.Tab("Data", id="data"):
        session = gr.State(DataSession())
        message = gr.Markdown(elem_id="data-message")

        gr.Markdown("#### 1 · Load")
        with gr.Row():
            upload = fields.File(label="Upload CSV, TSV, JSON, JSONL, Parquet, Excel (.xlsx) or text (.txt)",
                             type="filepath", scale=3, file_types=sorted(pdata.SUPPORTED), elem_id="data-upload")
            with gr.Column(scale=2):
                # its choices are the files when the page was built (events refresh them), so a script may name one
                # uploaded since: the handler accepts only files of that list as it is now
                picked = gr.Dropdown(label="…or pick a file in the workspace", choices=workspace_files(ctx),
                                     value=None, allow_custom_value=True, elem_id="data-pick")
                with gr.Row():
                    encoding = gr.Dropdown(["auto", *pdata.ENCODINGS], value="auto", label="Text encoding",
                                           info="auto: detected (shown below); choose one if the preview is garbled",
                                           elem_id="data-encoding")
                    text_mode = gr.Dropdown([(v, k) for k, v in TEXT_MODES.items()], value="auto",
                                            label="Plain-text files (.txt)", elem_id="data-text-mode")
                    header = gr.Checkbox(value=True, label="First line is a header (CSV, TSV)",
                                         info="untick when the file's first line is a row of data",
                                         elem_id="data-header")
                with gr.Row():
                    open_btn = gr.Button("Open", variant="primary", elem_id="data-open")
                    sample_btn = gr.Button("Try the sample dataset", elem_id="data-sample")
        info = gr.Markdown("Upload a file or pick one to start.", elem_id="data-info")
        table = gr.Dataframe(label=f"First {PREVIEW_ROWS} rows", interactive=False, wrap=True, max_height=360,
                             elem_id="data-table")

        gr.Markdown("#### 2 · Map to chat format")
        with gr.Row():
            fmt = gr.Dropdown(list(pdata.FORMATS), value="alpaca", label="Format", elem_id="map-format")
            roles = {r: gr.Dropdown([""], value="", label=f"{r} column", allow_custom_value=True, elem_id=f"map-{r}")
                     for r in ROLES[:6]}
        with gr.Row():
            roles.update({r: gr.Dropdown([""], value="", label=f"{r} column", allow_custom_value=True,
                                         elem_id=f"map-{r}", info=info)
                          for r, info in zip(ROLES[6:], ("preference: the preferred answer",
                                                            "preference: the worse answer",
                                                            "KTO: true / false per answer",
                                                            "tools (functions) the rows may call"))})
        with gr.Row():
            system_prompt = gr.Textbox(label="Constant system prompt (optional)", scale=4, elem_id="map-system-prompt")
            map_btn = gr.Button("Use this mapping", scale=1, elem_id="map-apply")
        check = gr.Markdown("Choose a mapping to see which rows can be used.", elem_id="data-check")

        gr.Markdown("#### 3 · Clean (each step reports rows before → after; undo until saved)")
        with gr.Row():
            with gr.Column():
                miss_cols = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                        label="Missing values in (empty = the mapped columns)",
                                        elem_id="clean-missing-cols")
                with gr.Row():
                    miss_action = gr.Radio(["drop", "fill"], value="drop", label="Rows with missing values")
                    fill_value = gr.Textbox(label="Fill with", value="")
                miss_btn = gr.Button("Apply: missing values", elem_id="clean-missing")
            with gr.Column():
                dup_cols = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                       label="Duplicates on (empty = all columns)",
                                       elem_id="clean-dup-cols")
                near = gr.Checkbox(label="Also near-duplicates (case and whitespace ignored)", value=True)
                dup_btn = gr.Button("Apply: duplicates", elem_id="clean-dups")
                norm_btn = gr.Button("Apply: normalise whitespace, Unicode (NFC), control characters",
                                     elem_id="clean-normalize")
            with gr.Column():
                with gr.Row():
                    min_tok = fields.Number(label="Min tokens", value=1, precision=0)
                    max_tok = fields.Number(label="Max tokens (0 = none)", value=0, precision=0)
                    train_max = fields.Number(label="Training max length", value=1024, precision=0, elem_id="train-max-len")
                len_btn = gr.Button("Apply: token-length filter", elem_id="clean-length")
        with gr.Row():
            undo_btn = gr.Button("Undo last step", elem_id="clean-undo")
            reset_btn = gr.Button("Reset to the file as read", elem_id="clean-reset")
        history = gr.Markdown("No cleaning steps yet.", elem_id="clean-history")

        gr.Markdown("#### 4 · Explore")
        with gr.Row():
            example = fields.Number(label="Example row to preview", value=0, precision=0, minimum=0)
            explore_btn = gr.Button("Analyse", variant="primary", elem_id="data-explore")
        summary = gr.Dataframe(label="Columns", interactive=False, elem_id="eda-summary")
        with gr.Row():
            len_plot = gr.Plot(label="Token lengths", elem_id="eda-lengths")
            stats = gr.Dataframe(label="Length statistics", interactive=False, elem_id="eda-stats")
        with gr.Row():
            turns_plot = gr.Plot(label="Turns per conversation", elem_id="eda-turns")
            roles_plot = gr.Plot(label="Role balance", elem_id="eda-roles")
        preview_note = gr.Markdown(elem_id="eda-preview-note")
        preview = gr.HTML(elem_id="eda-preview")

        gr.Markdown("#### 5 · Save")
        with gr.Row():
            ds_name = gr.Textbox(label="Dataset name (letters, digits, - and _)", elem_id="save-name")
            val_ratio = fields.Slider(0, 0.5, value=0.1, step=0.01, label="Validation share")
            seed = fields.Number(label="Split seed", value=0, precision=0)
            save_btn = gr.Button("Save new version", variant="primary", elem_id="save-dataset")
        with gr.Row():
            save_as = gr.Radio(list(SAVE_AS), value=SAVE_AS[0], label="Preference data: save as",
                               visible=False, elem_id="save-as")
            placeholders = gr.Textbox(label="Fill the template placeholders (name=value, comma-separated)",
                                      value="", visible=False, elem_id="save-placeholders")
        saved_msg = gr.Markdown(elem_id="save-message")
        datasets = gr.Dataframe(value=datasets_table(ctx), headers=DATASET_COLUMNS, interactive=False,
                                label="Saved datasets (offered by the Train tab)", elem_id="datasets-table")

    handlers = DataHandlers(ctx, max_upload_mb)
    panel = DataView(session=session, info=info, table=table, format=fmt, **roles, system_prompt=system_prompt,
                     check=check, save_as=save_as, placeholders=placeholders, history=history, message=message)
    columns = ColumnsView(missing=miss_cols, duplicates=dup_cols, files=picked)
    opened = open_btn.click(handlers.open_file, [session, upload, picked, encoding, text_mode, header], panel,
                            api_name="data_open")
    opened.then(handlers.columns, session, columns, api_visibility="private")
    sample_btn.click(handlers.open_sample, session, panel, api_name="data_open_sample").then(
        handlers.columns, session, columns, api_visibility="private")
    upload.upload(handlers.open_upload, [session, upload, encoding, text_mode, header], panel,
                  api_visibility="private").then(handlers.columns, session, columns, api_visibility="private")
    map_btn.click(handlers.set_mapping, [session, fmt, *(roles[r] for r in ROLES), system_prompt], panel,
                  api_name="data_map")
    miss_btn.click(handlers.clean_missing, [session, miss_cols, miss_action, fill_value], panel,
                   api_name="data_clean_missing")
    dup_btn.click(handlers.clean_duplicates, [session, dup_cols, near], panel, api_name="data_clean_duplicates")
    norm_btn.click(handlers.clean_normalize, session, panel, api_name="data_clean_normalize")
    len_btn.click(handlers.clean_length, [session, min_tok, max_tok, train_max], panel, api_name="data_clean_length")
    undo_btn.click(handlers.undo, session, panel, api_name="data_undo")
    reset_btn.click(handlers.reset, session, panel, api_name="data_reset")
    explore_btn.click(handlers.explore, [session, train_max, example],
                      ExploreView(summary=summary, lengths=len_plot, stats=stats, turns=turns_plot, roles=roles_plot,
                                  preview=preview, note=preview_note), api_name="data_explore")
    save_btn.click(handlers.save, [session, ds_name, val_ratio, seed, save_as, placeholders],
                   SaveView(message=saved_msg, datasets=datasets), api_name="data_save")
    return {"datasets": datasets, "on_load": (handlers.on_load, None, PageLoad(files=picked, datasets=datasets))}


def register_api(ctx: Context) -> None:
    def data_list() -> list[dict]:
        """Saved dataset versions: name, version, train/validation counts, created, source."""
        return pdata.list_datasets(ctx.ws)

    gr.api(data_list, api_name="data_list")
