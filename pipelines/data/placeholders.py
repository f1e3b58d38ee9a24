"""Template placeholders in a dataset ({{name}}, {{author}}: identity datasets): counted per name in the converted
rows, filled in from "name=value" pairs before saving (or trained literally, with the Data tab's warning)."""

from __future__ import annotations

import json
import re

from ..errors import BadInput

PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _texts(row: dict) -> list[str]:
    if "text" in row:
        return [row["text"]]
    return [x["content"] for k in ("messages", "prompt", "chosen", "rejected") for x in row.get(k, [])]


def count_placeholders(conv) -> None:
    """conv.placeholders[name] = the number of rows that hold {{name}}."""
    for row in conv.rows:
        for name in {n for t in _texts(row) for n in PLACEHOLDER_RE.findall(t)}:
            conv.placeholders[name] = conv.placeholders.get(name, 0) + 1


def fill_placeholders(rows: list[dict], values: dict[str, str]) -> list[dict]:
    """The rows with {{name}} replaced by values[name] (names not given stay as written)."""
    if not values:
        return rows

    def sub(text: str) -> str:
        return PLACEHOLDER_RE.sub(lambda mt: values.get(mt.group(1), mt.group(0)), text)

    out = []
    for row in rows:
        row = json.loads(json.dumps(row))
        if "text" in row:
            row["text"] = sub(row["text"])
        for k in ("messages", "prompt", "chosen", "rejected"):
            for x in row.get(k, []):
                x["content"] = sub(x["content"])
        out.append(row)
    return out


def parse_placeholder_values(text: str) -> dict[str, str]:
    """'name=MacTuner, author=Ann' -> {"name": "MacTuner", "author": "Ann"}; BadInput for a malformed pair."""
    out = {}
    for part in [p for p in re.split(r"[,\n]", text or "") if p.strip()]:
        key, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise BadInput(f"'{part.strip()}' is not name=value (for example: name=MacTuner, author=Ann).")
        out[key.strip()] = value.strip()
    return out
