"""Training on several machines (pipelines/multinode.py, multinode_commands.py, training/distributed.py): two
"machines" of one process each on this one, over loopback (torchrun's c10d rendezvous on 127.0.0.1, and accelerate
launch), against one process with the doubled batch; continuing on another number of machines where the global
batch allows it, refused with the reason where it does not; the machines' disagreement; the commands for N machines.

Tolerance: the two-machine run and the one-process run see the same items at each step and take the same token
mean, so they differ by float summation order only: adapter weights within 1e-5 (absolute), losses within 1e-5
(relative), after 4 AdamW steps at lr 1e-3 (measured: about 1e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import adapter_tensors, tiny_cfg, write_dataset

from pipelines import jobs, multinode, procs, runs
from pipelines.errors import BadInput
from pipelines.jobs import JobStatus
from pipelines.multinode_commands import commands
from pipelines.training import TrainConfig, distributed, run_training, validate

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture
def ws(workspace):
    write_dataset(workspace)
    return workspace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    drop = runs.DIST_ENV | {k for k in os.environ if k.startswith(("TORCHELASTIC_", "ACCELERATE_"))}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _two_machines(launcher: list[str], args: list[str], per_machine=None, timeout=300) -> list:
    """Start the launch as two "machines" (two launcher processes) of this one; wait for both."""
    procs_ = []
    for rank in range(2):
        extra = per_machine(rank) if per_machine else []
        procs_.append(subprocess.Popen([*launcher, *extra, *args], cwd=ROOT, env=_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    out = []
    try:
        for p in procs_:
            out.append((p.wait(timeout=timeout), p.stdout.read()))
    finally:
        for p in procs_:
            if p.poll() is None:
                p.kill()
    return out


def torchrun_two(ws, config: Path, name: str, cmd: str = "train") -> list:
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name]
    args = (["-m", "pipelines.cli", "train", str(config), "--root", str(ws.root), "--name", name] if cmd == "train"
            else ["-m", "pipelines.cli", "resume", name, "--root", str(ws.root)])
    return _two_machines(launcher, args, lambda r: ["--node-rank", str(r)])


def _losses(run: runs.RunDir) -> list[float]:
    rows, _ = runs.read_metrics(run, 0)
    out = {}
    for r in rows:
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return [out[k] for k in sorted(out)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------------- two machines


@pytest.mark.slow
def test_two_machines_equal_one_process_with_the_doubled_batch_and_continue_on_one(ws, tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, batch_size=1, max_steps=4, save_every=2, eval_every=2)
    config = tmp_path / "train.yaml"
    cfg.to_yaml(config)

    t0 = time.time()
    out = torchrun_two(ws, config, "two")
    two_s = time.time() - t0
    assert [rc for rc, _ in out] == [0, 0], "\n".join(o[-3000:] for _, o in out)
    two = runs.get_run(ws, "two")
    st = two.status()
    assert st.state == "finished" and st.nnodes == 2 and st.world_size == 2, st
    assert "batch 1x1x2" in two.log_path.read_text()  # rank 0's output is in log.txt
    assert [p.name for p in two.checkpoints()] == ["step-2"]
    state = json.loads((two.checkpoints_dir / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["steps_per_epoch"] == 6
    two_losses, two_adapter = _losses(two), adapter_tensors(two.adapter_dir)
    assert len(two_losses) == 4

    # one process, the batch doubled: the same items at each step, the same token mean
    t0 = time.time()
    rows: list[dict] = []
    one_cfg = validate(tiny_cfg(tiny_llama_dir, batch_size=2, max_steps=4, eval_every=2), ws)
    run_training(one_cfg, ws.runs / "one", rows.append, ws=ws, validated=True)
    one_s = time.time() - t0
    one_losses = [r["loss"] for r in rows]
    for a, b in zip(two_losses, one_losses):
        assert abs(a - b) <= TOL * abs(b), (two_losses, one_losses)
    diff = _max_diff(two_adapter, adapter_tensors(ws.runs / "one" / "adapter"))
    assert diff <= TOL, diff
    print(f"\n2 machines {two_s:.1f} s with the processes' start ({st.reason}), 1 process in this one "
          f"{one_s:.1f} s; max adapter difference {diff:.2e}, losses {two_losses} vs {one_losses}")

    # continue the two-machine run on one machine, one process: grad_accum 2 keeps the global batch of 2
    shutil.copytree(two.adapter_dir, tmp_path / "two-adapter")
    runs.resume(ws, two, "step-2")
    st = jobs.wait(two, timeout=300)
    assert st.state == "finished", (st, two.log_tail())
    log = two.log_tail()
    assert "Resuming on 1 process" in log and "batch_size 1 x grad_accum 2 x 1 process" in log, log
    assert "batch 1x2x1" in log
    assert _losses(two)[2:] == pytest.approx(two_losses[2:], rel=TOL)
    diff = _max_diff(adapter_tensors(two.adapter_dir), adapter_tensors(tmp_path / "two-adapter"))
    assert diff <= TOL, diff


@pytest.mark.slow
@pytest.mark.heavy  # launches two trainers; the refusal itself: test_fit_to_world_refuses_with_the_reason
def test_continue_on_two_machines_refused_when_the_global_batch_cannot_be_shared(ws, tiny_llama_dir, tmp_path):
    """A run of global batch 1 (one process, batch 1) cannot go on over two processes; the run says why."""
    cfg = tiny_cfg(tiny_llama_dir, batch_size=1, max_steps=3, save_every=1)
    run = runs.create_run(ws, cfg, name="solo")
    run.update(state="stopped", reason="test")
    run_training(validate(cfg, ws), run.path, None, ws=ws, validated=True, should_stop=lambda: True)
    assert [p.name for p in run.checkpoints()] == ["step-1"]
    config = tmp_path / "train.yaml"
    cfg.to_yaml(config)
    out = torchrun_two(ws, config, "solo")
    assert all(rc != 0 for rc, _ in out), out
    st = run.status()
    assert st.state == "failed", st
    assert "Cannot resume on 2 processes" in st.reason and "global batch of 1" in st.reason, st.reason
    assert "Resume on 1 process, or start a new run" in st.reason


@pytest.mark.slow
def test_accelerate_launch_two_machines(ws, tiny_llama_dir, tmp_path):
    pytest.importorskip("accelerate")
    cfg = tiny_cfg(tiny_llama_dir, batch_size=1, max_steps=2)
    config = tmp_path / "train.yaml"
    cfg.to_yaml(config)
    port = _free_port()
    cmds = commands(str(config), 2, run_name="acc", root=str(ws.root), head="127.0.0.1", port=port)
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(cmds.accelerate_config)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg)]
    args = ["-m", "pipelines.cli", "train", str(config), "--root", str(ws.root), "--name", "acc"]
    out = _two_machines(launcher, args, lambda r: ["--machine_rank", str(r)])
    assert [rc for rc, _ in out] == [0, 0], "\n".join(o[-3000:] for _, o in out)
    run = runs.get_run(ws, "acc")
    assert run.status().state == "finished" and run.status().world_size == 2
    rows: list[dict] = []
    run_training(validate(tiny_cfg(tiny_llama_dir, batch_size=2, max_steps=2), ws), ws.runs / "one", rows.append,
                 ws=ws, validated=True)
    assert _losses(run) == pytest.approx([r["loss"] for r in rows], rel=TOL)
    assert _max_diff(adapter_tensors(run.adapter_dir), adapter_tensors(ws.runs / "one" / "adapter")) <= TOL


@pytest.mark.slow
@pytest.mark.heavy  # launches two trainers; the check itself: test_disagreements_name_the_machine_and_the_setting
def test_machines_that_disagree_stop_with_one_message(ws, tiny_llama_dir, tmp_path):
    """Each "machine" gets its own config file; one says another learning rate: both stop, naming the setting."""
    configs = []
    for rank, lr in enumerate((1e-3, 2e-3)):
        configs.append(tmp_path / f"train-{rank}.yaml")
        tiny_cfg(tiny_llama_dir, batch_size=1, max_steps=2, learning_rate=lr).to_yaml(configs[-1])
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dis"]
    out = _two_machines(launcher, [], lambda r: ["-m", "pipelines.cli", "train", str(configs[r]), "--root",
                                                 str(ws.root), "--name", "dis"])
    assert all(rc != 0 for rc, _ in out)
    for _rc, text in out:
        assert "The machines disagree about this run: rank 1 on" in text and "setting learning_rate" in text, text
    assert not (ws.runs / "dis").exists()  # nothing was written
    # a machine without the config file: both stop at once, saying which one (not a wait for the timeout)
    port = _free_port()
    launcher[launcher.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{port}"
    configs[1] = tmp_path / "missing.yaml"
    t0 = time.time()
    out = _two_machines(launcher, [], lambda r: ["-m", "pipelines.cli", "train", str(configs[r]), "--root",
                                                 str(ws.root), "--name", "dis"], timeout=120)
    assert all(rc != 0 for rc, _ in out) and time.time() - t0 < 120
    for _rc, text in out:
        assert "missing.yaml" in text and "rank 1 of 2)" in text, text


# ------------------------------------------------------------------------------------------------- pure parts


def _state(batch=2, accum=1, world=1, total=8, spe=6, step=2) -> dict:
    return {"config": {"batch_size": batch, "grad_accum": accum}, "world_size": world, "total_steps": total,
            "steps_per_epoch": spe, "step": step, "epoch": step / spe}


def test_fit_to_world_keeps_the_global_batch():
    cfg = TrainConfig(batch_size=2, grad_accum=1, max_steps=8)
    same, note = distributed.fit_to_world(cfg, _state(world=2, spe=3), 2, n_items=12)
    assert (same.batch_size, same.grad_accum, note) == (2, 1, "")
    fewer, note = distributed.fit_to_world(cfg, _state(world=4, spe=2), 2, n_items=12)  # global 8 on 2
    assert (fewer.batch_size, fewer.grad_accum) == (2, 2) and "keeps the global batch of 8" in note
    more, note = distributed.fit_to_world(cfg, _state(world=1, spe=6), 2, n_items=12)  # global 2 on 2: batch 1
    assert (more.batch_size, more.grad_accum) == (1, 1) and "Resuming on 2 processes" in note
    odd, _ = distributed.fit_to_world(TrainConfig(batch_size=4, max_steps=8), _state(batch=6, world=1, spe=2), 2, 12)
    assert (odd.batch_size, odd.grad_accum) == (3, 1)  # 6 per step on 2 processes: 3 each


def test_fit_to_world_refuses_with_the_reason():
    cfg = TrainConfig(batch_size=1, max_steps=8)
    with pytest.raises(BadInput) as e:
        distributed.fit_to_world(cfg, _state(batch=1, world=1), 2, n_items=12)
    assert "global batch of 1" in str(e.value) and "cannot share evenly" in str(e.value)
    with pytest.raises(BadInput) as e:
        distributed.fit_to_world(TrainConfig(batch_size=2), _state(batch=2, world=1, spe=6), 3, n_items=12)
    assert "global batch of 2" in str(e.value) and "Resume on 1 or 2 processes in all (they divide 2)" in str(e.value)
    # keeping the global batch keeps ceil(items / global batch) steps per epoch; a checkpoint that counted otherwise
    # (its items were not these) is refused rather than continued at another place in the data
    epochs = TrainConfig(batch_size=1, max_steps=0, epochs=1.0)
    with pytest.raises(BadInput) as e:
        distributed.fit_to_world(epochs, _state(batch=1, accum=2, world=1, spe=7, total=7), 2, n_items=15)
    assert "would take 8 steps instead of the checkpoint's 7" in str(e.value)


def test_disagreements_name_the_machine_and_the_setting():
    facts = [{"host": "a", "setting rank": "1", "dataset": "x"}, {"host": "b", "setting rank": "1", "dataset": "x"},
             {"host": "c", "setting rank": "2", "dataset": "y"}]
    assert distributed.disagreements(facts[:2]) == []
    assert distributed.disagreements(facts) == ["rank 2 on c has a different dataset, setting rank than rank 0 on a"]


def test_a_trainer_on_another_machine_is_alive_while_its_heartbeat_is_fresh():
    now = time.time()
    assert JobStatus(pid=1, host="elsewhere.example", heartbeat=now - 10).alive()
    assert not JobStatus(pid=1, host="elsewhere.example", heartbeat=now - procs.REMOTE_STALE_S - 1,
                         updated=now - procs.REMOTE_STALE_S - 1).alive()
    assert JobStatus(pid=os.getpid(), host=socket.gethostname()).alive()


def test_launched_reads_the_launchers_variables(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not multinode.launched()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert multinode.launched()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert multinode.Rank.from_env().nnodes == 2 and multinode.Rank.from_env().rank == 3


def test_commands_for_three_machines(ws, tiny_llama_dir):
    cfg = validate(tiny_cfg(tiny_llama_dir), ws)
    cmds = commands("/shared/ws/train.yaml", 3, run_name="big", root="/shared/ws", head="10.0.0.1", port=29400,
                    nproc_per_node=2, cfg=cfg, accelerators="L4:2")
    flat = cmds.torchrun.replace("\\\n", " ").split()
    for a, b in (("--nnodes", "3"), ("--nproc-per-node", "2"), ("--rdzv-backend", "c10d"),
                 ("--rdzv-endpoint", "10.0.0.1:29400"), ("--rdzv-id", "big"), ("--name", "big"),
                 ("--root", "/shared/ws")):
        assert flat[flat.index(a) + 1] == b, cmds.torchrun
    assert flat[flat.index("-m") + 1:flat.index("-m") + 4] == ["pipelines.cli", "train", "/shared/ws/train.yaml"]
    acc = yaml.safe_load(cmds.accelerate_config)
    assert acc["num_machines"] == 3 and acc["num_processes"] == 6 and acc["main_process_ip"] == "10.0.0.1"
    assert acc["distributed_type"] == "MULTI_GPU" and acc["main_process_port"] == 29400
    assert [c.split("--machine_rank")[1].split()[0] for c in cmds.accelerate] == ["0", "1", "2"]
    sky = yaml.safe_load(cmds.skypilot)
    assert sky["num_nodes"] == 3 and sky["resources"] == {"accelerators": "L4:2"} and sky["workdir"] == "."
    assert sky["file_mounts"] == {"~/mactuner/datasets/chat/v1": "/shared/ws/datasets/chat/v1",
                                  f"~/mactuner/models/{tiny_llama_dir.name}": str(tiny_llama_dir)}
    assert "$SKYPILOT_NODE_RANK" in sky["run"] and "$SKYPILOT_NODE_IPS" in sky["run"]
    assert "--nproc-per-node 2" in sky["run"]
    config_text = sky["setup"].split("<<'MACTUNER_CONFIG'\n")[1].split("MACTUNER_CONFIG")[0]
    remote = TrainConfig.from_yaml(config_text)
    assert remote.base_model == tiny_llama_dir.name
    assert remote.to_dict() | {"base_model": cfg.base_model} == cfg.to_dict()
    assert "rsync" in cmds.skypilot and "big" in cmds.markdown() and "accelerate.yaml" in cmds.markdown()
    with pytest.raises(BadInput, match="between 2 and 1024"):
        commands("c.yaml", 1, run_name="x", root="/w")
    with pytest.raises(BadInput, match="same one"):
        commands("c.yaml", 2, run_name="", root="/w")


def test_accelerate_reads_the_config_file(tmp_path):
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    f = tmp_path / "accelerate.yaml"
    f.write_text(commands("c.yaml", 2, run_name="r", root="/w", head="10.1.2.3").accelerate_config)
    loaded = config_args.load_config_from_file(str(f))
    assert loaded.num_machines == 2 and loaded.main_process_ip == "10.1.2.3" and loaded.rdzv_backend == "static"


def test_cli_prints_the_commands_for_n_machines(ws, tiny_llama_dir, tmp_path, capsys):
    from pipelines import cli

    config = tmp_path / "train.yaml"
    tiny_cfg(tiny_llama_dir).to_yaml(config)
    args = ["train", str(config), "--root", str(ws.root), "--machines", "2", "--head", "10.0.0.1"]
    assert cli.main([*args, "--name", "big"]) == 0
    out = capsys.readouterr().out
    assert "--rdzv-endpoint 10.0.0.1:29500" in out and "--machine_rank 1" in out and "num_nodes: 2" in out
    assert yaml.safe_load(out.split("# or a SkyPilot task (sky launch -c mactuner TASK.yaml):\n")[1])["num_nodes"] == 2
    assert not (ws.runs / "big").exists()  # printed, nothing started
    assert cli.main(args) == 1 and "Give the run a name" in capsys.readouterr().err
