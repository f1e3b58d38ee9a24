"""Export validation results made visible: the generation check's collapse heuristic (`degenerate`), failed checks
in list_exports / export_details, the GGUF picker's labels and preselection, and the Export tab's progress panel
and table (handlers called directly on a workspace whose export folder is written here: no model is run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import export as ex
from pipelines.export.validate import degenerate
from pipelines.jobs import JobStatus

# ------------------------------------------------------------------------------------------ collapsed text


@pytest.mark.parametrize("ids,text,why", [
    ([], "", "empty"),
    ([5, 6], "  \n ", "empty"),
    ([7] * 12, "the the the the the the the the the the the the", "repeated-token"),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "sea sea sea sea sea the a an sea sea", "one word repeated"),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], None, "low variety"),
    ([9, 8, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45,
      1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5],
     None, "loops"),
])
def test_degenerate_output_is_caught(ids, text, why):
    assert why in (degenerate(ids, text) or ""), degenerate(ids, text)


def test_degenerate_as_seen_from_a_q4_k_m_that_lost_its_fine_tune():
    """Two answers of the quick start's Q4_K_M export (bench figures in the README)."""
    text = "2 + 2 = 4\n4 = 4\n4 = 4\n4 = 4\n4 = 4\n4 = 4"
    assert "one word repeated" in degenerate(list(range(20)), text)
    assert "said back" in degenerate([1, 2, 3, 4, 5, 6, 7], "Write one sentence about the sea.",
                                     prompt="Write one sentence about the sea.")
    assert degenerate([1, 2, 3, 4, 5, 6], "2 + 2 = 4.", prompt="What is 2 + 2?") is None


@pytest.mark.parametrize("ids,text", [
    ([42], "4"),
    ([10, 11, 12, 13], "Red, blue, green."),
    (list(range(100, 132)), "The sea is calm today, and the boats rock gently in the harbour while gulls circle."),
    ([1, 50, 2, 50, 3, 50, 4, 50, 5, 50, 6, 50], "1, 2, 3, 4, 5, 6"),
])
def test_ordinary_answers_pass(ids, text):
    assert degenerate(ids, text) is None


# ------------------------------------------------------------------------------------------ failed checks


def _item(name, ok):
    return {"name": name, "ok": ok, "detail": f"{name} detail"}


def _fake_export(ws, name="tune", lost=("Q4_K_M",)) -> Path:
    """exports/<name>/ with an f16, a Q8_0 and a Q4_K_M 'GGUF' (magic only), each validated; the types in `lost`
    failed finetune_survived."""
    d = ws.exports / name
    d.mkdir(parents=True)
    vals = []
    for t in ("f16", "Q8_0", "Q4_K_M"):
        g = d / f"{name}-{t}.gguf"
        g.write_bytes(b"GGUF" + b"\0" * 16)
        items = [_item("loads", True), _item("generation", True), _item("finetune_survived", t not in lost)]
        v = {"gguf": str(g), "ok": t not in lost, "items": items, "table": [], "seconds": 1.0}
        g.with_name(f"{g.stem}.validation.json").write_text(json.dumps(v))
        vals.append(v)
    (d / "export.json").write_text(json.dumps({"name": name, "created": "2026-01-01T00:00:00", "validations": vals,
                                               "table": [], "steps": []}))
    return d


def test_failed_checks_in_list_and_details(workspace):
    _fake_export(workspace)
    (row,) = ex.list_exports(workspace)
    assert row["ok"] is False and row["problems"] == "1 check failed: fine-tune survived (Q4_K_M)"
    by_type = {g["type"]: g for g in row["ggufs"]}
    assert by_type["Q4_K_M"]["failed"] == ["fine-tune survived"] and by_type["Q8_0"]["ok"] is True
    d = ex.export_details(workspace, "tune")
    q4 = next(g for g in d["gguf_files"] if g["type"] == "Q4_K_M")
    assert q4["label"] == "tune-Q4_K_M.gguf · ⚠ fine-tune lost" and q4["ok"] is False
    assert ex.preferred_gguf(d["gguf_files"])["type"] == "Q8_0"  # not the smallest: its fine-tune is lost


