"""The Export stage through the Gradio API: check, start an export job and follow it with export_status, the step
endpoints (quantize, validate; merge of something that is no adapter), list and details, clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio_helpers import launch

pytestmark = pytest.mark.slow


def test_export_through_gradio_client(tmp_path_factory, spm_llama_dir):
    from gradio_client import Client

    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    try:
        c = Client(url, verbose=False)
        with pytest.raises(Exception, match="Choose what to export"):
            c.predict("", "", "", ["f16"], [], api_name="/export_check")
        plan = c.predict(str(spm_llama_dir), "", "api", ["f16"], [], api_name="/export_check")
        assert "Ready to export **api**" in plan and "LlamaForCausalLM" in plan
        msg, job = c.predict(str(spm_llama_dir), "", "api", ["f16"], [], False, "", api_name="/export_start")
        assert "Started export **api**" in msg and job
        t0 = time.time()
        while time.time() - t0 < 180:
            st = c.predict(job, api_name="/export_status")
            if st["state"] != "running":
                break
            time.sleep(0.5)
        assert st["state"] == "finished", st
        (row,) = c.predict(api_name="/export_list")
        assert row["name"] == "api" and row["state"] == "complete"
        f16 = Path(st["result"]["ggufs"][0])
        assert f16.name == "api-f16.gguf"
        # one step at a time: each runs as a job and the call returns its final status
        q = c.predict(str(f16), ["Q8_0"], api_name="/export_quantize")
        assert q["state"] == "finished" and q["result"]["ggufs"] == [str(f16.with_name("api-Q8_0.gguf"))]
        v = c.predict(str(f16.with_name("api-Q8_0.gguf")), "", "", "", api_name="/export_validate")
        items = {i["name"]: i for i in v["result"]["items"]}
        assert items["loads"]["ok"] and items["chat_template"]["ok"], items  # HF folder found via export.json
        d = c.predict("api", api_name="/export_details")
        assert [g["type"] for g in d["gguf_files"]] == ["f16", "Q8_0"]
        assert d["gguf_files"][1]["validation"]["ok"] is not None
        with pytest.raises(Exception, match="holds no adapter"):
            c.predict(str(spm_llama_dir), "", "", api_name="/export_merge")
        with pytest.raises(Exception, match="There is no export 'nope'"):
            c.predict("nope", api_name="/export_details")
    finally:
        demo.close()
