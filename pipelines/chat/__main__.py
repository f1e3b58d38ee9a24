"""python -m pipelines.chat MODEL_PATH "Hello!"   (a .gguf file or an HF folder): stream one answer.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from ..adapters import attach_adapter
from ..errors import MacTunerError
from .params import ChatParams
from .stream import stream_chat


def _cli(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    from .. import models  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m pipelines.chat", description="Stream one answer from a model.")
    ap.add_argument("model", help="a .gguf file or an HF model folder")
    ap.add_argument("message")
    types = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
             "frequency_penalty": float, "presence_penalty": float, "max_new_tokens": int, "seed": int, "adapter": str}
    for f in fields(ChatParams):
        if f.name in types:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=types[f.name], default=f.default,
                            help=f.metadata["help"])
    ap.add_argument("--stop", action="append", default=[], help=ChatParams.help()["stop"])
    ap.add_argument("--system", default="", help=ChatParams.help()["system_prompt"])
    ap.add_argument("--adapter-dir", default=None, help="attach this LoRA folder and answer with it")
    args = ap.parse_args(argv)
    params = ChatParams(system_prompt=args.system, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                        max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed, adapter=args.adapter)
    lm = last = None
    try:
        path = Path(args.model)
        lm = models.load_gguf(path) if path.is_file() else models.load_hf(path)
        if args.adapter_dir:
            params.adapter = attach_adapter(lm, args.adapter_dir, args.adapter).name
        for last in stream_chat(lm, [{"role": "user", "content": args.message}], params):
            print(last.text, end="", flush=True)
    except MacTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if lm is not None and lm.backend is not None:
            lm.backend.close()  # a GGUF's worker process ends with it
    print(f"\n[{last.finish_reason}; {last.n_tokens} tokens; ttft {last.ttft_s or 0:.3f} s; "
          f"{last.tokens_per_s or 0:.1f} tok/s{'; ' + last.note if last.note else ''}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
