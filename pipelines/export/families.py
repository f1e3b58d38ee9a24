"""A model's Jinja chat template -> the Go template of its Ollama Modelfile, for the turn formats people train:
ChatML (plain, with a default system prompt like Qwen2.5 and SmolLM2, Hermes-style tools like Qwen2.5/Qwen3,
Qwen3's thinking switch), SmolLM3, Llama 3.x (with its dated system header and tools), Mistral (v0.3 `[INST] ` and
tekken `[INST]`, with tools), Phi-3/3.5, Phi-4, Gemma 2/3 and the plain fallback.

    t = translate(chat_template, bos_token="<s>", eos_token="</s>")
    t.template, t.stops          # the Go template and PARAMETER stop lines; t.template is None when ...
    t.reason                     # ... the template is none of these, and this says why

The family is found from what the template renders for a few probe conversations, never from the model's name, and
the texts a template adds of its own (a default system prompt, the tool instructions, the knowledge-date header,
the thinking markup) are taken from those renderings too, so the Go template writes what this template writes.
Each translation is proven by rendering it with Go (gotemplate.compare_with_jinja) at export time and in the tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import MacTunerError
from . import gojson
from .gojson import literal as L
from .gotemplate import WEATHER_TOOL, case, render_jinja, uses_tools

SYS, Q1, A1, Q2 = "SYSTEM1", "QUERY1", "ANSWER1", "QUERY2"
ONE = [{"role": "user", "content": Q1}]
WITH_SYS = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1}]
MULTI = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
SYS_MULTI = [{"role": "system", "content": SYS}, *MULTI]

# the first message's system text, as the Jinja templates read messages[0] (Ollama's .System joins them all)
SYS_SCAN = ('{{ $sys := "" }}{{ $hasSys := false }}{{ range $i, $_ := .Messages }}{{ if and (eq $i 0) '
            '(eq .Role "system") }}{{ $hasSys = true }}{{ $sys = .Content }}{{ end }}{{ end }}')
LOOP = '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
NEXT_ROLE = '{{ $next := "" }}{{ if not $last }}{{ $next = (index (slice $.Messages $i) 1).Role }}{{ end }}'
FIRST_SYS = '{{ if and (eq $i 0) (eq .Role "system") }}'  # a branch that writes nothing: the header did
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass
class Translation:
    family: str | None = field(default=None)  # chatml | smollm3 | llama3 | mistral | phi3 | phi4 | gemma | plain
    label: str = ""  # what it is, in words: "ChatML with a default system prompt, tools, thinking on/off"
    template: str | None = None  # the Go template; None when the chat template is none of the families
    stops: list[str] = field(default_factory=list)
    reason: str = ""  # why there is no template


class _Jinja:
    """The chat template rendered on a probe (generation prompt on); None when it refuses the conversation."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        self.template, self.bos, self.eos = template, bos_token, eos_token

    def __call__(self, messages: list[dict], tools: list | None = None, think: bool | None = None) -> str | None:
        try:
            return render_jinja(self.template, case(messages, tools, think), self.bos, self.eos)
        except MacTunerError:
            return None


def _dated(text: str) -> str:
    """Go template text for a header that may hold today's date (Llama 3.2's strftime_now("%d %b %Y")): the date
    becomes Ollama's currentDate (2006-01-02) cut and reassembled, so the Modelfile writes the day it runs."""
    today = datetime.now()
    month = "".join(f'{{{{ {"if" if n == 0 else "else if"} eq $month "{n + 1:02d}" }}}}{name}'
                    for n, name in enumerate(MONTHS)) + "{{ end }}"
    out = L(text)
    for fmt, go in (("%d %b %Y", "{{ slice $today 8 10 }} " + month + " {{ slice $today 0 4 }}"),
                    ("%Y-%m-%d", "{{ $today }}")):
        out = out.replace(today.strftime(fmt), go)
    if out != L(text):
        out = '{{ $today := currentDate }}{{ $month := slice $today 5 7 }}' + out
    return out


def _gen(default: str, off: str, on: str) -> str:
    """The text after the generation prompt, by Ollama's `think` (unset / false / true)."""
    if default == off == on:
        return L(default)
    return ("{{ if $.IsThinkSet }}{{ if $.Think }}" + L(on) + "{{ else }}" + L(off) + "{{ end }}{{ else }}"
            + L(default) + "{{ end }}")


