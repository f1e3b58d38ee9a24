"""Chat tab handlers: stream answers from any loaded model (GGUF or HF, with or without a LoRA adapter), stop,
regenerate, edit the last message, export/import, and compare two models on one prompt.

The history is the gr.Chatbot's own value (per browser tab). The stop button of a tab sets that tab's Event (kept
per browser session, released when the page closes); the loaded-model registry is shared and every model has its
own lock, so two tabs chatting at once both get answers. The sampling settings arrive in
`ChatParams.sampling_fields()` order (the tab makes its widgets from those fields).
"""

from __future__ import annotations

import html
import threading
from pathlib import Path

import gradio as gr

from pipelines import chat, models, runs
from pipelines.adapters import adapter_label, open_adapter
from pipelines.errors import BadInput, MacTunerError, NotFound
from pipelines.export import gguf_choices
from pipelines.runs import resolve_adapter
from pipelines.serving.client import ModelCrashed

from .. import zerogpu
from .common import Context, SessionState, handout_file, ui_errors

BASE = "(base model)"
DISK = "run:"  # Adapter menu values of adapters on disk (not attached yet): "run:<folder>"
_stops = SessionState()  # the Event of each browser session's answer in progress
_stream_chat_gpu = zerogpu.gpu(chat.stream_chat)  # an HF model's answer on ZeroGPU hardware (else the same function)


def new_stop(request: gr.Request | None) -> threading.Event:
    """A new stop Event for this browser session's answer (its Stop button sets it)."""
    ev = threading.Event()
    _stops.set(request, ev)
    return ev


def stop(request: gr.Request) -> None:
    """Stop this tab's answer(s) in progress (the pipeline finishes with finish_reason 'stopped', which the speed
    line then shows). It writes no output itself: its reply can arrive after the stream's last one, and a
    "Stopping…" put there would then replace "stopped" for good."""
    ev = _stops.get(request)
    if ev is not None:
        ev.set()


def adapter_sources(ctx: Context) -> list[str]:
    """LoRA adapters on disk: every run's final adapter/ and its complete checkpoints (newest run first)."""
    out = []
    for r in runs.list_runs(ctx.ws):
        run = runs.get_run(ctx.ws, r["name"])
        if (run.adapter_dir / "adapter_config.json").exists():
            out.append(str(run.adapter_dir))
        out += [str(p) for p in reversed(run.checkpoints())]
    return out


def gguf_files(ctx: Context) -> list[tuple[str, str]]:
    """(label, path) of the GGUF files in the workspace (exports, then models/), for chatting or comparing; an
    export whose validation failed a check is labelled so ("⚠ fine-tune lost")."""
    return [(f"{label} — {path}", path) for label, path in gguf_choices(ctx.ws)]


def model_choices(ctx: Context) -> list[str]:
    return ctx.registry.names()


def loaded_model(ctx: Context, name: str | None):
    if name:
        lm = ctx.registry.get(name)
        if lm is None:
            raise NotFound(f"No model named '{name}' is loaded (loaded: {', '.join(ctx.registry.names()) or 'none'}).")
        return lm
    lm = ctx.registry.current()
    if lm is None:
        raise NotFound("No model is loaded: load one in the Model tab (or the default model) first.")
    return lm


def adapter_choices(ctx: Context, name: str | None) -> list[str]:
    try:
        lm = loaded_model(ctx, name)
    except NotFound:
        return [BASE]
    return [BASE] + [a.name for a in chat.list_adapters(lm)]


def adapter_menu(ctx: Context, name: str | None) -> list[tuple[str, str]]:
    """The Adapter menu: the base model, the adapters attached to this model, then every run's adapter and
    checkpoint on disk (choosing one loads the base it was trained on if needed: see `choose_adapter`)."""
    attached = adapter_choices(ctx, name)[1:]
    out = [(BASE, BASE)] + [(f"{a} (attached)", a) for a in attached]
    for path in adapter_sources(ctx):
        try:
            adapter_dir, run_dir = resolve_adapter(path)
        except MacTunerError:
            continue
        label = adapter_label(adapter_dir, run_dir)
        if label in attached:
            continue
        what = "final adapter" if adapter_dir.name == "adapter" else adapter_dir.name.replace("-", " ")
        out.append((f"{run_dir.name if run_dir else adapter_dir.name} · {what}", DISK + path))
    return out


def _is_base(ctx: Context, lm) -> bool:
    """The embedded default (either copy), or a model prompted with the plain fallback (no chat template of its own)."""
    defaults = {models.default_gguf_path(ctx.ws).resolve(), models.default_hf_path(ctx.ws).resolve()}
    if Path(lm.model_path).resolve() in defaults:
        return True
    try:
        return chat.chat_template_of(lm)[0] == chat.PLAIN_CHAT_TEMPLATE
    except MacTunerError:
        return False


