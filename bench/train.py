"""Training benchmark: LoRA r=16 on all linear layers of the default model's HF copy (Gemma 3 270M), a fixed chat
dataset, batch 4, max length 256, the same steps three ways, each in its own process (so peak RSS is its own):

  ours   pipelines.training.run_training: loss on the assistant tokens only, output layer applied at those positions
  plain  a plain PyTorch + PEFT loop in fp32: model(input_ids, attention_mask, labels) -> loss over full logits
  trl    TRL's SFTTrainer with its default arguments (bf16 autocast; all tokens trained) - very slow on CPUs
         without native bf16: --skip-trl leaves it out, --trl-steps N runs fewer measured steps

(ours) and (plain) see the same batches in the same order from the same seed, so their per-step losses must match.
Prints tokens/s, s/step, peak RSS and final loss for each, and the ratios. Target: ours >= 1.3x plain.

--method dpo compares DPO steps instead (LoRA r=16 all-linear, dropout 0, beta 0.1, batch 4 pairs, max length 256,
constant lr 2e-4, fp32) on preference pairs made from the same rows (rejected: another row's answer):

  ours-dpo  pipelines.training.run_training with objective dpo (reference = the adapter switched off)
  trl-dpo   TRL's DPOTrainer (sigmoid loss, reference = the adapter switched off, bf16 off, gradient checkpointing
            off) given our tokenized pairs in our batch order and our initial adapter (same seed): the same batches,
            so the per-step losses must agree (step 1 is log 2 for both: policy = reference)

Both train the LoRA alone, without the trainable embedding rows our trainer adds for target tokens the base never
learned (Gemma's <end_of_turn>, tokens.py): TRL's fused output layer fails on PEFT's wrapped tied head.

    .venv/bin/python bench/train.py [--model PATH] [--steps 5] [--warmup 1] [--threads N] [--skip-trl] [--json OUT]
    .venv/bin/python bench/train.py --method precision [--model PATH] [--steps 5] [--rounds 2]
    .venv/bin/python bench/train.py --method dpo [--model PATH] [--steps 5] [--warmup 1] [--max-length 256]

--method precision runs ours in float32 and in bf16 mixed precision (base weights bf16; adapter, optimizer and loss
float32; autocast) on the same batches, alternated, and prints "bf16/fp32 ratio" (tokens/s) and the loss difference.

--method profile puts our step under torch.profiler and prints each op class's share of the step and its FLOP/s
against the matmul peak measured in the same run (bench/train_profile.py; --dtype float32|bfloat16|both);
--method levers times each speed lever against our float32 step before the levers, alternated on the same batches
in one process, with the first step's loss from the same weights and dropout masks (--rounds, --compile):

    .venv/bin/python bench/train.py --method profile [--dtype both] [--steps 2] [--warmup 1]
    .venv/bin/python bench/train.py --method levers [--rounds 3] [--warmup 0] [--compile] [--levers short]

--backend mlx runs the torch trainer against the MLX trainer on the same run (bench/train_mlx.py: tokens/s, peak
memory, a `ratio` line; --bits 4 or 8 adds MLX on a quantized base).

--model defaults to the workspace's default-model HF copy (models.default_hf_path; --root picks the workspace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = ["LoRA adapters", "quantization to GGUF", "learning-rate warm-up", "gradient accumulation", "tokenizers",
          "chat templates", "evaluation loss", "overfitting", "batch size on a laptop", "checkpoints"]
FACTS = [
    "It keeps the base weights frozen and learns a small low-rank update for each chosen layer.",
    "Fewer trainable parameters means less optimizer memory and faster steps on a CPU.",
    "Start with a modest learning rate and watch the validation loss after every few hundred steps.",
    "If the training loss keeps falling while the validation loss rises, the model is memorising.",
    "A longer context costs memory linearly in the activations and quadratically in attention.",
    "Save checkpoints regularly so that an interrupted run can resume where it stopped.",
    "The chat template decides how turns are marked, so training and inference must use the same one.",
    "Packing short conversations together wastes less compute on padding tokens.",
]
DATASET_SEED = 0


def make_rows(n: int = 64) -> list[dict]:
    """A fixed, deterministic chat dataset: a system prompt, a question, a multi-sentence answer."""
    import random

    rng = random.Random(DATASET_SEED)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        answer = " ".join(rng.choice(FACTS) for _ in range(rng.randint(3, 9)))
        rows.append({"messages": [
            {"role": "system", "content": "You are a concise assistant that explains model fine-tuning."},
            {"role": "user", "content": f"Question {i}: can you explain {topic} and why it matters when I fine-tune a "
                                        f"small model on my own laptop?"},
            {"role": "assistant", "content": f"{topic.capitalize()}: {answer}"},
        ]})
    return rows


def make_pairs(n: int = 64) -> list[dict]:
    """Preference pairs from make_rows: the prompt, its own answer (chosen) and another topic's answer (rejected)."""
    rows = make_rows(n)
    return [{"prompt": r["messages"][:2], "chosen": r["messages"][2:],
             "rejected": rows[(i + 3) % n]["messages"][2:]} for i, r in enumerate(rows)]


