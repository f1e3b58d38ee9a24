"""Preference tuning: DPO and ORPO on (prompt, chosen, rejected) pairs, trained as LoRA by the same loop, run folder,
checkpoints, stop / resume and monitor as SFT (objectives.py picks `PreferenceObjective` when `objective` is dpo or
orpo).

    (encode.py)           a saved preference row -> two examples, prompt + chosen and prompt + rejected, labelled on
                          the answer's tokens only (assistant turns inside the prompt are context): encode_pairs
    sequence_logps        each sequence's summed log-prob of its labelled tokens; the output layer runs at those
                          positions only (loss.py's chunked function, one value per token)
    dpo_terms             -log σ(β((log πc − log πr) − (log refc − log refr))), the reference being the same model
                          with its adapter switched off (PEFT `disable_adapter()` under no_grad): no second copy
    orpo_terms            ORPO (Hong et al. 2024): λ·(−log σ(log odds_c − log odds_r)) from the length-normalized
                          log-probs, added to the NLL of the chosen answers (as TRL's ORPOTrainer)
    PreferenceLoss        the module the loop trains through (DDP wraps it): one batch of n chosen + n rejected
    PreferenceObjective   the loop's step, eval and verdict for pairs (the shape of common.Objective)

Metrics rows carry, as TRL logs them, rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies (the
share of pairs whose chosen answer gets the higher reward), and eval_... of each on the validation split at eval
steps. Rewards: DPO β·(log π − log ref) of each answer; ORPO λ·(mean log-prob per answer token). ORPO also logs
nll_loss and log_odds_chosen. Imports torch: the trainer process only (the verdict's view is verdict.py's).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import verdict
from .common import StepOutput, preference_metrics, preference_verdict
from .config import TrainConfig
from .encode import IGNORE, collate_pairs
from .loss import CausalLMLoss, linear_token_nll, plain_head

VERDICT_PAIRS = 64  # validation pairs compared base vs tuned at the end of a run
LOG1MEXP_MAX = -1e-6  # a mean log-prob of exactly 0 (probability 1 in float32) would make the log odds infinite


# ------------------------------------------------------------------------------------------------- the math


def sequence_logps(loss_mod, input_ids, labels):
    """(summed log-prob of each sequence's labelled tokens, labelled tokens per sequence) for the trainer's
    CausalLMLoss `loss_mod` (its model, output layer and soft-capping; full logits when it falls back to them)."""
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    ts = tgt[sel]
    if loss_mod.full_logits:
        logits = loss_mod.model(input_ids=input_ids, use_cache=False).logits[:, :-1][sel].float()
        tok_logp = logits.log_softmax(-1).gather(1, ts[:, None]).squeeze(1)
    else:
        decoder, head = loss_mod.parts()
        hs = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1][sel]
        if not plain_head(head):
            tok_logp = loss_mod.head_logits(head, hs).log_softmax(-1).gather(1, ts[:, None]).squeeze(1)
        else:
            tok_logp = -linear_token_nll(hs, head.weight, ts, loss_mod.softcap, buffers=loss_mod.buffers)
    rows = sel.nonzero(as_tuple=True)[0]
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, tok_logp)
    return sums, sel.sum(dim=1)


def dpo_terms(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss -log σ(β((πc − refc) − (πr − refr))) and the rewards β(π − ref) of each answer (detached)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (the branch at -ln 2, as TRL's)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_terms(chosen_mean, rejected_mean, lam: float):
    """Per-pair ORPO preference term -λ·log σ(log odds_c − log odds_r) from mean log-probs per answer token, the
    rewards λ·mean log-prob (detached) and the log odds ratio (detached)."""
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (log1mexp(c.clamp(max=LOG1MEXP_MAX)) - log1mexp(r.clamp(max=LOG1MEXP_MAX)))
    losses = -lam * F.logsigmoid(log_odds)
    return losses, lam * c.detach(), lam * r.detach(), log_odds.detach()


class PreferenceLoss(torch.nn.Module):
    """forward(batch of n chosen + n rejected) -> (sum of the per-pair preference terms, NLL summed over the chosen
    answers' tokens (ORPO; 0 for DPO), detached sums [rewards chosen, rewards rejected, margins, correct pairs, log
    odds]). Wraps the CausalLMLoss, so DDP can wrap this."""

    def __init__(self, loss_mod: CausalLMLoss, kind: str, coef: float):
        super().__init__()
        self.loss_mod, self.kind, self.coef = loss_mod, kind, coef

    def forward(self, input_ids, labels):
        n = input_ids.shape[0] // 2
        logps, counts = sequence_logps(self.loss_mod, input_ids, labels)
        if self.kind == "dpo":
            with torch.no_grad(), self.loss_mod.model.disable_adapter():  # the reference: the base model
                ref, _ = sequence_logps(self.loss_mod, input_ids, labels)
            losses, cr, rr = dpo_terms(logps[:n], logps[n:], ref[:n], ref[n:], self.coef)
            nll, odds = logps.new_zeros(()), logps.new_zeros(())
        else:
            mean = logps / counts.clamp(min=1)
            losses, cr, rr, log_odds = orpo_terms(mean[:n], mean[n:], self.coef)
            nll, odds = -logps[:n].sum(), log_odds.sum()
        stats = torch.stack([cr.sum(), rr.sum(), (cr - rr).sum(), (cr > rr).float().sum(), odds]).detach()
        return losses.sum(), nll, stats


# ------------------------------------------------------------------------------------------- the loop's part


class PreferenceObjective:
    """What the loop does differently for pairs: its step (micro-batches of pairs, gradient accumulation, DDP), its
    eval on the validation pairs, and the end-of-run comparison of base and tuned."""

    items = "pairs"  # what one training item is, for the log

    def __init__(self, cfg: TrainConfig, loss_mod: CausalLMLoss, pad_id: int):
        self.cfg, self.kind, self.pad_id = cfg, cfg.objective, pad_id
        self.coef = cfg.beta if cfg.objective == "dpo" else cfg.orpo_lambda
        self.module = PreferenceLoss(loss_mod, self.kind, self.coef)

    def describe(self) -> str:
        if self.kind == "dpo":
            return (f"DPO (beta {self.coef:g}): the reference is the base model, i.e. this model with the adapter "
                    "switched off - no second copy in memory.")
        return f"ORPO (lambda {self.coef:g}): NLL on the chosen answers plus the odds-ratio term; no reference model."

    @staticmethod
    def _counts(pairs) -> tuple[int, int]:
        chosen_tokens = sum(sum(1 for x in c[1][1:] if x != IGNORE) for c, _r in pairs)
        return chosen_tokens, sum(len(c[0]) + len(r[0]) for c, r in pairs)

    def _metrics(self, sums: list[float], pairs: float, nll: float, prefix: str) -> dict:
        return preference_metrics(self.kind, sums, pairs, nll, prefix)

    def step(self, s, micro_batches: list[list]) -> StepOutput:
        """Forward / backward over the micro-batches of pairs of one optimizer step: the loss is the mean over the
        step's pairs (all processes), plus for ORPO the NLL per chosen-answer token."""
        procs = s.procs
        n_pairs = sum(len(p) for p in micro_batches)
        counts = [self._counts(p) for p in micro_batches]
        total_pairs, chosen_tokens, in_tokens = procs.sum(
            [float(n_pairs), float(sum(c for c, _ in counts)), float(sum(t for _, t in counts))])
        w_pref, w_nll = procs.world / max(1.0, total_pairs), procs.world / max(1.0, chosen_tokens)  # DDP averages
        pref_sum, nll_sum, stats = 0.0, 0.0, [0.0] * 5
        for j, pairs in enumerate(micro_batches):
            with procs.accumulating(s.train_module, last=j == len(micro_batches) - 1):
                ps, ns, st = s.train_module(**s.to_device(collate_pairs(pairs, self.pad_id)))
                obj = ps * w_pref + (ns * w_nll if self.kind == "orpo" else 0.0)
                obj.backward()
            pref_sum, nll_sum = pref_sum + float(ps.detach()), nll_sum + float(ns.detach())
            stats = [a + b for a, b in zip(stats, st.tolist())]
        tot = procs.sum([pref_sum, nll_sum, *stats])
        nll = tot[1] / max(1.0, chosen_tokens)
        loss = tot[0] / max(1.0, total_pairs) + (nll if self.kind == "orpo" else 0.0)
        return StepOutput(loss, in_tokens, self._metrics(tot[2:], total_pairs, nll, ""))

    def evaluate(self, s, row: dict) -> float | None:
        """The preference loss on the validation pairs (this process's share); their rewards go into `row` as
        eval_rewards/... Returns the eval loss."""
        if not s.val_items:
            return None
        model = self.module.loss_mod.model
        model.eval()
        shard = s.val_items[s.procs.rank:: s.procs.world]
        pref_sum, nll_sum, stats, tokens = 0.0, 0.0, [0.0] * 5, 0
        try:
            with torch.no_grad():
                for i in range(0, len(shard), self.cfg.batch_size):
                    chunk = shard[i: i + self.cfg.batch_size]
                    ps, ns, st = self.module(**s.to_device(collate_pairs(chunk, self.pad_id)))
                    pref_sum, nll_sum = pref_sum + float(ps), nll_sum + float(ns)
                    stats = [a + b for a, b in zip(stats, st.tolist())]
                    tokens += self._counts(chunk)[0]
        finally:
            model.train()
        tot = s.procs.sum([pref_sum, nll_sum, float(len(shard)), float(tokens), *stats])
        nll = tot[1] / max(1.0, tot[3])
        row.update(self._metrics(tot[4:], tot[2], nll, "eval_"))
        return tot[0] / max(1.0, tot[2]) + (nll if self.kind == "orpo" else 0.0)

    def verdict(self, s) -> None:
        """How often base and tuned prefer the chosen answers (verdict.json)."""
        verdict.after_training(s.run_dir, s.log, cfg=self.cfg, ws=s.ws, model=s.model,
                               loss_mod=self.module.loss_mod, tok=s.tokenizer, val_items=s.val_items,
                               collate=lambda items: collate_pairs(items, self.pad_id), pad_id=self.pad_id,
                               device=s.device, compare_fn=self.compare)

    def compare(self, model, val_items, device, batch_size: int, max_examples: int = VERDICT_PAIRS, **_) -> dict:
        """The verdict for a preference run: how often base and tuned give the chosen answer the higher log-prob
        (summed for DPO, per token for ORPO - what each objective compares) on up to `max_examples` validation
        pairs, and the mean margin (chosen minus rejected). No greedy answers: a preference pair has no single
        reference reply."""
        t0 = time.time()
        items = list(val_items[:max_examples])
        was_training = model.training
        model.eval()
        try:
            tuned = self._margins(items, device, batch_size)
            with model.disable_adapter():
                base = self._margins(items, device, batch_size)
        finally:
            if was_training:
                model.train()
        return preference_verdict(self.kind, base, tuned, t0)

    def _margins(self, items: list, device, batch_size: int) -> list[float]:
        """Chosen minus rejected log-prob of each pair (per token for ORPO) under the model as it is now."""
        out = []
        with torch.no_grad():
            for i in range(0, len(items), max(1, batch_size)):
                chunk = items[i: i + batch_size]
                b = {k: v.to(device) for k, v in collate_pairs(chunk, self.pad_id).items()}
                logps, counts = sequence_logps(self.module.loss_mod, b["input_ids"], b["labels"])
                if self.kind == "orpo":
                    logps = logps / counts.clamp(min=1)
                out += (logps[: len(chunk)] - logps[len(chunk):]).tolist()
        return out
