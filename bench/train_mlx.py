"""MLX vs torch training, side by side (`bench/train.py --backend mlx`): the same LoRA r=16 all-linear run of
bench/train.py (default model, its fixed chat dataset, batch 4, max length 256, constant lr 2e-4, --dtype, default
float32) trained by the torch trainer and by the MLX trainer (pipelines/training/mlx), each in its own process, then
with `--bits 4` (or 8) once more by MLX on a quantized base. Prints tokens/s, s/step, peak RSS and MLX's own peak
(its allocator's: on a Mac, Metal buffers live outside RSS) per run, and one `ratio` line: MLX over torch in tokens/s
and in peak memory (the larger of RSS and the device peak). The losses are printed, not compared: each trainer
orders the data by its own seeded permutation (the per-step parity on equal batches is tests/pipelines/
test_train_mlx.py's).

    .venv/bin/python bench/train.py --backend mlx [--model PATH] [--steps 5] [--warmup 1] [--bits 4] [--dtype float32]

Here (Linux, MLX's CPU build) the ratio only documents the CPU path, which MacTuner takes only when asked: the
mlx[cpu] 0.32.4 wheel links the reference BLAS (its bundled libblas 3.10), whose float32 matmuls ran at about 2
GFLOP/s on this 2-core Xeon - one Gemma 3 270M step of 64 tokens took ~50 s, so on Linux measure the default model
with --steps 1 --warmup 0, or pass --model a small folder. On a Mac run the same line with --dtype bfloat16 (what
`auto` picks on the Apple GPU) to see the path `auto` takes there.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def worker_mlx(args) -> dict:
    """The MLX trainer on bench/train.py's run (`--bits` 4 / 8: a quantized base)."""
    from train import _setup, _summary

    from pipelines.training import run_training, validate

    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg = _setup(Path(tmp), args)
        cfg = validate(replace(cfg, backend="mlx", base_bits=args.bits), ws)
        rows = []
        run_training(cfg, ws.runs / "bench", rows.append, ws=ws, validated=True,
                     log=lambda m: print(m, file=sys.stderr))
    res = _summary([r["step_time"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows], args.warmup)
    res["device_peak"] = max(r.get("device_peak_memory", 0) for r in rows)
    return res


def _peak(r: dict) -> int:
    return max(r["peak_rss"], r.get("device_peak", 0))


def main_mlx(args, run_worker) -> int:
    from pipelines import backend as backendmod
    from pipelines import device as devicemod

    prof = devicemod.profile()
    ok, versions = backendmod.mlx_installed()
    if not ok:
        print(f"MLX is not installed ({versions}): {backendmod.mlx_install_hint()}", file=sys.stderr)
        return 2
    where = "the Apple GPU" if backendmod.apple_silicon() else "the CPU"
    print(f"model {args.model}; {prof.name}; MLX on {where} ({versions}) vs torch on {prof.kind}; LoRA r=16 "
          f"all-linear, batch 4, max length 256, {args.dtype}, {args.warmup} warm-up + {args.steps} measured steps")
    results = {}
    runs = [("torch", "ours", 0), ("mlx", "mlx", 0)] + ([(f"mlx-{args.bits}bit", "mlx", args.bits)] if args.bits else [])
    for label, worker, bits in runs:
        print(f"running {label}...", flush=True)
        args.bits = bits
        results[label] = run_worker(worker, args, timeout=7200)
    print()
    print(f"{'backend':10} {'tokens/s':>9} {'s/step':>8} {'median':>7} {'peak RSS':>9} {'MLX peak':>9} "
          f"{'final loss':>10}  losses per step")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:10} failed: {r['error']}")
            continue
        mlx_peak = f"{r['device_peak'] / 2**30:7.2f} GB" if r.get("device_peak") else f"{'-':>9}"
        print(f"{label:10} {r['tokens_per_s']:9.1f} {r['s_per_step']:8.2f} {r['median_s_per_step']:7.2f} "
              f"{r['peak_rss'] / 2**30:7.2f} GB {mlx_peak} {r['final_loss']:10.4f}  "
              f"{' '.join(f'{x:.4f}' for x in r['losses'])}")
    torch_r, mlx_r = results["torch"], results["mlx"]
    if "error" in torch_r or "error" in mlx_r:
        return 1
    print()
    print(f"mlx / torch ratio: {mlx_r['tokens_per_s'] / torch_r['tokens_per_s']:.2f}x tokens/s "
          f"({torch_r['s_per_step'] / mlx_r['s_per_step']:.2f}x s/step), peak memory "
          f"{_peak(mlx_r) / _peak(torch_r):.2f}x (MLX on {where}, torch on {prof.kind})")
    for label, r in results.items():
        if label.startswith("mlx-") and "error" not in r:
            print(f"{label} / torch ratio: {r['tokens_per_s'] / torch_r['tokens_per_s']:.2f}x tokens/s, peak memory "
                  f"{_peak(r) / _peak(torch_r):.2f}x")
    return 0
