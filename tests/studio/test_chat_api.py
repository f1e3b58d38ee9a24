"""The Chat stage through the Gradio API: streaming with gradio_client (several updates per answer), stop, bad
input, template, export/import, and two clients chatting at once on the shared model (both answered)."""

from __future__ import annotations

import json
import threading

import pytest

from studio_helpers import launch

pytestmark = pytest.mark.slow
SAMPLING = ["", 0.0, 1.0, 0, 0.0, 1.0]  # system, temperature (greedy), top_p, top_k, min_p, repetition penalty


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_gguf):
    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    ctx.registry.load(str(tiny_gguf))
    yield url, ctx
    demo.close()


def text(message) -> str:
    """Gradio 6 returns chat content as a list of parts."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c)


def send(client, message, max_new=16, seed=1, history=None):
    job = client.submit(message, history or [], None, None, *SAMPLING, max_new, "", seed, api_name="/chat_send")
    updates = list(job)
    return updates, job.result()  # raises the app's error message, if any


def test_streaming_answer(studio):
    from gradio_client import Client

    url, ctx = studio
    c = Client(url, verbose=False)
    updates, (history, box, speed) = send(c, "hello there")
    assert len(updates) >= 3  # the user turn, streamed deltas, the final figures
    assert text(history[0]) == "hello there" and history[1]["role"] == "assistant" and text(history[1])
    assert "16 tokens" in speed and box == ""
    again, (history2, _, _) = send(c, "hello there")
    assert text(history2[1]) == text(history[1])  # greedy + same seed: same answer


def test_bad_input_and_template(studio):
    from gradio_client import Client

    url, _ = studio
    c = Client(url, verbose=False)
    with pytest.raises(Exception, match="Type a message first"):
        send(c, "   ")
    with pytest.raises(Exception, match="no user message"):
        c.predict([], None, None, *SAMPLING, 8, "", 1, api_name="/chat_regenerate")
    src, text = c.predict(None, api_name="/chat_template")
    assert "GGUF" in src or "metadata" in src or "template" in src.lower()
    assert "{%" in text or "{{" in text


def test_export_import_round_trip(studio, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = studio
    c = Client(url, verbose=False)
    _, (history, _, _) = send(c, "round trip")
    exported = c.predict(history, None, api_name="/chat_export")
    doc = json.loads(open(exported).read())
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "wizard", "content": "hi"}]')
    with pytest.raises(Exception, match="role"):
        c.predict(handle_file(str(bad)), api_name="/chat_import")
    back = c.predict(handle_file(exported), api_name="/chat_import")
    assert [text(m) for m in back] == [m["content"] for m in doc["messages"]]


def test_two_clients_at_once(studio):
    from gradio_client import Client

    url, _ = studio
    results, errors = {}, []

    def run(i):
        try:
            results[i] = send(Client(url, verbose=False), f"client {i}", max_new=24)[1]
        except Exception as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors and len(results) == 2
    speeds = [r[2] for r in results.values()]
    assert all(" tokens" in sp and "tok/s" in sp for sp in speeds), speeds
    assert all(text(r[0][1]) for r in results.values())


def test_base_vs_adapter_compare(tmp_path_factory, tiny_llama_dir):
    """Attach a LoRA through the API, then compare base and base+adapter on one prompt: both stream, they differ."""
    import torch
    from gradio_client import Client
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "lora"
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(out)
    demo, url, ctx = launch(tmp_path_factory, load_default=False)
    try:
        lm = ctx.registry.load(str(tiny_llama_dir))
        c = Client(url, verbose=False)
        with pytest.raises(Exception, match="No adapter|not found|no such"):
            c.predict(lm.name, str(out) + "-missing", "", api_name="/chat_attach_adapter")
        _a, _b, msg = c.predict(lm.name, str(out), "tuned", api_name="/chat_attach_adapter")
        assert "Attached adapter **tuned**" in msg
        a, b, speed_a, speed_b = c.predict("hello sea", lm.name, "tuned", lm.name, "(base model)", *SAMPLING, 12, "", 5,
                                           api_name="/chat_compare")
        assert "+ tuned" in speed_a and "+ tuned" not in speed_b
        assert text(a[-1]) and text(b[-1]) and text(a[-1]) != text(b[-1])
    finally:
        demo.close()
        ctx.registry.unload()
