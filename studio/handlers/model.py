"""Model tab handlers: the header, the current model and the device panel, loading (embedded default, local folder or
file, Hub download), unloading, Hub info, the local models table and the memory estimate.

`ModelHandlers(ctx)`: the tab (and the app's header and page load) wire its bound methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import gradio as gr
import pandas as pd

from pipelines import device as devicemod
from pipelines import hub, models
from pipelines.serving import registry
from pipelines.training import TrainConfig, memory_advice
from pipelines.workspace import human_bytes

from .common import Context, gr_progress, selected_cell, ui_errors


def header_md(ctx: Context) -> str:
    prof = devicemod.profile()
    used, total = devicemod.memory_in_use()
    lm = ctx.registry.current()
    model = f"**{lm.name}** · {lm.format} {lm.dtype} · {lm.backend_kind}" if lm else "no model loaded"
    if ctx.registry.loading:
        model = f"loading {ctx.registry.loading}…"
    return (f"**MacTuner** &nbsp;·&nbsp; device {prof.kind.upper()} ({prof.name}) &nbsp;·&nbsp; "
            f"memory {human_bytes(used)} / {human_bytes(total)} &nbsp;·&nbsp; model: {model}")


def _hf_copy_line(ctx: Context) -> str:
    st = models.default_hf_status(ctx.ws)
    state = st.get("state")
    if state == "ready":
        return "Training copy (HF safetensors): ready"
    if state == "running":
        return f"Training copy (HF safetensors): preparing — {int(100 * st.get('fraction', 0))}% · {st.get('stage', '')}"
    if state == "failed":
        return f"Training copy (HF safetensors): failed — {st.get('error', '')}"
    return "Training copy (HF safetensors): not prepared yet"


def current_md(ctx: Context) -> str:
    lm = ctx.registry.current()
    if lm is None:
        head = "### Current model\nNo model is loaded. Load the embedded default, a local folder or a Hub model."
        if ctx.registry.loading:
            head = f"### Current model\nLoading **{ctx.registry.loading}**…"
        return head + f"\n\n<small>{_hf_copy_line(ctx)}</small>"
    d = lm.describe()
    rows = [
        ("Name", d["name"]), ("Architecture", d["architecture"] or "?"), ("Format", d["format"]),
        ("Backend", d["backend"]), ("Device", d["device"]), ("Precision", d["dtype"]),
        ("Parameters", f"{d['n_params'] / 1e6:.1f} M" if d["n_params"] else "?"),
        ("Memory used", d["memory"]), ("Context length", d["context_length"] or "?"),
        ("Chat template", "yes" if d["chat_template"] else "none (plain prompt fallback)"),
        ("Loaded in", f"{d['load_seconds']:.2f} s"), ("Path", f"`{d['model_path']}`"),
    ]
    if "worker" in d:  # a GGUF: served by a worker process of its own
        w = d["worker"]
        crash = w["last_crash"]
        rows.append(("Served by", f"worker process {w['pid']} ({w['state']}; llama.cpp extra buffer types "
                                  f"{'on' if w['extra_bufts'] else 'off'})"))
        if crash:
            rows.append(("Restarts", f"{w['restarts']} (the process ended by {crash['how']})"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    extra = f"\n\n<small>{_hf_copy_line(ctx)}</small>" if lm.name == models.DEFAULT_NAME else ""
    return f"### Current model\n| Property | Value |\n|---|---|\n{table}{extra}"


def current_model(ctx: Context) -> dict:
    """API: the current model's description, or {'loaded': False}."""
    lm = ctx.registry.current()
    out = {"loaded": lm is not None, "model": lm.describe() if lm else None, "loading": ctx.registry.loading,
           "default_hf": models.default_hf_status(ctx.ws)}
    return out


def device_md(ctx: Context | None = None) -> str:
    p = devicemod.profile(refresh=True)
    cache = ctx.ws.root / devicemod.CALIBRATION_FILE if ctx is not None else None
    train = devicemod.train_dtype(p, cache, measure=False)
    lines = [
        f"### Device\n**{p.kind.upper()}** — {p.name}",
        f"- Memory: {human_bytes(p.available_memory)} free of {human_bytes(p.total_memory)}",
        f"- Physical cores: {p.physical_cores} (threads used: {p.threads})",
        f"- bf16: {'native' if p.bf16 else 'no'} · fp16: {'yes' if p.fp16 else 'no'}",
        "- Training dtype (auto): " + (f"`{train[0]}` — {train[1]}" if train[0] else train[1])
        + f" · inference dtype: `{p.infer_dtype}`",
        f"- QLoRA: {'available' if p.qlora else 'not here — ' + p.qlora_reason}",
        f"- Training backend (auto): **{'MLX' if p.backend == 'mlx' else 'PyTorch'}** — {p.backend_reason}",
    ]
    lines += [f"- {n}" for n in p.notes]
    return "\n".join(lines)


def device_profile() -> dict:
    return devicemod.profile(refresh=True).as_dict()


class ModelStatus(NamedTuple):
    """After loading or unloading: the current-model panel and what was done."""

    current: str
    status: str