def _setup(root: Path, args):
    from pipelines.training import TrainConfig, validate
    from pipelines.workspace import Workspace

    ws = Workspace.open(root)
    d = ws.datasets / "bench" / "v1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows()))
    cfg = TrainConfig(base_model=args.model, dataset="bench", method="lora", rank=16, alpha=32, dropout=0.05,
                      target_modules="all-linear", max_steps=args.warmup + args.steps, learning_rate=2e-4,
                      scheduler="constant", warmup_steps=0, batch_size=4, grad_accum=1, max_length=256,
                      save_every=0, eval_every=0, seed=0, threads=args.threads, dtype=args.dtype)
    return ws, validate(cfg, ws)


def _peak_rss() -> int:
    from pipelines.training import peak_rss

    return peak_rss()


def _summary(step_times: list[float], step_tokens: list[int], losses: list[float], warmup: int) -> dict:
    t, k = step_times[warmup:], step_tokens[warmup:]
    return {"s_per_step": statistics.mean(t), "median_s_per_step": statistics.median(t),
            "tokens_per_s": sum(k) / sum(t), "losses": losses,
            "final_loss": losses[-1], "peak_rss": _peak_rss(), "tokens_per_step": statistics.mean(k),
            "step_times": step_times}


def _setup_dpo(root: Path, args):
    from pipelines.training import TrainConfig, validate
    from pipelines.workspace import Workspace

    ws = Workspace.open(root)
    d = ws.datasets / "bench-dpo" / "v1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs()))
    cfg = TrainConfig(base_model=args.model, dataset="bench-dpo", method="lora", objective="dpo", beta=0.1, rank=16,
                      alpha=32, dropout=0.0, target_modules="all-linear", max_steps=args.warmup + args.steps,
                      learning_rate=2e-4, scheduler="constant", warmup_steps=0, batch_size=4, grad_accum=1,
                      max_length=args.max_length, save_every=0, eval_every=0, seed=0, threads=args.threads,
                      dtype=args.dtype)  # float32 unless asked: TRL's side runs in float32
    return ws, validate(cfg, ws)


def _no_token_rows() -> None:
    """Both DPO workers train the LoRA alone: TRL's fused output layer cannot take PEFT's trainable-token rows
    (Gemma's untrained <end_of_turn>, tokens.py), which our trainer would otherwise add."""
    from pipelines.training import tokens

    tokens.untrained_targets = lambda *a, **kw: []


