"""The MacTuner studio: `build_app(ctx)` returns the gr.Blocks; `serve(...)` launches it with the REST API.

Run it with `mactuner studio [--host 127.0.0.1] [--port 7860] [--root DIR] [--share] [--auth USER:PASS]`; on a
Hugging Face Space the root app.py runs the same command (pipelines.space says how the Space is set up).

A studio reachable from other machines (a non-loopback host, a share link, a Space) opens typed paths only inside
its workspace and the HF cache (Workspace.confined), and says so in a banner when it is reachable without a login.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from urllib.parse import urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from pipelines import device as devicemod  # noqa: E402
from pipelines.serving import registry  # noqa: E402
from pipelines.space import Login, Space, storage_note  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402

from . import api, guard  # noqa: E402
from .access import Access, AccessGuard  # noqa: E402
from .handlers.common import Context, forget_session, handouts_dir  # noqa: E402
from .handlers.model import ModelHandlers  # noqa: E402
from .tabs import chat as chat_tab  # noqa: E402
from .tabs import data as data_tab  # noqa: E402
from .tabs import export as export_tab  # noqa: E402
from .tabs import journey as journey_tab  # noqa: E402
from .tabs import model as model_tab  # noqa: E402
from .tabs import rag as rag_tab  # noqa: E402
from .tabs import train as train_tab  # noqa: E402

log = logging.getLogger("mactuner.studio")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CSS = """
#header {padding: 6px 12px; border-radius: 8px; background: var(--block-background-fill);}
#header p {margin: 0;}
#banner {padding: 6px 12px; border-radius: 8px; border: 1px solid #d97706; background: #fef3c7; color: #78350f;}
#banner p {margin: 2px 0;}
"""


def build_app(ctx: Context, max_upload_mb: int = 500, banner: str = "", login_button: bool = False) -> gr.Blocks:
    """The studio's Blocks. `banner`: warnings shown under the header (reachable without login, storage lost at a
    restart); `login_button`: Hugging Face sign-in / sign-out (a Space with OAuth login)."""
    # Gradio's cache (uploads, files it serves) is emptied of files older than a day, hourly, and wholly at shutdown.
    with gr.Blocks(title="MacTuner", delete_cache=(3600, 86400)) as demo:
        # Header and device panel are filled on page load: building them here would import torch before serving.
        with gr.Row(equal_height=True):
            header = gr.Markdown("**MacTuner**", elem_id="header")
            if login_button:
                gr.LoginButton(size="sm", scale=0, min_width=200, elem_id="login-button")
        gr.Markdown(banner, elem_id="banner", visible=bool(banner))
        journey = journey_tab.build(ctx)
        with gr.Tabs() as tabs:
            m = model_tab.build(ctx)
            d = data_tab.build(ctx, max_upload_mb)
            train = train_tab.build(ctx)
            chat = chat_tab.build(ctx)
            rag_tab.build(ctx)
            export_tab.build(ctx, tabs, chat)
        journey_tab.wire(ctx, demo, journey, tabs, chat, train)
        model_tab.register_api(ctx)
        data_tab.register_api(ctx)
        train_tab.register_api(ctx)
        export_tab.register_api(ctx)
        rag_tab.register_api(ctx)
        demo.unload(forget_session)  # per-session state (a tab's stop Event, ...) goes with the page
        model = ModelHandlers(ctx)
        timer = gr.Timer(3.0)
        timer.tick(model.header, None, header, api_visibility="private", show_progress="hidden")
        timer.tick(model.current, None, m["current"], api_visibility="private", show_progress="hidden")
        # A refreshed or newly opened page reads the shared state again.
        demo.load(model.header, None, header, api_visibility="private").then(
            model.device, None, m["device"], api_visibility="private").then(
            model.current, None, m["current"], api_visibility="private").then(
            **m["estimate"]).then(*d["on_load"], api_visibility="private")
    return demo


_OUR_GRADIO_TEMP: str | None = None


def _gradio_cache_in(ws: Workspace, max_age: float = 86400) -> None:
    """Gradio's upload and file cache (GRADIO_TEMP_DIR, read when the Blocks and the app are made) goes into the
    workspace's tmp/gradio, not the system temp folder: nothing is written outside the workspace. A
    GRADIO_TEMP_DIR the user set is kept. What an earlier studio left there (Gradio cleans only its own files, and
    a studio that was killed cleans nothing) is removed once over a day old."""
    global _OUR_GRADIO_TEMP
    path = ws.tmp / "gradio"
    current = os.environ.get("GRADIO_TEMP_DIR")
    if current and current not in (_OUR_GRADIO_TEMP, str(path)):
        return
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        try:
            if time.time() - entry.lstat().st_mtime > max_age:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError as e:
            log.warning("could not remove the old cache entry %s: %s", entry, e)
    os.environ["GRADIO_TEMP_DIR"] = _OUR_GRADIO_TEMP = str(path)


def _import_lazy_packages() -> None:
    """Import transformers now, in this one thread, before any request can: its package replaces itself in
    sys.modules with a lazy module when its import ends, and Python hands a second thread that imports it meanwhile
    the half-made module ("cannot import name 'AutoTokenizer' from 'transformers'" for one of two Start clicks on a
    fresh studio). This imports neither torch nor a model (~0.4 s); later imports of its parts are safe."""
    import transformers  # noqa: F401, PLC0415


def notices(exposed: str | None, access: Access, space: Space | None) -> str:
    """The banner's lines: reachable without a login (`exposed` says how it is reachable), storage lost at a
    restart, training refused on ZeroGPU."""
    lines = []
    if exposed and access.mode == "none":
        fix = ("remove the MACTUNER_OPEN secret (Hugging Face login then admits you and MACTUNER_ALLOWED_USERS) or set "
               "MACTUNER_PASSWORD" if space is not None else "restart it with --auth USER:PASS")
        lines.append(f"⚠️ **Reachable without a login** ({exposed}): anyone who can open this address can use the "
                     f"studio, its files and this machine's hardware. To require a login, {fix}.")
    note = storage_note(space)
    if note:
        lines.append(f"⚠️ **Storage is not persistent** on this Space: {note}")
    if space is not None and space.zero_gpu:
        lines.append("ℹ️ **ZeroGPU hardware**: chat runs on a GPU lent per answer; training is not available here "
                     "(duplicate the Space onto paid GPU or CPU hardware to train).")
    return "\n\n".join(lines)


def serve(root: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          auth: tuple[str, str] | None = None, max_upload_mb: int = 500, load_default: bool = True,
          prepare_hf: bool = True, block: bool = True, ctx: Context | None = None, login: Login | None = None,
          space: Space | None = None):
    """Launch the studio. Returns (demo, url) when block=False. `login`: Hugging Face login on a Space (mode
    "oauth"); `space`: the Space it runs on (pipelines.space.detect())."""
    started = time.time()
    ctx = ctx or Context(Workspace.open(root), prepare_hf=prepare_hf)
    exposed = ("a public share link" if share else f"this Space{f' at {space.host}' if space.host else ''}"
               if space is not None else None if guard.is_loopback(host) else f"host {host}")
    if exposed and not ctx.ws.confined:  # typed paths: only the workspace and the HF cache
        ctx = dataclasses.replace(ctx, ws=dataclasses.replace(ctx.ws, confined=True))
    access = Access(users=dict([auth]) if auth else None, login=login if login and login.mode == "oauth" else None,
                    trust_proxy=space is not None)
    _gradio_cache_in(ctx.ws)
    _import_lazy_packages()
    if load_default:  # `mactuner studio` starts this itself, before importing gradio
        registry.load_default_in_background(ctx.ws, ctx.registry, ctx.prepare_hf, started)
    demo = build_app(ctx, max_upload_mb, notices(exposed, access, space), login_button=access.mode == "oauth")
    demo.queue(default_concurrency_limit=4)
    hosts = guard.allowed_hosts(host)  # the share host joins it once known
    app, url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, auth=auth, max_file_size=f"{max_upload_mb}mb",
        allowed_paths=[handouts_dir(ctx.ws)],  # files handlers return (handout_file), for any workspace
        auth_dependency=access.gradio_dependency if access.mode == "oauth" else None,
        prevent_thread_lock=True, quiet=True, show_error=False, css=CSS, favicon_path=os.path.join(ASSETS, "logo.png")
        if os.path.exists(os.path.join(ASSETS, "logo.png")) else None,
        app_kwargs={"docs_url": "/docs", "title": "MacTuner API", "exception_handlers": api.EXCEPTION_HANDLERS,
                    "middleware": [Middleware(guard.HostOriginGuard, hosts=hosts),
                                   Middleware(AccessGuard, access=access)]},
    )
    if share_url:
        hosts.add(guard.hostname(urlsplit(share_url).netloc))
    api.install(app, ctx, access)
    threading.Thread(target=devicemod.profile, daemon=True).start()  # import torch now, off the request path
    shown = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{demo.server_port}"
    print(f"MacTuner studio on {shown} (workspace {ctx.ws.root})", flush=True)
    if share_url:
        print(f"Public share link: {share_url}", flush=True)
    if not block:
        return demo, shown
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        demo.close()
    return demo, shown
