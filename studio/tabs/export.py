"""Export tab: merge a run's adapter, convert to GGUF, quantize, validate (in its own process, followed live), the
exports with their validation tables, Modelfiles and run commands, "open in Chat" for any exported GGUF, and
"Publish to the Hub" (export_push.py)."""

from __future__ import annotations

import gradio as gr

from pipelines import export as ex
from pipelines.export import job as export_job

from .. import fields
from ..handlers.common import Context, ui_errors
from ..handlers.export import (CHECK_COLUMNS, DEFAULT_QUANTS, EXPORT_COLUMNS, TABLE_COLUMNS, Choices, ExportDetails,
                               ExportHandlers, ExportList, ExportMonitor, ExportStarted, HowToRun, OpenedInChat,
                               architectures, export_names, exports_table, run_step, sources)
from . import export_push

HELP = ex.ExportRequest.help()


def build(ctx: Context, tabs: gr.Tabs, chat: dict) -> dict:
    with gr.Tab("Export", id="export") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("#### What to export")
                source = gr.Dropdown(sources(ctx), value=None, allow_custom_value=True, label="Source",
                                     info=HELP["source"], elem_id="export-source")
                base = gr.Textbox(label="Base model (adapters only; optional)", info=HELP["base_model"],
                                  elem_id="export-base")
                name = gr.Textbox(label="Export name (optional)", info=HELP["name"], elem_id="export-name")
                outtypes = fields.CheckboxGroup(list(ex.OUTTYPES), value=["f16"], label="GGUF float types",
                                            info=HELP["outtypes"], elem_id="export-outtypes")
                quants = fields.CheckboxGroup(list(ex.QUANT_TYPES), value=DEFAULT_QUANTS, label="Quantizations",
                                          info=HELP["quants"], elem_id="export-quants")
                validate = gr.Checkbox(value=True, label="Validate each GGUF", info=HELP["validate"],
                                       elem_id="export-validate")
                system = gr.Textbox(label="SYSTEM prompt for the Ollama Modelfile (optional)", lines=2,
                                    elem_id="export-system")
                with gr.Row():
                    check_btn = gr.Button("Check", elem_id="export-check")
                    start_btn = gr.Button("Export", variant="primary", elem_id="export-start")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="export-cancel")
                plan = gr.Markdown(elem_id="export-plan")
                with gr.Accordion("Architectures llama.cpp's converter supports", open=False):
                    archs_btn = gr.Button("List them", elem_id="export-archs-btn")
                    archs = gr.Markdown(elem_id="export-archs")
            with gr.Column(scale=3):
                gr.Markdown("#### Progress")
                job_md = gr.Markdown(elem_id="export-job")
                bar = gr.HTML(elem_id="export-progress")
                log = gr.Code(label="Log (tail)", language=None, interactive=False, elem_id="export-log", max_lines=14)
        with gr.Accordion("Exports", open=True):
            table = gr.Dataframe(exports_table(ctx), headers=EXPORT_COLUMNS, interactive=False,
                                 elem_id="export-list", label="Click a row to see it")
            with gr.Row():
                pick = gr.Dropdown(export_names(ctx), value=None, label="Export", scale=3, elem_id="export-pick",
                                   allow_custom_value=True)
                refresh = gr.Button("↻ Refresh", scale=1, elem_id="export-refresh")
            summary = gr.Markdown(elem_id="export-summary")
            ppl = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, label="Perplexity on held-out text",
                               elem_id="export-table")
            checks = gr.Dataframe(headers=CHECK_COLUMNS, interactive=False, label="Validation checks",
                                  elem_id="export-checks", wrap=True)
            with gr.Row():
                gguf = gr.Dropdown([], label="GGUF file", scale=3, elem_id="export-gguf")
                chat_btn = gr.Button("Open in Chat", variant="primary", scale=1, elem_id="export-open-chat")
            chat_msg = gr.Markdown(elem_id="export-chat-msg")
            run_md = gr.Markdown(elem_id="export-run")
            modelfile = gr.Code(label="Ollama Modelfile", language=None, interactive=False, elem_id="export-modelfile")
        job = gr.Textbox(visible=False, elem_id="export-job-id")  # not gr.State: API clients get the job id
        seen = gr.State(None)
        discover = gr.Timer(5.0)  # finds a job started elsewhere (another tab, the API); the monitor itself streams
        export_push.build(ctx, pick, gr.Timer(2.0), tab)  # the push monitor polls its job

    handlers = ExportHandlers(ctx)
    form = [source, base, name, outtypes, quants]
    check_btn.click(handlers.check, form, plan, api_name="export_check")
    start_btn.click(handlers.start, [*form, validate, system], ExportStarted(message=plan, job=job),
                    api_name="export_start")
    cancel_btn.click(handlers.cancel, job, plan, api_name="export_cancel")
    monitor = ExportMonitor(job=job, progress=bar, status=job_md, log=log, seen=seen, table=table, pick=pick)
    # the monitor streams: a generator follows the job's folder until the job ends (this page's newer one ends it)
    follow = dict(fn=handlers.follow, inputs=[job, seen], outputs=monitor, api_visibility="private",
                  show_progress="hidden", concurrency_limit=None, trigger_mode="multiple")
    job.change(**follow)  # a started job (Start, or one discovered) - and the page load's pick below
    discover.tick(handlers.discover, job, job, api_visibility="private", show_progress="hidden")
    tab.select(**follow)
    tab.select(handlers.refresh_choices, source, Choices(source=source, pick=pick), api_visibility="private")
    refresh.click(handlers.refresh, None, ExportList(table=table, pick=pick), api_visibility="private")
    table.select(handlers.pick_row, table, pick, api_visibility="private")
    pick.change(handlers.details, pick, ExportDetails(summary=summary, perplexity=ppl, checks=checks, gguf=gguf),
                api_visibility="private")
    gguf.change(handlers.gguf_info, [pick, gguf], HowToRun(commands=run_md, modelfile=modelfile),
                api_visibility="private")
    chat_btn.click(handlers.open_in_chat, gguf,
                   OpenedInChat(tabs=tabs, model=chat["model"], model_b=chat["model_b"], message=chat_msg),
                   api_visibility="private")
    archs_btn.click(architectures, None, archs, api_visibility="private")
    return {"tab": tab}


