"""Serving: a loaded model answers through one backend protocol, whatever its kind; every GGUF model runs in a worker
process of its own, so a native crash in llama.cpp costs one answer, never the studio.

    backend.py    `ModelBackend`, the protocol (tokenize, render, eos ids, stream, adapters, close), and what passes
                  through it (`Generation`, `Delta`)
    hf.py         `HFBackend`: transformers in this process, PEFT LoRA adapters switched per answer; hf_generate.py
                  streams its answers from generate() on a thread of its own
    gguf.py       `GGUFBackend`: a GGUF answered by its worker process
    mlx.py        `MLXBackend`: an HF folder answered by Apple's MLX (mlx-lm's generation), PEFT adapters applied as
                  mlx-lm's LoRA layers; chosen on Apple silicon (elsewhere when asked: MACTUNER_CHAT_BACKEND=mlx)
    lora.py       a LoRA adapter folder as it lies on disk (`read_lora_folder`, `AdapterInfo`)
    llamacpp.py   which llama.cpp settings this CPU gets (the AMX kernel of llama.cpp segfaults on some Xeons), the
                  build's features, and `open_llama` for code that already runs in a child process
    worker.py     the worker process: loads one GGUF, answers generation requests over a socket pair
    client.py     the studio's side: `GGUFWorker` (start, stream, stop, crash -> clear error -> restart, close) and
                  the vocabulary kept in the studio for tokenizing and templates (no weights, no compute)
    registry.py   the loaded models of the studio's process (`REGISTRY`), the current one, loads and unloads
    openai.py     the OpenAI-compatible facade (`/v1/models`, `/v1/chat/completions`, `/v1/completions`): model
                  names, request checking, response and stream chunks - plain Python; studio/api.py routes to it
"""
