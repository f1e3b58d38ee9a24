"""Dataset files in the shapes other fine-tuning tools publish, written by the tests (made up here, not copied):
ShareGPT preference pairs, ShareGPT tool calls, OpenAI messages with content parts and loss weights, KTO labels,
Alpaca and messages preference pairs, an image dataset, identity data with {{placeholders}}, plain text, Excel and a
Korean CSV in cp949. Each writer returns the file's path; `EXPECTED` says what the studio must make of each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def sharegpt_preference(d: Path, n: int = 300) -> Path:
    """ShareGPT conversations with chosen / rejected ShareGPT messages; every third row has two earlier turns."""
    rows = []
    for i in range(n):
        conv = [{"from": "human", "value": f"Question {i}: what is {i} plus {i}?"}]
        if i % 3 == 0:
            conv = [{"from": "system", "value": "Answer with a number."},
                    {"from": "human", "value": "Warm-up: what is 1 plus 1?"}, {"from": "gpt", "value": "2"}] + conv
        rows.append({"conversations": conv, "chosen": {"from": "gpt", "value": f"{2 * i}."},
                     "rejected": {"from": "gpt", "value": f"Maybe {2 * i + 1}?"}})
    return _json(d / "sharegpt_dpo.json", rows)


TOOLS = [{"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def sharegpt_tools(d: Path, n: int = 6) -> Path:
    """ShareGPT with function_call / observation turns and a `tools` column holding JSON text."""
    rows = []
    for i in range(n):
        city = ["Oslo", "Lima", "Pune", "Kyiv", "Baku", "Rome"][i % 6]
        rows.append({"conversations": [
            {"from": "human", "value": f"What's the weather in {city}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
            {"from": "observation", "value": json.dumps({"temp_c": 10 + i, "sky": "clear"})},
            {"from": "gpt", "value": f"It is {10 + i} °C and clear in {city}."}],
            "tools": json.dumps(TOOLS)})
    rows.append({"conversations": [{"from": "human", "value": "Call it"},
                                   {"from": "function_call", "value": "not json"},
                                   {"from": "gpt", "value": "Done."}], "tools": json.dumps(TOOLS)})
    return _json(d / "glaive_like_tools.json", rows)


def content_parts(d: Path) -> Path:
    """OpenAI messages whose content is a list of parts ({"type": "text", "value"|"text": ...}), with loss_weight."""
    rows = []
    for i in range(8):
        rows.append({"messages": [
            {"role": "system", "content": [{"type": "text", "value": "You are terse."}]},
            {"role": "user", "content": [{"type": "text", "value": f"Name a colour ({i})."}]},
            {"role": "assistant", "content": [{"type": "text", "value": "A bad first try."}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "text": "Again, properly."}]},
            {"role": "assistant", "content": [{"type": "text", "value": ["Red", "Blue"][i % 2]},
                                              {"type": "text", "text": "."}], "loss_weight": 1.0}]})
    return _jsonl(d / "parts_loss_weight.jsonl", rows)


def kto(d: Path, n: int = 10) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": ("Yes." if i % 2 == 0 else "No.") if i % 3 else "Banana."}],
             "label": bool(i % 3)} for i in range(n)]
    return _jsonl(d / "kto_labels.jsonl", rows)


def alpaca_preference(d: Path) -> Path:
    rows = [{"instruction": f"Spell {w} backwards.", "input": "", "chosen": w[::-1], "rejected": w}
            for w in ("stressed", "drawer", "lived", "reward", "diaper")]
    rows.append({"instruction": "Same answers", "input": "", "chosen": "x", "rejected": "x"})
    return _jsonl(d / "alpaca_dpo.jsonl", rows)


def messages_preference(d: Path) -> Path:
    """Full chosen / rejected conversations (as in binarized preference sets): the prompt is their common start."""
    rows = []
    for i in range(5):
        q = {"role": "user", "content": f"Say {i} in French."}
        rows.append({"chosen": [q, {"role": "assistant", "content": ["zéro", "un", "deux", "trois", "quatre"][i]}],
                     "rejected": [q, {"role": "assistant", "content": "I don't know."}]})
    return _jsonl(d / "messages_dpo.jsonl", rows)


def images(d: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                          {"role": "assistant", "content": "A cat on a mat."}], "images": [f"img/{i}.jpg"]}
            for i in range(4)]
    return _json(d / "mllm_like.json", rows)


def image_parts(d: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/1.png"}},
                                                       {"type": "text", "text": "Describe it."}]},
                          {"role": "assistant", "content": "A dog."}]}]
    return _jsonl(d / "openai_vision.jsonl", rows)


def identity(d: Path) -> Path:
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an assistant made by {{author}}."},
            {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
            {"instruction": "Say hello", "input": "", "output": "Hello!"}]
    return _json(d / "identity.json", rows)


def plain_text(d: Path) -> Path:
    (d / "notes.txt").write_text("The lighthouse keeper lit the lamp at dusk.\nShips passed safely.\n\n"
                                 "Bread rises when yeast eats sugar.\n\n\nGlaciers carve valleys over centuries.\n",
                                 encoding="utf-8")
    return d / "notes.txt"


def excel(d: Path) -> Path:
    path = d / "qa.xlsx"
    pd.DataFrame({"question": ["What is 2+2?", "Capital of Peru?", "Boiling point of water?"],
                  "answer": [4, "Lima", "100 °C"]}).to_excel(path, index=False, engine="openpyxl")
    return path


KOREAN = [("안녕하세요?", "반갑습니다. 오늘 날씨가 좋네요."), ("이름이 뭐예요?", "저는 맥튜너입니다."),
          ("한국의 수도는?", "서울입니다.")]


def korean_cp949(d: Path) -> Path:
    path = d / "korean.csv"
    path.write_bytes(("question,answer\n" + "".join(f"{q},{a}\n" for q, a in KOREAN)).encode("cp949"))
    return path


def reasoning_tools(d: Path) -> Path:
    """LLaMA-Factory v1 messages: content parts of type reasoning and tool_call, tool results, a tools column."""
    rows = []
    for i in range(4):
        rows.append({"tools": json.dumps([{"type": "function", "function": TOOLS[0]}]), "messages": [
            {"role": "user", "content": [{"type": "text", "value": f"Weather in city {i}?"}]},
            {"role": "assistant", "content": [{"type": "reasoning", "value": "I should call the weather tool."},
                                              {"type": "tool_call", "value": json.dumps(
                                                  {"name": "get_weather", "arguments": {"city": f"c{i}"}})}]},
            {"role": "tool", "content": [{"type": "text", "value": '{"temp": 20}'}]},
            {"role": "assistant", "content": [{"type": "reasoning", "value": "20 degrees."},
                                              {"type": "text", "value": "It is 20 degrees."}]}]})
    rows.append({"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi"}]},
                              {"role": "assistant", "content": [{"type": "hologram", "value": "?"}]}]})
    return _jsonl(d / "reason_tool_use.jsonl", rows)


def v1_preference(d: Path) -> Path:
    """LLaMA-Factory v1 DPO: full conversations in chosen_messages / rejected_messages, content parts, loss_weight."""
    def conv(q, a):
        return [{"role": "user", "content": [{"type": "text", "value": q}], "loss_weight": 0.0},
                {"role": "assistant", "content": [{"type": "text", "value": a}], "loss_weight": 1.0}]
    rows = [{"chosen_messages": conv(f"Translate {w}", w.upper()), "rejected_messages": conv(f"Translate {w}", "?")}
            for w in ("casa", "perro", "gato")]
    return _jsonl(d / "v1_dpo.jsonl", rows)


EXPECTED = {  # writer -> (format, kind, usable rows, rows left out) ; None for a refused file
    sharegpt_preference: ("sharegpt", "preference", 300, 0),
    sharegpt_tools: ("sharegpt", "sft", 6, 1),
    content_parts: ("messages", "sft", 8, 0),
    kto: ("messages", "kto", 10, 0),
    alpaca_preference: ("alpaca", "preference", 5, 1),
    messages_preference: ("messages", "preference", 5, 0),
    identity: ("alpaca", "sft", 3, 0),
    plain_text: ("text", "text", 3, 0),
    excel: ("qa", "sft", 3, 0),
    korean_cp949: ("qa", "sft", 3, 0),
    reasoning_tools: ("messages", "sft", 4, 1),
    v1_preference: ("messages", "preference", 3, 0),
    images: None,
    image_parts: None,
}
