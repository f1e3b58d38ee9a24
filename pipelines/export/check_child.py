"""The child process of convertible.py: can llama.cpp's converter turn this base model into a GGUF? Run with the
converter on the path (like lora_child.py), never imported by MacTuner itself:

    PYTHONPATH=<converter folder> python -P check_child.py BASE_DIR

It asks the converter itself, without writing anything: its model class for the architecture (the table the
converter looks classes up in), then that class's `set_vocab()` - the step that matches a BPE tokenizer's
pre-tokenizer against the converter's hash table and fails on an unknown one. Prints one JSON line:
{"architecture": {"ok", "detail"}, "tokenizer": {"ok", "detail", "hash"}}.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path


class _Hash(logging.Handler):
    """Keeps the `chkhsh` the converter logs when it does not recognise a pre-tokenizer."""

    def __init__(self):
        super().__init__()
        self.value = None

    def emit(self, record):
        m = re.search(r"chkhsh:\s+([0-9a-f]{64})", record.getMessage())
        if m:
            self.value = m[1]


def _vocab_kind(writer) -> str:
    """What set_vocab wrote: the tokenizer model and pre-tokenizer keys of the GGUF's metadata."""
    kv = writer.kv_data[0]

    def val(key):
        v = kv.get(key)
        return getattr(v, "value", v) if v is not None else None

    return f"tokenizer model {val('tokenizer.ggml.model')!r}" + (
        f", pre-tokenizer {val('tokenizer.ggml.pre')!r}" if val("tokenizer.ggml.pre") else "")


def main(base_dir: Path) -> dict:
    import gguf  # the converter's own gguf (PYTHONPATH)
    from conversion import get_model_class
    from conversion.base import ModelBase

    hparams = ModelBase.load_hparams(base_dir, False)
    arch = (hparams.get("text_config") or {}).get("architectures", hparams.get("architectures") or [None])[0]
    out = {"architecture": {"ok": True, "detail": str(arch)}, "tokenizer": {"ok": None, "detail": "not checked"}}
    try:
        model_class = get_model_class(arch)
    except NotImplementedError:
        out["architecture"] = {"ok": False, "detail": str(arch)}
        return out
    hashes = _Hash()
    logging.getLogger().addHandler(hashes)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        model = model_class(base_dir, gguf.LlamaFileType.ALL_F32, base_dir / "unused.gguf", eager=True,
                            hparams=hparams)
        model.set_vocab()
        out["tokenizer"] = {"ok": True, "detail": _vocab_kind(model.gguf_writer)}
    except NotImplementedError as e:
        out["tokenizer"] = {"ok": False, "detail": str(e), "hash": hashes.value}
    except Exception as e:  # noqa: BLE001 - any other failure of the converter's vocabulary step is the answer
        out["tokenizer"] = {"ok": False, "detail": f"{type(e).__name__}: {str(e)[:300]}", "hash": hashes.value}
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
