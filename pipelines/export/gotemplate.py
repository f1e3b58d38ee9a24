"""Ollama's side of a chat template: a Modelfile TEMPLATE rendered by Go's own `text/template` (the engine Ollama
uses), on the data Ollama gives it, and compared with the Jinja chat template the model was trained with.

Ollama (template.Execute, a template that uses .Messages) passes every message of the request - the system ones
included, consecutive messages of one role merged with a blank line - as .Messages, and the system messages' text
joined as .System, the tools as .Tools and the request's `think` as .Think / .IsThinkSet (typed as Ollama types them,
so a template prints them as it would there); a Modelfile's SYSTEM is prepended as a system message when the
request has none. The small Go
program below does the same with nothing but the standard library; it is built once per process in a temporary
folder (GOCACHE and GOPATH there too, no network), removed at exit.

    texts = render_go(template, [[{"role": "user", "content": "Hi"}]])   # Unavailable when `go` is missing
    item = compare_with_jinja(go_template, jinja_template, bos_token="<bos>")  # (ok | None, detail)

compare_with_jinja checks CONVERSATIONS (system prompt or not, one to three turns), plus TOOL_CONVERSATIONS where the
Jinja template renders tools and thinking on/off where it reacts to `enable_thinking`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import MacTunerError, Unavailable

GO_RENDERER = r"""package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

// The shapes Ollama gives a template (template.Values -> templateMessage, templateTool, api.ToolProperty).
type PropertyType []string

func (p *PropertyType) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		*p = PropertyType{one}
		return nil
	}
	var many []string
	err := json.Unmarshal(b, &many)
	*p = many
	return err
}

func (p PropertyType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

type ToolProperty struct {
	AnyOf       []ToolProperty          `json:"anyOf,omitempty"`
	Type        PropertyType            `json:"type,omitempty"`
	Items       any                     `json:"items,omitempty"`
	Description string                  `json:"description,omitempty"`
	Enum        []any                   `json:"enum,omitempty"`
	Properties  map[string]ToolProperty `json:"properties,omitempty"`
	Required    []string                `json:"required,omitempty"`
}

type Parameters struct {
	Type       string                  `json:"type"`
	Defs       any                     `json:"$defs,omitempty"`
	Items      any                     `json:"items,omitempty"`
	Required   []string                `json:"required,omitempty"`
	Properties map[string]ToolProperty `json:"properties"`
}

type Function struct {
	Name        string     `json:"name"`
	Description string     `json:"description"`
	Parameters  Parameters `json:"parameters"`
}

type Tool struct {
	Type     string   `json:"type"`
	Items    any      `json:"items,omitempty"`
	Function Function `json:"function"`
}

type Tools []Tool

func (t Tools) String() string { b, _ := json.Marshal(t); return string(b) }

type Args map[string]any

func (a Args) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(a)
	return string(b)
}

type CallFunction struct {
	Index     int    `json:"index"`
	Name      string `json:"name"`
	Arguments Args   `json:"arguments"`
}

type ToolCall struct {
	ID       string       `json:"id"`
	Function CallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	ToolCalls  []ToolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Tools    Tools     `json:"tools"`
	Think    *bool     `json:"think"`
}

