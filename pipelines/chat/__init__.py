"""Chat: one streaming generator, `stream_chat()`, over every model backend (pipelines.serving.backend) -
llama.cpp (GGUF) and transformers (with optional PEFT LoRA adapters switched on and off without reloading the base).

How a turn goes:

1. `normalize_messages` checks the conversation (roles system/user/assistant, text content; Gradio 6 content
   parts are accepted) and `build_prompt` has the model's backend render it with its chat template in a
   *sandboxed* Jinja environment - the same path for every backend - then tokenize it, and trims the oldest turns
   until the prompt plus room for the answer fits the context window (the system prompt is always kept).
2. `stream_chat` takes the model's lock (one generation per loaded model at a time; a second tab waits, and is
   told so), then streams the backend's answer: a GGUF from its worker process (pipelines.serving.gguf, our token
   ids as the prompt), transformers through `model.generate` on a thread (pipelines.serving.hf).
3. It yields `ChatChunk`s: a text delta plus running figures; the last chunk has `finish_reason` set
   ("stop": end of turn or a stop string, "length": max_new_tokens or the context, "stopped": the caller's Event).

Template choice (`chat_template_of`, made by the backend): the tokenizer's `chat_template`; a GGUF's
`tokenizer.chat_template` metadata; otherwise `PLAIN_CHAT_TEMPLATE` ("System: ...\\nUser: ...\\nAssistant:",
stopping at "\\nUser:") - also for a base model with Gemma's turn tokens in its vocabulary (the embedded default
GGUF): it never learned them, and plain lines keep its answers in the question's language and let them end
(bench/sampling.py). Its HF copy carries Gemma's turn format as its template (`templates.GEMMA_CHAT_TEMPLATE`):
fine-tunes learn those turns.

Sampling is seeded on both backends: the same seed and settings give the same answer on the same backend (llama.cpp
seeds its sampler; transformers samples with a private torch.Generator, so concurrent chats on other models
cannot disturb it). temperature 0 is greedy. The penalties (repetition, and OpenAI's frequency and presence) work
alike on every backend - llama.cpp's way, on the answer's last 64 tokens - so at temperature 0 a model and its float GGUF
give the same answer (quantizing can change a near-tie); the backends do order their samplers differently (llama.cpp applies temperature after
top-k/top-p/min-p, transformers before). llama.cpp reuses the KV cache of the prefix a prompt shares with the
previous one; evaluating from another position can change a near-tie greedy token, so "the same answer" holds for
the same prompt after the same kind of predecessor.

    params.py        ChatParams (the settings, with the ranges the Chat tab's widgets come from), ChatChunk, ...
    prompt.py        chat_template_of, normalize_messages, build_prompt (trimming), raw_prompt, tokenize
    stream.py        stream_chat, stream_completion, stream_rendered (a prompt built already), chat, compare (two
                     answers side by side)
    conversation.py  export_conversation / import_conversation (JSON)
Templates are rendered by pipelines.templates; LoRA adapters are pipelines.adapters'.

Try it:  python -m pipelines.chat MODEL_PATH "Hello!"   (a .gguf file or an HF folder)
"""

from ..adapters import attach_adapter, detach_adapter, inspect_adapter, list_adapters, open_adapter
from ..serving.lora import AdapterInfo
from ..templates import MAX_TEMPLATE_OUTPUT, PLAIN_CHAT_TEMPLATE, PLAIN_STOP, render_template
from .conversation import CONVERSATION_FORMAT, MAX_IMPORT_BYTES, export_conversation, import_conversation
from .params import (
                     END_OF_TURN_TOKENS,
                     FINISH_REASONS,
                     LLAMA_UTF8_MARGIN,
                     ROLES,
                     ChatChunk,
                     ChatParams,
                     ChatResult,
                     ContextTooLong,
                     RenderedPrompt,
)
from .prompt import build_prompt, chat_template_of, context_window, normalize_messages, raw_prompt, tokenize
from .stream import chat, compare, hold_back, model_lock, stream_chat, stream_completion, stream_rendered

__all__ = ["AdapterInfo", "CONVERSATION_FORMAT", "ChatChunk", "ChatParams", "ChatResult", "ContextTooLong",
           "END_OF_TURN_TOKENS", "FINISH_REASONS", "LLAMA_UTF8_MARGIN", "MAX_IMPORT_BYTES", "MAX_TEMPLATE_OUTPUT",
           "PLAIN_CHAT_TEMPLATE", "PLAIN_STOP", "ROLES", "RenderedPrompt", "hold_back",
           "attach_adapter", "build_prompt", "chat", "chat_template_of", "compare", "context_window",
           "detach_adapter", "export_conversation", "import_conversation", "inspect_adapter", "list_adapters",
           "model_lock", "normalize_messages", "open_adapter", "raw_prompt", "render_template", "stream_chat",
           "stream_completion", "stream_rendered", "tokenize"]
