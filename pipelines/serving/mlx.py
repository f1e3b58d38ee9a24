"""The MLX backend: an HF model folder answered through Apple's MLX with mlx-lm's generation (`stream_generate`, its
samplers and logits processors, its streaming detokenizer), with PEFT LoRA adapters - ours, or the torch trainer's -
applied as mlx-lm's LoRA / DoRA layers and chosen per answer. The tokenizer is the folder's HF tokenizer, read as the
HF backend reads it (serving.in_process.HFTokenizerFacts): the same template, special tokens, BOS rule and end-of-turn ids.

    choose(requested)                 "mlx" or "torch" for an HF folder: backend.choose_backend (auto: MLX on Apple
                                      silicon with mlx-lm installed; MACTUNER_CHAT_BACKEND=mlx asks for it elsewhere)
    load_mlx(path, name, trust)       the LoadedModel (registry.load calls it when MLX is chosen)
    MLXBackend                        the ModelBackend

Sampling takes the same settings as the other backends: temperature (0: greedy), top-k, top-p, min-p (mlx-lm's
make_sampler), the seed (mx.random.seed before each answer: the same seed, the same answer), and the penalties as
every backend applies them (serving.backend.Generation: llama.cpp's penalties sampler over the last PENALTY_WINDOW
answer tokens, before any other step) - `Penalties`, an mlx-lm logits processor of ours, since mlx-lm's own
repetition penalty also looks at the prompt and has no frequency or presence penalty. Stop strings are cut by
pipelines.chat, as for every backend. Every answer of one model runs on one thread of its own (MLX streams belong
to a thread), fed through a queue; a halted answer stops after its current token.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from .. import backend as backendmod
from .. import device as devicemod
from ..errors import BadInput
from .backend import PENALTY_WINDOW, Delta, Generation, Halted
from .in_process import HFTokenizerFacts, InProcessBackend
from .lora import AdapterInfo, read_lora_folder

ENV = "MACTUNER_CHAT_BACKEND"  # auto | torch | mlx: which backend answers HF models in the studio
_END = object()


def choose(path: Path, requested: str = "auto") -> str:
    """"mlx" or "torch" for answering the HF folder `path` (the studio's default comes from MACTUNER_CHAT_BACKEND).
    auto takes torch for a model mlx-lm cannot build; asking for mlx then is BadInput (load_mlx says why)."""
    requested = requested if requested != "auto" else (os.environ.get(ENV, "auto").strip() or "auto")
    if requested not in ("auto", "torch", "mlx"):
        raise BadInput(f"{ENV} must be auto, torch or mlx (got {requested!r}).")
    name = backendmod.choose_backend(requested).name
    if name == "mlx" and requested == "auto":
        from ..training.mlx import support  # noqa: PLC0415

        try:
            config = support.read_config(path)
        except (OSError, ValueError):
            return "torch"  # the torch loader says what is wrong with the folder
        if not support.mlx_model_type(config) or config.get("quantization_config"):
            return "torch"
    return name


class Penalties:
    """llama.cpp's penalties sampler as an mlx-lm logits processor: over the last `window` answer tokens (the prompt
    is not looked at), a token's logit is divided by `repetition` (multiplied when not positive), then less
    count x `frequency` + `presence`. mlx-lm hands a processor the tokens so far, beginning with (the end of) the
    prompt: what is there at the first call, before any answer token, is the prompt's part."""

    def __init__(self, repetition: float, frequency: float, presence: float, window: int = PENALTY_WINDOW):
        self.repetition, self.frequency, self.presence, self.window = repetition, frequency, presence, window
        self.n_prompt: int | None = None

    def __call__(self, tokens, logits):
        import mlx.core as mx  # noqa: PLC0415

        if self.n_prompt is None:
            self.n_prompt = int(tokens.size)
        recent = tokens[self.n_prompt:][-self.window:]
        if recent.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[recent].add(1.0)
        seen = counts > 0
        if self.repetition != 1.0:
            logits = mx.where(seen, mx.where(logits <= 0, logits * self.repetition, logits / self.repetition), logits)
        return logits - (counts * self.frequency + seen.astype(logits.dtype) * self.presence)


