"""Validation of a GGUF: it loads in llama.cpp, its chat template renders like the HF tokenizer's, fixed prompts give
text without collapse, perplexity on held-out text against the HF model, and the fine-tune survived. The result
goes to <stem>.validation.json beside the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..progress import ProgressFn, no_progress
from ..workspace import dir_size, write_json
from .common import gguf_type, help_meta, is_gguf
from .merge import weights_dtype

# A fixed held-out paragraph (written for MacTuner, in no training set) for perplexity.
HELDOUT_TEXT = (
    "The harbour town woke slowly on winter mornings. Fishermen checked their nets by lamplight while the bakery "
    "on the corner pulled the first loaves from the oven, and the smell of bread drifted down to the water. By "
    "eight o'clock the school bus had made its round, the post office had opened its single window, and the old "
    "ferry was warming its engine for the crossing to the island. Visitors rarely came in this season, so the "
    "people who lived there had the streets to themselves: they walked their dogs along the sea wall, argued "
    "about the weather, and traded news of who had fixed a roof or planted a garden. When a storm was coming, "
    "everyone knew it a day early, because the gulls flew inland and the barometer in the harbour master's "
    "office fell faster than anyone could remember."
)


VALIDATION_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]


VALIDATION_PROMPTS = ["Write one sentence about the sea.", "What is 2 + 2?", "Name three colours."]


CHECK_LABELS = {"loads": "loads", "chat_template": "chat template", "modelfile_template": "Modelfile template",
                "generation": "generation", "perplexity": "perplexity", "finetune_survived": "fine-tune survived",
                "merged_match": "answers like the merged model"}


def failed_checks(validation: dict | None) -> list[str]:
    """The labels of a validation's failed checks (its JSON form), e.g. ["fine-tune survived"]."""
    return [CHECK_LABELS.get(i.get("name"), i.get("name")) for i in (validation or {}).get("items", [])
            if i.get("ok") is False]


@dataclass
class CheckItem:
    name: str = field(metadata=help_meta(
        "loads | chat_template | modelfile_template | generation | perplexity | finetune_survived | merged_match"))
    ok: bool | None = field(metadata=help_meta("True passed, False failed, None skipped / inconclusive."))
    detail: str = field(default="", metadata=help_meta("What was checked and what was seen."))


@dataclass
class PerplexityRow:
    type: str = field(metadata=help_meta("HF (merged) or the GGUF's type (f16, Q4_K_M, ...)."))
    file: str = field(metadata=help_meta("File or folder name."))
    size: int = field(metadata=help_meta("Bytes on disk."))
    perplexity: float | None = field(metadata=help_meta("Perplexity on the held-out text (lower is better)."))
    delta_pct: float | None = field(metadata=help_meta("Perplexity change vs the HF model, in percent."))
    tokens_per_s: float | None = field(metadata=help_meta("Tokens per second while scoring the text (prompt processing)."))


@dataclass
class Validation:
    gguf: str = field(metadata=help_meta("The GGUF file validated."))
    ok: bool = field(metadata=help_meta("True when no check failed (skipped ones do not count)."))
    items: list[CheckItem] = field(default_factory=list, metadata=help_meta("One row per check."))
    table: list[PerplexityRow] = field(default_factory=list, metadata=help_meta("HF row (if any) + this GGUF's row."))
    seconds: float = field(default=0.0, metadata=help_meta("Time the validation took."))

    def as_dict(self) -> dict:
        return asdict(self)


def _load_llama(gguf_path: Path, n_ctx: int = 512, lora: Path | None = None):
    """llama.cpp in this (export job) process, with the settings this CPU needs (serving.llamacpp); `lora` applies a
    LoRA GGUF on the model."""
    from ..serving.llamacpp import open_llama  # noqa: PLC0415
    from ..serving.lora import missing_lora_targets  # noqa: PLC0415

    missing = missing_lora_targets(lora, gguf_path) if lora else []
    if missing:  # refused here: llama-cpp-python would crash on llama.cpp's refusal
        raise ValueError(f"{gguf_path.name} has no {', '.join(missing[:3])} for the LoRA to adapt (another base?"
                         + (" A LoRA with an output.weight pair needs the base GGUF its export wrote, with the output"
                            " layer written out." if "output.weight" in missing else "") + ")")
    extra = {"lora_path": str(lora)} if lora else {}
    return open_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_gpu_layers=0, **extra)


