"""What the export steps share: the GGUF file types, progress callbacks, the step error, file-name helpers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

from ..errors import BadInput, MacTunerError

OUTTYPES = ("f32", "f16", "bf16")


QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


# bytes per parameter of each file type (K-quants: average over a typical model, output layer included)
# The quantization an export makes unless told otherwise. Q8_0: on the quick start's LoRA (r16, gemma-3-270m) it
# kept the fine-tune whole (mean log-prob of the tuned answers -0.410 vs -0.406 for the tuned HF model, base
# -7.86) while Q4_K_M lost most of it (-4.65; finetune_survived failed on 8 of 12 training prompts), with an
# importance matrix too (-3.00) - for 15% more bytes (300 vs 261 MB). Figures: README, Export.
DEFAULT_QUANTS = ("Q8_0",)
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "Q8_0": 1.07, "Q6_K": 0.82, "Q5_K_M": 0.71, "Q5_K_S": 0.69,
                   "Q5_0": 0.69, "Q4_K_M": 0.6, "Q4_K_S": 0.57, "Q4_0": 0.56, "Q3_K_M": 0.49, "Q2_K": 0.41}



class RequestFields:
    """help / from_dict / as_dict for a request dataclass whose fields carry their help (`help_meta`); KIND names the
    request in the message for an unknown key."""

    KIND = "export"

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def from_dict(cls, data: dict):
        """From plain values (a job's JSON, the Gradio API); BadInput names an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"Unknown {cls.KIND} setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}).")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)


def help_meta(text: str) -> dict:
    return {"help": text}


class ExportFailed(MacTunerError):
    """A step of the export failed for a reason outside the user's input (the converter crashed, ...)."""

    status = 500


def is_gguf(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic (reads 4 bytes, not the file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def last_lines(text: str, n: int = 12) -> str:
    lines = [ln for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
    return "\n".join(lines[-n:])


def file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "export"


def gguf_type(p: Path) -> str:
    m = re.search(r"-(f32|f16|bf16|[QI]Q?\d\w*)$", p.stem, flags=re.I)
    return m.group(1) if m else "gguf"