class HubInfo(NamedTuple):
    info: str  # markdown: id, author, license, size...
    files: pd.DataFrame


class Estimate(NamedTuple):
    table: pd.DataFrame  # memory per mode (inference, LoRA, QLoRA, MLX)
    advice: str


@ui_errors
def hub_info(model_id: str, token: str | None = None) -> HubInfo:
    info = hub.hub_info(model_id, token)
    rows = [
        ("Id", info.id), ("Author", info.author or "?"), ("Downloads", f"{info.downloads:,}" if info.downloads is not None else "?"),
        ("Likes", info.likes if info.likes is not None else "?"), ("License", info.license or "?"),
        ("Gated", info.gated or "no"), ("Pipeline", info.pipeline_tag or "?"), ("Library", info.library or "?"),
        ("Parameters", f"{info.parameters / 1e6:.1f} M" if info.parameters else "unknown"),
        ("Weights", info.weight_format), ("Repository size", human_bytes(info.total_size)),
        ("Last modified", info.last_modified or "?"),
    ]
    md = f"### {info.id}\n| Property | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if info.warnings:
        md += "\n\n" + "\n".join(f"⚠️ {w}" for w in info.warnings)
    files = pd.DataFrame([{"file": f["name"], "size": human_bytes(f["size"])} for f in info.files], columns=["file", "size"])
    return HubInfo(md, files)


def hub_info_api(model_id: str, token: str | None = None) -> dict:
    return hub.hub_info(model_id, token).as_dict()


LOCAL_COLUMNS = ["name", "source", "format", "size", "path"]


def local_models_table(ctx: Context) -> pd.DataFrame:
    rows = models.list_local_models(ctx.ws)
    for r in rows:
        r["size"] = human_bytes(r["size"]) if r["size"] else r["status"]
    return pd.DataFrame(rows, columns=LOCAL_COLUMNS)


def pick_local(table: pd.DataFrame, evt: gr.SelectData) -> str:
    """Clicking a row of the local-models table fills the path box with that row's path."""
    return selected_cell(table, evt, "path")


ESTIMATE_COLUMNS = ["mode", "weights", "adapter+optimizer", "activations", "overhead", "total", "fits"]


def memory_estimate(ctx: Context, seq_len: int = 512, batch_size: int = 4, lora_rank: int = 16,
                    gradient_checkpointing: bool = False) -> Estimate:
    """The memory each way of running or training the current model takes, and the batch size advised."""
    lm = ctx.registry.current()
    if lm is None:
        return Estimate(pd.DataFrame(columns=ESTIMATE_COLUMNS), "Load a model to see its memory estimate and batch "
                                                                "advice.")
    prof = devicemod.profile(refresh=True)
    shape = models.shape_of(lm)
    seq_len, batch_size, lora_rank = int(seq_len), int(batch_size), int(lora_rank)
    avail = prof.available_memory + (lm.memory_bytes if prof.kind != "cuda" else 0)  # the loaded model's memory is reusable
    gguf = lm.format == "gguf"  # its weights take what the file takes
    inf = devicemod.estimate_memory(shape, "inference", prof.infer_dtype, seq_len, batch_size, lora_rank,
                                    bool(gradient_checkpointing), avail,
                                    weight_bytes=Path(lm.model_path).stat().st_size if gguf else None)
    rows = [[f"Inference ({'GGUF ' + lm.dtype if gguf else prof.infer_dtype})", human_bytes(inf.weights),
             human_bytes(inf.trainable), human_bytes(inf.activations), human_bytes(inf.overhead),
             human_bytes(inf.total), "yes" if inf.fits else "no"]]
    advice = []
    for method in ("lora", "qlora"):  # the Train stage's own recipe (training.plan), for these settings
        cfg = TrainConfig(method=method, max_length=seq_len, batch_size=batch_size, rank=lora_rank,
                          gradient_checkpointing=bool(gradient_checkpointing),
                          dtype="bfloat16" if method == "qlora" else "auto")
        mem = memory_advice(shape, cfg, prof, available=avail)
        est = mem.estimate
        label = f"LoRA r={lora_rank} ({mem.dtype})" if method == "lora" else f"QLoRA r={lora_rank} (4-bit)"
        fits = "not on this device" if method == "qlora" and not prof.qlora else ("yes" if mem.fits else "no")
        rows.append([label, human_bytes(est.weights), human_bytes(est.trainable), human_bytes(est.activations),
                     human_bytes(est.overhead), human_bytes(est.total), fits])
        if method == "lora" or prof.qlora:
            bs = mem.recommended_batch
            advice.append(f"- {label}: recommended batch size **{bs}** at {seq_len} tokens" if bs else
                          f"- {label}: even batch 1 does not fit at {seq_len} tokens — shorten the sequences or turn "
                          "on gradient checkpointing")
    if devicemod.mlx_installed()[0]:
        _mlx_rows(rows, advice, shape, prof, avail, seq_len, batch_size, lora_rank, bool(gradient_checkpointing))
    elif devicemod.apple_silicon():
        advice.append(f"- MLX (the faster Mac path, 4-/8-bit bases): {devicemod.mlx_installed()[1]} — "
                      f"{devicemod.mlx_install_hint()}")
    pool = "unified memory" if prof.kind == "mps" else "GPU memory" if prof.kind == "cuda" else "RAM"
    head = f"For **{lm.name}** on {prof.kind.upper()} with {human_bytes(avail)} {pool} usable:"
    if not prof.qlora:
        advice.append(f"- QLoRA (bitsandbytes): {prof.qlora_reason}")
    return Estimate(pd.DataFrame(rows, columns=ESTIMATE_COLUMNS), head + "\n" + "\n".join(advice))


