"""What the adapter learns, as the torch loop sees it (the shape is common.Objective; the MLX backend mirrors it):

    SFTObjective         cross-entropy on the reply tokens (loss.py's CausalLMLoss), a token mean over the whole
                         global batch; eval: the same loss on the validation split; verdict: verdict.compare
    PreferenceObjective  DPO / ORPO on (chosen, rejected) pairs: preference.py
    make_objective(cfg, loss_mod, pad_id)   the one for cfg.objective

Each offers `module` (what the loop trains through; DDP wraps it under torchrun), describe(), step(session,
micro_batches) -> StepOutput, evaluate(session, row) and verdict(session). Imports torch: trainer process only.
"""

from __future__ import annotations

import torch

from . import verdict
from .common import StepOutput
from .config import TrainConfig
from .encode import IGNORE, collate
from .loss import CausalLMLoss
from .preference import PreferenceObjective


class SFTObjective:
    """Supervised fine-tuning: the loss of the labelled (reply) tokens."""

    items = "rows"  # what one training item is, for the log

    def __init__(self, cfg: TrainConfig, loss_mod: CausalLMLoss, pad_id: int):
        self.cfg, self.loss_mod, self.pad_id = cfg, loss_mod, pad_id
        self.module = loss_mod
        if cfg.packing:
            self.items = "packed sequences"

    def describe(self) -> str:
        return ("SFT: cross-entropy on the reply tokens, the output layer applied at those positions only"
                + (" (full logits)" if self.loss_mod.full_logits else "") + ".")

    def _batch(self, items: list):
        return collate(items, self.pad_id, self.cfg.packing)

    def step(self, s, micro_batches: list[list]) -> StepOutput:
        """Forward / backward over the step's micro-batches: the loss is the mean over the label tokens of all
        processes' micro-batches (each micro-batch's gradient scaled to that, so accumulation changes nothing)."""
        batches = [self._batch(items) for items in micro_batches]
        n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        in_tokens = sum(int(b["input_ids"].numel()) if self.cfg.packing else int((b["input_ids"] != self.pad_id).sum())
                        for b in batches)
        n_global, in_tokens_all = s.procs.sum([float(n_local), float(in_tokens)])
        scale = s.procs.world / max(1.0, n_global)  # DDP averages gradients over processes: undo that, then token-mean
        loss_sum = 0.0
        for j, b in enumerate(batches):
            with s.procs.accumulating(s.train_module, last=j == len(batches) - 1):
                part, _ = s.train_module(**s.to_device(b))
                (part * scale).backward()
            loss_sum += float(part.detach())
        return StepOutput(s.procs.sum([loss_sum])[0] / max(1.0, n_global), in_tokens_all)

    def evaluate(self, s, row: dict) -> float | None:
        """The token-mean loss on the validation split (each process its share)."""
        if not s.val_items:
            return None
        s.model.eval()
        total, n = 0.0, 0
        shard = s.val_items[s.procs.rank:: s.procs.world]
        with torch.no_grad():
            for i in range(0, len(shard), self.cfg.batch_size):
                part, count = self.loss_mod(**s.to_device(self._batch(shard[i: i + self.cfg.batch_size])))
                total, n = total + float(part), n + int(count)
        s.model.train()
        total, n = s.procs.sum([total, float(n)])
        return total / n if n else None

    def verdict(self, s) -> None:
        """Base vs tuned on the validation split and a few held-out prompts (verdict.json)."""
        verdict.after_training(s.run_dir, s.log, cfg=self.cfg, ws=s.ws, model=s.model, loss_mod=self.loss_mod,
                               tok=s.tokenizer, val_items=s.val_items, collate=self._batch, pad_id=self.pad_id,
                               device=s.device)


def make_objective(cfg: TrainConfig, loss_mod: CausalLMLoss, pad_id: int) -> SFTObjective | PreferenceObjective:
    """The objective `cfg.objective` names (sft, dpo, orpo)."""
    if cfg.objective == "sft":
        return SFTObjective(cfg, loss_mod, pad_id)
    return PreferenceObjective(cfg, loss_mod, pad_id)
