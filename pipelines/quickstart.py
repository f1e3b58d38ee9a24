"""The first ten minutes: where a user is on the journey (model → data → train → chat → export) and a one-click
quick start - a short LoRA run of the embedded default model on the bundled sample dataset, through exactly the Train
stage's machinery (its run is in the run history like any other), after which the chat answers with that adapter.

    from pipelines import quickstart
    run = quickstart.start(ws)                     # prepares the HF copy and the sample dataset if needed
    quickstart.journey(ws, registry)               # [Step(name, done, detail), ...]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import adapters, models, runs
from .errors import MacTunerError
from .workspace import Workspace

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample_dataset.jsonl"
DATASET = "quick-start-sample"
RUN_PREFIX = "quick-start"
QUESTION = "How do I boil an egg so the yolk stays soft?"  # a question of the sample: the first chat to try

# Chosen on the sample (60 rows, 54 for training) with the embedded Gemma 3 270M: 39 steps, 75-190 s on 2 CPU cores;
# after them the model answers the sample's kind of questions in a sentence or two and ends its turn.
SETTINGS = dict(method="lora", rank=16, alpha=32.0, dropout=0.0, epochs=3.0, learning_rate=3e-4, batch_size=4,
                max_length=256, scheduler="cosine", warmup_steps=2, save_every=0, eval_every=0)


@dataclass
class Step:
    name: str
    done: bool
    detail: str


def ensure_dataset(ws: Workspace) -> str:
    """The bundled sample saved as dataset `quick-start-sample` (once; later calls reuse it)."""
    from . import data  # noqa: PLC0415

    if any(d["name"] == DATASET for d in data.list_datasets(ws)):
        return DATASET
    res = data.read_table(SAMPLE)
    mapping = data.detect_mapping(res.df)
    conv = data.convert(res.df, mapping)
    data.save_dataset(ws, DATASET, conv.rows, data.build_meta(res, mapping, None, conv), val_ratio=0.1)
    return DATASET


def wait_for_hf_copy(ws: Workspace, progress=lambda f, m: None, timeout: float = 1800.0) -> Path:
    """The default model's HF copy, prepared in its own process if it is not (or is being) prepared."""


    st = models.default_hf_status(ws)
    if st["state"] not in ("ready", "running"):
        st = models.start_default_hf_materialization(ws)
    t0 = time.time()
    while st["state"] != "ready":
        if st["state"] == "failed":
            raise MacTunerError(f"Preparing the default model's training copy failed: {st.get('error', '?')}")
        if time.time() - t0 > timeout:
            raise MacTunerError("Preparing the default model's training copy takes too long; see the Model tab.")
        progress(0.05 + 0.6 * float(st.get("fraction") or 0), "Preparing the default model's training copy "
                 f"(about a minute, once): {st.get('stage') or 'starting'}")
        time.sleep(1.0)
        st = models.default_hf_status(ws)
    return models.default_hf_path(ws)


def config(ws: Workspace):
    from .training import TrainConfig  # noqa: PLC0415

    return TrainConfig(base_model=str(models.default_hf_path(ws)), dataset=DATASET, **SETTINGS)


def start(ws: Workspace, progress=lambda f, m: None) -> runs.RunDir:
    """Prepare what the quick start needs (the default model's HF copy - about a minute, once - and the sample
    dataset), then launch its run like the Train tab does (queued behind a running one)."""
    wait_for_hf_copy(ws, progress)
    progress(0.7, "Saving the sample dataset...")
    ensure_dataset(ws)
    progress(0.8, "Starting the run...")
    name, n = RUN_PREFIX, 1
    while (ws.runs / name).exists():
        n += 1
        name = f"{RUN_PREFIX}-{n}"
    return runs.launch(ws, config(ws), name=name)


def latest(ws: Workspace) -> runs.RunDir | None:
    """The newest quick-start run, if any."""
    names = [r["name"] for r in runs.list_runs(ws) if r["name"].startswith(RUN_PREFIX)]
    return runs.get_run(ws, names[0]) if names else None


def journey(ws: Workspace, registry) -> list[Step]:
    """Each stage and whether the user has done it yet, with what there is (for the first page)."""
    from . import data  # noqa: PLC0415

    cur = registry.current()
    datasets = [d for d in data.list_datasets(ws) if d["name"] != DATASET]
    all_runs = runs.list_runs(ws)
    done_runs = [r for r in all_runs if r.get("state") == "finished"]
    exports = [p for p in ws.exports.glob("*/*.gguf")] if ws.exports.is_dir() else []
    adapters_in_chat = any(adapters.list_adapters(m) for m in map(registry.get, registry.names()) if m is not None)
    return [
        Step("Model", cur is not None, f"{cur.name} loaded" if cur else "no model loaded"),
        Step("Data", bool(datasets), f"{len(datasets)} dataset version(s) saved" if datasets else
             "no dataset of your own yet (the quick start uses the sample)"),
        Step("Train", bool(done_runs), f"{len(done_runs)} run(s) finished" if done_runs else
             (f"{len(all_runs)} run(s), none finished" if all_runs else "no run yet")),
        Step("Chat", adapters_in_chat, "chatting with a fine-tuned adapter" if adapters_in_chat else
             "base model only: pick a run's adapter in the Chat tab"),
        Step("Export", bool(exports), f"{len(exports)} GGUF file(s) exported" if exports else "nothing exported yet"),
    ]
