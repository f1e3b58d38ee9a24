"""Ollama: a Modelfile beside each GGUF, with its chat template translated to Ollama's Go template syntax, and the
one-line commands that run a GGUF in llama.cpp, Ollama and LM Studio.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..workspace import atomic_write
from .families import translate

OLLAMA_FALLBACK = ("Ollama will use a template of its own instead: the closest of its built-in templates to the "
                   "GGUF's chat template (within 100 edits), else the bare prompt - not the prompt this model was "
                   "trained with, so it may answer badly or never stop")


def template_family(chat_template: str | None) -> str | None:
    """The family whose Modelfile template translates `chat_template` (families.translate: decided by rendering
    probe conversations, never by the model's name): chatml | smollm3 | llama3 | mistral | phi3 | phi4 | gemma |
    plain, or None."""
    return translate(chat_template).family


def modelfile(gguf_path: str | os.PathLike, chat_template: str | None, system: str | None = None,
              stops: list[str] | None = None, base_gguf: str | os.PathLike | None = None, bos_token: str = "",
              eos_token: str = "") -> Path:
    """Write <stem>.Modelfile beside the GGUF for `ollama create`: the TEMPLATE translated from `chat_template` to
    Ollama's Go template syntax (families.translate; bos/eos_token: the tokenizer's) with its PARAMETER stop lines;
    a template that is none of the families gets no TEMPLATE and the file says why and what Ollama does then. With
    `base_gguf`, `gguf_path` is a LoRA GGUF: FROM names the base (same folder) and ADAPTER the LoRA."""
    gguf_path = Path(gguf_path)
    t = translate(chat_template, bos_token, eos_token)
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by MacTuner.",
             f"# Use: ollama create {_ollama_name(gguf_path)} -f {gguf_path.stem}.Modelfile"]
    if base_gguf is not None:
        lines += [f"FROM ./{Path(base_gguf).name}", f"ADAPTER ./{gguf_path.name}"]
    else:
        lines.append(f"FROM ./{gguf_path.name}")
    stop_list = list(stops or [])
    if t.template is not None and '"""' not in t.template:
        lines += [f"# Chat template: {t.label}, translated to Go; checked against the original by the export's "
                  "validation.", f'TEMPLATE """{t.template}"""']
        stop_list += [s for s in t.stops if s not in stop_list]
    else:
        why = t.reason or 'the translation holds """, which a Modelfile cannot quote'
        lines.append(f"# NOTE: no TEMPLATE: MacTuner cannot translate this model's chat template ({why}). "
                     f"{OLLAMA_FALLBACK}.")
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
