"""A finished export written file by file the way the export pipelines leave it (no model is loaded or converted):
a run with its adapter, config, status and verdict, the dataset version it trained on, and exports/<name>/ with a
merged model, GGUFs (only their magic is real), their Modelfiles and validations, and export.json.

    folder = make_export(workspace)          # exports/tiny, from runs/tiny-run (dataset chat v1, base org/tiny-base)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BASE_ID = "org/tiny-base"


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _validation(gguf: Path, kind: str, ppl: float, ok: bool = True) -> dict:
    return {"gguf": str(gguf), "ok": ok, "seconds": 1.0, "items": [
        {"name": "loads", "ok": True, "detail": "llama.cpp loaded it"},
        {"name": "chat_template", "ok": True, "detail": "renders like the HF tokenizer's"},
        {"name": "finetune_survived", "ok": ok, "detail": "tuned answers kept" if ok else "lost on 3 of 4 prompts"}],
        "table": [{"type": "HF (merged)", "file": "merged", "size": 40_000, "perplexity": 10.0, "delta_pct": None,
                   "tokens_per_s": None},
                  {"type": kind, "file": gguf.name, "size": gguf.stat().st_size, "perplexity": ppl,
                   "delta_pct": round(100 * (ppl - 10.0) / 10.0, 2), "tokens_per_s": 850.0}]}


def make_export(ws, name: str = "tiny", run: str = "tiny-run", quants: tuple[str, ...] = ("f16", "Q8_0"),
                merged: bool = True) -> Path:
    from pipelines.training import TrainConfig

    run_dir = ws.runs / run
    run_dir.mkdir(parents=True, exist_ok=True)
    TrainConfig(base_model=BASE_ID, dataset="chat", dataset_version=1, rank=8, alpha=16, max_steps=10).to_yaml(
        run_dir / "config.yaml")
    _write(run_dir / "status.json", json.dumps({"state": "finished", "reason": "finished 10 steps", "step": 10,
                                                "final_loss": 1.2345}))
    _write(run_dir / "verdict.json", json.dumps({"verdict": "better: validation loss 2.00 -> 1.50", "better": True,
                                                 "examples": 10, "base": {"loss": 2.0, "perplexity": 7.389},
                                                 "tuned": {"loss": 1.5, "perplexity": 4.482}}))
    adapter = run_dir / "adapter"
    _write(adapter / "adapter_config.json", json.dumps({"base_model_name_or_path": "/home/ana/models/tiny-base",
                                                        "peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                        "target_modules": ["q_proj", "v_proj"]}))
    _write(adapter / "adapter_model.safetensors", os.urandom(3000))
    _write(adapter / "tokenizer.json", '{"model": {"type": "BPE"}}')
    _write(adapter / "tokenizer_config.json", '{"eos_token": "</s>"}')
    _write(adapter / "chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")
    _write(adapter / "README.md", "# PEFT card with /home/ana paths\n")
    _write(adapter / "mactuner.json", json.dumps({"base_model": BASE_ID, "dataset": "chat", "dataset_version": 1,
                                                  "steps": 10, "final_loss": 1.2345, "best_eval_loss": 1.5}))
    (ws.runs / run / "checkpoints").mkdir(exist_ok=True)
    _write(ws.datasets / "chat" / "v1" / "train.jsonl", '{"messages": []}\n')
    _write(ws.datasets / "chat" / "v1" / "meta.json", json.dumps({"name": "chat", "version": 1, "counts": {
        "train": 90, "validation": 10, "total": 100}}))

    folder = ws.exports / name
    m = folder / "merged"
    if merged:
        _write(m / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
        _write(m / "model.safetensors", os.urandom(40_000))
        _write(m / "tokenizer.json", '{"model": {"type": "BPE"}}')
        _write(m / "generation_config.json", '{"eos_token_id": 2}')
        _write(m / "README.md", "# merged, with /home/ana paths\n")
        _write(m / "mactuner.json", json.dumps({"base_model": "/home/ana/models/tiny-base"}))
    ggufs = []
    for i, q in enumerate(quants):
        g = _write(folder / f"{name}-{q}.gguf", b"GGUF\x03\0\0\0" + os.urandom(20_000 // (i + 1)))
        _write(folder / f"{name}-{q}.Modelfile", f"FROM ./{g.name}\nPARAMETER stop \"</s>\"\n")
        _write(folder / f"{name}-{q}.validation.json", json.dumps(_validation(g, q, 10.0 + i)))
        ggufs.append(str(g))
    _write(folder / "export.json", json.dumps({
        "name": name, "created": "2024-05-01T12:00:00", "source": str(adapter), "base_model": "/home/ana/models/x",
        "merged": str(m) if merged else None, "ggufs": ggufs, "outtypes": ["f16"], "quants": list(quants[1:]),
        "steps": [], "table": [], "validations": []}))
    return folder
