"""What the MLX trainer learns, mirroring the torch side (loss.py, preference.py): `SFTObjective` (cross-entropy on
the label tokens our encoder marks, summed over the step and divided by its label tokens) and `PreferenceObjective`
(DPO against the same model with its adapter switched off, or ORPO with the NLL of the chosen answers). Each
offers describe(), step(session, micro_batches) -> common.StepOutput (loss, input tokens, metrics), evaluate(session,
row) and verdict(session), as common.Objective says. MLX computes gradients as values: a step leaves the step's mean
gradients in `session.grads` (torch leaves them on the parameters) for the Session's clip and optimizer step.

The batches are our encoded rows as they are (encode.py's input_ids and labels, right-padded like encode.collate):
the output layer runs at the label positions only (model.LossParts). The losses are written here rather than taken
from mlx-lm-lora: its trainers mask whole sequences (not our label masks), need a second reference model in memory
and call Metal-only APIs, while each formula is three lines that must equal the torch ones exactly (the parity tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ..common import StepOutput, preference_metrics
from ..encode import IGNORE
from .model import adapter_disabled

LOG1MEXP_MAX = -1e-6  # as preference.py: a mean log-prob of exactly 0 would make the log odds infinite


@dataclass
class Batch:
    """One right-padded batch: ids [B, S]; the flat positions (into ids[:, :-1]) whose next token is a label, those
    labels, each label's sequence; the input tokens (non-pad)."""

    ids: mx.array
    positions: mx.array
    targets: mx.array
    sequence: np.ndarray
    rows: int
    in_tokens: int

    def per_sequence(self) -> mx.array:
        """[rows, labels] one-hot: sums token values per sequence by a matmul (differentiable)."""
        onehot = np.zeros((self.rows, len(self.sequence)), dtype=np.float32)
        onehot[self.sequence, np.arange(len(self.sequence))] = 1.0
        return mx.array(onehot)


