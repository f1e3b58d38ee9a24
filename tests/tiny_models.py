"""Tiny real models for the tests, importable as a module (`from tiny_models import ...`): conftest.py files
share one module name, so `from conftest import` would pick whichever conftest pytest imported last.

- TINY_CORPUS, TINY_CHAT_TEMPLATE, TINY_LLAMA: the lines the tiny tokenizers are trained on, their chat template,
  and the tiny llama's shape.
- write_tiny_gguf(path): a complete llama-architecture F32 GGUF written with gguf.GGUFWriter.
- make_adapter(base_dir, out, seed): a PEFT LoRA (q_proj/v_proj, r=4) with seeded random A and B.
- build_spm_llama(out): a tiny llama with a SentencePiece-style BPE tokenizer (byte fallback, metaspace) that
  llama.cpp's converter reads like Llama 2's (the byte-level BPE of conftest's tiny llama has a pre-tokenizer
  the converter does not know), so it makes the GGUF round trip.
- text_only_copy(llama_dir, out) / tied_copy(llama_dir, out): copies whose answers hold no byte tokens; the second
  with its output layer tied to the embedding.
- token_rows_adapter(base_dir, out, token_ids): a LoRA plus PEFT trainable tokens (rows of the embedding trained
  outright, as the trainer adds for tokens a base never learned).
"""

from __future__ import annotations

from pathlib import Path

TINY_CORPUS = [
    "Hello, how are you today?",
    "I am a tiny language model used in tests.",
    "MacTuner fine-tunes small models on a laptop.",
    "The quick brown fox jumps over the lazy dog.",
    "user: what is LoRA? assistant: a low-rank adapter that trains few weights.",
    "Quantize the model to GGUF and chat with it in llama.cpp.",
]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"
)
TINY_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128)




def write_tiny_gguf(path: Path, seed: int = 0, n_layer: int = 2, context_length: int = 4096) -> Path:
    """A tiny but complete llama-architecture GGUF (F32) with a SentencePiece-style vocabulary."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    n_embd, n_head, n_kv, n_ff = 32, 4, 2, 64
    head_dim = n_embd // n_head
    tokens, scores, types = [], [], []

    def tok(text, score, kind):
        tokens.append(text)
        scores.append(score)
        types.append(kind)

    tok("<unk>", 0.0, gguf.TokenType.UNKNOWN)
    tok("<s>", 0.0, gguf.TokenType.CONTROL)
    tok("</s>", 0.0, gguf.TokenType.CONTROL)
    for b in range(256):  # byte fallback: every text is tokenizable
        tok(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE)
    for i, word in enumerate("hello world the a is of to and in you what how model small train chat user".split()):
        tok("\u2581" + word, -float(i + 1), gguf.TokenType.NORMAL)
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz:"):
        tok(ch, -100.0 - i, gguf.TokenType.NORMAL)
    tok("\u2581", -200.0, gguf.TokenType.NORMAL)
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-gguf")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")

    def rand(name, *shape):  # numpy shape = reversed ggml shape
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    rand("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        rand(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        rand(f"blk.{i}.attn_k.weight", n_kv * head_dim, n_embd)
        rand(f"blk.{i}.attn_v.weight", n_kv * head_dim, n_embd)
        rand(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        rand(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        rand(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        rand(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_spm_llama(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([t.replace(" ", "\u2581") for t in TINY_CORPUS],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int = 0, config_overrides: dict | None = None) -> Path:
    """A LoRA on q_proj/v_proj of a tiny llama with random (non-zero) B matrices, saved as PEFT safetensors. A and B
    both come from `seed` (PEFT draws A from torch's global RNG, which earlier tests move)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if config_overrides:
        cfg = LlamaConfig.from_pretrained(base_dir)
        for k, v in config_overrides.items():
            setattr(cfg, k, v)
        base = LlamaForCausalLM(cfg)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    assert (out / "adapter_model.safetensors").exists()
    return out


def text_only_copy(llama_dir: Path, out: Path) -> Path:
    """A copy of a tiny llama that never picks a byte token (<0xA3>...): their output rows are zero while every other
    token's logit is above zero somewhere. A random model's stray bytes are no UTF-8, which transformers spells
    U+FFFD and llama.cpp drops - so without them the two libraries' texts compare exactly."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(llama_dir, out)
    byte_ids = [i for t, i in AutoTokenizer.from_pretrained(out).get_vocab().items() if t.startswith("<0x")]
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"][byte_ids] = 0.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def tied_copy(llama_dir: Path, out: Path) -> Path:
    """A copy of a tiny llama whose output layer is tied to its input embedding (as Gemma's, Qwen's and Llama 3.2's
    are): no lm_head.weight, tie_word_embeddings. Byte tokens keep out of its answers as in text_only_copy: their
    embedding rows, which are their output rows too, are zero."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(llama_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}, indent=2))
    weights = load_file(out / "model.safetensors")
    del weights["lm_head.weight"]
    byte_ids = [i for t, i in AutoTokenizer.from_pretrained(out).get_vocab().items() if t.startswith("<0x")]
    weights["model.embed_tokens.weight"][byte_ids] = 0.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def token_rows_adapter(base_dir: Path, out: Path, token_ids: list[int], seed: int = 11, **lora_kw) -> Path:
    """A LoRA (q_proj/v_proj unless `lora_kw` says otherwise) plus PEFT trainable tokens for `token_ids`, all random
    and large enough to change the answer: the rows by about their own size."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora_kw}
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                        LoraConfig(trainable_token_indices=token_ids, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "trainable_tokens" in name else 0.4))
    pm.save_pretrained(out)
    return out
