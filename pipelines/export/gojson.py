"""Go template text that prints JSON the way a Jinja chat template's `tojson` does (Python's json.dumps: ", " and
": " separators, or `indent`), for the values Ollama gives a template: a tool (Ollama's typed structs, printed in
the OpenAI order type / function{name, description, parameters{type, properties, required}}) and a tool call's
arguments (a map; Go ranges over it in sorted key order, its values printed by Ollama's `json` function).

Go's own `json` prints compact JSON ({"a":1}), which no chat template does; these helpers write the punctuation
around it. What they cannot reproduce - a tool whose keys come in another order, a nested argument object - shows
as a difference when the Modelfile template is checked against the Jinja original (gotemplate.compare_with_jinja).
"""

from __future__ import annotations

import json


def literal(text: str) -> str:
    """`text` as Go template text that prints itself ("{{" is the only sequence text/template interprets)."""
    return text.replace("{{", '{{ "{{" }}')


def _nl(indent: int | None, level: int) -> str:
    return "" if indent is None else "\n" + " " * (indent * level)


def _sep(indent: int | None, level: int) -> str:
    return ", " if indent is None else "," + _nl(indent, level)


def obj(fields: list[tuple[str, str, str | None]], indent: int | None, level: int) -> str:
    """A JSON object of (key, Go text of the value, Go condition or None); the first field is always present."""
    out = "{" + _nl(indent, level + 1)
    for n, (key, value, cond) in enumerate(fields):
        piece = ("" if n == 0 else _sep(indent, level + 1)) + json.dumps(key) + ": " + value
        out += ("{{ if " + cond + " }}" + piece + "{{ end }}") if cond else piece
    return out + _nl(indent, level) + "}"


def scalar_list(expr: str, var: str, indent: int | None, level: int) -> str:
    """A JSON list of the scalars in Go expression `expr` (`var` makes the template variables unique)."""
    i, item = "$i" + var, "$item" + var
    return ("[{{ range " + i + ", " + item + " := " + expr + " }}{{ if " + i + " }}" + _sep(indent, level + 1)
            + "{{ else }}" + _nl(indent, level + 1) + "{{ end }}{{ json " + item + " }}{{ end }}"
            + _nl(indent, level) + "]")


def mapping(expr: str, value: str, var: str, indent: int | None, level: int) -> str:
    """A JSON object over the Go map `expr` (sorted keys); `value` is the Go text of one value, written with
    `$v<var>` for it; `var` makes the template variables unique. The opening brace is printed by an action: text
    "{" right before "{{" would read as "{{{"."""
    first, k, v = "$first" + var, "$k" + var, "$v" + var
    return ("{{ if " + expr + " }}{{ " + first + " := true }}{{ range " + k + ", " + v + " := " + expr + " }}"
            "{{ if " + first + ' }}{{ "{" }}' + _nl(indent, level + 1) + "{{ " + first + " = false }}{{ else }}"
            + _sep(indent, level + 1) + "{{ end }}{{ json " + k + " }}: " + value + "{{ end }}"
            + _nl(indent, level) + "}{{ else }}{}{{ end }}")


def parameters(indent: int | None = None, level: int = 0, fn: str = ".Function") -> str:
    """A tool's parameters (`<fn>.Parameters`, `fn` being its function in the template) as `tojson` prints them."""
    prop = obj([("type", "{{ json $vp.Type }}", None),
                ("description", "{{ json $vp.Description }}", "$vp.Description"),
                ("enum", scalar_list("$vp.Enum", "e", indent, level + 3), "$vp.Enum")], indent, level + 2)
    return obj([("type", "{{ json " + fn + ".Parameters.Type }}", None),
                ("properties", mapping(fn + ".Parameters.Properties", prop, "p", indent, level + 1), None),
                ("required", scalar_list(fn + ".Parameters.Required", "r", indent, level + 1),
                 fn + ".Parameters.Required")], indent, level)


def tool(indent: int | None = None, level: int = 0) -> str:
    """One tool (the template's `.` inside `range .Tools`) as `tool | tojson` (indent None) or
    `tool | tojson(indent=4)` prints it."""
    function = obj([("name", "{{ json .Function.Name }}", None),
                    ("description", "{{ json .Function.Description }}", ".Function.Description"),
                    ("parameters", parameters(indent, level + 2), None)], indent, level + 1)
    return obj([("type", "{{ json .Type }}", None), ("function", function, None)], indent, level)


def arguments(expr: str = ".Function.Arguments") -> str:
    """A tool call's arguments as `arguments | tojson` prints a flat object."""
    return mapping(expr, "{{ json $va }}", "a", None, 0)
