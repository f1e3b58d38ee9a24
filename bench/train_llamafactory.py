"""Training benchmark against LLaMA-Factory: the same model, data and settings as bench/train.py (LoRA r=16 alpha 32
dropout 0.05 on all linear layers, batch 4, max length 256, constant lr 2e-4, float32, loss on the answers only),
ours and LLaMA-Factory's `llamafactory-cli train` alternated, each in its own process; prints s/step of each, the
first measured loss, and `ours / LLaMA-Factory ratio` (s/step: higher is ours faster).

LLaMA-Factory lives in a venv of its own (its pins differ from ours); torchvision and torchaudio builds that load with
the CPU torch 2.13 are not on the index, so they are removed (it imports torchaudio only for audio: see NO_AUDIO):

    python3 -m venv /work/lf-venv && /work/lf-venv/bin/pip install torch==2.13.0 llamafactory==0.9.5
    /work/lf-venv/bin/pip uninstall -y torchvision torchaudio
    .venv/bin/python bench/train_llamafactory.py --lf-venv /work/lf-venv [--model PATH] [--steps 5] [--rounds 1]

Its step time comes from its trainer_log.jsonl (`elapsed_time`, whole seconds) between the first logged step and the
last: over 5 steps of several seconds each the rounding is within a few percent. Its batches are drawn by its own
sampler from the same rows, so single steps differ in tokens; the rows are alike in length (bench/train.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench_train  # noqa: E402 - bench/train.py: the rows, the settings and our worker

ROOT = bench_train.ROOT


def lf_config(folder: Path, model: str, steps: int) -> Path:
    """dataset_info.json, the rows as sharegpt-style messages, and the train YAML, in `folder`."""
    (folder / "data.json").write_text(json.dumps([{"messages": r["messages"]} for r in bench_train.make_rows()]))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "data.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    settings = {
        "stage": "sft", "do_train": True, "model_name_or_path": model, "template": "gemma",  # gemma3 is its image-text template; the turn format is the same
        "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(folder), "cutoff_len": 256, "packing": False,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_steps": steps, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "bf16": False, "fp16": False, "seed": 0,
        "output_dir": str(folder / "out"), "overwrite_output_dir": True, "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0, "include_num_input_tokens_seen": True, "plot_loss": False}
    cfg = folder / "train.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return cfg


# LLaMA-Factory's mm_plugin imports torchaudio at the top, and no torchaudio build loads with the CPU torch 2.13 our
# setup pins; text SFT never calls it, so its venv gets an empty module that says so if anything does.
NO_AUDIO = ('def __getattr__(name):\n'
            '    raise ImportError("torchaudio is left out of this benchmark venv (text SFT only)")\n')


def run_llamafactory(venv: Path, model: str, steps: int, warmup: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lf_config(Path(tmp), model, warmup + steps)
        (Path(tmp) / "shim" / "torchaudio").mkdir(parents=True)
        (Path(tmp) / "shim" / "torchaudio" / "__init__.py").write_text(NO_AUDIO)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1",
               "PYTHONPATH": str(Path(tmp) / "shim")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.time()
        proc = subprocess.run([str(venv / "bin" / "llamafactory-cli"), "train", str(cfg)], env=env,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
        logs = [json.loads(x) for x in (Path(tmp) / "out" / "trainer_log.jsonl").read_text().splitlines()]
    seconds = [_seconds(r["elapsed_time"]) for r in logs]
    measured = seconds[-1] - seconds[warmup - 1] if warmup else seconds[-1]
    return {"s_per_step": measured / steps, "losses": [r.get("loss") for r in logs], "wall_s": time.time() - t0}


def _losses(res: dict) -> str:
    losses = res.get("losses") or [res.get("loss")]
    return ", ".join(f"{x:.3f}" for x in losses if x is not None)


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lf-venv", required=True, help="the venv with llamafactory==0.9.5 installed")
    ap.add_argument("--model", default=None, help="HF folder (default: the workspace's default-model HF copy)")
    ap.add_argument("--root", default=None, help="workspace for the default model (default ~/.mactuner)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: each one's default)")
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds of each (the faster round counts)")
    args = ap.parse_args()
    if not (Path(args.lf_venv) / "bin" / "llamafactory-cli").exists():
        print(f"No llamafactory-cli in {args.lf_venv}: install llamafactory==0.9.5 there first (see --help).")
        return 2
    if args.model is None:
        from pipelines.models import default_hf_path
        from pipelines.workspace import Workspace

        args.model = str(default_hf_path(Workspace.open(args.root)))
    # what bench/train.py's worker reads
    args.trl_steps, args.max_length, args.dtype, args.bits = 0, 256, "float32", 0
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(bench_train.run_worker("ours", args, timeout=3600))
        theirs.append(run_llamafactory(Path(args.lf_venv), args.model, args.steps, args.warmup, args.threads))
    for name, res in (("ours", ours), ("LLaMA-Factory 0.9.5", theirs)):
        for r in res:
            print(f"{name:>20}: " + (f"failed: {r['error']}" if "error" in r else
                                     f"{r['s_per_step']:.2f} s/step, losses {_losses(r)}"))
    ok_ours = [r["s_per_step"] for r in ours if "error" not in r]
    ok_lf = [r["s_per_step"] for r in theirs if "error" not in r]
    if not (ok_ours and ok_lf):
        return 1
    print(f"ours / LLaMA-Factory ratio: {min(ok_lf) / min(ok_ours):.2f}x (s/step, faster round of each; "
          f"median of rounds {statistics.median(ok_lf) / statistics.median(ok_ours):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
