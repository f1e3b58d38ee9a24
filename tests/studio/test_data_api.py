"""The Data stage through the Gradio API (gradio_client), as a script would drive it: per-client session state,
cleaning with undo, EDA, save, list; bad input answered with a clear error."""

from __future__ import annotations

import pytest

from studio_helpers import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    yield url, ctx
    demo.close()


def test_data_flow_through_gradio_client(studio, tiny_llama_dir):
    from gradio_client import Client

    url, ctx = studio
    ctx.registry.load(str(tiny_llama_dir))  # its tokenizer counts the tokens
    c = Client(url, verbose=False)
    with pytest.raises(Exception, match="Load a file first"):
        c.predict(api_name="/data_clean_normalize")
    out = c.predict(api_name="/data_open_sample")
    info, msg = out[0], out[-1]
    assert "60 rows" in info and "alpaca" in msg
    out = c.predict([], "drop", "", api_name="/data_clean_missing")
    assert "60 -> 58 rows (2 removed)" in out[-1]
    out = c.predict([], True, api_name="/data_clean_duplicates")
    assert "58 -> 54" in out[-1]
    out = c.predict(api_name="/data_undo")
    assert "Undid" in out[-1] and "58 rows" in out[0]
    c.predict([], True, api_name="/data_clean_duplicates")
    out = c.predict(1, 0, 512, api_name="/data_clean_length")
    assert "token length" in out[-1]
    summary, len_fig, stats, turns, roles, preview_html, note = c.predict(512, 0, api_name="/data_explore")
    assert "tokens trained" in note and "mt-trained" in preview_html
    with pytest.raises(Exception, match="name"):
        c.predict("no spaces allowed", 0.1, 0, api_name="/data_save")
    msg, table = c.predict("api-set", 0.2, 7, api_name="/data_save")
    assert "Saved **api-set v1**" in msg
    listed = c.predict(api_name="/data_list")
    assert [(d["name"], d["version"], d["train"] + d["validation"]) for d in listed] == [("api-set", 1, 54)]
    ctx.registry.unload()


def test_sessions_are_per_client(studio):
    from gradio_client import Client

    url, _ = studio
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    a.predict(api_name="/data_open_sample")
    a.predict([], "drop", "", api_name="/data_clean_missing")
    with pytest.raises(Exception, match="Load a file first"):
        b.predict(api_name="/data_undo")
