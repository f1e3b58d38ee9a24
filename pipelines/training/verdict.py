"""Did the fine-tune help? At the end of a finished run, base and tuned are compared on the validation split: mean loss
and perplexity of each (the trainer's own loss module; the base is the same model with the adapter switched off by
PEFT's `disable_adapter()`, no second copy), and greedy answers of both to a few held-out prompts (the validation
rows' conversations up to their last assistant reply, rendered with the chat template the training used) beside the
reference reply, each with a difflib similarity ratio to it. Written to runs/<run>/verdict.json with one plain line.
The cost is bounded: at most MAX_EXAMPLES validation examples, N_PROMPTS prompts and MAX_NEW_TOKENS tokens each.
An error never fails the run: it is logged and written into verdict.json instead."""

from __future__ import annotations

import difflib
import json
import math
import time
from pathlib import Path
from typing import Callable

from ..workspace import write_json

VERDICT_FILE = "verdict.json"
MAX_EXAMPLES = 64
N_PROMPTS = 4
MAX_NEW_TOKENS = 48
MARGIN = 0.01  # the tuned loss must be at least 1% below the base's to count as better


def similarity(answer: str, reference: str) -> float:
    """difflib's SequenceMatcher ratio of the two stripped texts, 0..1."""
    return round(difflib.SequenceMatcher(None, answer.strip(), reference.strip()).ratio(), 3)


def held_out_prompts(rows: list[dict], n: int = N_PROMPTS) -> list[tuple[list[dict], str]]:
    """(messages before the last assistant reply, that reply) of the first `n` conversation rows that have a user turn
    before an assistant reply; rows with tools or tool calls are left out."""
    out = []
    for row in rows:
        msgs = row.get("messages")
        if not msgs or row.get("tools") or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs):
            continue
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        if last < 1 or not any(m["role"] == "user" for m in msgs[:last]) or not msgs[last]["content"].strip():
            continue
        out.append(([{"role": m["role"], "content": m["content"]} for m in msgs[:last]], msgs[last]["content"]))
        if len(out) >= n:
            break
    return out


def verdict_line(base_loss: float, tuned_loss: float) -> tuple[bool, str]:
    better = tuned_loss < base_loss - max(1e-4, MARGIN * base_loss)
    nums = (f"validation loss {base_loss:.2f} → {tuned_loss:.2f} (perplexity {_ppl(base_loss):.1f} → "
            f"{_ppl(tuned_loss):.1f})")
    return better, (f"the tuned model is better than the base: {nums}" if better
                    else f"the tuned model is no better than the base: {nums}")


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def compare(model, loss_mod, tok, val_items, val_rows, *, collate: Callable, pad_id: int, device, batch_size: int,
            max_length: int, max_examples: int = MAX_EXAMPLES, n_prompts: int = N_PROMPTS,
            max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The verdict dict for a PEFT `model` (with its `loss_mod`, the trainer's CausalLMLoss) on encoded `val_items`
    (first `max_examples`) and raw `val_rows` (prompts). `collate(items) -> batch` as the trainer's."""
    import torch  # noqa: PLC0415

    t0 = time.time()
    items = list(val_items[:max_examples])
    was_training = model.training
    model.eval()

    def mean_loss() -> float:
        s, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(items), max(1, batch_size)):
                batch = {k: v.to(device) for k, v in collate(items[i: i + batch_size]).items()}
                ls, ln = loss_mod(**batch)
                s, n = s + float(ls), n + int(ln)
        return s / n if n else float("nan")

    eos = [t for t in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if t is not None]
    eos_ids = sorted({x for t in eos for x in (t if isinstance(t, (list, tuple)) else [t])})  # Gemma: a list

    def answer(ids: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long, device=device), max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids or None, use_cache=True,
                temperature=None, top_p=None, top_k=None)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    prompts = prompt_ids(tok, val_rows, n_prompts, max_length)

    try:
        tuned_loss = mean_loss()
        tuned_answers = [answer(ids) for _m, _r, ids in prompts]
        with model.disable_adapter():
            base_loss = mean_loss()
            base_answers = [answer(ids) for _m, _r, ids in prompts]
    finally:
        if was_training:
            model.train()
    return summarize(base_loss, tuned_loss, prompts, base_answers, tuned_answers, len(items), max_new_tokens, t0)


def prompt_ids(tok, val_rows, n_prompts: int, max_length: int) -> list[tuple[list[dict], str, list[int]]]:
    """(messages, reference reply, prompt token ids) of the held-out prompts that fit in `max_length`, rendered
    with the chat template the training used."""
    prompts = []
    for msgs, ref in held_out_prompts(val_rows, n_prompts):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if ids and len(ids) <= max_length:
            prompts.append((msgs, ref, ids))
    return prompts


