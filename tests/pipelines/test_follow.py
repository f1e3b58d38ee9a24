"""pipelines.follow: job folders read from byte offsets (only the appended bytes; a line being written waits; a
replaced file starts again) and the followers that yield each change and end with the job."""

from __future__ import annotations

import json

from pipelines import follow
from pipelines.jobs import JobDir, JobQueue, JobStatus


def test_read_new_reads_only_complete_appended_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    assert follow.read_new(p, 0) == (b"", 0)  # not written yet
    p.write_bytes(b'{"step": 1}\n{"step": 2')
    data, off = follow.read_new(p, 0)
    assert follow.json_lines(data) == [{"step": 1}] and off == 12  # the half-written line waits
    with open(p, "ab") as fh:
        fh.write(b'}\nnot json\n[1]\n')
    data, off2 = follow.read_new(p, off)
    assert follow.json_lines(data) == [{"step": 2}] and off2 == p.stat().st_size  # junk lines are skipped
    assert follow.read_new(p, off2) == (b"", off2)  # nothing new: nothing read
    p.write_bytes(b'{"step": 9}\n')  # replaced by a shorter file: read again from its start
    assert follow.json_lines(follow.read_new(p, off2)[0]) == [{"step": 9}]


def test_tail_offset_starts_at_a_line(tmp_path):
    p = tmp_path / "log.txt"
    assert follow.tail_offset(p) == 0
    p.write_text("".join(f"line {i}\n" for i in range(1000)))
    off = follow.tail_offset(p, 100)
    text = p.read_bytes()[off:].decode()
    assert len(text) <= 100 and text.startswith("line ") and text.endswith("line 999\n")


def _job(tmp_path, name, **status):
    q = JobQueue(tmp_path / "jobs", "export", "export")
    j = q.job(name)
    j.path.mkdir(parents=True)
    j.write(JobStatus(kind="export", **status))
    return q, j


def test_follow_yields_changes_and_ends_with_the_job(tmp_path):
    q, j = _job(tmp_path, "j1", state="running", fraction=0.1, message="converting")
    j.log_path.write_text("start\n")
    gen = follow.follow(j, lambda: q.status("j1"), interval=0.05)
    first = next(gen)
    # no live process and nobody recorded its end: it reads as interrupted - a final state
    assert first.status.state == "interrupted" and first.final and first.log == "start\n"
    assert list(gen) == []
    assert JobDir(j.path).read().state == "running"  # reading did not write


def test_follow_streams_a_live_job(tmp_path):
    import os

    import psutil

    q, j = _job(tmp_path, "j2", state="running", fraction=0.1, message="converting", pid=os.getpid(),
                create_time=psutil.Process().create_time())
    gen = follow.follow(j, lambda: q.status("j2"), interval=0.05)
    assert next(gen).status.message == "converting"
    j.update(fraction=0.5, message="quantizing")
    with open(j.log_path, "a") as fh:
        fh.write("quantize Q8_0\n")
    up = next(gen)
    assert up.status.fraction == 0.5 and up.log == "quantize Q8_0\n" and not up.final
    j.update(state="finished", fraction=1.0, message="done", result={"ok": True})
    last = next(gen)
    assert last.final and last.status.state == "finished" and json.dumps(last.status.result) == '{"ok": true}'
    assert last.to_dict()["status"]["state"] == "finished"
    assert list(gen) == []


def test_a_status_of_an_earlier_version_reads_in_todays_words(tmp_path):
    q, j = _job(tmp_path, "old")
    j.status_path.write_text(json.dumps({"state": "complete", "error": None, "label": "tiny", "step": "run",
                                         "fraction": 1.0, "result": {"ggufs": []}}))
    st = q.status("old")
    assert st.state == "finished" and st.final and st.extra["step"] == "run" and st.label == "tiny"
    j.status_path.write_text(json.dumps({"state": "failed", "error": "disk full", "pid": 1}))
    st = q.status("old")
    assert st.state == "failed" and st.reason == "disk full"