def model_note(ctx: Context, name: str | None, adapter: str | None = None) -> str:
    """A plain word on the chosen model when it is a base model (no chat template of its own): it continues text,
    it was never taught to chat - with what to do about it."""
    try:
        lm = loaded_model(ctx, name)
    except NotFound:
        return ""
    if adapter not in (None, "", BASE) or not _is_base(ctx, lm):
        return ""
    return (f"ℹ️ **{lm.name} is a base model**: it was trained to continue text, never taught to chat, so its "
            "answers will wander. Fine-tune it (the **Quick start** at the top trains a LoRA adapter on the sample "
            "in a few minutes), then pick the run's adapter in the Adapter menu.")


@ui_errors
def choose_adapter(ctx: Context, model_name: str | None, value: str | None, progress=gr.Progress()):
    """An Adapter menu choice: an attached adapter is used as it is; one on disk is attached to its base model - on
    the GGUF that base was made from (the embedded default's), as a LoRA GGUF, when llama.cpp can take it; else on
    the HF base with PEFT - loading that model first when it is not. Returns (model menu, adapter menu, adapter B
    menu, note)."""
    if not (value or "").startswith(DISK):
        return gr.skip(), gr.skip(), gr.skip(), model_note(ctx, model_name, value)
    progress(0.05, desc="Opening the adapter…")
    lm, name, note = open_adapter(ctx.ws, ctx.registry, value[len(DISK):], current=True,
                                  progress=lambda f, m: progress(f, desc=m))
    names = model_choices(ctx)
    menu = adapter_menu(ctx, lm.name)
    said = f"Answering with **{lm.name}** + adapter **{name}**" + (f" ({note})" if note else "")
    return (gr.update(choices=names, value=lm.name), gr.update(choices=menu, value=name),
            gr.update(choices=adapter_choices(ctx, lm.name)), said + ".")


def params_from(sampling: tuple | list, adapter: str | None) -> chat.ChatParams:
    """The form's sampling values (ChatParams.sampling_fields() order) and the adapter choice -> ChatParams."""
    if (adapter or "").startswith(DISK):
        raise BadInput("That adapter is not attached yet: wait until the Adapter menu shows its name (its base model "
                       "is loading), then send again.")
    return chat.ChatParams.from_form(list(sampling), None if adapter in (None, "", BASE) else adapter)


def speed_line(ch: chat.ChatChunk | None, name: str) -> str:
    if ch is None:
        return ""
    bits = [f"**{name}**", f"{ch.n_tokens} tokens"]
    if ch.ttft_s is not None:
        bits.append(f"first token {1000 * ch.ttft_s:.0f} ms")
    if ch.tokens_per_s:
        bits.append(f"{ch.tokens_per_s:.1f} tok/s")
    if ch.finish_reason:
        bits.append({"stop": "done", "length": "hit the length limit", "stopped": "stopped"}.get(ch.finish_reason,
                                                                                                ch.finish_reason))
    if ch.seed is not None and ch.finish_reason:
        bits.append(f"seed {ch.seed}")
    out = " · ".join(bits)
    return out + (f"\n\nℹ️ {ch.note}" if ch.note else "")


def _check_turn(lm, history: list[dict], params: chat.ChatParams) -> None:
    """Raise the pipeline's clear message now (before the UI shows the turn) for a bad message or settings."""
    p = params.validated()
    if p.adapter and not any(a.name == p.adapter for a in chat.list_adapters(lm)):
        raise NotFound(f"No adapter named '{p.adapter}' is attached to {lm.name}.")
    chat.build_prompt(lm, chat.normalize_messages(history), p)


@ui_errors
def send(ctx: Context, request: gr.Request, message: str, history: list, model_name: str, adapter: str, *sampling):
    """Stream the answer to `message` into the chat: yields (history, textbox value, speed line)."""
    if not (message or "").strip():
        raise BadInput("Type a message first.")
    lm = loaded_model(ctx, model_name)
    params = params_from(sampling, adapter)
    history = chat.normalize_messages(list(history or [])) + [{"role": "user", "content": message}]
    _check_turn(lm, history, params)
    yield from _stream(lm, history, params, new_stop(request), "")


def _stream(lm, history: list[dict], params: chat.ChatParams, ev: threading.Event, textbox: str):
    answer = {"role": "assistant", "content": ""}
    shown = history + [answer]
    who = lm.name + (f" + {params.adapter}" if params.adapter else "")  # which adapter answered, too
    yield shown, textbox, f"**{who}** · thinking…"
    last = None
    try:
        for ch in zerogpu.for_model(lm, chat.stream_chat, _stream_chat_gpu)(lm, history, params, ev):
            answer["content"] += ch.text
            last = ch
            yield shown, textbox, speed_line(ch, who)
    except ModelCrashed as e:
        # The conversation goes back to before this turn, with the message in the box to send again: nothing the
        # crash cut off enters the history. The model process is already being restarted.
        gr.Warning(e.message)
        yield history[:-1], history[-1]["content"], f"⚠️ **{lm.name}**: {e.message}"
        return
    yield shown, textbox, speed_line(last, who)