def summarize(base_loss: float, tuned_loss: float, prompts, base_answers: list[str], tuned_answers: list[str],
              examples: int, max_new_tokens: int, t0: float) -> dict:
    """The verdict dict (any backend): the line, base vs tuned loss / perplexity / similarity, the prompts side by
    side. `prompts` as prompt_ids returns them."""
    better, line = verdict_line(base_loss, tuned_loss)
    rows = []
    for (msgs, ref, _ids), b, t in zip(prompts, base_answers, tuned_answers):
        user = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
        rows.append({"prompt": user, "reference": ref, "base": b, "tuned": t,
                     "base_similarity": similarity(b, ref), "tuned_similarity": similarity(t, ref)})
    mean = (lambda k: round(sum(r[k] for r in rows) / len(rows), 3) if rows else None)
    return {"verdict": line, "better": better, "examples": examples,
            "base": {"loss": base_loss, "perplexity": _ppl(base_loss), "similarity": mean("base_similarity")},
            "tuned": {"loss": tuned_loss, "perplexity": _ppl(tuned_loss), "similarity": mean("tuned_similarity")},
            "prompts": rows, "max_new_tokens": max_new_tokens, "seconds": round(time.time() - t0, 2),
            "time": time.time()}


def after_training(run_dir, log: Callable[[str], None], cfg=None, ws=None, compare_fn: Callable | None = None,
                   **kw) -> dict:
    """compare(**kw) (or `compare_fn(**kw)`: a preference run's, preference.py) written to run_dir/verdict.json;
    never raises: an error is logged and written as {"error": ...}. With the run's `cfg` and `ws`, the validation
    rows, batch size and max length come from them."""
    path = Path(run_dir) / VERDICT_FILE
    n = min(len(kw.get('val_items') or []), kw.get('max_examples', MAX_EXAMPLES))
    pairs = cfg.objective != "sft" if cfg is not None else compare_fn is not None
    log(f"Comparing base and tuned on {n} validation " + ("pairs…" if pairs else
                                                          "examples and a few held-out prompts…"))
    try:
        if cfg is not None:
            from .config import dataset_dir  # noqa: PLC0415
            from .encode import read_rows  # noqa: PLC0415

            if "val_rows" not in kw and compare_fn is None:
                rows = read_rows(dataset_dir(ws, cfg.dataset, cfg.dataset_version) / "validation.jsonl")
                kw["val_rows"] = rows[: cfg.max_eval_rows] if cfg.max_eval_rows else rows
            kw.setdefault("batch_size", cfg.batch_size)
            kw.setdefault("max_length", cfg.max_length)
        out = (compare_fn or compare)(**kw)
        log(f"Verdict: {out['verdict']}.")
    except Exception as e:  # noqa: BLE001 - the verdict must not fail a finished run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        out = {"error": msg, "verdict": f"no verdict: the comparison failed ({msg})", "time": time.time()}
        log(f"The base-vs-tuned comparison failed ({msg}); the run is still finished.")
    try:
        write_json(path, out)
    except Exception as e:  # noqa: BLE001
        log(f"Could not write {VERDICT_FILE}: {e}")
    return out


def read_verdict(run_dir) -> dict | None:
    path = Path(run_dir) / VERDICT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict_markdown(v: dict | None) -> str:
    """The Train tab's view: the line, a base vs tuned table, and the prompts side by side."""
    if not v:
        return ""
    if v.get("error"):
        return f"**Verdict:** {v.get('verdict') or v['error']}"
    if v.get("kind") == "preference":
        return preference_markdown(v)
    b, t = v["base"], v["tuned"]

    def cell(s: str) -> str:
        return " ".join(str(s).split()).replace("|", "\\|")[:200] or "∅"

    def sim(x):
        return "–" if x is None else f"{x:.2f}"

    lines = [f"**Verdict:** {v['verdict']} ({v.get('examples', '?')} validation examples)", "",
             "| | base | tuned |", "|---|---|---|",
             f"| validation loss | {b['loss']:.4f} | {t['loss']:.4f} |",
             f"| perplexity | {b['perplexity']:.2f} | {t['perplexity']:.2f} |",
             f"| similarity to the reference (mean) | {sim(b.get('similarity'))} | {sim(t.get('similarity'))} |"]
    if v.get("prompts"):
        lines += ["", f"Greedy answers (at most {v.get('max_new_tokens', MAX_NEW_TOKENS)} tokens), similarity to the "
                  "reference in brackets:", "", "| prompt | reference | base | tuned |", "|---|---|---|---|"]
        for r in v["prompts"]:
            lines.append(f"| {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['base'])} "
                         f"({r['base_similarity']:.2f}) | {cell(r['tuned'])} ({r['tuned_similarity']:.2f}) |")
    return "\n".join(lines)


def preference_markdown(v: dict) -> str:
    """The Train tab's view of a preference (DPO / ORPO) run's verdict."""
    b, t = v["base"], v["tuned"]
    return "\n".join([
        f"**Verdict:** {v['verdict']} ({v.get('examples', '?')} validation pairs)", "",
        "| | base | tuned |", "|---|---|---|",
        f"| preference accuracy (chosen has the higher log-prob) | {b['accuracy']:.0%} | {t['accuracy']:.0%} |",
        f"| mean log-prob margin, chosen minus rejected | {b['margin']:+.3f} | {t['margin']:+.3f} |"])