def _prompt_ids(llm, prompt: str) -> list[int]:
    """A rendered prompt's token ids in llama.cpp, BOS first when the model adds one."""
    p_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    if llm.token_bos() >= 0 and (not p_ids or p_ids[0] != llm.token_bos()) and llm._model.add_bos_token():
        p_ids = [llm.token_bos()] + p_ids
    return p_ids


def _log_softmax_rows(scores, targets) -> list[float]:
    import numpy as np  # noqa: PLC0415

    s = np.asarray(scores, dtype=np.float64)
    m = s.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
    return list(s[np.arange(len(targets)), targets] - lse)


def gguf_logprobs(llm, ids: list[int], start: int = 1) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= start under llama.cpp (one window; ids must fit in n_ctx)."""
    llm.reset()
    llm.eval(ids)
    scores = llm.scores[: len(ids) - 1]
    return _log_softmax_rows(scores[start - 1:], ids[start:])


def gguf_perplexity(llm, text: str, window: int | None = None) -> tuple[float, float, int]:
    """(perplexity, tokens/s, tokens) of `text` under llama.cpp, in non-overlapping windows of n_ctx tokens."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True)
    window = window or int(llm.n_ctx())
    lps, t0 = [], time.perf_counter()
    for s in range(0, len(ids) - 1, window - 1):
        chunk = ids[s: s + window]
        if len(chunk) < 2:
            break
        lps += gguf_logprobs(llm, chunk)
    dt = time.perf_counter() - t0
    return math.exp(-sum(lps) / len(lps)), len(ids) / dt if dt else 0.0, len(ids)


def hf_perplexity(model, tok, text: str, window: int = 512) -> tuple[float, float, int]:
    """(perplexity, tokens/s, tokens) under transformers, same non-overlapping windows as the GGUF."""
    import torch  # noqa: PLC0415

    ids = tok(text, return_tensors="pt").input_ids[0].tolist()
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    total, n, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window - 1):
            chunk = ids[s: s + window]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk])
            logits = model(x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
            total += float(lp.sum())
            n += len(chunk) - 1
    dt = time.perf_counter() - t0
    return math.exp(-total / n), len(ids) / dt if dt else 0.0, len(ids)


def _hf_answer_logprob(model, tok, prompt: str, answer_ids: list[int] | None = None, max_new: int = 24):
    """Greedy answer ids (when answer_ids is None) and their mean log-prob under `model`, HF side."""
    import torch  # noqa: PLC0415

    p_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids[0].tolist()
    with torch.inference_mode():
        if answer_ids is None:
            out = model.generate(torch.tensor([p_ids]), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            answer_ids = out[0, len(p_ids):].tolist()
        if not answer_ids:
            return [], None
        x = torch.tensor([p_ids + answer_ids])
        logits = model(x).logits[0, len(p_ids) - 1: -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None])[:, 0]
    return answer_ids, float(lp.mean())


def degenerate(ids: list[int], text: str | None = None, prompt: str | None = None) -> str | None:
    """Why a generation is collapsed text, or None when it looks like language: empty (or whitespace only); the
    prompt said back; one token over half of it; one word over half of its words; few distinct tokens (under 30% of
    16 or more); or its tail a phrase of 1-8 tokens repeated 4 times or more, covering at least half of it."""
    if not ids or (text is not None and not text.strip()):
        return "empty output"
    if prompt and text and text.strip().lower() == prompt.strip().lower():
        return "the prompt said back, word for word"
    n = len(ids)
    top, count = Counter(ids).most_common(1)[0]
    if n >= 8 and count / n > 0.5:
        return f"repeated-token collapse: one token is {count}/{n} of the output"
    words = (text or "").lower().split()
    if len(words) >= 6:
        w, wc = Counter(words).most_common(1)[0]
        if wc / len(words) > 0.5:
            return f"one word repeated: {w[:20]!r} is {wc}/{len(words)} of the words"
    if n >= 16 and len(set(ids)) / n < 0.3:
        return f"low variety: {len(set(ids))} distinct tokens in {n}"
    for period in range(1, 9):
        reps = 1
        while (reps + 1) * period <= n and ids[n - (reps + 1) * period: n - reps * period] == ids[n - period:]:
            reps += 1
        if reps >= 4 and reps * period * 2 >= n:
            return f"loops: a {period}-token phrase repeated {reps} times at the end"
    return None


_HF_PPL: dict = {}  # HF perplexity rows by (folder, config mtime, text hash): one HF pass per export
_HF_ANSWERS: dict = {}  # the tuned model's answer to a training prompt and its scores, by (folder, mtime, base, prompt)


def _hf_row(hf_dir: Path, text: str) -> PerplexityRow:
    key = (str(hf_dir), (hf_dir / "config.json").stat().st_mtime, hashlib.sha1(text.encode()).hexdigest())
    if key not in _HF_PPL:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=weights_dtype(hf_dir)).eval()
        window = min(512, int(getattr(model.config, "max_position_embeddings", 512) or 512))
        ppl, tps, _n = hf_perplexity(model, tok, text, window)
        _HF_PPL[key] = PerplexityRow("HF (merged)", hf_dir.name, dir_size(hf_dir), round(ppl, 4), 0.0, round(tps, 1))
        del model
    return _HF_PPL[key]


