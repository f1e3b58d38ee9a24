"""Ollama: a Modelfile beside each GGUF, with its chat template translated to Ollama's Go template syntax, and the
one-line commands that run a GGUF in llama.cpp, Ollama and LM Studio.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import MacTunerError
from ..workspace import atomic_write

# Ollama passes every message as .Messages (system ones included) and the system text as .System (see
# gotemplate.py): the templates render the system prompt from one place only, and each is checked by rendering it
# with Go against its Jinja original (tests/pipelines/test_export_gotemplate.py, and each export's validation).
GO_TEMPLATES = {
    # Gemma folds the system prompt into the first turn after it: "<start_of_turn>user\n{system}\n\n{question}".
    "gemma": ('{{- $first := true }}{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "user" }}<start_of_turn>user\n{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}'
              '{{- $first = false }}{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
              '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ if and $first $.System }}{{ $.System }}'
              '\n\n{{ end }}{{- $first = false }}{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}'
              '{{- end }}{{- end }}',
              ["<end_of_turn>", "<start_of_turn>"]),
    "chatml": ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
               '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}',
               ["<|im_end|>", "<|im_start|>"]),
    "plain": ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "system" }}System: {{ .Content }}\n'
              '{{ else if eq .Role "user" }}User: {{ .Content }}\n{{ if $last }}Assistant:{{ end }}'
              '{{- else if eq .Role "assistant" }}Assistant: {{ .Content }}\n{{ end }}{{- end }}',
              ["\nUser:"]),
}


_FAMILY_PROBES = {  # family -> what its Jinja renders for (Q1, A1, Q2) and for (system S, Q1), generation prompt on
    "gemma": ("<start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model",
              "<start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model"),
    "chatml": ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant",
               "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant"),
    "plain": ("User: Q1\nAssistant: A1\nUser: Q2\nAssistant:", "System: S\nUser: Q1\nAssistant:"),
}


def template_family(chat_template: str | None) -> str | None:
    """'gemma' | 'chatml' | 'plain' when the template renders two probe conversations (several turns; a system
    prompt) the way that family does (decided by rendering, not by reading the Jinja), else None."""
    from ..templates import render_template  # noqa: PLC0415

    if not chat_template:
        return None
    probes = ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "Q2"}],
              [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}])
    outs = []
    for msgs in probes:
        try:
            out = render_template(chat_template, msgs, add_generation_prompt=True, bos_token="<bos>",
                                  eos_token="<eos>")
        except MacTunerError:
            out = ""  # e.g. a template that refuses a system role
        outs.append(out.replace("<bos>", "").replace("<s>", "").strip())
    return next((fam for fam, want in _FAMILY_PROBES.items() if tuple(outs) == want), None)


def modelfile(gguf_path: str | os.PathLike, chat_template: str | None, system: str | None = None,
              stops: list[str] | None = None, base_gguf: str | os.PathLike | None = None) -> Path:
    """Write <stem>.Modelfile beside the GGUF for `ollama create`. The TEMPLATE is a Go template for the Gemma turn
    format, ChatML or the plain fallback, chosen by rendering `chat_template`; any other template is left to
    Ollama (which then reads the GGUF's metadata) and the file says so. With `base_gguf`, `gguf_path` is a LoRA
    GGUF: FROM names the base (same folder) and ADAPTER the LoRA."""
    gguf_path = Path(gguf_path)
    family = template_family(chat_template)
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by MacTuner.",
             f"# Use: ollama create {_ollama_name(gguf_path)} -f {gguf_path.stem}.Modelfile"]
    if base_gguf is not None:
        lines += [f"FROM ./{Path(base_gguf).name}", f"ADAPTER ./{gguf_path.name}"]
    else:
        lines.append(f"FROM ./{gguf_path.name}")
    stop_list = list(stops or [])
    if family:
        tpl, family_stops = GO_TEMPLATES[family]
        lines.append(f'TEMPLATE """{tpl}"""')
        stop_list += [s for s in family_stops if s not in stop_list]
    else:
        lines.append("# NOTE: this model's chat template is not one MacTuner can translate to Ollama's Go template "
                     "syntax (Gemma, ChatML and plain are); Ollama will use the template it derives from the GGUF.")
    for s in stop_list:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    target = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    with atomic_write(target, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return target


def _ollama_name(gguf_path: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower()).strip("-") or "mactuner-model"


def how_to_run(gguf_path: str | os.PathLike, base_gguf: str | os.PathLike | None = None) -> dict:
    """One-line commands that run the GGUF in llama.cpp, Ollama and LM Studio; with `base_gguf`, `gguf_path` is a
    LoRA GGUF applied on that base (LM Studio has no LoRA loading: its line loads the base)."""
    p = Path(gguf_path).resolve()
    mf = p.with_name(f"{p.stem}.Modelfile")
    if base_gguf is not None:
        b = Path(base_gguf).resolve()
        return {"llama.cpp": f'llama-cli -m "{b}" --lora "{p}" -cnv',
                "ollama": f'cd "{p.parent}" && ollama create {_ollama_name(p)} -f "{mf.name}" && '
                          f'ollama run {_ollama_name(p)}',
                "llama-cpp-python": f'Llama(model_path="{b}", lora_path="{p}")'}
    return {"llama.cpp": f'llama-cli -m "{p}" -cnv',
            "ollama": f'cd "{p.parent}" && ollama create {_ollama_name(p)} -f "{mf.name}" && ollama run {_ollama_name(p)}',
            "lm_studio": f'lms import "{p}"'}
