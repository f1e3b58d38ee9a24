"""Requests that arrive together at a fresh studio (issue 23: two Start clicks at once got "ImportError: cannot
import name 'AutoTokenizer' from 'transformers'"): Python hands a thread that imports transformers while another
thread is still importing it the half-made module (transformers replaces itself in sys.modules with a lazy module
at the end of its import), so the studio imports it once before it serves. Reproduced on a studio of its own
process, where nothing has imported transformers yet."""

from __future__ import annotations

import pytest
from studio_process import start_studio, stop_studio

pytestmark = pytest.mark.slow


def test_simultaneous_first_requests_that_import_transformers(tmp_path, tiny_llama_dir):
    from gradio_client import Client

    from pipelines import data
    from pipelines.workspace import Workspace
    from test_train_api import form

    ws = Workspace.open(tmp_path / "ws")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} ok"}]}
            for i in range(12)]
    data.save_dataset(ws, "api-set", rows, {"source": "test"}, val_ratio=0.2)
    proc, url = start_studio(ws.root, args=["--no-default"])
    try:
        c = Client(url, verbose=False)
        jobs = [c.submit(*form(str(tiny_llama_dir)), api_name="/train_check") for _ in range(3)]  # at once
        for job in jobs:
            assert "usable training conversations" in job.result(timeout=300)
    finally:
        stop_studio(proc)
    log = (tmp_path / "studio.log").read_text()
    assert "ImportError" not in log and "Traceback" not in log, log[-3000:]
