"""What a GGUF will weigh, tensor by tensor, before anything is converted: the HF folder's safetensors shapes (read
from the headers), the type llama.cpp's converter writes each tensor in, and the type `llama_model_quantize` picks
for it (llama.cpp src/llama-quant.cpp, llama_tensor_get_type: the output matrix - and the token embeddings when
they are tied to it - at Q6_K, some attn_v / ffn_down layers at Q6_K in *_K_M, the fallback to a legacy type for
rows not a multiple of 256 columns, 1-D tensors kept in F32), plus the header (the tokenizer is most of it).

    shapes = tensor_shapes(hf_dir)
    est = gguf_bytes(shapes, "Q4_K_M", tied_embeddings(shapes), metadata_bytes(hf_dir, len(shapes)))
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# ggml block sizes and bytes per block
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
         "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# a quantization's default tensor type (llama_model_quantize_impl)
DEFAULT_TYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_0": "Q5_0",
                "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K",
                "F32": "F32", "F16": "F16", "BF16": "BF16"}

_CATEGORIES = [  # (category, HF name pattern), first match wins
    ("output", r"(^|\.)lm_head\.weight$"),
    ("token_embd", r"(embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$"),
    ("attn_qkv", r"(qkv_proj|query_key_value|c_attn|Wqkv)\.weight$"),
    ("attn_v", r"v_proj\.weight$"), ("attn_k", r"k_proj\.weight$"), ("attn_q", r"q_proj\.weight$"),
    ("attn_output", r"(o_proj|out_proj|dense|c_proj)\.weight$"),
    ("ffn_gate", r"(gate_proj|w1)\.weight$"), ("ffn_up", r"(up_proj|w3|fc1|c_fc)\.weight$"),
    ("ffn_down", r"(down_proj|w2|fc2)\.weight$"),
]


def category(name: str) -> str:
    for cat, pat in _CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def tensor_shapes(hf_dir: str | Path) -> dict[str, list[int]]:
    """{tensor name: shape} of an HF folder's safetensors (headers only; nothing loaded)."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                out[k] = list(fh.get_slice(k).get_shape())
    return out


def tied_embeddings(shapes: dict[str, list[int]]) -> bool:
    """True when the GGUF will have no output.weight (llama.cpp then treats token_embd as the output): the HF files
    hold no lm_head (tied word embeddings are saved once)."""
    return not any(category(n) == "output" for n in shapes)


def metadata_bytes(hf_dir: str | Path, n_tensors: int = 0) -> int:
    """About what the GGUF's header takes: mostly the tokenizer (each token as a length-prefixed string, its type,
    its score unless BPE, each BPE merge as a string), counted from tokenizer.json; else about the SentencePiece
    model's size; + the chat template, the other keys and each tensor's info and alignment."""
    d = Path(hf_dir)
    total = 2048 + n_tensors * 80
    tpl = d / "chat_template.jinja"
    total += tpl.stat().st_size if tpl.is_file() else 0
    try:
        tok = json.loads((d / "tokenizer.json").read_text())
    except (OSError, ValueError):
        sp = d / "tokenizer.model"
        return total + (int(1.2 * sp.stat().st_size) if sp.is_file() else 0)
    model = tok.get("model") or {}
    vocab = model.get("vocab") or {}
    tokens = [t[0] for t in vocab] if isinstance(vocab, list) else list(vocab)
    tokens += [t.get("content", "") for t in tok.get("added_tokens") or [] if t.get("content") not in vocab]
    per_token = 8 + 4 + (0 if model.get("type") == "BPE" else 4)  # length prefix, type, score
    total += sum(len(t.encode("utf-8")) for t in tokens) + per_token * len(tokens)
    for m in model.get("merges") or []:
        total += 8 + len((m if isinstance(m, str) else " ".join(m)).encode("utf-8"))
    return total


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _nbytes(shape: list[int], ttype: str) -> int:
    blk, size = BLOCK[ttype]
    n = 1
    for s in shape:
        n *= int(s)
    return n // blk * size


def tensor_type(name: str, shape: list[int], qtype: str, tied: bool, index: int = 0, count: int = 1) -> str:
    """The type llama.cpp gives one tensor (HF name and shape [out, in]) in a `qtype` GGUF (a float type or a
    quantization); index/count: this tensor's rank among the tensors of its category (attn_v, ffn_down)."""
    qtype = qtype.upper()
    if len(shape) < 2:
        return "F32"  # norms and biases: the converter writes them in F32, the quantizer copies them
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    cat, new = category(name), DEFAULT_TYPE[qtype]
    ncols = int(shape[-1])
    if cat == "output" or (tied and cat == "token_embd"):
        if ncols % BLOCK[new][0]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        if qtype == "Q2_K":
            new = "Q3_K"
        elif qtype == "Q3_K_M":
            new = "Q5_K" if index < 2 else "Q4_K"
        elif qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(index, count):
            new = "Q6_K"
        elif qtype == "Q4_K_S" and index < 4:
            new = "Q5_K"
    elif cat == "ffn_down":
        if qtype == "Q2_K":
            new = "Q3_K"
        elif qtype == "Q3_K_M":
            new = "Q5_K" if index < count // 16 else "Q4_K"
        elif qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(index, count):
            new = "Q6_K"
        elif qtype == "Q4_K_S" and index < count // 8:
            new = "Q5_K"
    elif cat == "attn_output":
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(qtype, new)
    elif cat == "attn_qkv":
        new = {"Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(qtype, new)
    if ncols % BLOCK[new][0]:
        new = FALLBACK.get(new, new)
        if ncols % BLOCK[new][0]:
            new = "F16"
    return new


def gguf_types(shapes: dict[str, list[int]], qtype: str, tied: bool = True) -> dict[str, str]:
    """{HF tensor name: GGUF type} for a `qtype` file."""
    counters: dict[str, int] = {}
    counts: dict[str, int] = {}
    for n, s in shapes.items():
        if len(s) >= 2:
            counts[category(n)] = counts.get(category(n), 0) + 1
    out = {}
    for n, s in shapes.items():
        cat = category(n)
        i = counters.get(cat, 0)
        out[n] = tensor_type(n, s, qtype, tied, i, counts.get(cat, 1))
        if len(s) >= 2:
            counters[cat] = i + 1
    return out


def gguf_bytes(shapes: dict[str, list[int]], qtype: str, tied: bool = True, metadata: int = 0) -> int:
    """Bytes of a `qtype` GGUF of these tensors: each at the type llama.cpp picks, + `metadata` (metadata_bytes)."""
    types = gguf_types(shapes, qtype, tied)
    return metadata + sum(_nbytes(s, types[n]) for n, s in shapes.items())
