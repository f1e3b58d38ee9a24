"""Training: LoRA / DoRA / rsLoRA / QLoRA fine-tuning of a causal LM on a saved dataset.

    config.py       TrainConfig (the one request: form, YAML, job and tests), validate(), check_resume()
    encode.py       dataset rows -> (input_ids, labels) with the chat template; packing, batches; check_data()
    common.py       what every backend shares: stop flag, lr schedule, divergence checks, TrainResult, peak memory,
                    the shape of an objective (Objective, StepOutput)
    loop.py         run_training() and the torch loop `fit` (single process or DDP under torchrun)
    session.py      setup() -> Session: processes, data, model + adapter (build_model), optimizer, objective, resume
    objectives.py   SFTObjective (and make_objective); preference.py: PreferenceObjective, DPO / ORPO on pairs
    loss.py         cross-entropy on label positions only, without [batch, seq, vocab] logits
    fused_lora.py   LoRA layers applied in one autograd function (PEFT's forward where it must stay)
    checkpoints.py  the checkpoint format (checkpoints/step-N/ ... COMPLETE) and the final adapter folder
    verdict.py      base vs tuned at the end of a run (verdict.json) and its Markdown
    mlx/            the MLX backend (Apple's MLX + mlx-lm): run_training hands it a config whose backend is
                    mlx; the same run folder, checkpoints and PEFT adapter
    plan.py         plan_training(): steps as the trainer counts them, memory, time, batch advice
    distributed.py  several processes / machines: a checkpoint on another number of them (keep the global batch or
                    refuse), the facts every process must agree on (pipelines/multinode.py compares them)

session.py, objectives.py, loss.py, fused_lora.py and preference.py import torch: only the trainer process imports them. A run's
folder and queue are runs.py's; a run trains in a job process (`python -m pipelines.jobs <run folder>`).
From a notebook:

    from pipelines.training import TrainConfig, plan_training, run_training
    cfg = TrainConfig(dataset="my-set", max_steps=20)
    print(plan_training(cfg, ws).total_steps)
    result = run_training(cfg, ws.runs / "try-1", on_metrics=print, ws=ws)
"""

from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .common import STOP_FLAG, TrainResult, peak_rss
from .config import (
                     BACKENDS,
                     BASE_BITS,
                     COMPLETE_MARKER,
                     DTYPES,
                     METHODS,
                     OBJECTIVES,
                     SCHEDULERS,
                     TrainConfig,
                     TrainingFailed,
                     check_resume,
                     dataset_dir,
                     dataset_versions,
                     resolve_base_model,
                     validate,
)
from .encode import (
                     IGNORE,
                     check_data,
                     collate,
                     encode_conversation,
                     encode_dataset,
                     encode_split,
                     ensure_chat_template,
                     pack_examples,
                     read_rows,
)
from .loop import run_training
from .plan import TrainingPlan, memory_advice, plan_training

__all__ = ["BACKENDS", "BASE_BITS", "COMPLETE_MARKER", "DTYPES", "IGNORE", "METHODS", "OBJECTIVES", "SCHEDULERS",
           "STOP_FLAG", "TrainConfig", "TrainResult", "TrainingFailed", "TrainingPlan", "check_data", "check_resume",
           "collate",
           "dataset_dir", "dataset_versions", "encode_conversation", "encode_dataset", "encode_split",
           "ensure_chat_template", "list_checkpoints", "load_checkpoint", "memory_advice",
           "pack_examples", "peak_rss", "plan_training", "read_rows", "resolve_base_model",
           "run_training", "save_checkpoint", "validate"]
