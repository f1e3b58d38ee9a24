"""Train tab, "Train on several machines": the commands that train the form's settings on N machines (torchrun,
accelerate launch, a SkyPilot task; pipelines.multinode_commands). Nothing is started or written here: the user runs
them on the machines, and the run then shows in the monitor like any other (its folder is in this workspace when
the workspace is the shared one)."""

from __future__ import annotations

import time
from typing import NamedTuple

from pipelines.errors import BadInput
from pipelines.jobs import slug
from pipelines.multinode_commands import DEFAULT_PORT, commands
from pipelines.training import validate

from .common import Context, ui_errors
from .train import config_from


class MultiCommandsView(NamedTuple):
    commands: str  # Markdown: torchrun and accelerate launch, per machine
    skypilot: str  # the SkyPilot task YAML


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadInput(f"{what} must be a whole number (got {value!r}).") from None


class MultiMachineHandlers:
    """The section's one event, for one workspace (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @ui_errors
    def multi_commands(self, run_name: str, machines, per_machine, head: str, port, accelerators: str,
                       *values) -> MultiCommandsView:
        """(Markdown with the torchrun and accelerate commands, the SkyPilot task YAML) for the form's config."""
        ws = self.ctx.ws
        cfg = validate(config_from(list(values)), ws)
        name = (run_name or "").strip() or f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(cfg.dataset, 'run')}"
        cmds = commands(str(ws.root / f"{name}.yaml"), _int(machines, "The number of machines"), run_name=name,
                        root=str(ws.root), head=(head or "").strip() or "HEAD_IP",
                        port=_int(port if port not in (None, "") else DEFAULT_PORT, "The port"),
                        nproc_per_node=_int(per_machine, "Processes per machine"), cfg=cfg,
                        accelerators=(accelerators or "").strip() or None)
        return MultiCommandsView(cmds.markdown(), cmds.skypilot)
