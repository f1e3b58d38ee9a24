"""Will a fine-tune of this base model export? The Train tab's pre-flight asks before hours of training:

    for c in export_checks(base_dir, tok.chat_template, tok.bos_token, tok.eos_token):
        print(c.name, c.ok, c.detail)      # architecture / tokenizer / Modelfile template; detail says what to do

- architecture: llama.cpp's converter has a model class for it (else no GGUF at all);
- tokenizer: the converter's vocabulary step accepts it - for a BPE tokenizer, its pre-tokenizer's hash is in the
  converter's table (else the converter stops: "BPE pre-tokenizer was not recognized");
- Modelfile template: the chat template is one of the families the Ollama Modelfile translates (families.py).

The first two are answered by the converter itself in a subprocess (check_child.py, ~2-5 s: it imports torch), and
remembered per base folder and converter while their files stay unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BadInput, MacTunerError
from .common import last_lines
from .convert import check_architecture, converter_dir, converter_env
from .families import translate

CHILD = Path(__file__).with_name("check_child.py")
_CACHE: dict[tuple, dict] = {}


@dataclass
class ExportCheck:
    name: str  # architecture | tokenizer | Modelfile template
    ok: bool | None  # None: could not be checked (the reason is in detail)
    detail: str  # what was found; when not ok, what it means and what to do

    def as_dict(self) -> dict:
        return asdict(self)


def _stamp(base_dir: Path, cdir: Path) -> tuple:
    files = [base_dir / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")]
    files.append(cdir / "conversion" / "base.py")
    return (str(base_dir.resolve()), str(cdir), *(f.stat().st_mtime_ns if f.exists() else 0 for f in files))


def _ask_converter(base_dir: Path, timeout: float) -> dict:
    """check_child.py's answer for `base_dir` (cached while the files stay unchanged)."""
    cdir = converter_dir()
    key = _stamp(base_dir, cdir)
    if key not in _CACHE:
        proc = subprocess.run([sys.executable, "-P", str(CHILD), str(base_dir.resolve())], env=converter_env(cdir),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise MacTunerError(f"the converter could not read this model: {last_lines(proc.stderr, 3)}")
        _CACHE[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _CACHE[key]


def _converter_rows(base_dir: Path, timeout: float) -> list[ExportCheck]:
    try:
        check_architecture(base_dir)  # the converter's table, cached in its folder: no subprocess when it says no
    except BadInput as e:
        return [ExportCheck("architecture", False, f"{e} This fine-tune will train and chat here, but cannot be "
                            "exported to GGUF (llama.cpp, Ollama, LM Studio): to export it, choose a base model of an "
                            "architecture the converter supports (Llama, Qwen2/Qwen3, Gemma 2/3, Mistral, Phi-3, "
                            "SmolLM...)."),
                ExportCheck("tokenizer", None, "not checked: the architecture is not supported")]
    except (MacTunerError, OSError, ValueError):
        pass  # noqa: S110 - the converter is missing or the config unreadable: _ask_converter reports it below
    try:
        answer = _ask_converter(base_dir, timeout)
    except (MacTunerError, OSError, subprocess.TimeoutExpired, ValueError) as e:
        why = str(e) or type(e).__name__
        return [ExportCheck("architecture", None, f"not checked: {why}"),
                ExportCheck("tokenizer", None, f"not checked: {why}")]
    arch, tok = answer["architecture"], answer["tokenizer"]
    rows = [ExportCheck("architecture", True, f"{arch['detail']}: llama.cpp's converter supports it") if arch["ok"]
            else ExportCheck("architecture", False,
                             f"llama.cpp's converter does not support {arch['detail']}: this fine-tune will train and "
                             "chat here, but cannot be exported to GGUF (llama.cpp, Ollama, LM Studio). To export it, "
                             "choose a base model of an architecture the converter supports (Llama, Qwen2/Qwen3, "
                             "Gemma 2/3, Mistral, Phi-3, SmolLM...).")]
    if not arch["ok"]:
        rows.append(ExportCheck("tokenizer", None, "not checked: the architecture is not supported"))
    elif tok["ok"]:
        rows.append(ExportCheck("tokenizer", True, f"the converter reads it ({tok['detail']})"))
    elif "pre-tokenizer was not recognized" in tok["detail"]:
        rows.append(ExportCheck("tokenizer", False, (
            "llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer"
            + (f" (hash {tok['hash'][:16]}...)" if tok.get("hash") else "") + " - it is not in its hash table - so "
            "no GGUF can be written. Choose a base model whose tokenizer is an official release the converter "
            "lists, or update the converter (scripts/setup.sh) if a newer llama.cpp knows it.")))
    else:
        rows.append(ExportCheck("tokenizer", False, f"llama.cpp's converter cannot read this tokenizer "
                                f"({tok['detail']}), so no GGUF can be written; choose another base model."))
    return rows


def tokenizer_problem(hf_dir: str | os.PathLike, timeout: float = 180.0) -> str | None:
    """Why llama.cpp's converter cannot write this model's vocabulary (the tokenizer row's detail), or None when it
    can or could not be asked (the conversion itself then says)."""
    row = _converter_rows(Path(hf_dir), timeout)[1]
    return row.detail if row.ok is False else None


def modelfile_check(chat_template: str | None, bos_token: str = "", eos_token: str = "") -> ExportCheck:
    """Whether the Ollama Modelfile will carry a template translated from `chat_template` (families.translate)."""
    t = translate(chat_template, bos_token, eos_token)
    if t.template is not None:
        return ExportCheck("Modelfile template", True, f"{t.label}: the Ollama Modelfile gets it, translated to Go")
    return ExportCheck("Modelfile template", False, (
        f"the Ollama Modelfile cannot translate this chat template: {t.reason}. Ollama would prompt the model with "
        "a template of its own (llama.cpp and LM Studio read the GGUF's). For Ollama, choose a base model whose "
        "chat template has one of those formats."))


def export_checks(base_dir: str | os.PathLike, chat_template: str | None, bos_token: str = "", eos_token: str = "",
                  timeout: float = 180.0) -> list[ExportCheck]:
    """The three checks for a fine-tune of `base_dir` trained with `chat_template`; never raises (a check that
    cannot run is ok None with the reason)."""
    return [*_converter_rows(Path(base_dir), timeout), modelfile_check(chat_template, bos_token, eos_token)]