def validate(gguf_path: str | os.PathLike, hf_dir: str | os.PathLike | None = None,
             base_dir: str | os.PathLike | None = None, train_prompt: list[dict] | str | None = None,
             progress: ProgressFn = no_progress, extra_text: str = "", lora: str | os.PathLike | None = None,
             merged_gguf: str | os.PathLike | None = None) -> Validation:
    """Check a GGUF and write <stem>.validation.json beside it. Never raises for a broken file: each problem is a
    failed CheckItem. Checks: loads in llama.cpp; its chat template renders VALIDATION_CONVERSATION exactly like
    the HF tokenizer's; the Modelfile's template renders like it in Go; greedy answers to fixed prompts are not
    degenerate (empty, one token or word repeated, few distinct tokens, a loop); perplexity
    on HELDOUT_TEXT (+ extra_text) vs the HF model; and, given base_dir and a training prompt, that the fine-tune
    survived: the tuned HF model's greedy answer is scored (mean log-prob per token) by the GGUF, the tuned HF
    model and the base model - it survived when the GGUF's score is closer to the tuned model's than the base's.
    Log-likelihoods are used rather than comparing generated strings because quantization legitimately changes a
    token here and there, while the likelihood of the tuned answer moves smoothly with how much of the tuning is left.

    With `lora` (a LoRA GGUF), `gguf_path` is the base model's GGUF and the LoRA is validated applied on it: the
    result is about the LoRA (<lora stem>.validation.json, its Modelfile), and given `merged_gguf` (the merged
    model's float GGUF) one more check: the LoRA on the base answers like the merged model."""
    from ..templates import PLAIN_CHAT_TEMPLATE, render_template  # noqa: PLC0415

    t0 = time.time()
    gguf_path = Path(gguf_path)
    subject = Path(lora) if lora else gguf_path  # the file this validation is about
    hf_dir = Path(hf_dir) if hf_dir else None
    v = Validation(gguf=str(subject), ok=False)
    text = HELDOUT_TEXT + ("\n\n" + extra_text if extra_text else "")
    progress(0.0, f"Loading {subject.name} in llama.cpp...")
    llm = None
    try:
        for f in (gguf_path, subject):
            if not is_gguf(f):
                raise ValueError(f"{f.name} is not a GGUF file (bad magic)")
        llm = _load_llama(gguf_path, lora=subject if lora else None)
        v.items.append(CheckItem("loads", True, (f"llama.cpp applied it on {gguf_path.name} " if lora else
                                                 "llama.cpp loaded it ")
                                 + f"({llm.n_vocab()} tokens, n_ctx {llm.n_ctx()})"))
    except Exception as e:  # noqa: BLE001 - a broken file is a result here, not a crash
        v.items.append(CheckItem("loads", False, f"llama.cpp cannot load {subject.name}"
                                 + (f" on {gguf_path.name}" if lora else "") + f": {str(e)[:200]}"))
    tok = None
    if hf_dir is not None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(hf_dir)
    g_tpl = None
    if llm is not None:
        md = dict(llm.metadata)
        g_tpl = md.get("tokenizer.chat_template")
        specials = {"bos_token": llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
                    if llm.token_bos() >= 0 else "",
                    "eos_token": llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
                    if llm.token_eos() >= 0 else ""}
        # (b) chat template
        progress(0.15, "Comparing chat templates...")
        h_tpl = getattr(tok, "chat_template", None) if tok is not None else None
        if tok is None:
            v.items.append(CheckItem("chat_template", None if g_tpl else False,
                                     "no HF folder to compare with" if g_tpl else "the GGUF carries no chat template"))
        elif not g_tpl:
            v.items.append(CheckItem("chat_template", False if h_tpl else None,
                                     "the GGUF carries no chat template (tokenizer.chat_template)" if h_tpl
                                     else "neither the HF tokenizer nor the GGUF has a chat template"))
        else:
            try:
                ours = render_template(g_tpl, VALIDATION_CONVERSATION, add_generation_prompt=True, **specials)
                theirs = tok.apply_chat_template(VALIDATION_CONVERSATION, tokenize=False, add_generation_prompt=True)
                same = ours == theirs
                detail = "the GGUF's template renders the test conversation exactly like the HF tokenizer's" if same \
                    else f"prompts differ: GGUF {ours[:120]!r} vs HF {theirs[:120]!r}"
                v.items.append(CheckItem("chat_template", same, detail))
            except Exception as e:  # noqa: BLE001
                v.items.append(CheckItem("chat_template", False, f"rendering failed: {str(e)[:200]}"))
        # (b2) the Ollama Modelfile's template, rendered by Go as Ollama renders it
        progress(0.2, "Rendering the Modelfile template with Go...")
        v.items.append(_modelfile_item(subject, h_tpl or g_tpl, specials))
        # (c) generations
        progress(0.3, "Generating from fixed prompts...")
        bad, samples, prompt_ids = [], [], []
        for p in VALIDATION_PROMPTS:
            try:
                p_ids = _prompt_ids(llm, render_template(g_tpl or PLAIN_CHAT_TEMPLATE, [{"role": "user", "content": p}],
                                                          True, **specials))
                prompt_ids.append(p_ids)
                out = llm.create_completion(p_ids, max_tokens=32, temperature=0.0, top_k=1, seed=0)
                txt = out["choices"][0]["text"]
                ids = llm.tokenize(txt.encode("utf-8"), add_bos=False, special=True) if txt else []
                why = degenerate(ids, txt, p)
                samples.append(txt[:60])
                if why:
                    bad.append(f"{p!r}: {why}")
            except Exception as e:  # noqa: BLE001
                bad.append(f"{p!r}: generation failed ({str(e)[:120]})")
        v.items.append(CheckItem("generation", not bad, "; ".join(bad) if bad else
                                 f"{len(samples)} prompts answered, e.g. {samples[0]!r}"))
        # (d) perplexity
        progress(0.5, "Perplexity on the held-out text...")
        try:
            ppl, tps, _n = gguf_perplexity(llm, text)
            hf_row = _hf_row(hf_dir, text) if hf_dir is not None else None
            if hf_row:
                v.table.append(hf_row)
            delta = round(100 * (ppl / hf_row.perplexity - 1), 2) if hf_row and hf_row.perplexity else None
            v.table.append(PerplexityRow("LoRA" if lora else gguf_type(gguf_path), subject.name, subject.stat().st_size,
                                         round(ppl, 4), delta, round(tps, 1)))
            v.items.append(CheckItem("perplexity", math.isfinite(ppl), f"perplexity {ppl:.3f}"
                                     + (f" vs HF {hf_row.perplexity:.3f} ({delta:+.2f}%)" if delta is not None else "")))
        except Exception as e:  # noqa: BLE001
            v.items.append(CheckItem("perplexity", False, f"could not score the text: {str(e)[:200]}"))
        # (e) the fine-tune survived
        progress(0.75, "Checking that the fine-tune survived...")
        v.items.append(_survived(llm, hf_dir, base_dir, train_prompt, tok, g_tpl, specials))
        if lora and merged_gguf:
            progress(0.85, "Comparing the LoRA's answers with the merged model's...")
            llm.close()  # one model in memory at a time: the merged and the bare base are loaded in turn
            llm = None
            v.items.append(_merged_match(gguf_path, subject, Path(merged_gguf), prompt_ids))
    v.ok = all(i.ok is not False for i in v.items)
    v.seconds = round(time.time() - t0, 2)
    if llm is not None:
        llm.close()
    if subject.parent.is_dir():
        write_json(subject.with_name(f"{subject.stem}.validation.json"), v.as_dict())
    progress(1.0, "Validation " + ("passed" if v.ok else "found problems"))
    return v


