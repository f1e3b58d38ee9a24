"""pipelines/device.py: each backend branch of detect() with simulated torch modules, and the memory estimates."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from pipelines import device as devicemod
from pipelines.device import GiB, ModelShape, detect, estimate_memory, lora_params, recommend_batch_size

MiB = 1024**2

# ---------------------------------------------------------------------------------------------- simulated hosts


@pytest.fixture
def host(monkeypatch):
    """A 16 GiB machine with 10 GiB free and 8 physical cores (12 logical), whatever this machine is."""
    vm = SimpleNamespace(total=16 * GiB, available=10 * GiB)
    fake = SimpleNamespace(virtual_memory=lambda: vm, cpu_count=lambda logical=True: 12 if logical else 8)
    monkeypatch.setattr(devicemod, "psutil", fake)
    return vm


def _no_cuda():
    return SimpleNamespace(is_available=lambda: False)


def mps_torch(macos=(14, 2), recommended=12 * GiB, allocated=4 * GiB, old_torch=False):
    """torch on Apple silicon: MPS available; `old_torch` lacks recommended_max_memory and is_macos_or_newer."""
    mps_backend = SimpleNamespace(is_available=lambda: True)
    mps_module = SimpleNamespace()
    if not old_torch:
        mps_backend.is_macos_or_newer = lambda major, minor=0: tuple(macos) >= (major, minor)
        mps_module.recommended_max_memory = lambda: recommended
        mps_module.driver_allocated_memory = lambda: allocated
    return SimpleNamespace(backends=SimpleNamespace(mps=mps_backend), mps=mps_module, cuda=_no_cuda())


def cuda_torch(bf16=True, free=70 * GiB, total=80 * GiB, name="NVIDIA A100-SXM4-80GB"):
    """torch on a Linux CUDA box: backends.mps exists but is not available (as in real Linux builds)."""
    cuda = SimpleNamespace(is_available=lambda: True, mem_get_info=lambda: (free, total),
                           is_bf16_supported=lambda: bf16, get_device_name=lambda index=0: name)
    return SimpleNamespace(backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)), cuda=cuda)


def cpu_torch():
    return SimpleNamespace(backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)), cuda=_no_cuda())


CPUINFO_BF16 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_tile\n")
CPUINFO_AMX = "flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
CPUINFO_PLAIN = ("processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-8700\n"
                 "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma\n")


@pytest.fixture
def bnb_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))


@pytest.fixture
def bnb_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


# ---------------------------------------------------------------------------------------------------- detect


def test_mps_on_macos_14_trains_in_bf16(host):
    p = detect(torch=mps_torch(macos=(14, 2)))
    assert (p.kind, p.torch_device) == ("mps", "mps")
    assert p.bf16 is True and p.fp16 is True
    assert p.train_dtype == "bfloat16" and p.infer_dtype == "float16"
    assert p.total_memory == 12 * GiB  # recommended_max_memory, not the 16 GiB of RAM
    assert p.available_memory == 8 * GiB  # 12 GiB limit - 4 GiB the driver holds (< 10 GiB free RAM)
    assert (p.system_total, p.system_available, p.physical_cores, p.threads) == (16 * GiB, 10 * GiB, 8, 8)
    assert p.qlora is False and "CUDA" in p.qlora_reason and "LoRA" in p.qlora_reason
    assert p.name.startswith("Apple") and "Metal" in p.name


def test_mps_before_macos_14_trains_in_float32(host):
    p = detect(torch=mps_torch(macos=(13, 6)))
    assert p.kind == "mps"
    assert p.bf16 is False
    assert p.train_dtype == "float32" and p.infer_dtype == "float16"
    assert p.qlora is False


def test_mps_available_memory_is_capped_by_free_ram(host):
    p = detect(torch=mps_torch(recommended=12 * GiB, allocated=0))
    assert p.available_memory == 10 * GiB  # min(12 GiB - 0, 10 GiB free)


def test_mps_on_old_torch_falls_back_to_ram_and_float32(host):
    p = detect(torch=mps_torch(old_torch=True))
    assert p.kind == "mps"
    assert p.total_memory == 16 * GiB  # no recommended_max_memory(): the whole unified memory
    assert p.available_memory == 10 * GiB
    assert p.bf16 is False and p.train_dtype == "float32"


@pytest.mark.usefixtures("bnb_installed")
def test_cuda_with_bf16_and_bitsandbytes(host):
    p = detect(torch=cuda_torch(bf16=True, free=70 * GiB, total=80 * GiB))
    assert (p.kind, p.torch_device, p.name) == ("cuda", "cuda", "NVIDIA A100-SXM4-80GB")
    assert p.total_memory == 80 * GiB and p.available_memory == 70 * GiB
    assert p.bf16 is True and p.fp16 is True
    assert p.train_dtype == p.infer_dtype == "bfloat16"
    assert p.qlora is True and p.qlora_reason == ""


@pytest.mark.usefixtures("bnb_installed")
def test_cuda_without_bf16_uses_float16(host):
    p = detect(torch=cuda_torch(bf16=False, free=14 * GiB, total=15 * GiB, name="Tesla T4"))
    assert p.kind == "cuda" and p.name == "Tesla T4"
    assert p.bf16 is False
    assert p.train_dtype == p.infer_dtype == "float16"
    assert p.qlora is True


@pytest.mark.usefixtures("bnb_missing")
def test_cuda_without_bitsandbytes_has_no_qlora_and_says_why(host):
    p = detect(torch=cuda_torch())
    assert p.kind == "cuda"
    assert p.qlora is False
    assert "bitsandbytes" in p.qlora_reason and "pip install bitsandbytes" in p.qlora_reason


def test_cuda_profile_without_mps_backend_attribute(host):
    """A torch build with no backends.mps at all (older Linux wheels) still reaches the CUDA branch."""
    t = cuda_torch()
    t.backends = SimpleNamespace()
    assert detect(torch=t).kind == "cuda"


def test_cpu_with_native_bf16_infers_in_bf16_and_calibrates_training(host):
    p = detect(torch=cpu_torch(), cpuinfo=CPUINFO_BF16)
    assert (p.kind, p.torch_device) == ("cpu", "cpu")
    assert p.bf16 is True and p.fp16 is False
    assert p.infer_dtype == "bfloat16" and p.train_dtype == "float32"
    assert p.total_memory == 16 * GiB and p.available_memory == 10 * GiB
    assert p.qlora is False and "CUDA" in p.qlora_reason
    # the profile's own training dtype stays float32; dtype "auto" asks device.train_dtype (test_precision.py)
    assert len(p.notes) == 1 and "AVX512-BF16" in p.notes[0] and "calibration" in p.notes[0]


def test_cpu_without_bf16_is_float32_throughout(host):
    p = detect(torch=cpu_torch(), cpuinfo=CPUINFO_PLAIN)
    assert p.kind == "cpu"
    assert p.bf16 is False
    assert p.infer_dtype == p.train_dtype == "float32"
    assert p.qlora is False and p.qlora_reason
    assert "No native bf16" in p.notes[0] and "emulated" in p.notes[0]


@pytest.mark.parametrize("cpuinfo, native", [
    (CPUINFO_BF16, True), (CPUINFO_AMX, True), (CPUINFO_PLAIN, False), ("", False),
    ("model name\t: X\n", False),
    ("flags\t\t: avx2 avx512f\nflags\t\t: avx512_bf16\n", False),  # only the first flags line counts
])
def test_cpu_bf16_flag_parsing(cpuinfo, native):
    assert devicemod._cpu_has_native_bf16(cpuinfo) is native


def test_profile_as_dict_is_json_serializable(host):
    d = detect(torch=cpu_torch(), cpuinfo=CPUINFO_PLAIN).as_dict()
    assert json.loads(json.dumps(d))["kind"] == "cpu"
    assert {"kind", "train_dtype", "infer_dtype", "qlora", "qlora_reason", "notes", "threads"} <= set(d)


def test_detect_on_this_machine_with_real_torch():
    import torch

    p = detect(torch=torch)
    assert p.kind in ("cpu", "cuda", "mps")
    assert 0 < p.available_memory <= p.system_total or p.kind == "cuda"
    assert p.threads >= 1 and p.physical_cores >= 1
    if p.kind == "cpu":
        assert p.train_dtype == "float32"
        assert p.bf16 == devicemod._cpu_has_native_bf16()


# --------------------------------------------------------------------------------------------------- shapes

# Gemma 3 270M as published: 268,098,176 parameters, hidden 640, 18 layers, 4 heads of 256 (1 kv head),
# intermediate 2048, vocabulary 262,144.
GEMMA_270M = ModelShape(n_params=268_098_176, hidden_size=640, num_layers=18, vocab_size=262_144,
                        intermediate_size=2048, num_kv_heads=1, head_dim=256)


def test_model_shape_from_tiny_llama_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    s = ModelShape.from_config(cfg)
    assert (s.hidden_size, s.num_layers, s.vocab_size, s.intermediate_size, s.num_kv_heads, s.head_dim) == (
        32, 2, 300, 64, 2, 8)
    # no count given: 2 layers x (q,o: 2 x 32x32 + k,v: 2 x 32x16 (2 kv heads of 8) + mlp: 3 x 32x64) + 300 x 32
    assert s.n_params == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 300 * 32 == 28_032
    assert ModelShape.from_config(cfg, n_params=37_792).n_params == 37_792


def test_model_shape_from_saved_tiny_llama(tiny_llama_dir):
    from transformers import AutoConfig

    s = ModelShape.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    assert (s.hidden_size, s.num_layers, s.num_kv_heads, s.head_dim, s.intermediate_size) == (32, 2, 2, 8, 64)
    assert s.vocab_size == 300


def test_model_shape_from_gemma3_config_uses_explicit_head_dim():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=256, intermediate_size=2048, vocab_size=262_144)
    s = ModelShape.from_config(cfg)
    assert s.head_dim == 256  # not 640 / 4
    assert s.num_kv_heads == 1
    assert s.n_params == 268_042_240  # formula; the real model has 268,098,176 (norms are not counted)
    assert abs(s.n_params - GEMMA_270M.n_params) / GEMMA_270M.n_params < 0.001


def test_model_shape_reads_text_config_of_multimodal_configs():
    text = SimpleNamespace(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=256, intermediate_size=2048, vocab_size=262_144)
    s = ModelShape.from_config(SimpleNamespace(text_config=text, hidden_size=1152), n_params=1)
    assert s.hidden_size == 640 and s.vocab_size == 262_144


def test_model_shape_guess_is_plausible():
    s = ModelShape.guess(268_000_000)
    assert s.hidden_size == 1024 and s.num_layers == 21 and s.head_dim == 64 and s.num_kv_heads == 16


def test_lora_params_match_peft_on_the_tiny_llama(tiny_llama_dir):
    """The adapter count of lora_params equals what peft really creates on all seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rank = 4
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(ModelShape.from_config(model.config), rank) == trainable == 2 * 512 * rank