class MLXBackend(InProcessBackend):
    kind = "mlx"

    def __init__(self, model, tokenizer, config: dict, model_path: str, name: str):
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_path, self.name = model_path, name
        self.facts = HFTokenizerFacts(tokenizer, SimpleNamespace(eos_token_id=config.get("eos_token_id")), name)
        self._layers: dict[str, list] = {}  # adapter name -> [(module path, MLX adapter layer)]
        self._base: dict[str, object] = {}  # module path -> the layer an adapter wraps
        self._active: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-generate")
        self._wrapper = None  # mlx-lm's TokenizerWrapper (its streaming detokenizer), made at the first answer

    def _text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    def context_window(self) -> int:
        n = self._text_config().get("max_position_embeddings") or getattr(self.tokenizer, "model_max_length", 0) or 0
        return int(n) if 0 < n < 10**7 else 32768

    # ------------------------------------------------------------------------------------------ generating

    def stream(self, generation: Generation, halted: Halted) -> Iterator[Delta]:
        if not self._wait_idle(halted):
            return
        self.check_adapter(generation.adapter)
        self._idle.clear()
        out: queue.Queue = queue.Queue()
        left = threading.Event()  # the reader went away: the generation stops at its next token
        self._pool.submit(self._generate, generation, lambda: left.is_set() or halted(), out)
        try:
            while True:
                try:
                    item = out.get(timeout=0.05)
                except queue.Empty:
                    if halted():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"Generation failed: {type(item).__name__}: {item}") from item
                yield item
                if halted():
                    return
        finally:
            left.set()

    def _generate(self, g: Generation, halted: Halted, out: queue.Queue) -> None:
        """One answer, on the backend's own thread: Deltas into `out`, then _END."""
        import mlx.core as mx  # noqa: PLC0415
        from mlx_lm.generate import stream_generate  # noqa: PLC0415
        from mlx_lm.sample_utils import make_sampler  # noqa: PLC0415
        from mlx_lm.tokenizer_utils import TokenizerWrapper  # noqa: PLC0415

        try:
            self._use(g.adapter)
            mx.random.seed(g.seed)
            greedy = g.temperature <= 0
            sampler = make_sampler(temp=0.0 if greedy else g.temperature, top_p=0.0 if greedy or g.top_p >= 1 else
                                   g.top_p, min_p=0.0 if greedy else g.min_p, top_k=0 if greedy else g.top_k)
            processors = ([Penalties(g.repetition_penalty, g.frequency_penalty, g.presence_penalty)]
                          if g.repetition_penalty != 1.0 or g.frequency_penalty or g.presence_penalty else [])
            if self._wrapper is None:
                self._wrapper = TokenizerWrapper(self.tokenizer, eos_token_ids=self.eos_ids())
            n = 0
            for r in stream_generate(self.model, self._wrapper, mx.array(g.token_ids), max_tokens=g.max_new_tokens,
                                     sampler=sampler, logits_processors=processors):
                if r.finish_reason is None:
                    n += 1
                    out.put(Delta(r.text, n))
                else:
                    n = r.generation_tokens - (1 if r.finish_reason == "stop" else 0)  # the end token is no text
                    out.put(Delta(r.text, n, finish=r.finish_reason))
                if halted():
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            out.put(e)
        finally:
            out.put(_END)
            self._idle.set()

    # ------------------------------------------------------------------------------------------ adapters

    def _use(self, name: str | None) -> None:
        """Put the named adapter's layers in place (None: the base's own layers). The model's lock is held."""
        from mlx.utils import tree_unflatten  # noqa: PLC0415

        if name == self._active:
            return
        if self._active is not None:
            restore = [(path, self._base[path]) for path, _layer in self._layers[self._active]]
            self.model.update_modules(tree_unflatten(restore), strict=False)
        if name is not None:
            self.model.update_modules(tree_unflatten(self._layers[name]), strict=False)
        self._active = name

    def inspect_adapter(self, path: Path) -> AdapterInfo:
        from ..training.mlx.peft_io import adapter_layers  # noqa: PLC0415

        folder = read_lora_folder(path)
        self._wait_idle()
        self._use(None)
        adapter_layers(self.model, folder.path, folder.config)  # built and dropped: the checks only
        return folder.info()

    def attach_adapter(self, info: AdapterInfo) -> None:
        from ..training.mlx.peft_io import adapter_layers  # noqa: PLC0415

        self._wait_idle()
        self._use(None)
        modules = dict(self.model.named_modules())
        layers = adapter_layers(self.model, Path(info.path))
        for path, _layer in layers:
            self._base.setdefault(path, modules[path])
        self._layers[info.name] = layers
        self.adapters[info.name] = info

    def detach_adapter(self, name: str) -> None:
        self._wait_idle()
        self._use(None)
        self._layers.pop(name, None)
        self.adapters.pop(name, None)

    # ------------------------------------------------------------------------------------------ the rest

    def shape(self) -> devicemod.ModelShape:
        return devicemod.ModelShape.from_config(SimpleNamespace(**self._text_config()))

    def describe(self) -> dict:
        return {"compute": "MLX on the Apple GPU" if devicemod.apple_silicon() else "MLX on the CPU"}

    def close(self) -> None:
        self._wait_idle()
        self.model = self.tokenizer = None
        self._layers.clear()
        self._base.clear()
        self._pool.shutdown(wait=True)
        gc.collect()
        import mlx.core as mx  # noqa: PLC0415

        mx.clear_cache()


