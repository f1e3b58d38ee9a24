"""Chat tab handlers: stream answers from any loaded model (GGUF or HF, with or without a LoRA adapter), stop,
regenerate, edit the last message, export/import, and compare two models on one prompt.

The history is the gr.Chatbot's own value (per browser tab). The stop button of a tab sets that tab's Event (kept
per browser session, released when the page closes); the loaded-model registry is shared and every model has its
own lock, so two tabs chatting at once both get answers. The sampling settings arrive in
`ChatParams.sampling_fields()` order (the tab makes its widgets from those fields).

`ChatHandlers(ctx)`: the tab wires its bound methods; they return (or stream) named views of the tab's outputs.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from pipelines import chat, models, runs
from pipelines.adapters import adapter_label, open_adapter
from pipelines.errors import BadInput, MacTunerError, NotFound
from pipelines.export import gguf_choices
from pipelines.runs import resolve_adapter
from pipelines.serving.client import ModelCrashed

from .. import zerogpu
from .common import Context, SessionState, handout_file, refused_on_page, ui_errors

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


class ChatView(NamedTuple):
    """The chat as an answer streams."""

    conversation: list  # the history with the answer so far
    message: str  # the textbox: empty, or the message back to send again after a crash
    speed: str  # the line under the chat: who answers, tokens, speed, why it ended


class EditView(NamedTuple):
    conversation: list  # the history without the last user message and its answer
    message: str  # that message, back in the textbox


class CompareView(NamedTuple):
    a: list  # chat A: the prompt and model A's answer so far
    b: list
    speed_a: str
    speed_b: str


class AdapterChoice(NamedTuple):
    """After an Adapter menu choice: the model menu, the Adapter menus (A and B) and the note under the model."""

    model: Any
    adapter: Any
    adapter_b: Any
    note: str


class ModelMenus(NamedTuple):
    """The model and adapter menus of both sides, and the note on a base model."""

    model: Any
    model_b: Any
    adapter: Any
    adapter_b: Any
    note: Any


class Attached(NamedTuple):
    adapter: Any  # the Adapter menu, on the adapter attached
    adapter_b: Any
    message: str


class ExtraModel(NamedTuple):
    model: Any  # the model menu, with the model loaded for comparison
    model_b: Any  # model B's menu, on it
    message: str


class TemplateView(NamedTuple):
    source: str  # markdown: where the template comes from
    text: str  # the template


class ModelPick(NamedTuple):
    adapter: Any  # the Adapter menu of the model picked
    note: str


class OnDisk(NamedTuple):
    adapters: Any  # the adapter folder picker: runs' adapters and checkpoints
    ggufs: Any  # the GGUF picker (to load for comparison)


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


def _stream(lm, history: list[dict], params: chat.ChatParams, ev: threading.Event, textbox: str):
    """The answer as it streams: the conversation with the answer so far, the textbox, the speed line."""
    answer = {"role": "assistant", "content": ""}
    shown = history + [answer]
    who = lm.name + (f" + {params.adapter}" if params.adapter else "")  # which adapter answered, too
    yield ChatView(shown, textbox, f"**{who}** · thinking…")
    last = None
    try:
        for ch in zerogpu.for_model(lm, chat.stream_chat, _stream_chat_gpu)(lm, history, params, ev):
            answer["content"] += ch.text
            last = ch
            yield ChatView(shown, textbox, speed_line(ch, who))
    except ModelCrashed as e:
        # The conversation goes back to before this turn, with the message in the box to send again: nothing the
        # crash cut off enters the history. The model process is already being restarted.
        gr.Warning(e.message)
        yield ChatView(history[:-1], history[-1]["content"], f"⚠️ **{lm.name}**: {e.message}")
        return
    yield ChatView(shown, textbox, speed_line(last, who))


@ui_errors
def edit_last(history: list) -> EditView:
    """Take the last user message (and its answer) out of the chat and back into the textbox."""
    msgs = chat.normalize_messages(list(history or []))
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise BadInput("There is no user message to edit.")
    last = msgs.pop()
    return EditView(msgs, last["content"])


@refused_on_page(lambda message: gr.skip())
def import_(path: str | None, request: gr.Request = None):
    """The conversation in an exported JSON file. On the page a file that is not one leaves the chat as it was, with
    a warning toast (an error would hide the conversation under 'Error'); through the API it is an error."""
    if not path:
        raise BadInput("Choose a conversation JSON file.")
    return chat.import_conversation(Path(path).read_bytes())


class ChatHandlers:
    """The Chat tab's events, for one workspace and model registry (`ctx`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    @ui_errors
    def send(self, request: gr.Request, message: str, history: list, model_name: str, adapter: str, *sampling):
        """Stream the answer to `message` into the chat: yields ChatView."""
        if not (message or "").strip():
            raise BadInput("Type a message first.")
        lm = loaded_model(self.ctx, model_name)
        params = params_from(sampling, adapter)
        history = chat.normalize_messages(list(history or [])) + [{"role": "user", "content": message}]
        _check_turn(lm, history, params)
        yield from _stream(lm, history, params, new_stop(request), "")

    @ui_errors
    def regenerate(self, request: gr.Request, history: list, model_name: str, adapter: str, *sampling):
        """Answer the last user message again (the previous answer is replaced): yields ChatView."""
        msgs = chat.normalize_messages(list(history or []))
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs or msgs[-1]["role"] != "user":
            raise BadInput("There is no user message to answer again.")
        lm = loaded_model(self.ctx, model_name)
        params = params_from(sampling, adapter)
        _check_turn(lm, msgs, params)
        yield from _stream(lm, msgs, params, new_stop(request), "")

    @ui_errors
    def export(self, history: list, model_name: str) -> str:
        """The conversation as a JSON file to download."""
        msgs = chat.normalize_messages(list(history or []))
        if not msgs:
            raise BadInput("The conversation is empty: nothing to export.")
        text = chat.export_conversation(msgs, model=model_name or None)
        return handout_file(self.ctx, "chat", "conversation-", ".json", text)

    @ui_errors
    def template_info(self, model_name: str) -> TemplateView:
        lm = loaded_model(self.ctx, model_name)
        text, source = chat.chat_template_of(lm)
        return TemplateView(f"Template in use: **{html.escape(source)}**", text)  # escaped: <start_of_turn> is no tag

    @ui_errors
    def attach(self, model_name: str, path: str, name: str) -> Attached:
        ctx = self.ctx
        lm = loaded_model(ctx, model_name)
        if not (path or "").strip():
            raise BadInput("Enter the folder of a LoRA adapter (a run's adapter/ or checkpoints/step-N/).")
        info = chat.attach_adapter(lm, str(ctx.ws.check_path(path.strip())), name)  # confined: workspace only
        choices = adapter_choices(ctx, lm.name)
        warn = ("\n\n" + "\n".join(f"⚠️ {w}" for w in info.warnings)) if info.warnings else ""
        return Attached(gr.update(choices=adapter_menu(ctx, lm.name), value=info.name), gr.update(choices=choices),
                        f"Attached adapter **{info.name}** (rank {info.rank}) to {lm.name}: pick it as Adapter (or "
                        f"Adapter B to compare with the base).{warn}")

    @ui_errors
    def load_extra(self, path: str, progress=gr.Progress()) -> ExtraModel:
        """Load another model beside the current one (for Compare); it stays loaded until unloaded in the Model
        tab."""
        lm = self.ctx.registry.load(path, self.ctx.ws, progress=lambda f, m: progress(f, desc=m), replace=False)
        names = model_choices(self.ctx)
        return ExtraModel(gr.update(choices=names), gr.update(choices=names, value=lm.name),
                          f"Loaded **{lm.name}** for comparison.")

    def refresh_models(self, a: str | None, b: str | None, adapter: str | None = None) -> ModelMenus:
        """The model and adapter menus again (the Chat tab selected, ↻); the note on a base model, unless an adapter
        is chosen (what was said on choosing it stays)."""
        ctx = self.ctx
        names = model_choices(ctx)
        cur = ctx.registry.current()
        kept = a in names
        a = a if kept else (cur.name if cur else None)
        b = b if b in names else a
        note = gr.skip() if kept and adapter not in (None, "", BASE) else model_note(ctx, a)
        return ModelMenus(gr.update(choices=names, value=a), gr.update(choices=names, value=b),
                          gr.update(choices=adapter_menu(ctx, a)), gr.update(choices=adapter_choices(ctx, b)), note)

    def on_disk(self) -> OnDisk:
        """The pickers of what is on disk: adapters (to attach) and GGUF files (to load for comparison)."""
        return OnDisk(gr.update(choices=adapter_sources(self.ctx)), gr.update(choices=gguf_files(self.ctx)))

    def pick_model(self, name: str | None) -> ModelPick:
        """Model A chosen: its Adapter menu from the base, and the note on a base model."""
        return ModelPick(gr.update(choices=adapter_menu(self.ctx, name), value=BASE), model_note(self.ctx, name))

    def pick_model_b(self, name: str | None):
        """Model B chosen: its Adapter menu (the adapters attached to it)."""
        return gr.update(choices=adapter_choices(self.ctx, name), value=BASE)

    @ui_errors
    def choose_adapter(self, model_name: str | None, value: str | None, progress=gr.Progress()) -> AdapterChoice:
        """An Adapter menu choice: an attached adapter is used as it is; one on disk is attached to its base model -
        on the GGUF that base was made from (the embedded default's), as a LoRA GGUF, when llama.cpp can take it;
        else on the HF base with PEFT - loading that model first when it is not."""
        ctx = self.ctx
        if not (value or "").startswith(DISK):
            return AdapterChoice(gr.skip(), gr.skip(), gr.skip(), model_note(ctx, model_name, value))
        progress(0.05, desc="Opening the adapter…")
        lm, name, note = open_adapter(ctx.ws, ctx.registry, value[len(DISK):], current=True,
                                      progress=lambda f, m: progress(f, desc=m))
        said = f"Answering with **{lm.name}** + adapter **{name}**" + (f" ({note})" if note else "")
        return AdapterChoice(gr.update(choices=model_choices(ctx), value=lm.name),
                             gr.update(choices=adapter_menu(ctx, lm.name), value=name),
                             gr.update(choices=adapter_choices(ctx, lm.name)), said + ".")

    @ui_errors
    def compare(self, request: gr.Request, message: str, model_a: str, adapter_a: str, model_b: str,
                adapter_b: str, *sampling):
        """One prompt, two answers streaming side by side: yields CompareView."""
        if not (message or "").strip():
            raise BadInput("Type a prompt to compare.")
        lm_a, lm_b = loaded_model(self.ctx, model_a), loaded_model(self.ctx, model_b)
        pa, pb = params_from(sampling, adapter_a), params_from(sampling, adapter_b)
        msgs = [{"role": "user", "content": message}]
        _check_turn(lm_a, msgs, pa)
        _check_turn(lm_b, msgs, pb)
        labels = [lm.name + (f" + {p.adapter}" if p.adapter else "") for lm, p in ((lm_a, pa), (lm_b, pb))]
        answers = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}]
        speeds = [f"**{labels[0]}** · waiting…", f"**{labels[1]}** · waiting…"]
        yield CompareView(msgs + [answers[0]], msgs + [answers[1]], speeds[0], speeds[1])
        for side, ch in chat.compare((lm_a, pa), (lm_b, pb), msgs, new_stop(request)):
            answers[side]["content"] += ch.text
            speeds[side] = speed_line(ch, labels[side])
            yield CompareView(msgs + [answers[0]], msgs + [answers[1]], speeds[0], speeds[1])
