"""A run's adapter on llama.cpp: when the run's base model was made from a GGUF, `open_adapter` serves the adapter
as a LoRA GGUF on that GGUF in its worker process - answering like transformers + PEFT, switched per answer without
reloading the base, kept across a worker crash, with the template the adapter was trained with; an adapter
llama.cpp cannot take falls back to transformers, saying why; wrong files are refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from tiny_models import make_adapter, text_only_copy, tied_copy, token_rows_adapter

from pipelines import adapters, chat, models
from pipelines import device as devicemod
from pipelines.errors import BadInput
from pipelines.training import TrainConfig

pytestmark = pytest.mark.slow
GREEDY = dict(temperature=0.0, repetition_penalty=1.0, max_new_tokens=20)
HELLO = [{"role": "user", "content": "hello world, how are you"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_llama_dir):
    """A base HF folder made from a GGUF (its mactuner.json names it, as the default model's HF copy does), two runs
    with adapters on it, and a registry. HF models load in float32, like the GGUF (a CPU with native bf16 would
    answer in bfloat16, whose rounding moves the near ties of a random model)."""
    from pipelines.export.convert import convert
    from pipelines.serving.registry import ModelRegistry
    from pipelines.workspace import Workspace

    root = tmp_path_factory.mktemp("serving-lora")
    base = text_only_copy(spm_llama_dir, root / "base")
    gguf = convert(base, root / "gguf", "f32", stem="base")
    (base / "mactuner.json").write_text(json.dumps({"source": str(gguf)}))
    ws = Workspace.open(root / "ws")
    runs = {}
    for name, seed in (("r1", 5), ("r2", 9)):
        run = ws.runs / name
        run.mkdir(parents=True)
        TrainConfig(base_model=str(base), dataset="x").to_yaml(run / "config.yaml")
        make_adapter(base, run / "adapter", seed=seed)
        runs[name] = run
    reg = ModelRegistry()
    with pytest.MonkeyPatch.context() as mp:
        f32 = dataclasses.replace(devicemod.profile(), infer_dtype="float32")
        mp.setattr(devicemod, "profile", lambda refresh=False: f32)
        yield ws, reg, base, gguf, runs
        for name in reg.names():
            reg.unload(name)


def answer(lm, adapter=None, messages=HELLO) -> str:
    return chat.chat(lm, messages, chat.ChatParams(adapter=adapter, **GREEDY)).text


@pytest.fixture(scope="module")
def peft_answers(setup):
    """What today's path answers: transformers on the HF base, with each run's PEFT adapter and without."""
    ws, _reg, base, _gguf, runs = setup
    lm = models.load_hf(base)
    try:
        for name, run in runs.items():
            adapters.attach_adapter(lm, run / "adapter", name)
        return {name: answer(lm, name) for name in (None, *runs)}
    finally:
        lm.backend.close()


def test_a_run_answers_on_its_base_gguf_like_peft(setup, peft_answers):
    ws, reg, _base, gguf, runs = setup
    lm, name, note = adapters.open_adapter(ws, reg, str(runs["r1"]), current=True)
    assert lm.backend_kind == "llama.cpp" and Path(lm.model_path) == gguf.resolve() and name == "r1"
    assert "loaded" in note and "LoRA GGUF" in note and "llama.cpp" in note
    assert peft_answers["r1"] != peft_answers[None]  # the adapter changes the answer...
    assert answer(lm, "r1") == peft_answers["r1"]  # ...as on transformers + PEFT
    assert answer(lm) == peft_answers[None]  # the bare base, on the same process
    assert [a.name for a in chat.list_adapters(lm)] == ["r1"]
    assert adapters.open_adapter(ws, reg, str(runs["r1"] / "adapter"))[:2] == (lm, "r1")  # attached already


def test_switching_adapters_never_reloads_the_base(setup, peft_answers):
    ws, reg, _base, _gguf, runs = setup
    lm, _, _ = adapters.open_adapter(ws, reg, str(runs["r1"]))
    pid = lm.describe()["worker"]["pid"]
    lm2, name, note = adapters.open_adapter(ws, reg, str(runs["r2"]))
    assert lm2 is lm and name == "r2" and "loaded" not in note  # the same model process takes a second LoRA
    for adapter in ("r2", None, "r1", "r2", "r1"):
        assert answer(lm, adapter) == peft_answers[adapter], adapter
    assert lm.describe()["worker"]["pid"] == pid and lm.describe()["worker"]["restarts"] == 0


def test_a_worker_crash_keeps_the_adapters(setup, peft_answers):
    ws, reg, _base, _gguf, runs = setup
    lm, _, _ = adapters.open_adapter(ws, reg, str(runs["r2"]))
    os.kill(lm.describe()["worker"]["pid"], signal.SIGKILL)
    r = chat.chat(lm, HELLO, chat.ChatParams(adapter="r2", **GREEDY))
    assert "reload" in r.note and r.text == peft_answers["r2"]  # restarted with its LoRAs, answered after the reload
    assert answer(lm, "r1") == peft_answers["r1"]


def test_the_adapter_answers_with_the_template_it_was_trained_with(setup):
    ws, reg, _base, gguf, runs = setup
    run = ws.runs / "templated"
    shutil.copytree(runs["r1"], run)
    (run / "adapter" / "chat_template.jinja").write_text(
        "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}<<assistant>>")
    lm, name, _ = adapters.open_adapter(ws, reg, str(run))
    own, _ = chat.chat_template_of(lm)
    tpl, source = chat.chat_template_of(lm, name)
    assert tpl.startswith("{% for m in messages %}<<") and own != tpl and "trained with" in source
    p = chat.build_prompt(lm, HELLO, chat.ChatParams(adapter=name))
    assert p.text == "<<user>> hello world, how are you\n<<assistant>>"
    assert not chat.build_prompt(lm, HELLO, chat.ChatParams()).text.startswith("<<")  # the base keeps its own
    chat.detach_adapter(lm, name)
    assert name not in [a.name for a in chat.list_adapters(lm)]


def test_an_adapter_llama_cpp_cannot_take_falls_back_to_transformers(setup):
    ws, reg, base, _gguf, runs = setup
    run = ws.runs / "dora"
    shutil.copytree(runs["r1"], run)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    lm, name, note = adapters.open_adapter(ws, reg, str(run))
    assert lm.backend_kind == "transformers" and Path(lm.model_path) == base.resolve() and name == "dora"
    assert "transformers answers" in note and "DoRA" in note


def _rows_run(ws, base: Path, name: str, token_ids: list[int], seed: int = 11) -> Path:
    run = ws.runs / name
    run.mkdir()
    TrainConfig(base_model=str(base), dataset="x").to_yaml(run / "config.yaml")
    token_rows_adapter(base, run / "adapter", token_ids, seed=seed)
    return run


def _peft_answer(base: Path, run: Path) -> tuple[str, str]:
    """(the bare base's answer, the answer with the run's adapter) through transformers + PEFT."""
    lm = models.load_hf(base)
    try:
        adapters.attach_adapter(lm, run / "adapter", run.name)
        return answer(lm), answer(lm, run.name)
    finally:
        lm.backend.close()


def _prompt_ids(base: Path) -> list[int]:
    lm = models.load_hf(base)
    try:
        return chat.build_prompt(lm, HELLO, chat.ChatParams(**GREEDY)).token_ids
    finally:
        lm.backend.close()


def test_trained_token_rows_answer_on_the_base_gguf_in_its_lora(setup, peft_answers):
    """Rows of the embedding an adapter trained outright, on a model with its own output layer: a token_embd pair in
    the LoRA GGUF - the base GGUF answers with it in the same worker, like transformers + PEFT, and no copy of the
    GGUF is written."""
    ws, reg, base, gguf, _runs = setup
    run = _rows_run(ws, base, "rows", sorted(set(_prompt_ids(base)[2:6])))
    _bare, want = _peft_answer(base, run)
    assert want != peft_answers[None]
    lm, name, note = adapters.open_adapter(ws, reg, str(run))
    assert lm.backend_kind == "llama.cpp" and Path(lm.model_path) == gguf.resolve()
    assert "trained token row(s) included" in note
    assert answer(lm, name) == want
    assert not list((ws.tmp / "lora-gguf").glob("*-*.gguf"))  # no copy of the base GGUF


def test_trained_token_rows_of_a_tied_output_layer_answer_on_the_untied_base(setup, spm_llama_dir):
    """A tied output layer (the quick start's Gemma and its <end_of_turn>) changes with the trained rows too: the
    LoRA GGUF answers on one copy of the base GGUF with its output layer written out - like transformers + PEFT,
    and a second such adapter is switched per answer on the same process, without a copy of its own."""
    from transformers import AutoTokenizer

    from pipelines.export.convert import convert

    ws, reg, _base, _gguf, _runs = setup
    base = tied_copy(spm_llama_dir, ws.root.parent / "tied-base")
    gguf = convert(base, ws.root.parent / "tied-gguf", "f32", stem="tied")
    (base / "mactuner.json").write_text(json.dumps({"source": str(gguf)}))
    lm_hf = models.load_hf(base)
    try:
        bare = answer(lm_hf)
    finally:
        lm_hf.backend.close()
    # rows of the prompt but not of the bare answer (a tied model repeats the token whose row grew: ':' here)
    answered = set(AutoTokenizer.from_pretrained(base).convert_tokens_to_ids(sorted(set(bare))))
    rows = sorted(set(_prompt_ids(base)[2:8]) - answered)
    runs = [_rows_run(ws, base, "tied-rows", rows), _rows_run(ws, base, "tied-rows2", rows, seed=2)]
    want = [_peft_answer(base, run)[1] for run in runs]
    assert bare not in want and want[0] != want[1]
    lm, name, note = adapters.open_adapter(ws, reg, str(runs[0]))
    assert lm.backend_kind == "llama.cpp" and Path(lm.model_path).name.startswith(adapters.UNTIED)
    assert Path(lm.model_path).parent == ws.tmp / "lora-gguf"
    assert "token row" in note and "untied" in note and "untied" in lm.name
    assert answer(lm, name) == want[0]
    pid = lm.describe()["worker"]["pid"]
    lm2, name2, _ = adapters.open_adapter(ws, reg, str(runs[1]))
    assert lm2 is lm and lm.describe()["worker"]["pid"] == pid
    assert [answer(lm, n) for n in (name2, name, None)] == [want[1], want[0], bare]
    assert len(list((ws.tmp / "lora-gguf").glob(f"{adapters.UNTIED}*"))) == 1
    # on the tied GGUF itself llama.cpp finds no output.weight for the LoRA: refused with the reason, no crash
    lora = Path(lm.backend.adapters[name].path)
    reg.unload(lm.name)
    plain = reg.load(str(gguf), ws, name="tied-plain", replace=False, current=False)
    try:
        with pytest.raises(BadInput, match="could not load the adapter"):
            chat.attach_adapter(plain, lora, "rows-on-tied")
        assert answer(plain) == bare and plain.describe()["worker"]["restarts"] == 0
    finally:
        reg.unload(plain.name)


def test_old_lora_gguf_files_are_pruned(tmp_path):
    """tmp/lora-gguf/ keeps the LoRAs of adapter versions still on disk, the newest untied copies of a base GGUF and
    what a loaded model uses; the rest (adapters gone or trained again, LoRAs written by an earlier version of the
    format, files of unknown origin, old temporary files) goes."""
    from pipelines.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    folder = ws.tmp / "lora-gguf"
    folder.mkdir(parents=True)
    now = time.time()

    def version(key: str, age_s: float, present: bool = True, fmt: int | None = adapters.LORA_FORMAT) -> str:
        adapter = tmp_path / "adapters" / key
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"w")
        st = (adapter / "adapter_model.safetensors").stat()
        key = key.ljust(20, "0")
        rec = {"adapter": str(adapter), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns + (0 if present else 1)}
        if fmt is not None:  # records of the first format had no "format" (their LoRAs lack the token rows)
            rec["format"] = fmt
        (folder / f"{key}.json").write_text(json.dumps(rec))
        for f in (f"{key}.gguf", f"{adapters.UNTIED}{key}.gguf"):  # its LoRA, a copy of a base
            (folder / f).write_bytes(b"gguf")
            os.utime(folder / f, (now - age_s, now - age_s))
        return key

    new, mid, old, used = version("new", 10), version("mid", 20), version("old", 30), version("used", 40)
    gone = version("gone", 5, present=False)
    earlier = version("earlier", 15, fmt=None)
    (folder / f"{new}-base.gguf").write_bytes(b"a copy as written before")
    (folder / f"{'f' * 20}.gguf").write_bytes(b"unknown")
    (folder / ".fresh.tmp").write_bytes(b"")
    (folder / ".stale.tmp").write_bytes(b"")
    os.utime(folder / ".stale.tmp", (now - 7 * 3600, now - 7 * 3600))
    removed = {p.name for p in adapters.prune_lora_cache(ws, {(folder / f"{adapters.UNTIED}{used}.gguf").resolve()})}
    # the copies kept: the one in use and the 2 newest others (gone's is newest: a copy is the base's, not an
    # adapter's); the LoRAs kept: those of adapters still there
    assert removed == {f"{adapters.UNTIED}{mid}.gguf", f"{adapters.UNTIED}{old}.gguf", f"{gone}.json",
                       f"{gone}.gguf", f"{new}-base.gguf", f"{'f' * 20}.gguf", ".stale.tmp", f"{earlier}.json",
                       f"{earlier}.gguf", f"{adapters.UNTIED}{earlier}.gguf"}
    assert {p.name for p in folder.glob("*.gguf") if not p.name.startswith(adapters.UNTIED)} == {
        f"{k}.gguf" for k in (new, mid, old, used)}


def test_wrong_adapter_files_on_a_gguf_model_are_refused(setup, tmp_path):
    ws, reg, _base, gguf, runs = setup
    lm, _, _ = adapters.open_adapter(ws, reg, str(runs["r1"]))
    with pytest.raises(BadInput, match="LoRA GGUF file .* not a PEFT folder"):
        chat.attach_adapter(lm, runs["r1"] / "adapter", "peft")
    with pytest.raises(BadInput, match="not a LoRA adapter GGUF"):
        chat.attach_adapter(lm, gguf, "base-itself")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf at all\n" * 10)
    with pytest.raises(BadInput, match="not a readable GGUF"):
        chat.attach_adapter(lm, fake, "fake")
    assert "peft" not in [a.name for a in chat.list_adapters(lm)]