def load_mlx(path: Path, name: str | None = None, trust_remote_code: bool = False):
    """An HF folder loaded by mlx-lm (bfloat16 on the Apple GPU, float32 on a CPU) as a LoadedModel."""

    import mlx.core as mx  # noqa: PLC0415
    from mlx.utils import tree_flatten  # noqa: PLC0415
    from mlx_lm.utils import load_model  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from ..models import LoadedModel, inspect_folder  # noqa: PLC0415
    from ..training.mlx import support  # noqa: PLC0415

    inspect_folder(path, trust_remote_code)
    config = support.read_config(path)
    if not support.mlx_model_type(config):
        raise BadInput(f"mlx-lm has no '{config.get('model_type')}' architecture: load {path.name} with the torch "
                       f"backend ({ENV}=torch).")
    t0 = time.time()
    try:
        model, _ = load_model(path, model_config=support.mlx_model_config(path), trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise BadInput(f"mlx-lm could not load {path.name}: {str(e).splitlines()[0][:240]}") from None
    dtype = "bfloat16" if devicemod.apple_silicon() else "float32"
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    params = tree_flatten(model.parameters())
    backend = MLXBackend(model, tok, config, str(path), name or path.name)
    text = backend._text_config()
    return LoadedModel(
        name=name or path.name, model_path=str(path), format="hf-safetensors",
        device="mlx (Apple GPU)" if devicemod.apple_silicon() else "mlx (cpu)", dtype=dtype,
        n_params=sum(v.size for _k, v in params), memory_bytes=sum(v.nbytes for _k, v in params),
        context_length=text.get("max_position_embeddings"), architecture=(config.get("architectures") or ["?"])[0],
        chat_template=bool(getattr(tok, "chat_template", None)), load_seconds=time.time() - t0,
        loaded_at=time.time(), details={"model_type": config.get("model_type"), "hidden_size": text.get("hidden_size"),
                                        "layers": text.get("num_hidden_layers"), "vocab_size": text.get("vocab_size")},
        backend=backend)
