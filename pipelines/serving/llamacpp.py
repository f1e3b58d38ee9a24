"""llama.cpp on this machine: the features of the CPU and of the installed build, and the load settings that work.

The one setting that matters: llama.cpp's *extra buffer types* (weights repacked for faster CPU kernels). On x86
they are the AVX2/AVX512 repack (worth keeping: see bench/chat.py) and, in a build compiled with AMX, the AMX
buffer type - whose matrix kernel segfaults at the first generation on some Xeons (ggml-org/llama.cpp#20824).
`scripts/setup.sh` builds llama-cpp-python without AMX on a CPU that has it, which keeps the repack; when the
installed build has AMX anyway (a wheel built elsewhere) and the CPU has it, `choose()` turns the extra buffer types
off at load time. MACTUNER_LLAMA_EXTRA_BUFTS=on|off overrides the choice.

    settings = choose()                      # LlamaSettings(extra_bufts=..., reason=...)
    llm = open_llama(path, n_ctx=512)        # a Llama loaded with them (in child processes: workers, export jobs)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

from .. import device as devicemod

ENV = "MACTUNER_LLAMA_EXTRA_BUFTS"
# gcc flags that keep -march=native from compiling llama.cpp's AMX kernels (explicit -mno-* win over -march)
AMX_OFF_CFLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


@dataclass(frozen=True)
class LlamaSettings:
    extra_bufts: bool  # llama_model_params.use_extra_bufts
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def llama_cpp_module():
    """Import llama_cpp, with its stdout/stderr suppression turned off.

    With verbose=False, llama-cpp-python dup2()s the *process-wide* stdout/stderr to /dev/null while it loads a
    model, which swallows whatever other threads print meanwhile. llama.cpp's own messages already go through its
    log callback (filtered to errors when verbose=False), so the redirection is not needed."""
    import llama_cpp  # noqa: PLC0415
    import llama_cpp._internals  # noqa: PLC0415
    import llama_cpp.llama  # noqa: PLC0415
    import llama_cpp.llama_chat_format  # noqa: PLC0415

    for mod in (llama_cpp.llama, llama_cpp._internals, llama_cpp.llama_chat_format):
        mod.suppress_stdout_stderr = lambda disable=False: contextlib.nullcontext()
    return llama_cpp


def build_features() -> dict[str, str]:
    """What the installed llama.cpp was compiled with: {"AVX2": "1", "AMX_INT8": "1", "REPACK": "1", ...}."""
    info = llama_cpp_module().llama_print_system_info().decode("utf-8", "replace")
    out = {}
    for part in info.replace("\n", "|").split("|"):
        key, sep, value = part.rpartition("=")
        if sep:
            out[key.split(":")[-1].strip()] = value.strip()
    return out


def choose(cpu_flags: set[str] | None = None, features: dict[str, str] | None = None,
           env: dict | None = None) -> LlamaSettings:
    """The load settings for this CPU and build (arguments replace the real ones, for tests)."""
    env = os.environ if env is None else env
    forced = str(env.get(ENV, "auto")).strip().lower()
    if forced in ("on", "1", "true", "yes"):
        return LlamaSettings(True, f"{ENV}={forced}")
    if forced in ("off", "0", "false", "no"):
        return LlamaSettings(False, f"{ENV}={forced}")
    flags = devicemod.cpu_flags() if cpu_flags is None else cpu_flags
    feats = build_features() if features is None else features
    if "amx_int8" in flags and feats.get("AMX_INT8") == "1":
        return LlamaSettings(False, "this CPU has AMX and llama.cpp was built with its AMX kernel, which crashes on "
                                    "some Xeons (llama.cpp#20824): extra buffer types off (rebuild with "
                                    "scripts/setup.sh to keep the faster repacked kernels)")
    if "amx_int8" in flags:
        return LlamaSettings(True, "AMX CPU, llama.cpp built without AMX: repacked AVX512 kernels on")
    return LlamaSettings(True, "no AMX on this CPU: llama.cpp's repacked kernels on")


SAFE = LlamaSettings(False, "extra buffer types off after a native crash of the model process")


@dataclass(frozen=True)
class PromptBatch:
    """How llama.cpp evaluates a prompt: up to n_batch tokens per decode call, computed n_ubatch at a time
    (bench/rag.py part e measures the choices against llama-cpp-python's defaults, 512 and 512)."""

    n_batch: int = 512
    n_ubatch: int = 512


@contextlib.contextmanager
def model_params(settings: LlamaSettings):
    """While inside, every Llama(...) loads with `settings` (llama-cpp-python takes no use_extra_bufts argument:
    it builds its llama_model_params from llama_model_default_params(), which is wrapped here)."""
    llama_cpp = llama_cpp_module()
    lib = llama_cpp.llama_cpp
    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = settings.extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llama(path, settings: LlamaSettings | None = None, **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs) with this machine's settings; threads default to the cores.
    Only for code that runs in a child process of the studio (a native crash ends that process)."""
    llama_cpp = llama_cpp_module()
    kwargs.setdefault("n_threads", devicemod.cpu_threads())
    kwargs.setdefault("verbose", False)
    with model_params(settings or choose()):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def describe(settings: LlamaSettings | None = None) -> str:
    """One line for logs and benchmarks: the CPU's relevant features, the build's, and the setting in force."""
    flags = devicemod.cpu_flags()
    cpu = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2", "avx_vnni")))
    feats = build_features()
    built = [k for k in ("AVX2", "AVX512", "AVX512_BF16", "AMX_INT8", "REPACK", "OPENMP") if feats.get(k) == "1"]
    s = settings or choose(flags, feats)
    return (f"CPU {devicemod.cpu_name()} [{' '.join(cpu) or 'none of avx2/avx512/amx'}]; llama.cpp built with "
            f"[{' '.join(built)}]; extra buffer types {'on' if s.extra_bufts else 'off'} ({s.reason})")
