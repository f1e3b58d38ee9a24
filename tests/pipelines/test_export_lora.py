"""The adapter as a llama.cpp LoRA GGUF (pipelines/export/adapter.py): the file's keys and tensor names, llama.cpp
applying it on the base GGUF like the merged model (Llama's q/k rows permuted as the converter permutes the base,
rsLoRA's scale folded in), trained token rows as a token_embd pair (and an output.weight pair on the untied base
for a tied output layer), what cannot be written and why, and the export's lora-gguf/ folder with its Modelfile
(FROM the base, ADAPTER the LoRA) and its validation on the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import tied_copy, token_rows_adapter

from pipelines import export as ex
from pipelines.errors import BadInput, Conflict


def _all_linear_adapter(base: Path, out: Path, **lora_kw) -> Path:
    """A LoRA on every linear layer (q and k included: the ones the converter permutes) with random A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                          **lora_kw))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, spm_llama_dir):
    """The base as an F32 GGUF and an all-linear rsLoRA adapter as a LoRA GGUF (built once for this module)."""
    from pipelines.export.convert import convert

    root = tmp_path_factory.mktemp("lora")
    adapter = _all_linear_adapter(spm_llama_dir, root / "adapter", use_rslora=True)
    base_gguf = convert(spm_llama_dir, root / "out", "f32", stem="base")
    lora = ex.adapter_gguf(adapter, spm_llama_dir, root / "out" / "tiny-lora.gguf")
    return adapter, base_gguf, lora


def _logits(gguf_path: Path, ids: list[int], lora: Path | None = None):
    import numpy as np

    from pipelines.serving.llamacpp import open_llama

    llm = open_llama(gguf_path, n_ctx=64, logits_all=True, **({"lora_path": str(lora)} if lora else {}))
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.slow
def test_lora_gguf_keys_and_tensor_names(lora_files):
    import gguf

    _adapter, _base, lora = lora_files
    reader = gguf.GGUFReader(str(lora))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    names = {t.name: t for t in reader.tensors}
    # two layers x 7 linear layers, an A and a B each, under the base GGUF's names
    assert len(names) == 2 * 7 * 2
    a, b = names["blk.0.attn_q.weight.lora_a"], names["blk.0.attn_q.weight.lora_b"]
    assert list(a.shape) == [32, 4] and list(b.shape) == [4, 32]  # ggml order: A is (in, r), B is (r, out)
    assert "blk.1.ffn_down.weight.lora_b" in names and "blk.1.attn_k.weight.lora_a" in names


