"""The repository is a valid Gradio Space as it is: README.md's front matter, the app file it names, and what a
Space installs (requirements.txt, packages.txt) in step with pyproject.toml."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Space-only packages: the HF -> GGUF converter's dependencies (scripts/setup.sh installs them beside it)
SPACE_ONLY = {"sentencepiece", "protobuf"}
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large",
            "a10g-largex2", "a10g-largex4", "a100-large", "l40sx1", "l40sx4", "l40sx8", "h100x1", "zero-a10g"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must open with the Space's YAML front matter"
    return yaml.safe_load(m.group(1))


def requirements() -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_front_matter_is_a_gradio_space():
    fm = front_matter()
    assert fm["sdk"] == "gradio" and fm["app_file"] == "app.py" and (ROOT / fm["app_file"]).is_file()
    assert fm["suggested_hardware"] in HARDWARE
    assert fm["hf_oauth"] is True  # the studio uses Hugging Face login on a Space
    assert isinstance(fm["python_version"], str) and SpecifierSet(pyproject()["project"]["requires-python"]) \
        .contains(fm["python_version"] + ".0")
    assert 0 < len(fm["short_description"]) <= 60
    assert fm["title"] and fm["emoji"]
    gradio = requirements()["gradio"]
    assert str(gradio.specifier) == f"=={fm['sdk_version']}", "sdk_version must be the gradio requirements.txt pins"
    assert "oauth" in gradio.extras
    readme = (ROOT / "README.md").read_text()
    assert "## Run it as a Space" in readme and "bash scripts/studio.sh" in readme and "bash scripts/test.sh" in readme


def test_requirements_agree_with_pyproject():
    """The same packages; a pin in requirements.txt must satisfy pyproject's range (or equal its spec)."""
    deps = {canonicalize_name(Requirement(d).name): Requirement(d) for d in pyproject()["project"]["dependencies"]}
    reqs = requirements()
    assert set(reqs) - set(deps) == SPACE_ONLY, "requirements.txt has packages pyproject.toml does not"
    assert not set(deps) - set(reqs), f"missing from requirements.txt: {sorted(set(deps) - set(reqs))}"
    for name, dep in deps.items():
        req = reqs[name]
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if pins:
            assert dep.specifier.contains(pins[0], prereleases=True), (name, str(req.specifier), str(dep.specifier))
        else:
            assert req.specifier == dep.specifier, (name, str(req.specifier), str(dep.specifier))
        assert not dep.extras - req.extras, name
    assert str(reqs["torch"].specifier) == "==2.13.0"  # a looser spec pulls a multi-GB CUDA build here
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    llama = re.search(r"LLAMA_VERSION=(\S+)", setup).group(1)
    assert str(reqs["llama-cpp-python"].specifier) == f"=={llama}"  # what scripts/setup.sh builds


def test_packages_txt_can_build_what_requirements_compile():
    apt = {line.strip() for line in (ROOT / "packages.txt").read_text().splitlines() if line.strip()}
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p) for p in apt), apt  # Debian package names, one a line
    assert {"build-essential", "cmake"} <= apt  # llama-cpp-python compiles from source on the Space


def test_app_file_runs_the_studio_command():
    """app.py builds the same app: it is `mactuner studio` (pipelines.cli), nothing of its own."""
    tree = ast.parse((ROOT / "app.py").read_text())
    assert ast.get_docstring(tree)
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("pipelines.cli", "main") in imported
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
    assert calls and isinstance(calls[0].args[0], ast.List) and calls[0].args[0].elts[0].value == "studio"