def _no_path_keys(obj):
    """"path" keys renamed "file_path": gradio_client downloads any dict with a "path" key as a file."""
    if isinstance(obj, dict):
        return {("file_path" if k == "path" else k): _no_path_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_path_keys(v) for v in obj]
    return obj


def register_api(ctx: Context) -> None:
    """JSON endpoints for scripts; the step endpoints run as export jobs and stream their status until the end."""

    def export_list() -> list[dict]:
        """Every export: state, GGUF files, validation table."""
        return ex.list_exports(ctx.ws)

    def export_details(name: str) -> dict:
        """One export: per GGUF (file_path) its validation, Modelfile and run commands; the perplexity table."""
        return _no_path_keys(ui_errors(ex.export_details)(ctx.ws, name))

    def export_status(job: str = "") -> dict:
        """An export job's status (default: the running one, else the newest); {} when there is none."""
        def get():
            st = export_job.status(ctx.ws, job) if job else \
                export_job.active(ctx.ws) or next(iter(export_job.list_jobs(ctx.ws)), None)
            return st.to_dict() if st else {}

        return ui_errors(get)()

    def export_merge(adapter: str, base_model: str = "", name: str = "") -> dict:
        """Merge an adapter (a run, its adapter/ or a checkpoint) into its base: exports/<name>/merged/."""
        yield from ui_errors(run_step)(ctx, "merge", {"source": adapter, "base_model": base_model, "name": name})

    def export_convert(hf_dir: str, outtype: str = "f16", name: str = "") -> dict:
        """HF folder -> GGUF (f32 | f16 | bf16) with llama.cpp's converter: exports/<name>/<name>-<type>.gguf."""
        yield from ui_errors(run_step)(ctx, "convert", {"hf_dir": hf_dir, "outtypes": [outtype], "name": name})

    def export_quantize(gguf: str, quants: list[str]) -> dict:
        """A float GGUF -> one quantized GGUF per type, beside it."""
        yield from ui_errors(run_step)(ctx, "quantize", {"gguf": gguf, "quants": quants})

    def export_validate(gguf: str, hf_dir: str = "", base_model: str = "", prompt: str = "") -> dict:
        """Check a GGUF (loads, template, generations, perplexity vs HF, fine-tune survived)."""
        yield from ui_errors(run_step)(ctx, "validate", {"gguf": gguf, "hf": hf_dir, "base_model": base_model,
                                                               "prompt": prompt})

    for fn in (export_list, export_details, export_status, export_merge, export_convert, export_quantize,
               export_validate):
        gr.api(fn, api_name=fn.__name__)
