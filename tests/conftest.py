"""Shared fixtures: tiny real models built the way a user's folder looks, and an isolated environment.

Session fixtures (built once, read-only for tests - copy before changing anything):

- ``tiny_tokenizer_dir``: a byte-level BPE tokenizer trained here on a few lines (vocab 300) with bos/eos/pad/unk
  and a chat template, saved with ``save_pretrained`` (tokenizer.json, tokenizer_config.json, chat_template.jinja).
- ``tiny_llama_dir``: ``<tmp>/tiny-llama``, a seeded random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads,
  2 kv heads, intermediate 64, 128 positions) saved as model.safetensors, plus that tokenizer.
- ``tiny_gguf``: ``<tmp>/tiny-llama.gguf``, a valid F32 GGUF (llama arch, 2 blocks, SPM vocab of 304 tokens, a chat
  template) written with ``gguf.GGUFWriter``; llama.cpp loads it and completes with it.
- ``spm_llama_dir``: the tiny llama shape with a SentencePiece-style tokenizer that llama.cpp's converter reads (the
  HF -> GGUF round trip of the export tests).
- ``model_variants``: a ``ModelVariants`` whose methods build (once) and return the path of a broken or unusual
  variant: ``no_config``, ``corrupt_safetensors(mode)`` (mode "truncated" | "garbage" | "bad-header"), ``non_causal``
  (BertForMaskedLM), ``pickle_only``, ``malicious_pickle``, ``remote_code``, ``fake_gguf``, ``truncated_gguf``.

Per-test fixtures:

- ``workspace``: ``Workspace.open(tmp_path / "ws")``.
- ``registry``: a fresh ``ModelRegistry`` whose models are unloaded at teardown.
- autouse ``isolated_homes``: HF_HOME / HF_HUB_CACHE / MACTUNER_HOME point into a per-test temp folder (the
  huggingface_hub module constants too), HF_TOKEN and HF_ENDPOINT are unset.
- autouse ``hf_offline``: HF_HUB_OFFLINE=1. huggingface_hub is made to read that variable at every call, so a test
  that needs the Hub goes online with ``monkeypatch.delenv("HF_HUB_OFFLINE")`` (or by overriding ``hf_offline``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# --- isolation that must happen before anything imports huggingface_hub / transformers --------------------------
# huggingface_hub and transformers read HF_HOME & co. once, at import; point them at a throwaway folder so that no
# test can ever read or write ~/.cache/huggingface or ~/.mactuner, whatever the outer environment says.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mactuner-tests-home-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE",
             "HF_TOKEN_PATH", "HF_MODULES_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT",
             "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_var, None)
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf_home")
os.environ["MACTUNER_HOME"] = str(_SESSION_HOME / "mactuner_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype "auto" trains in bf16 mixed precision on a CPU where a calibration finds it faster (AMX / AVX512-BF16) and in
# float32 elsewhere: pin float32 so every machine kind sees the same losses; tests/pipelines/test_precision.py
# covers the choice and the mixed path
os.environ["MACTUNER_TRAIN_DTYPE"] = "float32"

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` (not only `python -m pytest`) must find pipelines/ and studio/
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
from tiny_models import TINY_CHAT_TEMPLATE, TINY_CORPUS, TINY_LLAMA, build_spm_llama, write_tiny_gguf  # noqa: E402,F401


class _EnvFlag:
    """A truthy-when-set stand-in for huggingface_hub.constants.HF_HUB_OFFLINE that reads the environment each time.

    huggingface_hub freezes HF_HUB_OFFLINE at import and `is_offline_mode()` returns that global; with this object
    in its place, `monkeypatch.delenv("HF_HUB_OFFLINE")` really turns offline mode off for one test."""

    def __init__(self, *names: str):
        self.names = names

    def __bool__(self) -> bool:
        return any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in self.names)

    def __repr__(self) -> str:
        return repr(bool(self))


class _FollowConstant(os.PathLike):
    """A path that is whatever huggingface_hub.constants.<name> is at the moment it is used."""

    def __init__(self, name: str):
        self.name = name

    def __fspath__(self) -> str:
        from huggingface_hub import constants

        return os.fspath(getattr(constants, self.name))

    def __str__(self) -> str:
        return self.__fspath__()


# ------------------------------------------------------------------------------------------------ environment


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy`` (minutes each on two cores, e.g. the embedded Gemma on MLX's reference BLAS) run only
    with MACTUNER_HEAVY=1, so the default run stays under ~15 minutes; left out, they show as skipped, saying so."""
    if os.environ.get("MACTUNER_HEAVY") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: set MACTUNER_HEAVY=1 to run it (minutes on two cores)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_homes(tmp_path_factory, monkeypatch):
    """Per-test HF_HOME, HF cache and MACTUNER_HOME; no token, no custom endpoint."""
    home = tmp_path_factory.mktemp("home")
    hf_home, hub_cache = home / "hf_home", home / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("MACTUNER_HOME", str(home / "mactuner_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_assets, _cache_manager

    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    # scan_cache_dir() and cached_assets_path() use copies imported from constants: make them follow constants, so
    # a test (or test_hub.py's own fixture) that repoints constants.HF_HUB_CACHE moves them too.
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", _FollowConstant("HF_HUB_CACHE"))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", _FollowConstant("HF_ASSETS_CACHE"))
    return home


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for every test; `monkeypatch.delenv("HF_HUB_OFFLINE")` in a test turns it off again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", _EnvFlag("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@pytest.fixture
def workspace(tmp_path):
    from pipelines.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


@pytest.fixture
def registry():
    """A fresh ModelRegistry (not the process-wide REGISTRY); everything still loaded is released afterwards."""
    from pipelines.serving.registry import ModelRegistry

    reg = ModelRegistry()
    yield reg
    for name in reg.names():
        reg.unload(name)


# ------------------------------------------------------------------------------------------------ tiny models


def _build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "tiny-tokenizer"
    out.mkdir()
    _build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    out.mkdir()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


class _RunsCode:
    """Pickles as a call to builtins.print: harmless, but torch's weights-only unpickler must refuse it."""

    def __reduce__(self):
        return (print, ("MALICIOUS-PICKLE-RAN",))


class ModelVariants:
    """Derives broken/unusual model folders and files from the tiny models, each built once per session."""

    MALICIOUS_MARKER = "MALICIOUS-PICKLE-RAN"

    def __init__(self, root: Path, llama_dir: Path, gguf_file: Path):
        self.root, self.llama_dir, self.gguf_file = root, llama_dir, gguf_file
        self._cache: dict[str, Path] = {}

    def _once(self, key: str, build) -> Path:
        if key not in self._cache:
            self._cache[key] = build(self.root / key)
        return self._cache[key]

    def _copy_llama(self, dst: Path, skip: tuple[str, ...] = ()) -> Path:
        shutil.copytree(self.llama_dir, dst, ignore=lambda _d, names: [n for n in names if n in skip])
        return dst

    def no_config(self) -> Path:
        """The tiny llama without config.json."""
        return self._once("no-config", lambda d: self._copy_llama(d, skip=("config.json",)))

    def corrupt_safetensors(self, mode: str = "truncated") -> Path:
        """model.safetensors cut in half ("truncated"), replaced by random bytes ("garbage"), or with its JSON
        header zeroed ("bad-header")."""
        if mode not in ("truncated", "garbage", "bad-header"):
            raise ValueError(mode)

        def build(d: Path) -> Path:
            self._copy_llama(d)
            f = d / "model.safetensors"
            data = f.read_bytes()
            if mode == "truncated":
                data = data[: len(data) // 2]
            elif mode == "garbage":
                data = os.urandom(len(data))
            else:
                data = data[:8] + b"\0" * (len(data) - 8)
            f.write_bytes(data)
            return d

        return self._once(f"corrupt-safetensors-{mode}", build)

    def non_causal(self) -> Path:
        """A tiny BertForMaskedLM saved with its config (safetensors)."""

        def build(d: Path) -> Path:
            import torch
            from transformers import BertConfig, BertForMaskedLM

            cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                BertForMaskedLM(cfg).save_pretrained(d)
            return d

        return self._once("tiny-bert", build)

    def _pickle_folder(self, d: Path, extra: dict | None = None) -> Path:
        import torch
        from safetensors.torch import load_file

        self._copy_llama(d, skip=("model.safetensors",))
        state = dict(load_file(self.llama_dir / "model.safetensors"))
        state.update(extra or {})
        torch.save(state, d / "pytorch_model.bin")
        return d

    def pickle_only(self) -> Path:
        """The tiny llama with its weights as a plain-tensor pytorch_model.bin (torch.save), no safetensors."""
        return self._once("tiny-llama-pickle", self._pickle_folder)

    def malicious_pickle(self) -> Path:
        """Like pickle_only, but the pickle also references builtins.print (a callable, not a tensor)."""
        return self._once("tiny-llama-evil-pickle", lambda d: self._pickle_folder(d, {"payload": _RunsCode()}))

    def remote_code(self) -> Path:
        """The tiny llama whose config has auto_map pointing at a modeling file that would leave a marker."""

        def build(d: Path) -> Path:
            import json

            self._copy_llama(d)
            cfg = json.loads((d / "config.json").read_text())
            cfg["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                               "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
            (d / "modeling_custom.py").write_text(
                "from pathlib import Path\nPath(__file__).with_name('REMOTE-CODE-RAN').touch()\n")
            return d

        return self._once("tiny-llama-remote-code", build)

    def remote_code_ran(self) -> bool:
        return (self.root / "tiny-llama-remote-code" / "REMOTE-CODE-RAN").exists()

    def fake_gguf(self) -> Path:
        """A text file renamed model.gguf."""

        def build(d: Path) -> Path:
            d.mkdir()
            f = d / "model.gguf"
            f.write_text("This is a text file, not a model.\n" * 20)
            return f

        return self._once("fake-gguf", build)

    def truncated_gguf(self, fraction: float = 0.5) -> Path:
        """The tiny GGUF cut to `fraction` of its size: valid magic and header, tensor data missing."""

        def build(d: Path) -> Path:
            d.mkdir()
            data = self.gguf_file.read_bytes()
            f = d / "truncated.gguf"
            f.write_bytes(data[: int(len(data) * fraction)])
            return f

        return self._once(f"truncated-gguf-{fraction}", build)


@pytest.fixture(scope="session")
def model_variants(tmp_path_factory, tiny_llama_dir, tiny_gguf) -> ModelVariants:
    return ModelVariants(tmp_path_factory.mktemp("variants"), tiny_llama_dir, tiny_gguf)


@pytest.fixture(scope="session")
def spm_llama_dir(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer llama.cpp's converter reads (see tiny_models.build_spm_llama)."""
    return build_spm_llama(tmp_path_factory.mktemp("spm") / "tiny-spm-llama")