def make_batch(items, pad_id: int) -> Batch:
    """encode.collate's batch as numpy/MLX arrays (no torch): right padding with pad_id, labels IGNORE there."""
    width = max(len(it[0]) for it in items)
    ids = np.full((len(items), width), pad_id, dtype=np.int32)
    labels = np.full((len(items), width), IGNORE, dtype=np.int64)
    for i, it in enumerate(items):
        ids[i, :len(it[0])] = it[0]
        labels[i, :len(it[1])] = it[1]
    target = labels[:, 1:]
    flat = np.nonzero(target.reshape(-1) != IGNORE)[0]
    return Batch(mx.array(ids), mx.array(flat.astype(np.int32)), mx.array(target.reshape(-1)[flat].astype(np.int32)),
                 (flat // max(1, width - 1)).astype(np.int64), len(items),
                 int(sum(len(it[0]) for it in items)))




def _add(a, b):
    return b if a is None else tree_map(lambda x, y: x + y, a, b)


class SFTObjective:
    def __init__(self, session):
        self.parts = session.parts
        self.value_and_grad = nn.value_and_grad(session.model, self._loss)

    def describe(self) -> str:
        return "SFT: cross-entropy on the label tokens (the assistant replies), output layer at those positions only."

    def _loss(self, ids, positions, targets):
        return -self.parts.token_logps(ids, positions, targets).sum()

    def step(self, session, micro_batches) -> StepOutput:
        batches = [make_batch(items, session.pad_id) for items in micro_batches]
        labels = sum(len(b.sequence) for b in batches)
        grads, loss_sum = None, 0.0
        for b in batches:
            loss, g = self.value_and_grad(b.ids, b.positions, b.targets)
            grads = _add(grads, g)
            mx.eval(loss, grads)  # one micro-batch's graph at a time
            loss_sum += float(loss)
        session.grads = tree_map(lambda x: x / max(1, labels), grads)  # for the Session's clip and optimizer step
        return StepOutput(loss_sum / max(1, labels), sum(b.in_tokens for b in batches))

    def verdict(self, session) -> dict:
        """Base vs tuned on the validation split and a few held-out prompts (verdict.json)."""
        from .verdict import after_training, compare_sft  # noqa: PLC0415

        return after_training(session, compare_sft)

    def evaluate(self, session, row: dict | None = None, items=None) -> float | None:
        """Mean loss per label token over the validation items (or `items`)."""
        items = session.val_items if items is None else items
        if not items:
            return None
        total, count = 0.0, 0
        with _eval_mode(session.model):
            for i in range(0, len(items), session.cfg.batch_size):
                b = make_batch(items[i:i + session.cfg.batch_size], session.pad_id)
                total += float(self._loss(b.ids, b.positions, b.targets))
                count += len(b.sequence)
        return total / count if count else None


class _eval_mode:
    """model.eval() inside (no dropout); the mode it had before, after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def log1mexp(x):
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


class PreferenceObjective:
    """DPO / ORPO on (chosen, rejected) pairs: each micro-batch is one forward of its n chosen then n rejected."""

    def __init__(self, session):
        cfg = session.cfg
        self.parts, self.kind = session.parts, cfg.objective
        self.coef = cfg.beta if self.kind == "dpo" else cfg.orpo_lambda
        self.value_and_grad = nn.value_and_grad(session.model, self._loss)

    def describe(self) -> str:
        if self.kind == "dpo":
            return (f"DPO (beta {self.coef:g}): the reference is the base model, i.e. this model with the adapter "
                    "switched off - no second copy in memory.")
        return f"ORPO (lambda {self.coef:g}): NLL on the chosen answers plus the odds-ratio term; no reference model."

    def _logps(self, b: Batch, onehot) -> mx.array:
        return onehot @ self.parts.token_logps(b.ids, b.positions, b.targets)

    def _terms(self, logps, counts, ref, weights):
        """(weighted objective, [preference sum, NLL sum, rewards chosen, rewards rejected, margins, correct,
        log odds]) for one micro-batch of n pairs."""
        n = logps.shape[0] // 2
        if self.kind == "dpo":
            chosen_ratio, rejected_ratio = logps[:n] - ref[:n], logps[n:] - ref[n:]
            losses = -nn.log_sigmoid(self.coef * (chosen_ratio - rejected_ratio))
            cr, rr = self.coef * chosen_ratio, self.coef * rejected_ratio
            nll, odds = mx.array(0.0), mx.array(0.0)
        else:
            mean = logps / mx.maximum(counts, 1)
            c, r = mx.minimum(mean[:n], LOG1MEXP_MAX), mx.minimum(mean[n:], LOG1MEXP_MAX)
            log_odds = (mean[:n] - mean[n:]) - (log1mexp(c) - log1mexp(r))
            losses = -self.coef * nn.log_sigmoid(log_odds)
            cr, rr = self.coef * mean[:n], self.coef * mean[n:]
            nll, odds = -logps[:n].sum(), log_odds.sum()
        objective = losses.sum() * weights[0] + nll * weights[1]
        stats = mx.stack([losses.sum(), nll, cr.sum(), rr.sum(), (cr - rr).sum(),
                          (cr > rr).astype(mx.float32).sum(), odds])
        return objective, mx.stop_gradient(stats)

    def _loss(self, ids, positions, targets, onehot, counts, ref, weights):
        logps = onehot @ self.parts.token_logps(ids, positions, targets)
        return self._terms(logps, counts, ref, weights)

    def _prepare(self, session, pairs, reference: bool = True):
        b = make_batch([c for c, _r in pairs] + [r for _c, r in pairs], session.pad_id)
        onehot = b.per_sequence()
        counts = mx.array(np.bincount(b.sequence, minlength=b.rows).astype(np.float32))
        ref = mx.zeros((b.rows,))
        if self.kind == "dpo" and reference:  # the reference log-probs: the same model, adapter off, no gradient
            with adapter_disabled(session.model):
                ref = mx.stop_gradient(self._logps(b, onehot))
            mx.eval(ref)
        return b, onehot, counts, ref

    @staticmethod
    def _chosen_tokens(pairs) -> int:
        return sum(sum(1 for x in c[1][1:] if x != IGNORE) for c, _r in pairs)

    def step(self, session, micro_batches) -> StepOutput:
        n_pairs = sum(len(p) for p in micro_batches)
        chosen_tokens = sum(self._chosen_tokens(p) for p in micro_batches)
        weights = mx.array([1.0 / max(1, n_pairs), 1.0 / max(1, chosen_tokens) if self.kind == "orpo" else 0.0])
        grads, stats, in_tokens = None, np.zeros(7), 0
        for pairs in micro_batches:
            b, onehot, counts, ref = self._prepare(session, pairs)
            (_obj, st), g = self.value_and_grad(b.ids, b.positions, b.targets, onehot, counts, ref, weights)
            grads = _add(grads, g)
            mx.eval(st, grads)
            stats += np.array(st, dtype=np.float64)
            in_tokens += b.in_tokens
        nll = stats[1] / max(1, chosen_tokens)
        loss = stats[0] / max(1, n_pairs) + (nll if self.kind == "orpo" else 0.0)
        session.grads = grads  # already weighted into the step's mean; for the Session's clip and optimizer step
        return StepOutput(float(loss), in_tokens, preference_metrics(self.kind, stats[2:].tolist(), n_pairs,
                                                                     float(nll), ""))

    def evaluate(self, session, row: dict) -> float | None:
        """The preference loss on the validation pairs; their rewards go into `row` as eval_rewards/..."""
        pairs = session.val_items
        if not pairs:
            return None
        stats, tokens = np.zeros(7), 0
        with _eval_mode(session.model):
            for i in range(0, len(pairs), session.cfg.batch_size):
                chunk = pairs[i:i + session.cfg.batch_size]
                b, onehot, counts, ref = self._prepare(session, chunk)
                _obj, st = self._loss(b.ids, b.positions, b.targets, onehot, counts, ref, mx.array([0.0, 0.0]))
                stats += np.array(st, dtype=np.float64)
                tokens += self._chosen_tokens(chunk)
        nll = stats[1] / max(1, tokens)
        row.update(preference_metrics(self.kind, stats[2:].tolist(), len(pairs), float(nll), "eval_"))
        return float(stats[0] / len(pairs) + (nll if self.kind == "orpo" else 0.0))

    def verdict(self, session) -> dict:
        """How often base and tuned prefer the chosen answers (verdict.json)."""
        from .verdict import after_training, compare_preference  # noqa: PLC0415

        return after_training(session, compare_preference)

    def margins(self, session, items) -> list[float]:
        """Chosen minus rejected log-prob of each pair (per answer token for ORPO), as the verdict compares them."""
        out = []
        with _eval_mode(session.model):
            for i in range(0, len(items), max(1, session.cfg.batch_size)):
                chunk = items[i:i + session.cfg.batch_size]
                b, onehot, counts, _ref = self._prepare(session, chunk, reference=False)
                logps = self._logps(b, onehot)
                if self.kind == "orpo":
                    logps = logps / mx.maximum(counts, 1)
                out += np.array(logps[:len(chunk)] - logps[len(chunk):]).tolist()
        return out
