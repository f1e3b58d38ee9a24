"""Ollama's side of a chat template: a Modelfile TEMPLATE rendered by Go's own `text/template` (the engine Ollama
uses), on the data Ollama gives it, and compared with the Jinja chat template the model was trained with.

Ollama (template.Execute, a template that uses .Messages) passes every message of the request - the system ones
included, consecutive messages of one role merged with a blank line - as .Messages, and the system messages' text
joined as .System; a Modelfile's SYSTEM is prepended as a system message when the request has none. The small Go
program below does the same with nothing but the standard library; it is built in a temporary folder (GOCACHE and
GOPATH there too, no network) and removed afterwards.

    texts = render_go(template, [[{"role": "user", "content": "Hi"}]])   # Unavailable when `go` is missing
    item = compare_with_jinja(go_template, jinja_template, bos_token="<bos>")  # (ok | None, detail)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import MacTunerError, Unavailable

GO_RENDERER = r'''package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string      `json:"template"`
		Cases    [][]Message `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		os.Stderr.WriteString("bad input: " + err.Error() + "\n")
		os.Exit(2)
	}
	t, err := template.New("").Parse(in.Template)
	if err != nil {
		os.Stderr.WriteString("template does not parse: " + err.Error() + "\n")
		os.Exit(3)
	}
	out := []map[string]string{}
	for _, msgs := range in.Cases {
		// as Ollama's template.collate: system texts joined; consecutive messages of one role merged
		var system []string
		var collated []*Message
		for i := range msgs {
			if msgs[i].Role == "system" {
				system = append(system, msgs[i].Content)
			}
			if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
				collated[n-1].Content += "\n\n" + msgs[i].Content
			} else {
				collated = append(collated, &msgs[i])
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": ""}
		if err := t.Execute(&b, data); err != nil {
			out = append(out, map[string]string{"error": err.Error()})
		} else {
			out = append(out, map[string]string{"text": b.String()})
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''

# The conversations a Modelfile template is checked on: system prompt or not, one turn or several.
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


def go_binary() -> str | None:
    """The `go` command ($MACTUNER_GO, else on PATH, else /usr/bin/go), or None."""
    env = os.environ.get("MACTUNER_GO")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("go") or ("/usr/bin/go" if Path("/usr/bin/go").is_file() else None)


def render_go(template: str, conversations: list[list[dict]], timeout: float = 120.0) -> list[str]:
    """Each conversation rendered by Go's text/template as Ollama renders a chat. Unavailable when Go is missing;
    MacTunerError when the template does not parse or a rendering fails (the message says which)."""
    go = go_binary()
    if go is None:
        raise Unavailable("Go is not installed (Debian: apt-get install golang-go), so the Modelfile template "
                          "cannot be rendered the way Ollama renders it.")
    with tempfile.TemporaryDirectory(prefix="mactuner-go-") as tmp:
        src = Path(tmp) / "render.go"
        src.write_text(GO_RENDERER)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "GOCACHE": f"{tmp}/cache",
               "GOPATH": f"{tmp}/gopath", "GOPROXY": "off", "GOFLAGS": "", "GO111MODULE": "off",
               "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOTELEMETRY": "off"}
        payload = json.dumps({"template": template, "cases": conversations})
        try:
            p = subprocess.run([go, "run", str(src)], input=payload, capture_output=True, text=True, env=env,
                               cwd=tmp, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise MacTunerError(f"Go took more than {timeout:.0f} s to render the template.") from e
        except OSError as e:
            raise Unavailable(f"Go could not be started ({go}): {e}") from e
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


def compare_with_jinja(go_template: str, jinja_template: str, bos_token: str = "", eos_token: str = "",
                       conversations: list[list[dict]] | None = None) -> tuple[bool | None, str]:
    """(ok, detail): the Go template rendered by Go against the Jinja template (add_generation_prompt=True, the
    BOS text stripped: llama.cpp adds BOS as a token) on each conversation. ok is None when Go is missing."""
    from ..templates import render_template  # noqa: PLC0415

    convs = conversations or CONVERSATIONS
    try:
        go_texts = render_go(go_template, convs)
    except Unavailable as e:
        return None, f"skipped: {e}"
    except MacTunerError as e:
        return False, f"Go cannot render the Modelfile template: {e}"
    for i, (msgs, got) in enumerate(zip(convs, go_texts)):
        want = render_template(jinja_template, msgs, add_generation_prompt=True, bos_token=bos_token,
                               eos_token=eos_token)
        if bos_token and want.startswith(bos_token):
            want = want[len(bos_token):]
        if got != want:
            kind = ("with" if msgs[0]["role"] == "system" else "without") + " a system prompt, " + \
                f"{sum(m['role'] == 'user' for m in msgs)} user turn(s)"
            return False, f"conversation {i + 1} ({kind}) differs: Go {got[:160]!r} vs Jinja {want[:160]!r}"
    return True, (f"Go's text/template renders {len(convs)} conversations (system prompt or not, one to three "
                  "turns) exactly like the chat template")
