"""pipelines.follow: job folders read from byte offsets (only the appended bytes; a line being written waits; a
replaced file starts again) and the followers that yield each change and end with the job."""

from __future__ import annotations

import json

from pipelines import follow
from pipelines.jobs import JobQueue


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


def test_follow_job_yields_changes_and_ends_with_the_job(tmp_path):
    q = JobQueue(tmp_path / "jobs", "export", "export")
    j = q.job("j1")
    j.path.mkdir(parents=True)
    j.write({"state": "running", "fraction": 0.1, "message": "converting", "pid": None})
    j.log_path.write_text("start\n")
    gen = follow.follow_job(q, "j1", interval=0.05)
    first = next(gen)
    # no live pid: the queue's status notices a dead process and calls the job failed - that is final
    assert first["state"] == "failed" and first["final"] and first["log"] == "start\n"
    assert list(gen) == []


def test_follow_job_streams_a_live_job(tmp_path):
    import os

    import psutil

    q = JobQueue(tmp_path / "jobs", "export", "export")
    j = q.job("j2")
    j.path.mkdir(parents=True)
    live = {"pid": os.getpid(), "create_time": psutil.Process().create_time()}
    j.write({"state": "running", "fraction": 0.1, "message": "converting", **live})
    gen = follow.follow_job(q, "j2", interval=0.05)
    assert next(gen)["message"] == "converting"
    j.update(fraction=0.5, message="quantizing")
    with open(j.log_path, "a") as fh:
        fh.write("quantize Q8_0\n")
    up = next(gen)
    assert up["fraction"] == 0.5 and up["log"] == "quantize Q8_0\n" and not up["final"]
    j.update(state="complete", fraction=1.0, message="done", result={"ok": True})
    last = next(gen)
    assert last["final"] and last["state"] == "complete" and json.dumps(last["result"]) == '{"ok": true}'
    assert list(gen) == []
