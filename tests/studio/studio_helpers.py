"""Launch the studio in this process on a free port (as gradio's own tests do, prevent_thread_lock=True)."""

from __future__ import annotations

import time

import requests

from pipelines.serving import registry
from pipelines.workspace import Workspace
from studio_process import free_port  # noqa: F401 - the tests import it here


def launch(tmp_path_factory, auth=None, load_default=True):
    """(demo, url, ctx) for a studio on a fresh workspace with its own model registry."""
    from studio.app import serve
    from studio.handlers.common import Context

    ws = Workspace.open(tmp_path_factory.mktemp("studio") / "ws")
    ctx = Context(ws, registry.ModelRegistry(), prepare_hf=False)
    demo, url = serve(port=free_port(), auth=auth, block=False, ctx=ctx, load_default=load_default)
    return demo, url, ctx


def wait_loaded(url, timeout=60, **kw):
    t0 = time.time()
    while time.time() - t0 < timeout:
        body = requests.get(f"{url}/api/model/current", timeout=10, **kw).json()
        if body["loaded"]:
            return body
        time.sleep(0.2)
    raise AssertionError("the default model never became ready")
