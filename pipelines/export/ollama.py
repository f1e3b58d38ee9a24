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

GO_TEMPLATES = {
    "gemma": ('{{- if .System }}<start_of_turn>user\n{{ .System }}\n\n{{ end }}'
              '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "user" }}{{ if or $.System (ne $i 0) }}<start_of_turn>user\n{{ end }}{{ .Content }}'
              '<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}'
              '{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
              '{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}',
              ["<end_of_turn>", "<start_of_turn>"]),
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
               '{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}',
               ["<|im_end|>", "<|im_start|>"]),
    "plain": ('{{- if .System }}System: {{ .System }}\n{{ end }}'
              '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
              '{{- if eq .Role "user" }}User: {{ .Content }}\n{{ if $last }}Assistant:{{ end }}'
              '{{- else if eq .Role "assistant" }}Assistant: {{ .Content }}\n{{ end }}{{- end }}',
              ["\nUser:"]),
}


def template_family(chat_template: str | None) -> str | None:
    """'gemma' | 'chatml' | 'plain' when the template renders a probe conversation the way that family does
    (decided by rendering, not by reading the Jinja), else None."""
    from ..templates import render_template  # noqa: PLC0415

    if not chat_template:
        return None
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    try:
        out = render_template(chat_template, msgs, add_generation_prompt=True, bos_token="<bos>", eos_token="<eos>")
    except MacTunerError:
        return None
    out = out.replace("<bos>", "").replace("<s>", "")
    if out.strip() == ("<start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
                       "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model").strip():
        return "gemma"
    if out.strip() == ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                       "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant").strip():
        return "chatml"
    if out.strip() == "User: Q1\nAssistant: A1\nUser: Q2\nAssistant:":
        return "plain"
    return None


def modelfile(gguf_path: str | os.PathLike, chat_template: str | None, system: str | None = None,
              stops: list[str] | None = None) -> Path:
    """Write <stem>.Modelfile beside the GGUF for `ollama create`. The TEMPLATE is a Go template for the Gemma turn
    format, ChatML or the plain fallback, chosen by rendering `chat_template`; any other template is left to
    Ollama (which then reads the GGUF's metadata) and the file says so."""
    gguf_path = Path(gguf_path)
    family = template_family(chat_template)
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by MacTuner.",
             f"# Use: ollama create {_ollama_name(gguf_path)} -f {gguf_path.stem}.Modelfile", f"FROM ./{gguf_path.name}"]
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


def how_to_run(gguf_path: str | os.PathLike) -> dict:
    """One-line commands that run the GGUF in llama.cpp, Ollama and LM Studio."""
    p = Path(gguf_path).resolve()
    mf = p.with_name(f"{p.stem}.Modelfile")
    return {"llama.cpp": f'llama-cli -m "{p}" -cnv',
            "ollama": f'cd "{p.parent}" && ollama create {_ollama_name(p)} -f "{mf.name}" && ollama run {_ollama_name(p)}',
            "lm_studio": f'lms import "{p}"'}