# ------------------------------------------------------------------------------------------------ ChatML


def _chatml_tools(j: _Jinja, gen: str) -> tuple[str, str, str] | None:
    """(text after the system prompt, text without one, text after the tool list) of a system turn that lists the
    tools one JSON line each (Qwen2.5 / Qwen3, Hermes style)."""
    line, tail = "\n" + json.dumps(WEATHER_TOOL), f"<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{gen}"
    parts = []
    for msgs in (WITH_SYS, ONE):
        out = j(msgs, [WEATHER_TOOL])
        if not out or not out.startswith("<|im_start|>system\n") or line not in out or not out.endswith(tail):
            return None
        before, after = out[len("<|im_start|>system\n"): -len(tail)].split(line, 1)
        parts.append((before, after))
    (with_sys, post), (without, post2) = parts
    if not with_sys.startswith(SYS) or post != post2:
        return None
    return with_sys[len(SYS):], without, post


def _chatml(j: _Jinja) -> Translation | None:
    turns = (f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n<|im_start|>user\n{Q2}"
             "<|im_end|>\n<|im_start|>assistant\n")
    m = re.fullmatch(r"(?:<\|im_start\|>system\n(?P<d>.*?)<\|im_end\|>\n)?" + re.escape(turns) + "(?P<gen>.*)",
                     j(MULTI) or "", re.S)
    if not m:
        return None
    default, gen = m["d"], m["gen"]
    if j(WITH_SYS) != f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{gen}":
        return None
    head = (f"<|im_start|>system\n{default}<|im_end|>\n" if default is not None else "") + \
        f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    off, on = j(ONE, think=False) or "", j(ONE, think=True) or ""
    if not (off.startswith(head) and on.startswith(head)):
        return None
    off, on = off[len(head):], on[len(head):]
    thinking = not off == on == gen
    tools = _chatml_tools(j, gen) if uses_tools(j.template) else None
    if uses_tools(j.template) and tools is None:
        return None
    header = ('{{ if $hasSys }}<|im_start|>system\n{{ $sys }}<|im_end|>\n{{ end }}' +
              ('' if default is None else '{{ if not $hasSys }}<|im_start|>system\n' + L(default) + '<|im_end|>\n{{ end }}'))
    if tools:
        with_sys, without, post = tools
        header = ('{{ if .Tools }}<|im_start|>system\n{{ if $hasSys }}{{ $sys }}' + L(with_sys) + '{{ else }}'
                  + L(without) + '{{ end }}{{ range .Tools }}\n' + gojson.tool() + '{{ end }}' + L(post)
                  + '<|im_end|>\n{{ else }}' + header + '{{ end }}')
    think = ('{{ if and (gt $i $lastQuery) (or $last .Thinking) }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}'
             if thinking else '')
    calls = ('{{ range $j, $c := .ToolCalls }}{{ if or $j $m.Content }}\n{{ end }}<tool_call>\n{"name": "'
             '{{ .Function.Name }}", "arguments": ' + gojson.arguments() + '}\n</tool_call>{{ end }}') if tools else ''
    results = ('{{ else if eq .Role "tool" }}' + NEXT_ROLE + '{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
               '\n<tool_response>\n{{ .Content }}\n</tool_response>{{ if ne $next "tool" }}<|im_end|>\n{{ end }}'
               ) if tools else ''
    template = (SYS_SCAN + '{{ $lastQuery := -1 }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}'
                '{{ $lastQuery = $i }}{{ end }}{{ end }}{{ $prev := "" }}' + header + LOOP + FIRST_SYS
                + '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n' + think + '{{ .Content }}' + calls
                + '{{ if not $last }}<|im_end|>\n{{ end }}' + results
                + '{{ else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n' + _gen(gen, off, on)
                + '{{ end }}{{ $prev = .Role }}{{ end }}')
    features = [f for f, on_ in (("a default system prompt", default is not None), ("tools", tools),
                                 ("thinking on/off", thinking)) if on_]
    return Translation("chatml", "ChatML" + (" with " + ", ".join(features) if features else ""), template,
                       ["<|im_end|>", "<|im_start|>"])


