"""Device profile: which accelerator we run on (MPS > CUDA > CPU), how much memory there is, which dtype and
thread count each stage should use, which training backend (torch | mlx) and why (backend.py, re-exported here), and
how much memory a model needs for inference, LoRA and QLoRA (bitsandbytes 4-bit, or MLX's 4-/8-bit bases in unified
memory).

Every stage asks this module instead of deciding on its own. `detect()` takes the torch module as an argument
so tests can simulate each backend; `python -m pipelines.device` prints the profile of this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .backend import (  # noqa: F401 - the backend choice is the device profile's too: device.choose_backend(...)
    BackendChoice,
    apple_silicon,
    choose_backend,
    mlx_install_hint,
    mlx_installed,
    mlx_train_dtype,
)
from .errors import BadInput

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.5}


@dataclass
class DeviceProfile:
    kind: str  # "mps" | "cuda" | "cpu"
    name: str
    total_memory: int  # bytes usable by the device (GPU memory on CUDA; unified memory on MPS; RAM on CPU)
    available_memory: int
    system_total: int
    system_available: int
    physical_cores: int
    bf16: bool  # native bf16 compute
    fp16: bool
    train_dtype: str
    infer_dtype: str
    threads: int
    qlora: bool  # bitsandbytes 4-bit training possible here
    qlora_reason: str = ""
    notes: list[str] = field(default_factory=list)
    backend: str = "torch"  # the training backend "auto" picks here (choose_backend)
    backend_reason: str = ""

    @property
    def torch_device(self) -> str:
        return self.kind

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (from /proc/cpuinfo on Linux; empty elsewhere): {"avx2", "avx512_bf16", "amx_int8", ...}."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is 15-20x slower than fp32."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def detect(torch=None, cpuinfo: str | None = None) -> DeviceProfile:
    """Profile the best available device. `torch` and `cpuinfo` can be replaced to simulate other machines."""
    prof = _detect_device(torch, cpuinfo)
    choice = choose_backend("auto", prof)
    prof.backend, prof.backend_reason = choice.name, choice.reason
    return prof


def _detect_device(torch=None, cpuinfo: str | None = None) -> DeviceProfile:
    if torch is None:
        import torch  # noqa: PLC0415 - torch import is slow; only pay it when asked
    vm = psutil.virtual_memory()
    cores = cpu_threads()
    common = dict(system_total=vm.total, system_available=vm.available, physical_cores=cores, threads=cores)

    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and mps.is_available():
        # Unified memory: the GPU may use up to recommended_max_memory() of the system RAM.
        limit = vm.total
        try:
            limit = int(torch.mps.recommended_max_memory()) or vm.total
        except (AttributeError, RuntimeError):
            pass
        used = 0
        try:
            used = int(torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            pass
        bf16 = False
        try:
            bf16 = bool(mps.is_macos_or_newer(14, 0))
        except AttributeError:
            pass
        return DeviceProfile(
            kind="mps", name=f"Apple {platform.machine()} GPU (Metal)", total_memory=limit,
            available_memory=max(0, min(limit - used, vm.available)), bf16=bf16, fp16=True,
            train_dtype="bfloat16" if bf16 else "float32", infer_dtype="float16",
            qlora=False, qlora_reason="bitsandbytes 4-bit kernels need CUDA; on Apple silicon use LoRA.",
            **common,
        )

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        bf16 = bool(torch.cuda.is_bf16_supported())
        qlora, reason = True, ""
        try:
            import bitsandbytes  # noqa: F401, PLC0415
        except ImportError:
            qlora, reason = False, "bitsandbytes is not installed (pip install bitsandbytes) - LoRA works meanwhile."
        dtype = "bfloat16" if bf16 else "float16"
        return DeviceProfile(
            kind="cuda", name=torch.cuda.get_device_name(0), total_memory=int(total), available_memory=int(free),
            bf16=bf16, fp16=True, train_dtype=dtype, infer_dtype=dtype, qlora=qlora, qlora_reason=reason, **common,
        )

    bf16 = _cpu_has_native_bf16(cpuinfo)
    # The profile says float32 for training on a CPU; dtype "auto" asks train_dtype(), which measures bf16 against
    # float32 on this CPU once (cached) - emulated bf16 was 15-20x slower, native bf16 matmuls 3.6x faster.
    infer = "bfloat16" if bf16 else "float32"
    notes = [
        "Native bf16 (AVX512-BF16/AMX): inference in bfloat16; training in bf16 mixed precision when a short "
        "calibration finds it faster, else float32."
        if bf16 else "No native bf16 on this CPU: float32 throughout (bf16 would be emulated, 15-20x slower)."
    ]
    return DeviceProfile(
        kind="cpu", name=cpu_name(), total_memory=vm.total, available_memory=vm.available, bf16=bf16, fp16=False,
        train_dtype="float32", infer_dtype=infer, qlora=False,
        qlora_reason="bitsandbytes 4-bit training needs a CUDA GPU; on this CPU use LoRA.", notes=notes, **common,
    )


_PROFILE: DeviceProfile | None = None


def profile(refresh: bool = False) -> DeviceProfile:
    """The profile of this machine, detected once (memory figures refreshed on request)."""
    global _PROFILE
    if _PROFILE is None or refresh:
        _PROFILE = detect()
    return _PROFILE


def cpu_threads() -> int:
    """Threads for CPU compute: the physical cores (hyper-threads only add contention). No torch import."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def in_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new thread that ends with it; returns its result or raises its exception.

    For torch work started from a long-lived thread (a server's worker pool). torch's OpenMP gives every thread
    that computes its own team of worker threads, kept as long as that thread lives; with teams left idle beside
    the one computing, the OpenMP runtime spins less and wakes threads late: on a 2-core CPU, generation after a
    load in a long-lived thread ran ~10% slower than after a load in a thread that had ended (~25% slower with a
    team left on the main thread). A thread that ends takes its team with it."""

    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=getattr(fn, "__name__", "torch-work"))
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


_FLOPS: dict[str, float] = {}


def matmul_flops(dtype: str = "float32") -> float:
    """Matmul speed of this device in FLOP/s (a 512x512 probe for about 0.2 s, measured once per dtype): the basis
    of time estimates. Runs in a thread of its own (see in_own_thread)."""
    if dtype not in _FLOPS:
        import torch  # noqa: PLC0415

        def probe():
            t = getattr(torch, dtype)
            a, b = torch.randn(512, 512, dtype=t), torch.randn(512, 512, dtype=t)
            a @ b
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.2:
                a @ b
                n += 1
            return 2 * 512**3 * n / (time.perf_counter() - t0)

        _FLOPS[dtype] = in_own_thread(probe)
    return _FLOPS[dtype]


# bf16 mixed precision speeds up the matmuls only (norms, dropout, softmax stay): worth it from this matmul speed-up
MIXED_MIN_SPEEDUP = 1.5
_CALIBRATION_VERSION = 1


CALIBRATION_FILE = "calibration.json"  # in the workspace's root: what this machine measured, per CPU and torch


def _calibration_key(prof: DeviceProfile) -> str:
    import torch  # noqa: PLC0415

    flags = ",".join(sorted(cpu_flags())) if prof.kind == "cpu" else ""
    raw = f"{_CALIBRATION_VERSION}|{prof.kind}|{prof.name}|{flags}|{torch.__version__}|{prof.threads}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _bf16_speedup_probe(threads: int) -> float:
    """bf16 vs float32 time of a LoRA-shaped step on this CPU: x @ W (frozen, 1024x2048) forward and the input
    gradient, under autocast for bf16 - about a second in all."""
    import torch  # noqa: PLC0415

    def probe():
        torch.set_num_threads(threads)
        times = {}
        for name in ("float32", "bfloat16"):
            dt = getattr(torch, name)
            w = torch.randn(2048, 1024, dtype=dt)
            x = torch.randn(512, 1024, requires_grad=True)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bfloat16" else contextlib.nullcontext()

            def step():
                with ctx:
                    y = torch.nn.functional.linear(x, w)
                y.float().sum().backward()

            step()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.3:
                step()
                n += 1
            times[name] = (time.perf_counter() - t0) / n
        return times["float32"] / times["bfloat16"]

    return in_own_thread(probe)


def train_dtype(prof: DeviceProfile | None = None, cache: Path | None = None,
                measure: bool = True) -> tuple[str | None, str]:
    """(dtype, why) for training with dtype "auto". A GPU takes its profile's choice (bf16 where supported); a CPU
    with native bf16 is measured once - bf16 vs float32 on a LoRA-shaped step, kept in the JSON file `cache` (the
    workspace's calibration.json) by CPU, torch version and threads - and trains in bf16 mixed precision when that
    is at least MIXED_MIN_SPEEDUP faster. The trainer measures (a child process: native kernels never run in the
    studio); measure=False (the studio's pre-flight, the Model tab) only reads: (None, why) while this CPU is not
    calibrated yet. MACTUNER_TRAIN_DTYPE=float32|bfloat16 overrides the choice (the test suite pins float32)."""
    prof = prof or profile()
    forced = os.environ.get("MACTUNER_TRAIN_DTYPE", "").strip()
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            raise BadInput(f"MACTUNER_TRAIN_DTYPE is {forced!r}: use float32, bfloat16 or float16 (or unset it).")
        return forced, f"set by MACTUNER_TRAIN_DTYPE={forced}"
    if prof.kind != "cpu":
        return prof.train_dtype, f"{prof.train_dtype} on this {prof.kind.upper()} device"
    if not prof.bf16:
        return "float32", "float32: this CPU has no native bf16"
    key = _calibration_key(prof)
    try:
        cached = json.loads(cache.read_text()) if cache else {}
    except (OSError, ValueError):
        cached = {}
    speedup = cached.get(key) if isinstance(cached, dict) else None
    if not isinstance(speedup, (int, float)):
        if not measure:
            return None, "bf16 mixed precision or float32, as a short calibration at the first training run finds"
        speedup = _bf16_speedup_probe(prof.threads)
        cached = {**(cached if isinstance(cached, dict) else {}), key: speedup}
        if cache is not None:
            with contextlib.suppress(OSError):
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cached))
                tmp.replace(cache)
    if speedup >= MIXED_MIN_SPEEDUP:
        return "bfloat16", f"bf16 mixed precision: calibrated {speedup:.1f}x float32 on this CPU"
    return "float32", f"float32: bf16 calibrated only {speedup:.1f}x float32 on this CPU"


def memory_in_use() -> tuple[int, int]:
    """(used, total) bytes of system memory right now."""
    vm = psutil.virtual_memory()
    return vm.total - vm.available, vm.total


# ---------------------------------------------------------------------------------------------- estimates


@dataclass
class ModelShape:
    """What the estimate needs to know of a model; `from_config` reads it from a transformers config."""

    n_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    num_heads: int = 0  # 0: hidden_size // head_dim

    @property
    def q_dim(self) -> int:
        """Width of the attention projections (heads x head_dim), which need not equal hidden_size (Gemma 3)."""
        if self.num_heads and self.head_dim:
            return self.num_heads * self.head_dim
        return self.hidden_size

    @classmethod
    def from_config(cls, config, n_params: int | None = None) -> "ModelShape":
        cfg = getattr(config, "text_config", None) or config
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        kv = int(getattr(cfg, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
        inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
        vocab = int(getattr(cfg, "vocab_size", 0))
        if n_params is None:
            q, kvw = heads * head_dim, kv * head_dim
            per_layer = 2 * hidden * q + 2 * hidden * kvw + 3 * hidden * inter
            n_params = layers * per_layer + vocab * hidden
        return cls(n_params, hidden, layers, vocab, inter, kv, head_dim, heads)

    @classmethod
    def guess(cls, n_params: int) -> "ModelShape":
        """A plausible decoder shape for a bare parameter count (used when no config is at hand)."""
        hidden = int(2 ** round(math.log2(max(256, (n_params / 12 / 24) ** 0.5))))
        layers = max(1, round(n_params / (12 * hidden * hidden)))
        return cls(n_params, hidden, layers, 32000, 4 * hidden, hidden // 64, 64)


@dataclass
class MemoryEstimate:
    mode: str
    weights: int
    trainable: int  # adapter weights + gradients + optimizer state
    activations: int
    overhead: int
    total: int
    fits: bool
    note: str = ""


def lora_params(shape: ModelShape, rank: int) -> int:
    """Adapter parameters for LoRA on all linear layers of the decoder (q, k, v, o, gate, up, down)."""
    h, i, q = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size, shape.q_dim
    kv = (shape.num_kv_heads * shape.head_dim) or h
    per_layer = rank * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)
    return per_layer * shape.num_layers


def estimate_memory(
    shape: ModelShape,
    mode: str = "lora",
    dtype: str = "float32",
    seq_len: int = 512,
    batch_size: int = 1,
    lora_rank: int = 16,
    gradient_checkpointing: bool = False,
    available: int | None = None,
    weight_bytes: int | None = None,
    base_bits: int = 0,
) -> MemoryEstimate:
    """Rough peak memory for `mode` in ("inference", "lora", "qlora"). Errs on the generous side.

    weights: params x bytes (4.5 bits per param for QLoRA's NF4 + scales); trainable: LoRA params in fp32 with
    grads and Adam moments (16 B each); activations: per layer ~34 bytes x tokens x hidden at 16-bit (scaled for
    fp32), kept for all layers unless gradient checkpointing; logits for the whole batch in fp32 (x2 for the
    softmax backward); inference adds the KV cache. Overhead: 10% + 300 MB for the runtime.
    `weight_bytes` replaces the weights' size for inference (a quantized GGUF file, say). `base_bits` 4 or 8: LoRA
    on an MLX-quantized base (affine, a float16 scale and bias per group of 64 weights: 4.5 or 8.5 bits per weight,
    the embedding included), computing in `dtype`.
    """
    if mode not in ("inference", "lora", "qlora"):
        raise ValueError(f"unknown mode {mode!r}")
    b = DTYPE_BYTES[dtype]
    tokens = seq_len * batch_size
    if mode == "inference" and weight_bytes:
        weights = int(weight_bytes)
    elif mode == "qlora":
        weights = int(shape.n_params * 0.5625)
    elif mode == "lora" and base_bits:
        weights = int(shape.n_params * (base_bits + 0.5) / 8)
    else:
        weights = int(shape.n_params * b)
    if mode == "inference":
        kv = shape.num_kv_heads * shape.head_dim or shape.hidden_size
        activations = int(2 * shape.num_layers * tokens * kv * b + batch_size * shape.vocab_size * 4
                          + 4 * tokens * shape.hidden_size * b)
        trainable = 0
    else:
        act_b = b if mode == "lora" else 2
        per_layer = 34 * tokens * shape.hidden_size * act_b / 2
        layers_kept = 1 if gradient_checkpointing else shape.num_layers
        act = per_layer * layers_kept + (tokens * shape.hidden_size * act_b * shape.num_layers if gradient_checkpointing else 0)
        logits = tokens * shape.vocab_size * 4 * 2
        activations = int(act + logits)
        trainable = lora_params(shape, lora_rank) * 16
    overhead = int(0.1 * (weights + trainable + activations) + 300 * 1024**2)
    total = weights + trainable + activations + overhead
    fits = available is None or total <= available
    return MemoryEstimate(mode, weights, trainable, activations, overhead, total, fits)


def recommend_batch_size(
    shape: ModelShape,
    available: int,
    mode: str = "lora",
    dtype: str = "float32",
    seq_len: int = 512,
    lora_rank: int = 16,
    gradient_checkpointing: bool = False,
    max_batch: int = 64,
    headroom: float = 0.8,
    base_bits: int = 0,
) -> int:
    """The largest power-of-two batch whose estimate fits in `headroom` x `available`; 0 when none does."""
    best, b = 0, 1
    while b <= max_batch:
        est = estimate_memory(shape, mode, dtype, seq_len, b, lora_rank, gradient_checkpointing, base_bits=base_bits)
        if est.total > available * headroom:
            break
        best, b = b, b * 2
    return best


if __name__ == "__main__":
    print(json.dumps(profile().as_dict(), indent=2))
