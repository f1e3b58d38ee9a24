"""Training data as the trainer sees it: dataset rows read from a version folder, rendered with the chat template and
tokenized into (input_ids, labels) with only the assistant replies as labels (or every token for plain text),
packed and collated into batches. `check_data` is the pre-flight count of what is usable. Preference rows (DPO /
ORPO) become (chosen, rejected) pairs of such examples, labelled on each answer alone (`encode_pairs`). The labels
come from the Data tab preview's own functions (data.assistant_spans, data.span_mask), for any chat template; a
template whose replies cannot be located refuses the whole dataset with the reason (`check_reply_format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..workspace import Workspace
from .config import TrainConfig, dataset_dir, validate

IGNORE = -100
PAIR_KEEP = ("role", "content", "loss_weight", "tool_calls", "name")


def _json_lines(path: Path):
    """(line number, value) of each non-empty line of a JSON-lines split; none for a missing file (an empty split);
    a line that is not JSON is BadInput naming it."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path.name} line {i} is not valid JSON ({e.msg}).") from None


def read_rows(path: Path) -> list[dict]:
    """Rows of a dataset split as the Data stage saves them: {"messages": [{"role", "content", "loss_weight"?,
    "tool_calls"?}, ...], "tools"?, "label"?} or, for plain text (continued pre-training), {"text": str}. A missing
    file is an empty split; a preference row (chosen / rejected) is BadInput: SFT does not train on those."""
    out = []
    for i, row in _json_lines(path):
        if isinstance(row, dict) and isinstance(row.get("text"), str) and "messages" not in row:
            out.append({"text": row["text"]})
            continue
        if isinstance(row, dict) and "chosen" in row and "rejected" in row:
            raise BadInput(f"{path.name} holds preference pairs (chosen / rejected), which supervised fine-tuning "
                           "does not train on: choose objective 'dpo' or 'orpo', or in the Data tab save its "
                           "chosen answers as SFT data.")
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise BadInput(f"{path.name} line {i} has neither a 'messages' list of {{role, content}} objects nor "
                           "a 'text'.")
        keep = ("role", "content", "loss_weight", "tool_calls", "name")
        item = {"messages": [{k: m[k] for k in keep if k in m} for m in msgs]}
        for k in ("tools", "label"):
            if k in row:
                item[k] = row[k]
        out.append(item)
    return out


_TOOL_PROBE = "mactuner_probe_tool"


class NoToolFormat(BadInput):
    """The dataset has tool calls and the chat template cannot write them: the whole dataset is refused."""