def _smollm3(j: _Jinja) -> Translation | None:
    """ChatML whose system turn is always written, the system prompt (or a default per reasoning mode) inside a
    header, and an empty think block in the replies when thinking is off (SmolLM3)."""
    modes = {}
    for think in (None, False, True):
        multi, with_sys = j(MULTI, think=think), j(WITH_SYS, think=think)
        m = re.fullmatch(r"<\|im_start\|>system\n(?P<head>.*?)<\|im_end\|>\n" + re.escape(f"<|im_start|>user\n{Q1}"
                         "<|im_end|>\n<|im_start|>assistant\n") + r"(?P<pfx>.*?)" + re.escape(
                         f"{A1}<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n") + "(?P<gen>.*)",
                         multi or "", re.S)
        s = re.fullmatch(r"<\|im_start\|>system\n(?P<head>.*?)<\|im_end\|>\n" + re.escape(
            f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n") + "(?P<gen>.*)", with_sys or "", re.S)
        if not (m and s) or s["head"].count(SYS) != 1 or s["gen"] != m["gen"]:
            return None
        before, after = s["head"].split(SYS)
        if not (m["head"].startswith(before) and m["head"].endswith(after)):
            return None
        modes[think] = (before, m["head"][len(before): len(m["head"]) - len(after)], after, m["pfx"], m["gen"])
    if modes[None] != modes[True] or modes[None] == modes[False]:
        return None

    def pick(n: int, fmt=L) -> str:
        return "{{ if $off }}" + fmt(modes[False][n]) + "{{ else }}" + fmt(modes[True][n]) + "{{ end }}"

    template = (SYS_SCAN + '{{ $off := and $.IsThinkSet (not $.Think) }}<|im_start|>system\n' + pick(0, _dated)
                + '{{ if $hasSys }}{{ $sys }}{{ else }}' + pick(1, _dated) + '{{ end }}' + pick(2, _dated)
                + '<|im_end|>\n' + LOOP + '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n' + pick(3) + '{{ .Content }}'
                '{{ if not $last }}<|im_end|>\n{{ end }}{{ else if eq .Role "tool" }}<|im_start|>user\n{{ .Content }}'
                '<|im_end|>\n{{ end }}{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n' + pick(4)
                + '{{ end }}{{ end }}')
    return Translation("smollm3", "SmolLM3 (system header always written, reasoning mode on/off)", template,
                       ["<|im_end|>", "<|im_start|>"])


# ------------------------------------------------------------------------------------------------ Llama 3


def _llama3_turn(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"


def _llama3_tools(j: _Jinja, header: str) -> tuple[str, str, str] | None:
    """(what the system header gains, the text before the tools, the text after each) when the tools go into the
    first user message (Llama 3.1 / 3.2)."""
    out = j(ONE, [WEATHER_TOOL])
    tool = json.dumps(WEATHER_TOOL, indent=4)
    m = re.fullmatch(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(?P<env>.*?)" + re.escape(header)
                     + r"<\|eot_id\|><\|start_header_id\|>user<\|end_header_id\|>\n\n(?P<pre>.*?)" + re.escape(tool)
                     + "(?P<post>.*?)" + re.escape(f"{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
                     out or "", re.S)
    return (m["env"], m["pre"], m["post"]) if m else None


def _llama3(j: _Jinja) -> Translation | None:
    turns = (_llama3_turn("user", Q1) + _llama3_turn("assistant", A1) + _llama3_turn("user", Q2)
             + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    m = re.fullmatch(r"(?:<\|start_header_id\|>system<\|end_header_id\|>\n\n(?P<h>.*?)<\|eot_id\|>)?"
                     + re.escape(turns), j(MULTI) or "", re.S)
    if not m:
        return None
    header = m["h"]
    if j(WITH_SYS) != (_llama3_turn("system", (header or "") + SYS) + _llama3_turn("user", Q1)
                       + "<|start_header_id|>assistant<|end_header_id|>\n\n"):
        return None
    tools = _llama3_tools(j, header or "") if uses_tools(j.template) else None
    if uses_tools(j.template) and (tools is None or header is None):
        return None
    if header is None:  # Llama 3: a system turn only when there is a system prompt
        head, first_user = "", ""
    else:
        head = ('<|start_header_id|>system<|end_header_id|>\n\n' + ('{{ if .Tools }}' + L(tools[0]) + '{{ end }}'
                                                                    if tools else '') + _dated(header)
                + '{{ $sys }}<|eot_id|>')
        first_user = ('{{ else if and $.Tools (eq $i $firstTurn) }}<|start_header_id|>user<|end_header_id|>\n\n'
                      + L(tools[1]) + '{{ range $.Tools }}' + gojson.tool(4) + L(tools[2]) + '{{ end }}'
                      '{{ .Content }}<|eot_id|>') if tools else ''
    calls = ('{{ else if .ToolCalls }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ with index .ToolCalls 0 }}'
             '{"name": "{{ .Function.Name }}", "parameters": ' + gojson.arguments() + '}{{ end }}<|eot_id|>'
             '{{ else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ json .Content }}'
             '<|eot_id|>') if tools else ''
    template = (SYS_SCAN + '{{ $firstTurn := 0 }}{{ if $hasSys }}{{ $firstTurn = 1 }}{{ end }}' + head + LOOP
                + (FIRST_SYS if header is not None else '{{ if false }}') + first_user + calls
                + '{{ else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}'
                '{{ if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}{{ end }}'
                '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
                '{{ end }}')
    label = "Llama 3" + (" with its system header" if header is not None else "") + (", tools" if tools else "")
    return Translation("llama3", label, template, ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                                   "<|eom_id|>"])


# ------------------------------------------------------------------------------------------------ Mistral


def _mistral(j: _Jinja) -> Translation | None:
    """[INST] turns with the system prompt in the LAST user turn: v0.3 writes "[INST] " and " reply", tekken
    (Nemo, Ministral) neither space."""
    eos = j.eos
    for sp in (" ", ""):
        if (j(MULTI) == f"[INST]{sp}{Q1}[/INST]{sp}{A1}{eos}[INST]{sp}{Q2}[/INST]"
                and j(SYS_MULTI) == f"[INST]{sp}{Q1}[/INST]{sp}{A1}{eos}[INST]{sp}{SYS}\n\n{Q2}[/INST]"):
            break
    else:
        return None
    tools = uses_tools(j.template)
    available = ('{{ if and $.Tools (eq $i $lastUser) }}[AVAILABLE_TOOLS]' + sp + '[{{ range $j, $t := $.Tools }}'
                 '{{ if $j }}, {{ end }}{"type": "function", "function": {"name": "{{ .Function.Name }}"'
                 '{{ if .Function.Description }}, "description": "{{ .Function.Description }}"{{ end }}, '
                 '"parameters": ' + gojson.parameters() + '}}{{ end }}][/AVAILABLE_TOOLS]{{ end }}') if tools else ''
    calls = ('{{ else if .ToolCalls }}[TOOL_CALLS]' + sp + '[{{ range $j, $c := .ToolCalls }}{{ if $j }}, {{ end }}'
             '{"name": {{ json .Function.Name }}, "arguments": ' + gojson.arguments() + ', "id": "{{ .ID }}"}'
             '{{ end }}]' + L(eos) + '{{ else if eq .Role "tool" }}[TOOL_RESULTS]' + sp + '{"content": '
             '{{ .Content }}, "call_id": "{{ .ToolCallID }}"}[/TOOL_RESULTS]') if tools else ''
    template = (SYS_SCAN + '{{ $lastUser := -1 }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}'
                '{{ $lastUser = $i }}{{ end }}{{ end }}' + LOOP + '{{ if eq .Role "user" }}' + available + '[INST]'
                + sp + '{{ if and $last $hasSys }}{{ $sys }}\n\n{{ end }}{{ .Content }}[/INST]' + calls
                + '{{ else if eq .Role "assistant" }}' + sp + '{{ .Content }}{{ if not $last }}' + L(eos)
                + '{{ end }}{{ end }}{{ end }}')
    label = ("Mistral v0.3 ([INST] with spaces)" if sp else "Mistral tekken ([INST] without spaces)") + \
        (", tools" if tools else "")
    return Translation("mistral", label, template, [s for s in (eos, "[INST]") if s])


# ------------------------------------------------------------------------------------------------ Phi, Gemma, plain


def _simple(j: _Jinja, family: str, label: str, turn: str, gen: str, stops: list[str],
            skip_empty_system: bool = False) -> Translation | None:
    """A format where every message is `turn` (with {role} and {text}) and the generation prompt is `gen`."""
    def fmt(role, text):
        return turn.format(role=role, text=text)

    if j(MULTI) != fmt("user", Q1) + fmt("assistant", A1) + fmt("user", Q2) + gen or \
            j(WITH_SYS) != fmt("system", SYS) + fmt("user", Q1) + gen:
        return None
    head, tail = turn.split("{text}")
    go_head = L(head).replace("{role}", "{{ .Role }}")
    skip = '(not .Content)' if skip_empty_system else 'false'
    template = (LOOP + '{{ if and (eq .Role "system") ' + skip + ' }}{{ else if or (eq .Role "system") '
                '(eq .Role "user") (eq .Role "assistant") }}' + go_head + '{{ .Content }}'
                '{{ if not (and $last (eq .Role "assistant")) }}' + L(tail) + '{{ end }}{{ end }}'
                '{{ if and $last (ne .Role "assistant") }}' + L(gen) + '{{ end }}{{ end }}')
    return Translation(family, label, template, stops)


def _phi3(j: _Jinja) -> Translation | None:
    return _simple(j, "phi3", "Phi-3 / Phi-3.5", "<|{role}|>\n{text}<|end|>\n", "<|assistant|>\n",
                   ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"], skip_empty_system=True)


def _phi4(j: _Jinja) -> Translation | None:
    return _simple(j, "phi4", "Phi-4", "<|im_start|>{role}<|im_sep|>{text}<|im_end|>",
                   "<|im_start|>assistant<|im_sep|>", ["<|im_end|>", "<|im_start|>", "<|im_sep|>"])


GEMMA = ('{{ $first := true }}' + LOOP + '{{ if eq .Role "user" }}<start_of_turn>user\n{{ if and $first $.System }}'
         '{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n'
         '{{ end }}{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ if and $first $.System }}{{ $.System }}'
         '\n\n{{ end }}{{ $first = false }}{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}{{ end }}{{ end }}')


def _gemma(j: _Jinja) -> Translation | None:
    """Gemma's turns; the system prompt folded into the first turn (Gemma 3), or refused (Gemma 2: Ollama's is
    folded the same way)."""
    turns = (f"<start_of_turn>user\n{Q1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
             f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n")
    if j(MULTI) != turns:
        return None
    with_sys = j(WITH_SYS)
    if with_sys not in (None, f"<start_of_turn>user\n{SYS}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n"):
        return None
    label = "Gemma (system prompt folded into the first turn)" if with_sys else \
        "Gemma 2 (its template refuses a system prompt; Ollama's is folded into the first turn)"
    return Translation("gemma", label, GEMMA, ["<end_of_turn>", "<start_of_turn>"])


PLAIN = ('{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
         '{{ if eq .Role "system" }}System: {{ .Content }}\n'
         '{{ else if eq .Role "user" }}User: {{ .Content }}\n{{ if $last }}Assistant:{{ end }}'
         '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}\n{{ end }}{{ end }}')


def _plain(j: _Jinja) -> Translation | None:
    if j(MULTI) != f"User: {Q1}\nAssistant: {A1}\nUser: {Q2}\nAssistant:" or \
            j(WITH_SYS) != f"System: {SYS}\nUser: {Q1}\nAssistant:":
        return None
    return Translation("plain", "plain (User: / Assistant:)", PLAIN, ["\nUser:"])


DETECTORS = (_chatml, _smollm3, _llama3, _mistral, _phi3, _phi4, _gemma, _plain)
FAMILY_NAMES = "ChatML (Qwen2.5, Qwen3, SmolLM2), SmolLM3, Llama 3.x, Mistral, Phi-3, Phi-4, Gemma 2/3 and plain"


def translate(chat_template: str | None, bos_token: str = "", eos_token: str = "") -> Translation:
    """The Modelfile's Go template for a chat template, found by rendering probe conversations (see the module
    docstring); `template` is None, with the `reason`, when it is none of the families. bos_token / eos_token: the
    tokenizer's, for templates that write them (Mistral ends each reply with its eos)."""
    if not chat_template:
        return Translation(reason="the model has no chat template")
    j = _Jinja(chat_template, bos_token or "<s>", eos_token or "</s>")
    multi = j(MULTI)
    if multi is None:
        return Translation(reason="the chat template refuses a plain user / assistant / user conversation")
    for detect in DETECTORS:
        t = detect(j)
        if t is not None:
            return t
    return Translation(reason=f"its turns ({multi[:160]!r} for a three-turn conversation) are none of the formats "
                       f"MacTuner translates: {FAMILY_NAMES}")
