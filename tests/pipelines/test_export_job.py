"""Export jobs: an export step in its own process (a pipelines.jobs job), followed through exports/.jobs/<id>/
status.json; one at a time; cancel and kill -9 leave nothing that looks finished; the single-step CLI commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import export as ex
from pipelines import follow
from pipelines.export import job as export_job
from pipelines.errors import BadInput, Conflict

ROOT = Path(__file__).resolve().parents[2]


def _slow_converter(root: Path) -> Path:
    """A stand-in converter that writes part of its output under the temp name, then hangs."""
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text('TEXT_MODEL_MAP = {"LlamaForCausalLM": "llama"}\n')
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys, time\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF' + b'x' * 1000)\nprint('Writing:  40%', flush=True)\ntime.sleep(120)\n")
    return root


def _wait_for(ws, job, pred, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = export_job.status(ws, job)
        if pred(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"job never reached the state: {export_job.status(ws, job)}\n{_log(ws, job)}")


def _log(ws, job) -> str:
    return export_job.queue(ws).job(job).log_tail()


def _finished_looking(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.suffix == ".gguf" or p.name == "export.json"] if folder.exists() else []


@pytest.mark.slow
def test_job_runs_an_export_to_the_end(workspace, spm_llama_dir):
    job = export_job.start(workspace, "run", {"source": str(spm_llama_dir), "name": "tiny", "quants": ["Q8_0"],
                                              "validate": False})
    q = export_job.queue(workspace)
    seen = [up.status for up in follow.follow(q.job(job), lambda: q.status(job), interval=0.2)]
    final = seen[-1]
    assert final.state == "finished", _log(workspace, job)
    assert [Path(g).name for g in final.result["ggufs"]] == ["tiny-f16.gguf", "tiny-Q8_0.gguf"]
    assert any(0 < (s.fraction or 0) < 1 for s in seen)  # progress was reported on the way
    assert ex.list_exports(workspace)[0]["state"] == "complete"
    assert export_job.active(workspace) is None
    d = ex.export_details(workspace, "tiny")
    assert [g["type"] for g in d["gguf_files"]] == ["f16", "Q8_0"] and d["gguf_files"][0]["modelfile"]


def test_job_refuses_a_second_one_and_cancel_leaves_nothing_finished(workspace, tiny_llama_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv(ex.CONVERTER_ENV, str(_slow_converter(tmp_path / "conv")))
    job = export_job.start(workspace, "run", {"source": str(tiny_llama_dir), "name": "slow", "quants": [],
                                              "validate": False})
    st = _wait_for(workspace, job, lambda s: "40%" in (s.message or ""))
    assert st.state == "running" and 0 < st.fraction < 1
    with pytest.raises(Conflict, match="An export job is running"):
        export_job.start(workspace, "convert", {"hf_dir": str(tiny_llama_dir)})
    st = export_job.cancel(workspace, job)
    assert st.state == "cancelled" and st.reason == "cancelled"
    folder = workspace.exports / "slow"
    assert _finished_looking(folder) == []
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]  # the temp file went too
    (row,) = ex.list_exports(workspace)
    assert row["state"] == "cancelled" and row["ggufs"] == []


@pytest.mark.parametrize("after", [0.0, 0.7])
def test_a_job_cancelled_as_it_starts_is_cancelled(workspace, tiny_llama_dir, tmp_path, monkeypatch, after):
    """Cancel right after Start (the job's processes are still starting, before they listen for the signal): the
    job is recorded as cancelled, not "failed - the export process ended unexpectedly (exit code -15)"."""
    monkeypatch.setenv(ex.CONVERTER_ENV, str(_slow_converter(tmp_path / "conv")))  # it would not end by itself
    job = export_job.start(workspace, "convert", {"hf_dir": str(tiny_llama_dir), "name": "early"})
    time.sleep(after)
    st = export_job.cancel(workspace, job)
    assert st.state == "cancelled", (st, _log(workspace, job))
    assert export_job.status(workspace, job).state == "cancelled"
    assert _finished_looking(workspace.exports / "early") == []
    assert export_job.active(workspace) is None


def test_killed_job_is_reported_failed(workspace, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ex.CONVERTER_ENV, str(_slow_converter(tmp_path / "conv")))
    job = export_job.start(workspace, "convert", {"hf_dir": str(tiny_llama_dir), "name": "k"})
    st = _wait_for(workspace, job, lambda s: "40%" in (s.message or ""))
    os.kill(st.pid, signal.SIGKILL)  # the export's process; its supervisor sees how it ended
    st = _wait_for(workspace, job, lambda s: s.state != "running")
    assert st.state == "failed" and "ended unexpectedly (exit code -9)" in st.reason and st.exit_code == -9
    assert _finished_looking(workspace.exports / "k") == []
    assert export_job.active(workspace) is None  # the next job may start


def test_bad_job_requests(workspace):
    with pytest.raises(BadInput, match="Unknown export step"):
        export_job.start(workspace, "frobnicate", {})
    with pytest.raises(BadInput, match="needs gguf"):
        export_job.start(workspace, "quantize", {"gguf": " "})
    with pytest.raises(BadInput, match="outside the workspace"):
        export_job.start(workspace, "validate", {"gguf": "/tmp/elsewhere.gguf"})
    with pytest.raises(BadInput, match="not an export job id"):
        export_job.status(workspace, "../etc")


def test_failed_step_reports_its_reason(workspace):
    job = export_job.start(workspace, "quantize", {"gguf": str(workspace.exports / "missing.gguf"), "quants": ["Q8_0"]})
    st = _wait_for(workspace, job, lambda s: s.state != "running")
    assert st.state == "failed" and "does not exist" in st.reason


def _cli(*args, root):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "export", *args, "--root", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_steps_quantize_and_validate(tmp_path, tiny_gguf):
    src = tmp_path / "m-f32.gguf"
    src.write_bytes(tiny_gguf.read_bytes())
    r = _cli("quantize", str(src), "--quant", "q8_0", root=tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ggufs"] == [str(tmp_path / "m-Q8_0.gguf")]
    r = _cli("quantize", str(src), "--quant", "Q8_0", root=tmp_path / "ws")
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = _cli("validate", str(tmp_path / "m-Q8_0.gguf"), root=tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    items = {i["name"]: i for i in json.loads(r.stdout)["items"]}
    assert items["loads"]["ok"] is True and items["perplexity"]["ok"] is True
    r = _cli("run", str(tmp_path / "nowhere"), root=tmp_path / "ws")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