def worker_ours_dpo(args) -> dict:
    from pipelines.training import run_training

    _no_token_rows()
    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg = _setup_dpo(Path(tmp), args)
        rows = []
        run_training(cfg, ws.runs / "bench", rows.append, ws=ws, validated=True, log=lambda m: print(m, file=sys.stderr))
    res = _summary([r["step_time"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows], args.warmup)
    res["margins"] = [r["rewards/margins"] for r in rows]
    return res


def _trl_pairs(pairs) -> tuple[list[dict], int]:
    """Our encoded pairs as TRL's tokenized columns: the shared prompt, then each answer up to its last labelled
    token (what follows it cannot change the log-probs before it). Also the pairs whose prompt is not shared
    exactly (answers that would then include unlabelled tokens: the formulations differ there)."""
    out, differ = [], 0
    for (c_ids, c_lab), (r_ids, r_lab) in pairs:
        firsts = [next(j for j, x in enumerate(lab) if x != -100) for lab in (c_lab, r_lab)]
        k = min(firsts)
        differ += firsts[0] != firsts[1] or c_ids[:k] != r_ids[:k]
        ends = [max(j for j, x in enumerate(lab) if x != -100) + 1 for lab in (c_lab, r_lab)]
        out.append({"prompt_ids": c_ids[:k], "chosen_ids": c_ids[k:ends[0]], "rejected_ids": r_ids[k:ends[1]]})
    return out, differ


def worker_trl_dpo(args) -> dict:
    import random

    import torch
    from datasets import Dataset
    from torch.utils.data import DistributedSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipelines import device as devicemod
    from pipelines.training import IGNORE, encode_dataset, ensure_chat_template
    from pipelines.training.session import build_model

    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg = _setup_dpo(Path(tmp), args)
        torch.set_num_threads(cfg.threads or devicemod.profile().threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # as our trainer seeds before building the adapter: the same initial LoRA A
        tok = AutoTokenizer.from_pretrained(cfg.base_model)
        ensure_chat_template(tok)
        enc, _ = encode_dataset(cfg, ws, tok)
    sampler = DistributedSampler(enc.pairs, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(0)
    order = list(sampler)  # our trainer's batch order (one epoch is more than the steps measured)
    rows, differ = _trl_pairs([enc.pairs[i] for i in order])
    label_ids = {t for _ids, labels in enc.examples for t in labels if t != IGNORE}
    _no_token_rows()
    model, _rows = build_model(cfg, torch.float32, torch.device("cpu"), 0, label_ids)
    times, toks, losses, margins = [], [], [], []
    batch_tokens = [sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                        for r in rows[i: i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.time() - self.t0)
            toks.append(batch_tokens[len(times) - 1])
            print(f"trl-dpo step {len(times)}: {times[-1]:.2f} s", file=sys.stderr, flush=True)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                margins.append(float(logs.get("rewards/margins", float("nan"))))

    class Pretokenized(DPOTrainer):  # our tokenization as it is: the same tokens on both sides
        def _prepare_dataset(self, dataset, *a, **kw):
            return dataset

    with tempfile.TemporaryDirectory() as tmp:
        dpo_args = DPOConfig(output_dir=tmp, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                             max_length=cfg.max_length, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
                             beta=cfg.beta, loss_type=["sigmoid"], logging_steps=1, report_to="none",
                             save_strategy="no", seed=cfg.seed, disable_tqdm=True, bf16=False,
                             gradient_checkpointing=False, train_sampling_strategy="sequential",
                             max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay,
                             use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
        trainer = Pretokenized(model=model, args=dpo_args, train_dataset=Dataset.from_list(rows),
                               processing_class=tok, callbacks=[Timer()])
        trainer.train()
    res = _summary(times, toks, losses or [float("nan")], args.warmup)
    res.update(margins=margins, prompt_differs=int(differ))
    return res


def worker_ours(args) -> dict:
    from pipelines.training import run_training

    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg = _setup(Path(tmp), args)
        rows = []
        run_training(cfg, ws.runs / "bench", rows.append, ws=ws, validated=True, log=lambda m: print(m, file=sys.stderr))
    return _summary([r["step_time"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows], args.warmup)


def _plain_batches(ws, cfg, tok):
    """The batches our trainer sees, in its order (same tokenization, same sampler and seed)."""
    from torch.utils.data import DistributedSampler

    from pipelines.training import encode_dataset

    enc, _ = encode_dataset(cfg, ws, tok)
    sampler = DistributedSampler(enc.examples, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(0)
    idx = list(sampler)
    groups = [idx[i: i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    return [[enc.examples[i] for i in g] for g in groups]


def worker_plain(args) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import device as devicemod
    from pipelines.training import IGNORE, ensure_chat_template
    from pipelines.training.common import lr_schedule

    with tempfile.TemporaryDirectory() as tmp:
        ws, cfg = _setup(Path(tmp), args)
        torch.set_num_threads(cfg.threads or devicemod.profile().threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(cfg.base_model)
        ensure_chat_template(tok)
        batches = _plain_batches(ws, cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.scheduler, cfg.warmup_steps, cfg.max_steps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    times, toks, losses = [], [], []
    for step in range(cfg.max_steps):
        items = batches[step % len(batches)]
        t0 = time.time()
        n = max(len(x[0]) for x in items)
        ids = torch.full((len(items), n), pad, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        times.append(time.time() - t0)
        toks.append(int(mask.sum()))
        print(f"plain step {step + 1}: loss {losses[-1]:.4f} {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return _summary(times, toks, losses, args.warmup)


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipelines import device as devicemod
    from pipelines.training import ensure_chat_template

    torch.set_num_threads(args.threads or devicemod.profile().threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    ensure_chat_template(tok)
    steps = args.warmup + (args.trl_steps or args.steps)
    times, toks, losses = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.seen = time.time(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            times.append(time.time() - self.t0)
            toks.append(int(state.num_input_tokens_seen - self.seen))
            print(f"trl step {len(times)}: {times[-1]:.2f} s", file=sys.stderr, flush=True)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        sft_args = SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=4, max_length=256,
                             learning_rate=2e-4, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                             # on a CPU, transformers refuses its default bf16=True unless told to use the CPU
                             use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
        trainer = SFTTrainer(model=args.model, args=sft_args, train_dataset=Dataset.from_list(make_rows()),
                             processing_class=tok, callbacks=[Timer()],
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        print(f"trl: bf16={sft_args.bf16} (autocast)", file=sys.stderr, flush=True)
        trainer.train()
    res = _summary(times, toks, losses or [float("nan")], args.warmup)
    res["bf16"] = bool(sft_args.bf16)
    return res


# --------------------------------------------------------------------------------------------- orchestration


def run_worker(method: str, args, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--trl-steps", str(args.trl_steps), "--max-length", str(args.max_length), "--dtype", args.dtype,
           "--bits", str(args.bits)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(f"{method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the workspace's default-model HF copy)")
    ap.add_argument("--root", default=None, help="workspace for the default model (default ~/.mactuner)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the device profile's)")
    ap.add_argument("--skip-trl", action="store_true", help="leave out TRL's SFTTrainer (bf16 autocast: very slow on CPU)")
    ap.add_argument("--trl-steps", type=int, default=0, help="measured steps for TRL (default: --steps)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--rounds", type=int, default=2, help="--method precision: alternated rounds of each dtype")
    ap.add_argument("--method", choices=("sft", "dpo", "precision", "profile", "levers"), default="sft",
                    help="sft: ours / plain / TRL SFTTrainer; dpo: our DPO step / TRL DPOTrainer")
    ap.add_argument("--max-length", type=int, default=256, help="--method dpo: longest sequence in tokens")
    ap.add_argument("--dtype", default="float32", help="ours: the TrainConfig dtype (auto, float32, bfloat16); "
                    "--method profile: also both")
    ap.add_argument("--compile", action="store_true", help="--method levers: also torch.compile of the decoder layers")
    ap.add_argument("--levers", default="all", help="--method levers: 'all', or 'short' (before and both of each "
                    "dtype, the lever lines alone left out)")
    ap.add_argument("--backend", choices=("torch", "mlx"), default="torch",
                    help="mlx: the torch trainer against the MLX trainer (bench/train_mlx.py)")
    ap.add_argument("--bits", type=int, choices=(0, 4, 8), default=0, help="--backend mlx: also MLX on a 4/8-bit base")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.model is None:
        from pipelines.models import default_hf_path
        from pipelines.workspace import Workspace

        args.model = str(default_hf_path(Workspace.open(args.root)))
    if not (Path(args.model) / "config.json").exists():
        print(f"No HF model at {args.model}: prepare the default model's training copy first "
              "(python -m pipelines.models materialize-default), or pass --model PATH.", file=sys.stderr)
        return 2
    if args.worker:
        from train_mlx import worker_mlx

        fn = {"ours": worker_ours, "plain": worker_plain, "trl": worker_trl, "ours-dpo": worker_ours_dpo,
              "trl-dpo": worker_trl_dpo, "mlx": worker_mlx}[args.worker]
        print(json.dumps(fn(args)))
        return 0
    if args.backend == "mlx":
        from train_mlx import main_mlx

        return main_mlx(args, run_worker)
    if args.method == "dpo":
        return main_dpo(args)
    if args.method == "precision":
        return main_precision(args)
    if args.method in ("profile", "levers"):
        from train_profile import main_levers, main_profile

        return (main_profile if args.method == "profile" else main_levers)(args)

    from pipelines import device as devicemod

    prof = devicemod.profile()
    print(f"model {args.model}; {prof.name}, {prof.physical_cores} cores, threads {args.threads or prof.threads}; "
          f"LoRA r=16 all-linear, batch 4, max length 256, {args.warmup} warm-up + {args.steps} measured steps")
    results = {}
    for method in ("ours", "plain") + (() if args.skip_trl else ("trl",)):
        print(f"running {method}...", flush=True)
        results[method] = run_worker(method, args, timeout=7200)
    print()
    print(f"{'method':8} {'tokens/s':>9} {'s/step':>8} {'median':>7} {'peak RSS':>9} {'final loss':>10}  losses per step")
    for m, r in results.items():
        if "error" in r:
            print(f"{m:8} failed: {r['error']}")
            continue
        print(f"{m:8} {r['tokens_per_s']:9.1f} {r['s_per_step']:8.2f} {r['median_s_per_step']:7.2f} "
              f"{r['peak_rss'] / 2**30:7.2f} GB "
              f"{r['final_loss']:10.4f}  {' '.join(f'{x:.4f}' for x in r['losses'])}")
    ours, plain = results["ours"], results["plain"]
    if "error" in ours or "error" in plain:
        return 1
    diffs = [abs(a - b) for a, b in zip(ours["losses"], plain["losses"])]
    print()
    print(f"ours / plain: {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x tokens/s "
          f"({plain['s_per_step'] / ours['s_per_step']:.2f}x s/step), peak RSS {ours['peak_rss'] / plain['peak_rss']:.2f}x; "
          f"median s/step {plain['median_s_per_step'] / ours['median_s_per_step']:.2f}x; "
          f"max |loss difference| over the same batches {max(diffs):.2e}  (target >= 1.3x)")
    if "trl" in results and "error" not in results["trl"]:
        trl = results["trl"]
        print(f"ours / trl:   {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s "
              f"({trl['s_per_step'] / ours['s_per_step']:.2f}x s/step), peak RSS {ours['peak_rss'] / trl['peak_rss']:.2f}x "
              f"(trl: bf16 autocast={trl.get('bf16')}, loss over all tokens, its own batches)")
    elif "trl" not in results:
        print("trl: skipped (--skip-trl)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


def main_dpo(args) -> int:
    from pipelines import device as devicemod

    prof = devicemod.profile()
    print(f"model {args.model}; {prof.name}, {prof.physical_cores} cores, threads {args.threads or prof.threads}; "
          f"DPO beta 0.1, LoRA r=16 all-linear, batch 4 pairs, max length {args.max_length}, fp32, "
          f"{args.warmup} warm-up + {args.steps} measured steps")
    results = {}
    for method in ("ours-dpo", "trl-dpo"):
        print(f"running {method}...", flush=True)
        results[method] = run_worker(method, args, timeout=7200)
    print()
    print(f"{'method':8} {'tokens/s':>9} {'s/step':>8} {'median':>7} {'peak RSS':>9}  losses per step | reward margins")
    for m, r in results.items():
        if "error" in r:
            print(f"{m:8} failed: {r['error']}")
            continue
        print(f"{m:8} {r['tokens_per_s']:9.1f} {r['s_per_step']:8.2f} {r['median_s_per_step']:7.2f} "
              f"{r['peak_rss'] / 2**30:7.2f} GB  {' '.join(f'{x:.5f}' for x in r['losses'])} | "
              f"{' '.join(f'{x:.4f}' for x in r['margins'])}")
    ours, trl = results["ours-dpo"], results["trl-dpo"]
    if "error" in ours or "error" in trl:
        return 1
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    print()
    print(f"ours / trl DPOTrainer ratio: {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s "
          f"({trl['s_per_step'] / ours['s_per_step']:.2f}x s/step, median "
          f"{trl['median_s_per_step'] / ours['median_s_per_step']:.2f}x), peak RSS {ours['peak_rss'] / trl['peak_rss']:.2f}x; "
          f"max |loss difference| over the same batches {max(diffs):.2e} (step 1: {diffs[0]:.1e}, log 2 for both); "
          f"pairs whose prompt tokens differ between the answers: {trl['prompt_differs']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


def main_precision(args) -> int:
    """Ours in float32 and in bf16 mixed precision on the same batches, alternated (fp32, bf16, fp32, bf16) so a
    busy machine slows both alike; the ratio of the faster of each."""
    import os

    from pipelines import device as devicemod

    prof = devicemod.profile()
    os.environ.pop("MACTUNER_TRAIN_DTYPE", None)
    choice, why = devicemod.train_dtype(prof)
    print(f"model {args.model}; {prof.name}, {prof.physical_cores} cores, threads {args.threads or prof.threads}; "
          f"LoRA r=16 all-linear, batch 4, max length 256, {args.warmup} warm-up + {args.steps} measured steps; "
          f"dtype auto here: {choice} ({why})")
    runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for _round in range(args.rounds):
        for dtype in runs:
            print(f"running ours {dtype}...", flush=True)
            args.dtype = dtype
            r = run_worker("ours", args, timeout=7200)
            if "error" in r:
                print(f"{dtype} failed: {r['error']}")
                return 1
            runs[dtype].append(r)
    best = {d: max(rs, key=lambda r: r["tokens_per_s"]) for d, rs in runs.items()}
    print()
    for d, r in best.items():
        print(f"{d:9} {r['tokens_per_s']:7.1f} tokens/s {r['s_per_step']:6.2f} s/step  peak RSS "
              f"{r['peak_rss'] / 2**30:5.2f} GB  losses {' '.join(f'{x:.4f}' for x in r['losses'])}")
    f32, b16 = best["float32"], best["bfloat16"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(f32["losses"], b16["losses"]))
    print(f"bf16/fp32 ratio: {b16['tokens_per_s'] / f32['tokens_per_s']:.2f}x tokens/s, peak RSS "
          f"{b16['peak_rss'] / f32['peak_rss']:.2f}x; max relative loss difference over the same batches {rel:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
