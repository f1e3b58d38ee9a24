"""The MLX training backend (Apple's MLX + mlx-lm): the same run folder, metrics rows, stop / resume, checkpoints,
PEFT adapter and verdict as the torch trainer, from the same encoded rows. Chosen by `backend: mlx` (or `auto` on
Apple silicon with mlx-lm installed; device.choose_backend); training.run_training dispatches to `run_training`.

    support.py     what MLX cannot take (refused by config.validate with the torch alternative); the model config
                   as mlx-lm reads it (transformers 5's rope_parameters as the flat keys mlx-lm expects)
    model.py       the base loaded by mlx-lm, cast, optionally quantized to 4 / 8 bits (nn.quantize), mlx-lm's LoRA /
                   DoRA layers (linear_to_lora_layers), trainable embedding rows, the adapter switched off, LossParts
    objectives.py  SFTObjective, PreferenceObjective (DPO / ORPO): step -> StepOutput, evaluate, the batches
    peft_io.py     the adapter to and from PEFT's files (adapter_model.safetensors, adapter_config.json); the MLX
                   layers that apply a PEFT adapter (chat)
    session.py     setup() -> Session: the torch Session's steps for MLX; checkpoints (adapter + optimizer state)
    loop.py        train(): the torch trainer's fit, line for line, on that Session; run_training
    verdict.py     base vs tuned at the end (mlx-lm's generate_step for the greedy answers)

From mlx-lm: model loading, the LoRA / DoRA layers and their placement, quantization, generation. Ours: the glue
(which layers, the scale, the label-position loss, the preference losses, the PEFT names, the checkpoint format).
mlx-lm-lora was reviewed and is not used: see objectives.py. Importing this package imports no MLX; its modules do.
"""


def refuse(cfg) -> None:
    """BadInput, with the reason and the torch alternative, for a validated config the MLX trainer cannot take:
    support.check_config (from the files), then the target layers and their PEFT names on the model as mlx-lm
    builds it lazily (model.lazy_targets: no weight is read). config.validate calls it when the backend is mlx."""
    from .model import lazy_targets  # noqa: PLC0415
    from .support import check_config  # noqa: PLC0415

    check_config(cfg)
    lazy_targets(cfg)


def run_training(*args, **kwargs):
    """loop.run_training (imports MLX)."""
    from .loop import run_training as run  # noqa: PLC0415

    return run(*args, **kwargs)
