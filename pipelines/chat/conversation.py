"""Conversations as JSON files: what the Chat tab exports and imports.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone

from ..errors import BadInput
from .params import ROLES, ChatParams
from .prompt import normalize_messages

MAX_IMPORT_BYTES = 10 * 1024 * 1024


CONVERSATION_FORMAT = "mactuner.chat"


def export_conversation(messages: list[dict], model: str | None = None, params: ChatParams | None = None) -> str:
    """The conversation as JSON text: {"format", "version", "exported_at", "model", "params", "messages"}."""
    msgs = normalize_messages(messages)
    doc = {"format": CONVERSATION_FORMAT, "version": 1,
           "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model": model, "params": asdict(params) if params is not None else None, "messages": msgs}
    return json.dumps(doc, ensure_ascii=False, indent=2)


def import_conversation(data: str | bytes) -> list[dict]:
    """Messages from exported JSON (or a bare list of {role, content}). Strict: every message needs a role in
    system/user/assistant and string content; BadInput says which one is wrong."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_IMPORT_BYTES:
            raise BadInput(f"The file is larger than {MAX_IMPORT_BYTES // 2**20} MB; not a conversation export.")
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadInput("The file is not UTF-8 text; a conversation export is JSON.") from None
    if not isinstance(data, str):
        raise BadInput("Give the conversation as JSON text.")
    if len(data) > MAX_IMPORT_BYTES:
        raise BadInput(f"The text is larger than {MAX_IMPORT_BYTES // 2**20} MB; not a conversation export.")
    if not data.strip():
        raise BadInput("The file is empty.")
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        raise BadInput(f"Not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except RecursionError:
        raise BadInput("This JSON is nested too deeply to read (hundreds of levels); a conversation export is a "
                       "flat list of messages.") from None
    if isinstance(doc, dict):
        if "messages" not in doc:
            raise BadInput("This JSON has no 'messages' list; it is not a conversation export.")
        if doc.get("format") not in (None, CONVERSATION_FORMAT):
            raise BadInput(f"This JSON is a {doc.get('format')!r} file, not a MacTuner conversation.")
        doc = doc["messages"]
    if not isinstance(doc, list):
        raise BadInput("A conversation is a list of messages, each {\"role\": ..., \"content\": ...}.")
    out = []
    for i, m in enumerate(doc, 1):
        if not isinstance(m, dict):
            raise BadInput(f"Message {i} must be an object with 'role' and 'content'.")
        if m.get("role") not in ROLES:
            raise BadInput(f"Message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}.")
        if not isinstance(m.get("content"), str):
            raise BadInput(f"Message {i}: content must be a string.")
        out.append({"role": m["role"], "content": m["content"]})
    if any(m["role"] == "system" for m in out[1:]):
        raise BadInput("A system message may only come first in the conversation.")
    return out