def _mlx_rows(rows: list, advice: list, shape, prof, avail: int, seq_len: int, batch_size: int, lora_rank: int,
              checkpointing: bool) -> None:
    """The MLX backend's rows (the Train stage's recipe with backend mlx): its dtype, and 4-/8-bit bases."""
    for bits in (0, 4, 8):
        cfg = TrainConfig(method="lora", backend="mlx", base_bits=bits, max_length=seq_len, batch_size=batch_size,
                          rank=lora_rank, gradient_checkpointing=checkpointing)
        mem = memory_advice(shape, cfg, prof, available=avail)
        est = mem.estimate
        label = f"MLX LoRA r={lora_rank} ({f'{bits}-bit base' if bits else mem.dtype})"
        rows.append([label, human_bytes(est.weights), human_bytes(est.trainable), human_bytes(est.activations),
                     human_bytes(est.overhead), human_bytes(est.total), "yes" if mem.fits else "no"])
        bs = mem.recommended_batch
        advice.append(f"- {label}: recommended batch size **{bs}** at {seq_len} tokens" if bs else
                      f"- {label}: even batch 1 does not fit at {seq_len} tokens")
    where = ("chosen by 'auto' here" if prof.backend == "mlx" else
             "on this machine only when backend mlx is chosen (slower than PyTorch on a CPU)")
    advice.append(f"- MLX: {where}; the 4-/8-bit bases are MLX's own quantization, the adapter merges into the "
                  "full-precision base.")


class ModelHandlers:
    """The Model tab's events and the app's header, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def header(self) -> str:
        return header_md(self.ctx)

    def device(self) -> str:
        return device_md(self.ctx)

    def current(self) -> str:
        return current_md(self.ctx)

    def _loaded(self, status: str) -> ModelStatus:
        return ModelStatus(current_md(self.ctx), status)

    @ui_errors
    def load_default(self, progress=gr.Progress()) -> ModelStatus:
        ctx = self.ctx
        lm = registry.load_default(ctx.ws, ctx.registry, gr_progress(progress))
        if ctx.prepare_hf:
            models.start_default_hf_materialization(ctx.ws)
        return self._loaded(f"Loaded **{lm.name}** in {lm.load_seconds:.2f} s.")

    @ui_errors
    def prepare_default_hf(self) -> ModelStatus:
        """Start the one-off HF safetensors copy of the default model (needed for training) in its own process."""
        models.ensure_default_gguf(self.ctx.ws)
        st = models.start_default_hf_materialization(self.ctx.ws)
        msg = {"ready": "The training copy is ready.",
               "running": "Preparing the training copy in the background (about a minute)."}
        return self._loaded(msg.get(st["state"], f"Training copy: {st['state']}"))

    @ui_errors
    def load_local(self, path: str, trust_remote_code: bool = False, progress=gr.Progress()) -> ModelStatus:
        lm = self.ctx.registry.load(path, self.ctx.ws, trust_remote_code=bool(trust_remote_code),
                                    progress=gr_progress(progress))
        return self._loaded(f"Loaded **{lm.name}** in {lm.load_seconds:.2f} s.")

    @ui_errors
    def unload(self) -> ModelStatus:
        r = self.ctx.registry.unload()
        return self._loaded(f"Unloaded **{r['unloaded']}** — process memory {human_bytes(r['rss_before'])} → "
                            f"{human_bytes(r['rss_after'])} (released {human_bytes(r['released'])}).")

    @ui_errors
    def download_and_load(self, model_id: str, token: str | None = None, progress=gr.Progress()) -> ModelStatus:
        path = hub.download(model_id, token, gr_progress(progress))
        lm = self.ctx.registry.load(str(path), self.ctx.ws, name=model_id.strip(), progress=gr_progress(progress))
        return self._loaded(f"Downloaded to `{path}` and loaded **{lm.name}**.")

    @ui_errors
    def local_models(self) -> pd.DataFrame:
        return local_models_table(self.ctx)

    @ui_errors
    def refresh_estimate(self, seq_len: int = 512, batch_size: int = 4, lora_rank: int = 16,
                         gradient_checkpointing: bool = False) -> Estimate:
        """The estimate again, for the settings as they are now (the public JSON endpoint is memory_estimate)."""
        return memory_estimate(self.ctx, seq_len, batch_size, lora_rank, gradient_checkpointing)