def _modelfile_item(gguf_path: Path, jinja: str | None, specials: dict) -> CheckItem:
    """The "Modelfile template" row: <stem>.Modelfile's TEMPLATE rendered by Go's text/template (gotemplate.py) on
    test conversations, against the chat template (Jinja) - identical text required. A Modelfile without TEMPLATE
    for a model with a chat template fails, saying why it was not translated and what Ollama does instead."""
    from .families import translate  # noqa: PLC0415
    from .gotemplate import compare_with_jinja, modelfile_template  # noqa: PLC0415
    from .ollama import OLLAMA_FALLBACK  # noqa: PLC0415

    mf = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    if not mf.is_file():
        return CheckItem("modelfile_template", None, "skipped: no Modelfile beside this GGUF")
    tpl = modelfile_template(mf.read_text())
    if not jinja:
        return CheckItem("modelfile_template", None, "skipped: the model has no chat template to compare with")
    if tpl is None:
        why = translate(jinja, specials.get("bos_token", ""), specials.get("eos_token", "")).reason or \
            "the Modelfile has no TEMPLATE"
        return CheckItem("modelfile_template", False, f"not translated: {why}. {OLLAMA_FALLBACK}.")
    try:
        ok, detail = compare_with_jinja(tpl, jinja, specials.get("bos_token", ""), specials.get("eos_token", ""))
    except Exception as e:  # noqa: BLE001 - the Jinja side failing is a result too
        ok, detail = False, f"could not compare: {str(e)[:200]}"
    return CheckItem("modelfile_template", ok, detail)