def test_picker_labels_and_preselection(workspace):
    _fake_export(workspace)
    _fake_export(workspace, "all-lost", lost=("f16", "Q8_0", "Q4_K_M"))
    _fake_export(workspace, "all-good", lost=())
    labels = dict((p, label) for label, p in ex.gguf_choices(workspace))
    assert labels[str(workspace.exports / "tune" / "tune-Q4_K_M.gguf")].endswith("⚠ fine-tune lost")
    assert labels[str(workspace.exports / "tune" / "tune-Q8_0.gguf")] == "tune-Q8_0.gguf"
    rows = {r["name"]: r for r in ex.list_exports(workspace)}
    assert ex.preferred_gguf(rows["all-good"]["ggufs"])["type"] == "Q4_K_M"
    assert ex.preferred_gguf(rows["all-lost"]["ggufs"])["type"] == "Q4_K_M"  # none passes: the usual choice
    assert ex.gguf_label("x.gguf", ["generation", "chat template"]) == \
        "x.gguf · ⚠ generation failed, ⚠ chat template failed"
    # a later single `validate` rewrites the file's validation.json: the list follows it
    v = json.loads((workspace.exports / "tune" / "tune-Q4_K_M.validation.json").read_text())
    v["items"][-1]["ok"] = True
    (workspace.exports / "tune" / "tune-Q4_K_M.validation.json").write_text(json.dumps(v))
    assert next(r for r in ex.list_exports(workspace) if r["name"] == "tune")["problems"] == ""


# ------------------------------------------------------------------------------------------ the Export tab


@pytest.fixture
def ctx(workspace):
    from pipelines.serving.registry import ModelRegistry
    from studio.handlers.common import Context

    return Context(workspace, ModelRegistry(), prepare_hf=False)


def test_progress_panel_and_table_warn(ctx, workspace):
    from studio.handlers import export as hx

    _fake_export(workspace)
    st = JobStatus(name="j1", label="tune", state="finished", message="Export 'tune' ready", extra={"step": "run"},
                   result={"ok": False, "problems": "1 check failed: fine-tune survived (Q4_K_M)"})
    md = hx._job_md(st)
    assert "⚠️ done — 1 check failed: fine-tune survived (Q4_K_M)" in md and "✅" not in md
    good = JobStatus(name="j1", label="tune", state="finished", extra={"step": "run"},
                     result={"ok": True, "problems": ""})
    assert "✅ finished" in hx._job_md(good)
    table = hx.exports_table(ctx, None, read=False)
    assert table.iloc[0]["validation"] == "⚠️ 1 check failed: fine-tune survived (Q4_K_M)"
    _summary, _ppl, checks, pick = hx.ExportHandlers(ctx).details("tune")
    assert pick["value"].endswith("tune-Q8_0.gguf")
    assert ("tune-Q4_K_M.gguf · ⚠ fine-tune lost", str(workspace.exports / "tune" / "tune-Q4_K_M.gguf")) \
        in [tuple(c) for c in pick["choices"]]
    assert "fine-tune survived" in set(checks["check"]) and "⚠️ 1 check failed" in _summary


def test_progress_caption_of_a_finished_job_with_a_failed_check(ctx, workspace, monkeypatch):
    from studio.handlers import export as hx

    st = JobStatus(name="j1", label="tune", state="finished", message="Export 'tune' ready", fraction=1.0,
                   extra={"step": "run"}, result={"ok": False, "problems": "1 check failed: fine-tune survived (Q4_K_M)"})
    monkeypatch.setattr(hx.export_job, "list_jobs", lambda _ws: [st])
    _job, bar, job_md, *_rest = hx._view(ctx, hx._pick_job(ctx, "j1"), None, "")
    assert "⚠️ done — 1 check failed: fine-tune survived" in bar and "finished ·" not in bar
    assert "⚠️ done" in job_md
    vst = JobStatus(name="j2", label="x", state="finished", extra={"step": "validate"},
                    result={"gguf": "/w/x-Q4_K_M.gguf", "items": [_item("finetune_survived", False)]})
    assert hx.job_problems(vst) == "1 check failed: fine-tune survived (x-Q4_K_M.gguf)"
