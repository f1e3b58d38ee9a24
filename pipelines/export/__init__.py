"""Export: a fine-tune (or any HF model) to GGUF files that run in llama.cpp, Ollama and LM Studio.

    plan.py       ExportRequest (the one request: the Export tab, the job and the CLI) and plan_export(), every
                  check before anything is written
    merge.py      merge a LoRA adapter into its base (PEFT merge_and_unload)       -> exports/<name>/merged/
    convert.py    HF -> GGUF with llama.cpp's converter, in a subprocess            -> <name>-f16.gguf
    quantize.py   llama_model_quantize                                              -> <name>-Q4_K_M.gguf
    adapter.py    the LoRA adapter as a llama.cpp LoRA GGUF (lora_child.py runs the converter's naming), with
                  the base's GGUF to apply it on and a Modelfile with ADAPTER         -> lora-gguf/<name>-lora.gguf
    validate.py   loads, chat template, Modelfile template, generations, perplexity, fine-tune survived
                                                                                    -> <stem>.validation.json
    ollama.py     the Ollama Modelfile (Go template) and the run commands           -> <stem>.Modelfile
    convertible.py will a fine-tune export? architecture, tokenizer (the converter's own vocabulary step, in
                  check_child.py) and Modelfile template: the Train tab's pre-flight lines
    families.py   a chat template's family, found by rendering, and its Modelfile Go template (gojson.py: the
                  JSON punctuation of tools and tool calls as Jinja's tojson writes it)
    gotemplate.py a Modelfile TEMPLATE rendered by Go's text/template as Ollama does, compared with the Jinja one
    sizes.py      each GGUF's size, tensor by tensor, before anything is written (the Check's disk estimate)
    run.py        export(): all of the above into exports/<name>/ with export.json; list_exports, export_details
    job.py        the Export stage's jobs (a whole export, or one step) in a process of their own
    push.py       publish an export (adapter, merged model, GGUFs) to a Hub model repository, as a job too
                                                                                    -> <name>/pushes.json
    card.py       the pushed repository's model card: metadata, training, validation tables, run commands
    common.py     file types, progress callbacks, ExportFailed

Every step works alone (`from pipelines.export.quantize import quantize`: the modules are named after their steps,
so the package does not re-export those four functions) and takes `progress(fraction, message)`; files appear under their final name only when
complete (temp name + rename) and nothing existing is overwritten.

    from pipelines import export as ex
    result = ex.export(ws, ex.ExportRequest(source="runs/my-run", quants=["Q8_0"]))
"""

from .adapter import LORA_FOLDER, adapter_gguf, adapter_problem, needs_untied_base
from .common import BYTES_PER_PARAM, DEFAULT_QUANTS, OUTTYPES, QUANT_TYPES, ExportFailed
from .convert import CONVERTER_ENV, check_architecture, converter_dir, supported_architectures
from .families import Translation, translate
from .merge import saved_chat_template
from .ollama import how_to_run, modelfile, template_family
from .plan import ExportPlan, ExportRequest, count_params, disk_check, estimate_bytes, plan_export
from .quantize import quant_name, tensor_types
from .run import (
    ExportResult,
    export,
    export_details,
    gguf_choices,
    gguf_label,
    list_exports,
    lora_row,
    preferred_gguf,
    problems_text,
    validation_sources,
)
from .validate import (
    CHECK_LABELS,
    HELDOUT_TEXT,
    VALIDATION_CONVERSATION,
    VALIDATION_PROMPTS,
    CheckItem,
    PerplexityRow,
    Validation,
    degenerate,
    failed_checks,
    gguf_perplexity,
    hf_perplexity,
)

__all__ = ["BYTES_PER_PARAM", "LORA_FOLDER", "adapter_gguf", "adapter_problem", "needs_untied_base", "lora_row", "CHECK_LABELS", "CONVERTER_ENV", "DEFAULT_QUANTS", "Translation", "translate", "HELDOUT_TEXT",
           "OUTTYPES", "QUANT_TYPES", "VALIDATION_CONVERSATION", "VALIDATION_PROMPTS", "CheckItem", "ExportFailed",
           "ExportPlan", "ExportRequest", "ExportResult", "PerplexityRow", "Validation", "check_architecture",
           "converter_dir", "count_params", "degenerate", "disk_check", "estimate_bytes", "export", "export_details",
           "failed_checks", "gguf_choices", "gguf_label", "gguf_perplexity", "hf_perplexity", "how_to_run",
           "list_exports", "modelfile", "plan_export", "preferred_gguf", "problems_text", "quant_name",
           "saved_chat_template", "supported_architectures", "template_family", "tensor_types", "validation_sources"]