validate_gguf = validate  # export() has a `validate` flag that shadows the function


def _answer_logprob(gguf_path: Path, prompt_ids: list[list[int]], answers: list[list[int]] | None = None,
                    lora: Path | None = None) -> tuple[list[list[int]], float]:
    """(answers, mean log-prob per answer token) under one GGUF (with `lora` applied): greedy answers of up to 16
    tokens when `answers` is None, else those answers scored."""
    llm = _load_llama(gguf_path, lora=lora)
    try:
        if answers is None:
            answers = []
            for ids in prompt_ids:
                ans = []
                for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                    if t == llm.token_eos():
                        break
                    ans.append(t)
                    if len(ans) >= 16:
                        break
                answers.append(ans)
        lps = [lp for ids, ans in zip(prompt_ids, answers) if ans
               for lp in gguf_logprobs(llm, ids + ans, start=len(ids))]
    finally:
        llm.close()
    return answers, (sum(lps) / len(lps) if lps else float("nan"))


def _merged_match(base_gguf: Path, lora: Path, merged_gguf: Path, prompt_ids: list[list[int]]) -> CheckItem:
    """"answers like the merged model": the merged GGUF's greedy answers to the fixed prompts, scored (mean log-prob
    per token) by the merged GGUF, by the base with the LoRA and by the bare base. It passes when the LoRA's score
    is within a tenth of the tune's own effect (merged vs base) of the merged model's; inconclusive when the tune
    moves these answers by less than 0.02."""
    try:
        answers, lp_merged = _answer_logprob(merged_gguf, prompt_ids)
        if not any(answers):
            return CheckItem("merged_match", None, "inconclusive: the merged model answers nothing to the prompts")
        _a, lp_lora = _answer_logprob(base_gguf, prompt_ids, answers, lora=lora)
        _a, lp_base = _answer_logprob(base_gguf, prompt_ids, answers)
    except Exception as e:  # noqa: BLE001 - a file llama.cpp refuses is a result here
        return CheckItem("merged_match", False, f"could not compare: {str(e)[:200]}")
    detail = (f"mean log-prob per token of {merged_gguf.name}'s answers: merged {lp_merged:.4f}, base + LoRA "
              f"{lp_lora:.4f}, base alone {lp_base:.4f}")
    effect, gap = abs(lp_base - lp_merged), abs(lp_lora - lp_merged)
    if not math.isfinite(gap) or effect < 0.02:
        return CheckItem("merged_match", None, "inconclusive (the tune barely moves these answers); " + detail)
    return CheckItem("merged_match", bool(gap < 0.1 * effect), detail + ("" if gap < 0.1 * effect else
                     " - the LoRA on the base does not reproduce the merged model"))