var funcs = template.FuncMap{
	"json":          func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate":   func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

func main() {
	var in struct {
		Template string `json:"template"`
		Cases    []Case `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		os.Stderr.WriteString("template does not parse: " + err.Error() + "\n")
		os.Exit(3)
	}
	out := []map[string]string{}
	for _, c := range in.Cases {
		// as Ollama's template.collate: system texts joined; consecutive messages of one role merged (not tools)
		var system []string
		var collated []*Message
		for i := range c.Messages {
			m := &c.Messages[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
				collated[n-1].Content += "\n\n" + m.Content
			} else {
				collated = append(collated, m)
			}
		}
		var tools Tools
		if len(c.Tools) > 0 {
			tools = c.Tools
		}
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": tools,
			"Response": "", "Think": c.Think != nil && *c.Think, "ThinkLevel": "", "IsThinkSet": c.Think != nil}
		var b strings.Builder
		if err := t.Execute(&b, data); err != nil {
			out = append(out, map[string]string{"error": err.Error()})
		} else {
			out = append(out, map[string]string{"text": b.String()})
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

# A tool in the OpenAI form, keys in the order Ollama's structs print them (what a Go template can reproduce).
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}

_CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# The conversations a Modelfile template is checked on: system prompt or not, one to three turns.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And of Italy?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."},
     {"role": "user", "content": "And of Spain?"}],
]

# With tools: a call, its result, an answer and a new question (checked where the chat template renders tools).
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [_CALL]},
     {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18 C and sunny"},
     {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
     {"role": "user", "content": "Thanks! And is that warm?"}],
]


def case(messages: list[dict], tools: list[dict] | None = None, think: bool | None = None) -> dict:
    """One rendering to check: the messages (OpenAI / transformers form), the tools offered, and Ollama's `think`
    (None: not set, which a Jinja template sees as enable_thinking undefined)."""
    return {"messages": messages, "tools": tools, "think": think}


def default_cases(tools: bool = False, thinking: bool = False) -> list[dict]:
    """CONVERSATIONS; with `tools`, TOOL_CONVERSATIONS offering WEATHER_TOOL; with `thinking`, the first two
    conversations again with thinking off and on."""
    out = [case(m) for m in CONVERSATIONS]
    if tools:
        out += [case(m, [WEATHER_TOOL]) for m in TOOL_CONVERSATIONS]
    if thinking:
        out += [case(m, think=t) for t in (False, True) for m in CONVERSATIONS[:2]]
    return out


def _ollama_message(m: dict) -> dict:
    """A transformers message as Ollama's API has it: thinking apart, tool calls with their index, tool_name."""
    calls = [{"id": c.get("id", ""), "function": {"index": i, "name": c["function"]["name"],
                                                   "arguments": c["function"].get("arguments") or {}}}
             for i, c in enumerate(m.get("tool_calls") or [])]
    return {"role": m["role"], "content": m.get("content") or "", "thinking": m.get("reasoning_content") or "",
            "tool_calls": calls, "tool_name": m.get("name", ""), "tool_call_id": m.get("tool_call_id", "")}


def go_binary() -> str | None:
    """The `go` command ($MACTUNER_GO, else on PATH, else /usr/bin/go), or None."""
    env = os.environ.get("MACTUNER_GO")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("go") or ("/usr/bin/go" if Path("/usr/bin/go").is_file() else None)


_BUILT: dict[str, str] = {}  # go binary -> the renderer built with it (once per process, removed at exit)


def _renderer(go: str) -> str:
    """The renderer program, built once per process with `go build` in a temporary folder (no network: GOPROXY off,
    GOCACHE there too)."""
    if go in _BUILT and Path(_BUILT[go]).is_file():
        return _BUILT[go]
    tmp = tempfile.mkdtemp(prefix="mactuner-go-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    (Path(tmp) / "render.go").write_text(GO_RENDERER)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "GOCACHE": f"{tmp}/cache",
           "GOPATH": f"{tmp}/gopath", "GOPROXY": "off", "GOFLAGS": "", "GO111MODULE": "off", "GOTOOLCHAIN": "local",
           "CGO_ENABLED": "0", "GOTELEMETRY": "off"}
    try:
        p = subprocess.run([go, "build", "-o", "render", "render.go"], capture_output=True, text=True, env=env,
                           cwd=tmp, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"Go could not build the template renderer ({go}): {e}") from e
    if p.returncode != 0:
        raise Unavailable(f"Go could not build the template renderer: {p.stderr.strip()[:300]}")
    shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)
    _BUILT[go] = str(Path(tmp) / "render")
    return _BUILT[go]


def render_go(template: str, conversations: list, timeout: float = 120.0) -> list[str]:
    """Each case (see `case`; a plain list of messages is a case without tools or thinking) rendered by Go's
    text/template as Ollama renders a chat. Unavailable when Go is missing; MacTunerError when the template does not
    parse or a rendering fails (the message says which)."""
    go = go_binary()
    if go is None:
        raise Unavailable("Go is not installed (Debian: apt-get install golang-go), so the Modelfile template "
                          "cannot be rendered the way Ollama renders it.")
    cases = [c if isinstance(c, dict) else case(c) for c in conversations]
    payload = json.dumps({"template": template, "cases": [
        {"messages": [_ollama_message(m) for m in c["messages"]], "tools": c.get("tools") or [],
         "think": c.get("think")} for c in cases]})
    try:
        p = subprocess.run([_renderer(go)], input=payload, capture_output=True, text=True, timeout=timeout,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except subprocess.TimeoutExpired as e:
        raise MacTunerError(f"Go took more than {timeout:.0f} s to render the template.") from e
    except OSError as e:
        raise Unavailable(f"The Go renderer could not be started: {e}") from e
    if p.returncode != 0:
        raise MacTunerError((p.stderr.strip() or f"go run exited with {p.returncode}")[:400])
    rows = json.loads(p.stdout)
    bad = next((r["error"] for r in rows if "error" in r), None)
    if bad:
        raise MacTunerError(f"the template fails on a test conversation: {bad[:300]}")
    return [r["text"] for r in rows]


def modelfile_template(modelfile_text: str) -> str | None:
    """The TEMPLATE \"\"\"...\"\"\" of a Modelfile's text, or None when it has none."""
    m = re.search(r'^TEMPLATE """(.*?)"""', modelfile_text, flags=re.S | re.M)
    return m.group(1) if m else None


_BOS_MARK = "\x00BOS\x00"


def render_jinja(jinja_template: str, c: dict, bos_token: str = "", eos_token: str = "") -> str:
    """A case rendered by the Jinja chat template as transformers would (generation prompt on; `tools` and
    `enable_thinking` passed only when the case sets them), the leading BOS text removed (llama.cpp adds BOS as a
    token). BadInput when the template refuses the conversation."""
    from ..templates import render_template  # noqa: PLC0415

    extra = ({"tools": c["tools"]} if c.get("tools") else {}) | (
        {"enable_thinking": c["think"]} if c.get("think") is not None else {})
    # BOS is rendered as a sentinel first: only a BOS the template itself writes is dropped (SmolLM2's bos_token is
    # "<|im_start|>", which its template writes as markup, never as BOS)
    text = render_template(jinja_template, c["messages"], add_generation_prompt=True, bos_token=_BOS_MARK,
                           eos_token=eos_token, **extra)
    return text.removeprefix(_BOS_MARK).replace(_BOS_MARK, bos_token)


def _differs(jinja_template: str, a: dict, b: dict) -> bool:
    try:
        return render_jinja(jinja_template, a) != render_jinja(jinja_template, b)
    except MacTunerError:
        return False


def uses_tools(jinja_template: str) -> bool:
    """True when the chat template renders a conversation differently once tools are offered."""
    msgs = TOOL_CONVERSATIONS[0]
    return _differs(jinja_template, case(msgs), case(msgs, [WEATHER_TOOL]))


def uses_thinking(jinja_template: str) -> bool:
    """True when `enable_thinking` (Ollama's `think`) changes what the chat template renders."""
    msgs = CONVERSATIONS[0]
    return _differs(jinja_template, case(msgs), case(msgs, think=False)) or \
        _differs(jinja_template, case(msgs), case(msgs, think=True))


def _describe(c: dict) -> str:
    msgs = c["messages"]
    bits = [("with" if msgs[0]["role"] == "system" else "without") + " a system prompt",
            f"{sum(m['role'] == 'user' for m in msgs)} user turn(s)"]
    if c.get("tools"):
        bits.append("tools offered" + (", a tool call and its result" if any(m.get("tool_calls") for m in msgs)
                                       else ""))
    if c.get("think") is not None:
        bits.append(f"thinking {'on' if c['think'] else 'off'}")
    return ", ".join(bits)


def compare_with_jinja(go_template: str, jinja_template: str, bos_token: str = "", eos_token: str = "",
                       conversations: list | None = None) -> tuple[bool | None, str]:
    """(ok, detail): the Go template rendered by Go against the Jinja template on each case (default_cases, with
    tool calls where the Jinja renders tools and thinking on/off where it reacts to it). A conversation the Jinja
    template refuses (Gemma 2 and a system prompt) is left out and the detail says so. ok is None when Go is
    missing."""
    if conversations is None:
        cases = default_cases(uses_tools(jinja_template), uses_thinking(jinja_template))
    else:
        cases = [c if isinstance(c, dict) else case(c) for c in conversations]
    wanted, refused = [], []
    for c in cases:
        try:
            wanted.append((c, render_jinja(jinja_template, c, bos_token, eos_token)))
        except MacTunerError as e:
            refused.append(f"{_describe(c)}: {str(e)[:120]}")
    if not wanted:
        return False, "the chat template refuses every test conversation: " + "; ".join(refused[:2])
    try:
        go_texts = render_go(go_template, [c for c, _w in wanted])
    except Unavailable as e:
        return None, f"skipped: {e}"
    except MacTunerError as e:
        return False, f"Go cannot render the Modelfile template: {e}"
    for i, ((c, want), got) in enumerate(zip(wanted, go_texts)):
        if got != want:
            at = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
            return False, (f"conversation {i + 1} ({_describe(c)}) differs at character {at}: Go "
                           f"{got[max(0, at - 60): at + 100]!r} vs Jinja {want[max(0, at - 60): at + 100]!r}")
    kinds = sorted({k for c, _w in wanted for k in (["tool calls"] if c.get("tools") else [])
                    + (["thinking on/off"] if c.get("think") is not None else [])})
    detail = (f"Go's text/template renders {len(wanted)} conversations (system prompt or not, one to three turns"
              + "".join(f", {k}" for k in kinds) + ") exactly like the chat template")
    if refused:
        detail += f"; {len(refused)} the chat template refuses were left out ({refused[0]})"
    return True, detail
