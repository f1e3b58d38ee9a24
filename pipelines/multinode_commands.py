"""The commands that train one config on N machines (the Train tab's "Train on several machines", `mactuner train
CONFIG.yaml --machines N`): pure text, nothing is run or written.

    cmds = commands("/shared/mactuner/train.yaml", 2, run_name="big-run", root="/shared/mactuner", head="10.0.0.1")
    cmds.torchrun            # the same command on every machine (c10d rendezvous on the head's port)
    cmds.accelerate_config   # accelerate's config file (YAML), the same on every machine
    cmds.accelerate          # `accelerate launch ...` for machine 0, 1, ... (each its --machine_rank)
    cmds.skypilot            # a SkyPilot task YAML that rents the N machines and runs the same (`sky launch`)

Each one runs `mactuner train CONFIG.yaml --root WS --name RUN` under the launcher on every machine; pipelines/
multinode.py is what that does there (the workspace on a shared filesystem; rank 0 writes the run folder).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BadInput
from .training import TrainConfig

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class MultiNodeCommands:
    nnodes: int
    nproc_per_node: int
    run_name: str
    config_path: str
    torchrun: str
    accelerate_config: str
    accelerate: list[str]
    skypilot: str

    def markdown(self) -> str:
        """The commands explained, for the Train tab (the SkyPilot YAML is shown beside it)."""
        acc = "\n".join(f"# machine {i}\n{c}" for i, c in enumerate(self.accelerate))
        return (f"**{self.nnodes} machines x {self.nproc_per_node} process(es), run `{self.run_name}`.** Before: "
                "the workspace on a filesystem every machine mounts at the same path, MacTuner installed on each, "
                f"the config saved as `{self.config_path}` (the YAML of *Config as YAML / command line*), and the "
                "port open between the machines. Rank 0 writes the run folder; this studio shows it like any "
                "run.\n\n"
                f"**torchrun** - the same command on every machine:\n\n```bash\n{self.torchrun}\n```\n\n"
                "**accelerate launch** - save this as `accelerate.yaml` next to the config:\n\n"
                f"```yaml\n{self.accelerate_config}```\n\nthen on each machine:\n\n```bash\n{acc}\n```\n\n"
                "**Rent the machines with SkyPilot** - save the task below as `mactuner-task.yaml` and run `sky "
                "launch -c mactuner mactuner-task.yaml` from your MacTuner folder; the run folder ends on machine "
                "0 (copy it back with the rsync line at its top), then `sky down mactuner`.\n\n"
                "Continue a stopped run: the same command again (it picks up the latest checkpoint), on this or "
                "another number of machines when the global batch allows (the run says why not otherwise).")


def _check(nnodes: int, nproc_per_node: int, run_name: str, port: int) -> None:
    if not isinstance(nnodes, int) or not 2 <= nnodes <= 1024:
        raise BadInput(f"The number of machines must be between 2 and 1024 (got {nnodes}); on one machine use "
                       "Start training (or --nproc for several processes).")
    if not isinstance(nproc_per_node, int) or not 1 <= nproc_per_node <= 64:
        raise BadInput(f"Processes per machine must be between 1 and 64 (got {nproc_per_node}).")
    if not run_name or any(c in run_name for c in "/\\ ") or run_name.startswith("."):
        raise BadInput("Give the run a name (letters, digits, . _ -): every machine must use the same one.")
    if not 1 <= int(port) <= 65535:
        raise BadInput(f"{port} is not a port number.")


def _trainer_args(config_path: str, root: str, run_name: str) -> list[str]:
    return ["-m", "pipelines.cli", "train", str(config_path), "--root", str(root), "--name", run_name]


def commands(config_path: str, nnodes: int, *, run_name: str, root: str, head: str = "HEAD_IP",
             port: int = DEFAULT_PORT, nproc_per_node: int = 1, cfg: TrainConfig | None = None,
             accelerators: str | None = None) -> MultiNodeCommands:
    """The torchrun, accelerate and SkyPilot forms of one launch on `nnodes` machines of `nproc_per_node` processes
    each. `cfg` (validated: absolute base model path, concrete dataset version) goes into the SkyPilot task, which
    copies the dataset version and a local base model to the rented machines; `accelerators` e.g. "L4:1"."""
    _check(nnodes, nproc_per_node, run_name, port)
    if cfg is not None and cfg.backend == "mlx":
        from .training.mlx.support import ONE_PROCESS  # noqa: PLC0415

        raise BadInput(ONE_PROCESS)
    trainer = _trainer_args(config_path, root, run_name)
    torchrun = ["torchrun", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node), "--rdzv-backend",
                "c10d", "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", run_name, *trainer]
    acc_cfg = (f"# accelerate's config: {nnodes} machines x {nproc_per_node} process(es); every machine passes its "
               "own --machine_rank\ncompute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU  # CPU "
               "machines too: it starts torchrun, MacTuner picks gloo there\n"
               f"num_machines: {nnodes}\nnum_processes: {nnodes * nproc_per_node}\nmachine_rank: 0\n"
               f"main_process_ip: {head}\nmain_process_port: {port}\nrdzv_backend: static\nsame_network: true\n"
               "gpu_ids: all\nuse_cpu: false\nmixed_precision: 'no'  # MacTuner picks the dtype (the config's "
               "dtype)\n")
    accelerate = [_join(["accelerate", "launch", "--config_file", "accelerate.yaml", "--machine_rank", str(i),
                         *trainer]) for i in range(nnodes)]
    sky = skypilot_task(nnodes, run_name=run_name, cfg=cfg, root=root, port=port, nproc_per_node=nproc_per_node,
                        accelerators=accelerators)
    return MultiNodeCommands(nnodes, nproc_per_node, run_name, str(config_path), _join(torchrun), acc_cfg,
                             accelerate, sky)


def _join(args: list[str]) -> str:
    """A shell line, broken before each option so that it reads in a narrow box."""
    out, line = [], []
    for a in args:
        if a.startswith("-") and line and line[-1] != "-m" and len(" ".join(line)) > 40:
            out.append(" ".join(line))
            line = []
        line.append(shlex.quote(a))
    out.append(" ".join(line))
    return " \\\n    ".join(out)


REMOTE_ROOT = "~/mactuner"


def skypilot_task(nnodes: int, *, run_name: str, cfg: TrainConfig | None, root: str, port: int = DEFAULT_PORT,
                  nproc_per_node: int = 1, accelerators: str | None = None) -> str:
    """A SkyPilot task YAML: `num_nodes` machines, this checkout as workdir, the dataset version (and a local base
    model) copied to ~/mactuner on each, the config written there; every machine runs torchrun with the static
    rendezvous on the first IP of $SKYPILOT_NODE_IPS and its $SKYPILOT_NODE_RANK, so machine 0 has rank 0 and the
    run folder."""
    mounts, setup = [], ["pip install -e .  # MacTuner on every machine (llama-cpp-python builds: minutes)",
                         f"mkdir -p {REMOTE_ROOT}"]
    config_text = ""
    if cfg is not None:
        remote_cfg = cfg
        if cfg.dataset and cfg.dataset_version:
            sub = f"datasets/{cfg.dataset}/v{cfg.dataset_version}"
            mounts.append((f"{REMOTE_ROOT}/{sub}", str(Path(root) / sub)))
        base = Path(cfg.base_model).expanduser()
        if base.is_absolute():  # a local folder: copied to the machines' models/, named relative to it
            mounts.append((f"{REMOTE_ROOT}/models/{base.name}", str(base)))
            remote_cfg = replace(cfg, base_model=base.name)
        elif cfg.base_model not in ("", "default"):
            setup.append(f"python -m pipelines.cli download {shlex.quote(cfg.base_model)}  # into the HF cache")
        config_text = remote_cfg.to_yaml()
    if config_text:
        setup.append(f"cat > {REMOTE_ROOT}/train.yaml <<'MACTUNER_CONFIG'")
        setup += config_text.rstrip("\n").splitlines()
        setup.append("MACTUNER_CONFIG")
    else:
        setup.append(f"# put the config at {REMOTE_ROOT}/train.yaml (file_mounts) with its dataset and base model")
    run = ['HEAD=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
           f'python -m torch.distributed.run --nnodes "$SKYPILOT_NUM_NODES" --nproc-per-node {nproc_per_node} \\',
           f'  --node-rank "$SKYPILOT_NODE_RANK" --master-addr "$HEAD" --master-port {port} \\',
           f"  -m pipelines.cli train {REMOTE_ROOT}/train.yaml --root {REMOTE_ROOT} --name {shlex.quote(run_name)}"]
    resources = f"  accelerators: {accelerators}" if accelerators else "  cpus: 8+  # or accelerators: L4:1"
    lines = ["# SkyPilot: sky launch -c mactuner mactuner-task.yaml (in the MacTuner folder); the run ends on",
             "# machine 0, copy it back and stop the machines:",
             f"#   rsync -Pavz mactuner:{REMOTE_ROOT}/runs/{run_name} {Path(root) / 'runs'}/ && sky down mactuner",
             f"name: mactuner-{run_name}", f"num_nodes: {nnodes}", "resources:", resources, "workdir: ."]
    if mounts:
        lines.append("file_mounts:")
        lines += [f"  {dst}: {src}" for dst, src in mounts]
    lines.append("setup: |")
    lines += [f"  {line}" if line else "" for line in setup]
    lines.append("run: |")
    lines += [f"  {line}" for line in run]
    return "\n".join(lines) + "\n"