def _survived(llm, hf_dir, base_dir, train_prompt, tok, g_tpl, specials) -> CheckItem:
    if hf_dir is None or base_dir is None or not train_prompt or tok is None:
        return CheckItem("finetune_survived", None, "skipped: needs the merged HF folder, the base and a training prompt")
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    msgs = [{"role": "user", "content": train_prompt}] if isinstance(train_prompt, str) else train_prompt
    try:
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else \
            msgs[-1]["content"]
        key = (str(hf_dir), (Path(hf_dir) / "config.json").stat().st_mtime, str(base_dir), prompt)
        if key not in _HF_ANSWERS:  # one HF pass per export: every GGUF (and the LoRA) is scored on the same answer
            tuned = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=weights_dtype(Path(hf_dir))).eval()
            answer, lp_tuned = _hf_answer_logprob(tuned, tok, prompt)
            del tuned
            lp_base = None
            if answer:
                base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=weights_dtype(Path(base_dir))).eval()
                _a, lp_base = _hf_answer_logprob(base, tok, prompt, answer)
                del base
            _HF_ANSWERS[key] = (answer, lp_tuned, lp_base)
        answer, lp_tuned, lp_base = _HF_ANSWERS[key]
        if not answer:
            return CheckItem("finetune_survived", None, "inconclusive: the tuned model answers nothing to the prompt")
        hf_p_ids = tok(prompt, add_special_tokens=False).input_ids
        if llm.n_vocab() == len(tok):  # the converter keeps token ids: score exactly the same token sequence
            p_ids, a_ids = list(hf_p_ids), list(answer)
        else:
            p_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            a_ids = llm.tokenize(tok.decode(answer).encode("utf-8"), add_bos=False, special=True)
        ids = (p_ids + a_ids)[-int(llm.n_ctx()):]
        lps = gguf_logprobs(llm, ids, start=len(ids) - len(a_ids))
        lp_gguf = sum(lps) / len(lps)
    except Exception as e:  # noqa: BLE001
        return CheckItem("finetune_survived", False, f"could not compare: {str(e)[:200]}")
    detail = (f"mean log-prob per token of the tuned model's answer: GGUF {lp_gguf:.3f}, tuned HF {lp_tuned:.3f}, "
              f"base {lp_base:.3f}")
    if abs(lp_tuned - lp_base) < 0.05:
        return CheckItem("finetune_survived", None, "inconclusive (the tuned and base models score the answer alike); "
                         + detail)
    survived = bool(abs(lp_gguf - lp_tuned) < abs(lp_gguf - lp_base))
    if not survived:
        detail += (" - this file scores the tuned answer closer to the base model: its quantization erased much of "
                   "the fine-tune; a finer type (Q8_0, Q6_K) keeps more of it, as does a stronger fine-tune")
    return CheckItem("finetune_survived", survived, detail)