@ui_errors
def regenerate(ctx: Context, request: gr.Request, history: list, model_name: str, adapter: str, *sampling):
    """Answer the last user message again (the previous answer is replaced)."""
    msgs = chat.normalize_messages(list(history or []))
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise BadInput("There is no user message to answer again.")
    lm = loaded_model(ctx, model_name)
    params = params_from(sampling, adapter)
    _check_turn(lm, msgs, params)
    yield from _stream(lm, msgs, params, new_stop(request), "")


@ui_errors
def edit_last(history: list):
    """Take the last user message (and its answer) out of the chat and back into the textbox."""
    msgs = chat.normalize_messages(list(history or []))
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise BadInput("There is no user message to edit.")
    last = msgs.pop()
    return msgs, last["content"]


@ui_errors
def export(ctx: Context, history: list, model_name: str):
    msgs = chat.normalize_messages(list(history or []))
    if not msgs:
        raise BadInput("The conversation is empty: nothing to export.")
    text = chat.export_conversation(msgs, model=model_name or None)
    return handout_file(ctx, "chat", "conversation-", ".json", text)


@ui_errors
def import_(path: str | None):
    if not path:
        raise BadInput("Choose a conversation JSON file.")
    return chat.import_conversation(Path(path).read_bytes())


@ui_errors
def template_info(ctx: Context, model_name: str):
    lm = loaded_model(ctx, model_name)
    text, source = chat.chat_template_of(lm)
    return f"Template in use: **{html.escape(source)}**", text  # escaped: <start_of_turn> is no HTML tag


@ui_errors
def attach(ctx: Context, model_name: str, path: str, name: str):
    lm = loaded_model(ctx, model_name)
    if not (path or "").strip():
        raise BadInput("Enter the folder of a LoRA adapter (a run's adapter/ or checkpoints/step-N/).")
    info = chat.attach_adapter(lm, str(ctx.ws.check_path(path.strip())), name)  # confined: workspace only
    choices = adapter_choices(ctx, lm.name)
    warn = ("\n\n" + "\n".join(f"⚠️ {w}" for w in info.warnings)) if info.warnings else ""
    return (gr.update(choices=adapter_menu(ctx, lm.name), value=info.name), gr.update(choices=choices),
            f"Attached adapter **{info.name}** (rank {info.rank}) to {lm.name}: pick it as Adapter (or Adapter B to "
            f"compare with the base).{warn}")


@ui_errors
def load_extra(ctx: Context, path: str, progress=gr.Progress()):
    """Load another model beside the current one (for Compare); it stays loaded until unloaded in the Model tab."""
    lm = ctx.registry.load(path, ctx.ws, progress=lambda f, m: progress(f, desc=m), replace=False)
    names = model_choices(ctx)
    return gr.update(choices=names), gr.update(choices=names, value=lm.name), f"Loaded **{lm.name}** for comparison."


def refresh_models(ctx: Context, a: str | None, b: str | None, adapter: str | None = None):
    """The model and adapter menus again (the Chat tab selected, ↻); the note on a base model, unless an adapter is
    chosen (what was said on choosing it stays)."""
    names = model_choices(ctx)
    cur = ctx.registry.current()
    kept = a in names
    a = a if kept else (cur.name if cur else None)
    b = b if b in names else a
    note = gr.skip() if kept and adapter not in (None, "", BASE) else model_note(ctx, a)
    return (gr.update(choices=names, value=a), gr.update(choices=names, value=b),
            gr.update(choices=adapter_menu(ctx, a)), gr.update(choices=adapter_choices(ctx, b)), note)


@ui_errors
def compare(ctx: Context, request: gr.Request, message: str, model_a: str, adapter_a: str, model_b: str,
            adapter_b: str, *sampling):
    """One prompt, two answers streaming side by side: yields (chat A, chat B, speed A, speed B)."""
    if not (message or "").strip():
        raise BadInput("Type a prompt to compare.")
    lm_a, lm_b = loaded_model(ctx, model_a), loaded_model(ctx, model_b)
    pa, pb = params_from(sampling, adapter_a), params_from(sampling, adapter_b)
    msgs = [{"role": "user", "content": message}]
    _check_turn(lm_a, msgs, pa)
    _check_turn(lm_b, msgs, pb)
    labels = [lm_a.name + (f" + {pa.adapter}" if pa.adapter else ""), lm_b.name + (f" + {pb.adapter}" if pb.adapter else "")]
    answers = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}]
    speeds = [f"**{labels[0]}** · waiting…", f"**{labels[1]}** · waiting…"]
    yield msgs + [answers[0]], msgs + [answers[1]], speeds[0], speeds[1]
    for side, ch in chat.compare((lm_a, pa), (lm_b, pb), msgs, new_stop(request)):
        answers[side]["content"] += ch.text
        speeds[side] = speed_line(ch, labels[side])
        yield msgs + [answers[0]], msgs + [answers[1]], speeds[0], speeds[1]