def test_lora_params_match_peft_when_heads_times_head_dim_differs_from_hidden():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    rank = 4
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 2 * rank * ((32 + 64) + (32 + 16) * 2 + (64 + 32) + (32 + 64) * 3)
    assert lora_params(ModelShape.from_config(cfg), rank) == trainable


# ------------------------------------------------------------------------------------------------ estimates


def test_estimate_for_270m_includes_the_full_width_logits():
    est = estimate_memory(GEMMA_270M, "lora", "float32", seq_len=256, batch_size=4)
    tokens = 256 * 4
    logits = tokens * 262_144 * 4 * 2  # fp32 logits kept for the softmax backward: exactly 2 GiB
    assert logits == 2 * GiB
    per_layer = 34 * tokens * 640 * 4 // 2  # 44,564,480 bytes
    assert est.activations == per_layer * 18 + logits == 2_949_644_288
    assert est.weights == 268_098_176 * 4
    # rank 16 on q, k, v, o, gate, up, down: 18 x 16 x (1280 + 896 + 896 + 1280 + 2688 x 3) adapter params
    assert est.trainable == lora_params(GEMMA_270M, 16) * 16 == 3_575_808 * 16
    assert est.overhead == int(0.1 * (est.weights + est.trainable + est.activations)) + 300 * MiB
    assert est.total == est.weights + est.trainable + est.activations + est.overhead
    assert est.total == 4_801_747_712  # about 4.5 GiB for LoRA on a 270M model at seq 256 x batch 4
    assert est.fits is True and est.mode == "lora"


