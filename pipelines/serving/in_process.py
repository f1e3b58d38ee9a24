"""What the two in-process backends share - the transformers one (hf.py) and the MLX one (mlx.py): an HF tokenizer,
and a model that runs one generation or adapter change at a time. Torch-free, so the MLX backend does not import
torch for it.

    HFTokenizerFacts   template, special tokens, BOS rule and end-of-turn ids read from an HF tokenizer
    InProcessBackend   a ModelBackend answering the prompt's questions from its `facts` (an HFTokenizerFacts), with
                       the idle gate `_wait_idle` its generations, adapter changes and close() take turns through
"""

from __future__ import annotations

import functools
import threading

from ..chat.params import END_OF_TURN_TOKENS
from .backend import Halted, ModelBackend


class HFTokenizerFacts:
    """What the prompt needs from an HF tokenizer. The template is read each time (a tokenizer's template may be
    edited); the rest is computed once."""

    def __init__(self, tokenizer, generation_config=None, name: str = "the model"):
        self.tokenizer, self.generation_config, self.name = tokenizer, generation_config, name

    def own_template(self) -> tuple[str | None, str]:
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default") or next(iter(template.values()), None)
        return template or None, f"tokenizer chat_template of {self.name}"

    def has_special_token(self, text: str) -> bool:
        return text in (getattr(self.tokenizer, "added_tokens_encoder", None) or {})

    @functools.cached_property
    def _specials(self) -> dict[str, str]:
        return {k: str(getattr(self.tokenizer, k, None) or "") for k in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}

    def special_tokens(self) -> dict[str, str]:
        return self._specials

    @functools.cached_property
    def _wants_bos(self) -> bool:
        tok = self.tokenizer
        with_specials, plain = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
        return tok.bos_token_id is not None and len(with_specials) > len(plain) and with_specials[0] == tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        """Special-token text is parsed; a BOS is added only when the model wants one and the template did not
        write it already (no double BOS)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if self._wants_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    @functools.cached_property
    def _eos(self) -> list[int]:
        tok, ids = self.tokenizer, set()
        for v in (getattr(self.generation_config, "eos_token_id", None), tok.eos_token_id):
            ids.update([v] if isinstance(v, int) else (v or []))
        added = getattr(tok, "added_tokens_encoder", {}) or {}  # end-of-turn tokens generation_config often omits
        ids.update(added[t] for t in END_OF_TURN_TOKENS if t in added)
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    def eos_ids(self) -> list[int]:
        return self._eos


class InProcessBackend(ModelBackend):
    """A backend whose model lives in this process; the subclass sets `facts` and clears/sets `_idle` around each
    generation."""

    facts: HFTokenizerFacts

    def __init__(self):
        super().__init__()
        # set while no generation thread uses the model: a stopped answer's thread may still run one step after the
        # caller let go of the model's lock, and the next answer, an adapter change or close() waits for it
        self._idle = threading.Event()
        self._idle.set()

    def own_template(self) -> tuple[str | None, str]:
        return self.facts.own_template()

    def has_special_token(self, text: str) -> bool:
        return self.facts.has_special_token(text)

    def special_tokens(self) -> dict[str, str]:
        return self.facts.special_tokens()

    def tokenize(self, text: str) -> list[int]:
        return self.facts.tokenize(text)

    def eos_ids(self) -> list[int]:
        return self.facts.eos_ids()

    def _wait_idle(self, halted: Halted = lambda: False) -> bool:
        """Wait until no generation uses the model; False when `halted()` turned true first."""
        while not self._idle.wait(0.05):
            if halted():
                return False
        return True
