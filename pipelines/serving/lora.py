"""A LoRA adapter as it lies on disk, before any backend loads it: `read_lora_folder` checks a PEFT adapter folder
(adapter_config.json of a LoRA, safetensors weights - never a pickle) and `AdapterInfo` describes an adapter once a
backend has checked it against its model. Shared by every backend (pipelines.serving.backend) and
pipelines.adapters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BadInput, NotFound


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    peft_type: str
    rank: int | None
    target_modules: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoraFolder:
    """A PEFT LoRA adapter folder as read from disk (nothing loaded): its config and its weights file."""

    path: Path
    config: dict
    weights: Path

    def info(self, warnings: list[str] | None = None) -> AdapterInfo:
        targets = self.config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else list(targets)
        return AdapterInfo(name=self.path.name, path=str(self.path.resolve()),
                           base_model=self.config.get("base_model_name_or_path"), peft_type="LORA",
                           rank=self.config.get("r"), target_modules=sorted(map(str, targets)),
                           warnings=list(warnings or []))


def read_lora_folder(adapter_dir: str | Path) -> LoraFolder:
    """Check that `adapter_dir` is a PEFT LoRA folder with safetensors weights (NotFound / BadInput say what is
    wrong); nothing is loaded."""
    path = Path(str(adapter_dir)).expanduser()
    if not path.exists():
        raise NotFound(f"No adapter folder at {path} (the run or checkpoint may have been deleted).")
    if not path.is_dir():
        raise BadInput(f"{path} is a file; choose the adapter's folder (it holds adapter_config.json).")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise BadInput(f"{path.name} is not a PEFT adapter folder: it has no adapter_config.json.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"adapter_config.json in {path.name} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise BadInput(f"adapter_config.json in {path.name} is not a JSON object.")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise BadInput(f"{path.name} is a {peft_type or 'unknown'} adapter; MacTuner chats with LoRA adapters.")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        if any(path.glob("adapter_model.bin")) or any(path.glob("*.pt")):
            raise BadInput(f"{path.name} has its weights as a pickle file (adapter_model.bin), which could run code "
                           "when loaded; MacTuner only loads adapter_model.safetensors.")
        raise BadInput(f"{path.name} has no adapter_model.safetensors.")
    return LoraFolder(path=path, config=cfg, weights=weights)
