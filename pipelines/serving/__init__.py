"""Serving: every GGUF model runs in a worker process of its own, so a native crash in llama.cpp costs one answer,
never the studio.

    llamacpp.py   which llama.cpp settings this CPU gets (the AMX kernel of llama.cpp segfaults on some Xeons), the
                  build's features, and `open_llama` for code that already runs in a child process
    worker.py     the worker process: loads one GGUF, answers generation requests over a socket pair
    client.py     the studio's side: `GGUFWorker` (start, stream, stop, crash -> clear error -> restart, close) and
                  the vocabulary kept in the studio for tokenizing and templates (no weights, no compute)
    openai.py     the OpenAI-compatible facade (`/v1/models`, `/v1/chat/completions`, `/v1/completions`): model
                  names, request checking, response and stream chunks - plain Python; studio/api.py routes to it
"""