def check_tool_format(tok) -> None:
    """BadInput unless the tokenizer's chat template writes tool calls and tool definitions into the prompt."""
    from ..data import assistant_spans  # noqa: PLC0415

    cache = tok.__dict__.setdefault("_mactuner_tools_ok", {}) if hasattr(tok, "__dict__") else {}
    key = hash(getattr(tok, "chat_template", "") or "")
    if key not in cache:
        msgs = [{"role": "user", "content": "call it"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": _TOOL_PROBE, "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]
        tools = [{"type": "function", "function": {"name": _TOOL_PROBE, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            text, _ = assistant_spans(tok, msgs, tools=tools)
            cache[key] = _TOOL_PROBE in text and "42" in text
        except BadInput:
            cache[key] = False
    if not cache[key]:
        raise NoToolFormat("This dataset has tool calls (function_call / observation turns, or tools), but the model's "
                       "chat template has no tool format: the calls would be lost from what it learns. Train a model "
                       "whose chat template supports tools, or leave the tool rows out.")


_REPLY_PROBES = (
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
     {"role": "assistant", "content": "Six."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}],
)


def check_reply_format(tok) -> None:
    """ReplyNotFound (the whole dataset is refused, with the reason) when the tokenizer's chat template does not
    write assistant replies where they can be located, tried on a plain two-turn conversation with and without a
    system prompt (a few milliseconds: once per split). A template that refuses both probes itself
    (raise_exception) is left to the rows to report."""
    from ..data import assistant_spans  # noqa: PLC0415
    from ..templates import ReplyNotFound  # noqa: PLC0415

    refusal = None
    for msgs in _REPLY_PROBES:
        try:
            assistant_spans(tok, msgs)
            return
        except ReplyNotFound as e:
            refusal = refusal or e
        except BadInput:
            continue
    if refusal is not None:
        raise refusal


def ensure_chat_template(tok) -> str | None:
    """Give a tokenizer without a chat template the Data stage's fallback (ChatML markup), so that training masks
    exactly what the Data tab's preview shows; it is saved with the adapter. Returns a note, or None."""
    if getattr(tok, "chat_template", None):
        return None
    from ..templates import FALLBACK_CHAT_TEMPLATE  # noqa: PLC0415

    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return "The tokenizer had no chat template: using ChatML turns (<|im_start|>role ... <|im_end|>), saved with the adapter."


def encode_conversation(tok, messages: list[dict], responses_only: bool = True,
                        tools: list | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation rendered with the tokenizer's chat template. With `responses_only`,
    labels are IGNORE except on the tokens of each assistant reply including its end-of-turn markup - but not of a
    reply whose `loss_weight` is 0; otherwise every token is a label. The reply spans come from
    `data.assistant_spans` and are mapped to tokens by `data.span_mask` through the offsets - the same two functions
    as the Data tab's preview, for any chat template. Tool calls need a template with a tool format (BadInput); a
    reply the template does not write where it can be found is ReplyNotFound (a BadInput) saying why."""
    from ..data import assistant_spans, render_chat, span_mask, trained_spans  # noqa: PLC0415

    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        check_tool_format(tok)
    if not responses_only:  # every token is learned: no reply needs locating
        ids = list(tok(render_chat(tok, messages, tools=tools), add_special_tokens=False)["input_ids"])
        return ids, list(ids)
    full, spans = assistant_spans(tok, messages, tools=tools)
    spans = trained_spans(messages, spans)
    if getattr(tok, "is_fast", False):
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    else:  # slow tokenizer: token boundaries from encoding the prefixes at the span edges
        ids, offsets = list(tok(full, add_special_tokens=False)["input_ids"]), None
    if offsets is not None:
        return ids, [t if m else IGNORE for t, m in zip(ids, span_mask(offsets, spans))]
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        t0 = len(tok(full[:s], add_special_tokens=False)["input_ids"])
        t1 = len(tok(full[:e], add_special_tokens=False)["input_ids"])
        for j in range(t0, min(t1, len(ids))):
            labels[j] = ids[j]
    return ids, labels


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """A plain-text row (continued pre-training): every token is a label, with BOS/EOS around it when the tokenizer
    has them, so the model also learns where a document ends."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    if tok.eos_token_id is not None and ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    return ids, list(ids)


@dataclass
class EncodedSplit:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels), already cut to max_length
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # no label left after masking and truncation
    no_response: int = 0  # no assistant message at all (responses_only)
    unrenderable: int = 0  # the chat template failed on the row, or a reply could not be located in it
    undesirable: int = 0  # KTO rows labelled false: never trained as targets
    windows: int = 0  # extra examples made by cutting long plain-text rows into max_length pieces
    shortest_prompt: int = 0  # tokens before the first label, over rows that lost all labels to truncation
    first_error: str = ""

    @property
    def items(self) -> list:
        """What the trainer batches: the examples (preference.py's split: the pairs)."""
        return self.examples

    def note(self, split: str, max_length: int) -> str:
        parts = [f"{split}: {len(self.examples) - self.windows} of {self.rows} rows usable"]
        if self.windows:
            parts.append(f"long texts cut into {self.windows} more pieces of {max_length} tokens")
        if self.truncated:
            parts.append(f"{self.truncated} cut to {max_length} tokens")
        if self.undesirable:
            parts.append(f"{self.undesirable} labelled undesirable (label false) left out: never trained as targets")
        if self.dropped - self.undesirable:
            parts.append(f"{self.dropped - self.undesirable} dropped (no trainable token within max_length"
                         + (f"; {self.unrenderable} not renderable: {self.first_error}" if self.unrenderable else "")
                         + ")")
        return ", ".join(parts)


def encode_split(tok, rows: list[dict], max_length: int, responses_only: bool) -> EncodedSplit:
    out = EncodedSplit([], rows=len(rows))
    if responses_only and any("messages" in row for row in rows):
        check_reply_format(tok)
    prompt_lengths = []
    for row in rows:
        if "text" in row:
            ids, labels = encode_text(tok, row["text"]) if row["text"].strip() else ([], [])
            if len(ids) > max_length:  # continued pre-training: every piece of a long text is learned
                pieces = [ids[k:k + max_length] for k in range(0, len(ids), max_length)]
                pieces = [p for p in pieces if len(p) > 1]
                out.examples.extend((p, list(p)) for p in pieces)
                out.windows += len(pieces) - 1
                continue
        else:
            msgs = row["messages"]
            if row.get("label") is False:  # KTO data: an undesirable answer is never a target
                out.undesirable += 1
                out.dropped += 1
                continue
            if not msgs or (responses_only and not any(m["role"] == "assistant" for m in msgs)):
                out.no_response += 1
                out.dropped += 1
                continue
            try:
                ids, labels = encode_conversation(tok, msgs, responses_only, row.get("tools"))
            except NoToolFormat:
                raise
            except BadInput as e:  # one odd row must not sink the dataset: count it and go on
                out.unrenderable += 1
                out.dropped += 1
                out.first_error = out.first_error or e.message
                continue
        if len(ids) > max_length:
            out.truncated += 1
            first = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(labels))
            ids, labels = ids[:max_length], labels[:max_length]
            if first >= max_length:
                prompt_lengths.append(first)
        # position 0 is never predicted (nothing precedes it): a label there does not count
        if not any(lab != IGNORE for lab in labels[1:]):
            out.dropped += 1
            continue
        out.examples.append((ids, labels))
    out.shortest_prompt = min(prompt_lengths) if prompt_lengths else 0
    return out


def explain_unusable(enc: EncodedSplit, max_length: int, responses_only: bool) -> str:
    if enc.rows == 0:
        return "The training split has no rows."
    if enc.shortest_prompt:
        return (f"No training row has a reply within max_length={max_length} tokens: every prompt is longer (the "
                f"shortest is {enc.shortest_prompt} tokens). Raise max length above {enc.shortest_prompt + 16} or "
                "shorten the prompts.")
    if enc.unrenderable == enc.rows:
        return f"0 usable rows: the chat template could not render them ({enc.first_error})"
    if responses_only and enc.no_response == enc.rows:
        return ("0 usable rows: no conversation has an assistant message to learn from. Map a response column in "
                "the Data tab, or turn off 'train on responses only'.")
    return (f"0 usable rows out of {enc.rows}: after masking to the assistant replies and cutting to {max_length} "
            "tokens, no row has a token to learn from (empty replies?).")


def encode_dataset(cfg: TrainConfig, ws: Workspace, tok) -> tuple[EncodedSplit, EncodedSplit]:
    """Train and validation splits of a validated config, tokenized as the trainer uses them. Raises BadInput when
    no training row is usable (no reply to learn from, or every prompt longer than max_length). DPO / ORPO: the
    (chosen, rejected) pairs of preference.py."""
    if cfg.objective != "sft":
        return encode_preference_dataset(cfg, ws, tok)
    ddir = dataset_dir(ws, cfg.dataset, cfg.dataset_version)
    train_enc = encode_split(tok, read_rows(ddir / "train.jsonl"), cfg.max_length, cfg.train_on_responses_only)
    if not train_enc.examples:
        raise BadInput(explain_unusable(train_enc, cfg.max_length, cfg.train_on_responses_only))
    val_rows = read_rows(ddir / "validation.jsonl")
    if cfg.max_eval_rows:
        val_rows = val_rows[: cfg.max_eval_rows]
    return train_enc, encode_split(tok, val_rows, cfg.max_length, cfg.train_on_responses_only)


def check_data(cfg: TrainConfig, ws: Workspace) -> dict:
    """Pre-flight for the UI/CLI: validate, tokenize the dataset with the base model's tokenizer and chat template as
    the trainer will, and return counts ({"train_rows", "usable", "truncated", "dropped", "validation_rows",
    "label_tokens", "note"}). Raises BadInput for unusable settings or data, without starting anything."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    cfg = validate(cfg, ws)
    tok = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    ensure_chat_template(tok)
    tr, va = encode_dataset(cfg, ws, tok)
    return {"train_rows": tr.rows, "usable": len(tr.items), "truncated": tr.truncated, "dropped": tr.dropped,
            "validation_rows": len(va.items),
            "label_tokens": sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in tr.examples),
            "note": tr.note("train", cfg.max_length)}


# ------------------------------------------------------------------ preference pairs (DPO / ORPO, preference.py)


def _msgs_ok(msgs) -> bool:
    return isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)


def read_pairs(path: Path) -> list[dict]:
    """Rows of a preference split as the Data stage saves them ({"prompt", "chosen", "rejected"}: lists of messages,
    "tools"?). A missing file is an empty split; a row of another kind is BadInput naming the line."""
    out = []
    for i, row in _json_lines(path):
        if not (isinstance(row, dict) and all(_msgs_ok(row.get(k)) for k in ("prompt", "chosen", "rejected"))):
            raise BadInput(f"{path.name} line {i} is not a preference pair: DPO and ORPO need a 'prompt', a "
                           "'chosen' and a 'rejected' answer (lists of {role, content} messages) on every row.")
        item = {k: [{x: m[x] for x in PAIR_KEEP if x in m} for m in row[k]] for k in ("prompt", "chosen", "rejected")}
        if row.get("tools"):
            item["tools"] = row["tools"]
        out.append(item)
    return out


@dataclass
class PreferenceSplit(EncodedSplit):
    """EncodedSplit for pairs: `pairs` holds ((chosen ids, labels), (rejected ids, labels)); `examples` holds every
    sequence of them (for token counts)."""

    pairs: list = field(default_factory=list)

    @property
    def items(self) -> list:
        return self.pairs

    def note(self, split: str, max_length: int) -> str:
        parts = [f"{split}: {len(self.pairs)} of {self.rows} preference pairs usable"]
        if self.truncated:
            parts.append(f"{self.truncated} cut to {max_length} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (no answer token within max_length"
                         + (f"; {self.unrenderable} not renderable: {self.first_error}" if self.unrenderable else "")
                         + ")")
        return ", ".join(parts)


def encode_answer(tok, prompt: list[dict], answer: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of prompt + answer: labels on the answer's assistant turns only."""
    msgs = [dict(m, loss_weight=0) if m["role"] == "assistant" else m for m in prompt] + answer
    return encode_conversation(tok, msgs, True, tools)


def encode_pairs(tok, rows: list[dict], max_length: int) -> PreferenceSplit:
    """Both sequences of each pair, cut to max_length; a pair either of whose answers keeps no labelled token is
    dropped (counted), a row the chat template cannot render is counted and skipped."""
    out = PreferenceSplit([], rows=len(rows))
    if rows:
        check_reply_format(tok)
    prompt_lengths = []
    for row in rows:
        try:
            both = [encode_answer(tok, row["prompt"], row[k], row.get("tools")) for k in ("chosen", "rejected")]
        except NoToolFormat:
            raise
        except BadInput as e:
            out.unrenderable += 1
            out.dropped += 1
            out.first_error = out.first_error or e.message
            continue
        cut = []
        for ids, labels in both:
            if len(ids) > max_length:
                first = next((j for j, lab in enumerate(labels) if lab != IGNORE), len(labels))
                if first >= max_length:
                    prompt_lengths.append(first)
                ids, labels = ids[:max_length], labels[:max_length]
            cut.append((ids, labels))
        out.truncated += any(len(a[0]) < len(b[0]) for a, b in zip(cut, both))
        if not all(any(lab != IGNORE for lab in labels[1:]) for _ids, labels in cut):
            out.dropped += 1
            continue
        out.pairs.append((cut[0], cut[1]))
        out.examples.extend(cut)
    out.shortest_prompt = min(prompt_lengths) if prompt_lengths else 0
    return out


def encode_preference_dataset(cfg: TrainConfig, ws, tok) -> tuple[PreferenceSplit, PreferenceSplit]:
    """Train and validation pairs of a validated config; BadInput when no training pair is usable."""
    ddir = dataset_dir(ws, cfg.dataset, cfg.dataset_version)
    train = encode_pairs(tok, read_pairs(ddir / "train.jsonl"), cfg.max_length)
    if not train.pairs:
        raise BadInput(explain_unusable(train, cfg.max_length, True).replace("rows", "pairs"))
    val_rows = read_pairs(ddir / "validation.jsonl")
    if cfg.max_eval_rows:
        val_rows = val_rows[: cfg.max_eval_rows]
    return train, encode_pairs(tok, val_rows, cfg.max_length)


def collate_pairs(pairs, pad_id: int) -> dict:
    """One right-padded batch of 2n sequences: the n chosen, then the n rejected (one forward pass for both)."""
    return collate([c for c, _r in pairs] + [r for _c, r in pairs], pad_id, False)


def pack_examples(examples, max_length: int):
    """Greedy packing in order: whole conversations are appended to a bin until the next would overflow.
    Returns (input_ids, labels, position_ids) per packed sequence; positions restart at 0 for each conversation,
    which makes transformers mask attention per conversation."""
    packed, cur_ids, cur_lab, cur_pos = [], [], [], []
    for ids, labels in examples:
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            packed.append((cur_ids, cur_lab, cur_pos))
            cur_ids, cur_lab, cur_pos = [], [], []
        cur_ids = cur_ids + ids
        cur_lab = cur_lab + [IGNORE] + labels[1:]  # never predict a conversation's first token from the previous one
        cur_pos = cur_pos + list(range(len(ids)))
    if cur_ids:
        packed.append((cur_ids, cur_lab, cur_pos))
    return packed


def collate(items, pad_id: int, packed: bool):
    """Right-pad a list of examples into tensors. Returns a dict with input_ids, labels and (packed) position_ids.
    No attention mask: with right padding the causal mask already keeps real tokens from attending to pads."""
    import torch  # noqa: PLC0415

    n = max(len(it[0]) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(items), n), dtype=torch.long) if packed else None
    for i, it in enumerate(items):
        k = len(it[0])
        ids[i, :k] = torch.tensor(it[0])
        labels[i, :k] = torch.tensor(it[1])
        if packed:
            pos[i, :k] = torch.tensor(it[2])
            pos[i, k:] = torch.arange(n - k)  # the padding forms its own "conversation"
    out = {"input_ids": ids, "labels": labels}
    if packed:
        out["position_ids"] = pos
    return out


def cut(item, n: int):
    """An example (input_ids, labels[, position_ids]) cut to its first `n` tokens."""
    return tuple(list(x[:n]) for x in item)