def test_estimate_fits_flag_uses_available():
    est = estimate_memory(GEMMA_270M, "lora", "float32", 256, 4, available=4 * GiB)
    assert est.fits is False
    assert estimate_memory(GEMMA_270M, "lora", "float32", 256, 4, available=8 * GiB).fits is True


@pytest.mark.parametrize("mode", ["inference", "lora", "qlora"])
def test_estimate_is_monotonic_in_batch_and_sequence(mode):
    dtype = "bfloat16" if mode == "qlora" else "float32"
    by_batch = [estimate_memory(GEMMA_270M, mode, dtype, 256, b).total for b in (1, 2, 4, 8, 16)]
    by_seq = [estimate_memory(GEMMA_270M, mode, dtype, s, 2).total for s in (64, 128, 256, 512, 1024, 2048)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)


def test_qlora_weights_are_smaller_than_lora_weights():
    lora = estimate_memory(GEMMA_270M, "lora", "bfloat16", 512, 1)
    qlora = estimate_memory(GEMMA_270M, "qlora", "bfloat16", 512, 1)
    assert qlora.weights == int(268_098_176 * 0.5625) == 150_805_224  # 4.5 bits per parameter
    assert lora.weights == 268_098_176 * 2
    assert qlora.weights < lora.weights
    assert qlora.trainable == lora.trainable  # same adapters either way
    assert qlora.total < lora.total


