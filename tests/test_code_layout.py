"""The shape of the code, as a newcomer meets it: modules small enough to read in one sitting, no import cycle
between the project's modules (imports inside functions count too), every folder opening with a docstring that
says what lives where, and pipelines/ never importing gradio."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "studio")
MAX_LINES = 520  # "about 500"


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (resolved: relative imports, `from pkg import module`)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            cands = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name:
                found.add(c)
    return found


def test_no_module_is_too_long():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, "split these modules"


def test_no_import_cycle():
    mods = modules()
    known = set(mods)
    graph = {n: imports_of(n, p, known) for n, p in mods.items()}
    # a package importing its own submodules (re-exports) is not a cycle of the design: leave __init__ -> child out
    for n in graph:
        graph[n] = {m for m in graph[n] if not m.startswith(n + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_every_folder_says_what_lives_there():
    for pkg in PACKAGES:
        for init in (ROOT / pkg).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            if init.parent.name == "tabs":  # one module per tab, named after it
                continue
            assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} needs a docstring saying what lives where"
    for name, path in modules().items():
        assert ast.get_docstring(ast.parse(path.read_text())) or path.name == "__init__.py", name


def test_pipelines_never_import_gradio():
    known = set(modules())
    for name, path in modules().items():
        if name.startswith("pipelines"):
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not any(x.split(".")[0] == "gradio" for x in names), name
    assert known


# The training loop and the job lifecycle: kept to functions that fit on a screen and to other modules' public names.
KEPT_SHORT = ("pipelines/training", "pipelines/jobs", "pipelines/runs.py", "pipelines/follow.py", "pipelines/procs.py",
              "pipelines/multinode.py", "studio/handlers/train.py", "studio/handlers/journey.py")
MAX_FUNCTION_LINES = 80  # "fits on a screen"


def kept_short() -> dict[str, Path]:
    return {n: p for n, p in modules().items()
            if any(str(p.relative_to(ROOT)).startswith(k) for k in KEPT_SHORT)}


def test_training_and_job_functions_fit_on_a_screen():
    long = {}
    for name, path in kept_short().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert not long, long


def private_imports(mods: dict[str, Path], dunders: bool) -> list[str]:
    """The `from m import _name` of `mods` (`__name` too when `dunders`), one line each."""
    found = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{name}: {a.name} from {'.' * node.level}{node.module or ''}" for a in node.names
                          if a.name.startswith("_") and (dunders or not a.name.startswith("__"))]
    return found


def test_training_and_job_modules_import_no_private_names():
    found = private_imports(kept_short(), dunders=True)
    assert not found, found
    assert kept_short()


# Imports inside functions are for what is slow to import (torch, transformers, gradio) or would make a cycle; the
# standard library's light modules are imported once, at the top.
LIGHT_STDLIB = {"pathlib", "time", "os", "json", "re", "sys", "math", "shutil", "dataclasses", "typing", "io",
                "collections", "itertools", "functools", "subprocess", "tempfile", "threading", "datetime",
                "contextlib", "hashlib", "signal", "socket", "textwrap", "statistics", "random", "uuid", "glob"}


def test_light_standard_modules_are_imported_at_the_top():
    found = []
    for name, path in modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [f"{name}.{fn.name}: {a.name}" for a in node.names if a.name in LIGHT_STDLIB]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module in LIGHT_STDLIB:
                    found.append(f"{name}.{fn.name}: {node.module}")
    assert not found, found


def test_no_module_imports_private_names_of_another():
    found = private_imports(modules(), dunders=False)  # __version__ and the like are public
    assert not found, found
