"""The studio process itself dying (kill -9) loses nothing: a training run it started goes on to the end in its own
process, the model workers it started exit instead of lingering, and a new studio on the same workspace shows the
run finished with its adapter. (The transformers backend stays in the studio's process - see the README's Serving
section - so this is what a crash there costs.)"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests

from studio_process import start_studio, stop_studio

pytestmark = pytest.mark.slow


def test_kill_9_of_the_studio_loses_no_run_and_leaves_no_worker(tmp_path, tiny_llama_dir):
    from gradio_client import Client

    from pipelines import data, jobs, runs
    from pipelines.workspace import Workspace
    from studio.handlers.train import form_values
    from pipelines.training import TrainConfig

    ws = Workspace.open(tmp_path / "ws")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} ok"}]}
            for i in range(16)]
    data.save_dataset(ws, "crash-set", rows, {"source": "test"}, val_ratio=0.2)
    proc, url = start_studio(ws.root)
    try:
        t0 = time.time()
        while not requests.get(url + "/api/model/current", timeout=10).json()["loaded"] and time.time() - t0 < 90:
            time.sleep(0.2)
        worker = requests.get(url + "/api/model/current", timeout=10).json()["model"]["worker"]["pid"]
        cfg = TrainConfig(base_model=str(tiny_llama_dir), dataset="crash-set", max_steps=40, batch_size=2,
                          max_length=64, save_every=10, learning_rate=1e-3)
        Client(url, verbose=False).predict("survivor", *form_values(cfg), api_name="/train_start")
        run = runs.get_run(ws, "survivor")
        t0 = time.time()
        while run.status().state != "running" and time.time() - t0 < 60:
            time.sleep(0.2)
        trainer = run.status().pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert psutil.Process(trainer).is_running()  # the run goes on without the studio
        t0 = time.time()
        while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE \
                and time.time() - t0 < 10:
            time.sleep(0.1)
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        st = jobs.wait(run, timeout=240)
        assert st.state == "finished", st
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = start_studio(ws.root, args=["--no-default"])
    try:
        listed = {r["name"]: r for r in Client(url, verbose=False).predict(api_name="/train_runs")}
        assert listed["survivor"]["state"] == "finished" and listed["survivor"]["step"] == 40
        assert (ws.runs / "survivor" / "adapter" / "adapter_config.json").is_file()
    finally:
        stop_studio(proc)