def test_gradient_checkpointing_reduces_activations():
    plain = estimate_memory(GEMMA_270M, "lora", "float32", 512, 4)
    ckpt = estimate_memory(GEMMA_270M, "lora", "float32", 512, 4, gradient_checkpointing=True)
    assert ckpt.activations < plain.activations
    assert ckpt.weights == plain.weights and ckpt.trainable == plain.trainable
    tokens = 512 * 4
    logits = tokens * 262_144 * 8
    # one layer's full activations + every layer's checkpointed input instead of 18 layers' full activations
    assert ckpt.activations == 34 * tokens * 640 * 2 + tokens * 640 * 4 * 18 + logits
    assert plain.activations - ckpt.activations == 34 * tokens * 640 * 2 * 17 - tokens * 640 * 4 * 18


def test_inference_needs_less_than_lora():
    inf = estimate_memory(GEMMA_270M, "inference", "float32", 512, 1)
    lora = estimate_memory(GEMMA_270M, "lora", "float32", 512, 1)
    assert inf.trainable == 0
    assert inf.total < lora.total
    # KV cache (2 x 18 layers x 512 tokens x 1 kv head x 256 x 4 B) + last-position logits + 4 hidden states
    assert inf.activations == 2 * 18 * 512 * 256 * 4 + 262_144 * 4 + 4 * 512 * 640 * 4


def test_estimate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        estimate_memory(GEMMA_270M, "full")


def test_recommend_batch_size_is_largest_power_of_two_that_fits():
    totals = {b: estimate_memory(GEMMA_270M, "lora", "float32", 256, b).total for b in (1, 2, 4, 8, 16)}
    # just enough for batch 4 within the 80 % headroom, not for 8
    available = int(totals[4] / 0.8) + 1
    assert totals[8] > available * 0.8
    assert recommend_batch_size(GEMMA_270M, available, "lora", "float32", 256) == 4
    assert recommend_batch_size(GEMMA_270M, int(totals[8] / 0.8) + 1, "lora", "float32", 256) == 8
    assert recommend_batch_size(GEMMA_270M, int(totals[1] / 0.8) + 1, "lora", "float32", 256) == 1


def test_recommend_batch_size_is_zero_when_nothing_fits():
    assert recommend_batch_size(GEMMA_270M, 1 * GiB, "lora", "float32", 256) == 0
    assert recommend_batch_size(GEMMA_270M, 0, "qlora", "bfloat16", 256) == 0


def test_recommend_batch_size_respects_max_batch_and_headroom():
    huge = 1024 * GiB
    assert recommend_batch_size(GEMMA_270M, huge, "lora", "float32", 256) == 64
    assert recommend_batch_size(GEMMA_270M, huge, "lora", "float32", 256, max_batch=48) == 32
    total4 = estimate_memory(GEMMA_270M, "lora", "float32", 256, 4).total
    assert recommend_batch_size(GEMMA_270M, total4, "lora", "float32", 256, headroom=1.0) == 4
    assert recommend_batch_size(GEMMA_270M, total4, "lora", "float32", 256, headroom=0.8) == 2