@pytest.mark.slow
def test_llama_cpp_applies_it_like_the_merged_model(lora_files, spm_llama_dir):
    """Base GGUF + LoRA GGUF in llama.cpp gives the merged HF model's logits; without the LoRA, the base's."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, base_gguf, lora = lora_files
    ids = [1, 50, 60, 70, 80, 90, 100]
    with torch.inference_mode():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spm_llama_dir), adapter)
        want = merged.merge_and_unload()(torch.tensor([ids])).logits[0].numpy()
        base = AutoModelForCausalLM.from_pretrained(spm_llama_dir)(torch.tensor([ids])).logits[0].numpy()
    got = _logits(base_gguf, ids, lora)
    effect = np.abs(want - base).max()
    assert effect > 0.1  # the adapter changes the model a lot ...
    assert np.abs(got - want).max() < 0.02 * effect, (np.abs(got - want).max(), effect)  # ... and the LoRA GGUF too
    assert np.abs(_logits(base_gguf, ids) - base).max() < 1e-3


def test_what_llama_cpp_cannot_apply_is_refused_with_the_reason(tmp_path, spm_llama_dir):
    adapter = tmp_path / "a"
    adapter.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for extra, why in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "whole modules (lm_head)"),
                       ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
                       ({"peft_type": "IA3"}, "IA3 adapter")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
        assert why in (ex.adapter_problem(adapter) or ""), extra
        with pytest.raises(BadInput, match="cannot be written as a llama.cpp LoRA GGUF"):
            ex.adapter_gguf(adapter, spm_llama_dir, tmp_path / "x.gguf")
    # trained token rows fit a LoRA (test_trained_token_rows_...)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": [5]}))
    assert "token" not in (ex.adapter_problem(adapter) or "")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert "adapter_model.safetensors" in ex.adapter_problem(adapter)  # a pickle is never loaded
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_trained_token_rows_are_a_token_embd_pair_llama_cpp_applies_like_the_merged_model(tmp_path, spm_llama_dir):
    """Rows of the embedding trained outright (PEFT trainable tokens) on a model with its own output layer: k rows
    are a rank-k token_embd pair in the LoRA GGUF (lora_a picks the rows, lora_b holds their change), and base GGUF
    + LoRA GGUF answer like the merged model, whose new rows are read at the input only."""
    import gguf
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.export.convert import convert

    ids = [1, 50, 60, 70, 80, 90, 100]
    trained = [60, 80, 95]  # two of them in the prompt, one not
    adapter = token_rows_adapter(spm_llama_dir, tmp_path / "adapter", trained)
    lora = ex.adapter_gguf(adapter, spm_llama_dir, tmp_path / "out" / "rows-lora.gguf")
    names = {t.name: t for t in gguf.GGUFReader(str(lora)).tensors}
    a, b = names["token_embd.weight.lora_a"], names["token_embd.weight.lora_b"]
    assert list(a.shape) == [3, 400] and list(b.shape) == [3, 32]  # ggml order: A (k, vocab), B (k, width)
    assert lora.stat().st_size < 64_000  # a few rows and pairs, no copy of the embedding
    base_gguf = convert(spm_llama_dir, tmp_path / "out", "f32", stem="base")
    with torch.inference_mode():
        base_model = AutoModelForCausalLM.from_pretrained(spm_llama_dir)
        base = base_model(torch.tensor([ids])).logits[0].numpy()
        merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload()
        want = merged(torch.tensor([ids])).logits[0].numpy()
    effect = np.abs(want - base).max()
    got = _logits(base_gguf, ids, lora)
    assert effect > 0.1 and np.abs(got - want).max() < 0.02 * effect, (np.abs(got - want).max(), effect)


@pytest.mark.slow
def test_embedding_loras_and_whole_matrices_are_refused(tmp_path, spm_llama_dir):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    emb = tmp_path / "emb"
    get_peft_model(AutoModelForCausalLM.from_pretrained(spm_llama_dir),
                   LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])).save_pretrained(emb)
    with pytest.raises(BadInput, match="adapts the token embeddings"):
        ex.adapter_gguf(emb, spm_llama_dir, tmp_path / "out" / "e.gguf")
    # a q_proj LoRA saved with the whole (resized) embedding matrix, as PEFT does when tokens were added
    whole = tmp_path / "whole"
    get_peft_model(AutoModelForCausalLM.from_pretrained(spm_llama_dir),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(whole)
    tensors = load_file(whole / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.weight"] = tensors[next(iter(tensors))].new_zeros(410, 32)
    save_file(tensors, whole / "adapter_model.safetensors")
    with pytest.raises(BadInput, match="whole model.embed_tokens matrix"):
        ex.adapter_gguf(whole, spm_llama_dir, tmp_path / "out" / "w.gguf")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_never_overwrites(lora_files, spm_llama_dir):
    adapter, _base, lora = lora_files
    before = lora.read_bytes()
    with pytest.raises(Conflict):
        ex.adapter_gguf(adapter, spm_llama_dir, lora)
    assert lora.read_bytes() == before


@pytest.mark.slow
def test_export_of_tied_token_rows_writes_a_small_lora_on_the_untied_base(tmp_path, spm_llama_dir):
    """The quick start's case (Gemma: tied output layer, <end_of_turn> trained as a row). The tied head changes with
    the rows too: the LoRA GGUF adds an output.weight pair, which llama.cpp applies on the base GGUF with its output
    layer written out (untied_gguf: the same model). The export's lora-gguf/ holds that base and a small LoRA; base
    + LoRA give the merged model's logits, and every validation row passes."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.serving.lora import untied_gguf
    from pipelines.workspace import Workspace

    tied = tied_copy(spm_llama_dir, tmp_path / "tied")
    adapter = token_rows_adapter(tied, tmp_path / "adapter", [2, 60, 80, 95])
    assert ex.adapter_problem(adapter) is None and ex.needs_untied_base(adapter, tied)
    ws = Workspace.open(tmp_path / "ws")
    req = ex.ExportRequest(source=str(adapter), name="rows", outtypes=["f16"], quants=[], validate=True,
                           base_model=str(tied))
    result = ex.export(ws, req)
    folder = Path(result.folder) / ex.LORA_FOLDER
    base_gguf, lora = folder / "rows-base-f16.gguf", folder / "rows-lora.gguf"
    assert sorted(p.name for p in folder.glob("*.gguf")) == [base_gguf.name, lora.name]
    assert not list(folder.glob(".*"))
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(base_gguf)).tensors}
    assert untied_gguf(base_gguf, tmp_path / "again.gguf") == base_gguf  # it has its output layer already
    names = {t.name: list(t.shape) for t in gguf.GGUFReader(str(lora)).tensors}
    assert names["output.weight.lora_a"] == [32, 4] and names["output.weight.lora_b"] == [4, 400]
    assert lora.stat().st_size < 64_000
    ids = [1, 50, 60, 70, 80, 90, 100, 95]
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(tied)(torch.tensor([ids])).logits[0].numpy()
        want = AutoModelForCausalLM.from_pretrained(result.merged)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(_logits(base_gguf, ids) - base).max() < 0.01  # the same model (f16)
    got, effect = _logits(base_gguf, ids, lora), np.abs(want - base).max()
    assert effect > 1 and np.abs(got - want).max() < 0.02 * effect, (np.abs(got - want).max(), effect)
    est = json.loads((Path(result.folder) / "export.json").read_text())["estimate"]["parts"]["base f16 (for the LoRA)"]
    assert abs(est / base_gguf.stat().st_size - 1) < 0.10  # the output layer counted
    items = {i["name"]: i for i in result.lora["validation"]["items"]}
    for name in ("loads", "chat_template", "perplexity", "merged_match"):
        assert items[name]["ok"] is True, items[name]
    # validated on a tied GGUF (the merged one), the LoRA is refused with the reason - llama-cpp-python would crash
    from pipelines.export.validate import validate

    stray = tmp_path / "stray-lora.gguf"
    stray.write_bytes(lora.read_bytes())
    v = validate(Path(result.ggufs[0]), lora=stray)
    loads = next(i for i in v.items if i.name == "loads")
    assert loads.ok is False and "output.weight" in loads.detail and "output layer written out" in loads.detail
